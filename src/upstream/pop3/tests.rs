//! The POP3 login against scripted backend replies: what the backend receives, byte for byte,
//! and how each refusal ends.

use std::time::Duration;

use base64::Engine as _;

use super::*;
use crate::config::Protocol;

fn backend(tls: BackendTls, login: BackendLogin) -> BackendConfig {
    BackendConfig {
        name: "pop".into(),
        protocol: Protocol::Pop3,
        host: "localhost".into(),
        port: 995,
        tls,
        ca_file: None,
        server_name: "localhost".into(),
        login,
        master_user: "gateway".into(),
        master_password: Secret::from_slice(b"m pw"),
        send_id: false,
        connect_timeout: Duration::from_secs(1),
        login_timeout: Duration::from_secs(1),
    }
}

fn master(tls: BackendTls) -> BackendConfig {
    backend(
        tls,
        BackendLogin::MasterUser {
            separator: "*".into(),
        },
    )
}

fn client() -> SocketAddr {
    "192.0.2.7:40000".parse().unwrap()
}

/// What the machine sent (all of it, and the part before a TLS upgrade), and how it ended.
struct Run {
    sent: String,
    before_tls: Option<String>,
    end: UpStep,
}

fn drive(m: &mut Pop3Login, script: &[&[u8]]) -> Run {
    let mut sent = Vec::new();
    let mut before_tls = None;
    let mut input = script.iter();
    let end = loop {
        match m.step() {
            UpStep::Send(b) => sent.extend(b),
            UpStep::NeedInput => match input.next() {
                Some(b) => m.feed(b),
                None => break UpStep::NeedInput,
            },
            UpStep::StartTls => {
                before_tls = Some(String::from_utf8_lossy(&sent).into_owned());
                m.tls_started();
            }
            other => break other,
        }
    };
    Run {
        sent: String::from_utf8_lossy(&sent).into_owned(),
        before_tls,
        end,
    }
}

fn run(b: &BackendConfig, user: &str, script: &[&[u8]]) -> Run {
    let mut m = Pop3Login::new(b, user, client()).unwrap();
    drive(&mut m, script)
}

fn failed(end: &UpStep, want: LoginError) -> bool {
    matches!(end, UpStep::Fail(e) if *e == want)
}

fn decode(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim_end())
        .unwrap()
}

const GREETING: &[u8] = b"+OK Dovecot ready.\r\n";

#[test]
fn master_user_logs_in_with_user_star_master_then_pass() {
    let b = master(BackendTls::Implicit);
    let r = run(
        &b,
        "alice@example.org",
        &[GREETING, b"+OK\r\n", b"+OK Logged in.\r\n"],
    );
    assert_eq!(
        r.sent, "USER alice@example.org*gateway\r\nPASS m pw\r\n",
        "a space in the password belongs to it (RFC 1939 §7)"
    );
    assert!(
        matches!(r.end, UpStep::Done(ref v) if v.is_empty()),
        "{:?}",
        r.end
    );
}

#[test]
fn sasl_authzid_sends_auth_plain_with_an_initial_response() {
    let b = backend(BackendTls::None, BackendLogin::SaslAuthzid);
    let r = run(&b, "alice", &[GREETING, b"+OK Logged in.\r\n"]);
    let line = r.sent.strip_prefix("AUTH PLAIN ").unwrap();
    assert_eq!(decode(line), b"alice\0gateway\0m pw");
    assert!(matches!(r.end, UpStep::Done(_)));
}

