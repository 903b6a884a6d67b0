//! Known-answer tests of the pre-auth state machine, without sockets.

use super::*;

fn limits() -> PreAuthLimits {
    PreAuthLimits {
        line_bytes: 1024,
        literal_bytes: 64,
        sasl_bytes: 4096,
        bad_commands_before_bye: 3,
        auth_failures_per_connection: 2,
    }
}

/// Feeds input and collects what is sent until the machine needs input or acts.
fn run(sm: &mut PreAuth, input: &[u8]) -> (String, Option<Step>) {
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

#[test]
fn greeting_and_capabilities_depend_on_tls() {
    let pre = PreAuth::new(limits(), true, false);
    assert_eq!(
        pre.greeting(),
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"
    );
    let post = PreAuth::new(limits(), false, true);
    assert_eq!(
        post.greeting(),
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] ready\r\n"
    );
}

#[test]
fn no_credential_before_tls() {
    let mut sm = PreAuth::new(limits(), true, false);
    let (out, step) = run(
        &mut sm,
        b"a LOGIN alice pw\r\nb AUTHENTICATE PLAIN\r\nc AUTHENTICATE PLAIN AGEAYg==\r\n",
    );
    assert!(step.is_none());
    assert_eq!(out, "a NO [PRIVACYREQUIRED] TLS required\r\nb NO [PRIVACYREQUIRED] TLS required\r\nc NO [PRIVACYREQUIRED] TLS required\r\n");
    assert!(!out.contains('+'));
}

