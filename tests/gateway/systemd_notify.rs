//! systemd `Type=notify`: the real binary, started with `NOTIFY_SOCKET` pointing at a datagram
//! socket this test reads (as systemd would), says READY=1 only once its listeners accept,
//! RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a SIGHUP reload, and STOPPING=1 when
//! SIGTERM starts the drain. (No systemd is PID 1 where these tests run; the unit file's own
//! checks are in scripts/check_deploy.py.)

use std::process::Command;
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::harness::*;

/// Every wait on the gateway here is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// Reads datagrams until one has the assignment `key` (e.g. `READY=1`); returns it and every
/// datagram read before it. Fails after [`WAIT`].
async fn until(sock: &UnixDatagram, key: &str, b: &Binary) -> (String, Vec<String>) {
    let mut before = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut buf = vec![0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "no {key} within {WAIT:?}; datagrams so far: {before:?}; log: {}",
                std::fs::read_to_string(b.dir.path().join("stderr.log")).unwrap_or_default()
            ),
        };
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        if msg.lines().any(|l| l == key) {
            return (msg, before);
        }
        before.push(msg);
    }
}

fn value<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| l.strip_prefix(&format!("{key}=")))
}

fn signal(b: &Binary, sig: &str) {
    let pid = b.child.id().to_string();
    assert!(Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_only_when_serving_then_reloading_and_stopping() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut b = spawn_binary(&t, None, &[("NOTIFY_SOCKET", path.as_os_str())]);

    // READY=1 arrives, and at that moment both IMAP listeners and the admin port accept: a
    // unit ordered After=imapgate.service can connect at once.
    let (ready, early) = until(&sock, "READY=1", &b).await;
    for port in [b.imaps, b.imap, b.admin] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "READY=1 was sent before port {port} accepted"
        );
    }
    assert!(early.is_empty(), "something before READY=1: {early:?}");
    let status = value(&ready, "STATUS").unwrap_or_default();
    assert!(
        status.starts_with("serving 2 listeners (imaps, imap)"),
        "{ready:?}"
    );
    let mut c = Client::plain(
        format!("127.0.0.1:{}", b.imap).parse().unwrap(),
        &t.pki.ca_der,
    )
    .await;
    let greeting = c.line().await.unwrap_or_default();
    assert!(greeting.starts_with("* OK"), "{greeting:?}");

    // SIGHUP: RELOADING=1 with the CLOCK_MONOTONIC time the reload began, then READY=1.
    let sent = imapgate::server::notify::monotonic_usec().unwrap();
    signal(&b, "-HUP");
    let (reloading, _) = until(&sock, "RELOADING=1", &b).await;
    let received = imapgate::server::notify::monotonic_usec().unwrap();
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        sent <= usec && usec <= received,
        "MONOTONIC_USEC={usec} is not between the signal ({sent}) and its receipt ({received})"
    );
    let (reloaded, between) = until(&sock, "READY=1", &b).await;
    assert!(
        between.iter().all(|m| !m.contains("READY=1")),
        "{between:?}"
    );
    assert!(
        value(&reloaded, "STATUS").is_some_and(|s| s.ends_with("; reloaded")),
        "{reloaded:?}"
    );
    // Still serving after the reload.
    let mut c = Client::plain(
        format!("127.0.0.1:{}", b.imap).parse().unwrap(),
        &t.pki.ca_der,
    )
    .await;
    assert!(c.line().await.unwrap_or_default().starts_with("* OK"));

    // SIGTERM: STOPPING=1 as the drain starts, then a clean exit.
    signal(&b, "-TERM");
    let (stopping, _) = until(&sock, "STOPPING=1", &b).await;
    assert!(
        value(&stopping, "STATUS").is_some_and(|s| s.starts_with("draining")),
        "{stopping:?}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = b.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A NOTIFY_SOCKET nobody can use (a relative path) is reported and ignored: the gateway
/// still starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_notify_socket_does_not_stop_the_gateway() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let b = spawn_binary(
        &t,
        None,
        &[(
            "NOTIFY_SOCKET",
            std::ffi::OsStr::new("relative/notify.sock"),
        )],
    );
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", b.imap)).is_err() {
        assert!(std::time::Instant::now() < deadline, "did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(b.dir.path().join("stderr.log")).unwrap_or_default();
    assert!(log.contains("systemd notifications are off"), "{log}");
}