#[test]
fn a_long_plain_response_waits_for_the_continuation() {
    let mut b = backend(BackendTls::None, BackendLogin::SaslAuthzid);
    b.master_password = Secret::from_slice("p".repeat(200).as_bytes());
    let r = run(&b, "alice", &[GREETING, b"+ \r\n", b"+OK\r\n"]);
    let (first, second) = r.sent.split_once("\r\n").unwrap();
    assert_eq!(
        first, "AUTH PLAIN",
        "the line would pass 255 octets with the response"
    );
    let mut want = b"alice\0gateway\0".to_vec();
    want.extend_from_slice("p".repeat(200).as_bytes());
    assert_eq!(decode(second), want);
    assert!(matches!(r.end, UpStep::Done(_)));
    // Refused before the continuation: the credential never went out.
    let r = run(&b, "alice", &[GREETING, b"-ERR no PLAIN here\r\n"]);
    assert!(failed(&r.end, LoginError::Rejected), "{:?}", r.end);
    assert_eq!(r.sent, "AUTH PLAIN\r\n");
    // `+OK` where the continuation was awaited is not a login.
    let r = run(&b, "alice", &[GREETING, b"+OK\r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
}

#[test]
fn refusals_at_each_step() {
    let b = master(BackendTls::None);
    for (script, want) in [
        (&[&b"-ERR go away\r\n"[..]][..], LoginError::Bye),
        (&[&b"* OK IMAP ready\r\n"[..]][..], LoginError::Protocol),
        (&[&b"220 smtp ready\r\n"[..]][..], LoginError::Protocol),
        (&[&b"+OKAY\r\n"[..]][..], LoginError::Protocol),
        (
            &[GREETING, &b"-ERR [AUTH] no such user\r\n"[..]][..],
            LoginError::Rejected,
        ),
        (
            &[
                GREETING,
                b"+OK\r\n",
                &b"-ERR [AUTH] Authentication failed.\r\n"[..],
            ][..],
            LoginError::Rejected,
        ),
        (
            &[GREETING, b"+OK\r\n", &b"-ERR [IN-USE] locked\r\n"[..]][..],
            LoginError::Rejected,
        ),
        // A continuation to USER is nothing the login asked for.
        (&[GREETING, &b"+ \r\n"[..]][..], LoginError::Protocol),
    ] {
        let r = run(&b, "alice", script);
        assert!(failed(&r.end, want), "{script:?}: {:?}", r.end);
    }
    let sasl = backend(BackendTls::None, BackendLogin::SaslAuthzid);
    let r = run(&sasl, "alice", &[GREETING, b"-ERR [AUTH] no\r\n"]);
    assert!(failed(&r.end, LoginError::Rejected), "{:?}", r.end);
    // The response went inline: a continuation would ask for it a second time.
    let r = run(&sasl, "alice", &[GREETING, b"+ \r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
    assert_eq!(r.sent.matches("AUTH PLAIN").count(), 1);
}

#[test]
fn the_password_is_sent_only_after_user_is_accepted() {
    let b = master(BackendTls::None);
    let r = run(&b, "alice", &[GREETING, b"-ERR no\r\n"]);
    assert!(failed(&r.end, LoginError::Rejected));
    assert!(!r.sent.contains("m pw"), "{}", r.sent);
}

#[test]
fn stls_before_the_login_and_nothing_of_it_in_clear() {
    let b = master(BackendTls::Starttls);
    let r = run(
        &b,
        "alice",
        &[
            GREETING,
            b"+OK Begin TLS negotiation now.\r\n",
            b"+OK\r\n",
            b"+OK in\r\n",
        ],
    );
    assert_eq!(r.before_tls.as_deref(), Some("STLS\r\n"));
    assert_eq!(r.sent, "STLS\r\nUSER alice*gateway\r\nPASS m pw\r\n");
    assert!(matches!(r.end, UpStep::Done(_)));

    let r = run(&b, "alice", &[GREETING, b"-ERR TLS not available\r\n"]);
    assert!(failed(&r.end, LoginError::StartTlsRefused), "{:?}", r.end);
    assert_eq!(r.sent, "STLS\r\n");

    // Bytes behind the +OK would be read as if they came over TLS.
    let r = run(&b, "alice", &[GREETING, b"+OK go\r\n+OK\r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
    assert!(r.before_tls.is_none());
    assert_eq!(r.sent, "STLS\r\n");
}

#[test]
fn unsolicited_bytes_and_endless_lines_are_refused() {
    let b = master(BackendTls::None);
    let r = run(&b, "alice", &[b"+OK hi\r\n+OK more\r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
    assert!(r.sent.is_empty());
    let mut m = Pop3Login::new(&b, "alice", client()).unwrap();
    let chunk = [b'+'; 4096];
    let mut end = None;
    for _ in 0..1000 {
        match m.step() {
            UpStep::NeedInput => m.feed(&chunk),
            other => {
                end = Some(other);
                break;
            }
        }
        assert!(m.lines.buffered() <= 2 * 64 * 1024 + 4096);
    }
    assert!(
        matches!(end, Some(UpStep::Fail(LoginError::Protocol))),
        "{end:?}"
    );
}

#[test]
fn the_probe_stops_after_the_greeting_or_stls() {
    let b = master(BackendTls::Starttls);
    let r = drive(&mut Pop3Login::probe(&b), &[GREETING, b"+OK\r\n"]);
    assert_eq!(r.sent, "STLS\r\n");
    assert!(matches!(r.end, UpStep::Done(_)), "{:?}", r.end);
    let b = master(BackendTls::Implicit);
    let r = drive(&mut Pop3Login::probe(&b), &[GREETING]);
    assert!(r.sent.is_empty());
    assert!(matches!(r.end, UpStep::Done(_)), "{:?}", r.end);
}

#[test]
fn user_names_that_cannot_be_sent() {
    let b = master(BackendTls::None);
    for user in ["", "alice\r\nDELE 1", "alice*gateway"] {
        assert!(matches!(
            Pop3Login::new(&b, user, client()),
            Err(LoginError::BadUser)
        ));
    }
    let x = backend(BackendTls::None, BackendLogin::Xclient);
    assert!(Pop3Login::new(&x, "alice", client()).is_err());
}

#[test]
fn replies_split_at_any_byte_end_the_same() {
    let b = master(BackendTls::Starttls);
    let script: [&[u8]; 4] = [GREETING, b"+OK go\r\n", b"+OK\r\n", b"+OK in\r\n"];
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    for part in script {
        bytes.extend(part.iter().map(|c| vec![*c]));
    }
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let r = run(&b, "alice", &refs);
    assert_eq!(r.sent, "STLS\r\nUSER alice*gateway\r\nPASS m pw\r\n");
    assert!(matches!(r.end, UpStep::Done(_)), "{:?}", r.end);
}
