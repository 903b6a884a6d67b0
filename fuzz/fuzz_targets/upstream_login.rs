//! The gateway's login to the backend fed an arbitrary backend byte stream, in arbitrary
//! chunks: greeting, capabilities, STARTTLS, ID, the master login (LOGIN or AUTHENTICATE
//! PLAIN with an authzid) and the post-login capabilities. Sans-I/O.
//!
//! Input layout: byte 0 chooses the backend (bits 0-1: implicit / STARTTLS / plain TCP,
//! bit 2: SASL authzid instead of a master-user LOGIN, bit 3: send ID), byte 1 seeds the chunk
//! sizes, the rest is what the backend sends.
#![no_main]

use std::path::PathBuf;
use std::time::Duration;

use imapgate::config::{BackendConfig, BackendLogin, BackendTls, Protocol};
use imapgate::secret::Secret;
use imapgate::upstream::login::{client_capabilities, UpStep, UpstreamLogin};
use libfuzzer_sys::fuzz_target;

const PASSWORD: &[u8] = b"master-secret-0f8e";
/// base64("alice@example.org\0gateway\0master-secret-0f8e"): the SASL PLAIN response.
const PLAIN_B64: &[u8] = b"YWxpY2VAZXhhbXBsZS5vcmcAZ2F0ZXdheQBtYXN0ZXItc2VjcmV0LTBmOGU=";

fn backend(mode: u8) -> BackendConfig {
    BackendConfig {
        name: "fuzz".into(),
        protocol: Protocol::Imap,
        host: "127.0.0.1".into(),
        port: 143,
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
        master_password: Secret::from_slice(PASSWORD),
        send_id: mode & 8 == 8,
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
    let mut up = UpstreamLogin::new(&b, "alice@example.org", "192.0.2.9:5555".parse().unwrap())
        .expect("a plain user name is accepted");
    let mut tls_done = !starttls;
    let mut sent_login = false;
    let mut rng = u32::from(*seed) | 0x100;
    let mut rest = input;
    let mut steps = 0u32;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "the login does not make progress");
        match up.step() {
            UpStep::Send(bytes) => {
                assert!(bytes.ends_with(b"\r\n"));
                let has_secret = contains(&bytes, PASSWORD) || contains(&bytes, PLAIN_B64);
                if has_secret || contains(&bytes, b"LOGIN") || contains(&bytes, b"AUTHENTICATE") {
                    // The master credential only ever goes out after STARTTLS (when asked).
                    assert!(tls_done, "master credential sent before STARTTLS");
                    sent_login = true;
                }
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
                assert!(starttls && !tls_done, "STARTTLS not asked for, or twice");
                tls_done = true;
                up.tls_started();
            }
            UpStep::Done(caps) => {
                // Logged in only after the login was sent (and over TLS when STARTTLS is set).
                assert!(sent_login && tls_done, "login reported without a login");
                for c in client_capabilities(&caps) {
                    let u = c.to_ascii_uppercase();
                    assert!(u != "STARTTLS" && u != "LOGINDISABLED" && !u.starts_with("AUTH="));
                }
                // What the backend sent after its OK goes to the client untouched, no more.
                assert!(up.take_remaining().len() <= input.len());
                return;
            }
            UpStep::Fail(_) => return,
        }
    }
});

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
