//! The load generator's SMTP submission mode (`loadgen smtp`): sessions over implicit TLS
//! (RFC 8314) that each send several messages, against the gateway's SMTP front or directly
//! against Postfix, so that `bench/run.sh --smtp` measures both on the same work.
//!
//! A session: TCP connect, TLS handshake (ALPN `smtp`), the `220` greeting, `EHLO`, with
//! `--auth plain` an `AUTH PLAIN` with an initial response (RFC 4954, `235` expected), then
//! `--per-session` messages and `QUIT`. A message is `MAIL FROM`, `RCPT TO` and `DATA` in one
//! write when the server announces PIPELINING (RFC 2920: `DATA` ends the group, the client waits
//! for its `354`), then the message and `.` in one write, and the `250` that says it is queued.
//! Messages are `--size` bytes of 76-character lines, none starting with a dot (so no dot
//! stuffing, RFC 5321 §4.5.2), with their own Message-ID and Date so that Postfix's cleanup adds
//! no header.
//!
//! CPU: the `--pid` process tree (the gateway, or Postfix's master for direct submission) and
//! the `--backend-pid` tree (Postfix's master behind the gateway), each sampled from /proc at
//! the start and end of the run. Postfix's work is spread over processes that come and go
//! (smtpd, cleanup, trivial-rewrite, the delivery agent are started by `master` on demand and
//! exit after `max_idle` or `max_use`), so a sample counts, for every process of the tree, its
//! own time *and* the time of its children that it has already reaped (`cutime`, `cstime`):
//! when a child exits and its parent reaps it, its time moves from the child's entry to the
//! parent's, and the sum over the tree stays the same. Nothing that runs during the run is
//! lost, whichever process did it. `bench/run.sh` also keeps Postfix's daemons alive for the
//! whole benchmark (high `max_use` and `max_idle`), so the per-process breakdown
//! (`cpu_by_process`) names who did the work rather than lumping it into `exited`.
//!
//! With `--queue DIR` (Postfix's queue directory) the run waits for the queue to be empty
//! before the first sample and again before the last: the delivery of the messages counted
//! (qmgr, the `discard` agent) lands inside the run, and none of the previous run's.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::client::Io;

/// One SMTP client connection over implicit TLS.
pub(crate) struct SmtpConn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    /// The TLS handshake resumed an earlier session (a ticket from this client's config).
    pub resumed: bool,
    /// The EHLO keywords, upper case (`PIPELINING`, `SIZE`, `AUTH`, …).
    pub extensions: Vec<String>,
}

/// A server reply: its code and its lines (without CRLF).
pub(crate) struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

fn unexpected(what: &str, want: u16, r: &Reply) -> std::io::Error {
    // The server's own words, for the operator: never anything the client sent.
    std::io::Error::other(format!(
        "{what}: expected {want}, got {}",
        r.lines.last().map(String::as_str).unwrap_or("")
    ))
}

