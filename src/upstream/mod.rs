//! The backend side: routing, connecting (verified TLS, STARTTLS or plain), logging in as the
//! user with the master credential, and periodic health probes.
//!
//! Every wait has a deadline (invariant 6): `connect_timeout` covers resolving and TCP connect,
//! `login_timeout` covers TLS, the greeting and the whole login dialogue.

mod lines;
pub mod login;
pub mod pop3;
pub mod smtp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, BackendTls, Config, Protocol};
use crate::imap;
use crate::observe::{Health, Metrics};
use crate::secret::Secret;
use crate::tls::{self, Conn, Wire};
use login::{LoginError, UpStep, UpstreamLogin};

/// Why no backend session could be made (a closed set: metric label and audit reason).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("TLS with the backend failed: {0}")]
    Tls(String),
    #[error("backend closed the connection")]
    Closed,
    #[error(transparent)]
    Login(#[from] LoginError),
}

impl UpstreamError {
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Closed => "closed",
            UpstreamError::Login(e) => e.as_str(),
        }
    }
}

/// A logged-in backend session.
pub struct Opened {
    pub conn: Conn,
    /// IMAP: the client's tagged OK with the capabilities it may see.
    pub login_ok: Option<Arc<imap::LoginOk>>,
    /// Bytes the backend sent past its final login reply.
    pub extra: BytesMut,
}

/// A backend ready to be connected to: its config and prebuilt TLS client config.
pub struct Backend {
    pub config: BackendConfig,
    tls: Option<(TlsConnector, rustls_pki_types::ServerName<'static>)>,
    /// The last capability list this backend answered a login with, and the client's reply
    /// made from it (the list rarely changes; a new one replaces it).
    login_ok: std::sync::Mutex<Option<(Vec<String>, Arc<imap::LoginOk>)>>,
}

impl Backend {
    pub fn new(config: BackendConfig) -> Result<Self, tls::TlsError> {
        let tls = match config.tls {
            BackendTls::None => None,
            BackendTls::Implicit | BackendTls::Starttls => Some((
                TlsConnector::from(tls::client_config(&config)?),
                tls::backend_server_name(&config)?,
            )),
        };
        Ok(Self {
            config,
            tls,
            login_ok: std::sync::Mutex::new(None),
        })
    }

    /// The client's login reply for the capabilities the backend announced after login.
    fn login_ok(&self, backend_caps: Vec<String>) -> Arc<imap::LoginOk> {
        let mut memo = self.login_ok.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((caps, ok)) = memo.as_ref() {
            if *caps == backend_caps {
                return ok.clone();
            }
        }
        let visible = login::client_capabilities(&backend_caps);
        let ok = Arc::new(imap::LoginOk::new(&imap::capabilities(
            visible.iter().map(String::as_str),
        )));
        *memo = Some((backend_caps, ok.clone()));
        ok
    }

