//! Known-answer tests of the SMTP submission front, without sockets: what a client (or an
//! attacker on the path) sends, and the exact replies and driver steps that come out.

use base64::Engine as _;

use super::*;

const HOST: &str = "mx.example.org";

fn limits() -> PreAuthLimits {
    PreAuthLimits {
        line_bytes: 1024,
        literal_bytes: 64,
        sasl_bytes: 4096,
        bad_commands_before_bye: 5,
        auth_failures_per_connection: 3,
    }
}

/// A STARTTLS listener whose backend offers a typical Postfix extension list (with the
/// extensions the gateway must withhold).
fn cfg() -> FrontConfig {
    let ext = [
        "PIPELINING",
        "SIZE 10240000",
        "AUTH PLAIN LOGIN CRAM-MD5",
        "AUTH=PLAIN LOGIN",
        "STARTTLS",
        "XCLIENT NAME ADDR PROTO HELO LOGIN",
        "xforward NAME ADDR",
        "X-EXPS GSSAPI NTLM",
        "ETRN",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ];
    FrontConfig {
        limits: limits(),
        starttls_listener: true,
        oauth: None,
        login_alert: None,
        login_alert_imap: None,
        hostname: Arc::from(HOST),
        smtp_extensions: ext.iter().map(|s| s.to_string()).collect(),
    }
}

fn with_oauth(mut cfg: FrontConfig) -> FrontConfig {
    cfg.oauth = Some(Arc::new(OAuthChallenges::new(
        Some("https://idp.example/.well-known/openid-configuration"),
        "mail",
    )));
    cfg
}

/// Feeds input and collects what is sent until the front needs input or asks for an action.
fn run(sm: &mut SmtpFront, input: &[u8]) -> (String, Option<Step>) {
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

/// A front on an implicit-TLS listener that has said EHLO.
fn greeted(cfg: &FrontConfig) -> SmtpFront {
    let mut sm = SmtpFront::new(cfg, true);
    let (out, step) = run(&mut sm, b"EHLO client.example\r\n");
    assert!(out.starts_with("250-"), "{out}");
    assert!(step.is_none());
    sm
}

fn login(step: Option<Step>) -> Login {
    match step {
        Some(Step::Authenticate(login)) => login,
        other => panic!("expected Authenticate, got {other:?}"),
    }
}

fn password(login: &Login) -> (&str, &Secret) {
    match &login.credential {
        Credential::Password { user, password } => (user.as_str(), password),
        other => panic!("expected a password, got {other:?}"),
    }
}

#[test]
fn greeting_is_the_gateways_own_and_pure() {
    let sm = SmtpFront::new(&cfg(), false);
    assert_eq!(sm.greeting(), b"220 mx.example.org ESMTP\r\n");
    assert_eq!(sm.greeting(), sm.greeting());
    // A host name can never break the line.
    let mut c = cfg();
    c.hostname = Arc::from("evil\r\n250 host");
    assert_eq!(
        SmtpFront::new(&c, true).greeting(),
        b"220 evil250host ESMTP\r\n"
    );
}

#[test]
fn ehlo_before_tls_offers_starttls_and_nothing_about_auth() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, step) = run(&mut sm, b"EHLO client.example\r\n");
    assert!(step.is_none());
    assert_eq!(
        out,
        "250-mx.example.org\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
    );
    let (out, _) = run(&mut sm, b"HELO client.example\r\n");
    assert_eq!(out, "250 mx.example.org\r\n");
}

#[test]
fn ehlo_after_tls_passes_the_backends_extensions_and_withholds_the_gateways() {
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, _) = run(&mut sm, b"ehlo client.example\r\n");
    assert_eq!(
        out,
        "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ETRN\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n\
         250-CHUNKING\r\n250 AUTH PLAIN LOGIN\r\n"
    );
    for withheld in [
        "STARTTLS", "XCLIENT", "xforward", "X-EXPS", "CRAM-MD5", "AUTH=",
    ] {
        assert!(!out.contains(withheld), "{withheld} offered: {out}");
    }
    // Token mechanisms only with issuers; ENHANCEDSTATUSCODES added when the backend lacks it;
    // a malformed backend line is dropped.
    let mut c = with_oauth(cfg());
    c.smtp_extensions = ["SIZE 1000", "BAD\r\nLINE", "Auth GSSAPI"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut sm = SmtpFront::new(&c, true);
    let (out, _) = run(&mut sm, b"EHLO client.example\r\n");
    assert_eq!(
        out,
        "250-mx.example.org\r\n250-SIZE 1000\r\n250-ENHANCEDSTATUSCODES\r\n\
         250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"
    );
}

