//! The backend login dialogue against scripted responses.

use std::time::Duration;

use super::*;
use crate::config::BackendConfig;

fn backend(tls: BackendTls, login: BackendLogin, send_id: bool) -> BackendConfig {
    BackendConfig {
        name: "b".into(),
        protocol: crate::config::Protocol::Imap,
        host: "localhost".into(),
        port: 993,
        tls,
        ca_file: None,
        server_name: "localhost".into(),
        login,
        master_user: "gateway".into(),
        master_password: Secret::from_slice(b"m pw"),
        send_id,
        connect_timeout: Duration::from_secs(1),
        login_timeout: Duration::from_secs(1),
    }
}

/// A backend that logs in as the master user with `*` between the user and the master.
fn master(tls: BackendTls, send_id: bool) -> BackendConfig {
    backend(
        tls,
        BackendLogin::MasterUser {
            separator: "*".into(),
        },
        send_id,
    )
}

fn client() -> SocketAddr {
    "192.0.2.7:40000".parse().unwrap()
}

/// Starts a login for `user` on `b` and drives it with `script` (see [`drive`]).
fn run(b: &BackendConfig, user: &str, script: &[&[u8]]) -> (String, UpStep) {
    let mut m = UpstreamLogin::new(b, user, client()).unwrap();
    drive(&mut m, script)
}

/// Drives the machine with scripted backend input; returns what it sent and the final step.
fn drive(m: &mut UpstreamLogin, script: &[&[u8]]) -> (String, UpStep) {
    let mut sent = Vec::new();
    let mut input = script.iter();
    loop {
        match m.step() {
            UpStep::Send(b) => sent.extend(b),
            UpStep::NeedInput => match input.next() {
                Some(b) => m.feed(b),
                None => {
                    return (
                        String::from_utf8_lossy(&sent).into_owned(),
                        UpStep::NeedInput,
                    )
                }
            },
            UpStep::StartTls => m.tls_started(),
            other => return (String::from_utf8_lossy(&sent).into_owned(), other),
        }
    }
}

#[test]
fn master_user_login_with_id_and_capabilities_in_ok() {
    let b = master(BackendTls::Implicit, true);
    let (sent, end) = run(
        &b,
        "alice@example.org",
        &[
            b"* OK ready\r\n",
            b"* ID NIL\r\ng1 OK ID done\r\n",
            b"g2 OK [CAPABILITY IMAP4rev1 IDLE STARTTLS AUTH=PLAIN LITERAL+] Logged in\r\n",
        ],
    );
    assert_eq!(sent, "g1 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"40000\")\r\ng2 LOGIN \"alice@example.org*gateway\" \"m pw\"\r\n");
    let UpStep::Done(caps) = end else {
        panic!("{end:?}")
    };
    assert_eq!(
        client_capabilities(&caps),
        vec!["IMAP4REV1", "IDLE", "LITERAL+"]
    );
}

/// RFC 8437: UNAUTHENTICATE would take the relayed session back to the backend's own login,
/// past the gateway's second factor. It never reaches the client's list, whatever the case or
/// the list it came in (the login's OK or a CAPABILITY reply).
#[test]
fn unauthenticate_is_never_offered_to_the_client() {
    let b = master(BackendTls::Implicit, false);
    for reply in [
        &b"g1 OK [CAPABILITY IMAP4rev1 UNAUTHENTICATE IDLE] Logged in\r\n"[..],
        &b"* CAPABILITY IMAP4rev1 IDLE unauthenticate\r\ng1 OK Logged in\r\n"[..],
    ] {
        let (_, end) = run(&b, "alice@example.org", &[b"* OK ready\r\n", reply]);
        let UpStep::Done(caps) = end else {
            panic!("{end:?}")
        };
        assert_eq!(client_capabilities(&caps), vec!["IMAP4REV1", "IDLE"]);
    }
    assert_eq!(
        client_capabilities(&["Unauthenticate".into(), "UNSELECT".into()]),
        vec!["UNSELECT"]
    );
}

