//! One login attempt, from the credential a client presented to a ready backend session.
//!
//! The steps, in order (DESIGN.md, "Second stage"): the guard decides (blocks, attack mode,
//! known-good networks, then places in the queues) → the credential is checked (or not:
//! invariant 4) → the outcome is recorded with the guard → the places are given back → a
//! failure waits out the floor and the tarpit (invariant 5) → a success takes a per-user slot,
//! is routed, and the backend login runs. The result is one [`LoginResult`]; the protocol's
//! state machine turns it into replies (this room never writes to the client), and one
//! [`LoginRecord`] writes the audit line, the metrics and the user's login history together.
//!
//! The whole attempt runs under the session's pre-auth deadline: when it passes, whatever the
//! attempt was waiting for (a queue, the IdP, the tarpit, the backend) is dropped with it and
//! the result is [`LoginResult::TimedOut`].

mod client_id;
mod record;
pub mod registry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

pub use client_id::{ClientId, MAX_CLIENT_ID_CHARS};
pub use record::{Ending, LoginRecord, Reason};
pub use registry::{EndReason, SessionInfo, UserSessions, UserSlot};

use crate::auth::{self, Attempt, Authenticator, Credential, FailureReason, Mechanism, Outcome};
use crate::config::Protocol;
use crate::guard::{AttemptKey, Decision, Guard, Kind, Outcome as GuardOutcome, Scope, Verdict};
use crate::imap::LoginOk;
use crate::observe::Metrics;
use crate::tls::Conn;
use crate::upstream::Upstreams;

/// What logins need from the process, built once and shared by every session.
pub struct Services {
    pub authenticator: Arc<dyn Authenticator>,
    pub guard: Arc<Guard>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// No failure is answered sooner than this after the attempt began.
    pub failure_floor: Duration,
    pub max_sessions_per_user: u32,
    pub user_sessions: UserSessions,
    /// Last-used records of successful logins (written to the store in the background).
    pub last_used: Arc<crate::store::activity::LastUsed>,
    /// The recent logins of known users (written to the store in the background).
    pub login_history: Arc<crate::store::activity::LoginHistory>,
    /// How login names are compared (`auth.unicode_names`): the guard counts the account the
    /// authenticator will check.
    pub names: auth::NameRules,
}

/// The connection a login comes from.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub session: u64,
    pub listener: &'a str,
    /// The resolved client address (the PROXY header's, where trusted).
    pub peer: SocketAddr,
    /// What the client's `ID` said about it (sanitised), for the audit line.
    pub id: &'a ClientId,
    /// Which protocol the client speaks (routes the backend; the metrics' `protocol` label).
    pub protocol: Protocol,
    /// SMTP: the client's EHLO name, passed on to the backend.
    pub helo: Option<&'a str>,
}

/// How a login ended, for the protocol's state machine.
pub enum LoginResult {
    /// The credential was checked and refused; answered after `delay` from the start.
    Failed {
        reason: FailureReason,
        delay: Duration,
    },
    /// The guard refused to check it (a block, attack mode, or a queue that stayed full).
    Throttled { scope: Scope },
    /// The user already has `max_sessions_per_user` sessions.
    TooManySessions,
    /// The credential was good but no backend session could be made.
    Unavailable,
    /// The pre-auth deadline passed first.
    TimedOut,
    /// Logged in: relay from here.
    Ready(Box<Ready>),
}

/// A logged-in backend session, ready to relay.
pub struct Ready {
    pub conn: Conn,
    /// IMAP: the client's tagged OK, encoded once per backend capability list.
    pub login_ok: Option<Arc<LoginOk>>,
    /// Bytes the backend sent after its login reply (relayed to the client first).
    pub backend_extra: BytesMut,
    pub slot: UserSlot,
    pub backend: String,
    pub user: String,
    /// End the session at this Unix time (token expiry), if any.
    pub until: Option<u64>,
}