#[test]
fn starttls_discards_pipelined_bytes() {
    let mut sm = PreAuth::new(limits(), true, false);
    let (out, step) = run(&mut sm, b"a STARTTLS\r\nb LOGIN alice pw\r\n");
    assert_eq!(out, "a OK Begin TLS negotiation now\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    sm.tls_started();
    assert_eq!(sm.buffered(), 0);
    let (out, step) = run(&mut sm, b"c CAPABILITY\r\n");
    assert!(step.is_none());
    assert_eq!(
        out,
        "* CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN\r\nc OK CAPABILITY completed\r\n"
    );
    let (out, _) = run(&mut sm, b"d STARTTLS\r\n");
    assert_eq!(out, "d BAD TLS is already active\r\n");
}

#[test]
fn login_and_plain_produce_attempts_and_pipelined_bytes_survive() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, step) = run(&mut sm, b"a LOGIN Alice \"p w\"\r\nb SELECT INBOX\r\n");
    assert_eq!(out, "");
    let Some(Step::Authenticate(req)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(req.tag.as_ref(), "a");
    assert_eq!(req.mechanism, Mechanism::Login);
    let Credential::Password { user, password } = req.credential else {
        panic!()
    };
    assert_eq!(user, "Alice");
    assert!(password.ct_eq(b"p w"));
    let caps = crate::imap::capabilities(["IMAP4rev1", "IDLE"]);
    let (ok, rest) = sm.auth_succeeded(&req.tag, &crate::imap::LoginOk::new(&caps));
    assert_eq!(ok, b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
    assert_eq!(&rest[..], b"b SELECT INBOX\r\n");
}

#[test]
fn plain_continuation_cancel_and_garbage() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, _) = run(&mut sm, b"a AUTHENTICATE PLAIN\r\n");
    assert_eq!(out, "+ \r\n");
    let (out, step) = run(&mut sm, b"*\r\n");
    assert!(step.is_none());
    assert_eq!(out, "a BAD Authentication cancelled\r\n");
    run(&mut sm, b"b AUTHENTICATE PLAIN\r\n");
    let (_, step) = run(&mut sm, b"AGFsaWNlAHB3\r\n");
    let Some(Step::Authenticate(req)) = step else {
        panic!()
    };
    assert!(matches!(req.credential, Credential::Password { ref user, .. } if user == "alice"));
    sm.auth_failed(&req.tag);
    let (out, _) = run(&mut sm, b"");
    assert_eq!(out, "b NO [AUTHENTICATIONFAILED] Authentication failed\r\n");
    // Malformed PLAIN still goes through the authenticator (uniform failure path).
    let (_, step) = run(&mut sm, b"c AUTHENTICATE PLAIN YWxpY2U=\r\n");
    let Some(Step::Authenticate(req)) = step else {
        panic!()
    };
    assert!(matches!(req.credential, Credential::Malformed(_)));
    sm.auth_failed(&req.tag);
    let (out, step) = run(&mut sm, b"");
    assert_eq!(out, "c NO [AUTHENTICATIONFAILED] Authentication failed\r\n* BYE Too many authentication failures\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn literals_are_gated() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, _) = run(&mut sm, b"a LOGIN {65}\r\n");
    assert_eq!(out, "a BAD [TOOBIG] Literal too large\r\n");
    let (out, _) = run(&mut sm, b"b LOGIN {5}\r\n");
    assert_eq!(out, "+ Ready\r\n");
    let (out, step) = run(&mut sm, b"alice {2}\r\n");
    assert_eq!(out, "+ Ready\r\n");
    assert!(step.is_none());
    let (_, step) = run(&mut sm, b"pw\r\n");
    assert!(matches!(step, Some(Step::Authenticate(_))));
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, step) = run(&mut sm, b"a LOGIN {5+}\r\nalice pw\r\n");
    assert!(out.starts_with("* BYE"), "{out}");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn bad_commands_end_in_bye_and_tags_are_not_echoed() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, step) = run(&mut sm, b"* NOOP\r\nt\x00 NOOP\r\nok SELECT INBOX\r\n");
    assert_eq!(out, "* BAD Invalid command\r\n* BAD Invalid command\r\nok BAD Command not allowed before authentication\r\n* BYE Too many invalid commands\r\n");
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn too_long_lines_close_without_waiting_for_the_end() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, step) = run(&mut sm, &[b'x'; 2000]);
    assert_eq!(out, "* BYE [TOOBIG] Line too long\r\n");
    assert!(matches!(step, Some(Step::Close)));
    // AUTHENTICATE lines may be longer (OAuth tokens), up to sasl_bytes.
    let mut sm = PreAuth::new(limits(), false, true);
    let mut line = b"a AUTHENTICATE PLAIN ".to_vec();
    line.extend(std::iter::repeat_n(b'A', 3000));
    line.extend(b"\r\n");
    let (out, step) = run(&mut sm, &line);
    assert_eq!(out, "");
    assert!(matches!(step, Some(Step::Authenticate(_))));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz until the cargo-fuzz target lands.
    let mut seed = 0x1234_5678_u64;
    for _ in 0..2000 {
        let mut sm = PreAuth::new(limits(), true, false);
        let mut input = Vec::new();
        for _ in 0..(seed % 300) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pick = (seed >> 33) as usize;
            let alphabet = b"a LOGIN AUTHENTICATE STARTTLS {}+*\"\\\r\n\x00()0123456789";
            input.push(alphabet[pick % alphabet.len()]);
        }
        sm.feed(&input);
        for _ in 0..1000 {
            match sm.step() {
                Step::Send(_) => {}
                Step::StartTls => sm.tls_started(),
                Step::Authenticate(r) => sm.auth_failed(&r.tag),
                Step::NeedInput | Step::Close => break,
            }
        }
    }
}