    async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let target = (self.config.host.as_str(), self.config.port);
        let attempt = async {
            let addrs = tokio::net::lookup_host(target)
                .await
                .map_err(|e| UpstreamError::Connect(e.kind().to_string()))?;
            let mut last = UpstreamError::Connect("no address".into());
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = UpstreamError::Connect(e.kind().to_string()),
                }
            }
            Err(last)
        };
        tokio::time::timeout(self.config.connect_timeout, attempt)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    async fn tls_upgrade(&self, tcp: TcpStream) -> Result<Conn, UpstreamError> {
        let Some((connector, name)) = &self.tls else {
            return Ok(Conn::Plain(tcp));
        };
        let s = connector
            .connect(name.clone(), Wire::open(tcp))
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
    }

    /// Connects and logs in as `user` (`helo`: the SMTP client's EHLO name); returns the
    /// stream, for IMAP the client's login reply (with the capabilities the client may see), and
    /// any bytes the backend sent past its final reply.
    pub async fn open(
        &self,
        user: &str,
        client: SocketAddr,
        helo: Option<&str>,
    ) -> Result<Opened, UpstreamError> {
        let _ = helo;
        let mut machine = UpstreamLogin::new(&self.config, user, client)?;
        let tcp = self.connect_tcp().await?;
        let dialogue = async {
            let mut conn = match self.config.tls {
                BackendTls::Implicit => self.tls_upgrade(tcp).await?,
                BackendTls::Starttls | BackendTls::None => Conn::Plain(tcp),
            };
            // Login replies are a few lines: a small buffer, filled without zeroing it first.
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                match machine.step() {
                    UpStep::Send(bytes) => conn
                        .write_all(&bytes)
                        .await
                        .map_err(|_| UpstreamError::Closed)?,
                    UpStep::NeedInput => {
                        conn.flush().await.map_err(|_| UpstreamError::Closed)?;
                        buf.clear();
                        let n = conn
                            .read_buf(&mut buf)
                            .await
                            .map_err(|_| UpstreamError::Closed)?;
                        if n == 0 {
                            return Err(UpstreamError::Closed);
                        }
                        machine.feed(&buf);
                    }
                    UpStep::StartTls => {
                        let Conn::Plain(tcp) = conn else {
                            return Err(UpstreamError::Tls("already TLS".into()));
                        };
                        conn = self.tls_upgrade(tcp).await?;
                        machine.tls_started();
                    }
                    UpStep::Done(caps) => {
                        return Ok(Opened {
                            conn,
                            login_ok: Some(self.login_ok(caps)),
                            extra: machine.take_remaining(),
                        });
                    }
                    UpStep::Fail(e) => return Err(e.into()),
                }
            }
        };
        tokio::time::timeout(self.config.login_timeout, dialogue)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// For `imapgate doctor`: connect, TLS (implicit or STARTTLS) verified as in production,
    /// the greeting and the capabilities, then LOGOUT. Returns the capabilities line, or what
    /// went wrong (the backend's own text is not repeated, only what step failed).
    pub async fn diagnose(&self) -> Result<String, String> {
        let tcp = self
            .connect_tcp()
            .await
            .map_err(|e| format!("connect: {}", describe(&e)))?;
        let check = async {
            let mut conn = match self.config.tls {
                BackendTls::Implicit => self
                    .tls_upgrade(tcp)
                    .await
                    .map_err(|e| format!("TLS: {}", describe(&e)))?,
                _ => Conn::Plain(tcp),
            };
            let mut lines = LineReader::default();
            let greeting = lines.next(&mut conn).await?;
            if !greeting.starts_with("* OK") {
                return Err("the greeting is not `* OK` (PREAUTH or BYE?)".into());
            }
            if self.config.tls == BackendTls::Starttls {
                conn.write_all(b"d0 STARTTLS\r\n")
                    .await
                    .map_err(|_| "closed".to_owned())?;
                let reply = lines.tagged(&mut conn, "d0").await?;
                if !reply.starts_with("d0 OK") {
                    return Err("STARTTLS refused".into());
                }
                let Conn::Plain(tcp) = conn else {
                    return Err("unexpected TLS".into());
                };
                conn = self
                    .tls_upgrade(tcp)
                    .await
                    .map_err(|e| format!("TLS after STARTTLS: {}", describe(&e)))?;
                lines = LineReader::default();
            }
            conn.write_all(b"d1 CAPABILITY\r\n")
                .await
                .map_err(|_| "closed".to_owned())?;
            let mut caps = String::new();
            loop {
                let l = lines.next(&mut conn).await?;
                if let Some(c) = l.strip_prefix("* CAPABILITY ") {
                    caps = c.trim_end().to_owned();
                } else if l.starts_with("d1 ") {
                    break;
                }
            }
            let _ = conn.write_all(b"d2 LOGOUT\r\n").await;
            let _ = conn.shutdown().await;
            Ok(caps)
        };
        tokio::time::timeout(self.config.login_timeout, check)
            .await
            .map_err(|_| "no answer within login_timeout".to_owned())?
    }

    /// For `imapgate doctor --user`: the master login as `user` (as a session makes it), then
    /// `CAPABILITY`, then LOGOUT. Returns every capability the backend announced after the
    /// login (in its OK and in the CAPABILITY reply), or what went wrong.
    pub async fn diagnose_login(&self, user: &str) -> Result<Vec<String>, String> {
        let client = SocketAddr::from(([127, 0, 0, 1], 0));
        let Opened {
            mut conn,
            extra: rest,
            ..
        } = self
            .open(user, client, None)
            .await
            .map_err(|e| format!("master login as {user}: {}", describe(&e)))?;
        let mut caps = self
            .login_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(c, _)| c.clone())
            .unwrap_or_default();
        let check = async {
            conn.write_all(b"d3 CAPABILITY\r\n")
                .await
                .map_err(|_| "closed".to_owned())?;
            let mut lines = LineReader { buf: rest.to_vec() };
            loop {
                let l = lines.next(&mut conn).await?;
                if let Some(c) = l.strip_prefix("* CAPABILITY ") {
                    caps.extend(c.split_whitespace().map(str::to_owned));
                } else if l.starts_with("d3 ") {
                    break;
                }
            }
            let _ = conn.write_all(b"d4 LOGOUT\r\n").await;
            let _ = conn.shutdown().await;
            Ok::<_, String>(())
        };
        tokio::time::timeout(self.config.login_timeout, check)
            .await
            .map_err(|_| "no answer to CAPABILITY after login within login_timeout".to_owned())?
            .map_err(|e| format!("after login as {user}: {e}"))?;
        Ok(caps)
    }

    /// Health probe: connect, (TLS), read an OK greeting, LOGOUT.
    pub async fn probe(&self) -> bool {
        let Ok(tcp) = self.connect_tcp().await else {
            return false;
        };
        let check = async {
            let mut conn = match self.config.tls {
                BackendTls::Implicit => self.tls_upgrade(tcp).await.ok()?,
                _ => Conn::Plain(tcp),
            };
            let mut buf = [0u8; 512];
            let n = conn.read(&mut buf).await.ok()?;
            let ok = buf.get(..n).is_some_and(|g| g.starts_with(b"* OK"));
            let _ = conn.write_all(b"p LOGOUT\r\n").await;
            let _ = conn.shutdown().await;
            Some(ok)
        };
        tokio::time::timeout(self.config.login_timeout, check)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

/// An upstream error in words for an operator (doctor); never the backend's own text.
pub fn describe(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Connect(k) => format!("cannot connect ({k})"),
        UpstreamError::Timeout => "timed out".into(),
        UpstreamError::Tls(m) => m.clone(),
        UpstreamError::Closed => "the backend closed the connection".into(),
        UpstreamError::Login(l) => format!("login refused ({})", l.as_str()),
    }
}

