//! Known-answer tests of the POP3 front, without sockets: what a client (or an attacker on
//! the path) sees for each input.

use std::sync::Arc;

use super::*;

const LIMITS: PreAuthLimits = PreAuthLimits {
    line_bytes: 255,
    literal_bytes: 64,
    sasl_bytes: 4096,
    bad_commands_before_bye: 3,
    auth_failures_per_connection: 2,
};

fn cfg(starttls_listener: bool) -> FrontConfig {
    FrontConfig {
        limits: LIMITS,
        starttls_listener,
        oauth: None,
        login_alert: None,
        login_alert_imap: None,
        hostname: Arc::from("gw.example"),
        smtp_extensions: Arc::from(Vec::new()),
    }
}

/// Port 110: plain until STLS.
fn port_110() -> Pop3Front {
    Pop3Front::new(&cfg(true), false)
}

/// Port 995: TLS from the start.
fn port_995() -> Pop3Front {
    Pop3Front::new(&cfg(false), true)
}

fn with_oauth(alert: Option<&str>) -> Pop3Front {
    let mut c = cfg(false);
    c.oauth = Some(Arc::new(OAuthChallenges::new(
        Some("https://idp.example/.well-known/openid-configuration"),
        "mail",
    )));
    c.login_alert = alert.map(Arc::from);
    Pop3Front::new(&c, true)
}

/// Feeds input and collects what is sent until the front needs input or asks for more.
fn run(sm: &mut Pop3Front, input: &[u8]) -> (String, Option<Step>) {
    sm.feed(input);
    let mut out = Vec::new();
    loop {
        match sm.step() {
            Step::Send(b) => out.extend(b),
            Step::NeedInput => return (String::from_utf8_lossy(&out).into_owned(), None),
            other => return (String::from_utf8_lossy(&out).into_owned(), Some(other)),
        }
    }
}

fn login(step: Option<Step>) -> Login {
    match step {
        Some(Step::Authenticate(login)) => login,
        other => panic!("expected a login, got {other:?}"),
    }
}

fn password(login: &Login) -> (&str, &Secret) {
    match &login.credential {
        Credential::Password { user, password } => (user, password),
        other => panic!("expected a password, got {other:?}"),
    }
}

const CAPA_BEFORE_TLS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n\
    PIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n";
const CAPA_AFTER_TLS: &str = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n\
    PIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN\r\n.\r\n";
const PLAINTEXT_REFUSED: &str =
    "-ERR [AUTH] Plaintext authentication is not allowed without TLS\r\n";

#[test]
fn the_greeting_has_no_apop_timestamp() {
    for sm in [port_110(), port_995()] {
        let greeting = sm.greeting();
        assert_eq!(greeting, b"+OK POP3 ready.\r\n");
        assert!(!greeting.contains(&b'<'));
    }
}

