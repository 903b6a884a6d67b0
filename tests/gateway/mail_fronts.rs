//! SMTP submission and POP3 through the gateway (issue 21): real clients (Python's smtplib and
//! poplib, swaks, curl, fetchmail) send mail through the gateway's SMTP front to the harness's
//! Postfix (XCLIENT) or Dovecot's submission service (master user as authcid), and read it back
//! through the gateway's IMAP and POP3 fronts from the real Dovecot. The pre-auth rules each
//! front shares with IMAP are checked on the wire, and the guard, MFA unlock windows, metrics
//! and audit are shown to be one across the three protocols.

use std::net::SocketAddr;
use std::time::Duration;

use imapgate::server::proxy::v2_header;

use crate::harness::*;

/// A subject no other message has.
fn marker(what: &str) -> String {
    format!(
        "{what}-{}",
        imapgate::auth::app_password::generate()
            .expose_str()
            .unwrap()
    )
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Runs a program (tokio's process: the gateway runs on this test's runtime); (success,
/// stdout + stderr).
async fn run(program: &str, args: &[String]) -> (bool, String) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn python(script: &str, args: &[String]) -> (bool, String) {
    let mut all = vec!["-c".to_owned(), script.to_owned()];
    all.extend(args.iter().cloned());
    run("python3", &all).await
}

fn s<T: ToString>(x: T) -> String {
    x.to_string()
}

async fn mail_gateway(smtp_default: &'static str, extra: Options) -> Option<TestGateway> {
    if !have("python3") {
        return None;
    }
    TestGateway::start_with(Options {
        mail: Some(smtp_default),
        extra_users: ["uma@example.org", "vic@example.org", "wes@example.org"]
            .map(String::from)
            .to_vec(),
        ..extra
    })
    .await
}

/// Reads one SMTP reply (all its lines).
async fn reply(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let Some(l) = c.line_within(Duration::from_secs(10)).await else {
            return lines;
        };
        let more = l.as_bytes().get(3) == Some(&b'-');
        lines.push(l);
        if !more {
            return lines;
        }
    }
}

/// Sends one SMTP command and reads its reply.
async fn smtp(c: &mut Client, command: &str) -> Vec<String> {
    c.send(format!("{command}\r\n")).await;
    reply(c).await
}

/// Sends one POP3 command and reads its one-line reply.
async fn pop(c: &mut Client, command: &str) -> String {
    c.send(format!("{command}\r\n")).await;
    c.line_within(Duration::from_secs(10))
        .await
        .unwrap_or_default()
}

/// Reads a POP3 multi-line reply up to its `.` line.
async fn pop_multi(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    while let Some(l) = c.line_within(Duration::from_secs(10)).await {
        let end = l == ".\r\n";
        lines.push(l);
        if end {
            break;
        }
    }
    lines
}

const SMTPLIB: &str = r#"
import smtplib, ssl, sys
mode, port, ca, user, pw, subject = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    s = smtplib.SMTP_SSL("localhost", int(port), context=ctx, timeout=20)
    s.ehlo("client.example.net")
else:
    s = smtplib.SMTP("localhost", int(port), timeout=20)
    s.ehlo("client.example.net")
    assert "auth" not in s.esmtp_features, s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo("client.example.net")
print("EHLO", sorted(s.esmtp_features))
print("AUTH", s.esmtp_features.get("auth"))
try:
    s.login(user, pw)
except smtplib.SMTPAuthenticationError as e:
    print("login refused", e.smtp_code, e.smtp_error.decode())
    sys.exit(3)
refused = s.sendmail(user, [user], "From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\nhello through the gateway\r\n" % (user, user, subject))
assert refused == {}, refused
s.quit()
print("sent")
"#;

/// Sends one message with smtplib (`mode`: `implicit` or `starttls`).
async fn smtplib_send(
    t: &TestGateway,
    mode: &str,
    listener: &str,
    user: &str,
    pw: &str,
    subject: &str,
) -> (bool, String) {
    python(
        SMTPLIB,
        &[
            s(mode),
            s(t.addr(listener).port()),
            s(t.pki.ca_pem.display()),
            s(user),
            s(pw),
            s(subject),
        ],
    )
    .await
}

const POPLIB: &str = r#"
import poplib, ssl, sys
mode, port, ca, user, pw = sys.argv[1:6]
subjects = sys.argv[6:]
ctx = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    p = poplib.POP3_SSL("localhost", int(port), context=ctx, timeout=20)
else:
    p = poplib.POP3("localhost", int(port), timeout=20)
    caps = p.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps, caps
    p.stls(context=ctx)
print("CAPA", sorted(p.capa()))
p.user(user)
p.pass_(pw)
count, _ = p.stat()
found = {}
for n in range(1, count + 1):
    body = b"\n".join(p.retr(n)[1]).decode("utf-8", "replace")
    for s in subjects:
        if s in body:
            found[s] = n
p.quit()
missing = [s for s in subjects if s not in found]
print("found", found)
assert not missing, missing
"#;

/// The message number of every subject in `user`'s POP3 mailbox, read through the gateway.
async fn poplib_read(
    t: &TestGateway,
    mode: &str,
    listener: &str,
    user: &str,
    subjects: &[&str],
) -> (bool, String) {
    let mut args = vec![
        s(mode),
        s(t.addr(listener).port()),
        s(t.pki.ca_pem.display()),
        s(user),
        t.password(user),
    ];
    args.extend(subjects.iter().map(s));
    python(POPLIB, &args).await
}

/// Waits until a message with `subject` is in `user`'s INBOX, read through the gateway's IMAP
/// front; returns its header.
async fn arrived_via_gateway(t: &TestGateway, user: &str, subject: &str) -> String {
    for _ in 0..80 {
        let mut c = t.logged_in(user).await;
        let r = c.cmd("e", "EXAMINE INBOX").await;
        assert!(last(&r).starts_with("e OK"), "{r:?}");
        let r = c.cmd("s", &format!("SEARCH SUBJECT \"{subject}\"")).await;
        let hit = r
            .iter()
            .find_map(|l| l.strip_prefix("* SEARCH "))
            .and_then(|n| n.split_whitespace().next().map(str::to_owned));
        if let Some(n) = hit {
            let h = c.cmd("f", &format!("FETCH {n} BODY.PEEK[HEADER]")).await;
            assert!(last(&h).starts_with("f OK"), "{h:?}");
            c.cmd("l", "LOGOUT").await;
            return h.concat();
        }
        c.cmd("l", "LOGOUT").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = postfix().map(|p| p.log()).unwrap_or_default();
    panic!("no message \"{subject}\" for {user} after 20 s; postfix log:\n{log}");
}

#[tokio::test]
async fn mail_sent_through_the_gateway_with_real_clients_is_read_back_through_it() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    for tool in ["swaks", "curl", "fetchmail"] {
        if !have(tool) {
            return;
        }
    }
    let user = "uma@example.org";
    let pw = t.password(user);
    let ca = s(t.pki.ca_pem.display());
    let mut subjects = Vec::new();

    // smtplib over implicit TLS (465-style) and over STARTTLS (587-style).
    let subject = marker("smtplib-implicit");
    let (ok, out) = smtplib_send(&t, "implicit", "smtps", user, &pw, &subject).await;
    assert!(ok, "smtplib implicit: {out}");
    // The backend's extensions pass through; AUTH is the gateway's own.
    for ext in ["pipelining", "8bitmime", "size", "enhancedstatuscodes"] {
        assert!(out.contains(&format!("'{ext}'")), "{ext} missing: {out}");
    }
    assert!(out.contains("AUTH  PLAIN LOGIN\n"), "{out}");
    assert!(
        !out.contains("xclient"),
        "the backend's XCLIENT shown: {out}"
    );
    subjects.push(subject);
    let subject = marker("smtplib-starttls");
    let (ok, out) = smtplib_send(&t, "starttls", "submission", user, &pw, &subject).await;
    assert!(ok, "smtplib starttls: {out}");
    subjects.push(subject);

    // swaks: STARTTLS with AUTH LOGIN; implicit TLS with AUTH PLAIN, pipelined.
    for (args, mech) in [
        (vec!["--tls".to_owned()], "LOGIN"),
        (
            vec!["--tls-on-connect".to_owned(), "--pipeline".to_owned()],
            "PLAIN",
        ),
    ] {
        let subject = marker(&format!("swaks-{mech}"));
        let listener = if mech == "LOGIN" {
            "submission"
        } else {
            "smtps"
        };
        let mut a = vec![
            s("--server"),
            s("localhost"),
            s("--port"),
            s(t.addr(listener).port()),
            s("--tls-verify"),
            s("--tls-ca-path"),
            ca.clone(),
            s("--auth"),
            s(mech),
            s("--auth-user"),
            s(user),
            s("--auth-password"),
            pw.clone(),
            s("--from"),
            s(user),
            s("--to"),
            s(user),
            s("--header"),
            format!("Subject: {subject}"),
            s("--timeout"),
            s("20"),
        ];
        a.extend(args);
        let (ok, out) = run("swaks", &a).await;
        assert!(ok, "swaks {mech}: {out}");
        assert!(out.contains("235 2.7.0"), "{out}");
        assert!(out.contains("220 gw.example.org ESMTP"), "{out}");
        subjects.push(subject);
    }

    // curl: smtps:// and smtp:// with --ssl-reqd.
    for (scheme, listener, extra) in [
        ("smtps", "smtps", None),
        ("smtp", "submission", Some("--ssl-reqd")),
    ] {
        let subject = marker(&format!("curl-{scheme}"));
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail.txt");
        std::fs::write(
            &mail,
            format!("From: <{user}>\r\nTo: <{user}>\r\nSubject: {subject}\r\n\r\nvia curl\r\n"),
        )
        .unwrap();
        let mut a = vec![
            s("-sS"),
            s("--max-time"),
            s("20"),
            s("--cacert"),
            ca.clone(),
            s("--user"),
            format!("{user}:{pw}"),
            s("--mail-from"),
            s(user),
            s("--mail-rcpt"),
            s(user),
            s("--upload-file"),
            s(mail.display()),
            format!("{scheme}://localhost:{}", t.addr(listener).port()),
        ];
        if let Some(e) = extra {
            a.insert(0, s(e));
        }
        let (ok, out) = run("curl", &a).await;
        assert!(ok, "curl {scheme}: {out}");
        subjects.push(subject);
    }

    // Read back over IMAP through the gateway: every message arrived, handed over by XCLIENT
    // with the real login name and the client's address.
    for subject in &subjects {
        let header = arrived_via_gateway(&t, user, subject).await;
        assert!(
            header.contains(&format!("(Authenticated sender: {user})")),
            "{header}"
        );
        assert!(header.contains("(unknown [127.0.0.1])"), "{header}");
        // Authenticated, over the STARTTLS the gateway holds with Postfix.
        assert!(header.contains("with ESMTPSA"), "{header}");
        if subject.starts_with("smtplib") {
            // The client's own EHLO name, handed over with XCLIENT HELO=.
            assert!(header.contains("from client.example.net "), "{header}");
        }
    }
    let log = postfix().unwrap().log();
    assert!(
        log.contains(&format!("sasl_method=XCLIENT, sasl_username={user}")),
        "{log}"
    );

    // …and over POP3 through the gateway: poplib (implicit TLS and STLS), curl pop3s://,
    // fetchmail.
    let wanted: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let (ok, out) = poplib_read(&t, "implicit", "pop3s", user, &wanted).await;
    assert!(ok, "poplib pop3s: {out}");
    let (ok, out) = poplib_read(&t, "stls", "pop3", user, &wanted).await;
    assert!(ok, "poplib STLS: {out}");
    assert!(out.contains("'SASL'") || out.contains("SASL"), "{out}");

    let curl = |path: String| {
        let ca = ca.clone();
        let auth = format!("{user}:{pw}");
        let port = t.addr("pop3s").port();
        async move {
            run(
                "curl",
                &[
                    s("-sS"),
                    s("--max-time"),
                    s("20"),
                    s("--cacert"),
                    ca,
                    s("--user"),
                    auth,
                    format!("pop3s://localhost:{port}/{path}"),
                ],
            )
            .await
        }
    };
    let (ok, listing) = curl(String::new()).await;
    assert!(ok, "curl LIST: {listing}");
    let mut seen = 0;
    for line in listing.lines() {
        let n = line.split_whitespace().next().unwrap_or("");
        let (ok, body) = curl(n.to_owned()).await;
        assert!(ok, "curl RETR {n}: {body}");
        seen += subjects
            .iter()
            .filter(|x| body.contains(x.as_str()))
            .count();
    }
    assert_eq!(seen, subjects.len(), "curl pop3s read {listing}");

    let home = tempfile::tempdir().unwrap();
    let got = home.path().join("fetched.mbox");
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "poll localhost service {port} protocol pop3 timeout 20\n  user \"{user}\" password \"{pw}\"\n",
            port = t.addr("pop3s").port(),
        ),
    )
    .unwrap();
    chmod(&rc, 0o600);
    let (ok, out) = tokio::process::Command::new("fetchmail")
        .env("HOME", home.path())
        .env("FETCHMAILHOME", home.path())
        .arg("-f")
        .arg(&rc)
        .args(["--ssl", "--sslcertck", "--sslcertfile", &ca])
        .args(["-k", "-a", "--nosyslog", "-v", "--mda"])
        .arg(format!("/bin/sh -c 'cat >> {}'", got.display()))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr),
            )
        })
        .unwrap();
    assert!(ok, "fetchmail: {out}");
    let fetched = std::fs::read_to_string(&got).unwrap_or_default();
    for subject in &subjects {
        assert!(fetched.contains(subject.as_str()), "fetchmail: {out}");
    }
    assert!(!out.contains(&pw), "fetchmail printed the password");

    // Counted by protocol; the audit names it.
    for p in ["smtp", "pop3", "imap"] {
        assert!(
            t.metric(
                "imapgate_auth_attempts_total",
                &[&format!("protocol=\"{p}\""), "result=\"success\""]
            )
            .await
                >= 2.0,
            "{p}"
        );
    }
    assert!(
        t.metric(
            "imapgate_connections_total",
            &["listener=\"submission\"", "protocol=\"smtp\""]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn dovecot_submission_takes_the_login_as_master_user_authzid() {
    let Some(t) = mail_gateway("dovecot-submission", Options::default()).await else {
        return;
    };
    let user = "vic@example.org";
    let subject = marker("via-dovecot-submission");
    let (ok, out) = smtplib_send(&t, "implicit", "smtps", user, &t.password(user), &subject).await;
    assert!(ok, "smtplib: {out}");
    let header = arrived_via_gateway(&t, user, &subject).await;
    // Dovecot's submission service took it authenticated, Postfix relayed it to LMTP.
    assert!(header.contains("with ESMTPSA"), "{header}");
    assert!(header.contains("by mx.example.org (Postfix)"), "{header}");
    // A wrong app password never reaches the backend.
    let (ok, out) = smtplib_send(&t, "implicit", "smtps", user, "wrong-password", &subject).await;
    assert!(!ok && out.contains("login refused 535"), "{out}");
    assert!(out.contains("5.7.8"), "{out}");
}

#[tokio::test]
async fn smtp_pre_auth_rules_hold_on_the_wire() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    let user = "wes@example.org";
    let ca = t.pki.ca_der.clone();
    let plain = b64(&format!("\0{user}\0{}", t.password(user)));
    let attempts = || t.metric("imapgate_auth_attempts_total", &["protocol=\"smtp\""]);

    // The STARTTLS port: the gateway's greeting; no AUTH and no credential before TLS.
    let mut c = Client::plain(t.addr("submission"), &ca).await;
    let g = c.line().await.unwrap();
    assert_eq!(g, "220 gw.example.org ESMTP\r\n");
    let r = smtp(&mut c, "EHLO client.example.net").await;
    assert!(r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert!(
        !r.iter().any(|l| l.contains("AUTH")),
        "AUTH before TLS: {r:?}"
    );
    let r = smtp(&mut c, &format!("AUTH PLAIN {plain}")).await;
    assert!(r[0].starts_with("530 5.7.0"), "{r:?}");
    let r = smtp(&mut c, "AUTH LOGIN").await;
    assert!(r[0].starts_with("530 5.7.0"), "no 334 before TLS: {r:?}");
    let r = smtp(&mut c, &format!("MAIL FROM:<{user}>")).await;
    assert!(r[0].starts_with("530 5.7.0"), "{r:?}");
    // STARTTLS with a login pipelined behind it: the injected bytes are dropped.
    c.send(format!("STARTTLS\r\nAUTH PLAIN {plain}\r\n")).await;
    let r = reply(&mut c).await;
    assert!(r[0].starts_with("220 2.0.0"), "{r:?}");
    let mut c = c.starttls().await.unwrap();
    let r = smtp(&mut c, "EHLO client.example.net").await;
    assert!(r[0].starts_with("250-gw.example.org"), "{r:?}");
    assert!(r.iter().any(|l| l.contains("AUTH PLAIN LOGIN")), "{r:?}");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert_eq!(attempts().await, 0.0, "the injected AUTH was acted on");
    // MAIL before AUTH, over TLS too.
    let r = smtp(&mut c, &format!("MAIL FROM:<{user}>")).await;
    assert!(r[0].starts_with("530 5.7.0"), "{r:?}");
    // Bad base64 is a syntax error, never a login attempt.
    let r = smtp(&mut c, "AUTH PLAIN %%%not-base64%%%").await;
    assert!(r[0].starts_with("501"), "{r:?}");
    assert_eq!(attempts().await, 0.0);
    // A wrong password: 535 5.7.8, after the floor.
    let bad = b64(&format!("\0{user}\0wrong"));
    let started = std::time::Instant::now();
    let r = smtp(&mut c, &format!("AUTH PLAIN {bad}")).await;
    assert!(r[0].starts_with("535 5.7.8"), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The right one, with a message pipelined behind it (RFC 2920): it reaches the backend in
    // order.
    let subject = marker("pipelined-behind-auth");
    c.send(format!(
        "AUTH PLAIN {plain}\r\nMAIL FROM:<{user}>\r\nRCPT TO:<{user}>\r\nDATA\r\n"
    ))
    .await;
    assert!(reply(&mut c).await[0].starts_with("235 2.7.0"));
    assert!(reply(&mut c).await[0].starts_with("250"), "MAIL");
    assert!(reply(&mut c).await[0].starts_with("250"), "RCPT");
    assert!(reply(&mut c).await[0].starts_with("354"), "DATA");
    let r = smtp(&mut c, &format!("Subject: {subject}\r\n\r\npipelined\r\n.")).await;
    assert!(r[0].starts_with("250"), "{r:?}");
    let r = smtp(&mut c, "QUIT").await;
    assert!(r[0].starts_with("221"), "{r:?}");
    arrived_via_gateway(&t, user, &subject).await;

    // Implicit TLS: a huge line is refused and the connection closed, without the gateway
    // buffering it.
    let mut c = Client::tls_alpn(t.addr("smtps"), &ca, &[]).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("220 gw.example.org"));
    let _ = c.try_send(vec![b'A'; 1 << 20]).await;
    let r = reply(&mut c).await;
    assert!(
        r.first().is_some_and(|l| l.starts_with("500 5.5.6")),
        "{r:?}"
    );
    assert!(c.closed_within(Duration::from_secs(5)).await);
    // A browser's ALPN is refused on the SMTP port (ALPACA).
    assert!(Client::tls_alpn(t.addr("smtps"), &ca, &[b"http/1.1"])
        .await
        .is_err());
}

#[tokio::test]
async fn pop3_pre_auth_rules_hold_on_the_wire() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    let user = "wes@example.org";
    let ca = t.pki.ca_der.clone();
    let pw = t.password(user);
    let attempts = || t.metric("imapgate_auth_attempts_total", &["protocol=\"pop3\""]);

    let mut c = Client::plain(t.addr("pop3"), &ca).await;
    let g = c.line().await.unwrap();
    assert!(g.starts_with("+OK"), "{g}");
    assert!(!g.contains('<'), "an APOP timestamp: {g}");
    assert!(pop(&mut c, "CAPA").await.starts_with("+OK"));
    let caps = pop_multi(&mut c).await;
    assert!(caps.iter().any(|l| l == "STLS\r\n"), "{caps:?}");
    assert!(
        !caps
            .iter()
            .any(|l| l.starts_with("USER") || l.starts_with("SASL")),
        "{caps:?}"
    );
    let r = pop(&mut c, &format!("USER {user}")).await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    let r = pop(
        &mut c,
        &format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{pw}"))),
    )
    .await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    let r = pop(
        &mut c,
        "APOP wes@example.org 0123456789abcdef0123456789abcdef",
    )
    .await;
    assert!(r.starts_with("-ERR"), "{r}");
    let r = pop(&mut c, "STAT").await;
    assert!(r.starts_with("-ERR"), "{r}");
    // STLS with USER/PASS pipelined behind it: dropped.
    c.send(format!("STLS\r\nUSER {user}\r\nPASS {pw}\r\n"))
        .await;
    let r = c.line().await.unwrap();
    assert!(r.starts_with("+OK"), "{r}");
    let mut c = c.starttls().await.unwrap();
    let r = pop(&mut c, &format!("PASS {pw}")).await;
    assert!(r.starts_with("-ERR"), "the injected USER was kept: {r}");
    assert_eq!(attempts().await, 0.0, "the injected login was acted on");
    assert!(pop(&mut c, "CAPA").await.starts_with("+OK"));
    let caps = pop_multi(&mut c).await;
    assert!(caps.iter().any(|l| l == "USER\r\n"), "{caps:?}");
    assert!(!caps.iter().any(|l| l == "STLS\r\n"), "{caps:?}");
    // Bad base64: an error, never a login attempt.
    let r = pop(&mut c, "AUTH PLAIN %%%").await;
    assert!(r.starts_with("-ERR"), "{r}");
    assert_eq!(attempts().await, 0.0);
    // Wrong password, then the right one with a command pipelined behind PASS.
    assert!(pop(&mut c, &format!("USER {user}"))
        .await
        .starts_with("+OK"));
    let r = pop(&mut c, "PASS wrong").await;
    assert_eq!(r, "-ERR [AUTH] Authentication failed.\r\n");
    assert!(pop(&mut c, &format!("USER {user}"))
        .await
        .starts_with("+OK"));
    c.send(format!("PASS {pw}\r\nSTAT\r\n")).await;
    let r = c.line().await.unwrap();
    assert!(r.starts_with("+OK"), "{r}");
    let r = c.line().await.unwrap();
    assert!(r.starts_with("+OK "), "STAT from Dovecot: {r}");
    assert!(pop(&mut c, "QUIT").await.starts_with("+OK"));

    // Implicit TLS: a huge line closes the connection.
    let mut c = Client::tls_alpn(t.addr("pop3s"), &ca, &[]).await.unwrap();
    assert!(c.line().await.unwrap().starts_with("+OK"));
    let _ = c.try_send(vec![b'A'; 1 << 20]).await;
    let r = c
        .line_within(Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert!(r.starts_with("-ERR"), "{r}");
    assert!(c.closed_within(Duration::from_secs(5)).await);
}

const PROXIED: &str = "  - { name: proxied-imap, address: \"127.0.0.1:0\", tls: implicit, proxy_protocol: true }\n  - { name: proxied-smtp, protocol: smtp, address: \"127.0.0.1:0\", tls: implicit, proxy_protocol: true, hostname: gw.example.org }";

/// One login from `client` (an IP, through a PROXY v2 header) on the IMAP or the SMTP front;
/// true when it logged in.
async fn login_as(t: &TestGateway, smtp_front: bool, client: &str, user: &str, pw: &str) -> bool {
    let listener = if smtp_front {
        "proxied-smtp"
    } else {
        "proxied-imap"
    };
    let to = t.addr(listener);
    let from: SocketAddr = format!("{client}:40000").parse().unwrap();
    // A mail client offers no ALPN; the IMAP one offers `imap`.
    let alpn: &[&[u8]] = if smtp_front { &[] } else { &[b"imap"] };
    let mut c =
        Client::tls_after_header_alpn(to, "127.0.0.1", &v2_header(from, to), &t.pki.ca_der, alpn)
            .await
            .unwrap();
    c.line().await.unwrap();
    if smtp_front {
        smtp(&mut c, "EHLO sprayer.example").await;
        let r = smtp(
            &mut c,
            &format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{pw}"))),
        )
        .await;
        r.first().is_some_and(|l| l.starts_with("235"))
    } else {
        c.send(format!("a LOGIN {user} \"{pw}\"\r\n")).await;
        c.line().await.unwrap().starts_with("a OK")
    }
}

#[tokio::test]
async fn guessing_over_smtp_and_imap_spends_the_same_budgets() {
    let Some(t) = mail_gateway(
        "postfix",
        Options {
            guard: "  trusted_proxies: [127.0.0.1]\n  tarpit: { start: 100ms, max: 400ms }\n  per_ip: { failures: 3, per: 15m }\n  per_account: { failures: 50, per: 15m }".into(),
            extra_listeners: PROXIED,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let hashes = || t.metric("imapgate_auth_hash_runs_total", &[]);
    // Four guesses from one address, alternating IMAP and SMTP: the budget of 3 is one.
    let mut checked = Vec::new();
    for (i, smtp_front) in [false, true, false, true, true, false]
        .into_iter()
        .enumerate()
    {
        let before = hashes().await;
        let ok = login_as(
            &t,
            smtp_front,
            "192.0.2.7",
            "alice@example.org",
            &format!("guess-{i}"),
        )
        .await;
        assert!(!ok);
        checked.push(hashes().await > before);
    }
    assert_eq!(checked, vec![true, true, true, true, false, false]);
    // The right password from the blocked address is refused on SMTP too, unchecked…
    let alice = t.password("alice@example.org");
    let before = hashes().await;
    assert!(!login_as(&t, true, "192.0.2.7", "alice@example.org", &alice).await);
    assert_eq!(hashes().await, before);
    // …and works from elsewhere, on both.
    assert!(login_as(&t, true, "192.0.3.7", "alice@example.org", &alice).await);
    assert!(login_as(&t, false, "192.0.3.7", "alice@example.org", &alice).await);
    assert!(
        t.metric(
            "imapgate_auth_attempts_total",
            &["protocol=\"smtp\"", "result=\"failure\""]
        )
        .await
            >= 3.0
    );

    // Spraying one password over many accounts from one /24, each guess from a new address,
    // alternating IMAP and SMTP: the spray budget (5 distinct accounts failed from one
    // subnet) counts both; the 6th guess is checked and blocks the subnet, and what comes after
    // is refused unchecked on either front.
    let mut checked = Vec::new();
    for i in 0..10 {
        let user = format!("sprayed{i}@example.org");
        let b = hashes().await;
        let smtp_front = i % 2 == 1;
        let client = format!("203.0.113.{}", i + 1);
        assert!(!login_as(&t, smtp_front, &client, &user, "Summer2026!").await);
        checked.push(hashes().await > b);
    }
    assert_eq!(
        checked,
        [true, true, true, true, true, true, false, false, false, false],
        "the 6th account guessed from the /24 is checked and blocks it; the rest are not"
    );
    assert!(
        t.metric(
            "imapgate_guard_decisions_total",
            &["action=\"reject\"", "scope=\"subnet\""]
        )
        .await
            >= 3.0
    );
}

#[tokio::test]
async fn an_unlock_earned_over_imap_holds_for_smtp_from_that_network() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    let user = "milo@example.org";
    let pw = t.password(user);
    let smtp_login = |local: &'static str, secret: String| {
        let to = t.addr("smtps");
        let ca = t.pki.ca_der.clone();
        async move {
            let mut c = Client::tls_from_alpn(to, local, &ca, &[]).await;
            c.line().await.unwrap();
            smtp(&mut c, "EHLO laptop.example").await;
            smtp(
                &mut c,
                &format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{secret}"))),
            )
            .await
            .join("")
        }
    };
    // Without a code and without an unlock: refused on SMTP.
    let r = smtp_login("127.0.0.1", pw.clone()).await;
    assert!(r.starts_with("535 5.7.8"), "{r}");
    // Password + code over IMAP unlocks this app password for 127.0.0.0/24…
    let code = t.code(user, 0);
    let r = t
        .login_from("127.0.0.1", user, &format!("{pw}{code}"))
        .await;
    assert!(r.starts_with("a OK"), "{r}");
    // …so the mail client's SMTP side logs in with the app password alone from there,
    let r = smtp_login("127.0.0.1", pw.clone()).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    // but not from another network, and the used code is refused there (used once).
    let r = smtp_login("127.0.1.1", pw.clone()).await;
    assert!(r.starts_with("535"), "{r}");
    let r = smtp_login("127.0.1.1", format!("{pw}{code}")).await;
    assert!(r.starts_with("535"), "a replayed code over SMTP: {r}");
}

#[tokio::test]
async fn a_relayed_client_cannot_speak_for_the_gateway() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    let Some(p) = postfix() else { return };
    let user = "wes@example.org";
    let plain = b64(&format!("\0{user}\0{}", t.password(user)));
    let ca = t.pki.ca_der.clone();
    let logged_in = || async {
        let mut c = Client::tls_alpn(t.addr("smtps"), &ca, &[]).await.unwrap();
        c.line().await.unwrap();
        smtp(&mut c, "EHLO laptop.example").await;
        let r = smtp(&mut c, &format!("AUTH PLAIN {plain}")).await;
        assert!(r[0].starts_with("235"), "{r:?}");
        c
    };

    // Why it matters: Postfix (3.7) checks a second XCLIENT against the address the first one
    // set. A client outside `smtpd_authorized_xclient_hosts` is refused, but one inside it (here
    // every client is on 127.0.0.0/8, as clients on an internal network may be inside a broad
    // list) would become whoever it names on the gateway's connection.
    for (addr, obeyed) in [("192.0.2.9", false), ("127.0.0.1", true)] {
        let mut direct = Client::plain(p.submission, &ca).await;
        direct.line().await.unwrap();
        smtp(&mut direct, "EHLO gateway").await;
        let r = smtp(&mut direct, &format!("XCLIENT LOGIN={user} ADDR={addr}")).await;
        assert!(r[0].starts_with("220"), "{r:?}");
        smtp(&mut direct, "EHLO gateway").await;
        let r = smtp(&mut direct, "XCLIENT LOGIN=alice@example.org").await;
        assert_eq!(
            r[0].starts_with("220"),
            obeyed,
            "second XCLIENT after ADDR={addr}: {r:?}"
        );
    }

    // Through the gateway, a later EHLO shows the backend's extensions without the gateway's
    // business, and XCLIENT ends the session before Postfix sees it.
    let mut c = logged_in().await;
    let r = smtp(&mut c, "EHLO laptop.example").await;
    let text = r.concat();
    assert!(text.starts_with("250-mx.example.org"), "{r:?}");
    assert!(text.contains("PIPELINING"), "{r:?}");
    for hidden in ["XCLIENT", "AUTH", "STARTTLS", "XFORWARD"] {
        assert!(!text.contains(hidden), "{hidden} shown after login: {r:?}");
    }
    let r = smtp(&mut c, "XCLIENT LOGIN=alice@example.org").await;
    assert_eq!(
        r,
        ["421 4.7.0 Command not allowed after authentication\r\n"]
    );
    assert!(c.closed_within(Duration::from_secs(5)).await);

    // Smuggled behind a DATA that Postfix refuses (no recipient): held until Postfix answered,
    // then read as the command it is.
    let mut c = logged_in().await;
    c.send("DATA\r\nXCLIENT LOGIN=alice@example.org\r\n").await;
    let r = reply(&mut c).await;
    assert!(r[0].starts_with("503") || r[0].starts_with("554"), "{r:?}");
    let r = reply(&mut c).await;
    assert_eq!(
        r,
        ["421 4.7.0 Command not allowed after authentication\r\n"]
    );
    assert!(c.closed_within(Duration::from_secs(5)).await);

    // A message that merely contains such a line is delivered as it is.
    let subject = marker("xclient-in-body");
    let mut c = logged_in().await;
    assert!(smtp(&mut c, &format!("MAIL FROM:<{user}>")).await[0].starts_with("250"));
    assert!(smtp(&mut c, &format!("RCPT TO:<{user}>")).await[0].starts_with("250"));
    assert!(smtp(&mut c, "DATA").await[0].starts_with("354"));
    let r = smtp(
        &mut c,
        &format!("Subject: {subject}\r\n\r\nXCLIENT LOGIN=alice@example.org\r\nAUTH PLAIN x\r\n."),
    )
    .await;
    assert!(r[0].starts_with("250"), "{r:?}");
    assert!(smtp(&mut c, "QUIT").await[0].starts_with("221"));
    let header = arrived_via_gateway(&t, user, &subject).await;
    assert!(
        header.contains(&format!("(Authenticated sender: {user})")),
        "{header}"
    );
}

#[tokio::test]
async fn tokens_log_in_over_smtp_and_pop3_and_a_bad_one_gets_the_challenge() {
    let Some(t) = mail_gateway(
        "postfix",
        Options {
            oauth: Some(""),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let Some(idp) = idp() else { return };
    let token = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    let xoauth2 =
        |user: &str, token: &str| b64(&format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    let ca = t.pki.ca_der.clone();

    // SMTP: offered after TLS, a good token logs in, a token for someone else gets the
    // RFC 7628 challenge, then 535.
    let mut c = Client::tls_alpn(t.addr("smtps"), &ca, &[]).await.unwrap();
    c.line().await.unwrap();
    let r = smtp(&mut c, "EHLO laptop.example").await;
    assert!(
        r.iter()
            .any(|l| l.contains("AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER")),
        "{r:?}"
    );
    let r = smtp(
        &mut c,
        &format!("AUTH XOAUTH2 {}", xoauth2("bob@example.org", &token)),
    )
    .await;
    assert!(r[0].starts_with("334 "), "{r:?}");
    let challenge = {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(r[0].trim_end().trim_start_matches("334 "))
            .unwrap();
        String::from_utf8(raw).unwrap()
    };
    assert!(challenge.contains("\"status\""), "{challenge}");
    let r = smtp(&mut c, "").await;
    assert!(r[0].starts_with("535 5.7.8"), "{r:?}");
    let r = smtp(
        &mut c,
        &format!("AUTH XOAUTH2 {}", xoauth2("alice@example.org", &token)),
    )
    .await;
    assert!(r[0].starts_with("235 2.7.0"), "{r:?}");
    assert!(smtp(&mut c, "MAIL FROM:<alice@example.org>").await[0].starts_with("250"));
    smtp(&mut c, "QUIT").await;

    // POP3: SASL XOAUTH2 with an initial response.
    let mut c = Client::tls_alpn(t.addr("pop3s"), &ca, &[]).await.unwrap();
    c.line().await.unwrap();
    let r = pop(
        &mut c,
        &format!("AUTH XOAUTH2 {}", xoauth2("alice@example.org", &token)),
    )
    .await;
    assert!(r.starts_with("+OK"), "{r}");
    let r = pop(&mut c, "STAT").await;
    assert!(r.starts_with("+OK "), "{r}");
    pop(&mut c, "QUIT").await;
    assert!(
        t.metric(
            "imapgate_auth_attempts_total",
            &[
                "mechanism=\"xoauth2\"",
                "protocol=\"smtp\"",
                "result=\"success\""
            ]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn doctor_checks_the_smtp_and_pop3_backends() {
    let Some(t) = mail_gateway("postfix", Options::default()).await else {
        return;
    };
    let config = t.config_path.clone();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["doctor", "-c"])
        .arg(&config)
        .args(["--user", "wes@example.org"])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for (backend, done) in [
        ("postfix", "handed over as wes@example.org with XCLIENT"),
        ("dovecot-submission", "logged in as wes@example.org"),
        ("dovecot-pop3", "logged in as wes@example.org"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("[ok]   backend {backend} ")) && l.contains(done)),
            "{backend}: {text}"
        );
    }
    assert!(text.contains("XCLIENT offered to the gateway"), "{text}");
    assert!(text.contains("(smtp "), "{text}");
    assert!(text.contains("(pop3 "), "{text}");
    assert!(!text.contains(&t.password("wes@example.org")), "{text}");
}
