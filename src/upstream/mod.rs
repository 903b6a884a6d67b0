//! The backend side: routing, connecting (verified TLS, STARTTLS or plain), logging in as the
//! user, and periodic health probes, for IMAP, SMTP submission and POP3 backends.
//!
//! Each protocol's login is a state machine without sockets — [`login`] (IMAP: master user or
//! AUTHENTICATE PLAIN with an authzid), [`smtp`] (XCLIENT or AUTH PLAIN), [`pop3`] (USER/PASS
//! with a master user or AUTH PLAIN) — and one connection loop here drives all three.
//!
//! Every wait has a deadline (invariant 6): `connect_timeout` covers resolving and TCP connect,
//! `login_timeout` covers TLS, the greeting and the whole login dialogue.

mod diagnose;
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
use pop3::Pop3Login;
use smtp::SmtpLogin;

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
    /// IMAP: the client's tagged OK with the capabilities it may see; `None` for SMTP and
    /// POP3.
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
    /// SMTP: the extensions the client may see, as the last EHLO (probe or handover) had them.
    extensions: std::sync::Mutex<Option<Arc<[String]>>>,
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
            extensions: std::sync::Mutex::new(None),
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
    /// any bytes the backend sent past its final reply. An SMTP handover also refreshes the
    /// backend's extensions ([`Upstreams::smtp_extensions`]).
    pub async fn open(
        &self,
        user: &str,
        client: SocketAddr,
        helo: Option<&str>,
    ) -> Result<Opened, UpstreamError> {
        match self.config.protocol {
            Protocol::Imap => {
                let mut machine = UpstreamLogin::new(&self.config, user, client)?;
                let (conn, caps) = self.converse(&mut machine).await?;
                Ok(Opened {
                    conn,
                    login_ok: Some(self.login_ok(caps)),
                    extra: machine.take_remaining(),
                })
            }
            Protocol::Smtp => {
                let mut machine = SmtpLogin::new(&self.config, user, client, helo)?;
                let (conn, extensions) = self.converse(&mut machine).await?;
                self.remember_extensions(&extensions);
                Ok(Opened {
                    conn,
                    login_ok: None,
                    extra: machine.take_remaining(),
                })
            }
            Protocol::Pop3 => {
                let mut machine = Pop3Login::new(&self.config, user, client)?;
                let (conn, _) = self.converse(&mut machine).await?;
                Ok(Opened {
                    conn,
                    login_ok: None,
                    extra: machine.take_remaining(),
                })
            }
        }
    }

    /// Connects and runs a login machine to its end: TLS when the config says so (implicit,
    /// or when the machine asks after STARTTLS/STLS), every write and read under
    /// `login_timeout`. Returns the stream and what the machine finished with.
    async fn converse<D: Dialogue>(
        &self,
        machine: &mut D,
    ) -> Result<(Conn, Vec<String>), UpstreamError> {
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
                        conn.flush().await.map_err(|_| UpstreamError::Closed)?;
                        let Conn::Plain(tcp) = conn else {
                            return Err(UpstreamError::Tls("already TLS".into()));
                        };
                        conn = self.tls_upgrade(tcp).await?;
                        machine.tls_started();
                    }
                    UpStep::Done(result) => return Ok((conn, result)),
                    UpStep::Fail(e) => return Err(e.into()),
                }
            }
        };
        tokio::time::timeout(self.config.login_timeout, dialogue)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// Says goodbye (`QUIT`, `LOGOUT`) and closes, without waiting for more than
    /// `login_timeout`; what the backend answers does not matter.
    async fn goodbye(&self, mut conn: Conn, command: &[u8]) {
        let bye = async {
            let _ = conn.write_all(command).await;
            let _ = conn.shutdown().await;
        };
        let _ = tokio::time::timeout(self.config.login_timeout, bye).await;
    }

    /// Keeps what the client may see of the extensions an SMTP backend announced.
    fn remember_extensions(&self, extensions: &[String]) {
        let visible = smtp::client_extensions(extensions);
        let mut memo = self.extensions.lock().unwrap_or_else(|e| e.into_inner());
        if memo.as_deref() != Some(visible.as_slice()) {
            *memo = Some(Arc::from(visible));
        }
    }

    /// The SMTP extensions the client may see, as this backend last announced them (after a
    /// probe or a handover); `None` before it answered.
    pub fn smtp_extensions(&self) -> Option<Arc<[String]>> {
        self.extensions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Health probe. IMAP: connect, (TLS), an OK greeting, LOGOUT. SMTP: the greeting, EHLO
    /// (and STARTTLS with EHLO again), whose extensions are remembered, then QUIT. POP3: the
    /// `+OK` greeting (and STLS), then QUIT.
    pub async fn probe(&self) -> bool {
        match self.config.protocol {
            Protocol::Imap => self.probe_imap().await,
            Protocol::Smtp => {
                let mut machine = SmtpLogin::probe(&self.config);
                let Ok((conn, extensions)) = self.converse(&mut machine).await else {
                    return false;
                };
                self.remember_extensions(&extensions);
                self.goodbye(conn, b"QUIT\r\n").await;
                true
            }
            Protocol::Pop3 => {
                let mut machine = Pop3Login::probe(&self.config);
                let Ok((conn, _)) = self.converse(&mut machine).await else {
                    return false;
                };
                self.goodbye(conn, b"QUIT\r\n").await;
                true
            }
        }
    }

    async fn probe_imap(&self) -> bool {
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
        UpstreamError::Login(LoginError::NoXclient) => format!(
            "login refused ({}): the backend's EHLO offers no XCLIENT with LOGIN and ADDR to the gateway; Postfix offers it only to hosts in smtpd_authorized_xclient_hosts",
            LoginError::NoXclient.as_str()
        ),
        UpstreamError::Login(l) => format!("login refused ({})", l.as_str()),
    }
}