#[test]
fn capability_is_asked_when_the_ok_has_none() {
    let b = master(BackendTls::None, false);
    let (sent, end) = run(
        &b,
        "alice",
        &[
            b"* OK ready\r\n",
            b"g1 OK Logged in\r\n",
            b"* CAPABILITY IMAP4rev1 MOVE\r\ng2 OK done\r\n",
        ],
    );
    assert!(sent.ends_with("g2 CAPABILITY\r\n"), "{sent}");
    assert!(matches!(end, UpStep::Done(ref c) if c == &["IMAP4REV1", "MOVE"]));
}

#[test]
fn sasl_authzid_sends_plain_after_continuation() {
    let b = backend(BackendTls::None, BackendLogin::SaslAuthzid, false);
    let (sent, end) = run(
        &b,
        "alice",
        &[
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n",
            b"+ \r\n",
            b"g1 OK [CAPABILITY IMAP4rev1] ok\r\n",
        ],
    );
    // base64("alice\0gateway\0m pw")
    assert_eq!(
        sent,
        "g1 AUTHENTICATE PLAIN\r\nYWxpY2UAZ2F0ZXdheQBtIHB3\r\n"
    );
    assert!(matches!(end, UpStep::Done(_)));
}

#[test]
fn starttls_backend_flow_and_missing_starttls() {
    let b = master(BackendTls::Starttls, false);
    let (sent, end) = run(
        &b,
        "alice",
        &[
            b"* OK ready\r\n",
            b"* CAPABILITY IMAP4rev1 STARTTLS\r\ng1 OK done\r\n",
            b"g2 OK go\r\n",
            b"g3 OK [CAPABILITY IMAP4rev1] in\r\n",
        ],
    );
    assert_eq!(
        sent,
        "g1 CAPABILITY\r\ng2 STARTTLS\r\ng3 LOGIN \"alice*gateway\" \"m pw\"\r\n"
    );
    assert!(matches!(end, UpStep::Done(_)));
    let (_, end) = run(&b, "alice", &[b"* OK [CAPABILITY IMAP4rev1] ready\r\n"]);
    assert!(
        matches!(end, UpStep::Fail(LoginError::NoStartTls)),
        "{end:?}"
    );
    // Bytes after the STARTTLS OK would be injected into the TLS session: refused.
    let (_, end) = run(
        &b,
        "alice",
        &[
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n",
            b"g1 OK go\r\n* OK injected\r\n",
        ],
    );
    assert!(matches!(end, UpStep::Fail(LoginError::Protocol)), "{end:?}");
}

#[test]
fn bad_greetings_and_rejections() {
    let b = master(BackendTls::None, false);
    for (script, want) in [
        (&[&b"* PREAUTH hi\r\n"[..]][..], LoginError::Preauth),
        (&[&b"* BYE no\r\n"[..]][..], LoginError::Bye),
        (&[&b"hello\r\n"[..]][..], LoginError::Protocol),
        (
            &[
                &b"* OK hi\r\n"[..],
                &b"g1 NO [AUTHENTICATIONFAILED] no\r\n"[..],
            ][..],
            LoginError::Rejected,
        ),
        (
            &[&b"* OK hi\r\n"[..], &b"g9 OK wrong tag\r\n"[..]][..],
            LoginError::Protocol,
        ),
        (
            &[&b"* OK hi\r\n"[..], &b"* BYE shutting down\r\n"[..]][..],
            LoginError::Rejected,
        ),
    ] {
        let (_, end) = run(&b, "alice", script);
        assert!(
            matches!(end, UpStep::Fail(e) if e == want),
            "{script:?}: {end:?}"
        );
    }
    assert!(UpstreamLogin::new(&b, "alice*gateway", client()).is_err());
}

#[test]
fn eight_bit_password_goes_as_a_literal_after_continuation() {
    let mut b = master(BackendTls::None, false);
    b.master_password = Secret::from_slice("pässword".as_bytes());
    let (sent, end) = run(
        &b,
        "alice",
        &[
            b"* OK hi\r\n",
            b"+ go\r\n",
            b"g1 OK [CAPABILITY IMAP4rev1] in\r\n",
        ],
    );
    assert!(
        sent.starts_with("g1 LOGIN \"alice*gateway\" {9}\r\n"),
        "{sent}"
    );
    assert!(sent.ends_with("pässword\r\n"), "{sent}");
    assert!(matches!(end, UpStep::Done(_)));
}