#[test]
fn no_credential_before_tls_and_never_a_334() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, step) = run(
        &mut sm,
        b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHB3\r\nAUTH LOGIN\r\nAUTH PLAIN\r\n",
    );
    assert!(step.is_none());
    let must = "530 5.7.0 Must issue a STARTTLS command first\r\n";
    assert!(out.ends_with(&must.repeat(3)), "{out}");
    assert!(!out.contains("334"), "{out}");
}

#[test]
fn starttls_drops_the_injected_commands_and_the_ehlo_name() {
    let mut sm = SmtpFront::new(&cfg(), false);
    run(&mut sm, b"EHLO client.example\r\n");
    assert_eq!(sm.helo(), Some("client.example"));
    // The attacker's commands ride in the same packet as STARTTLS (CVE-2011-0411).
    let (out, step) = run(
        &mut sm,
        b"STARTTLS\r\nEHLO evil\r\nAUTH PLAIN AGFsaWNlAHB3\r\nMAIL FROM:<x@y>\r\n",
    );
    assert_eq!(out, "220 2.0.0 Ready to start TLS\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    assert_eq!(sm.buffered(), 0);
    // Whatever else arrives before the handshake completes is dropped too.
    sm.feed(b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    assert_eq!(sm.buffered(), 0);
    sm.tls_started();
    assert_eq!(sm.helo(), None);
    assert_eq!(sm.client_id(), &ClientId::default());
    let (out, step) = run(&mut sm, b"");
    assert_eq!(out, "");
    assert!(step.is_none());
    // The client must EHLO again, and sees the post-TLS set.
    let (out, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    assert_eq!(out, "503 5.5.1 EHLO first\r\n");
    assert!(step.is_none());
    let (out, _) = run(&mut sm, b"EHLO client.example\r\n");
    assert!(out.ends_with("250 AUTH PLAIN LOGIN\r\n"), "{out}");
    assert!(!out.contains("STARTTLS"));
    let (out, _) = run(&mut sm, b"STARTTLS\r\n");
    assert_eq!(out, "503 5.5.1 TLS already active\r\n");
}

#[test]
fn starttls_rules() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, step) = run(&mut sm, b"STARTTLS now\r\n");
    assert_eq!(out, "501 5.5.4 Syntax: STARTTLS\r\n");
    assert!(step.is_none());
    // EHLO is not needed first (RFC 3207), and the verb is case-insensitive.
    let (_, step) = run(&mut sm, b"starttls\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    // Implicit TLS: already active.
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, _) = run(&mut sm, b"STARTTLS\r\n");
    assert_eq!(out, "503 5.5.1 TLS already active\r\n");
}

#[test]
fn the_mail_transaction_needs_authentication() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, _) = run(&mut sm, b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(
        out.ends_with("530 5.7.0 Must issue a STARTTLS command first\r\n"),
        "{out}"
    );
    let mut sm = greeted(&cfg());
    let (out, step) = run(
        &mut sm,
        b"MAIL FROM:<a@example.org>\r\nrcpt TO:<b@example.org>\r\nDATA\r\nXCLIENT LOGIN=ceo\r\n",
    );
    assert!(step.is_none());
    assert_eq!(out, "530 5.7.0 Authentication required\r\n".repeat(4));
    let mut sm = greeted(&cfg());
    let (out, _) = run(&mut sm, b"FOO bar\r\n");
    assert_eq!(out, "500 5.5.2 Syntax error, command unrecognized\r\n");
}