impl SmtpConn {
    pub(crate) async fn open(addr: SocketAddr, tls: &TlsConnector) -> std::io::Result<SmtpConn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let s = tls
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let resumed = matches!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let mut c = SmtpConn {
            io: Box::new(s),
            buf: Vec::with_capacity(4096),
            resumed,
            extensions: Vec::new(),
        };
        let greeting = c.reply().await?;
        if greeting.code != 220 {
            return Err(unexpected("greeting", 220, &greeting));
        }
        Ok(c)
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One reply, all its lines (`250-…` continues, `250 …` ends; RFC 5321 §4.2.1).
    pub(crate) async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                self.fill().await?;
                continue;
            };
            let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
            let text = String::from_utf8_lossy(&line).into_owned();
            let code = text
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| std::io::Error::other(format!("not an SMTP reply: {text}")))?;
            let more = line.get(3) == Some(&b'-');
            lines.push(text);
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    async fn expect(&mut self, what: &str, want: u16) -> std::io::Result<Reply> {
        let r = self.reply().await?;
        if r.code == want {
            Ok(r)
        } else {
            Err(unexpected(what, want, &r))
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    pub(crate) async fn ehlo(&mut self, name: &str) -> std::io::Result<()> {
        self.send(format!("EHLO {name}\r\n").as_bytes()).await?;
        let r = self.expect("EHLO", 250).await?;
        self.extensions = r
            .lines
            .iter()
            .skip(1)
            .filter_map(|l| l.get(4..))
            .filter_map(|kw| kw.split_whitespace().next())
            .map(str::to_ascii_uppercase)
            .collect();
        Ok(())
    }

    pub(crate) fn has(&self, keyword: &str) -> bool {
        self.extensions.iter().any(|k| k == keyword)
    }

    /// `AUTH PLAIN` with an initial response: empty authzid, `user`, `password`.
    pub(crate) async fn auth_plain(&mut self, user: &str, password: &str) -> std::io::Result<()> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.send(format!("AUTH PLAIN {b64}\r\n").as_bytes())
            .await?;
        self.expect("AUTH PLAIN", 235).await.map(|_| ())
    }

    /// One message: the envelope (pipelined when offered), `DATA`, the content and `.`.
    pub(crate) async fn message(
        &mut self,
        from: &str,
        rcpt: &str,
        content: &[u8],
    ) -> std::io::Result<()> {
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let rcpt_cmd = format!("RCPT TO:<{rcpt}>\r\n");
        if self.has("PIPELINING") {
            self.send(format!("{mail}{rcpt_cmd}DATA\r\n").as_bytes())
                .await?;
            self.expect("MAIL FROM", 250).await?;
            self.expect("RCPT TO", 250).await?;
            self.expect("DATA", 354).await?;
        } else {
            self.send(mail.as_bytes()).await?;
            self.expect("MAIL FROM", 250).await?;
            self.send(rcpt_cmd.as_bytes()).await?;
            self.expect("RCPT TO", 250).await?;
            self.send(b"DATA\r\n").await?;
            self.expect("DATA", 354).await?;
        }
        self.send(content).await?;
        self.expect("end of data", 250).await.map(|_| ())
    }

    pub(crate) async fn quit(&mut self) -> std::io::Result<()> {
        self.send(b"QUIT\r\n").await?;
        self.expect("QUIT", 221).await.map(|_| ())
    }
}

/// The body of every message: `size` bytes (near enough) of 76-character lines of letters and
/// spaces, none starting with a dot.
pub(crate) fn body(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 80);
    let mut x: u32 = 7;
    while out.len() + 78 <= size {
        for _ in 0..76 {
            // A small LCG: the same body on every run, no dependency.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            out.push(b"abcdefghijklmnopqrstuvwxyz "[((x >> 16) % 27) as usize]);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A whole message as sent after `354`: headers of its own, the shared body, `.`.
pub(crate) fn content(from: &str, rcpt: &str, id: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 300);
    m.extend_from_slice(
        format!(
            "From: <{from}>\r\nTo: <{rcpt}>\r\nSubject: bench {id}\r\n\
             Message-ID: <{id}@bench.test>\r\nDate: Mon, 07 Dec 2026 00:00:00 +0000\r\n\r\n"
        )
        .as_bytes(),
    );
    m.extend_from_slice(body);
    m.extend_from_slice(b".\r\n");
    m
}

/// CPU seconds of one process at one moment: its own (utime + stime) and its reaped
/// children's (cutime + cstime), and its command name.
#[derive(Clone)]
struct ProcCpu {
    comm: String,
    own: f64,
    reaped: f64,
}

/// Every process in the trees rooted at `roots`, by pid.
fn snapshot(roots: &[u32]) -> Option<HashMap<u32, ProcCpu>> {
    if roots.is_empty() {
        return None;
    }
    let mut all = HashMap::new();
    let mut parent = HashMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let ticks = 100.0; // USER_HZ on Linux
        parent.insert(pid, num(1) as u32);
        all.insert(
            pid,
            ProcCpu {
                comm,
                own: (num(11) + num(12)) / ticks,
                reaped: (num(13) + num(14)) / ticks,
            },
        );
    }
    let in_tree = |mut p: u32| {
        for _ in 0..64 {
            if roots.contains(&p) {
                return true;
            }
            match parent.get(&p) {
                Some(&pp) if pp != 0 => p = pp,
                _ => return false,
            }
        }
        false
    };
    let tree: HashMap<u32, ProcCpu> = all.into_iter().filter(|(p, _)| in_tree(*p)).collect();
    (!tree.is_empty()).then_some(tree)
}

