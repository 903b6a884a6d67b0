//! One client connection, from TCP accept to close:
//! TLS (implicit) → greeting → pre-auth dialogue (STARTTLS) → login → relay.
//!
//! The protocol decisions and every reply live in [`preauth`] (no sockets); the login — guard,
//! credential check, backend login — lives in [`crate::login`]. This file is the driver that
//! moves bytes between them and enforces every deadline (invariant 6): TLS handshake, pre-auth
//! idle, total time to authenticate, and — through `login`, `upstream` and `relay` — backend
//! connect/login and post-auth idle.

pub mod front;
pub mod imap;
pub mod pop3;
pub mod preauth;
pub mod relay;
pub mod smtp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Limits, Protocol};
use crate::login::{self, LoginResult};
use crate::observe::Metrics;
use crate::tls::{Conn, Wire};
use front::{Bye, Front, FrontConfig, Refused, Step, Welcome};
use preauth::{OAuthChallenges, PreAuthLimits};

/// Everything sessions share.
pub struct Shared {
    pub limits: Limits,
    /// Guard, authenticator, upstreams: everything a login needs.
    pub login: login::Services,
    pub metrics: Arc<Metrics>,
    /// Token mechanisms offered: their RFC 7628 error challenges.
    pub oauth: Option<Arc<OAuthChallenges>>,
    /// Sign-in approval: the sentence every failed password login's answer carries (IMAP: a
    /// `* NO [ALERT]` line), pointing at the portal.
    pub login_alert: Option<Arc<str>>,
    /// The same, as IMAP's `* NO [ALERT]` line (encoded once).
    pub login_alert_imap: Option<Arc<[u8]>>,
    pub next_id: AtomicU64,
    /// Cancelled when the gateway stops accepting: pre-auth sessions say BYE, relayed ones get
    /// `shutdown_grace`.
    pub stopping: CancellationToken,
}

/// The listener a connection came in on.
#[derive(Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// The client-facing TLS (ALPN per protocol; certificates shared by all listeners).
    pub acceptor: TlsAcceptor,
    /// SMTP: the gateway's name in its greeting and EHLO reply.
    pub hostname: Arc<str>,
    pub starttls: bool,
    /// A PROXY protocol header precedes each connection.
    pub proxy_protocol: bool,
}

/// Something that is told when the connection authenticates (admission's per-IP pre-auth
/// count) and released when the session ends (by drop).
pub trait AdmissionTicket: Send + Sync {
    fn authenticated(&mut self);
}

/// Decrements a gauge when dropped.
struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs one connection to its end. Never panics; every error ends in a reply or a close.
pub async fn run(
    shared: Arc<Shared>,
    listener: ListenerInfo,
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: Box<dyn AdmissionTicket>,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", id, peer = %peer, listener = %listener.name);
    async move {
        // Linux copies TCP_NODELAY from the listening socket (`server::bind_listener`).
        if !cfg!(target_os = "linux") {
            let _ = tcp.set_nodelay(true);
        }
        Session {
            shared,
            listener,
            peer,
            id,
            ticket,
        }
        .run(tcp)
        .await;
    }
    .instrument(span)
    .await;
}

struct Session {
    shared: Arc<Shared>,
    listener: ListenerInfo,
    peer: SocketAddr,
    id: u64,
    ticket: Box<dyn AdmissionTicket>,
}

