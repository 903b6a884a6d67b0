//! The backend side: STARTTLS and SASL-authzid logins against the real Dovecot, a backend that
//! is down, a master credential the backend rejects, and a scripted backend for faults Dovecot
//! cannot be made to produce (PREAUTH and BYE greetings, no STARTTLS).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::*;

const UNAVAILABLE: &str = "NO [UNAVAILABLE] Service temporarily unavailable\r\n";

#[tokio::test]
async fn starttls_backend_and_sasl_authzid_login() {
    let Some(t) = TestGateway::start_with(Options {
        backend_tls: "starttls",
        backend_login: "sasl_authzid",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut c = t.logged_in("alice@example.org").await;
    let r = c.cmd("s", "SELECT INBOX").await;
    assert!(last(&r).starts_with("s OK"), "{r:?}");
    assert_eq!(
        t.metric("imapgate_upstream_logins_total", &["result=\"ok\""])
            .await,
        1.0
    );
}

#[tokio::test]
async fn backend_down_gives_unavailable_without_backend_text() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    let r = c
        .cmd(
            "a",
            &format!("LOGIN zed@down.test \"{}\"", t.password("zed@down.test")),
        )
        .await;
    assert_eq!(r, vec![format!("a {UNAVAILABLE}")]);
    // The session stays usable for another try.
    let r = c.cmd("b", "NOOP").await;
    assert_eq!(r, vec!["b OK NOOP completed\r\n"]);
    assert_eq!(
        t.metric(
            "imapgate_upstream_logins_total",
            &["backend=\"down\"", "result=\"connect\""]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn readiness_reflects_backend_health() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut ready = false;
    for _ in 0..50 {
        let (code, body) = http_get(t.gw.admin, "/readyz").await;
        if code == 200 {
            assert!(
                body.contains("backend dovecot: up") && body.contains("backend down: down"),
                "{body}"
            );
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never ready");
    assert_eq!(http_get(t.gw.admin, "/healthz").await.0, 200);
    assert_eq!(
        t.metric("imapgate_backend_up", &["backend=\"dovecot\""])
            .await,
        1.0
    );
}

/// A scripted backend that greets with `greeting` and then answers `CAPABILITY`/anything with
/// `reply` lines; counts connections.
async fn fake_backend(
    greeting: &'static str,
    reply: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting.as_bytes()).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let tag = line.split(' ').next().unwrap_or("*").to_owned();
                    let _ = s.write_all(reply.replace("TAG", &tag).as_bytes()).await;
                }
            });
        }
    });
    (addr, h)
}