/// CPU seconds between two snapshots: the total, and by command name (`exited`: processes
/// that ended in between, and children reaped in between).
fn cpu_between(
    before: &HashMap<u32, ProcCpu>,
    after: &HashMap<u32, ProcCpu>,
) -> (f64, BTreeMap<String, f64>) {
    let mut by = BTreeMap::new();
    let mut exited = 0.0;
    for (pid, a) in after {
        let b = before.get(pid);
        *by.entry(a.comm.clone()).or_insert(0.0) += a.own - b.map_or(0.0, |b| b.own);
        exited += a.reaped - b.map_or(0.0, |b| b.reaped);
    }
    for (pid, b) in before {
        if !after.contains_key(pid) {
            // Its time, counted before, is now in its parent's reaped time.
            exited -= b.own + b.reaped;
        }
    }
    by.insert("exited".to_owned(), exited);
    let total = by.values().sum();
    (total, by)
}

/// Files in Postfix's queues that hold messages not yet delivered.
fn queued(queue: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => count(&e.path()),
                Ok(_) => 1,
                Err(_) => 0,
            })
            .sum()
    }
    ["maildrop", "incoming", "active", "deferred", "hold"]
        .iter()
        .map(|q| count(&queue.join(q)))
        .sum()
}

/// Waits (up to 20 s) until Postfix's queue is empty; the messages still queued.
async fn drain(queue: Option<&str>) -> usize {
    let Some(q) = queue else { return 0 };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = queued(Path::new(q));
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one client task did.
#[derive(Default)]
struct Tally {
    message_lat: Vec<f64>,
    setup_lat: Vec<f64>,
    sessions: u64,
    resumed: u64,
    pipelining: Option<bool>,
}

pub(crate) struct SmtpArgs {
    pub addr: SocketAddr,
    pub users: Vec<(String, String)>,
    pub concurrency: usize,
    pub seconds: f64,
    pub auth: bool,
    pub per_session: usize,
    pub size: usize,
    pub rcpt: String,
    pub pids: Vec<u32>,
    pub backend_pids: Vec<u32>,
    pub queue: Option<String>,
    /// Each client runs exactly this many whole sessions instead of `seconds` (for a trace).
    pub sessions_per_client: Option<usize>,
    /// One session per user first (see [`warm_up`]); off for a profile taken right after a
    /// warm run, so that the profiler's window holds the measured messages only.
    pub warm_up: bool,
}

/// Opens a session: TLS, greeting, EHLO, AUTH PLAIN when asked.
async fn session(
    addr: SocketAddr,
    tls: &TlsConnector,
    auth: bool,
    user: &str,
    pw: &str,
) -> std::io::Result<SmtpConn> {
    let mut c = SmtpConn::open(addr, tls).await?;
    c.ehlo("client.bench.test").await?;
    if auth {
        c.auth_plain(user, pw).await?;
    }
    Ok(c)
}

/// One session per user before the clock starts, each with one message: the gateway's
/// verified-credential cache is warm (as in the IMAP warm runs), and Postfix has started the
/// smtpd, cleanup and delivery processes that the run will use.
async fn warm_up(a: &SmtpArgs, tls: &TlsConnector, body: &Arc<Vec<u8>>) -> u64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, (user, pw)) in a.users.iter().cloned().enumerate() {
        let (tls, sem, errors, body) = (tls.clone(), sem.clone(), errors.clone(), body.clone());
        let (addr, auth, rcpt) = (a.addr, a.auth, a.rcpt.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let r = async {
                let mut c = session(addr, &tls, auth, &user, &pw).await?;
                let m = content(&user, &rcpt, &format!("w{i}.{}", std::process::id()), &body);
                c.message(&user, &rcpt, &m).await?;
                c.quit().await
            }
            .await;
            if let Err(e) = r {
                if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("smtp warm-up error: {e}");
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    errors.load(Ordering::Relaxed)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn per_message(by: &BTreeMap<String, f64>, n: f64) -> BTreeMap<String, f64> {
    by.iter()
        .filter(|(_, &v)| v.abs() > 1e-9)
        .map(|(k, v)| (k.clone(), v * 1000.0 / n))
        .collect()
}

/// The run: `concurrency` clients, each looping sessions of `per_session` messages, for
/// `seconds`; the figures as JSON fields.
pub(crate) async fn run(a: &SmtpArgs, tls: TlsConnector) -> serde_json::Value {
    let body = Arc::new(body(a.size));
    let warm_errors = if a.warm_up {
        warm_up(a, &tls, &body).await
    } else {
        0
    };
    let left_before = drain(a.queue.as_deref()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let bytes_per_message = content("x", &a.rcpt, "x", &body).len();
    let me = [std::process::id()];
    let before = (snapshot(&a.pids), snapshot(&a.backend_pids), snapshot(&me));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..a.concurrency {
        let (user, pw) = a.users[i % a.users.len()].clone();
        let (tls, stop, errors, body) = (tls.clone(), stop.clone(), errors.clone(), body.clone());
        let (addr, auth, rcpt, per_session) = (a.addr, a.auth, a.rcpt.clone(), a.per_session);
        let limit = a.sessions_per_client;
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut seq = 0u64;
            let mut opened = 0;
            let go_on = |opened: usize| match limit {
                Some(n) => opened < n,
                None => !stop.load(Ordering::Relaxed),
            };
            while go_on(opened) {
                opened += 1;
                let r = async {
                    let s0 = Instant::now();
                    let mut c = session(addr, &tls, auth, &user, &pw).await?;
                    t.setup_lat.push(s0.elapsed().as_secs_f64());
                    t.sessions += 1;
                    t.resumed += u64::from(c.resumed);
                    t.pipelining.get_or_insert(c.has("PIPELINING"));
                    for k in 0..per_session {
                        if k > 0 && limit.is_none() && stop.load(Ordering::Relaxed) {
                            break;
                        }
                        seq += 1;
                        let id = format!("{i}.{seq}.{}", std::process::id());
                        let m = content(&user, &rcpt, &id, &body);
                        let m0 = Instant::now();
                        c.message(&user, &rcpt, &m).await?;
                        t.message_lat.push(m0.elapsed().as_secs_f64());
                    }
                    c.quit().await
                }
                .await;
                if let Err(e) = r {
                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("smtp error: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            t
        }));
    }
    if a.sessions_per_client.is_none() {
        tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        all.message_lat.extend(t.message_lat);
        all.setup_lat.extend(t.setup_lat);
        all.sessions += t.sessions;
        all.resumed += t.resumed;
        all.pipelining = all.pipelining.or(t.pipelining);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let left_after = drain(a.queue.as_deref()).await;
    let after = (snapshot(&a.pids), snapshot(&a.backend_pids), snapshot(&me));
    all.message_lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    all.setup_lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let n = all.message_lat.len() as f64;
    let cpu = |b: &Option<HashMap<u32, ProcCpu>>, a: &Option<HashMap<u32, ProcCpu>>| match (b, a) {
        (Some(b), Some(a)) if n > 0.0 => {
            let (total, by) = cpu_between(b, a);
            Some((total * 1000.0 / n, per_message(&by, n)))
        }
        _ => None,
    };
    let target = cpu(&before.0, &after.0);
    let backend = cpu(&before.1, &after.1);
    // The load generator's own CPU (TLS and all): on a machine that runs everything, the
    // clients' share of the cores is part of what sets the rate.
    let client = cpu(&before.2, &after.2);
    serde_json::json!({
        "concurrency": a.concurrency,
        "per_session": a.per_session,
        "auth": if a.auth { "plain" } else { "none" },
        "message_bytes": bytes_per_message,
        "messages": all.message_lat.len(),
        "sessions": all.sessions,
        "errors": errors.load(Ordering::Relaxed),
        "warm_up_errors": warm_errors,
        "seconds": elapsed,
        "per_second": n / elapsed,
        "mb_per_s": n * bytes_per_message as f64 / elapsed / 1e6,
        "p50_ms": percentile(&all.message_lat, 0.5) * 1000.0,
        "p99_ms": percentile(&all.message_lat, 0.99) * 1000.0,
        "session_setup_p50_ms": percentile(&all.setup_lat, 0.5) * 1000.0,
        "session_setup_p99_ms": percentile(&all.setup_lat, 0.99) * 1000.0,
        "pipelining": all.pipelining,
        "tls_resumed_fraction": if all.sessions > 0 { Some(all.resumed as f64 / all.sessions as f64) } else { None },
        "cpu_ms_per_message": target.as_ref().map(|x| x.0),
        "cpu_by_process": target.as_ref().map(|x| x.1.clone()),
        "backend_cpu_ms_per_message": backend.as_ref().map(|x| x.0),
        "backend_cpu_by_process": backend.as_ref().map(|x| x.1.clone()),
        "client_cpu_ms_per_message": client.as_ref().map(|x| x.0),
        "queued_before": left_before,
        "queued_after": left_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(comm: &str, own: f64, reaped: f64) -> ProcCpu {
        ProcCpu {
            comm: comm.to_owned(),
            own,
            reaped,
        }
    }

    /// A daemon that exits during the run (its time moved to the master's reaped time) and
    /// one started during the run are both counted, each once.
    #[test]
    fn cpu_of_processes_that_come_and_go_is_counted_once() {
        let before = HashMap::from([
            (1, p("master", 1.0, 5.0)),
            (10, p("smtpd", 2.0, 0.0)),
            (11, p("cleanup", 3.0, 0.0)),
        ]);
        // smtpd 10 ran 0.5 s more, then exited and was reaped (2.5 s to the master);
        // cleanup 11 ran 1 s; cleanup 12 started and ran 0.25 s; the master 0.1 s.
        let after = HashMap::from([
            (1, p("master", 1.1, 7.5)),
            (11, p("cleanup", 4.0, 0.0)),
            (12, p("cleanup", 0.25, 0.0)),
        ]);
        let (total, by) = cpu_between(&before, &after);
        assert!((total - 1.85).abs() < 1e-9, "{total}");
        assert!((by["cleanup"] - 1.25).abs() < 1e-9);
        assert!((by["exited"] - 0.5).abs() < 1e-9);
        assert!((by["master"] - 0.1).abs() < 1e-9);
    }

    /// No body line starts with a dot (no dot stuffing needed), every line ends in CRLF and
    /// the body is the size asked for, to a line.
    #[test]
    fn the_body_needs_no_dot_stuffing() {
        let b = body(51_200);
        assert!(b.len() <= 51_200 && b.len() > 51_200 - 78);
        assert!(b.ends_with(b"\r\n"));
        for line in b.split(|&c| c == b'\n') {
            assert!(!line.starts_with(b"."));
        }
        let m = content("a@bench.test", "sink@bench.test", "1", &b);
        assert!(m.ends_with(b"\r\n.\r\n"));
    }
}
