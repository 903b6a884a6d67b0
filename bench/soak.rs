//! imapgate's soak client (bench/soak.sh runs it): a mixed load for a given time against the
//! gateway — full-mailbox FETCHes with every message checked against the SHA-256 its
//! `X-Soak-SHA256` header carries, APPENDs of new such messages, IDLE sessions, failed logins
//! from another address, and clients that vanish at random points. Errors are counted by kind
//! and by whether they fell inside the announced backend outage. One JSON object on stdout.
//!
//! ```text
//! soak --addr 127.0.0.1:PORT --ca ca.pem --users users.txt --seconds 600 --outage 240:270
//! ```
//! Loopback only. Exit status 1 if a message ever arrives corrupted, if a failed login is not
//! answered as one, if anything fails outside the outage, or if logins do not work again
//! after it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

#[path = "client.rs"]
mod client;
use client::{connector, read_users, Conn};

struct Args {
    addr: SocketAddr,
    ca: String,
    users: Vec<(String, String)>,
    seconds: f64,
    /// Seconds from the start during which the backend is down (kill .. restart), plus a grace.
    outage: (f64, f64),
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        addr: "127.0.0.1:993".parse().unwrap(),
        ca: String::new(),
        users: Vec::new(),
        seconds: 600.0,
        outage: (f64::MAX, f64::MAX),
    };
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = v.parse().expect("--addr IP:PORT"),
            "--ca" => a.ca = v,
            "--users" => a.users = read_users(&v),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--outage" => {
                let (s, e) = v.split_once(':').expect("--outage START:END");
                a.outage = (s.parse().unwrap(), e.parse().unwrap());
            }
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(a.addr.ip().is_loopback(), "soak talks to loopback only");
    assert!(!a.users.is_empty(), "--users: no `user password` lines");
    a
}

/// What happened, by kind; `errors` split by whether the backend was down at the time.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
    verified: AtomicU64,
    corrupt: AtomicU64,
    bytes: AtomicU64,
    /// Successful logins after the backend came back.
    logins_after_outage: AtomicU64,
}

impl Tally {
    fn add(&self, what: &str) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry(what.to_owned())
            .or_default() += 1;
    }
}

struct Ctx {
    a: Args,
    tls: TlsConnector,
    started: Instant,
    tally: Tally,
}