#[test]
fn a_literal_in_a_sasl_response_answers_the_authenticate() {
    let mut sm = PreAuth::new(limits(), false, true);
    run(&mut sm, b"a AUTHENTICATE PLAIN\r\n");
    let (out, step) = run(&mut sm, b"x {5}\r\n");
    assert!(step.is_none());
    assert_eq!(out, "a BAD Invalid SASL response\r\n");
    // Back to the command line limit, not the SASL one.
    let mut long = b"b NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 2000));
    let (out, _) = run(&mut sm, &long);
    assert_eq!(out, "* BYE [TOOBIG] Line too long\r\n");
    // A non-synchronising literal there closes the connection; its bytes are never commands.
    let mut sm = PreAuth::new(limits(), false, true);
    run(&mut sm, b"a AUTHENTICATE PLAIN\r\n");
    let (out, step) = run(&mut sm, b"x {5+}\r\nb NOOP\r\n");
    assert!(out.starts_with("* BYE"), "{out}");
    assert!(!out.contains("b OK"));
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn the_number_of_preauth_commands_is_capped() {
    let mut sm = PreAuth::new(limits(), false, true);
    let input = b"a NOOP\r\n".repeat(MAX_PREAUTH_COMMANDS as usize + 5);
    let (out, step) = run(&mut sm, &input);
    assert_eq!(
        out.matches("a OK NOOP completed").count(),
        MAX_PREAUTH_COMMANDS as usize
    );
    assert!(
        out.ends_with("* BYE Too many commands\r\n"),
        "{}",
        &out[out.len() - 60..]
    );
    assert!(matches!(step, Some(Step::Close)));
}

#[test]
fn token_mechanisms_only_when_configured_and_the_error_challenge_flow() {
    let plain_only = PreAuth::new(limits(), false, true);
    assert!(!String::from_utf8(plain_only.greeting().to_vec())
        .unwrap()
        .contains("XOAUTH2"));
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, _) = run(
        &mut sm,
        b"a AUTHENTICATE XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n",
    );
    assert_eq!(out, "a NO Unsupported mechanism\r\n");

    let mut sm = PreAuth::new(limits(), false, true).with_oauth(true);
    assert!(String::from_utf8(sm.greeting().to_vec())
        .unwrap()
        .contains("AUTH=XOAUTH2 AUTH=OAUTHBEARER"));
    // base64("user=a\x01auth=Bearer t\x01\x01")
    let (_, step) = run(
        &mut sm,
        b"a AUTHENTICATE XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==\r\n",
    );
    let Some(Step::Authenticate(req)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(req.mechanism, Mechanism::XOAuth2);
    assert!(
        matches!(req.credential, Credential::Bearer { ref user, .. } if user.as_deref() == Some("a"))
    );
    sm.oauth_failed(&req.tag, br#"{"status":"401"}"#);
    let (out, _) = run(&mut sm, b"");
    assert_eq!(out, "+ eyJzdGF0dXMiOiI0MDEifQ==\r\n");
    let (out, _) = run(&mut sm, b"\r\n");
    assert_eq!(out, "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n");
    // OAUTHBEARER with continuation; a malformed message still takes the uniform path.
    run(&mut sm, b"b AUTHENTICATE OAUTHBEARER\r\n");
    let (_, step) = run(&mut sm, b"bm90IHZhbGlk\r\n");
    let Some(Step::Authenticate(req)) = step else {
        panic!()
    };
    assert!(matches!(req.credential, Credential::MalformedBearer(_)));
    sm.oauth_failed(&req.tag, b"{}");
    run(&mut sm, b"");
    // Not the dummy response: BAD.
    let (out, _) = run(&mut sm, b"bm9wZQ==\r\n");
    assert_eq!(out, "b BAD Invalid SASL response\r\n");
}

#[test]
fn id_keeps_only_a_clean_name_and_version() {
    let mut sm = PreAuth::new(limits(), false, true);
    let (out, _) = run(
        &mut sm,
        b"a ID (\"name\" \"Mail\\\"App\" \"os\" \"Linux\" \"VERSION\" \"1.0 \\\\beta\")\r\n",
    );
    assert_eq!(out, "* ID NIL\r\na OK ID completed\r\n");
    assert_eq!(sm.client_id().name(), "MailApp");
    assert_eq!(sm.client_id().version(), "1.0 beta");
    // A later ID replaces it; ID NIL clears it.
    let (_, _) = run(&mut sm, b"b ID NIL\r\n");
    assert_eq!(sm.client_id(), &ClientId::default());
}

#[test]
fn an_id_sent_before_starttls_is_forgotten() {
    let mut sm = PreAuth::new(limits(), true, false);
    let (_, _) = run(&mut sm, b"a ID (\"name\" \"injected\")\r\n");
    assert_eq!(sm.client_id().name(), "injected");
    let (_, step) = run(&mut sm, b"b STARTTLS\r\n");
    assert!(matches!(step, Some(Step::StartTls)));
    sm.tls_started();
    assert_eq!(sm.client_id(), &ClientId::default());
}
