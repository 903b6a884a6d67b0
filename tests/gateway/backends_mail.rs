//! The mail backends the SMTP and POP3 fronts (issue 21) are tested against, checked on their
//! own with real clients and no gateway: the harness's Postfix (MX-style smtpd, and the
//! XCLIENT port a gateway hands the login to) delivering through Dovecot's LMTP, Dovecot's
//! POP3 (RFC 1939 / 2595 / 5034) with the master user, and Dovecot's submission service
//! (RFC 6409) relaying to Postfix. Each test uses a mailbox of its own (`MAIL_USERS`) and a
//! unique subject, and reads what arrived back over IMAP straight from Dovecot.

use std::process::Command;
use std::time::Duration;

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

/// Runs python3 with `script` and `args`; (exit status ok, stdout + stderr).
fn python(script: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Waits (up to 20 s) until a message with `subject` is in `user`'s INBOX on Dovecot (master
/// login over IMAPS); returns its header. Panics with Postfix's log when it never comes.
async fn arrived(d: &Dovecot, user: &str, subject: &str, postfix: Option<&Postfix>) -> String {
    for _ in 0..80 {
        let mut c = dovecot_direct(d, user).await;
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
    panic!(
        "no message \"{subject}\" for {user} after 20 s; postfix log:\n{}",
        postfix.map(Postfix::log).unwrap_or_default()
    );
}

const SMTPLIB_SEND: &str = r#"
import smtplib, sys
port, sender, rcpt, subject = sys.argv[1:5]
s = smtplib.SMTP("127.0.0.1", int(port), timeout=20)
s.ehlo("client.example.net")
refused = s.sendmail(sender, [rcpt], "From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\nhello\r\n" % (sender, rcpt, subject))
assert refused == {}, refused
s.quit()
print("sent")
"#;

#[tokio::test]
async fn smtplib_to_postfix_smtpd_arrives_in_the_inbox_through_lmtp() {
    let Some(p) = postfix() else { return };
    let Some(d) = dovecot() else { return };
    if !have("python3") {
        return;
    }
    eprintln!("postfix start-up took {:?}", p.started_in);
    let user = MAIL_USERS[0];
    let subject = marker("mx");
    let port = p.smtp.port().to_string();
    let (ok, out) = python(
        SMTPLIB_SEND,
        &[&port, "someone@example.net", user, &subject],
    );
    assert!(ok, "smtplib: {out}");
    let header = arrived(&d, user, &subject, Some(&p)).await;
    // Postfix received it, Dovecot's LMTP stored it.
    assert!(
        header.contains("by mx.example.org (Postfix) with ESMTP"),
        "{header}"
    );
    assert!(header.contains("with LMTP"), "{header}");
}

const XCLIENT: &str = r#"
import smtplib, sys
port, login, subject = sys.argv[1:4]
s = smtplib.SMTP("127.0.0.1", int(port), timeout=20)
code, ehlo = s.ehlo("gateway.example.net")
print("EHLO", code, ehlo.decode())
code, reply = s.docmd("XCLIENT", "LOGIN=%s ADDR=192.0.2.1" % login)
print("XCLIENT", code, reply.decode())
if code != 220:
    sys.exit(2)
# XCLIENT resets the session (Postfix answers with a new greeting): EHLO again.
s.ehlo("client.example.net")
refused = s.sendmail(login, [login], "From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\nhello\r\n" % (login, login, subject))
assert refused == {}, refused
s.quit()
print("sent")
"#;

#[tokio::test]
async fn xclient_on_postfix_submission_port_hands_over_login_and_client_address() {
    let Some(p) = postfix() else { return };
    let Some(d) = dovecot() else { return };
    if !have("python3") {
        return;
    }
    let user = MAIL_USERS[1];
    let subject = marker("xclient");
    let (ok, out) = python(XCLIENT, &[&p.submission.port().to_string(), user, &subject]);
    assert!(ok, "xclient: {out}");
    assert!(out.contains("XCLIENT 220"), "{out}");
    assert!(out.contains("LOGIN"), "EHLO offers XCLIENT LOGIN: {out}");
    assert!(
        out.contains("STARTTLS"),
        "the gateway's port offers STARTTLS: {out}"
    );
    let header = arrived(&d, user, &subject, Some(&p)).await;
    // The Received header names the client and the login XCLIENT supplied, not 127.0.0.1.
    assert!(header.contains("[192.0.2.1]"), "{header}");
    assert!(
        header.contains(&format!("(Authenticated sender: {user})")),
        "{header}"
    );
    assert!(header.contains("with ESMTPA"), "{header}");
    let log = p.log();
    assert!(
        log.contains(&format!(
            "client=unknown[192.0.2.1], sasl_method=XCLIENT, sasl_username={user}"
        )),
        "{log}"
    );
    // The MX-style port is not the gateway's: XCLIENT is refused there.
    let (ok, out) = python(XCLIENT, &[&p.smtp.port().to_string(), user, &subject]);
    assert!(!ok && out.contains("XCLIENT 550"), "{out}");
}

const POPLIB: &str = r#"
import base64, poplib, ssl, sys
pop3s, pop3, ca, user, master, master_pw, subject = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)

def find(p):
    count, _ = p.stat()
    listing = p.list()[1]
    print("LIST", listing)
    for n in range(1, count + 1):
        lines = p.retr(n)[1]
        if any(subject.encode() in l for l in lines):
            return True
    return False

# Implicit TLS (995-style), USER/PASS with user*master.
p = poplib.POP3_SSL("localhost", int(pop3s), context=ctx, timeout=20)
p.user("%s*%s" % (user, master))
p.pass_(master_pw)
assert find(p), "implicit TLS: message not found"
p.quit()

# 110-style: CAPA offers STLS; after STLS, AUTH PLAIN (RFC 5034) with the master user as
# authcid and the user as authzid, initial response on the command line.
p = poplib.POP3("localhost", int(pop3), timeout=20)
caps = p.capa()
print("CAPA", sorted(caps))
assert "STLS" in caps, caps
p.stls(context=ctx)
cred = base64.b64encode(("%s\0%s\0%s" % (user, master, master_pw)).encode()).decode()
print("AUTH", p._shortcmd("AUTH PLAIN " + cred).decode())
assert find(p), "STLS + AUTH PLAIN: message not found"
p.quit()

# A wrong master password is refused.
p = poplib.POP3_SSL("localhost", int(pop3s), context=ctx, timeout=20)
p.user("%s*%s" % (user, master))
try:
    p.pass_("wrong-" + master_pw)
    print("wrong password accepted")
    sys.exit(3)
except poplib.error_proto as e:
    print("wrong password refused:", e)
print("ok")
"#;

#[tokio::test]
async fn dovecot_pop3_master_login_with_poplib_curl_and_fetchmail() {
    let Some(d) = dovecot() else { return };
    if !have("python3") || !have("curl") || !have("fetchmail") {
        return;
    }
    let user = MAIL_USERS[2];
    let subject = marker("pop3");
    append_direct(
        &d,
        user,
        format!("From: a@example.net\r\nSubject: {subject}\r\n\r\nover POP3\r\n").as_bytes(),
    )
    .await;
    let ca = d.pki.ca_pem.display().to_string();
    let login = format!("{user}*{}", d.master_user);

    // Python's poplib: implicit TLS, STLS + AUTH PLAIN with authzid, a wrong password.
    let (ok, out) = python(
        POPLIB,
        &[
            &d.pop3s.port().to_string(),
            &d.pop3.port().to_string(),
            &ca,
            user,
            &d.master_user,
            &d.master_password,
            &subject,
        ],
    );
    assert!(ok && out.contains("\nok"), "poplib: {out}");

    // curl pop3s://: LIST, then RETR of message 1 (the mailbox holds only this one).
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert", &ca, "--user"])
            .arg(format!("{login}:{}", d.master_password))
            .arg(format!("pop3s://localhost:{}/{path}", d.pop3s.port()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = curl("");
    assert!(ok && out.starts_with("1 "), "curl LIST: {out}");
    let (ok, out) = curl("1");
    assert!(ok && out.contains(&subject), "curl RETR: {out}");

    // fetchmail over implicit TLS, verifying Dovecot's certificate with the test CA, keeping
    // the message on the server and handing it to an MDA that appends it to a file.
    let home = tempfile::tempdir().unwrap();
    let got = home.path().join("fetched.mbox");
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "poll localhost service {port} protocol pop3 timeout 20\n  user \"{login}\" password \"{pw}\"\n",
            port = d.pop3s.port(),
            pw = d.master_password,
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = Command::new("fetchmail")
        .env("HOME", home.path())
        .env("FETCHMAILHOME", home.path())
        .arg("-f")
        .arg(&rc)
        .args(["--ssl", "--sslcertck", "--sslcertfile", &ca])
        .args(["-k", "-a", "--nosyslog", "-v", "--mda"])
        .arg(format!("/bin/sh -c 'cat >> {}'", got.display()))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fetchmail: {text}");
    let fetched = std::fs::read_to_string(&got).unwrap_or_default();
    assert!(
        fetched.contains(&subject),
        "fetchmail: {text}\nfile: {fetched}"
    );
    // Kept (-k): still there for the next client.
    let (ok, out) = curl("1");
    assert!(ok && out.contains(&subject), "after fetchmail -k: {out}");
}

const AUTHZID_SUBMIT: &str = r#"
import base64, smtplib, ssl, sys
port, ca, user, master, master_pw, subject = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP_SSL("localhost", int(port), context=ctx, timeout=20)
s.ehlo("client.example.net")
cred = base64.b64encode(("%s\0%s\0%s" % (user, master, master_pw)).encode()).decode()
code, reply = s.docmd("AUTH", "PLAIN " + cred)
print("AUTH", code, reply.decode())
assert code == 235, code
refused = s.sendmail(user, [user], "From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\nhello\r\n" % (user, user, subject))
assert refused == {}, refused
s.quit()
print("sent")
"#;

#[tokio::test]
async fn dovecot_submission_with_swaks_and_authzid_relays_through_postfix() {
    let Some(p) = postfix() else { return };
    let Some(d) = dovecot() else { return };
    if !have("swaks") || !have("python3") {
        return;
    }
    let user = MAIL_USERS[3];
    let ca = d.pki.ca_pem.display().to_string();

    // swaks over implicit TLS (465-style), certificate verified, AUTH PLAIN as user*master.
    let subject = marker("swaks");
    let out = Command::new("swaks")
        .args(["--server", "localhost", "--port"])
        .arg(d.submissions.port().to_string())
        .args(["--tls-on-connect", "--tls-verify", "--tls-ca-path", &ca])
        .args(["--auth", "PLAIN", "--auth-user"])
        .arg(format!("{user}*{}", d.master_user))
        .args(["--auth-password", &d.master_password])
        .args(["--from", user, "--to", user, "--header"])
        .arg(format!("Subject: {subject}"))
        .args(["--timeout", "20"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "swaks: {text}");
    assert!(text.contains("235 2.7.0"), "{text}");
    let header = arrived(&d, user, &subject, Some(&p)).await;
    // Dovecot's submission service took it (authenticated), Postfix relayed it to LMTP.
    assert!(header.contains("with ESMTPSA"), "{header}");
    assert!(header.contains("by mx.example.org (Postfix)"), "{header}");

    // AUTH PLAIN with the master user as authcid and the user as authzid.
    let subject = marker("authzid");
    let (ok, out) = python(
        AUTHZID_SUBMIT,
        &[
            &d.submissions.port().to_string(),
            &ca,
            user,
            &d.master_user,
            &d.master_password,
            &subject,
        ],
    );
    assert!(ok, "smtplib authzid: {out}");
    arrived(&d, user, &subject, Some(&p)).await;

    // Without a login, Dovecot's submission refuses MAIL FROM (RFC 6409: submission needs
    // authentication).
    let out = Command::new("swaks")
        .args(["--server", "localhost", "--port"])
        .arg(d.submissions.port().to_string())
        .args(["--tls-on-connect", "--tls-verify", "--tls-ca-path", &ca])
        .args(["--from", user, "--to", user, "--timeout", "20"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "unauthenticated submission accepted: {text}"
    );
}