/// The normalised name a credential claims, if it is a valid one.
fn claimed_user(credential: &Credential, names: auth::NameRules) -> Option<String> {
    let normalize = |u: &str| auth::normalize_user_with(u, names).ok();
    match credential {
        Credential::Password { user, .. } => normalize(user),
        Credential::Bearer { user, .. } => user.as_deref().and_then(normalize),
        Credential::Malformed(_) | Credential::MalformedBearer(_) => None,
    }
}

impl Services {
    /// Runs one attempt to its end, or until `deadline`.
    pub async fn login(
        &self,
        client: Client<'_>,
        mechanism: Mechanism,
        credential: Credential,
        deadline: Instant,
    ) -> LoginResult {
        let claimed = claimed_user(&credential, self.names);
        let mut record = LoginRecord {
            session: client.session,
            listener: client.listener,
            protocol: client.protocol,
            client: client.peer,
            client_id: client.id,
            user: claimed.clone().unwrap_or_else(|| "<invalid>".into()),
            mechanism,
            guard: "",
            backend: String::new(),
            credential: String::new(),
            mfa: "",
            started: Instant::now(),
            verified: false,
            history: &self.login_history,
        };
        let attempt = self.attempt(client, credential, claimed.as_deref(), &mut record);
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => {
                record.emit(&self.metrics, Ending::Timeout, Reason::Deadline);
                LoginResult::TimedOut
            }
        }
    }

    async fn attempt(
        &self,
        client: Client<'_>,
        credential: Credential,
        claimed: Option<&str>,
        record: &mut LoginRecord<'_>,
    ) -> LoginResult {
        let (mechanism, started) = (record.mechanism, record.started);
        let guard = &self.guard;
        let key = AttemptKey {
            client_ip: client.peer.ip(),
            user: claimed,
            kind: if mechanism.is_oauth() {
                Kind::Token
            } else {
                Kind::Password
            },
        };
        // A keyed fingerprint of the secret, so a stale saved password counts once.
        let fingerprint = match (&credential, claimed) {
            (Credential::Password { password, .. }, Some(u)) => {
                Some(guard.fingerprint(u, password.expose()))
            }
            (Credential::Bearer { token, .. }, Some(u)) => {
                Some(guard.fingerprint(u, token.expose()))
            }
            _ => None,
        };
        let decision = guard.check(key).await;
        // The tarpit counts from here: an attempt that waited for a place still waits its
        // whole delay, so queued guesses cannot share one delay.
        let decided = Instant::now();
        record.guard = decision.action();
        let (outcome, matched) = match decision.verdict {
            // Invariant 4: a refused attempt is never checked.
            Verdict::Reject => (None, None),
            Verdict::Allow | Verdict::RequireCode => {
                let mut attempt = Attempt {
                    client_ip: client.peer.ip(),
                    mechanism,
                    credential,
                    matched_credential: Default::default(),
                    require_code: decision.verdict == Verdict::RequireCode,
                    client: format!("{} {}", record.client_id.name(), record.client_id.version())
                        .trim()
                        .to_owned(),
                };
                let outcome = self.authenticator.authenticate(&attempt).await;
                (Some(outcome), attempt.matched_credential.take())
            }
        };
        match outcome {
            Some(Outcome::Success(identity)) => {
                guard
                    .record(
                        key,
                        GuardOutcome::Success {
                            user: &identity.user,
                        },
                    )
                    .await;
                drop(decision.permit);
                if decision.verdict == Verdict::RequireCode {
                    record.guard = "attack_mode_passed_with_totp";
                }
                self.ready(client, identity, record).await
            }
            Some(Outcome::Failure(reason)) => {
                record.credential = matched.unwrap_or_default();
                let told = match reason {
                    // Not the client's guess: the shared state or the IdP failed.
                    FailureReason::StateUnavailable
                    | FailureReason::Token(auth::oauth::OAuthError::IdpUnavailable) => None,
                    // Attack mode refused a code-less login before any check, as the guard
                    // refuses unchecked: it grows the tarpit only, and does not feed the budgets
                    // that keep the owner's account in attack mode.
                    FailureReason::AttackMode => Some(GuardOutcome::Refused),
                    FailureReason::BadCode => Some(GuardOutcome::Failure {
                        fingerprint: fingerprint.as_deref(),
                        wrong_code: Some(&record.credential),
                    }),
                    _ => Some(GuardOutcome::Failure {
                        fingerprint: fingerprint.as_deref(),
                        wrong_code: None,
                    }),
                };
                if let Some(o) = told {
                    guard.record(key, o).await;
                }
                let delay = self
                    .fail(decision, started, decided, client.peer.ip())
                    .await;
                record.emit(&self.metrics, Ending::Failure, Reason::Credential(reason));
                LoginResult::Failed { reason, delay }
            }
            None => {
                guard.record(key, GuardOutcome::Refused).await;
                let scope = decision.scope;
                self.fail(decision, started, decided, client.peer.ip())
                    .await;
                record.emit(&self.metrics, Ending::Failure, Reason::Guard);
                LoginResult::Throttled { scope }
            }
        }
    }

    /// Gives the check places back, then waits until a failure may be answered: the floor
    /// from the start (invariant 5) or the tarpit, whichever is later. The tarpit is waited
    /// out in one of the source's parking places (see `Guard::park`), so one source's
    /// concurrent guesses cannot share one delay; the wait holds no check place and no
    /// worker.
    async fn fail(
        &self,
        decision: Decision,
        started: Instant,
        decided: Instant,
        ip: std::net::IpAddr,
    ) -> Duration {
        let Decision { permit, delay, .. } = decision;
        drop(permit);
        let (_parked, parked_at) = if delay.is_zero() {
            (None, decided)
        } else {
            self.guard.park(ip).await
        };
        let answer_at = (started + self.failure_floor).max(decided.max(parked_at) + delay);
        tokio::time::sleep_until(answer_at).await;
        answer_at.saturating_duration_since(started)
    }

    /// After a good credential: the per-user slot, the route, the backend login.
    async fn ready(
        &self,
        client: Client<'_>,
        identity: auth::Identity,
        record: &mut LoginRecord<'_>,
    ) -> LoginResult {
        let m = &self.metrics;
        record.user.clone_from(&identity.user);
        record.credential.clone_from(&identity.credential_id);
        record.verified = true;
        let Some(slot) = self.user_sessions.try_acquire(
            registry::NewSession {
                user: &identity.user,
                credential: &identity.credential_id,
                session: client.session,
                client: client.peer.ip(),
                client_id: client.id,
                listener: client.listener,
                enrolment: identity.enrolment.as_deref(),
            },
            self.max_sessions_per_user,
        ) else {
            record.emit(m, Ending::TooManySessions, Reason::TooManySessions);
            return LoginResult::TooManySessions;
        };
        let Some(backend) = self.upstreams.route(client.protocol, &identity.user) else {
            record.emit(m, Ending::Unavailable, Reason::NoRoute);
            return LoginResult::Unavailable;
        };
        let name = backend.config.name.clone();
        record.backend.clone_from(&name);
        let up_started = Instant::now();
        match backend
            .open(&identity.upstream_user, client.peer, client.helo)
            .await
        {
            Ok(crate::upstream::Opened {
                conn,
                login_ok,
                extra: backend_extra,
            }) => {
                m.upstream_logins.with_label_values(&[&name, "ok"]).inc();
                m.upstream_login_seconds
                    .with_label_values(&[&name])
                    .observe(up_started.elapsed().as_secs_f64());
                record.mfa = identity.mfa;
                record.emit(m, Ending::Success, Reason::None);
                // Buffered; written by a background task (a login never waits for it).
                self.last_used.record(
                    &identity.user,
                    &identity.credential_id,
                    client.peer.ip(),
                    client.id.name(),
                );
                LoginResult::Ready(Box::new(Ready {
                    conn,
                    login_ok,
                    backend_extra,
                    slot,
                    backend: name,
                    user: identity.user,
                    until: identity.session_until,
                }))
            }
            Err(e) => {
                m.upstream_logins
                    .with_label_values(&[&name, e.as_str()])
                    .inc();
                tracing::warn!(backend = %name, error = %e, "backend login failed");
                record.emit(m, Ending::Unavailable, Reason::Upstream(e.as_str()));
                LoginResult::Unavailable
            }
        }
    }
}
