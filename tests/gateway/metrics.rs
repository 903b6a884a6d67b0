//! Metrics an operator computes saturation and cost from: the process metrics, the configured
//! caps (`imapgate_limit`, which follow a reload), login latency by mechanism and relayed bytes
//! by backend.

use base64::Engine;

use crate::harness::*;

/// The value of a series without labels, or None when `/metrics` does not have it.
async fn series(t: &TestGateway, name: &str) -> Option<f64> {
    let text = http_get(t.gw.admin, "/metrics").await.1;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn limit(t: &TestGateway, name: &str) -> f64 {
    t.metric("imapgate_limit", &[&format!("limit=\"{name}\"")])
        .await
}

#[tokio::test]
async fn process_metrics_and_the_caps_in_force_are_on_metrics() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  max_connections: 321\n  max_preauth_per_ip: 7\n  max_sessions_per_ip: 55\n  max_sessions_per_user: 9".into(),
        guard: format!("{TEST_GUARD}\n  max_delayed_per_ip: 5"),
        ..Options::default()
    })
    .await
    else {
        return;
    };
    // The process collector (Linux /proc): memory, descriptors, CPU, threads.
    for (name, at_least) in [
        ("process_resident_memory_bytes", 1.0),
        ("process_virtual_memory_bytes", 1.0),
        ("process_open_fds", 1.0),
        ("process_max_fds", 1.0),
        ("process_start_time_seconds", 1.0),
        ("process_threads", 1.0),
        ("process_cpu_seconds_total", 0.0),
    ] {
        let v = series(&t, name).await;
        assert!(v.is_some_and(|v| v >= at_least), "{name}: {v:?}");
    }

    // The caps of the configuration in force.
    for (name, value) in [
        ("max_connections", 321.0),
        ("max_preauth_per_ip", 7.0),
        ("max_sessions_per_ip", 55.0),
        ("max_sessions_per_user", 9.0),
        ("max_delayed_per_ip", 5.0),
    ] {
        assert_eq!(limit(&t, name).await, value, "{name}");
    }

    // A reload applies the guard's cap, and the gauge follows it.
    let text = std::fs::read_to_string(&t.config_path).unwrap();
    let edited = text.replace("max_delayed_per_ip: 5", "max_delayed_per_ip: 3");
    assert_ne!(text, edited);
    std::fs::write(&t.config_path, &edited).unwrap();
    t.gw.reload();
    assert!(
        t.metric("imapgate_config_reloads_total", &["result=\"ok\""])
            .await
            >= 1.0
    );
    assert_eq!(limit(&t, "max_delayed_per_ip").await, 3.0);

    // `limits` needs a restart: the gauge keeps showing the cap that is still in force.
    std::fs::write(
        &t.config_path,
        edited.replace("max_connections: 321", "max_connections: 999"),
    )
    .unwrap();
    t.gw.reload();
    assert!(
        t.metric(
            "imapgate_config_reloads_total",
            &["result=\"restart_needed\""]
        )
        .await
            >= 1.0
    );
    assert_eq!(limit(&t, "max_connections").await, 321.0);
}

#[tokio::test]
async fn login_latency_is_by_mechanism_and_relayed_bytes_by_backend() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "carol@example.org";
    let pw = t.password(user);
    let mut c = t.client().await;
    let r = c.cmd("a", &format!("LOGIN {user} \"{pw}\"")).await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    let r = c.cmd("b", "SELECT INBOX").await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    let r = c.cmd("c", "LOGOUT").await;
    assert!(last(&r).starts_with("c OK"), "{r:?}");

    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"));
    let mut c = t.client().await;
    let r = c.cmd("a", &format!("AUTHENTICATE PLAIN {plain}")).await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    let r = c.cmd("b", "LOGOUT").await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");

    for mechanism in ["login", "plain"] {
        assert_eq!(
            t.metric(
                "imapgate_auth_seconds_count",
                &[&format!("mechanism=\"{mechanism}\"")]
            )
            .await,
            1.0,
            "{mechanism}"
        );
    }
    for direction in ["to_backend", "to_client"] {
        let bytes = t
            .metric(
                "imapgate_relay_bytes_total",
                &[&format!("direction=\"{direction}\""), "backend=\"dovecot\""],
            )
            .await;
        assert!(bytes > 0.0, "{direction}: {bytes}");
    }
}
