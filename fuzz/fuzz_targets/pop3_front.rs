//! The POP3 front fed an arbitrary client byte stream, in arbitrary chunks, with arbitrary
//! verdicts for the logins it asks to check. Sans-I/O: no sockets, no clock.
//!
//! Input layout: byte 0 chooses the listener (bit 0: STLS listener on port 110, else implicit
//! TLS; bit 1: OAuth offered; bit 2: a sign-in approval sentence), byte 1 seeds the chunk
//! sizes and verdicts, the rest is what the client sends.
#![no_main]

use std::sync::Arc;

use imapgate::auth::{Credential, Mechanism};
use imapgate::session::front::{
    Bye, Front, FrontConfig, OAuthChallenges, PreAuthLimits, Refused, Step, Welcome,
};
use imapgate::session::pop3::Pop3Front;
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
        oauth: (mode & 2 == 2).then(|| {
            Arc::new(OAuthChallenges::new(
                Some("https://idp.example/.well-known/openid-configuration"),
                "mail",
            ))
        }),
        login_alert: (mode & 4 == 4).then(|| Arc::from("Approve at https://portal.example/")),
        login_alert_imap: None,
        hostname: Arc::from("gw.example"),
        smtp_extensions: Arc::from(Vec::new()),
    };
    let mut sm = Pop3Front::new(&cfg, !starttls_listener);
    let mut tls = !starttls_listener;
    check_reply(&sm.greeting(), tls);
    let mut rng = u32::from(*seed) | 0x100;
    let mut rest = input;
    // Everything fed so far: what is handed on after a login must be its tail.
    let mut fed = Vec::new();
    let mut steps = 0u32;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "the front does not make progress");
        match sm.step() {
            Step::Send(bytes) => check_reply(&bytes, tls),
            Step::NeedInput => {
                // Memory stays bounded whatever the client sends: less than one line.
                let bound = LIMITS.line_bytes.max(LIMITS.sasl_bytes);
                assert!(sm.buffered() < bound, "{} bytes buffered", sm.buffered());
                if rest.is_empty() {
                    // The driver's timeouts: a last line, then nothing more.
                    check_reply(&sm.bye_now(Bye::Idle), tls);
                    assert!(matches!(sm.step(), Step::Close));
                    return;
                }
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let n = (1 + (rng >> 16) as usize % 64).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                sm.feed(chunk);
                fed.extend_from_slice(chunk);
                rest = tail;
            }
            Step::StartTls => {
                assert!(starttls_listener && !tls, "STLS twice or on port 995");
                tls = true;
                sm.tls_started();
                assert_eq!(sm.buffered(), 0, "bytes from before the handshake survived");
            }
            Step::Authenticate(login) => {
                // Invariant 1: no credential is ever checked before TLS.
                assert!(tls, "a login was accepted for checking in cleartext");
                match &login.credential {
                    Credential::Password { user, password } => match login.mechanism {
                        // USER names are checked; a PLAIN message with an empty name or
                        // password never decodes.
                        Mechanism::Login => assert!(!user.is_empty() && user.len() <= 255),
                        Mechanism::Plain => assert!(!user.is_empty() && !password.is_empty()),
                        other => panic!("a password for {other:?}"),
                    },
                    Credential::Bearer { token, .. } => {
                        assert!(login.mechanism.is_oauth() && cfg.oauth.is_some());
                        assert!(!token.is_empty());
                    }
                    Credential::Malformed(_) => assert_eq!(login.mechanism, Mechanism::Plain),
                    Credential::MalformedBearer(_) => {
                        assert!(login.mechanism.is_oauth() && cfg.oauth.is_some())
                    }
                }
                // Invariant 3: nothing is processed while the login is checked.
                let before = sm.buffered();
                assert!(matches!(sm.step(), Step::NeedInput));
                assert_eq!(sm.buffered(), before);
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                match (rng >> 16) % 5 {
                    0 | 1 => sm.refused(Refused::Failed),
                    2 => sm.refused(Refused::Unavailable),
                    3 => sm.refused(Refused::TooManySessions),
                    _ => {
                        let (ok, pipelined) = Box::new(sm).succeeded(Welcome::Fixed);
                        assert_eq!(ok, b"+OK Logged in.\r\n");
                        // Whatever the client pipelined is handed on intact and in order: the
                        // tail of what it sent.
                        assert_eq!(pipelined.len(), before);
                        assert!(fed.ends_with(&pipelined[..]), "pipelined bytes changed");
                        return;
                    }
                }
            }
            Step::Close => return,
        }
    }
});

/// Every reply is whole CRLF lines of printable ASCII; before TLS never a `+ ` continuation.
fn check_reply(bytes: &[u8], tls: bool) {
    assert!(
        bytes.ends_with(b"\r\n"),
        "reply is not a whole line: {bytes:?}"
    );
    for line in bytes.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            line.iter().all(|b| (0x20..0x7f).contains(b)),
            "control character in a reply: {bytes:?}"
        );
        assert!(tls || !line.starts_with(b"+ "), "a continuation before TLS");
    }
}