impl Session {
    /// The TLS handshake. `first`, if any, is queued as the connection's first application
    /// data: the implicit-TLS greeting, which TLS 1.3 sends right behind the server's Finished
    /// (half-RTT data, see `tls::ServerTls`), so the client has it one round trip sooner and
    /// the gateway writes once instead of twice. Nothing from the client is read before the
    /// handshake completes.
    async fn handshake(&self, tcp: TcpStream, first: Option<&[u8]>) -> Option<Conn> {
        let m = &self.shared.metrics;
        let accept = self.listener.acceptor.accept_with(Wire::server(tcp), |c| {
            if let Some(bytes) = first {
                // Buffered by rustls until it may send application data.
                let _ = std::io::Write::write_all(&mut c.writer(), bytes);
            }
        });
        match tokio::time::timeout(self.shared.limits.tls_handshake_timeout, accept).await {
            Ok(Ok(mut s)) => {
                s.get_mut().0.handshake_done();
                Some(Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
            }
            Ok(Err(e)) => {
                let reason = HandshakeFailure::of(&e).as_str();
                m.tls_handshake_failures
                    .with_label_values(&[&self.listener.name, reason])
                    .inc();
                tracing::debug!(reason, "TLS handshake failed");
                None
            }
            Err(_) => {
                m.tls_handshake_failures
                    .with_label_values(&[&self.listener.name, HandshakeFailure::Timeout.as_str()])
                    .inc();
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }

    /// This connection's front, by the listener's protocol.
    fn front(&self, tls: bool) -> Box<dyn Front> {
        let l = &self.shared.limits;
        let cfg = FrontConfig {
            limits: PreAuthLimits {
                line_bytes: l.line_bytes,
                literal_bytes: l.literal_bytes,
                sasl_bytes: l.sasl_bytes,
                bad_commands_before_bye: l.bad_commands_before_bye,
                auth_failures_per_connection: l.auth_failures_per_connection,
            },
            starttls_listener: self.listener.starttls,
            oauth: self.shared.oauth.clone(),
            login_alert: self.shared.login_alert.clone(),
            login_alert_imap: self.shared.login_alert_imap.clone(),
            hostname: self.listener.hostname.clone(),
            smtp_extensions: match self.listener.protocol {
                Protocol::Smtp => self.shared.login.upstreams.smtp_extensions(),
                // Shared, so an IMAP or POP3 connection allocates nothing for it.
                _ => {
                    static NONE: std::sync::LazyLock<Arc<[String]>> =
                        std::sync::LazyLock::new(|| Arc::from(Vec::new()));
                    NONE.clone()
                }
            },
        };
        match self.listener.protocol {
            Protocol::Imap => Box::new(imap::ImapFront::new(&cfg, tls)),
            Protocol::Smtp => Box::new(smtp::SmtpFront::new(&cfg, tls)),
            Protocol::Pop3 => Box::new(pop3::Pop3Front::new(&cfg, tls)),
        }
    }

    async fn run(mut self, tcp: TcpStream) {
        let _preauth_gauge = GaugeGuard::new(&self.shared.metrics.sessions_preauth);
        let implicit = !self.listener.starttls;
        let sm = self.front(implicit);
        let conn = if implicit {
            match self.handshake(tcp, Some(&sm.greeting())).await {
                Some(c) => c,
                None => return,
            }
        } else {
            Conn::Plain(tcp)
        };
        let deadline = Instant::now() + self.shared.limits.preauth_total_timeout;
        let Some(end) = self.preauth(conn, sm, deadline, implicit).await else {
            return;
        };
        drop(_preauth_gauge);
        self.ticket.authenticated();
        self.relay(end).await;
    }

    /// Writes within the idle timeout and never past `deadline` (the total pre-auth time), so
    /// a client that reads slowly cannot stretch its pre-auth phase.
    async fn write(&self, conn: &mut Conn, bytes: &[u8], deadline: Instant) -> bool {
        let w = async {
            conn.write_all(bytes).await?;
            conn.flush().await
        };
        let until = deadline.min(Instant::now() + self.shared.limits.preauth_idle_timeout);
        matches!(tokio::time::timeout_at(until, w).await, Ok(Ok(())))
    }

    async fn close(&self, conn: &mut Conn, last: Option<&[u8]>) {
        if let Some(bytes) = last {
            // A last word (BYE) gets two seconds at most.
            let _ = self
                .write(conn, bytes, Instant::now() + Duration::from_secs(2))
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
    }

    /// The pre-auth loop. Returns the relay's ingredients after a successful login.
    async fn preauth(
        &mut self,
        mut conn: Conn,
        mut sm: Box<dyn Front>,
        deadline: Instant,
        greeted: bool,
    ) -> Option<RelayParts> {
        if !greeted && !self.write(&mut conn, &sm.greeting(), deadline).await {
            return None;
        }
        // Reads may carry a password: wipe the buffer when the session is done with it.
        let mut buf = zeroize::Zeroizing::new(vec![0u8; 4096]);
        loop {
            match sm.step() {
                Step::Send(bytes) => {
                    if !self.write(&mut conn, &bytes, deadline).await {
                        return None;
                    }
                }
                Step::Close => {
                    self.close(&mut conn, None).await;
                    return None;
                }
                Step::NeedInput => {
                    let idle = self.shared.limits.preauth_idle_timeout;
                    tokio::select! {
                        biased;
                        () = self.shared.stopping.cancelled() => {
                            let bye = sm.bye_now(Bye::Shutdown);
                            self.close(&mut conn, Some(&bye)).await;
                            return None;
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            let bye = sm.bye_now(Bye::Timeout);
                            self.close(&mut conn, Some(&bye)).await;
                            return None;
                        }
                        r = tokio::time::timeout(idle, conn.read(buf.as_mut_slice())) => match r {
                            Ok(Ok(0)) | Ok(Err(_)) => return None,
                            Ok(Ok(n)) => sm.feed(buf.get(..n).unwrap_or(&[])),
                            Err(_) => {
                                let bye = sm.bye_now(Bye::Idle);
                                self.close(&mut conn, Some(&bye)).await;
                                return None;
                            }
                        },
                    }
                }
                Step::StartTls => {
                    let Conn::Plain(tcp) = conn else { return None };
                    // Anything the client sent after STARTTLS is now inside the TLS stream's
                    // input and fails the handshake; nothing buffered before is kept.
                    conn = self.handshake(tcp, None).await?;
                    sm.tls_started();
                }
                Step::Authenticate(req) => {
                    let client = login::Client {
                        session: self.id,
                        listener: &self.listener.name,
                        peer: self.peer,
                        id: sm.client_id(),
                        protocol: self.listener.protocol,
                        helo: sm.helo(),
                    };
                    let result = self
                        .shared
                        .login
                        .login(client, req.mechanism, req.credential, deadline)
                        .await;
                    let refused = match result {
                        LoginResult::Ready(ready) => {
                            let welcome = match &ready.login_ok {
                                Some(ok) => Welcome::Imap(ok),
                                None => Welcome::Fixed,
                            };
                            let (ok, pipelined) = sm.succeeded(welcome);
                            if !self.write(&mut conn, &ok, deadline).await {
                                return None;
                            }
                            return Some(RelayParts {
                                client: conn,
                                pipelined,
                                ready,
                            });
                        }
                        LoginResult::TimedOut => {
                            let bye = sm.bye_now(Bye::Timeout);
                            self.close(&mut conn, Some(&bye)).await;
                            return None;
                        }
                        LoginResult::Failed { .. } | LoginResult::Throttled { .. } => {
                            Refused::Failed
                        }
                        LoginResult::TooManySessions => Refused::TooManySessions,
                        LoginResult::Unavailable => Refused::Unavailable,
                    };
                    sm.refused(refused);
                }
            }
        }
    }

    async fn relay(&self, parts: RelayParts) {
        let RelayParts {
            mut client,
            pipelined,
            ready,
        } = parts;
        let login::Ready {
            conn: mut backend,
            backend_extra,
            slot,
            backend: backend_name,
            user,
            until,
            login_ok: _,
        } = *ready;
        let m = &self.shared.metrics;
        let _gauge = GaugeGuard::new(&m.sessions_relayed);
        let started = Instant::now();
        // Invariant 3: what the client pipelined behind its login goes first, in order. These
        // writes are bounded like the relay itself.
        let l = &self.shared.limits;
        let first = async {
            if !pipelined.is_empty() {
                backend.write_all(&pipelined).await?;
                backend.flush().await?;
            }
            if !backend_extra.is_empty() {
                client.write_all(&backend_extra).await?;
                client.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        if !matches!(
            tokio::time::timeout(l.relay_idle_timeout, first).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let end = relay::run(
            &mut client,
            backend,
            relay::RelayLimits {
                idle: l.relay_idle_timeout,
                lifetime: match until {
                    // The token's remaining life, if shorter than the configured maximum.
                    Some(t) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        Duration::from_secs(t.saturating_sub(now)).min(l.max_session_lifetime)
                    }
                    None => l.max_session_lifetime,
                },
                shutdown_grace: l.shutdown_grace,
            },
            m.relay_bytes
                .with_label_values(&["to_backend", &backend_name]),
            m.relay_bytes
                .with_label_values(&["to_client", &backend_name]),
            self.shared.stopping.clone(),
            slot.revoked.clone(),
            (self.listener.protocol == Protocol::Smtp).then(relay::smtp::SmtpGuard::new),
        )
        .await;
        m.session_seconds.observe(started.elapsed().as_secs_f64());
        if let relay::RelayEnd::Refused(v) = end {
            tracing::warn!(user = %user, backend = %backend_name, violation = ?v, "relayed SMTP session ended: a command the backend trusts only from the gateway");
            self.close(&mut client, Some(v.reply())).await;
            crate::observe::audit_session_end(&crate::observe::SessionEndEvent {
                session: slot.id(),
                listener: &self.listener.name,
                client: self.peer,
                user: &user,
                credential: slot.credential(),
                backend: &backend_name,
                reason: v.as_str(),
                seconds: started.elapsed().as_secs(),
            });
        }
        if end == relay::RelayEnd::Revoked {
            // Ended from outside: the client gets a last word (RFC 3501 §7.1.5), then the
            // connection closes. (A client that turned on COMPRESS=DEFLATE cannot read it; it
            // sees the close.)
            let reason = slot.end_reason().unwrap_or(login::EndReason::Revoked);
            self.close(&mut client, Some(reason.bye(self.listener.protocol)))
                .await;
            crate::observe::audit_session_end(&crate::observe::SessionEndEvent {
                session: slot.id(),
                listener: &self.listener.name,
                client: self.peer,
                user: &user,
                credential: slot.credential(),
                backend: &backend_name,
                reason: reason.as_str(),
                seconds: started.elapsed().as_secs(),
            });
        }
        tracing::info!(user = %user, backend = %backend_name, end = ?end, seconds = started.elapsed().as_secs(), "session ended");
        drop(slot);
    }
}

/// Why a client handshake failed: the closed `reason` label of
/// `imapgate_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    /// The client offered ALPN without `imap` (ALPACA).
    Alpn,
    Incompatible,
    InvalidMessage,
    AlertReceived,
    TlsError,
    Io,
}

impl HandshakeFailure {
    fn of(e: &std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::NoApplicationProtocol) => HandshakeFailure::Alpn,
            Some(rustls::Error::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
            Some(rustls::Error::InvalidMessage(_)) => HandshakeFailure::InvalidMessage,
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::AlertReceived,
            Some(_) => HandshakeFailure::TlsError,
            None => HandshakeFailure::Io,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Alpn => "alpn",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::InvalidMessage => "invalid_message",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::TlsError => "tls_error",
            HandshakeFailure::Io => "io",
        }
    }
}

/// A logged-in session to relay: the client's connection, what it pipelined behind its login,
/// and the backend session.
struct RelayParts {
    client: Conn,
    pipelined: bytes::BytesMut,
    ready: Box<login::Ready>,
}