#[test]
fn a_continuation_outside_the_login_never_releases_the_master_credential() {
    // Starttls + SASL authzid: an attacker before TLS answers `+` to CAPABILITY or STARTTLS.
    let b = backend(BackendTls::Starttls, BackendLogin::SaslAuthzid, false);
    for script in [
        &[&b"* OK ready\r\n"[..], &b"+ \r\n"[..]][..],
        &[
            &b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"[..],
            &b"+ \r\n"[..],
        ][..],
    ] {
        let (sent, end) = run(&b, "alice", script);
        assert!(matches!(end, UpStep::Fail(LoginError::Protocol)), "{end:?}");
        // base64("alice\0gateway\0m pw")
        assert!(
            !sent.contains("YWxpY2UAZ2F0ZXdheQBtIHB3"),
            "credential leaked: {sent}"
        );
        assert!(!sent.contains("m pw"));
    }
}

#[test]
fn id_and_login_go_out_in_one_write_and_answers_are_taken_in_order() {
    let b = master(BackendTls::None, true);
    // One write, before any answer to ID.
    let mut m = UpstreamLogin::new(&b, "alice", client()).unwrap();
    m.feed(b"* OK ready\r\n");
    let UpStep::Send(first) = m.step() else {
        panic!("nothing sent after the greeting")
    };
    let first = String::from_utf8(first).unwrap();
    assert!(first.starts_with("g1 ID ("), "{first}");
    assert!(
        first.ends_with("\r\ng2 LOGIN \"alice*gateway\" \"m pw\"\r\n"),
        "{first}"
    );
    assert!(matches!(m.step(), UpStep::NeedInput));

    // A backend that refuses ID still logs us in.
    let (_, end) = run(
        &b,
        "alice",
        &[
            b"* OK ready\r\n",
            b"g1 BAD no ID here\r\ng2 OK [CAPABILITY IMAP4rev1] in\r\n",
        ],
    );
    assert!(matches!(end, UpStep::Done(_)), "{end:?}");

    // The login's answer before ID's is out of order: refused, not taken as a login.
    let (_, end) = run(
        &b,
        "alice",
        &[b"* OK ready\r\n", b"g2 OK [CAPABILITY IMAP4rev1] in\r\n"],
    );
    assert!(matches!(end, UpStep::Fail(LoginError::Protocol)), "{end:?}");

    // A rejected login behind ID is a rejection.
    let (_, end) = run(
        &b,
        "alice",
        &[
            b"* OK ready\r\n",
            b"g1 OK done\r\ng2 NO [AUTHENTICATIONFAILED] no\r\n",
        ],
    );
    assert!(matches!(end, UpStep::Fail(LoginError::Rejected)), "{end:?}");
}

#[test]
fn a_continuation_before_id_is_answered_never_releases_the_literal_password() {
    let mut b = master(BackendTls::None, true);
    b.master_password = Secret::from_slice("pässword".as_bytes());
    let (sent, end) = run(&b, "alice", &[b"* OK hi\r\n", b"+ go\r\n"]);
    assert!(matches!(end, UpStep::Fail(LoginError::Protocol)), "{end:?}");
    assert!(
        sent.contains("g2 LOGIN \"alice*gateway\" {9}\r\n"),
        "{sent}"
    );
    assert!(!sent.contains("pässword"), "{sent}");
    // In order, the literal follows the `+` that comes after ID's answer.
    let (sent, end) = run(
        &b,
        "alice",
        &[
            b"* OK hi\r\n",
            b"g1 OK done\r\n+ go\r\n",
            b"g2 OK [CAPABILITY IMAP4rev1] in\r\n",
        ],
    );
    assert!(sent.ends_with("pässword\r\n"), "{sent}");
    assert!(matches!(end, UpStep::Done(_)), "{end:?}");
}
