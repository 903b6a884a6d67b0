//! The SMTP submission front fed an arbitrary client byte stream, in arbitrary chunks, with
//! arbitrary verdicts for the logins it asks to check. Sans-I/O: no sockets, no clock.
//!
//! Input layout: byte 0 chooses the listener (bit 0: STARTTLS listener, bit 1: OAuth offered,
//! bit 2: a sign-in alert is configured), byte 1 seeds the chunk sizes and verdicts, the rest is
//! what the client sends.
#![no_main]

use std::sync::Arc;

use imapgate::auth::{Credential, Mechanism};
use imapgate::session::front::{
    Bye, Front, FrontConfig, OAuthChallenges, PreAuthLimits, Refused, Step, Welcome,
};
use imapgate::session::smtp::SmtpFront;
use libfuzzer_sys::fuzz_target;

const LIMITS: PreAuthLimits = PreAuthLimits {
    line_bytes: 8 * 1024,
    literal_bytes: 4 * 1024,
    sasl_bytes: 24 * 1024,
    bad_commands_before_bye: 5,
    auth_failures_per_connection: 3,
};

fuzz_target!(|data: &[u8]| {
    let [mode, seed, input @ ..] = data else {
        return;
    };
    let starttls_listener = mode & 1 == 1;
    let cfg = FrontConfig {
        limits: LIMITS,
        starttls_listener,
        // With token mechanisms, the error challenges the gateway builds from its issuers.
        oauth: (mode & 2 == 2).then(|| {
            Arc::new(OAuthChallenges::new(
                Some("https://idp.example/.well-known/openid-configuration"),
                "mail",
            ))
        }),
        login_alert: (mode & 4 == 4)
            .then(|| Arc::from("Approve this sign-in at https://portal.example/approve")),
        login_alert_imap: None,
        hostname: Arc::from("mx.example.org"),
        // A backend that offers what the gateway must withhold.
        smtp_extensions: [
            "PIPELINING",
            "SIZE 10240000",
            "AUTH PLAIN LOGIN",
            "STARTTLS",
            "XCLIENT NAME ADDR LOGIN",
            "8BITMIME",
            "CHUNKING",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    let mut sm = SmtpFront::new(&cfg, !starttls_listener);
    let mut tls = !starttls_listener;
    check_reply(&sm.greeting(), tls);
    let mut rng = u32::from(*seed) | 0x100;
    let mut rest = input;
    let mut steps = 0u32;
    loop {
        steps += 1;
        assert!(
            steps < 1_000_000,
            "the state machine does not make progress"
        );
        match sm.step() {
            Step::Send(bytes) => check_reply(&bytes, tls),
            Step::NeedInput => {
                // Memory stays bounded whatever the client sends: at most one unfinished line
                // (the SASL limit is the larger one); every complete line has been answered.
                assert!(
                    sm.buffered() <= LIMITS.sasl_bytes + 1,
                    "{} bytes buffered",
                    sm.buffered()
                );
                if rest.is_empty() {
                    // The driver's last word (shutdown or a timeout) closes the session.
                    rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let why = [Bye::Shutdown, Bye::Timeout, Bye::Idle][(rng >> 16) as usize % 3];
                    check_reply(&sm.bye_now(why), tls);
                    assert!(matches!(sm.step(), Step::Close));
                    return;
                }
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let n = (1 + (rng >> 16) as usize % 64).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                sm.feed(chunk);
                rest = tail;
            }
            Step::StartTls => {
                assert!(
                    starttls_listener && !tls,
                    "STARTTLS twice or on the TLS port"
                );
                tls = true;
                sm.tls_started();
                // Invariant 2: nothing sent before the handshake is read after it.
                assert_eq!(sm.buffered(), 0);
                assert_eq!(sm.helo(), None);
            }
            Step::Authenticate(req) => {
                // Invariant 1: no credential is ever checked before TLS.
                assert!(tls, "a login was accepted for checking in cleartext");
                match &req.credential {
                    Credential::Password { user, password } => {
                        assert!(matches!(req.mechanism, Mechanism::Login | Mechanism::Plain));
                        assert!(!user.is_empty() && !password.is_empty());
                    }
                    Credential::Bearer { token, .. } => {
                        assert!(req.mechanism.is_oauth() && !token.is_empty());
                    }
                    Credential::Malformed(_) => assert!(!req.mechanism.is_oauth()),
                    Credential::MalformedBearer(_) => assert!(req.mechanism.is_oauth()),
                }
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                match (rng >> 16) % 5 {
                    // The login room's results, answered by the front.
                    0 | 1 => sm.refused(Refused::Failed),
                    2 => sm.refused(Refused::Unavailable),
                    3 => sm.refused(Refused::TooManySessions),
                    _ => {
                        let (ok, pipelined) = Box::new(sm).succeeded(Welcome::Fixed);
                        assert_eq!(ok, b"235 2.7.0 Authentication successful\r\n");
                        // Whatever the client pipelined is handed on intact, never more than
                        // it sent.
                        assert!(pipelined.len() <= input.len());
                        return;
                    }
                }
            }
            Step::Close => return,
        }
    }
});

/// Every reply is whole SMTP reply lines (three digits, then a space or a hyphen), never a
/// bare CR or LF, never a NUL, never longer than RFC 5321 §4.5.3.1.5 allows; before TLS nothing
/// mentions AUTH or asks for a SASL response, after TLS nothing offers STARTTLS or XCLIENT.
fn check_reply(bytes: &[u8], tls: bool) {
    assert!(
        bytes.ends_with(b"\r\n"),
        "reply is not a whole line: {bytes:?}"
    );
    let text = std::str::from_utf8(bytes).expect("replies are ASCII");
    for line in text.strip_suffix("\r\n").unwrap_or(text).split("\r\n") {
        assert!(!line.contains(['\r', '\n', '\0']), "bad line: {line:?}");
        assert!(line.len() <= 510, "line too long: {line:?}");
        let b = line.as_bytes();
        assert!(
            b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-'),
            "not a reply line: {line:?}"
        );
        if tls {
            assert!(
                !line.contains("STARTTLS") && !line.contains("XCLIENT"),
                "{line:?}"
            );
        } else {
            assert!(
                !line.contains("AUTH") && !line.starts_with("334"),
                "{line:?}"
            );
        }
    }
}