#[test]
fn noop_rset_quit_and_bare_lf() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, step) = run(&mut sm, b"NOOP\nrset\r\nNoop hello\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        out,
        "250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n221 2.0.0 Bye\r\n"
    );
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn a_huge_line_closes_without_being_buffered_whole() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let (out, step) = run(&mut sm, &[b'x'; 1000]);
    assert_eq!((out.as_str(), step.is_none()), ("", true));
    let (out, step) = run(&mut sm, &[b'x'; 100]);
    assert_eq!(out, "500 5.5.6 Line too long\r\n");
    assert!(matches!(step, Some(Step::Close)));
    assert!(matches!(sm.step(), Step::Close));
    sm.feed(&[b'x'; 5000]);
    assert_eq!(sm.buffered(), 0);
    // An AUTH line may carry a long initial response, up to sasl_bytes.
    let mut sm = greeted(&cfg());
    let mut line = b"AUTH PLAIN ".to_vec();
    line.extend(std::iter::repeat_n(b'A', 3000));
    line.extend(b"\r\n");
    let (out, step) = run(&mut sm, &line);
    assert_eq!(out, "");
    assert!(matches!(login(step).credential, Credential::Malformed(_)));
    // A SASL response over sasl_bytes.
    let mut sm = greeted(&cfg());
    run(&mut sm, b"AUTH PLAIN\r\n");
    let (out, step) = run(&mut sm, &[b'A'; 4200]);
    assert_eq!(
        out,
        "500 5.5.6 Authentication Exchange line is too long\r\n"
    );
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn bad_base64_never_reaches_the_credential_check() {
    let mut sm = greeted(&cfg());
    let (out, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3!\r\n");
    assert_eq!(out, "501 5.5.2 Invalid base64 data\r\n");
    assert!(step.is_none());
    run(&mut sm, b"AUTH LOGIN\r\n");
    let (out, step) = run(&mut sm, b"YWxpY2U\r\n");
    assert_eq!(out, "501 5.5.2 Invalid base64 data\r\n");
    assert!(step.is_none());
    // Back to commands: the next line is not taken as a SASL response.
    let (out, _) = run(&mut sm, b"NOOP\r\n");
    assert_eq!(out, "250 2.0.0 OK\r\n");
}

#[test]
fn plain_with_and_without_initial_response() {
    let mut sm = greeted(&cfg());
    let (out, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    assert_eq!(out, "");
    let req = login(step);
    assert_eq!(req.mechanism, Mechanism::Plain);
    let (user, pw) = password(&req);
    assert_eq!(user, "alice");
    assert!(pw.ct_eq(b"pw"));
    sm.refused(Refused::Failed);

    let (out, step) = run(&mut sm, b"auth plain\r\n");
    assert_eq!(
        out,
        "535 5.7.8 Authentication credentials invalid\r\n334 \r\n"
    );
    assert!(step.is_none());
    let req = login(run(&mut sm, b"AGFsaWNlAHB3\r\n").1);
    assert_eq!(password(&req).0, "alice");
    sm.refused(Refused::Failed);
    // `=` is an empty initial response: malformed, but it fails like any other credential.
    let (_, step) = run(&mut sm, b"AUTH PLAIN =\r\n");
    let req = login(step);
    assert!(matches!(req.credential, Credential::Malformed(_)));
}

#[test]
fn login_in_two_steps_and_with_the_user_as_initial_response() {
    let mut sm = greeted(&cfg());
    let (out, _) = run(&mut sm, b"AUTH LOGIN\r\n");
    assert_eq!(out, "334 VXNlcm5hbWU6\r\n");
    let (out, step) = run(&mut sm, b"YWxpY2U=\r\n");
    assert_eq!(out, "334 UGFzc3dvcmQ6\r\n");
    assert!(step.is_none());
    let (out, step) = run(&mut sm, b"cHc=\r\n");
    assert_eq!(out, "");
    let req = login(step);
    assert_eq!(req.mechanism, Mechanism::Login);
    let (user, pw) = password(&req);
    assert_eq!(user, "alice");
    assert!(pw.ct_eq(b"pw"));
    sm.refused(Refused::Failed);
    let (out, _) = run(&mut sm, b"AUTH LOGIN YWxpY2U=\r\n");
    assert_eq!(
        out,
        "535 5.7.8 Authentication credentials invalid\r\n334 UGFzc3dvcmQ6\r\n"
    );
    let req = login(run(&mut sm, b"cHc=\r\n").1);
    assert_eq!(password(&req).0, "alice");
    // A user name that is not UTF-8 is malformed (and checked, failing uniformly).
    sm.refused(Refused::Unavailable);
    run(&mut sm, b"AUTH LOGIN /w==\r\n");
    let req = login(run(&mut sm, b"cHc=\r\n").1);
    assert!(matches!(req.credential, Credential::Malformed(_)));
}

#[test]
fn a_star_cancels_the_exchange() {
    let mut sm = greeted(&cfg());
    run(&mut sm, b"AUTH PLAIN\r\n");
    let (out, step) = run(&mut sm, b"*\r\n");
    assert_eq!(out, "501 5.0.0 Authentication cancelled\r\n");
    assert!(step.is_none());
    run(&mut sm, b"AUTH LOGIN YWxpY2U=\r\n");
    let (out, step) = run(&mut sm, b"*\r\n");
    assert_eq!(out, "501 5.0.0 Authentication cancelled\r\n");
    assert!(step.is_none());
    let (out, _) = run(&mut sm, b"NOOP\r\n");
    assert_eq!(out, "250 2.0.0 OK\r\n");
}

#[test]
fn auth_needs_ehlo_a_known_mechanism_and_valid_syntax() {
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, _) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    assert_eq!(out, "503 5.5.1 EHLO first\r\n");
    let mut sm = greeted(&cfg());
    let (out, _) = run(
        &mut sm,
        b"AUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\nAUTH CRAM-MD5\r\nAUTH\r\nAUTH PLAIN a b\r\n",
    );
    assert_eq!(
        out,
        "504 5.5.4 Unrecognized authentication type\r\n\
         504 5.5.4 Unrecognized authentication type\r\n\
         501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n\
         501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
    );
}

#[test]
fn a_refused_token_gets_the_error_challenge_then_the_535() {
    let cfg = with_oauth(cfg());
    let mut sm = greeted(&cfg);
    // base64("user=a\x01auth=Bearer t\x01\x01")
    let (_, step) = run(
        &mut sm,
        b"AUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n",
    );
    let req = login(step);
    assert_eq!(req.mechanism, Mechanism::XOAuth2);
    assert!(
        matches!(req.credential, Credential::Bearer { ref user, .. } if user.as_deref() == Some("a"))
    );
    sm.refused(Refused::Failed);
    let (out, step) = run(&mut sm, b"");
    assert!(step.is_none());
    let challenge = out
        .strip_prefix("334 ")
        .and_then(|c| c.strip_suffix("\r\n"))
        .unwrap();
    let json = B64.decode(challenge).unwrap();
    let expected = cfg.oauth.as_ref().unwrap();
    assert_eq!(json, expected.for_mechanism(Mechanism::XOAuth2));
    assert!(String::from_utf8(json)
        .unwrap()
        .contains(r#""status":"401""#));
    // XOAUTH2 clients answer with an empty line; then the uniform 535.
    let (out, _) = run(&mut sm, b"\r\n");
    assert_eq!(out, "535 5.7.8 Authentication credentials invalid\r\n");
    // OAUTHBEARER with continuation; a malformed message is still checked.
    let (out, _) = run(&mut sm, b"AUTH OAUTHBEARER\r\n");
    assert_eq!(out, "334 \r\n");
    let req = login(run(&mut sm, b"bm90IHZhbGlk\r\n").1);
    assert!(matches!(req.credential, Credential::MalformedBearer(_)));
    sm.refused(Refused::Failed);
    let (out, _) = run(&mut sm, b"");
    let json = B64
        .decode(out.trim_start_matches("334 ").trim_end())
        .unwrap();
    assert!(String::from_utf8(json).unwrap().contains("invalid_token"));
    let (out, _) = run(&mut sm, b"AQ==\r\n");
    assert_eq!(out, "535 5.7.8 Authentication credentials invalid\r\n");
}

#[test]
fn every_failed_password_login_gets_the_same_535_with_or_without_an_alert() {
    let mut sm = greeted(&cfg());
    run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    sm.refused(Refused::Failed);
    let (plain, _) = run(&mut sm, b"");
    assert_eq!(plain, "535 5.7.8 Authentication credentials invalid\r\n");

    let mut c = cfg();
    c.login_alert = Some(Arc::from(
        "Approve this sign-in at https://mail.example/portal\r\n535 2.7.0 forged",
    ));
    let mut sm = greeted(&c);
    let alert = "535-5.7.8 Approve this sign-in at https://mail.example/portal535 2.7.0 forged\r\n\
                 535 5.7.8 Authentication credentials invalid\r\n";
    // The malformed PLAIN and the well-formed one get the same answer.
    for input in [
        &b"AUTH PLAIN AGFsaWNlAHB3\r\n"[..],
        b"AUTH PLAIN YWxpY2U=\r\n",
    ] {
        run(&mut sm, input);
        sm.refused(Refused::Failed);
        let (out, _) = run(&mut sm, b"");
        assert_eq!(out, alert);
    }
    // A long alert is cut into reply lines that fit.
    let long = "word ".repeat(200);
    let reply = String::from_utf8(replies::failed_reply(Some(&long))).unwrap();
    assert_eq!(reply.matches("535-5.7.8 ").count(), 3);
    assert!(reply.lines().all(|l| l.len() <= 420));
    assert!(reply.ends_with("\r\n535 5.7.8 Authentication credentials invalid\r\n"));
}

#[test]
fn unavailable_and_too_many_sessions_are_temporary_and_the_session_goes_on() {
    let mut sm = greeted(&cfg());
    run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    sm.refused(Refused::Unavailable);
    let (out, _) = run(&mut sm, b"");
    assert_eq!(out, "454 4.7.0 Temporary authentication failure\r\n");
    run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
    sm.refused(Refused::TooManySessions);
    let (out, step) = run(&mut sm, b"NOOP\r\n");
    assert_eq!(
        out,
        "454 4.7.0 Too many sessions for this user\r\n250 2.0.0 OK\r\n"
    );
    assert!(step.is_none());
}

#[test]
fn too_many_errors_or_failures_end_the_session() {
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, step) = run(
        &mut sm,
        b"X\r\nY\r\nMAIL FROM:<a@b>\r\nEHLO\r\nAUTH PLAIN\r\nNOOP\r\n",
    );
    assert_eq!(
        out,
        "500 5.5.2 Syntax error, command unrecognized\r\n\
         500 5.5.2 Syntax error, command unrecognized\r\n\
         530 5.7.0 Authentication required\r\n\
         501 5.5.4 Syntax: EHLO hostname\r\n\
         503 5.5.1 EHLO first\r\n\
         421 4.7.0 mx.example.org Too many errors\r\n"
    );
    assert!(matches!(step, Some(Step::Close)));

    let mut sm = greeted(&cfg());
    let mut out = String::new();
    for _ in 0..3 {
        let (_, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
        login(step);
        sm.refused(Refused::Failed);
        let (o, _) = run(&mut sm, b"");
        out.push_str(&o);
    }
    assert_eq!(
        out,
        "535 5.7.8 Authentication credentials invalid\r\n".repeat(3)
            + "421 4.7.0 mx.example.org Too many authentication failures\r\n"
    );
    assert!(matches!(sm.step(), Step::Close));
}

#[test]
fn the_number_of_preauth_lines_is_capped() {
    let mut sm = SmtpFront::new(&cfg(), false);
    let input = b"NOOP\r\n".repeat(MAX_PREAUTH_COMMANDS as usize + 5);
    let (out, step) = run(&mut sm, &input);
    assert_eq!(
        out.matches("250 2.0.0 OK\r\n").count(),
        MAX_PREAUTH_COMMANDS as usize
    );
    assert!(out.ends_with("\r\n421 4.7.0 mx.example.org Too many commands\r\n"));
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn bytes_pipelined_behind_auth_wait_and_reach_the_backend_in_order() {
    let mut sm = greeted(&cfg());
    let behind = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubj";
    let mut input = b"AUTH PLAIN AGFsaWNlAHB3\r\n".to_vec();
    input.extend_from_slice(behind);
    let (out, step) = run(&mut sm, &input);
    assert_eq!(out, "");
    login(step);
    // Nothing behind the AUTH is read while the login is checked.
    assert!(matches!(sm.step(), Step::NeedInput));
    assert_eq!(sm.buffered(), behind.len());
    let (reply, rest) = Front::succeeded(Box::new(sm), Welcome::Fixed);
    assert_eq!(reply, b"235 2.7.0 Authentication successful\r\n");
    assert_eq!(&rest[..], behind);
}

#[test]
fn after_a_refused_login_pipelined_commands_are_pre_auth_commands_again() {
    let mut sm = greeted(&cfg());
    let (_, step) = run(&mut sm, b"AUTH PLAIN AGFsaWNlAHB3\r\nMAIL FROM:<a@b>\r\n");
    login(step);
    sm.refused(Refused::Failed);
    let (out, _) = run(&mut sm, b"");
    assert_eq!(
        out,
        "535 5.7.8 Authentication credentials invalid\r\n530 5.7.0 Authentication required\r\n"
    );
}

#[test]
fn the_ehlo_name_is_kept_sanitised_and_never_echoed() {
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, _) = run(&mut sm, b"EHLO my\"la\\ptop.example\r\n");
    assert!(!out.contains("laptop") && !out.contains("my"), "{out}");
    assert_eq!(sm.helo(), Some("mylaptop.example"));
    assert_eq!(sm.client_id().name(), "mylaptop.example");
    // Refused names leave the last good one in place.
    let long = format!("EHLO {}\r\n", "a".repeat(MAX_HELO_CHARS + 1));
    for bad in [
        &b"EHLO\r\n"[..],
        b"EHLO   \r\n",
        b"EHLO two words\r\n",
        b"EHLO ctl\x01x\r\n",
        b"EHLO \"\\\r\n",
        long.as_bytes(),
    ] {
        let mut sm = SmtpFront::new(&cfg(), true);
        run(&mut sm, b"HELO [192.0.2.1]\r\n");
        let (out, _) = run(&mut sm, bad);
        assert_eq!(out, "501 5.5.4 Syntax: EHLO hostname\r\n", "{bad:?}");
        assert_eq!(sm.helo(), Some("[192.0.2.1]"));
    }
    let mut sm = SmtpFront::new(&cfg(), true);
    let (out, _) = run(&mut sm, b"HELO\r\n");
    assert_eq!(out, "501 5.5.4 Syntax: HELO hostname\r\n");
    assert_eq!(sm.helo(), None);
}

#[test]
fn bye_now_words_the_last_line() {
    let mut sm = SmtpFront::new(&cfg(), false);
    assert_eq!(
        sm.bye_now(Bye::Shutdown),
        b"421 4.3.2 mx.example.org Service shutting down\r\n"
    );
    assert!(matches!(sm.step(), Step::Close));
    for why in [Bye::Timeout, Bye::Idle] {
        let mut sm = SmtpFront::new(&cfg(), false);
        sm.feed(b"EHLO c");
        assert_eq!(
            sm.bye_now(why),
            b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
        );
        assert_eq!(sm.buffered(), 0);
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_stay_bounded() {
    // A cheap deterministic fuzz beside the cargo-fuzz target.
    let mut seed = 0x2545_f491_u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let words: [&[u8]; 16] = [
        b"EHLO x",
        b"AUTH ",
        b"PLAIN",
        b"LOGIN",
        b"XOAUTH2",
        b"STARTTLS",
        b"MAIL",
        b"*",
        b"=",
        b"AGFsaWNlAHB3",
        b"\r\n",
        b"\n",
        b" ",
        b"\x00",
        b"\r",
        b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ];
    for round in 0..2000 {
        let c = if round % 2 == 0 {
            cfg()
        } else {
            with_oauth(cfg())
        };
        let mut sm = SmtpFront::new(&c, round % 3 == 0);
        let mut input = Vec::new();
        for _ in 0..next() % 200 {
            input.extend_from_slice(words[next() % words.len()]);
        }
        let mut rest = &input[..];
        for _ in 0..10_000 {
            match sm.step() {
                Step::Send(b) => assert!(b.ends_with(b"\r\n")),
                Step::StartTls => sm.tls_started(),
                Step::Authenticate(_) => sm.refused(Refused::Failed),
                Step::Close => break,
                Step::NeedInput => {
                    assert!(sm.buffered() <= limits().sasl_bytes + 64);
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, tail) = rest.split_at((next() % 64 + 1).min(rest.len()));
                    sm.feed(chunk);
                    rest = tail;
                }
            }
        }
    }
}