/// Reads CRLF lines for the doctor's short dialogue (bounded: 64 KiB per line).
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    async fn next(&mut self, conn: &mut Conn) -> Result<String, String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > 64 * 1024 {
                return Err("a line longer than 64 KiB".into());
            }
            let mut chunk = [0u8; 4096];
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(|_| "the backend closed the connection".to_owned())?;
            if n == 0 {
                return Err("the backend closed the connection".into());
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }

    async fn tagged(&mut self, conn: &mut Conn, tag: &str) -> Result<String, String> {
        loop {
            let l = self.next(conn).await?;
            if l.starts_with(&format!("{tag} ")) {
                return Ok(l);
            }
        }
    }
}

/// The SASL PLAIN response `base64(authzid \0 authcid \0 password)` (RFC 4616 §2) for the
/// SMTP and POP3 logins; every copy of the credential is a [`Secret`].
pub(crate) fn plain_response(authzid: &[u8], authcid: &[u8], password: &[u8]) -> Secret {
    use base64::Engine as _;
    let mut raw = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
    raw.extend_from_slice(authzid);
    raw.push(0);
    raw.extend_from_slice(authcid);
    raw.push(0);
    raw.extend_from_slice(password);
    let raw = Secret::new(raw);
    // Sized up front, so the encoder never reallocates and leaves a copy behind.
    let mut encoded = String::with_capacity(raw.len().div_ceil(3) * 4);
    base64::engine::general_purpose::STANDARD.encode_string(raw.expose(), &mut encoded);
    Secret::from(encoded)
}

/// All backends, routed by the user's domain.
pub struct Upstreams {
    /// Replaced as a whole on reload; sessions keep the backend they logged into.
    inner: std::sync::RwLock<Arc<Inner>>,
}

struct Inner {
    backends: Vec<Arc<Backend>>,
    config: Arc<Config>,
}

impl Upstreams {
    pub fn new(config: Arc<Config>) -> Result<Self, tls::TlsError> {
        Ok(Self {
            inner: std::sync::RwLock::new(Arc::new(Self::build(config)?)),
        })
    }

    fn build(config: Arc<Config>) -> Result<Inner, tls::TlsError> {
        let backends = config
            .backends
            .iter()
            .cloned()
            .map(|b| Backend::new(b).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Inner { backends, config })
    }

    /// New backends and routes (reload); an error keeps the old ones.
    pub fn reconfigure(&self, config: Arc<Config>) -> Result<(), tls::TlsError> {
        let inner = Arc::new(Self::build(config)?);
        match self.inner.write() {
            Ok(mut i) => *i = inner,
            Err(poisoned) => *poisoned.into_inner() = inner,
        }
        Ok(())
    }

    fn current(&self) -> Arc<Inner> {
        match self.inner.read() {
            Ok(i) => i.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The backend of `protocol` for a (normalised) user.
    pub fn route(&self, protocol: Protocol, user: &str) -> Option<Arc<Backend>> {
        let inner = self.current();
        let b = inner.config.route(protocol, user)?;
        inner
            .backends
            .iter()
            .find(|x| x.config.name == b.name)
            .cloned()
    }

    /// The service extensions (EHLO keywords and parameters, AUTH, STARTTLS and XCLIENT left
    /// out) of the default SMTP backend, as last seen; a conservative list before it answered.
    pub fn smtp_extensions(&self) -> Arc<[String]> {
        Arc::from(
            ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
                .map(String::from)
                .to_vec(),
        )
    }

    /// Probes every backend each `every` until cancelled, updating `/readyz` and the metric.
    pub async fn health_loop(
        self: Arc<Self>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        every: Duration,
        stop: CancellationToken,
    ) {
        loop {
            let inner = self.current();
            for b in &inner.backends {
                let started = Instant::now();
                let up = b.probe().await;
                if let Some(was) = health.set_backend(&b.config.name, up) {
                    if was != up {
                        tracing::info!(backend = %b.config.name, up, elapsed_ms = started.elapsed().as_millis() as u64, "backend health changed");
                    }
                }
                metrics
                    .backend_up
                    .with_label_values(&[&b.config.name])
                    .set(i64::from(up));
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}