impl Ctx {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
    fn running(&self) -> bool {
        self.now() < self.a.seconds
    }
    /// Inside the outage, or within 15 s after it (clients reconnecting, Dovecot warming up).
    fn in_outage(&self) -> bool {
        let t = self.now();
        t >= self.a.outage.0 && t < self.a.outage.1 + 15.0
    }
    fn error(&self, worker: &str, e: &std::io::Error) {
        let when = if self.in_outage() { "outage" } else { "normal" };
        self.tally.add(&format!("error.{worker}.{when}"));
        if !self.in_outage() {
            eprintln!("{:7.1}s {worker}: {e}", self.now());
        }
    }
    fn logged_in(&self) {
        if self.now() > self.a.outage.1 {
            self.tally
                .logins_after_outage
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A message whose body's SHA-256 is in its header.
fn message(rng: &mut impl RngExt, n: u64) -> Vec<u8> {
    let size = rng.random_range(200..150_000);
    let mut body = Vec::with_capacity(size + 80);
    while body.len() < size {
        let len = rng.random_range(1..78);
        body.extend((0..len).map(|_| rng.random_range(b' '..=b'~')));
        body.extend_from_slice(b"\r\n");
    }
    let hash = hex(&Sha256::digest(&body));
    let mut m = format!(
        "From: soak <soak@soak.test>\r\nSubject: appended {n}\r\nX-Soak-SHA256: {hash}\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(&body);
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks one fetched message: its body hashes to its header's value.
fn verify(msg: &[u8]) -> bool {
    let Some(split) = msg.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let (head, body) = (&msg[..split], &msg[split + 4..]);
    let head = String::from_utf8_lossy(head);
    let Some(want) = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Soak-SHA256: "))
        .map(str::trim)
    else {
        return false;
    };
    hex(&Sha256::digest(body)) == want
}

async fn login(cx: &Ctx, user: &str, pw: &str) -> std::io::Result<Conn> {
    let mut c = Conn::open(cx.a.addr, &cx.tls).await?;
    c.login(user, pw).await?;
    cx.logged_in();
    Ok(c)
}

/// Log in, SELECT, FETCH the whole mailbox and check every message; one in five times walk
/// away in the middle of the FETCH instead.
async fn fetcher(cx: Arc<Ctx>, id: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    while cx.running() {
        let (user, pw) = &cx.a.users[rng.random_range(0..cx.a.users.len())];
        let vanish = rng.random_ratio(1, 5);
        let r = async {
            let mut c = login(&cx, user, pw).await?;
            c.cmd("s", "SELECT INBOX").await?;
            c.send("f FETCH 1:* BODY.PEEK[]\r\n").await?;
            let mut got = 0u64;
            loop {
                let mut lits = Vec::new();
                let l = c.line_keeping(Some(&mut lits)).await?;
                for m in &lits {
                    cx.tally.bytes.fetch_add(m.len() as u64, Ordering::Relaxed);
                    if verify(m) {
                        cx.tally.verified.fetch_add(1, Ordering::Relaxed);
                    } else {
                        cx.tally.corrupt.fetch_add(1, Ordering::Relaxed);
                        eprintln!("CORRUPT message for {user}: {} bytes", m.len());
                    }
                    got += 1;
                }
                if vanish && got >= 3 {
                    cx.tally.add("vanished_mid_fetch");
                    return Ok(());
                }
                if l.starts_with(b"f ") {
                    if !l.starts_with(b"f OK") {
                        return Err(std::io::Error::other(
                            String::from_utf8_lossy(&l).into_owned(),
                        ));
                    }
                    break;
                }
            }
            c.cmd("z", "LOGOUT").await.ok();
            cx.tally.add("fetch_sessions");
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = r {
            cx.error("fetch", &e);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// APPEND a new checked message every second or so.
async fn appender(cx: Arc<Ctx>, id: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + id as u64);
    let mut n = 0u64;
    while cx.running() {
        let (user, pw) = &cx.a.users[rng.random_range(0..cx.a.users.len())];
        n += 1;
        let msg = message(&mut rng, n);
        let r = async {
            let mut c = login(&cx, user, pw).await?;
            c.send(&format!("a APPEND INBOX {{{}}}\r\n", msg.len()))
                .await?;
            let l = c.line().await?;
            if !l.starts_with(b"+") {
                return Err(std::io::Error::other("APPEND: no continuation"));
            }
            tokio::io::AsyncWriteExt::write_all(&mut c.io, &msg).await?;
            c.send("\r\n").await?; // the end of the APPEND command
            loop {
                let l = c.line().await?;
                if l.starts_with(b"a ") {
                    if !l.starts_with(b"a OK") {
                        return Err(std::io::Error::other(
                            String::from_utf8_lossy(&l).into_owned(),
                        ));
                    }
                    break;
                }
            }
            c.cmd("z", "LOGOUT").await.ok();
            cx.tally.add("appended");
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = r {
            cx.error("append", &e);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    }
}

/// Hold an IDLE session for 5-30 s, end it politely, start again.
async fn idler(cx: Arc<Ctx>, id: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2000 + id as u64);
    while cx.running() {
        let (user, pw) = &cx.a.users[rng.random_range(0..cx.a.users.len())];
        let hold = Duration::from_secs(rng.random_range(5..30));
        let r = async {
            let mut c = login(&cx, user, pw).await?;
            c.cmd("s", "SELECT INBOX").await?;
            c.send("i IDLE\r\n").await?;
            if !c.line().await?.starts_with(b"+") {
                return Err(std::io::Error::other("IDLE refused"));
            }
            let until = Instant::now() + hold;
            // Untagged EXISTS arrive while others append; the session must stay alive.
            while Instant::now() < until && cx.running() {
                match tokio::time::timeout(Duration::from_secs(1), c.line()).await {
                    Ok(Ok(_)) => cx.tally.add("idle_updates"),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            }
            c.send("DONE\r\n").await?;
            loop {
                let l = c.line().await?;
                if l.starts_with(b"i ") {
                    break;
                }
            }
            c.cmd("z", "LOGOUT").await.ok();
            cx.tally.add("idle_sessions");
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = r {
            cx.error("idle", &e);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Wrong passwords and unknown users from 127.0.0.2: every one must be answered with
/// `NO [AUTHENTICATIONFAILED]` (or, once the guard closes, a BYE).
async fn failer(cx: Arc<Ctx>, id: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3000 + id as u64);
    let from: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    while cx.running() {
        let user = if rng.random_bool(0.5) {
            cx.a.users[rng.random_range(0..cx.a.users.len())].0.clone()
        } else {
            format!("nobody{}@soak.test", rng.random_range(0..1000))
        };
        let r = async {
            let mut c = Conn::open_from(from, cx.a.addr, &cx.tls).await?;
            match c.login(&user, "wrong password 123456").await {
                Ok(()) => cx.tally.add("FAILED_LOGIN_ACCEPTED"),
                Err(e) if e.to_string().contains("NO [AUTHENTICATIONFAILED]") => {
                    cx.tally.add("failed_logins_refused")
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    cx.tally.add("failed_logins_closed")
                }
                Err(e) => return Err(e),
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = r {
            cx.error("fail", &e);
            cx.tally.add("failed_login_odd_reply");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
    }
}

/// Connections that vanish: before TLS, after the greeting, in the middle of a LOGIN.
async fn vanisher(cx: Arc<Ctx>, id: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4000 + id as u64);
    while cx.running() {
        match rng.random_range(0..3) {
            0 => {
                let _ = tokio::net::TcpStream::connect(cx.a.addr).await;
            }
            1 => {
                let _ = Conn::open(cx.a.addr, &cx.tls).await;
            }
            _ => {
                let (user, pw) = &cx.a.users[rng.random_range(0..cx.a.users.len())];
                if let Ok(mut c) = Conn::open(cx.a.addr, &cx.tls).await {
                    let _ = c.send(&format!("l LOGIN \"{user}\" \"{pw}\"\r\n")).await;
                }
            }
        }
        cx.tally.add("vanished");
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
    }
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(async {
        let tls = connector(&a.ca);
        let cx = Arc::new(Ctx {
            a,
            tls,
            started: Instant::now(),
            tally: Tally::default(),
        });
        let mut tasks = Vec::new();
        for i in 0..6 {
            tasks.push(tokio::spawn(fetcher(cx.clone(), i)));
        }
        for i in 0..2 {
            tasks.push(tokio::spawn(appender(cx.clone(), i)));
        }
        for i in 0..12 {
            tasks.push(tokio::spawn(idler(cx.clone(), i)));
        }
        for i in 0..2 {
            tasks.push(tokio::spawn(failer(cx.clone(), i)));
        }
        for i in 0..2 {
            tasks.push(tokio::spawn(vanisher(cx.clone(), i)));
        }
        for t in tasks {
            // A worker stuck past the end by more than a minute is a hang.
            tokio::time::timeout(Duration::from_secs(cx.a.seconds as u64 + 60), t)
                .await
                .expect("a soak worker hung")
                .unwrap();
        }
        let counts = cx.tally.counts.lock().unwrap().clone();
        let normal_errors: u64 = counts
            .iter()
            .filter(|(k, _)| k.starts_with("error.") && k.ends_with(".normal"))
            .map(|(_, v)| v)
            .sum();
        let corrupt = cx.tally.corrupt.load(Ordering::Relaxed);
        let after = cx.tally.logins_after_outage.load(Ordering::Relaxed);
        let odd = counts.get("failed_login_odd_reply").copied().unwrap_or(0)
            + counts.get("FAILED_LOGIN_ACCEPTED").copied().unwrap_or(0);
        let outage_given = cx.a.outage.0 < f64::MAX;
        let ok = corrupt == 0 && odd == 0 && normal_errors == 0 && (!outage_given || after > 0);
        println!(
            "{}",
            serde_json::json!({
                "seconds": cx.a.seconds,
                "outage": [cx.a.outage.0, cx.a.outage.1],
                "messages_verified": cx.tally.verified.load(Ordering::Relaxed),
                "messages_corrupt": corrupt,
                "bytes_fetched": cx.tally.bytes.load(Ordering::Relaxed),
                "logins_after_outage": after,
                "errors_outside_outage": normal_errors,
                "counts": counts,
                "ok": ok,
            })
        );
        ok
    });
    std::process::exit(if ok { 0 } else { 1 });
}
