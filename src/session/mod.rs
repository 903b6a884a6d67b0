//! One client connection, from TCP accept to close:
//! TLS (implicit) → greeting → pre-auth dialogue (STARTTLS) → guard → authenticator →
//! upstream login → relay.
//!
//! The protocol decisions live in [`preauth`] (no sockets); this file is the driver that moves
//! bytes and enforces every deadline (invariant 6): TLS handshake, pre-auth idle, total time to
//! authenticate, and — through `upstream` and `relay` — backend connect/login and post-auth idle.

pub mod preauth;
pub mod relay;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{self, Attempt, Authenticator, Credential, Outcome};
use crate::config::Limits;
use crate::guard::{AttemptKey, Guard, Kind, Outcome as GuardOutcome, Verdict};
use crate::observe::{self, AuditEvent, Metrics};
use crate::tls::{Conn, Wire};
use crate::upstream::Upstreams;
use preauth::{LoginRequest, PreAuth, PreAuthLimits, Step};

/// Everything sessions share.
pub struct Shared {
    pub limits: Limits,
    pub acceptor: TlsAcceptor,
    pub authenticator: Arc<dyn Authenticator>,
    pub guard: Arc<Guard>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    pub failure_floor: Duration,
    /// Token mechanisms offered: the discovery URL and scope for the error challenge.
    pub oauth: Option<(Option<String>, String)>,
    pub user_sessions: UserSessions,
    pub next_id: AtomicU64,
    /// Cancelled when the gateway stops accepting: pre-auth sessions say BYE, relayed ones get
    /// `shutdown_grace`.
    pub stopping: CancellationToken,
}

/// The listener a connection came in on.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub starttls: bool,
    /// A PROXY protocol header precedes each connection.
    pub proxy_protocol: bool,
}

/// Something that is told when the connection authenticates (admission's per-IP pre-auth
/// count) and released when the session ends (by drop).
pub trait AdmissionTicket: Send + Sync {
    fn authenticated(&mut self);
}

/// Relayed sessions per user, capped by `max_sessions_per_user`; each with a token that
/// closes it when its credential is revoked (`auth.revoke_closes_sessions`).
#[derive(Default, Clone)]
pub struct UserSessions {
    map: Arc<Mutex<HashMap<String, Vec<SessionEntry>>>>,
}

struct SessionEntry {
    id: u64,
    credential_id: String,
    revoked: CancellationToken,
}

/// A held slot; dropping it frees the slot.
pub struct UserSlot {
    map: Arc<Mutex<HashMap<String, Vec<SessionEntry>>>>,
    user: String,
    id: u64,
    pub revoked: CancellationToken,
}

impl UserSessions {
    pub fn try_acquire(
        &self,
        user: &str,
        credential_id: &str,
        session: u64,
        max: u32,
    ) -> Option<UserSlot> {
        let mut map = self.map.lock().ok()?;
        let list = map.entry(user.to_owned()).or_default();
        if list.len() >= max as usize {
            return None;
        }
        let revoked = CancellationToken::new();
        list.push(SessionEntry {
            id: session,
            credential_id: credential_id.to_owned(),
            revoked: revoked.clone(),
        });
        Some(UserSlot {
            map: self.map.clone(),
            user: user.to_owned(),
            id: session,
            revoked,
        })
    }

