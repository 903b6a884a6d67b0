//! Micro-benchmarks of the two hot paths, as a regression guard next to `bench/run.sh`:
//! the pre-auth decoder taking a LOGIN from bytes to a login request, and the relay moving
//! 1 MiB each way.
//!
//! `cargo bench --bench hot_paths`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::time::Duration;

use imapgate::session::preauth::{PreAuth, PreAuthLimits, Step};
use imapgate::session::relay::{self, RelayLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn main() {
    divan::main();
}

fn limits() -> PreAuthLimits {
    PreAuthLimits {
        line_bytes: 8 * 1024,
        literal_bytes: 8 * 1024,
        sasl_bytes: 24 * 1024,
        bad_commands_before_bye: 5,
        auth_failures_per_connection: 3,
    }
}

/// Greeting, then `LOGIN` fed in one read, to the login request.
#[divan::bench]
fn preauth_login() -> bool {
    let mut sm = PreAuth::new(limits(), false, true);
    let _ = divan::black_box(sm.greeting());
    sm.feed(divan::black_box(
        b"a1 LOGIN alice@example.org \"abcd efgh ijkl mnop123456\"\r\n",
    ));
    loop {
        match sm.step() {
            Step::Authenticate(req) => return divan::black_box(!req.tag.as_ref().is_empty()),
            Step::Send(_) => continue,
            _ => return false,
        }
    }
}

/// `CAPABILITY`, `ID`, `NOOP`, then `AUTHENTICATE PLAIN` with an initial response.
#[divan::bench]
fn preauth_dialogue() -> usize {
    let mut sm = PreAuth::new(limits(), false, true);
    sm.feed(b"c CAPABILITY\r\ni ID (\"name\" \"bench\")\r\nn NOOP\r\na AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUub3JnAGFiY2RlZmdoaWprbG1ub3A=\r\n");
    let mut sent = 0;
    loop {
        match sm.step() {
            Step::Send(b) => sent += b.len(),
            Step::Authenticate(_) => return sent,
            _ => return 0,
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// 1 MiB client → backend and 1 MiB back through the relay's two copy loops (in-memory pipes).
#[divan::bench(sample_count = 20)]
fn relay_1mib_each_way() -> usize {
    runtime().block_on(async {
        let (client, mut client_peer) = tokio::io::duplex(256 * 1024);
        let (backend, mut backend_peer) = tokio::io::duplex(256 * 1024);
        let counter = || prometheus::IntCounter::new("b", "b").unwrap();
        let task = tokio::spawn(relay::run(
            client,
            backend,
            RelayLimits {
                idle: Duration::from_secs(60),
                lifetime: Duration::from_secs(600),
                shutdown_grace: Duration::from_secs(1),
            },
            counter(),
            counter(),
            CancellationToken::new(),
            CancellationToken::new(),
            None,
        ));
        let payload = vec![7u8; 1024 * 1024];
        let up = payload.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&up).await.unwrap();
            let mut back = vec![0u8; 1024 * 1024];
            client_peer.read_exact(&mut back).await.unwrap();
            back.len()
        });
        let mut got = vec![0u8; payload.len()];
        backend_peer.read_exact(&mut got).await.unwrap();
        backend_peer.write_all(&payload).await.unwrap();
        let n = writer.await.unwrap();
        drop(backend_peer);
        let _ = task.await;
        n + got.len()
    })
}
