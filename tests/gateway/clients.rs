//! Real clients end to end against the real binary (`imapgate run`): curl and Python's
//! imaplib over implicit TLS and STARTTLS. The binary's logs are then searched for every
//! secret the test used: none may appear (invariant 8).

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

fn read(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

const PY: &str = r#"
import imaplib, ssl, sys
mode, host, port, ca, user, pw = sys.argv[1:7]
if len(sys.argv) > 7:
    # RFC 6238 in a few lines: HMAC-SHA1 over the 30-second counter, dynamic truncation.
    import base64, hashlib, hmac, struct, time
    key = base64.b32decode(sys.argv[7] + "=" * (-len(sys.argv[7]) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
    off = mac[-1] & 15
    pw += "%06d" % ((struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000)
ctx = ssl.create_default_context(cafile=ca)
if mode == "ssl":
    m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
else:
    m = imaplib.IMAP4(host, int(port))
    try:
        m.login(user, pw)
        print("cleartext login accepted"); sys.exit(3)
    except imaplib.IMAP4.error as e:
        print("cleartext refused:", e)
    m.starttls(ssl_context=ctx)
typ, data = m.login(user, pw)
assert typ == "OK", (typ, data)
typ, data = m.select("INBOX")
assert typ == "OK", (typ, data)
typ, data = m.list()
print("LIST", data)
m.logout()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_and_python_imaplib_through_the_real_binary_and_no_secret_in_any_log() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    if !have("curl") || !have("python3") {
        return;
    }
    let b = start_binary(&t);
    let ca = t.pki.ca_pem.display().to_string();
    let user = "alice@example.org";
    let pw = t.password(user);
    let wrong = "qqqq wwww eeee rrrr";

    // curl, implicit TLS, verifying the gateway's certificate.
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        &format!("imaps://localhost:{}/", b.imaps),
        "--user",
        &format!("{user}:{pw}"),
    ]);
    assert!(ok && out.contains("INBOX"), "curl imaps: {out}");
    // curl over STARTTLS.
    let (ok, out) = curl(&[
        "--ssl-reqd",
        "--cacert",
        &ca,
        &format!("imap://localhost:{}/", b.imap),
        "--user",
        &format!("{user}:{pw}"),
    ]);
    assert!(ok && out.contains("INBOX"), "curl starttls: {out}");
    // curl with a wrong password is refused.
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        &format!("imaps://localhost:{}/", b.imaps),
        "--user",
        &format!("{user}:{wrong}"),
    ]);
    assert!(!ok, "wrong password accepted: {out}");
    // curl without TLS on the STARTTLS port cannot log in.
    let (ok, out) = curl(&[
        &format!("imap://localhost:{}/", b.imap),
        "--user",
        &format!("{user}:{pw}"),
    ]);
    assert!(!ok, "cleartext login accepted: {out}");

    // Python imaplib: IMAP4_SSL, and IMAP4 + starttls (cleartext login refused first).
    for (mode, port) in [("ssl", b.imaps), ("starttls", b.imap)] {
        let out = Command::new("python3")
            .args([
                "-c",
                PY,
                mode,
                "localhost",
                &port.to_string(),
                &ca,
                user,
                &pw,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("ok"),
            "imaplib {mode}: {text}"
        );
        if mode == "starttls" {
            assert!(text.contains("PRIVACYREQUIRED"), "{text}");
        }
    }

    // imaplib with app password + a TOTP code it computes itself (an enrolled user).
    let mfa_user = "mia@example.org";
    let b32 = imapgate::auth::totp::base32(&t.totp.iter().find(|(u, _)| u == mfa_user).unwrap().1);
    let out = Command::new("python3")
        .args([
            "-c",
            PY,
            "ssl",
            "localhost",
            &b.imaps.to_string(),
            &ca,
            mfa_user,
            &t.password(mfa_user),
            &b32,
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("ok"),
        "imaplib with TOTP: {text}"
    );

    // Every failure path, each with a secret of its own that must appear in no log.
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", b.imaps).parse().unwrap();
    let mia_pw = t.password(mfa_user).replace(' ', "");
    let zed_pw = t.password("zed@down.test");
    let disabled_pw = t.password("disabled@example.org");
    let mut secrets: Vec<String> = vec![
        format!("{mia_pw}{}", t.code(mfa_user, 40)), // valid app password, wrong code
        format!("{mia_pw}{}", t.code(mfa_user, 0)),  // a code already used by imaplib
        "unknown-users-secret-1".into(),
        zed_pw.clone(),
        disabled_pw.clone(),
        "authzid-mismatch-secret-2".into(),
        "malformed-plain-secret-3".into(),
    ];
    let commands = [
        format!("LOGIN {mfa_user} \"{}\"", secrets[0]),
        format!("LOGIN {mfa_user} \"{}\"", secrets[1]),
        format!("LOGIN ghost@example.org \"{}\"", secrets[2]),
        format!("LOGIN zed@down.test \"{zed_pw}\""),
        format!("LOGIN disabled@example.org \"{disabled_pw}\""),
        format!(
            "AUTHENTICATE PLAIN {}",
            b64(format!("bob@example.org\0{user}\0{}", secrets[5]))
        ),
        format!(
            "AUTHENTICATE PLAIN {}",
            b64(format!("{}\0\0\0", secrets[6]))
        ),
    ];
    // Enough distinct guesses from one address for the guard to block it.
    for i in 0..12 {
        secrets.push(format!("brute-force-guess-{i}"));
    }
    let guesses: Vec<String> = secrets[7..]
        .iter()
        .map(|g| format!("LOGIN bob@example.org \"{g}\""))
        .collect();
    for (i, cmd) in commands.iter().chain(guesses.iter()).enumerate() {
        // The TOTP cases from another /24: 127.0.0.0/24 is unlocked for mia by now.
        let from = if i < 2 { "127.0.5.1" } else { "127.0.0.1" };
        let mut c = Client::tls_from(addr, from, &t.pki.ca_der).await;
        c.line().await.unwrap();
        let r = c.cmd("f", cmd).await;
        assert!(last(&r).starts_with("f NO"), "{cmd}: {r:?}");
    }

    // Metrics from the real binary.
    let (code, metrics) = http_get(
        format!("127.0.0.1:{}", b.admin).parse().unwrap(),
        "/metrics",
    )
    .await;
    assert_eq!(code, 200);
    // Invariant 12: no user name, address or secret in any metric.
    for leak in [user, "127.0.0.1", "localhost", pw.as_str()] {
        assert!(!metrics.contains(leak), "{leak} in /metrics");
    }
    assert!(
        metrics.contains("imapgate_auth_attempts_total{mechanism=\"plain\",protocol=\"imap\",result=\"success\"}")
            || metrics
                .contains("imapgate_auth_attempts_total{mechanism=\"login\",protocol=\"imap\",result=\"success\"}"),
        "{metrics}"
    );

    // SIGHUP reloads certificates and users and reopens the audit file (logrotate moved it);
    // the process keeps serving.
    let audit = b.dir.path().join("audit.log");
    std::fs::rename(&audit, b.dir.path().join("audit.log.1")).unwrap();
    let pid = b.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    for _ in 0..50 {
        if read(&b.dir.path().join("stderr.log")).contains("certificates reloaded") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reloaded,
        "SIGHUP did not reload: {}",
        read(&b.dir.path().join("stderr.log"))
    );
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        &format!("imaps://localhost:{}/", b.imaps),
        "--user",
        &format!("{user}:{pw}"),
    ]);
    assert!(ok && out.contains("INBOX"), "after SIGHUP: {out}");
    let mut reopened = false;
    for _ in 0..50 {
        if read(&audit).contains("\"result\":\"success\"") {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened, "the audit file was not reopened after SIGHUP");
    assert!(read(&b.dir.path().join("audit.log.1")).contains("\"event\":\"auth\""));

    // SIGTERM ends it cleanly.
    let pid = b.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut b = b;
    let mut exited = false;
    for _ in 0..100 {
        if let Ok(Some(status)) = b.child.try_wait() {
            assert!(status.success(), "exit status {status}");
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(exited, "did not exit after SIGTERM");

    // Invariant 8: no secret in the operational log, the audit log or stdout.
    let logs = read(&b.dir.path().join("stderr.log")) + &read(&b.dir.path().join("stdout.log"));
    // Both files: the one rotated away and the one reopened.
    let audit = read(&b.dir.path().join("audit.log.1")) + &read(&b.dir.path().join("audit.log"));
    assert!(audit.lines().count() >= 5, "audit log too short: {audit}");
    assert!(
        audit.lines().all(|l| l.starts_with('{')
            && (l.contains("\"event\":\"auth\"") || l.contains("\"event\":\"guard\""))),
        "{audit}"
    );
    for reason in [
        "bad_code",
        "code_replayed",
        "unknown_user",
        "disabled",
        "malformed",
    ] {
        assert!(
            audit.contains(&format!("\"reason\":\"{reason}\"")),
            "no {reason} in {audit}"
        );
    }
    assert!(audit.contains("\"result\":\"unavailable\""), "{audit}");
    // The leaked-app-password signal names the app password, so that it can be revoked.
    let mia_ap = imapgate::auth::users::UsersFile::load(&t.users_file)
        .unwrap()
        .users[mfa_user]
        .app_passwords[0]
        .id
        .clone();
    assert!(
        audit.lines().any(|l| l.contains("\"reason\":\"bad_code\"")
            && l.contains(&format!("\"credential\":\"{mia_ap}\""))),
        "{audit}"
    );
    assert!(audit.contains("\"action\":\"block\""), "{audit}");
    assert!(
        audit.contains("\"result\":\"success\"") && audit.contains("\"result\":\"failure\""),
        "{audit}"
    );
    assert!(logs.contains("logged in"), "debug log missing: {logs}");
    let master = t.dovecot.master_password.clone();
    for secret in [
        pw.as_str(),
        &pw.replace(' ', ""),
        wrong,
        &wrong.replace(' ', ""),
        master.as_str(),
    ]
    .into_iter()
    .chain(secrets.iter().map(String::as_str))
    {
        assert!(
            !logs.contains(secret) && !audit.contains(secret),
            "secret {secret:?} found in a log"
        );
    }
    // SASL payloads (base64 of user\0user\0password, as curl sends) never appear either.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}\0{user}\0{pw}"));
    assert!(!logs.contains(&b64) && !audit.contains(&b64));
    assert!(
        !logs.contains("\"audit\"") && !logs.contains("\"event\":\"auth\""),
        "audit events leaked into the operational log"
    );
}
