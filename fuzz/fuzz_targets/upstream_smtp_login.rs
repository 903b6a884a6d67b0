//! The gateway's SMTP handover to the backend fed an arbitrary backend byte stream, in
//! arbitrary chunks: greeting, EHLO, STARTTLS, then XCLIENT (Postfix) or AUTH PLAIN with the
//! master credential, and the last EHLO's extensions. Sans-I/O.
//!
//! Input layout: byte 0 chooses the backend and the client (bits 0-1: implicit / STARTTLS /
//! plain TCP; bits 2-3: master user, SASL authzid or XCLIENT; bits 4-5: no EHLO name from the
//! client, a good one, one with CRLF and a command in it, an empty one; bit 6: an IPv6
//! client), byte 1 seeds the chunk sizes, the rest is what the backend sends.
#![no_main]

use std::path::PathBuf;
use std::time::Duration;

use imapgate::config::{BackendConfig, BackendLogin, BackendTls, Protocol};
use imapgate::secret::Secret;
use imapgate::upstream::login::UpStep;
use imapgate::upstream::smtp::{client_extensions, SmtpLogin, MAX_REPLY_BYTES, MAX_REPLY_LINES};
use libfuzzer_sys::fuzz_target;

const PASSWORD: &[u8] = b"master-secret-0f8e";

fn backend(mode: u8) -> BackendConfig {
    let login = match (mode >> 2) & 3 {
        0 => BackendLogin::MasterUser {
            separator: "*".into(),
        },
        1 => BackendLogin::SaslAuthzid,
        _ => BackendLogin::Xclient,
    };
    let xclient = login == BackendLogin::Xclient;
    BackendConfig {
        name: "fuzz".into(),
        protocol: Protocol::Smtp,
        host: "127.0.0.1".into(),
        port: 587,
        tls: match mode & 3 {
            0 => BackendTls::Implicit,
            1 => BackendTls::Starttls,
            _ => BackendTls::None,
        },
        ca_file: None::<PathBuf>,
        server_name: "localhost".into(),
        login,
        master_user: if xclient { "" } else { "gateway" }.into(),
        master_password: Secret::from_slice(if xclient { b"" } else { PASSWORD }),
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
    let helo = match (mode >> 4) & 3 {
        0 => None,
        1 => Some("laptop.example.net"),
        2 => Some("evil\r\nMAIL FROM:<x>"),
        _ => Some(""),
    };
    let client = if mode & 64 == 0 {
        "192.0.2.9:5555"
    } else {
        "[2001:db8::9]:5555"
    };
    let mut up = SmtpLogin::new(&b, "al+ice=é@example.org", client.parse().unwrap(), helo)
        .expect("a plain user name is accepted");
    let mut tls_done = !starttls;
    let mut handovers = 0u32;
    let mut rng = u32::from(*seed) | 0x100;
    let mut rest = input;
    let mut steps = 0u32;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "the handover does not make progress");
        match up.step() {
            UpStep::Send(bytes) => {
                // One command per write, one line: nothing the client or backend said can
                // smuggle a second command in.
                assert!(bytes.ends_with(b"\r\n"));
                assert_eq!(bytes.iter().filter(|&&c| c == b'\n').count(), 1);
                assert!(
                    !contains(&bytes, PASSWORD),
                    "the password goes out only in base64"
                );
                if bytes.starts_with(b"AUTH") || bytes.starts_with(b"XCLIENT") {
                    // The identity goes out once, and only after STARTTLS when it is set.
                    assert!(tls_done, "handover before STARTTLS");
                    handovers += 1;
                    assert_eq!(handovers, 1, "the handover was sent twice");
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
            UpStep::Done(extensions) => {
                assert!(handovers == 1 && tls_done, "done without a handover");
                assert!(extensions.len() <= MAX_REPLY_LINES);
                assert!(extensions.iter().map(String::len).sum::<usize>() <= MAX_REPLY_BYTES);
                for e in client_extensions(&extensions) {
                    let k = e
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    assert!(!["AUTH", "STARTTLS", "XCLIENT", "XFORWARD"].contains(&k.as_str()));
                    assert!(!k.starts_with("AUTH="));
                }
                // The backend speaks only when spoken to: nothing is left for the client.
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
