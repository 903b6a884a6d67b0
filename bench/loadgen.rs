//! imapgate's load generator (client only): logins, bulk FETCH, NOOP latency and idle
//! sessions against any IMAP-over-TLS server — direct Dovecot, the nginx mail proxy or imapgate
//! — so that `bench/run.sh` measures all three on the same work; and SMTP submission over
//! implicit TLS, to the gateway or directly to Postfix (`smtp`, in bench/smtp.rs). One JSON object per run on
//! stdout. With `--pid`, it also reads that server process's CPU time and resident memory from
//! /proc before and after (the proxy's own cost; the process and its children).
//!
//! `idle` also takes several servers (`--addr A,B --pid P,Q`): sessions are spread over them
//! round-robin and the processes' figures added up (replicas, for a session count one process
//! may not hold under its open-files limit).
//!
//! Loopback only: it refuses any address that is not 127.0.0.0/8 or ::1.
//!
//! ```text
//! loadgen logins --addr 127.0.0.1:993 --ca ca.pem --users users.txt --concurrency 8 --seconds 10
//! loadgen fetch  --addr … --ca … --users … --rounds 3
//! loadgen noop   --addr … --ca … --users … --count 2000
//! loadgen idle   --addr … --ca … --users … --sessions 2000 --hold 10
//! loadgen smtp   --addr … --ca … --users … --concurrency 8 --seconds 10 --auth plain|none
//!                [--per-session 10] [--size 51200] [--rcpt sink@bench.test]
//!                [--pid P] [--backend-pid Q] [--queue POSTFIX_QUEUE_DIR]
//!                [--sessions-per-client N (instead of --seconds)] [--warm-up yes|no]
//! ```
//! `users.txt` holds `user password` lines; clients take them round-robin.
// A measuring tool, not network-facing code: panicking on a broken setup is the right answer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

#[path = "client.rs"]
mod client;
#[path = "smtp.rs"]
mod smtp;
use client::{connector, connector_alpn, read_users, Conn};

struct Args {
    mode: String,
    addr: SocketAddr,
    /// Every `--addr` (idle spreads its sessions over them); `addr` is the first.
    addrs: Vec<SocketAddr>,
    ca: String,
    users: Vec<(String, String)>,
    concurrency: usize,
    seconds: f64,
    rounds: usize,
    count: usize,
    sessions: usize,
    hold: f64,
    pids: Vec<u32>,
    label: String,
    /// `--mech xoauth2`: the users file holds `user token` lines; log in with XOAUTH2.
    xoauth2: bool,
    /// smtp: `--auth plain` (the gateway) or `none` (direct submission from a trusted network).
    smtp_auth: bool,
    /// smtp: messages per session before QUIT.
    per_session: usize,
    /// smtp: bytes per message.
    size: usize,
    /// smtp: the envelope recipient.
    rcpt: String,
    /// smtp: the process tree behind the target (Postfix's master behind the gateway).
    backend_pids: Vec<u32>,
    /// smtp: Postfix's queue directory, drained before each CPU sample.
    queue: Option<String>,
    /// smtp: whole sessions per client instead of `--seconds`.
    sessions_per_client: Option<usize>,
    /// smtp: `--warm-up no` skips the session per user before the clock starts.
    warm_up: bool,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .expect("mode: logins | fetch | noop | idle | smtp");
    let mut a = Args {
        mode,
        addr: "127.0.0.1:993".parse().unwrap(),
        addrs: Vec::new(),
        ca: String::new(),
        users: Vec::new(),
        concurrency: 8,
        seconds: 10.0,
        rounds: 3,
        count: 2000,
        sessions: 2000,
        hold: 10.0,
        pids: Vec::new(),
        label: String::new(),
        xoauth2: false,
        smtp_auth: true,
        per_session: 10,
        size: 51_200,
        rcpt: "sink@bench.test".to_owned(),
        backend_pids: Vec::new(),
        queue: None,
        sessions_per_client: None,
        warm_up: true,
    };
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => {
                a.addrs = v
                    .split(',')
                    .map(|x| x.parse().expect("--addr IP:PORT[,IP:PORT…]"))
                    .collect();
                a.addr = a.addrs[0];
            }
            "--ca" => a.ca = v,
            "--users" => a.users = read_users(&v),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--rounds" => a.rounds = v.parse().unwrap(),
            "--count" => a.count = v.parse().unwrap(),
            "--sessions" => a.sessions = v.parse().unwrap(),
            "--hold" => a.hold = v.parse().unwrap(),
            "--pid" => a.pids = v.split(',').map(|x| x.parse().unwrap()).collect(),
            "--label" => a.label = v,
            "--mech" => {
                a.xoauth2 = match v.as_str() {
                    "login" => false,
                    "xoauth2" => true,
                    other => panic!("--mech login|xoauth2, not {other}"),
                }
            }
            "--auth" => {
                a.smtp_auth = match v.as_str() {
                    "plain" => true,
                    "none" => false,
                    other => panic!("--auth plain|none, not {other}"),
                }
            }
            "--per-session" => a.per_session = v.parse().unwrap(),
            "--size" => a.size = v.parse().unwrap(),
            "--rcpt" => a.rcpt = v,
            "--backend-pid" => a.backend_pids = v.split(',').map(|x| x.parse().unwrap()).collect(),
            "--queue" => a.queue = Some(v),
            "--sessions-per-client" => a.sessions_per_client = Some(v.parse().unwrap()),
            "--warm-up" => {
                a.warm_up = match v.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => panic!("--warm-up yes|no, not {other}"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    if a.addrs.is_empty() {
        a.addrs.push(a.addr);
    }
    assert!(
        a.addrs.iter().all(|x| x.ip().is_loopback()),
        "loadgen talks to loopback addresses only"
    );
    assert!(!a.users.is_empty(), "--users: no `user password` lines");
    a
}

/// CPU seconds (user + system) and resident bytes of a process and all its descendants, from
/// /proc (nginx and Dovecot do their work in child processes).
fn proc_usage(pids: &[u32]) -> Option<(f64, u64)> {
    if pids.is_empty() {
        return None;
    }
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(pp) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
            parent.insert(p, pp);
        }
    }
    let in_tree = |mut p: u32| {
        for _ in 0..64 {
            if pids.contains(&p) {
                return true;
            }
            match parent.get(&p) {
                Some(&pp) if pp != 0 => p = pp,
                _ => return false,
            }
        }
        false
    };
    let mut cpu = 0.0;
    let mut rss = 0u64;
    let mut found = false;
    for &p in parent.keys().filter(|&&p| in_tree(p)) {
        let Some(f) = stat_fields(p) else { continue };
        let ticks = 100.0; // USER_HZ on Linux
        cpu += (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks;
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        rss += kib * 1024;
        found = true;
    }
    found.then_some((cpu, rss))
}

/// The fields of /proc/PID/stat after the command name: state, ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn emit(a: &Args, fields: serde_json::Value) {
    let addrs: Vec<String> = a.addrs.iter().map(ToString::to_string).collect();
    let mut o = serde_json::json!({ "mode": a.mode, "label": a.label, "addr": addrs.join(",") });
    if let (Some(m), serde_json::Value::Object(extra)) = (o.as_object_mut(), fields) {
        m.extend(extra);
    }
    println!("{o}");
}

