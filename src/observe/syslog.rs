//! The audit log to a syslog server (`logging.audit: syslog`): RFC 5424 messages, octet-counted
//! (RFC 6587 §3.4.1), over TCP or TLS (RFC 5425).
//!
//! An audit line is framed where it is written and put on a bounded queue
//! ([`QUEUE_LINES`]) with `try_send`: a login never waits for the syslog. One thread of its own
//! (with a one-thread runtime, so the gateway's runtime is never involved) connects, writes
//! and reconnects with a growing pause; while the server is slow or away, lines wait in the
//! queue, and when it is full new ones are dropped, counted in `imapgate_audit_dropped_total`
//! and reported in the operational log. Every connect, handshake and write has a deadline.
//!
//! The message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, where PRI is the
//! facility × 8 + 6 (informational), MSGID is the event (`auth`, `guard`, `session`, `operator`), there
//! is no structured data, and MSG is the audit line itself (the `json` or `ecs` format).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::{SyslogConfig, SyslogTransport};

/// Audit lines waiting for the syslog, at most.
pub const QUEUE_LINES: usize = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Informational (RFC 5424 §6.2.1).
const SEVERITY: u8 = 6;

/// `imapgate_audit_dropped_total`: created before the registry (logging starts first) and
/// registered by [`super::Metrics::new`].
pub fn dropped_counter() -> Option<&'static IntCounter> {
    static C: OnceLock<Option<IntCounter>> = OnceLock::new();
    C.get_or_init(|| {
        IntCounter::new(
            "imapgate_audit_dropped_total",
            "Audit lines dropped because the syslog queue was full (the syslog slow or unreachable).",
        )
        .ok()
    })
    .as_ref()
}

fn dropped() -> u64 {
    dropped_counter().map_or(0, IntCounter::get)
}

/// The queue's sending side, shared by every audit line.
#[derive(Clone)]
pub(crate) struct SyslogWriter {
    tx: mpsc::Sender<Vec<u8>>,
    header: Arc<Header>,
}

struct Header {
    facility: u8,
    hostname: String,
    app_name: String,
    procid: u32,
}

static STATE: OnceLock<(mpsc::Sender<Vec<u8>>, Arc<AtomicBool>)> = OnceLock::new();

impl SyslogWriter {
    /// Starts the sending thread; fails only when the TLS setup (the CA file) cannot be read.
    pub(crate) fn start(cfg: &SyslogConfig) -> std::io::Result<SyslogWriter> {
        let tls = match cfg.transport {
            SyslogTransport::Tcp => None,
            SyslogTransport::Tls => Some(tls_connector(cfg)?),
        };
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let busy = Arc::new(AtomicBool::new(false));
        let _ = STATE.set((tx.clone(), busy.clone()));
        let sender = Sender {
            address: cfg.address.clone(),
            server_name: cfg.server_name.clone(),
            tls,
            busy,
        };
        std::thread::Builder::new()
            .name("audit-syslog".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(sender.run(rx)),
                    Err(e) => tracing::error!(error = %e, "audit syslog: no runtime; audit lines are dropped"),
                }
            })?;
        Ok(SyslogWriter {
            tx,
            header: Arc::new(Header {
                facility: cfg.facility,
                hostname: hostname(),
                app_name: cfg.app_name.clone(),
                procid: std::process::id(),
            }),
        })
    }

    /// One framed RFC 5424 message for an audit line; None for an empty line.
    fn frame(&self, line: &[u8]) -> Option<Vec<u8>> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let h = &self.header;
        let msg = format!(
            "<{}>1 {} {} {} {} {} - ",
            u16::from(h.facility) * 8 + u16::from(SEVERITY),
            timestamp(),
            h.hostname,
            h.app_name,
            h.procid,
            msgid(line),
        );
        let len = msg.len() + line.len();
        let mut out = format!("{len} {msg}").into_bytes();
        out.extend_from_slice(line);
        Some(out)
    }
}

/// The event of an audit line (`json`: `event`; `ecs`: `imapgate.event`), as MSGID.
fn msgid(line: &[u8]) -> &'static str {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
    let event = v
        .get("event")
        .and_then(|e| e.as_str())
        .or_else(|| v.get("imapgate")?.get("event")?.as_str());
    match event {
        Some("auth") => "auth",
        Some("guard") => "guard",
        Some("session") => "session",
        Some("operator") => "operator",
        _ => "audit",
    }
}

/// RFC 5424 §6.2.3: RFC 3339 in UTC, at most six fractional digits.
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

/// RFC 5424 §6.2.4 HOSTNAME: printable ASCII, at most 255, or `-`.
fn hostname() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let h: String = raw
        .trim()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(255)
        .collect();
    if h.is_empty() {
        "-".into()
    } else {
        h
    }
}

