//! Sign-in approval from the portal (`auth.mfa.approval: portal`): what a mail client, the
//! person and an attacker holding an app password each notice. Every failed password login
//! gets the same `[ALERT]`; only a right app password without a code records a pending
//! sign-in (and fires the webhook once); approving it lets that network in without a code,
//! once; denying it keeps that network out, code or not; caps hold.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Client, Options, TestGateway, TestStore};
use crate::portal::{text_of, Browser};

/// The webhook's shared secret in these tests.
const HOOK_SECRET: &str = "webhook-secret-0123456789abcdef";

/// A real HTTP receiver on loopback: every request's headers and body.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    pub got: Arc<Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    pub(crate) async fn start() -> (Receiver, String) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let r = Receiver::default();
        let got = r.got.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let got = got.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n =
                            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                                .await
                            {
                                Ok(Ok(n)) if n > 0 => n,
                                _ => return,
                            };
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse().ok())?
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                got.lock().unwrap().push((head.to_owned(), body.to_owned()));
                                let _ = s
                                    .write_all(
                                        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
                                    )
                                    .await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (r, url)
    }

    pub(crate) fn events(&self) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(head, body)| {
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default()
                };
                let ts: i64 = header("x-imapgate-timestamp").parse().unwrap();
                assert_eq!(
                    header("x-imapgate-signature"),
                    imapgate::auth::approval::signature(
                        HOOK_SECRET.as_bytes(),
                        ts,
                        body.as_bytes()
                    ),
                    "the webhook's signature does not verify"
                );
                serde_json::from_str(body).unwrap()
            })
            .collect()
    }
}

pub(crate) async fn approval_gateway(extra_mfa: &str) -> Option<(TestGateway, Receiver)> {
    let (hook, url) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    crate::harness::write_secret(&secret, HOOK_SECRET);
    let mfa = format!(
        "{{ default: optional, approval: portal, approval_webhook_url: \"{url}\", approval_webhook_secret_file: \"{}\"{extra_mfa} }}",
        secret.display()
    );
    let t = TestGateway::start_with(Options {
        store: TestStore::Sqlite,
        portal: Some(""),
        mfa: Box::leak(mfa.into_boxed_str()),
        ..Default::default()
    })
    .await?;
    // The secret file must outlive the start only.
    drop(dir);
    Some((t, hook))
}

/// Every line of one LOGIN from `local`.
async fn login_lines(t: &TestGateway, local: &str, user: &str, password: &str) -> Vec<String> {
    let mut c = Client::tls_from(t.imaps(), local, &t.pki.ca_der).await;
    let g = c.line().await.unwrap();
    assert!(g.starts_with("* OK"), "{g}");
    c.cmd("a", &format!("LOGIN {user} \"{password}\"")).await
}

fn code_now(t: &TestGateway, user: &str) -> String {
    t.code(user, 0)
}

