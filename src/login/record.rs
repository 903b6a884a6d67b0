//! One record per login: the audit line and the metrics, written together from typed fields.
//!
//! Every field is a closed enum or a value the gateway chose (session id, listener and backend
//! names from the config, a loggable user name, an app password's public id), so nothing the
//! client sent reaches a metric label, and no secret reaches either.

use std::net::SocketAddr;

use tokio::time::Instant;

use crate::auth::{FailureReason, Mechanism};
use crate::observe::{self, AuditEvent, Metrics};

/// How a login ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Success,
    /// The credential was refused, or the guard refused to check it.
    Failure,
    /// The user already has `max_sessions_per_user` sessions.
    TooManySessions,
    /// The credential was good but no backend session could be made.
    Unavailable,
    /// The pre-auth deadline ended the attempt.
    Timeout,
}

impl Ending {
    /// The audit line's `result`.
    fn audit(self) -> &'static str {
        match self {
            Ending::Success => "success",
            Ending::Failure => "failure",
            Ending::TooManySessions => "refused",
            Ending::Unavailable => "unavailable",
            Ending::Timeout => "timeout",
        }
    }

    /// The `result` label of `imapgate_auth_attempts_total`.
    pub(crate) fn metric(self) -> &'static str {
        match self {
            Ending::Success => "success",
            Ending::Failure => "failure",
            Ending::TooManySessions => "limit",
            Ending::Unavailable => "unavailable",
            Ending::Timeout => "timeout",
        }
    }
}

/// Why, as the audit line's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    /// The authenticator refused the credential.
    Credential(FailureReason),
    /// The guard refused to check it.
    Guard,
    TooManySessions,
    NoRoute,
    /// The backend login failed (`UpstreamError::as_str`).
    Upstream(&'static str),
    Deadline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::Credential(r) => r.as_str(),
            Reason::Guard => "guard",
            Reason::TooManySessions => "too_many_sessions",
            Reason::NoRoute => "no_route",
            Reason::Upstream(e) => e,
            Reason::Deadline => "deadline",
        }
    }
}

/// Everything said about one login.
#[derive(Debug)]
pub struct LoginRecord<'a> {
    pub session: u64,
    pub listener: &'a str,
    pub client: SocketAddr,
    /// The client's `ID` name and version (already sanitised).
    pub client_id: &'a super::ClientId,
    /// Loggable: normalised, or `<invalid>`.
    pub user: String,
    pub mechanism: Mechanism,
    /// The guard's action (`allow`, `delay`, `reject`, `require_code`, …, or
    /// `attack_mode_passed_with_totp`).
    pub guard: &'static str,
    pub backend: String,
    /// The app password id (or `oauth:{issuer}`) that logged in, or that matched before a
    /// wrong code.
    pub credential: String,
    /// How the second factor was met (successes only).
    pub mfa: &'static str,
    pub started: Instant,
}

impl LoginRecord<'_> {
    /// Writes the audit line and counts the attempt.
    pub fn emit(&self, metrics: &Metrics, ending: Ending, reason: Reason) {
        let mechanism = self.mechanism.as_str();
        metrics
            .auth_attempts
            .with_label_values(&[mechanism, ending.metric()])
            .inc();
        if matches!(ending, Ending::Success | Ending::Failure) {
            metrics
                .auth_seconds
                .with_label_values(&[mechanism])
                .observe(self.started.elapsed().as_secs_f64());
        }
        observe::audit(&AuditEvent {
            session: self.session,
            listener: self.listener,
            client: self.client,
            client_name: self.client_id.name(),
            client_version: self.client_id.version(),
            user: &self.user,
            mechanism,
            result: ending.audit(),
            reason: reason.as_str(),
            guard: self.guard,
            backend: &self.backend,
            credential: &self.credential,
            mfa: self.mfa,
        });
        match ending {
            Ending::Success => {
                tracing::info!(user = %self.user, backend = %self.backend, "logged in")
            }
            Ending::Unavailable => tracing::info!(
                user = %self.user,
                backend = %self.backend,
                reason = reason.as_str(),
                "login unavailable"
            ),
            Ending::Failure | Ending::TooManySessions | Ending::Timeout => tracing::info!(
                user = %self.user,
                mechanism,
                reason = reason.as_str(),
                guard = self.guard,
                "{}",
                match ending {
                    Ending::Failure => "login failed",
                    Ending::Timeout => "login ended by the pre-auth deadline",
                    _ => "login refused: too many sessions",
                }
            ),
        }
    }
}
