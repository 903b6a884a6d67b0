//! Operations: reloading the configuration while sessions run (SIGHUP's path, and the file
//! watcher), what `/readyz` and the metrics say about it, and the certificate expiry metric.

use std::time::Duration;

use crate::harness::*;

/// Rewrites the test gateway's configuration file with `edit` applied.
fn rewrite(t: &TestGateway, edit: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(&t.config_path).unwrap();
    std::fs::write(&t.config_path, edit(&text)).unwrap();
}

async fn reloads(t: &TestGateway, result: &str) -> f64 {
    t.metric(
        "imapgate_config_reloads_total",
        &[&format!("result=\"{result}\"")],
    )
    .await
}

/// True if a TLS connection from `local` gets the greeting.
async fn greeted_from(t: &TestGateway, local: &str) -> bool {
    match Client::tls_after_header(t.imaps(), local, b"", &t.pki.ca_der).await {
        Ok(mut c) => c.line().await.is_some_and(|g| g.starts_with("* OK")),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_reload_applies_guard_lists_and_routes_and_refuses_what_needs_a_restart() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let alice = t.password("alice@example.org");
    let mut relayed = t.logged_in("alice@example.org").await;

    // A broken file: refused, the old configuration keeps serving, /readyz says so.
    let good = std::fs::read_to_string(&t.config_path).unwrap();
    std::fs::write(&t.config_path, "listeners: [\n").unwrap();
    t.gw.reload();
    assert!(reloads(&t, "error").await >= 1.0);
    let (code, body) = http_get(t.gw.admin, "/readyz").await;
    assert!(body.contains("the last reload failed"), "{code} {body}");
    assert!(t
        .login_from("127.0.0.1", "alice@example.org", &alice)
        .await
        .starts_with("a OK"));
    std::fs::write(&t.config_path, &good).unwrap();

    // A deny list and a new route: applied at once, sessions untouched.
    rewrite(&t, |c| {
        c.replace("guard:\n", "guard:\n  deny: [127.0.0.77]\n")
            .replace(
                "domains: { down.test: down }",
                "domains: { down.test: down, example.org: down }",
            )
    });
    t.gw.reload();
    assert!(reloads(&t, "ok").await >= 1.0);
    let (_, body) = http_get(t.gw.admin, "/readyz").await;
    assert!(!body.contains("the last reload failed"), "{body}");
    assert!(
        !greeted_from(&t, "127.0.0.77").await,
        "denied after the reload"
    );
    assert!(greeted_from(&t, "127.0.0.78").await);
    // example.org now routes to the backend that is down.
    assert_eq!(
        t.login_from(
            "127.0.0.1",
            "bob@example.org",
            &t.password("bob@example.org")
        )
        .await,
        "a NO [UNAVAILABLE] Service temporarily unavailable\r\n"
    );
    let r = relayed.cmd("n", "NOOP").await;
    assert!(
        last(&r).starts_with("n OK"),
        "the relayed session survived: {r:?}"
    );

    // A listener change needs a restart: reported, and nothing of that file applied (the
    // route change in the same file included).
    rewrite(&t, |c| {
        c.replace(
            "domains: { down.test: down, example.org: down }",
            "domains: { down.test: down }",
        )
        .replace(
            "{ name: imap, address: \"127.0.0.1:0\", tls: starttls }",
            "{ name: imap2, address: \"127.0.0.1:0\", tls: starttls }",
        )
    });
    t.gw.reload();
    assert!(reloads(&t, "restart_needed").await >= 1.0);
    assert!(t
        .login_from(
            "127.0.0.1",
            "bob@example.org",
            &t.password("bob@example.org")
        )
        .await
        .starts_with("a NO [UNAVAILABLE]"));

    // Back to the original file, picked up by the file watcher without a signal.
    let before = reloads(&t, "ok").await;
    std::fs::write(&t.config_path, &good).unwrap();
    let mut picked_up = false;
    for _ in 0..50 {
        if reloads(&t, "ok").await > before {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(picked_up, "the file watcher did not reload");
    assert!(
        greeted_from(&t, "127.0.0.77").await,
        "the deny list is gone again"
    );
    assert!(t
        .login_from(
            "127.0.0.1",
            "bob@example.org",
            &t.password("bob@example.org")
        )
        .await
        .starts_with("a OK"));
}

#[tokio::test]
async fn readyz_turns_false_when_the_only_backend_is_down() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    // Wait until ready, then leave only the backend that is down.
    let mut ready = false;
    for _ in 0..50 {
        if http_get(t.gw.admin, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready);
    rewrite(&t, |c| {
        let start = c.find("  - name: dovecot").unwrap();
        let end = c.find("  - name: down").unwrap();
        let mut out = c.to_owned();
        out.replace_range(start..end, "");
        out.replace("default: dovecot", "default: down")
    });
    t.gw.reload();
    let mut unready = None;
    for _ in 0..50 {
        let (code, body) = http_get(t.gw.admin, "/readyz").await;
        if code == 503 {
            unready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = unready.expect("still ready with its only backend down");
    assert!(
        body.contains("backend down: down") && !body.contains("dovecot"),
        "{body}"
    );
}

#[tokio::test]
async fn certificate_expiry_is_exported_per_certificate() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let text = http_get(t.gw.admin, "/metrics").await.1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("imapgate_certificate_expiry_timestamp_seconds{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(values.len(), 2, "{text}");
    assert!(values.iter().all(|v| *v > now), "{values:?}");
}

fn doctor(t: &TestGateway, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["doctor", "-c", t.config_path.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_certificates_backends_and_issuers() {
    let idp = idp();
    let Some(t) = TestGateway::start_with(Options {
        oauth: idp.as_ref().map(|_| ""),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (ok, out) = doctor(
        &t,
        &["--user", "alice@example.org", "--server-name", "localhost"],
    );
    // The backend named "down" is down: that is a failure, the rest passes.
    assert!(!ok, "{out}");
    let line = |prefix: &str, has: &str| {
        out.lines()
            .any(|l| l.starts_with(prefix) && l.contains(has))
    };
    assert!(line("[ok]   certificate", "key matches"), "{out}");
    assert!(line("[ok]   certificates", "valid for localhost"), "{out}");
    assert!(line("[ok]   backend dovecot", "IMAP4rev1"), "{out}");
    assert!(
        line("[ok]   backend dovecot", "logged in as alice@example.org"),
        "{out}"
    );
    assert!(line("[FAIL] backend down", "cannot connect"), "{out}");
    if idp.is_some() {
        assert!(line("[ok]   oauth issuer test", "signing key"), "{out}");
    }
    assert!(out.contains("doctor: 1 failed"), "{out}");
    // A name no certificate covers, and a user the backend does not know.
    let (_, out) = doctor(
        &t,
        &[
            "--user",
            "nobody@example.org",
            "--server-name",
            "imap.elsewhere.test",
        ],
    );
    assert!(
        out.contains("[FAIL] certificates: none is valid for imap.elsewhere.test"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("[FAIL] backend dovecot")
            && l.contains("master login as nobody@example.org")),
        "{out}"
    );
    assert!(
        !out.contains(&t.dovecot.master_password),
        "the master password leaked: {out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_reports_an_unverifiable_backend_certificate() {
    let Some(t) = TestGateway::start_with(Options {
        wrong_backend_ca: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (ok, out) = doctor(&t, &[]);
    assert!(!ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("[FAIL] backend dovecot") && l.contains("TLS")),
        "{out}"
    );
}

/// One scripted session, and the metrics it must leave behind, exactly.
#[tokio::test]
async fn metrics_count_a_scripted_session_exactly() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    let r = c
        .cmd("a", "LOGIN carol@example.org \"not-her-password\"")
        .await;
    assert!(last(&r).starts_with("a NO [AUTHENTICATIONFAILED]"), "{r:?}");
    let pw = t.password("carol@example.org");
    let r = c
        .cmd("b", &format!("LOGIN carol@example.org \"{pw}\""))
        .await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    let r = c.cmd("c", "SELECT INBOX").await;
    assert!(last(&r).starts_with("c OK"), "{r:?}");
    assert!(t.metric("imapgate_sessions_relayed", &[]).await >= 1.0);
    let r = c.cmd("d", "LOGOUT").await;
    assert!(last(&r).starts_with("d OK"), "{r:?}");
    assert!(c.closed_within(Duration::from_secs(5)).await);

    let m = |name: &'static str, labels: &'static [&'static str]| t.metric(name, labels);
    assert_eq!(
        m(
            "imapgate_connections_total",
            &["listener=\"imaps\"", "outcome=\"accepted\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        m(
            "imapgate_auth_attempts_total",
            &["mechanism=\"login\"", "result=\"failure\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        m(
            "imapgate_auth_attempts_total",
            &["mechanism=\"login\"", "result=\"success\""]
        )
        .await,
        1.0
    );
    assert_eq!(m("imapgate_auth_hash_runs_total", &[]).await, 2.0);
    // The first attempt was allowed as is; the second carried the tarpit of the first failure.
    assert_eq!(
        m(
            "imapgate_guard_decisions_total",
            &["action=\"allow\"", "scope=\"none\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        m("imapgate_guard_decisions_total", &["action=\"delay\""]).await,
        1.0
    );
    assert_eq!(
        m(
            "imapgate_upstream_logins_total",
            &["backend=\"dovecot\"", "result=\"ok\""]
        )
        .await,
        1.0
    );
    assert!(m("imapgate_relay_bytes_total", &["direction=\"to_backend\""]).await > 0.0);
    assert!(m("imapgate_relay_bytes_total", &["direction=\"to_client\""]).await > 0.0);
    let mut ended = false;
    for _ in 0..50 {
        if m("imapgate_sessions_relayed", &[]).await == 0.0
            && m("imapgate_session_seconds_count", &[]).await == 1.0
        {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the relayed session is not counted as ended");
    assert_eq!(m("imapgate_sessions_preauth", &[]).await, 0.0);
}