    /// Closes the sessions whose user is gone or disabled, or whose app password is no longer
    /// active in `file`. Returns how many were closed.
    pub fn close_revoked(&self, file: &crate::auth::users::UsersFile) -> usize {
        let Ok(map) = self.map.lock() else { return 0 };
        let now = time::OffsetDateTime::now_utc();
        let mut closed = 0;
        for (user, list) in map.iter() {
            let entry = file.users.get(user).filter(|u| !u.disabled);
            for s in list {
                // Token sessions have no app password (and their user need not be listed):
                // only disabling the user ends them.
                let active = if s.credential_id.starts_with("oauth:") {
                    !file.users.get(user).is_some_and(|u| u.disabled)
                } else {
                    entry.is_some_and(|u| {
                        u.app_passwords
                            .iter()
                            .any(|a| a.id == s.credential_id && a.is_active(now))
                    })
                };
                if !active && !s.revoked.is_cancelled() {
                    s.revoked.cancel();
                    closed += 1;
                }
            }
        }
        if closed > 0 {
            tracing::info!(sessions = closed, "closed sessions of revoked credentials");
        }
        closed
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(list) = map.get_mut(&self.user) {
                list.retain(|s| s.id != self.id);
                if list.is_empty() {
                    map.remove(&self.user);
                }
            }
        }
    }
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

/// How a login attempt ended, for the driver.
enum LoginEnd {
    Relay {
        conn: Conn,
        ok: Vec<u8>,
        pipelined: bytes::BytesMut,
        backend_extra: bytes::BytesMut,
        slot: UserSlot,
        backend: String,
        user: String,
        until: Option<u64>,
    },
    Continue(PreAuth),
}