#[tokio::test]
async fn approving_lets_that_network_in_once_and_denying_keeps_it_out() {
    let Some((t, hook)) = approval_gateway("").await else {
        return;
    };
    let mia = "mia@example.org";
    let pw = t.password(mia);

    // Three failures a client cannot tell apart: unknown user, wrong password, right app
    // password without a code. Each gets the same ALERT and the same tagged NO.
    let unknown = login_lines(&t, "127.0.5.1", "nobody@example.org", &pw).await;
    let wrong = login_lines(&t, "127.0.5.1", mia, "abcdabcdabcdabcd").await;
    let pending = login_lines(&t, "127.0.5.1", mia, &pw).await;
    assert_eq!(unknown, wrong);
    assert_eq!(wrong, pending);
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(pending[0].starts_with("* NO [ALERT] "), "{pending:?}");
    assert!(pending[0].contains(t.portal_url.as_deref().unwrap()));
    assert!(pending[1].starts_with("a NO [AUTHENTICATIONFAILED]"));

    // Only the right app password made a pending sign-in, and the webhook heard of it once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = hook.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["user"], mia);
    assert_eq!(events[0]["address"], "127.0.5.1");
    assert_eq!(events[0]["network"], "127.0.5.0/24");
    assert!(!events[0].to_string().contains(&pw.replace(' ', "")));
    // The client retrying adds nothing.
    login_lines(&t, "127.0.5.1", mia, &pw).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.events().len(), 1);

    let mut b = Browser::new(&t);
    b.sign_in_as(&t, mia, false, 0);
    let page = b.get("/").await;
    assert_eq!(
        page.body.matches("data-approval=").count(),
        1,
        "{}",
        page.body
    );
    assert!(page.body.contains("data-address=\"127.0.5.1\""));
    let id = events[0]["id"].as_str().unwrap().to_owned();
    // The fragment the page refreshes from says the same.
    let frag = b.get("/approvals/fragment").await;
    assert!(frag.body.contains(&id));

    // A stale portal sign-in cannot approve.
    let mut stale = Browser::new(&t);
    stale.sign_in_as(&t, mia, false, 3600);
    let r = stale.post(&format!("/approvals/{id}/approve"), &[]).await;
    assert!(
        r.location().starts_with("/login?reauth=1"),
        "{}",
        r.location()
    );

    let r = b.post(&format!("/approvals/{id}/approve"), &[]).await;
    assert_eq!(r.location(), "/?notice=approved");
    // That network now gets in without a code; another network does not.
    let ok = login_lines(&t, "127.0.5.1", mia, &pw).await;
    assert!(ok.last().unwrap().starts_with("a OK"), "{ok:?}");
    let other = login_lines(&t, "127.0.6.1", mia, &pw).await;
    assert!(other.last().unwrap().starts_with("a NO"), "{other:?}");
    // Approving twice does nothing more.
    let r = b.post(&format!("/approvals/{id}/approve"), &[]).await;
    assert_eq!(r.location(), "/?notice=approval_gone");
    assert_eq!(t.metric("imapgate_signin_approved_total", &[]).await, 1.0);

    // Deny the other network's: it stays refused, even with a valid code.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = hook.events();
    assert_eq!(second.len(), 2, "{second:?}");
    let id2 = second[1]["id"].as_str().unwrap().to_owned();
    // The helpdesk sees it but cannot approve it (there is no such action).
    let mut desk = Browser::new(&t);
    desk.sign_in_as(&t, "hanna@example.org", true, 0);
    let view = desk.get("/admin/users/mia%40example.org").await;
    assert!(
        view.body.contains(&id2) && !view.body.contains("class=\"approve"),
        "{}",
        view.body
    );
    let r = desk
        .post(
            &format!("/admin/users/mia%40example.org/approvals/{id2}/approve"),
            &[],
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(b.get("/").await.body.contains(&id2));
    let r = b.post(&format!("/approvals/{id2}/deny"), &[]).await;
    assert_eq!(r.location(), "/?notice=denied");
    let with_code = login_lines(
        &t,
        "127.0.6.1",
        mia,
        &format!("{}{}", pw.replace(' ', ""), code_now(&t, mia)),
    )
    .await;
    assert!(
        with_code.last().unwrap().starts_with("a NO"),
        "{with_code:?}"
    );
    assert_eq!(t.metric("imapgate_signin_denied_total", &[]).await, 1.0);
    // The helpdesk sees the block and can clear it.
    let admin = desk.get("/admin").await;
    assert!(admin.body.contains("account_network"), "{}", admin.body);
    assert!(admin.body.contains("127.0.6.0"), "{}", admin.body);
    let person = desk.get("/admin/users/mia%40example.org").await;
    assert!(
        text_of(&person.body, "guard")
            .unwrap()
            .contains("127.0.6.0"),
        "the person's helpdesk page does not list the denied network"
    );
    // With the authenticator removed (mfa optional: no code needed any more), the denied
    // network is still refused.
    let r = desk
        .post("/admin/users/mia%40example.org/totp-reset", &[])
        .await;
    assert_eq!(r.status, 303);
    let bare = login_lines(&t, "127.0.6.1", mia, &pw).await;
    assert!(bare.last().unwrap().starts_with("a NO"), "{bare:?}");
    let elsewhere = login_lines(&t, "127.0.7.1", mia, &pw).await;
    assert!(
        elsewhere.last().unwrap().starts_with("a OK"),
        "{elsewhere:?}"
    );
    assert!(!text_of(&page.body, "approvals")
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test]
async fn pending_sign_ins_are_capped_per_account() {
    let Some((t, hook)) = approval_gateway(", approval_max_pending: 2").await else {
        return;
    };
    let mia = "mia@example.org";
    let pw = t.password(mia);
    for i in 1..=5 {
        login_lines(&t, &format!("127.0.{}.1", 10 + i), mia, &pw).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.events().len(), 2);
    assert_eq!(
        t.metric("imapgate_signin_pending_total", &["result=\"dropped\""])
            .await,
        3.0
    );
    let mut b = Browser::new(&t);
    b.sign_in_as(&t, mia, false, 0);
    assert_eq!(b.get("/").await.body.matches("data-approval=").count(), 2);
}

#[tokio::test]
async fn one_network_can_ask_only_so_often_and_never_for_an_account_under_attack() {
    let Some((t, hook)) = approval_gateway(", approval_per_source: 1").await else {
        return;
    };
    // Per source: one request from 127.0.30.0/24 within the window, whoever asks.
    login_lines(
        &t,
        "127.0.30.1",
        "max@example.org",
        &t.password("max@example.org"),
    )
    .await;
    login_lines(
        &t,
        "127.0.30.2",
        "mo@example.org",
        &t.password("mo@example.org"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.events().len(), 1);
    assert_eq!(
        t.metric("imapgate_signin_pending_total", &["result=\"dropped\""])
            .await,
        1.0
    );
    // Attack mode on mia (wrong passwords from several networks): a code-less login with the
    // right app password asks nobody, and still gets the ALERT like any failure.
    // Different wrong passwords (the same one repeated counts once), one per network (each
    // network counts for at most a quarter of the account's budget of 10).
    for i in 0..12 {
        let guess = format!("guess{i:02}guessguess");
        login_lines(&t, &format!("127.1.{i}.1"), "mia@example.org", &guess).await;
    }
    let lines = login_lines(
        &t,
        "127.0.50.1",
        "mia@example.org",
        &t.password("mia@example.org"),
    )
    .await;
    assert!(lines[0].starts_with("* NO [ALERT]"), "{lines:?}");
    assert!(
        t.metric(
            "imapgate_guard_decisions_total",
            &["action=\"require_code\""]
        )
        .await
            >= 1.0,
        "the account was not in attack mode"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hook.events().len(),
        1,
        "a request was made under attack mode"
    );
}

#[tokio::test]
async fn without_approval_no_alert_is_sent() {
    let Some(t) = crate::portal::portal_gateway("").await else {
        return;
    };
    let lines = login_lines(
        &t,
        "127.0.5.1",
        "mia@example.org",
        &t.password("mia@example.org"),
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("a NO [AUTHENTICATIONFAILED]"));
}

/// Enrols `user`'s TOTP through the admin API (as an operator would); returns the secret.
async fn enrol_totp(t: &TestGateway, user: &str) -> imapgate::secret::Secret {
    let http = reqwest::Client::new();
    let base = format!(
        "http://{}/api/v1/users/{}",
        t.gw.admin,
        user.replace('@', "%40")
    );
    let begun: serde_json::Value = http
        .post(format!("{base}/totp/enrolment"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = begun["otpauth_uri"].as_str().unwrap();
    let b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let secret = imapgate::secret::Secret::new(crate::portal::base32_decode(b32));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = imapgate::auth::totp::code_at(&secret, now, 6).unwrap();
    let r = http
        .post(format!("{base}/totp/confirmation"))
        .bearer_auth(crate::harness::ADMIN_TOKEN)
        .json(&serde_json::json!({ "enrolment": begun["enrolment"], "code": code }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    secret
}

/// Issue 20's path in a real browser (tests/browser/approval_e2e.py): curl without a code from
/// a new network is refused with the ALERT, the person approves it in the portal (the list
/// refreshed without a reload) and the same login then works; another network is denied and
/// stays refused; a wrong app password makes no pending sign-in; the webhook got exactly the
/// two pending sign-ins.
#[tokio::test]
async fn approving_and_denying_in_a_real_browser() {
    let python = match std::env::var("IMAPGATE_BROWSER_PYTHON") {
        Ok(p) if std::path::Path::new(&p).exists() => p,
        _ => {
            assert!(
                !crate::harness::require_real(),
                "IMAPGATE_BROWSER_PYTHON (the Playwright venv scripts/test.sh makes) is required"
            );
            eprintln!("skipping: IMAPGATE_BROWSER_PYTHON is not set");
            return;
        }
    };
    let Some((t, hook)) = approval_gateway("").await else {
        return;
    };
    let alice = "alice@example.org";
    enrol_totp(&t, alice).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/approval_e2e.py");
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script)
        .args(["--portal", t.portal_url.as_deref().unwrap()])
        .args(["--imap-port", &t.imaps().port().to_string()])
        .args(["--ca", &t.pki.ca_pem.display().to_string()])
        .env("IMAPGATE_TEST_APP_PASSWORD", t.password(alice))
        .kill_on_drop(true);
    if let Ok(dir) = std::env::var("IMAPGATE_PORTAL_SCREENSHOTS") {
        cmd.args(["--screenshots", &dir]);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the browser test took longer than 3 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[ALERT]",
        "without a reload",
        "approved in the browser",
        "stays refused",
        "no pending sign-in",
    ] {
        assert!(
            stdout.contains(step),
            "step `{step}` missing from:\n{stdout}"
        );
    }
    let events = hook.events();
    let addresses: Vec<&str> = events
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["127.0.21.1", "127.0.22.1"], "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["user"] == alice && e["event"] == "signin_pending"));
    assert_eq!(t.metric("imapgate_signin_approved_total", &[]).await, 1.0);
    assert_eq!(t.metric("imapgate_signin_denied_total", &[]).await, 1.0);
}

/// What Python's imaplib makes of the ALERT (docs/portal.md says which clients show it): the
/// exception carries only the tagged NO; the ALERT text is in `untagged_responses["NO"]`.
#[tokio::test]
async fn imaplib_keeps_the_alert_beside_the_failure() {
    let Some(python) = crate::harness::which("python3") else {
        assert!(!crate::harness::require_real(), "python3 is required");
        return;
    };
    let Some((t, _hook)) = approval_gateway("").await else {
        return;
    };
    let script = r#"
import imaplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
m = imaplib.IMAP4_SSL("localhost", int(sys.argv[1]), ssl_context=ctx)
try:
    m.login("mia@example.org", sys.stdin.read().strip())
    print("LOGGED IN")
except imaplib.IMAP4.error as e:
    print("ERROR", e)
    print("UNTAGGED", [x.decode() for x in m.untagged_responses.get("NO", [])])
"#;
    let mut child = tokio::process::Command::new(python)
        .args([
            "-c",
            script,
            &t.imaps().port().to_string(),
            &t.pki.ca_pem.display().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(t.password("mia@example.org").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ERROR") && text.contains("AUTHENTICATIONFAILED"),
        "{text}"
    );
    assert!(text.contains("UNTAGGED ['[ALERT] Login failed."), "{text}");
}
