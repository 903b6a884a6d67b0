//! The gateway's POP3 login to the backend fed an arbitrary backend byte stream, in arbitrary
//! chunks: greeting, STLS, then USER/PASS with the master user or AUTH PLAIN with an authzid
//! (inline, or after the server's `+ ` when the line would be too long). Sans-I/O.
//!
//! Input layout: byte 0 chooses the backend (bits 0-1: implicit / STLS / plain TCP, bit 2:
//! SASL authzid instead of USER/PASS, bit 3: a master password long enough that AUTH PLAIN
//! waits for the continuation), byte 1 seeds the chunk sizes, the rest is what the backend
//! sends.
#![no_main]

use std::path::PathBuf;
use std::time::Duration;

use imapgate::config::{BackendConfig, BackendLogin, BackendTls, Protocol};
use imapgate::secret::Secret;
use imapgate::upstream::login::UpStep;
use imapgate::upstream::pop3::Pop3Login;
use libfuzzer_sys::fuzz_target;

const PASSWORD: &[u8] = b"master-secret-0f8e";
const LONG_PASSWORD: &[u8] = &[b'k'; 240];

fn backend(mode: u8) -> BackendConfig {
    BackendConfig {
        name: "fuzz".into(),
        protocol: Protocol::Pop3,
        host: "127.0.0.1".into(),
        port: 110,
        tls: match mode & 3 {
            0 => BackendTls::Implicit,
            1 => BackendTls::Starttls,
            _ => BackendTls::None,
        },
        ca_file: None::<PathBuf>,
        server_name: "localhost".into(),
        login: if mode & 4 == 0 {
            BackendLogin::MasterUser {
                separator: "*".into(),
            }
        } else {
            BackendLogin::SaslAuthzid
        },
        master_user: "gateway".into(),
        master_password: Secret::from_slice(if mode & 8 == 0 {
            PASSWORD
        } else {
            LONG_PASSWORD
        }),
        send_id: false,
        connect_timeout: Duration::from_secs(5),
        login_timeout: Duration::from_secs(10),
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, seed, input @ ..] = data else {
        return;
    };
    let b = backend(*mode);
    let starttls = b.tls == BackendTls::Starttls;
    let password = b.master_password.expose().to_vec();
    let mut up = Pop3Login::new(&b, "alice@example.org", "192.0.2.9:5555".parse().unwrap())
        .expect("a plain user name is accepted");
    let mut tls_done = !starttls;
    let mut user_sent = false;
    let mut credential_sent = 0u32;
    let mut rng = u32::from(*seed) | 0x100;
    let mut rest = input;
    let mut steps = 0u32;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "the login does not make progress");
        match up.step() {
            UpStep::Send(bytes) => {
                assert!(bytes.ends_with(b"\r\n"));
                assert_eq!(bytes.iter().filter(|&&c| c == b'\n').count(), 1);
                if bytes == b"STLS\r\n" {
                    assert!(!tls_done, "STLS after TLS");
                    continue;
                }
                // Every login command (and the password or the SASL response) goes out only
                // after TLS when STLS is set.
                assert!(tls_done, "login before STLS");
                if bytes.starts_with(b"PASS ") {
                    assert!(user_sent, "PASS before USER");
                } else {
                    assert!(!contains(&bytes, &password), "the password outside PASS");
                }
                if bytes.starts_with(b"USER ") || bytes == b"AUTH PLAIN\r\n" {
                    assert!(!user_sent, "the login started twice");
                    user_sent = true;
                } else if bytes.starts_with(b"AUTH PLAIN ") {
                    assert!(!user_sent, "the login started twice");
                    user_sent = true;
                    credential_sent += 1;
                } else {
                    // PASS, or the response after `AUTH PLAIN` and the server's `+ `.
                    assert!(user_sent, "a credential with no login started");
                    credential_sent += 1;
                }
                assert!(credential_sent <= 1, "the credential went out twice");
            }
            UpStep::NeedInput => {
                if rest.is_empty() {
                    return;
                }
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let n = (1 + (rng >> 16) as usize % 64).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                up.feed(chunk);
                rest = tail;
            }
            UpStep::StartTls => {
                assert!(starttls && !tls_done, "STLS not asked for, or twice");
                tls_done = true;
                up.tls_started();
            }
            UpStep::Done(caps) => {
                assert!(
                    credential_sent == 1 && tls_done,
                    "logged in without a login"
                );
                assert!(caps.is_empty());
                assert!(up.take_remaining().is_empty());
                return;
            }
            UpStep::Fail(_) => return,
        }
    }
});

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