impl Session {
    /// The TLS handshake. `first`, if any, is queued as the connection's first application
    /// data: the implicit-TLS greeting, which TLS 1.3 sends right behind the server's Finished
    /// (half-RTT data, see `tls::ServerTls`), so the client has it one round trip sooner and
    /// the gateway writes once instead of twice. Nothing from the client is read before the
    /// handshake completes.
    async fn handshake(&self, tcp: TcpStream, first: Option<&[u8]>) -> Option<Conn> {
        let m = &self.shared.metrics;
        let accept = self.shared.acceptor.accept_with(Wire::server(tcp), |c| {
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
                let reason = handshake_failure_reason(&e);
                m.tls_handshake_failures
                    .with_label_values(&[&self.listener.name, reason])
                    .inc();
                tracing::debug!(reason, "TLS handshake failed");
                None
            }
            Err(_) => {
                m.tls_handshake_failures
                    .with_label_values(&[&self.listener.name, "timeout"])
                    .inc();
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }

    async fn run(mut self, tcp: TcpStream) {
        let _preauth_gauge = GaugeGuard::new(&self.shared.metrics.sessions_preauth);
        let l = &self.shared.limits;
        let implicit = !self.listener.starttls;
        let sm = PreAuth::new(
            PreAuthLimits {
                line_bytes: l.line_bytes,
                literal_bytes: l.literal_bytes,
                sasl_bytes: l.sasl_bytes,
                bad_commands_before_bye: l.bad_commands_before_bye,
                auth_failures_per_connection: l.auth_failures_per_connection,
            },
            self.listener.starttls,
            implicit,
        )
        .with_oauth(self.shared.oauth.is_some());
        let conn = if implicit {
            match self.handshake(tcp, Some(sm.greeting())).await {
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
        mut sm: PreAuth,
        deadline: Instant,
        greeted: bool,
    ) -> Option<RelayParts> {
        if !greeted && !self.write(&mut conn, sm.greeting(), deadline).await {
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
                            let bye = sm.bye_now("Server shutting down");
                            self.close(&mut conn, Some(&bye)).await;
                            return None;
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            let bye = sm.bye_now("Authentication timeout");
                            self.close(&mut conn, Some(&bye)).await;
                            return None;
                        }
                        r = tokio::time::timeout(idle, conn.read(buf.as_mut_slice())) => match r {
                            Ok(Ok(0)) | Ok(Err(_)) => return None,
                            Ok(Ok(n)) => sm.feed(buf.get(..n).unwrap_or(&[])),
                            Err(_) => {
                                let bye = sm.bye_now("Idle timeout");
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
                    let mech = req.mechanism.as_str();
                    let login = tokio::select! {
                        end = self.login(req, sm) => end,
                        () = tokio::time::sleep_until(deadline) => {
                            // The pre-auth deadline ended a login still waiting (for a place in
                            // the guard's queue, a backend, or its tarpit): counted and logged,
                            // then BYE.
                            self.shared.metrics.auth_attempts.with_label_values(&[mech, "timeout"]).inc();
                            tracing::info!(mechanism = mech, "login ended by the pre-auth deadline");
                            self.close(&mut conn, Some(&crate::imap::bye(None, "Authentication timeout"))).await;
                            return None;
                        }
                    };
                    match login {
                        LoginEnd::Continue(next) => sm = next,
                        LoginEnd::Relay {
                            conn: backend,
                            ok,
                            pipelined,
                            backend_extra,
                            slot,
                            backend: name,
                            user,
                            until,
                        } => {
                            if !self.write(&mut conn, &ok, deadline).await {
                                return None;
                            }
                            return Some(RelayParts {
                                client: conn,
                                backend,
                                pipelined,
                                backend_extra,
                                slot,
                                backend_name: name,
                                user,
                                until,
                            });
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        user: &str,
        mechanism: &str,
        result: &str,
        reason: &str,
        guard: &str,
        backend: &str,
    ) {
        self.audit_full(user, mechanism, result, reason, guard, backend, "", "");
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_full(
        &self,
        user: &str,
        mechanism: &str,
        result: &str,
        reason: &str,
        guard: &str,
        backend: &str,
        credential: &str,
        mfa: &str,
    ) {
        observe::audit(&AuditEvent {
            session: self.id,
            listener: &self.listener.name,
            client: self.peer,
            user,
            mechanism,
            result,
            reason,
            guard,
            backend,
            credential,
            mfa,
        });
    }

    /// Guard → authenticator → upstream login, with the failure floor.
    async fn login(&self, req: LoginRequest, mut sm: PreAuth) -> LoginEnd {
        let started = Instant::now();
        let m = &self.shared.metrics;
        let mech = req.mechanism.as_str();
        let claimed = match &req.credential {
            Credential::Password { user, .. } => auth::normalize_user(user).ok(),
            Credential::Bearer { user, .. } => {
                user.as_deref().and_then(|u| auth::normalize_user(u).ok())
            }
            Credential::Malformed(_) | Credential::MalformedBearer(_) => None,
        };
        let log_user = claimed.clone().unwrap_or_else(|| "<invalid>".into());
        let guard = &self.shared.guard;
        let key = AttemptKey {
            client_ip: self.peer.ip(),
            user: claimed.as_deref(),
            kind: if req.mechanism.is_oauth() {
                Kind::Token
            } else {
                Kind::Password
            },
        };
        // A keyed fingerprint of the secret, so a stale saved password counts once.
        let fingerprint = match (&req.credential, claimed.as_deref()) {
            (Credential::Password { password, .. }, Some(u)) => {
                Some(guard.fingerprint(u, password.expose()))
            }
            (Credential::Bearer { token, .. }, Some(u)) => {
                Some(guard.fingerprint(u, token.expose()))
            }
            _ => None,
        };
        let decision = guard.check(key).await;
        // The tarpit counts from here: an attempt that waited for a place (the in-flight cap)
        // still waits its whole delay, so queued guesses cannot share one delay.
        let decided = Instant::now();
        let action = decision.action();
        let mut matched = None;
        let outcome = match decision.verdict {
            Verdict::Allow => {
                let mut attempt = Attempt {
                    client_ip: self.peer.ip(),
                    mechanism: req.mechanism,
                    credential: req.credential,
                    matched_credential: Default::default(),
                };
                let o = self.shared.authenticator.authenticate(&attempt).await;
                matched = attempt.matched_credential.take();
                Some(o)
            }
            // Invariant 4: a refused attempt is never checked.
            Verdict::Reject => None,
        };
        let identity = match outcome {
            Some(Outcome::Success(id)) => id,
            other => {
                let reason = match other {
                    Some(Outcome::Failure(r)) => r.as_str(),
                    _ => "guard",
                };
                let told = match other {
                    // The shared state failed: not the client's guess.
                    Some(Outcome::Failure(auth::FailureReason::StateUnavailable)) => None,
                    Some(Outcome::Failure(_)) => Some(GuardOutcome::Failure {
                        fingerprint: fingerprint.as_deref(),
                    }),
                    _ => Some(GuardOutcome::Refused),
                };
                if let Some(o) = told {
                    guard.record(key, o).await;
                }
                // Invariant 5: no failure is answered sooner than the floor; the tarpit may
                // add to it. The wait is a timer on this session, holding no worker.
                let answer_at = (started + self.shared.failure_floor).max(decided + decision.delay);
                tokio::time::sleep_until(answer_at).await;
                drop(decision.permit);
                m.auth_attempts.with_label_values(&[mech, "failure"]).inc();
                m.auth_seconds.observe(started.elapsed().as_secs_f64());
                // The app password that matched, when the failure came after it (a wrong code:
                // that one has leaked).
                self.audit_full(
                    &log_user,
                    mech,
                    "failure",
                    reason,
                    action,
                    "",
                    matched.as_deref().unwrap_or(""),
                    "",
                );
                tracing::info!(user = %log_user, mechanism = mech, reason, guard = action, "login failed");
                if req.mechanism.is_oauth() {
                    sm.oauth_failed(&req.tag, &self.oauth_challenge(req.mechanism));
                } else {
                    sm.auth_failed(&req.tag);
                }
                return LoginEnd::Continue(sm);
            }
        };
        drop(decision.permit);
        guard
            .record(
                key,
                GuardOutcome::Success {
                    user: &identity.user,
                },
            )
            .await;
        let Some(slot) = self.shared.user_sessions.try_acquire(
            &identity.user,
            &identity.credential_id,
            self.id,
            self.shared.limits.max_sessions_per_user,
        ) else {
            m.auth_attempts.with_label_values(&[mech, "limit"]).inc();
            self.audit(
                &identity.user,
                mech,
                "refused",
                "too_many_sessions",
                action,
                "",
            );
            sm.too_many_sessions(&req.tag);
            return LoginEnd::Continue(sm);
        };
        let Some(backend) = self.shared.upstreams.route(&identity.user) else {
            m.auth_attempts
                .with_label_values(&[mech, "unavailable"])
                .inc();
            self.audit(&identity.user, mech, "unavailable", "no_route", action, "");
            sm.auth_unavailable(&req.tag);
            return LoginEnd::Continue(sm);
        };
        let name = backend.config.name.clone();
        let up_started = Instant::now();
        match backend.open(&identity.upstream_user, self.peer).await {
            Ok((conn, login_ok, backend_extra)) => {
                m.upstream_logins.with_label_values(&[&name, "ok"]).inc();
                m.upstream_login_seconds
                    .with_label_values(&[&name])
                    .observe(up_started.elapsed().as_secs_f64());
                m.auth_attempts.with_label_values(&[mech, "success"]).inc();
                m.auth_seconds.observe(started.elapsed().as_secs_f64());
                self.audit_full(
                    &identity.user,
                    mech,
                    "success",
                    "",
                    action,
                    &name,
                    &identity.credential_id,
                    identity.mfa,
                );
                tracing::info!(user = %identity.user, backend = %name, "logged in");
                let (ok, pipelined) = sm.auth_succeeded(&req.tag, &login_ok);
                LoginEnd::Relay {
                    conn,
                    ok,
                    pipelined,
                    backend_extra,
                    slot,
                    backend: name,
                    user: identity.user,
                    until: identity.session_until,
                }
            }
            Err(e) => {
                m.upstream_logins
                    .with_label_values(&[&name, e.as_str()])
                    .inc();
                m.auth_attempts
                    .with_label_values(&[mech, "unavailable"])
                    .inc();
                self.audit(
                    &identity.user,
                    mech,
                    "unavailable",
                    e.as_str(),
                    action,
                    &name,
                );
                tracing::warn!(backend = %name, error = %e, "backend login failed");
                sm.auth_unavailable(&req.tag);
                LoginEnd::Continue(sm)
            }
        }
    }

    async fn relay(&self, parts: RelayParts) {
        let RelayParts {
            mut client,
            mut backend,
            pipelined,
            backend_extra,
            slot,
            backend_name,
            user,
            until,
        } = parts;
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
            client,
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
            m.relay_bytes.with_label_values(&["to_backend"]),
            m.relay_bytes.with_label_values(&["to_client"]),
            self.shared.stopping.clone(),
            slot.revoked.clone(),
        )
        .await;
        m.session_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(user = %user, backend = %backend_name, end = ?end, seconds = started.elapsed().as_secs(), "session ended");
        drop(slot);
    }
}

impl Session {
    /// The error challenge of RFC 7628 §3.2.2 (OAUTHBEARER) and Google's XOAUTH2 equivalent.
    fn oauth_challenge(&self, mechanism: auth::Mechanism) -> Vec<u8> {
        let (conf, scope) = self.shared.oauth.clone().unwrap_or_default();
        let mut v = serde_json::Map::new();
        let status = if mechanism == auth::Mechanism::OAuthBearer {
            "invalid_token"
        } else {
            "401"
        };
        v.insert("status".into(), status.into());
        v.insert("schemes".into(), "bearer".into());
        v.insert("scope".into(), scope.into());
        if let (auth::Mechanism::OAuthBearer, Some(c)) = (mechanism, conf) {
            v.insert("openid-configuration".into(), c.into());
        }
        serde_json::Value::Object(v).to_string().into_bytes()
    }
}

/// A closed label for a failed client handshake.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoApplicationProtocol) => "alpn",
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible",
        Some(rustls::Error::InvalidMessage(_)) => "invalid_message",
        Some(rustls::Error::AlertReceived(_)) => "alert_received",
        Some(_) => "tls_error",
        None => "io",
    }
}

struct RelayParts {
    client: Conn,
    backend: Conn,
    pipelined: bytes::BytesMut,
    backend_extra: bytes::BytesMut,
    slot: UserSlot,
    backend_name: String,
    user: String,
    /// Unix time at which the session must end (token expiry), if any.
    until: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::{AppPassword, User, UsersFile};

    #[test]
    fn revocation_closes_only_what_was_revoked() {
        let ap = |id: &str, revoked: bool| AppPassword {
            id: id.into(),
            label: String::new(),
            hash: String::new(),
            lookup: None,
            created: time::OffsetDateTime::UNIX_EPOCH,
            expires: None,
            revoked,
        };
        let mut file = UsersFile {
            version: 1,
            users: Default::default(),
        };
        file.users.insert(
            "a@x".into(),
            User {
                app_passwords: vec![ap("ap_1", true), ap("ap_2", false)],
                ..Default::default()
            },
        );
        let sessions = UserSessions::default();
        let revoked = sessions.try_acquire("a@x", "ap_1", 1, 10).unwrap();
        let kept = sessions.try_acquire("a@x", "ap_2", 2, 10).unwrap();
        // A token user who is not in the users file keeps their session.
        let token = sessions.try_acquire("t@x", "oauth:corp", 3, 10).unwrap();
        assert_eq!(sessions.close_revoked(&file), 1);
        assert!(revoked.revoked.is_cancelled());
        assert!(!kept.revoked.is_cancelled() && !token.revoked.is_cancelled());
        // Disabling the token user ends it.
        file.users.insert(
            "t@x".into(),
            User {
                disabled: true,
                ..Default::default()
            },
        );
        assert_eq!(sessions.close_revoked(&file), 1);
        assert!(token.revoked.is_cancelled());
        // The cap counts live sessions and frees on drop.
        drop(revoked);
        assert!(sessions.try_acquire("a@x", "ap_2", 4, 2).is_some());
    }
}
