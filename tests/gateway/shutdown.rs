//! Drain: readiness goes off, pre-auth sessions get `* BYE`, relayed sessions keep working for
//! the grace period and are then closed.

use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test]
async fn shutdown_drains() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  shutdown_delay: 500ms\n  shutdown_grace: 2s".into(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut pre = t.client().await;
    let mut relayed = t.logged_in("frank@example.org").await;
    relayed.cmd("s", "SELECT INBOX").await;
    let started = Instant::now();
    t.gw.shutdown();
    // Readiness off at once.
    let (code, body) = http_get(t.gw.admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining: not ok"));
    // During shutdown_delay new connections are still accepted.
    let mut late = t.client().await;
    // Then pre-auth sessions get BYE.
    assert_eq!(
        pre.line_within(Duration::from_secs(5)).await.unwrap(),
        "* BYE Server shutting down\r\n"
    );
    assert_eq!(
        late.line_within(Duration::from_secs(5)).await.unwrap(),
        "* BYE Server shutting down\r\n"
    );
    // New connections are refused now.
    assert!(
        tokio::net::TcpStream::connect(t.imaps()).await.is_err() || {
            let mut c = Client::plain(t.imaps(), &t.pki.ca_der).await;
            c.closed_within(Duration::from_secs(3)).await
        }
    );
    // The relayed session still works inside the grace period…
    let r = relayed.cmd("n", "NOOP").await;
    assert!(last(&r).starts_with("n OK"), "{r:?}");
    // …and is closed after it.
    assert!(
        relayed.closed_within(Duration::from_secs(6)).await,
        "relayed session not closed after grace"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2400),
        "closed before delay + grace: {:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(10), t.gw.wait())
        .await
        .expect("shutdown did not finish");
}