/// One audit line being written (the fmt layer writes a line in one go).
pub(crate) struct Line<'a> {
    w: &'a SyslogWriter,
    buf: Vec<u8>,
}

impl std::io::Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if let Some(msg) = self.w.frame(&self.buf) {
            if self.w.tx.try_send(msg).is_err() {
                if let Some(c) = dropped_counter() {
                    c.inc();
                }
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SyslogWriter {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Line<'a> {
        Line {
            w: self,
            buf: Vec::new(),
        }
    }
}

/// Waits (at most `timeout`) until the queued audit lines are written; at exit.
pub fn flush(timeout: Duration) {
    let Some((tx, busy)) = STATE.get() else {
        return;
    };
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if tx.capacity() == tx.max_capacity() && !busy.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Sender {
    address: String,
    server_name: String,
    tls: Option<tokio_rustls::TlsConnector>,
    busy: Arc<AtomicBool>,
}

impl Sender {
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.address),
        )
        .await
        .map_err(|_| timed_out())??;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| timed_out())??;
        Ok(Box::new(stream))
    }

    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>) {
        let mut pending: Option<Vec<u8>> = None;
        let mut backoff = BACKOFF_MIN;
        let mut down = false;
        let mut reported = 0;
        loop {
            let first = match pending.take() {
                Some(l) => l,
                None => match rx.recv().await {
                    Some(l) => l,
                    None => return,
                },
            };
            self.busy.store(true, Ordering::Release);
            let mut conn = match self.connect().await {
                Ok(c) => {
                    if down {
                        tracing::info!(address = %self.address, "audit syslog reachable again");
                    }
                    down = false;
                    backoff = BACKOFF_MIN;
                    c
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(address = %self.address, error = %e, "cannot reach the audit syslog; audit lines wait in a bounded queue");
                    }
                    down = true;
                    pending = Some(first);
                    report_drops(&mut reported);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let mut line = first;
            loop {
                let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                    conn.write_all(&line).await?;
                    conn.flush().await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    tracing::warn!(address = %self.address, "audit syslog connection lost; reconnecting");
                    down = true;
                    pending = Some(line);
                    break;
                }
                report_drops(&mut reported);
                if rx.is_empty() {
                    self.busy.store(false, Ordering::Release);
                }
                // Wait for the next line, noticing a server that closes the idle connection
                // (a syslog never sends anything; a read that ends means it is gone).
                let next = loop {
                    let mut probe = [0u8; 64];
                    tokio::select! {
                        l = rx.recv() => break Some(l),
                        r = conn.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) {
                            break None;
                        },
                    }
                };
                match next {
                    // Closed while idle: reconnect for the next line.
                    None => break,
                    Some(None) => return,
                    Some(Some(l)) => {
                        self.busy.store(true, Ordering::Release);
                        line = l;
                    }
                }
            }
        }
    }
}

fn report_drops(reported: &mut u64) {
    let now = dropped();
    if now > *reported {
        tracing::warn!(
            dropped = now - *reported,
            "audit lines dropped: the syslog queue was full"
        );
        *reported = now;
    }
}

fn tls_connector(cfg: &SyslogConfig) -> std::io::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(bad("no CA certificate to verify the syslog with".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_octet_counted_rfc5424() {
        let (tx, _rx) = mpsc::channel(1);
        let w = SyslogWriter {
            tx,
            header: Arc::new(Header {
                facility: 10,
                hostname: "gw-1".into(),
                app_name: "imapgate".into(),
                procid: 42,
            }),
        };
        let line = "{\"event\":\"auth\",\"user\":\"jörg@example.org\"}\n";
        let out = w.frame(line.as_bytes()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert!(msg.starts_with("<86>1 "), "{msg}");
        assert!(
            msg.ends_with(
                " gw-1 imapgate 42 auth - {\"event\":\"auth\",\"user\":\"jörg@example.org\"}"
            ),
            "{msg}"
        );
        assert!(w.frame(b"\n").is_none());
        assert_eq!(msgid(b"{\"imapgate\":{\"event\":\"guard\"}}"), "guard");
        assert_eq!(msgid(b"{\"event\":\"session\"}"), "session");
        assert_eq!(msgid(b"not json"), "audit");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let w = SyslogWriter {
            tx,
            header: Arc::new(Header {
                facility: 4,
                hostname: "-".into(),
                app_name: "imapgate".into(),
                procid: 1,
            }),
        };
        let before = dropped();
        use std::io::Write as _;
        for _ in 0..3 {
            let mut l = tracing_subscriber::fmt::MakeWriter::make_writer(&w);
            l.write_all(b"{\"event\":\"auth\"}\n").unwrap();
        }
        assert_eq!(dropped() - before, 2);
    }
}