async fn login_against(backend: std::net::SocketAddr, tls: &str) -> (Vec<String>, f64) {
    let d = dovecot().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (cert, key) = pki.issue("gw", &["localhost"]);
    let pw = imapgate::auth::app_password::generate();
    let mut file = imapgate::auth::users::UsersFile {
        version: 1,
        users: Default::default(),
    };
    file.users.insert(
        "u@example.org".into(),
        imapgate::auth::users::User {
            app_passwords: vec![imapgate::auth::users::AppPassword {
                id: "ap_test".into(),
                label: String::new(),
                hash: imapgate::auth::app_password::hash(&pw, TEST_ARGON2).unwrap(),
                lookup: None,
                created: time::OffsetDateTime::now_utc(),
                expires: None,
                revoked: false,
            }],
            ..Default::default()
        },
    );
    file.save(&dir.path().join("users.yaml")).unwrap();
    let yaml = format!(
        "listeners: [{{ name: imaps, address: \"127.0.0.1:0\", tls: implicit }}]\n\
         tls: {{ certificates: [{{ cert_file: \"{}\", key_file: \"{}\" }}] }}\n\
         auth: {{ users_file: users.yaml, failure_floor: 100ms, mfa: {{ default: off }} }}\n\
         backends:\n  - {{ name: fake, address: \"{backend}\", tls: {tls}, login: master_user, master_user: gateway, master_password_file: \"{}\", login_timeout: 2s }}\n\
         admin: {{ address: \"127.0.0.1:0\" }}\n",
        cert.display(),
        key.display(),
        d.master_secret_file.display()
    );
    let cfg = imapgate::config::Config::from_yaml(&yaml, dir.path()).unwrap();
    let gw = imapgate::server::Gateway::start(cfg).await.unwrap();
    let mut c = Client::tls(gw.listener("imaps").unwrap(), &pki.ca_der).await;
    c.line().await.unwrap();
    let r = c
        .cmd(
            "a",
            &format!("LOGIN u@example.org \"{}\"", pw.expose_str().unwrap()),
        )
        .await;
    let text = {
        let mut s = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let ok = text
        .lines()
        .filter(|l| l.starts_with("imapgate_upstream_logins_total") && l.contains("result=\"ok\""))
        .count() as f64;
    (r, ok)
}

#[tokio::test]
async fn backends_that_greet_preauth_or_bye_or_lack_starttls_are_refused() {
    if dovecot().is_none() {
        return;
    }
    for (greeting, reply, tls) in [
        (
            "* PREAUTH [CAPABILITY IMAP4rev1] logged in already\r\n",
            "TAG OK done\r\n",
            "none",
        ),
        ("* BYE go away\r\n", "", "none"),
        (
            "* OK [CAPABILITY IMAP4rev1] ready\r\n",
            "* CAPABILITY IMAP4rev1\r\nTAG OK done\r\n",
            "starttls",
        ),
        (
            "* OK [CAPABILITY IMAP4rev1] ready\r\n",
            "TAG NO [AUTHENTICATIONFAILED] secret backend detail\r\n",
            "none",
        ),
        ("garbage\r\n", "", "none"),
    ] {
        let (addr, h) = fake_backend(greeting, reply).await;
        let (r, ok) = login_against(addr, tls).await;
        assert_eq!(r, vec![format!("a {UNAVAILABLE}")], "greeting {greeting:?}");
        assert_eq!(ok, 0.0);
        h.abort();
    }
}

#[tokio::test]
async fn a_backend_that_never_greets_times_out() {
    if dovecot().is_none() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let started = std::time::Instant::now();
    let (r, _) = login_against(addr, "none").await;
    assert_eq!(r, vec![format!("a {UNAVAILABLE}")]);
    assert!(
        started.elapsed() >= Duration::from_secs(2) && started.elapsed() < Duration::from_secs(8)
    );
    h.abort();
}

#[test]
fn user_names_with_the_master_separator_never_reach_a_backend() {
    use imapgate::config::BackendLogin;
    use imapgate::upstream::login::{check_user, LoginError};
    let master = BackendLogin::MasterUser {
        separator: "*".into(),
    };
    assert_eq!(
        check_user("alice*gateway", &master),
        Err(LoginError::BadUser)
    );
    for bad in ["a\rb", "a\nb", "a\0b", "a\u{1b}b", ""] {
        assert_eq!(
            check_user(bad, &master),
            Err(LoginError::BadUser),
            "{bad:?}"
        );
        assert_eq!(
            check_user(bad, &BackendLogin::SaslAuthzid),
            Err(LoginError::BadUser),
            "{bad:?}"
        );
    }
    assert_eq!(check_user("alice@example.org", &master), Ok(()));
}

#[tokio::test]
async fn a_user_whose_name_holds_the_separator_is_stopped_before_the_backend() {
    let Some(t) = TestGateway::start_with(Options {
        extra_users: vec!["alice@example.org*gateway".into()],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut c = t.client().await;
    let user = "alice@example.org*gateway";
    let r = c
        .cmd("a", &format!("LOGIN \"{user}\" \"{}\"", t.password(user)))
        .await;
    assert_eq!(r, vec![format!("a {UNAVAILABLE}")]);
    assert_eq!(
        t.metric("imapgate_upstream_logins_total", &["result=\"bad_user\""])
            .await,
        1.0
    );
    assert_eq!(
        t.metric("imapgate_upstream_logins_total", &["result=\"ok\""])
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_backend_certificate_that_does_not_verify_is_refused() {
    for backend_tls in ["implicit", "starttls"] {
        let Some(t) = TestGateway::start_with(Options {
            wrong_backend_ca: true,
            backend_tls,
            ..Default::default()
        })
        .await
        else {
            return;
        };
        let mut c = t.client().await;
        let r = c
            .cmd(
                "a",
                &format!(
                    "LOGIN alice@example.org \"{}\"",
                    t.password("alice@example.org")
                ),
            )
            .await;
        assert_eq!(r, vec![format!("a {UNAVAILABLE}")], "{backend_tls}");
        assert_eq!(
            t.metric("imapgate_upstream_logins_total", &["result=\"tls\""])
                .await,
            1.0,
            "{backend_tls}"
        );
    }
}