#[test]
fn capa_before_tls_offers_stls_and_no_credential_after_tls_the_opposite() {
    let mut sm = port_110();
    let (out, step) = run(&mut sm, b"CAPA\r\n");
    assert!(step.is_none());
    assert_eq!(out, CAPA_BEFORE_TLS);
    let (out, step) = run(&mut sm, b"stls\r\n");
    assert_eq!(out, "+OK Begin TLS negotiation\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    sm.tls_started();
    let (out, _) = run(&mut sm, b"capa\r\n");
    assert_eq!(out, CAPA_AFTER_TLS);
    // Implicit TLS: the post-TLS set from the start; token mechanisms when configured.
    let (out, _) = run(&mut port_995(), b"CAPA\r\n");
    assert_eq!(out, CAPA_AFTER_TLS);
    let (out, _) = run(&mut with_oauth(None), b"CAPA\r\n");
    assert!(
        out.contains("\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n"),
        "{out}"
    );
    assert!(!out.contains("STLS") && !out.contains("IMPLEMENTATION"));
}

#[test]
fn no_credential_before_tls_and_never_a_continuation() {
    let mut sm = port_110();
    let (out, step) = run(
        &mut sm,
        b"USER alice\r\nPASS pw\r\nAUTH PLAIN AGFsaWNlAHB3\r\nAUTH PLAIN\r\nAUTH\r\n",
    );
    assert!(step.is_none(), "{step:?}");
    assert_eq!(out, PLAINTEXT_REFUSED.repeat(5));
    assert!(!out.contains("+ "));
    // The USER sent in the clear was not remembered: after TLS, PASS has no user.
    run(&mut sm, b"STLS\r\n");
    sm.tls_started();
    let (out, step) = run(&mut sm, b"PASS pw\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR No user name given\r\n");
}

#[test]
fn stls_drops_everything_pipelined_behind_it() {
    let mut sm = port_110();
    let (out, step) = run(&mut sm, b"STLS\r\nUSER x\r\nPASS y\r\n");
    assert_eq!(out, "+OK Begin TLS negotiation\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    // Whatever is buffered when the handshake completes is dropped too.
    sm.feed(b"USER y\r\n");
    sm.tls_started();
    assert_eq!(sm.buffered(), 0);
    // Nothing of the injected lines is answered or acted on.
    let (out, step) = run(&mut sm, b"");
    assert_eq!(out, "");
    assert!(step.is_none());
    // The injected USER is not there for a PASS.
    let (out, step) = run(&mut sm, b"PASS z\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR No user name given\r\n");
    // A second STLS, or one on port 995, is refused.
    let (out, step) = run(&mut sm, b"STLS\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR TLS already active\r\n");
    let (out, step) = run(&mut port_995(), b"STLS\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR TLS already active\r\n");
}

#[test]
fn apop_is_refused_without_a_login_and_counts_as_bad() {
    let mut sm = port_995();
    let apop = b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n";
    let (out, step) = run(&mut sm, apop);
    assert!(step.is_none());
    assert_eq!(out, "-ERR [AUTH] APOP is not supported\r\n");
    run(&mut sm, apop);
    let (out, step) = run(&mut sm, apop);
    assert_eq!(out, "-ERR Too many invalid commands\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn user_pass_takes_the_rest_of_the_line_as_password_and_echoes_nothing() {
    let mut sm = port_995();
    let (out, step) = run(&mut sm, b"user alice@example.org\r\n");
    assert!(step.is_none());
    assert_eq!(out, "+OK Send password\r\n");
    // Bare LF is accepted; spaces inside and around the password are kept.
    let (out, step) = run(&mut sm, b"PASS  correct horse battery \n");
    assert_eq!(out, "");
    let l = login(step);
    assert_eq!(l.mechanism, Mechanism::Login);
    let (user, pw) = password(&l);
    assert_eq!(user, "alice@example.org");
    assert!(pw.ct_eq(b" correct horse battery "));
    // A name with a control character is refused, and never echoed.
    let mut sm = port_995();
    let (out, _) = run(&mut sm, b"USER evil\x1b[2Jname\r\n");
    assert_eq!(out, "-ERR Invalid user name\r\n");
    let (out, _) = run(&mut sm, format!("USER {}\r\n", "a".repeat(200)).as_bytes());
    assert_eq!(out, "+OK Send password\r\n");
}

#[test]
fn auth_plain_with_initial_response_and_with_a_continuation() {
    let mut sm = port_995();
    // base64("\0alice\0pw")
    let (out, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    assert_eq!(out, "");
    let l = login(step);
    assert_eq!(l.mechanism, Mechanism::Plain);
    let (user, pw) = password(&l);
    assert_eq!(user, "alice");
    assert!(pw.ct_eq(b"pw"));

    let mut sm = port_995();
    let (out, step) = run(&mut sm, b"auth plain\r\n");
    assert!(step.is_none());
    assert_eq!(out, "+ \r\n");
    let (out, step) = run(&mut sm, b"AGFsaWNlAHB3\r\n");
    assert_eq!(out, "");
    assert_eq!(password(&login(step)).0, "alice");

    // `=` is an empty initial response: malformed PLAIN, still a login that fails uniformly.
    let mut sm = port_995();
    let (_, step) = run(&mut sm, b"AUTH PLAIN =\r\n");
    assert!(matches!(login(step).credential, Credential::Malformed(_)));
}

#[test]
fn auth_without_arguments_lists_the_mechanisms_and_login_is_not_one() {
    let (out, _) = run(&mut port_995(), b"AUTH\r\n");
    assert_eq!(out, "+OK Mechanisms follow\r\nPLAIN\r\n.\r\n");
    let (out, _) = run(&mut with_oauth(None), b"AUTH\r\n");
    assert_eq!(
        out,
        "+OK Mechanisms follow\r\nPLAIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n"
    );
    let (out, step) = run(&mut port_995(), b"AUTH LOGIN\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR Unsupported mechanism\r\n");
}

#[test]
fn a_star_cancels_the_exchange() {
    let mut sm = port_995();
    run(&mut sm, b"AUTH PLAIN\r\n");
    let (out, step) = run(&mut sm, b"*\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR Authentication cancelled\r\n");
    // Back to commands.
    let (out, _) = run(&mut sm, b"CAPA\r\n");
    assert_eq!(out, CAPA_AFTER_TLS);
}

#[test]
fn bad_base64_is_a_bad_command_not_a_login() {
    let mut sm = port_995();
    let (out, step) = run(&mut sm, b"AUTH PLAIN !!notbase64\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR Invalid base64 data\r\n");
    run(&mut sm, b"AUTH PLAIN\r\n");
    let (out, step) = run(&mut sm, b"AGFsaWNl AHB3\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR Invalid base64 data\r\n");
    // The third protocol error ends the session, still without a login.
    let (out, step) = run(&mut sm, b"AUTH PLAIN ====\r\n");
    assert_eq!(out, "-ERR Too many invalid commands\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn a_refused_token_gets_the_error_challenge_then_the_err() {
    // Token mechanisms are refused where no issuer is configured.
    let (out, step) = run(
        &mut port_995(),
        b"AUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n",
    );
    assert!(step.is_none());
    assert_eq!(out, "-ERR Unsupported mechanism\r\n");

    let mut sm = with_oauth(Some("Approve this sign-in at https://portal.example/"));
    // base64("user=a\x01auth=Bearer t\x01\x01")
    let (_, step) = run(
        &mut sm,
        b"AUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n",
    );
    let l = login(step);
    assert_eq!(l.mechanism, Mechanism::XOAuth2);
    assert!(
        matches!(l.credential, Credential::Bearer { ref user, .. } if user.as_deref() == Some("a"))
    );
    sm.refused(Refused::Failed);
    let (out, step) = run(&mut sm, b"");
    assert!(step.is_none());
    let challenge = out
        .strip_prefix("+ ")
        .and_then(|c| c.strip_suffix("\r\n"))
        .expect("a `+ ` challenge line");
    let json = base64::engine::general_purpose::STANDARD
        .decode(challenge)
        .expect("base64");
    let json: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(json["status"], "401");
    assert_eq!(json["scope"], "mail");
    // The client's empty response ends it: the uniform failure, no approval sentence (that is
    // for password logins).
    let (out, step) = run(&mut sm, b"\r\n");
    assert!(step.is_none());
    assert_eq!(out, "-ERR [AUTH] Authentication failed.\r\n");

    // OAUTHBEARER through a continuation; its challenge names the discovery URL.
    run(&mut sm, b"AUTH OAUTHBEARER\r\n");
    let (_, step) = run(&mut sm, b"bm90IHZhbGlk\r\n");
    assert!(matches!(
        login(step).credential,
        Credential::MalformedBearer(_)
    ));
    sm.refused(Refused::Failed);
    let (out, _) = run(&mut sm, b"");
    let json = base64::engine::general_purpose::STANDARD
        .decode(out.trim_start_matches("+ ").trim_end())
        .expect("base64");
    let json: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(json["status"], "invalid_token");
    assert_eq!(
        json["openid-configuration"],
        "https://idp.example/.well-known/openid-configuration"
    );
    // The second failure of the connection: the -ERR, then the close.
    let (out, step) = run(&mut sm, b"AQ==\r\n");
    assert_eq!(out, "-ERR [AUTH] Authentication failed.\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn a_failed_password_login_gets_one_answer_with_the_alert_when_configured() {
    let mut sm = port_995();
    let (_, step) = run(&mut sm, b"USER alice\r\nPASS wrong\r\n");
    login(step);
    sm.refused(Refused::Failed);
    let (out, step) = run(&mut sm, b"");
    assert!(step.is_none());
    assert_eq!(out, "-ERR [AUTH] Authentication failed.\r\n");
    // The USER is forgotten after a failure.
    let (out, _) = run(&mut sm, b"PASS again\r\n");
    assert_eq!(out, "-ERR No user name given\r\n");

    // Sign-in approval: the same line, with the operator's sentence appended (control
    // characters removed, so it stays one line).
    let mut c = cfg(false);
    c.login_alert = Some(Arc::from(
        "Approve at https://portal.example/\r\n+OK forged",
    ));
    let mut sm = Pop3Front::new(&c, true);
    let (_, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    login(step);
    sm.refused(Refused::Failed);
    let (out, _) = run(&mut sm, b"");
    assert_eq!(
        out,
        "-ERR [AUTH] Authentication failed. Approve at https://portal.example/+OK forged\r\n"
    );
}

#[test]
fn other_refusals_and_the_failure_limit() {
    let mut sm = port_995();
    login(run(&mut sm, b"USER a\r\nPASS b\r\n").1);
    sm.refused(Refused::Unavailable);
    assert_eq!(
        run(&mut sm, b"").0,
        "-ERR [SYS/TEMP] Service temporarily unavailable\r\n"
    );
    login(run(&mut sm, b"USER a\r\nPASS b\r\n").1);
    sm.refused(Refused::TooManySessions);
    assert_eq!(
        run(&mut sm, b"").0,
        "-ERR [IN-USE] Too many sessions for this user\r\n"
    );
    // Neither counts as a failure: two real failures end the connection after the second.
    login(run(&mut sm, b"USER a\r\nPASS b\r\n").1);
    sm.refused(Refused::Failed);
    let (out, step) = run(&mut sm, b"");
    assert_eq!(out, "-ERR [AUTH] Authentication failed.\r\n");
    assert!(step.is_none());
    login(run(&mut sm, b"USER a\r\nPASS c\r\nCAPA\r\n").1);
    sm.refused(Refused::Failed);
    let (out, step) = run(&mut sm, b"");
    assert_eq!(out, "-ERR [AUTH] Authentication failed.\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn too_many_bad_commands_close_the_session() {
    let mut sm = port_110();
    let (out, step) = run(&mut sm, b"STAT\r\nXYZZY\r\nNOOP\r\nCAPA\r\n");
    assert_eq!(
        out,
        "-ERR Not logged in\r\n-ERR Unknown command\r\n-ERR Too many invalid commands\r\n"
    );
    assert!(matches!(step, Some(Step::Close)));
    // Nothing more is taken in.
    sm.feed(b"CAPA\r\n");
    assert_eq!(sm.buffered(), 0);
}

#[test]
fn the_number_of_commands_is_capped() {
    let mut sm = port_995();
    let input = b"CAPA\r\n".repeat(MAX_PREAUTH_COMMANDS as usize + 5);
    let (out, step) = run(&mut sm, &input);
    assert_eq!(
        out.matches("+OK Capability list follows").count(),
        MAX_PREAUTH_COMMANDS as usize
    );
    assert!(out.ends_with(".\r\n-ERR Too many commands\r\n"));
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn a_huge_line_closes_without_being_buffered_to_its_end() {
    // One read far over the limit: answered at once.
    let mut sm = port_995();
    let (out, step) = run(&mut sm, &[b'x'; 10_000]);
    assert_eq!(out, "-ERR Line too long\r\n");
    assert!(matches!(step, Some(Step::Close)));
    assert_eq!(sm.buffered(), 0);
    // In small reads: the close comes as soon as the limit is crossed, no CRLF needed.
    let mut sm = port_995();
    let (out, step) = run(&mut sm, &[b'x'; 200]);
    assert_eq!((out.as_str(), step.is_none()), ("", true));
    assert_eq!(sm.buffered(), 200);
    let (out, step) = run(&mut sm, &[b'x'; 60]);
    assert_eq!(out, "-ERR Line too long\r\n");
    assert!(matches!(step, Some(Step::Close)));
    // An AUTH line (a token) may be longer, up to sasl_bytes, and no longer.
    let mut sm = with_oauth(None);
    let mut line = b"AUTH XOAUTH2 ".to_vec();
    line.extend(std::iter::repeat_n(b'A', 3000));
    line.extend(b"\r\n");
    let (out, step) = run(&mut sm, &line);
    assert_eq!(out, "");
    assert!(matches!(step, Some(Step::Authenticate(_))));
    let mut sm = port_995();
    let (out, step) = run(&mut sm, b"AUTH PLAIN\r\n");
    assert_eq!((out.as_str(), step.is_none()), ("+ \r\n", true));
    let (out, step) = run(&mut sm, &[b'A'; 5000]);
    assert_eq!(out, "-ERR Line too long\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn bytes_pipelined_behind_pass_reach_the_backend_in_order() {
    let mut sm = port_995();
    let (out, step) = run(
        &mut sm,
        b"CAPA\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nRETR 1\r\n",
    );
    assert!(out.ends_with(".\r\n+OK Send password\r\n"), "{out}");
    login(step);
    // While the login is checked nothing is processed, whatever arrives.
    sm.feed(b"DELE 1\r\nQUIT\r\n");
    assert!(matches!(sm.step(), Step::NeedInput));
    let (ok, pipelined) = Box::new(sm).succeeded(Welcome::Fixed);
    assert_eq!(ok, b"+OK Logged in.\r\n");
    assert_eq!(&pipelined[..], b"STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n");
}

#[test]
fn the_last_words() {
    let mut sm = port_110();
    assert_eq!(
        sm.bye_now(Bye::Shutdown),
        b"-ERR [SYS/TEMP] Server shutting down\r\n"
    );
    assert!(matches!(sm.step(), Step::Close));
    assert_eq!(
        port_110().bye_now(Bye::Timeout),
        b"-ERR Authentication timeout\r\n"
    );
    assert_eq!(port_995().bye_now(Bye::Idle), b"-ERR Idle timeout\r\n");
    let (out, step) = run(&mut port_110(), b"QUIT\r\nCAPA\r\n");
    assert_eq!(out, "+OK Bye\r\n");
    assert!(matches!(step, Some(Step::Close)));
    assert_eq!(port_995().client_id(), &ClientId::default());
}

#[test]
fn arbitrary_bytes_never_panic_and_never_log_in_before_tls() {
    // A cheap deterministic fuzz beside the cargo-fuzz target.
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..2000 {
        let mut sm = port_110();
        let mut tls = false;
        let mut input = Vec::new();
        for _ in 0..(seed % 300) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pick = (seed >> 33) as usize;
            let alphabet = b"USER PASS AUTH STLS CAPA PLAIN XOAUTH2 *=A\r\n\x00\x01 ";
            input.push(alphabet[pick % alphabet.len()]);
        }
        sm.feed(&input);
        for _ in 0..1000 {
            match sm.step() {
                Step::Send(b) => assert!(b.ends_with(b"\r\n")),
                Step::StartTls => {
                    tls = true;
                    sm.tls_started();
                }
                Step::Authenticate(_) => {
                    assert!(tls);
                    sm.refused(Refused::Failed);
                }
                Step::NeedInput | Step::Close => break,
            }
        }
    }
}
