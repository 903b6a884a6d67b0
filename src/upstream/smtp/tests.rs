//! The SMTP handover against scripted backend replies: what the backend receives, byte for
//! byte, and how each refusal ends.

use std::time::Duration;

use base64::Engine as _;

use super::*;
use crate::config::Protocol;

fn backend(tls: BackendTls, login: BackendLogin) -> BackendConfig {
    let xclient = login == BackendLogin::Xclient;
    BackendConfig {
        name: "mx".into(),
        protocol: Protocol::Smtp,
        host: "localhost".into(),
        port: 587,
        tls,
        ca_file: None,
        server_name: "localhost".into(),
        login,
        master_user: if xclient { "" } else { "gateway" }.into(),
        master_password: Secret::from_slice(if xclient { b"" } else { b"m pw" }),
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

fn drive(m: &mut SmtpLogin, script: &[&[u8]]) -> Run {
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

fn run(b: &BackendConfig, user: &str, helo: Option<&str>, script: &[&[u8]]) -> Run {
    let mut m = SmtpLogin::new(b, user, client(), helo).unwrap();
    drive(&mut m, script)
}

fn done(end: UpStep) -> Vec<String> {
    match end {
        UpStep::Done(ext) => ext,
        other => panic!("not done: {other:?}"),
    }
}

fn failed(end: &UpStep, want: LoginError) -> bool {
    matches!(end, UpStep::Fail(e) if *e == want)
}

/// The credential decoded from the `AUTH PLAIN <base64>` line the machine sent.
fn plain_payload(sent: &str) -> Vec<u8> {
    let line = sent
        .lines()
        .find_map(|l| l.strip_prefix("AUTH PLAIN "))
        .unwrap_or_else(|| panic!("no AUTH PLAIN in {sent:?}"));
    base64::engine::general_purpose::STANDARD
        .decode(line.trim_end())
        .unwrap()
}

const GREETING: &[u8] = b"220 mx.example.org ESMTP Postfix\r\n";
const POSTFIX_XCLIENT: &[u8] = b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";
const AFTER_XCLIENT: &[u8] = b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";

#[test]
fn xclient_hands_over_user_address_and_helo_in_xtext_then_greets_again() {
    let b = backend(BackendTls::Implicit, BackendLogin::Xclient);
    let r = run(
        &b,
        "al+ice=é@example.org",
        Some("laptop.example.net"),
        &[
            GREETING,
            POSTFIX_XCLIENT,
            b"220 mx.example.org ESMTP Postfix\r\n",
            AFTER_XCLIENT,
        ],
    );
    assert_eq!(
        r.sent,
        "EHLO laptop.example.net\r\n\
         XCLIENT ADDR=192.0.2.7 LOGIN=al+2Bice+3D+C3+A9@example.org NAME=[UNAVAILABLE] PROTO=ESMTP HELO=laptop.example.net\r\n\
         EHLO laptop.example.net\r\n"
    );
    // The extensions are the last EHLO's, the one the client's session continues from.
    let ext = done(r.end);
    assert_eq!(
        ext,
        [
            "PIPELINING",
            "SIZE 10240000",
            "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING"
        ]
    );
    // XCLIENT stays allowed for the gateway's connection: the client never sees it.
    assert_eq!(
        client_extensions(&ext),
        [
            "PIPELINING",
            "SIZE 10240000",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING"
        ]
    );
}

#[test]
fn xclient_addr_for_ipv6_and_mapped_ipv4_and_only_listed_attributes() {
    let b = backend(BackendTls::None, BackendLogin::Xclient);
    let minimal = b"250-mx\r\n250 XCLIENT login addr\r\n";
    for (addr, want) in [
        ("[2001:db8::7]:40000", "ADDR=IPV6:2001:db8::7"),
        ("[::ffff:192.0.2.9]:40000", "ADDR=192.0.2.9"),
    ] {
        let mut m = SmtpLogin::new(&b, "bob", addr.parse().unwrap(), None).unwrap();
        let r = drive(&mut m, &[GREETING, minimal, GREETING, b"250 mx\r\n"]);
        // No EHLO name from the client: `localhost`; the server lists neither NAME, PROTO nor
        // HELO, so only what it takes is sent.
        assert_eq!(
            r.sent,
            format!("EHLO localhost\r\nXCLIENT {want} LOGIN=bob\r\nEHLO localhost\r\n")
        );
        assert!(done(r.end).is_empty());
    }
}

#[test]
fn xclient_not_offered_or_without_login_is_no_xclient() {
    let b = backend(BackendTls::None, BackendLogin::Xclient);
    for ehlo in [
        &b"250-mx\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"[..],
        &b"250-mx\r\n250 XCLIENT NAME ADDR HELO\r\n"[..],
        &b"250 mx\r\n"[..],
    ] {
        let r = run(&b, "alice", Some("h"), &[GREETING, ehlo]);
        assert!(failed(&r.end, LoginError::NoXclient), "{:?}", r.end);
        assert_eq!(r.sent, "EHLO h\r\n");
    }
    assert_eq!(LoginError::NoXclient.as_str(), "no_xclient");
}

#[test]
fn xclient_refused_by_the_backend_is_rejected() {
    let b = backend(BackendTls::None, BackendLogin::Xclient);
    for reply in [
        &b"550 5.7.0 Error: insufficient authorization\r\n"[..],
        &b"501 5.5.4 Bad command parameter syntax\r\n"[..],
        &b"421 4.3.0 closing\r\n"[..],
    ] {
        let r = run(&b, "alice", None, &[GREETING, POSTFIX_XCLIENT, reply]);
        assert!(failed(&r.end, LoginError::Rejected), "{:?}", r.end);
    }
    // A 250 is not the greeting XCLIENT promises.
    let r = run(
        &b,
        "alice",
        None,
        &[GREETING, POSTFIX_XCLIENT, b"250 ok\r\n"],
    );
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
}

#[test]
fn master_user_sends_auth_plain_with_user_separator_master() {
    let b = master(BackendTls::Implicit);
    let r = run(
        &b,
        "alice@example.org",
        Some("laptop"),
        &[
            GREETING,
            b"250-submission.example.org\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 SIZE 1000\r\n",
            b"235 2.7.0 Logged in.\r\n",
        ],
    );
    assert!(
        r.sent.starts_with("EHLO laptop\r\nAUTH PLAIN "),
        "{}",
        r.sent
    );
    assert_eq!(plain_payload(&r.sent), b"\0alice@example.org*gateway\0m pw");
    assert_eq!(done(r.end), ["PIPELINING", "AUTH PLAIN LOGIN", "SIZE 1000"]);
}

#[test]
fn sasl_authzid_sends_auth_plain_with_the_user_as_authzid() {
    let b = backend(BackendTls::None, BackendLogin::SaslAuthzid);
    // The pre-RFC 4954 `AUTH=` form is understood too.
    let r = run(
        &b,
        "alice",
        None,
        &[
            GREETING,
            b"250-mx\r\n250 AUTH=LOGIN PLAIN\r\n",
            b"235 ok\r\n",
        ],
    );
    assert_eq!(plain_payload(&r.sent), b"alice\0gateway\0m pw");
    assert!(matches!(r.end, UpStep::Done(_)));
}

#[test]
fn auth_refusals_and_a_backend_without_auth_plain() {
    let b = master(BackendTls::None);
    let ehlo: &[u8] = b"250-mx\r\n250 AUTH PLAIN\r\n";
    for (reply, want) in [
        (
            &b"535 5.7.8 Authentication failed\r\n"[..],
            LoginError::Rejected,
        ),
        (
            &b"454 4.7.0 Temporary failure\r\n"[..],
            LoginError::Rejected,
        ),
        (&b"554 5.7.0 no\r\n"[..], LoginError::Rejected),
        // A challenge would ask for the credential again: it goes out once only.
        (&b"334 \r\n"[..], LoginError::Protocol),
    ] {
        let r = run(&b, "alice", None, &[GREETING, ehlo, reply]);
        assert!(failed(&r.end, want), "{reply:?}: {:?}", r.end);
        assert_eq!(r.sent.matches("AUTH PLAIN").count(), 1);
    }
    // No AUTH PLAIN offered: the credential is never sent.
    for ehlo in [
        &b"250-mx\r\n250 AUTH LOGIN CRAM-MD5\r\n"[..],
        &b"250 mx\r\n"[..],
    ] {
        let r = run(&b, "alice", None, &[GREETING, ehlo]);
        assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
        assert!(!r.sent.contains("AUTH"), "{}", r.sent);
    }
}

#[test]
fn starttls_then_ehlo_again_and_the_pre_tls_extensions_are_forgotten() {
    let b = master(BackendTls::Starttls);
    let r = run(
        &b,
        "alice",
        Some("laptop"),
        &[
            GREETING,
            b"250-mx\r\n250-PRETLS-ONLY\r\n250 STARTTLS\r\n",
            b"220 2.0.0 Ready to start TLS\r\n",
            b"250-mx\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n",
            b"235 ok\r\n",
        ],
    );
    assert_eq!(
        r.before_tls.as_deref(),
        Some("EHLO laptop\r\nSTARTTLS\r\n"),
        "nothing else may go out in clear"
    );
    assert!(
        r.sent
            .starts_with("EHLO laptop\r\nSTARTTLS\r\nEHLO laptop\r\nAUTH PLAIN "),
        "{}",
        r.sent
    );
    assert_eq!(done(r.end), ["AUTH PLAIN", "8BITMIME"]);
}

#[test]
fn starttls_missing_refused_or_followed_by_injected_bytes() {
    let b = master(BackendTls::Starttls);
    // Stripped from the EHLO reply (a downgrade): fail, never go on in clear.
    let r = run(
        &b,
        "alice",
        None,
        &[GREETING, b"250-mx\r\n250 AUTH PLAIN\r\n"],
    );
    assert!(failed(&r.end, LoginError::NoStartTls), "{:?}", r.end);
    assert!(!r.sent.contains("AUTH"));
    // `250 STARTTLS` is a one-line EHLO reply: a server named STARTTLS, no extensions.
    let r = run(&b, "alice", None, &[GREETING, b"250 STARTTLS\r\n"]);
    assert!(failed(&r.end, LoginError::NoStartTls), "{:?}", r.end);
    let r = run(
        &b,
        "alice",
        None,
        &[
            GREETING,
            b"250-mx\r\n250 STARTTLS\r\n",
            b"454 4.7.0 TLS not available\r\n",
        ],
    );
    assert!(failed(&r.end, LoginError::StartTlsRefused), "{:?}", r.end);
    // Bytes behind the 220 would be read as if they came over TLS: refused before the
    // handshake.
    let r = run(
        &b,
        "alice",
        None,
        &[
            GREETING,
            b"250-mx\r\n250 STARTTLS\r\n",
            b"220 go ahead\r\n250-mx\r\n250 AUTH PLAIN\r\n",
        ],
    );
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
    assert!(r.before_tls.is_none(), "TLS started despite the injection");
    assert!(!r.sent.contains("AUTH"));
}

#[test]
fn greetings_that_refuse_or_are_not_smtp() {
    let b = master(BackendTls::None);
    for (greeting, want) in [
        (&b"421 4.3.2 Service not available\r\n"[..], LoginError::Bye),
        (&b"554 5.7.1 go away\r\n"[..], LoginError::Bye),
        (&b"* OK IMAP4rev1 ready\r\n"[..], LoginError::Protocol),
        (&b"+OK POP3 ready\r\n"[..], LoginError::Protocol),
        (&b"220\r\n"[..], LoginError::Protocol),
        (&b"22\r\n"[..], LoginError::Protocol),
        (&b"999 what\r\n"[..], LoginError::Protocol),
        (&b"220_x\r\n"[..], LoginError::Protocol),
    ] {
        let r = run(&b, "alice", None, &[greeting]);
        if greeting == b"220\r\n" {
            // A bare code is a complete reply (RFC 5321 §4.2): the EHLO follows.
            assert_eq!(r.sent, "EHLO localhost\r\n");
            continue;
        }
        assert!(failed(&r.end, want), "{greeting:?}: {:?}", r.end);
        assert!(r.sent.is_empty(), "{greeting:?}: {}", r.sent);
    }
    // A multi-line greeting, split anywhere, is one reply.
    let r = run(
        &b,
        "alice",
        None,
        &[
            b"220-mx.example.org ESMTP\r\n22",
            b"0-second line\r\n220 ready\r\n",
        ],
    );
    assert_eq!(r.sent, "EHLO localhost\r\n");
    assert!(matches!(r.end, UpStep::NeedInput));
    // Lines of one reply with different codes.
    let r = run(&b, "alice", None, &[b"220-mx\r\n250 ready\r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
}

#[test]
fn bytes_the_backend_was_not_asked_for_are_refused() {
    let b = master(BackendTls::None);
    let r = run(&b, "alice", None, &[b"220 mx\r\n250 unsolicited\r\n"]);
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
    assert!(r.sent.is_empty());
    let r = run(
        &b,
        "alice",
        None,
        &[
            GREETING,
            b"250-mx\r\n250 AUTH PLAIN\r\n",
            b"235 ok\r\n250 more\r\n",
        ],
    );
    assert!(failed(&r.end, LoginError::Protocol), "{:?}", r.end);
}

#[test]
fn a_hostile_backend_cannot_grow_memory() {
    let b = master(BackendTls::None);
    // An endless EHLO reply: refused at the line cap.
    let mut m = SmtpLogin::new(&b, "alice", client(), None).unwrap();
    m.feed(GREETING);
    assert!(matches!(m.step(), UpStep::Send(_)));
    let mut end = None;
    for _ in 0..100_000 {
        match m.step() {
            UpStep::NeedInput => m.feed(b"250-X-EXTENSION with some text\r\n"),
            other => {
                end = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(end, Some(UpStep::Fail(LoginError::Protocol))),
        "{end:?}"
    );
    assert!(m.reply.lines.len() <= MAX_REPLY_LINES);
    // An endless line: refused at 64 KiB, with little kept.
    let mut m = SmtpLogin::new(&b, "alice", client(), None).unwrap();
    let chunk = [b'2'; 4096];
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
    // Long lines that stay under the line cap still add up to the reply cap.
    let mut m = SmtpLogin::new(&b, "alice", client(), None).unwrap();
    m.feed(GREETING);
    assert!(matches!(m.step(), UpStep::Send(_)));
    let line = format!("250-{}\r\n", "x".repeat(8000));
    let mut end = None;
    for _ in 0..100 {
        match m.step() {
            UpStep::NeedInput => m.feed(line.as_bytes()),
            other => {
                end = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(end, Some(UpStep::Fail(LoginError::Protocol))),
        "{end:?}"
    );
    assert!(m.reply.bytes <= MAX_REPLY_BYTES + 8100);
}

#[test]
fn ehlo_name_is_the_clients_when_it_is_one_visible_token() {
    let b = master(BackendTls::None);
    for (helo, want) in [
        (Some("[192.0.2.7]"), "EHLO [192.0.2.7]\r\n"),
        (Some("two words"), "EHLO localhost\r\n"),
        (Some("evil\r\nRCPT TO:<x>"), "EHLO localhost\r\n"),
        (Some(""), "EHLO localhost\r\n"),
        (None, "EHLO localhost\r\n"),
    ] {
        let r = run(&b, "alice", helo, &[GREETING]);
        assert_eq!(r.sent, want, "{helo:?}");
    }
    let long = "a".repeat(256);
    let r = run(&b, "alice", Some(&long), &[GREETING]);
    assert_eq!(r.sent, "EHLO localhost\r\n");
}

#[test]
fn user_names_that_cannot_be_handed_over() {
    let x = backend(BackendTls::None, BackendLogin::Xclient);
    let m = master(BackendTls::None);
    for user in ["", "alice\r\nRCPT TO:<x>", "al\0ice"] {
        assert!(matches!(
            SmtpLogin::new(&x, user, client(), None),
            Err(LoginError::BadUser)
        ));
    }
    // The master separator would change whose login it is.
    assert!(matches!(
        SmtpLogin::new(&m, "alice*gateway", client(), None),
        Err(LoginError::BadUser)
    ));
    // xtext carries spaces and `=`: no reason to refuse them for XCLIENT.
    assert!(SmtpLogin::new(&x, "a b=c", client(), None).is_ok());
}

#[test]
fn the_probe_stops_after_ehlo_and_sends_no_credential() {
    let b = master(BackendTls::Starttls);
    let mut m = SmtpLogin::probe(&b);
    let r = drive(
        &mut m,
        &[
            GREETING,
            b"250-mx\r\n250 STARTTLS\r\n",
            b"220 go\r\n",
            b"250-mx\r\n250-AUTH PLAIN\r\n250 SIZE 5\r\n",
        ],
    );
    assert_eq!(r.sent, "EHLO localhost\r\nSTARTTLS\r\nEHLO localhost\r\n");
    assert_eq!(done(r.end), ["AUTH PLAIN", "SIZE 5"]);
}

#[test]
fn the_client_sees_no_extension_about_the_gateways_own_link_or_identity() {
    let ext: Vec<String> = [
        "PIPELINING",
        "SIZE 10240000",
        "AUTH PLAIN LOGIN",
        "AUTH=PLAIN",
        "auth login",
        "STARTTLS",
        "XCLIENT NAME ADDR",
        "xforward name addr",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
        "AUTHX-NOT-AUTH",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(
        client_extensions(&ext),
        [
            "PIPELINING",
            "SIZE 10240000",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "AUTHX-NOT-AUTH"
        ]
    );
}

#[test]
fn xtext_known_answers() {
    assert_eq!(xtext("alice@example.org"), "alice@example.org");
    assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    assert_eq!(xtext("ü"), "+C3+BC");
    assert_eq!(xtext("[UNAVAILABLE]"), "[UNAVAILABLE]");
    assert_eq!(xtext("~!"), "~!");
}

#[test]
fn replies_split_at_any_byte_end_the_same() {
    let b = backend(BackendTls::Starttls, BackendLogin::Xclient);
    let script: [&[u8]; 5] = [
        GREETING,
        b"250-mx\r\n250-XCLIENT ADDR LOGIN\r\n250 STARTTLS\r\n",
        b"220 go\r\n",
        b"250-mx\r\n250 XCLIENT ADDR LOGIN NAME\r\n",
        b"220-mx\r\n220 again\r\n",
    ];
    let whole = {
        let mut s = script.to_vec();
        s.push(b"250-mx\r\n250 SIZE 7\r\n");
        run(&b, "alice", None, &s)
    };
    // The same bytes one at a time (within each reply: STARTTLS forgets what is buffered).
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    for part in script.iter().chain([&&b"250-mx\r\n250 SIZE 7\r\n"[..]]) {
        bytes.extend(part.iter().map(|c| vec![*c]));
    }
    let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let split = run(&b, "alice", None, &refs);
    assert_eq!(split.sent, whole.sent);
    assert_eq!(
        whole.sent,
        "EHLO localhost\r\nSTARTTLS\r\nEHLO localhost\r\nXCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\nEHLO localhost\r\n"
    );
    assert_eq!(done(split.end), done(whole.end));
}
