//! The admin listener under a token guesser and a scraper in a loop (issue 17 item 8): the
//! guesser gets `429` with `Retry-After` after a few wrong tokens and then even a right token
//! is not compared; a flood of API requests from one address is cut at its burst; all the
//! while `/healthz`, `/readyz` and `/metrics` answer 200 to every address, and the operator
//! elsewhere keeps working. Run against the real binary, from several loopback addresses.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// One HTTP/1.1 request from `local` (a loopback address); returns status, the
/// `Retry-After` header if any, and the body.
async fn request_from(
    local: &str,
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<u64>, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let mut s = sock.connect(admin).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry_after = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok());
    (status, retry_after, body.to_owned())
}

/// The probes answer 200 to `local`, each several times in a row.
async fn probes_answer(local: &str, admin: SocketAddr) {
    for _ in 0..10 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (status, _, body) = request_from(local, admin, "GET", path, None).await;
            assert_eq!(status, 200, "{path} from {local}: {body}");
        }
    }
}

#[tokio::test]
async fn a_token_guesser_gets_429_while_the_probes_keep_answering() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let b = start_binary(&t);
    let admin = SocketAddr::from(([127, 0, 0, 1], b.admin));
    // Ready before anything is counted (a backend probe may take a moment).
    let mut ready = false;
    for _ in 0..50 {
        if request_from("127.0.0.1", admin, "GET", "/readyz", None)
            .await
            .0
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "the binary never became ready");

    // The guesser: a few wrong tokens are compared (401), then 429 with Retry-After.
    let guesser = "127.0.0.1";
    let mut unauthorised = 0;
    let mut limited = None;
    for i in 0..20 {
        let (status, retry_after, _) = request_from(
            guesser,
            admin,
            "GET",
            "/guard/blocks",
            Some(&format!("guess-{i}")),
        )
        .await;
        match status {
            401 => unauthorised += 1,
            429 => {
                limited = Some(retry_after);
                break;
            }
            other => panic!("guess {i}: status {other}"),
        }
    }
    assert_eq!(
        unauthorised, 5,
        "admin.rate_limit.failed_auth defaults to 5"
    );
    let retry_after = limited.expect("the guesser was never limited");
    let retry_after = retry_after.expect("429 without Retry-After");
    assert!(
        (1..=12).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    // Locked out: even the right token is not compared, and a DELETE neither.
    let (status, _, _) =
        request_from(guesser, admin, "GET", "/guard/blocks", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 429);
    let (status, _, _) = request_from(
        guesser,
        admin,
        "DELETE",
        "/guard/blocks?all=true",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 429);
    // The probes answer the guesser's own address, and the operator elsewhere works.
    probes_answer(guesser, admin).await;
    let (status, _, body) = request_from(
        "127.0.0.2",
        admin,
        "GET",
        "/guard/blocks",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A script in a loop with the right token: its burst (20), then 429; its probes answer.
    let scraper = "127.0.0.3";
    let mut answered = 0;
    let mut refused = None;
    for _ in 0..40 {
        let (status, retry_after, _) =
            request_from(scraper, admin, "GET", "/guard/blocks", Some(ADMIN_TOKEN)).await;
        if status == 429 {
            refused = Some(retry_after);
            break;
        }
        assert_eq!(status, 200);
        answered += 1;
    }
    assert!(
        (20..=22).contains(&answered),
        "{answered} answered before the limit"
    );
    assert!(refused.expect("never limited").is_some_and(|s| s >= 1));
    probes_answer(scraper, admin).await;

    // Counted, with closed labels.
    let (_, _, metrics) = request_from("127.0.0.4", admin, "GET", "/metrics", None).await;
    let value = |limit: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("imapgate_http_requests_limited_total{")
                    && l.contains("server=\"admin\"")
                    && l.contains(&format!("limit=\"{limit}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("failed_auth") >= 3.0, "{metrics}");
    assert!(value("per_ip") >= 1.0);
    assert_eq!(value("probes"), 0.0);
    assert!(!metrics.contains("127.0.0."), "an address in a label");
}