/// What the connection loop needs of a login machine (IMAP, SMTP, POP3): bytes in, steps out.
trait Dialogue {
    fn step(&mut self) -> UpStep;
    fn feed(&mut self, bytes: &[u8]);
    fn tls_started(&mut self);
}

macro_rules! dialogue {
    ($($t:ty),*) => {$(
        impl Dialogue for $t {
            fn step(&mut self) -> UpStep {
                <$t>::step(self)
            }
            fn feed(&mut self, bytes: &[u8]) {
                <$t>::feed(self, bytes)
            }
            fn tls_started(&mut self) {
                <$t>::tls_started(self)
            }
        }
    )*};
}

dialogue!(UpstreamLogin, SmtpLogin, Pop3Login);

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

    /// New backends and routes (reload); an error keeps the old ones. A backend whose config
    /// did not change keeps the SMTP extensions it announced, so clients do not fall back to
    /// the conservative list until the next probe.
    pub fn reconfigure(&self, config: Arc<Config>) -> Result<(), tls::TlsError> {
        let inner = Self::build(config)?;
        let old = self.current();
        for b in &inner.backends {
            if let Some(same) = old.backends.iter().find(|o| o.config == b.config) {
                if let Some(ext) = same.smtp_extensions() {
                    *b.extensions.lock().unwrap_or_else(|e| e.into_inner()) = Some(ext);
                }
            }
        }
        let inner = Arc::new(inner);
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

    /// The service extensions (EHLO keywords and parameters; AUTH, STARTTLS, XCLIENT and
    /// XFORWARD left out) of the default SMTP route's backend, as its last probe or handover
    /// saw them; a conservative list before it answered (or with no SMTP backend).
    pub fn smtp_extensions(&self) -> Arc<[String]> {
        let inner = self.current();
        inner
            .config
            .routes
            .get(&Protocol::Smtp)
            // `backends` is built from `config.backends` in order: the route's index holds.
            .and_then(|r| inner.backends.get(r.default))
            .and_then(|b| b.smtp_extensions())
            .unwrap_or_else(|| {
                Arc::from(
                    ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
                        .map(String::from)
                        .to_vec(),
                )
            })
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