/// One login per user before the clock starts (every server gets its caches warmed alike:
/// imapgate's verified-credential cache, Dovecot's auth cache).
async fn warm_up(a: &Args, tls: &TlsConnector) {
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut tasks = Vec::new();
    let every = a
        .addrs
        .iter()
        .flat_map(|&addr| a.users.iter().map(move |u| (addr, u.clone())));
    for (addr, (user, pw)) in every {
        let (tls, sem, xoauth2) = (tls.clone(), sem.clone(), a.xoauth2);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            if let Ok(mut c) = Conn::open(addr, &tls).await {
                let _ = c.auth(xoauth2, &user, &pw).await;
                let _ = c.send("z LOGOUT\r\n").await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn logins(a: &Args, tls: TlsConnector) {
    warm_up(a, &tls).await;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let before = proc_usage(&a.pids);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..a.concurrency {
        let (user, pw) = a.users[i % a.users.len()].clone();
        let (tls, stop, errors, addr) = (tls.clone(), stop.clone(), errors.clone(), a.addr);
        let xoauth2 = a.xoauth2;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = async {
                    let mut c = Conn::open(addr, &tls).await?;
                    c.auth(xoauth2, &user, &pw).await?;
                    c.send("z LOGOUT\r\n").await?;
                    // Read to the tagged OK (or EOF): a full cycle.
                    while let Ok(l) = c.line().await {
                        if l.starts_with(b"z ") {
                            break;
                        }
                    }
                    Ok::<(), std::io::Error>(())
                }
                .await;
                match ok {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64()),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("login error: {e}");
                        }
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = proc_usage(&a.pids);
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let n = lat.len() as f64;
    let cpu_ms_per_login = match (before, after) {
        (Some((c0, _)), Some((c1, _))) if n > 0.0 => Some((c1 - c0) * 1000.0 / n),
        _ => None,
    };
    emit(
        a,
        serde_json::json!({
            "concurrency": a.concurrency,
            "logins": lat.len(),
            "errors": errors.load(Ordering::Relaxed),
            "per_second": n / elapsed,
            "p50_ms": percentile(&lat, 0.5) * 1000.0,
            "p99_ms": percentile(&lat, 0.99) * 1000.0,
            "cpu_ms_per_login": cpu_ms_per_login,
        }),
    );
}

async fn fetch(a: &Args, tls: TlsConnector) {
    let (user, pw) = &a.users[0];
    let mut c = Conn::open(a.addr, &tls).await.unwrap();
    c.login(user, pw).await.unwrap();
    c.cmd("s", "EXAMINE INBOX").await.unwrap();
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for r in 0..a.rounds {
        let before = proc_usage(&a.pids);
        let start_bytes = c.received;
        let t = Instant::now();
        c.cmd(&format!("f{r}"), "FETCH 1:* BODY.PEEK[]")
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let mb = (c.received - start_bytes) as f64 / 1e6;
        rates.push(mb / secs);
        if let (Some((c0, _)), Some((c1, _))) = (before, proc_usage(&a.pids)) {
            cpu.push((c1 - c0) * 1000.0 / mb);
        }
    }
    let _ = c.send("z LOGOUT\r\n").await;
    rates.sort_by(|x, y| x.partial_cmp(y).unwrap());
    cpu.sort_by(|x, y| x.partial_cmp(y).unwrap());
    emit(
        a,
        serde_json::json!({
            "rounds": a.rounds,
            "mb_per_s": percentile(&rates, 0.5),
            "mb_per_s_all": rates,
            "cpu_ms_per_mb": if cpu.is_empty() { None } else { Some(percentile(&cpu, 0.5)) },
        }),
    );
}

async fn noop(a: &Args, tls: TlsConnector) {
    let (user, pw) = &a.users[0];
    let mut c = Conn::open(a.addr, &tls).await.unwrap();
    c.login(user, pw).await.unwrap();
    // Warm up, then measure.
    for i in 0..100 {
        c.cmd(&format!("w{i}"), "NOOP").await.unwrap();
    }
    let mut lat = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let t = Instant::now();
        c.cmd(&format!("n{i}"), "NOOP").await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
    }
    let _ = c.send("z LOGOUT\r\n").await;
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    emit(
        a,
        serde_json::json!({
            "count": a.count,
            "p50_us": percentile(&lat, 0.5) * 1e6,
            "p99_us": percentile(&lat, 0.99) * 1e6,
        }),
    );
}

async fn idle(a: &Args, tls: TlsConnector) {
    // Every user logged in once first: the baseline then holds what logins leave behind for
    // good (caches, argon2's working memory), and the growth is the sessions' own.
    warm_up(a, &tls).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proc_usage(&a.pids);
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..a.sessions {
        let (user, pw) = a.users[i % a.users.len()].clone();
        let addr = a.addrs[i % a.addrs.len()];
        let (tls, sem, errors) = (tls.clone(), sem.clone(), errors.clone());
        let xoauth2 = a.xoauth2;
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let r = async {
                let mut c = Conn::open(addr, &tls).await?;
                c.auth(xoauth2, &user, &pw).await?;
                c.cmd("s", "SELECT INBOX").await?;
                c.send("i IDLE\r\n").await?;
                let l = c.line().await?;
                if !l.starts_with(b"+") {
                    return Err(std::io::Error::other("IDLE not accepted"));
                }
                Ok::<Conn, std::io::Error>(c)
            }
            .await;
            drop(permit);
            match r {
                Ok(c) => Some(c),
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("idle session error: {e}");
                    }
                    None
                }
            }
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        if let Some(c) = t.await.unwrap() {
            conns.push(c);
        }
    }
    let setup = started.elapsed().as_secs_f64();
    // Let the server settle, then measure memory and CPU while everyone idles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = proc_usage(&a.pids);
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let held = proc_usage(&a.pids);
    let n = conns.len();
    let per_session = match (before, settled) {
        (Some((_, r0)), Some((_, r1))) if n > 0 => Some((r1.saturating_sub(r0)) as f64 / n as f64),
        _ => None,
    };
    let idle_cpu_percent = match (settled, held) {
        (Some((c0, _)), Some((c1, _))) => Some((c1 - c0) * 100.0 / a.hold),
        _ => None,
    };
    // End IDLE politely on a few; drop the rest.
    for c in conns.iter_mut().take(16) {
        let _ = c.send("DONE\r\n").await;
    }
    drop(conns);
    emit(
        a,
        serde_json::json!({
            "sessions": a.sessions,
            "held": n,
            "errors": errors.load(Ordering::Relaxed),
            "setup_seconds": setup,
            "rss_before": before.map(|x| x.1),
            "rss_held": settled.map(|x| x.1),
            "bytes_per_session": per_session,
            "idle_cpu_percent": idle_cpu_percent,
        }),
    );
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if a.mode == "smtp" {
            let s = smtp::SmtpArgs {
                addr: a.addr,
                users: a.users.clone(),
                concurrency: a.concurrency,
                seconds: a.seconds,
                auth: a.smtp_auth,
                per_session: a.per_session.max(1),
                size: a.size,
                rcpt: a.rcpt.clone(),
                pids: a.pids.clone(),
                backend_pids: a.backend_pids.clone(),
                queue: a.queue.clone(),
                sessions_per_client: a.sessions_per_client,
                warm_up: a.warm_up,
            };
            let fields = smtp::run(&s, connector_alpn(&a.ca, b"smtp")).await;
            emit(&a, fields);
            return;
        }
        let tls = connector(&a.ca);
        match a.mode.as_str() {
            "logins" => logins(&a, tls).await,
            "fetch" => fetch(&a, tls).await,
            "noop" => noop(&a, tls).await,
            "idle" => idle(&a, tls).await,
            other => panic!("unknown mode {other}"),
        }
    });
}
