//! The pre-auth session state machine fed an arbitrary client byte stream, in arbitrary chunks,
//! with arbitrary verdicts for the logins it asks to check. Sans-I/O: no sockets, no clock.
//!
//! Input layout: byte 0 chooses the listener (bit 0: STARTTLS listener, bit 1: OAuth offered),
//! byte 1 seeds the chunk sizes and verdicts, the rest is what the client sends.
#![no_main]

use imapgate::auth::{Credential, Mechanism};
use imapgate::session::preauth::{OAuthChallenges, PreAuth, PreAuthLimits, Refused, Step};
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
    // With token mechanisms, the error challenges the gateway builds from its issuers.
    let challenges = (mode & 2 == 2).then(|| {
        std::sync::Arc::new(OAuthChallenges::new(
            Some("https://idp.example/.well-known/openid-configuration"),
            "imap",
        ))
    });
    let mut sm = PreAuth::new(LIMITS, starttls_listener, !starttls_listener)
        .with_oauth_challenges(challenges);
    let mut tls = !starttls_listener;
    check_reply(sm.greeting());
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
            Step::Send(bytes) => check_reply(&bytes),
            Step::NeedInput => {
                // Memory stays bounded whatever the client sends: at most one unfinished
                // command (line, SASL line and literal limits) plus the last chunk.
                let bound = LIMITS.line_bytes + LIMITS.sasl_bytes + LIMITS.literal_bytes + 64;
                assert!(sm.buffered() <= bound, "{} bytes buffered", sm.buffered());
                if rest.is_empty() {
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
            }
            Step::Authenticate(req) => {
                // Invariant 1: no credential is ever checked before TLS.
                assert!(tls, "a login was accepted for checking in cleartext");
                match &req.credential {
                    Credential::Password { user, password } => {
                        // `LOGIN "" ""` is valid syntax, answered as a failed login; a PLAIN
                        // message with an empty name or password never decodes.
                        assert!(matches!(req.mechanism, Mechanism::Login | Mechanism::Plain));
                        if req.mechanism == Mechanism::Plain {
                            assert!(!user.is_empty() && !password.is_empty());
                        }
                    }
                    Credential::Bearer { token, .. } => {
                        assert!(req.mechanism.is_oauth() && !token.is_empty());
                    }
                    Credential::Malformed(_) => assert_eq!(req.mechanism, Mechanism::Plain),
                    Credential::MalformedBearer(_) => assert!(req.mechanism.is_oauth()),
                }
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                match (rng >> 16) % 5 {
                    // The login room's results, answered by the state machine.
                    0 | 1 => sm.login_refused(&req.tag, req.mechanism, Refused::Failed),
                    2 => sm.login_refused(&req.tag, req.mechanism, Refused::Unavailable),
                    3 => sm.login_refused(&req.tag, req.mechanism, Refused::TooManySessions),
                    _ => {
                        // The login reply is made once per capability list, then tagged.
                        let reply = imapgate::imap::LoginOk::new(&imapgate::imap::capabilities([
                            "IMAP4rev1",
                            "IDLE",
                        ]));
                        let (ok, pipelined) = sm.auth_succeeded(&req.tag, &reply);
                        check_reply(&ok);
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

/// Every reply is whole lines, never a bare CR or LF, never a NUL.
fn check_reply(bytes: &[u8]) {
    assert!(
        bytes.ends_with(b"\r\n"),
        "reply is not a whole line: {bytes:?}"
    );
    for (i, b) in bytes.iter().enumerate() {
        assert_ne!(*b, 0, "NUL in a reply");
        if *b == b'\n' {
            assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF in a reply");
        }
        if *b == b'\r' {
            assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR in a reply");
        }
    }
}
