//! One record per login: the audit line, the metrics and the user's login history, written
//! together from typed fields.
//!
//! Every field is a closed enum or a value the gateway chose (session id, listener and backend
//! names from the config, a loggable user name, an app password's public id), so nothing the
//! client sent reaches a metric label, and no secret reaches any of them.
//!
//! The login history (`store::activity::LoginHistory`) gets the attempts of users the gateway
//! knows exist ([`LoginRecord::in_history`]): a name nobody holds never gets a history, so
//! spraying made-up names cannot grow it.

use std::net::SocketAddr;

use tokio::time::Instant;

use crate::auth::{FailureReason, Mechanism};
use crate::observe::{self, AuditEvent, Metrics};
use crate::store::activity::LoginHistory;
use crate::store::LoginEvent;

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
    pub protocol: crate::config::Protocol,
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
    /// The credential was good: `user` is the identity it proved.
    pub verified: bool,
    /// Where the attempts of known users go (see [`LoginRecord::in_history`]).
    pub history: &'a LoginHistory,
}

/// Whether a refused credential proves that its user exists: the authenticator gives these
/// reasons only after it found the user's record (an unknown name is `unknown_user`; a code-less
/// login refused by attack mode before any lookup, a token the issuer refused or a store that
/// could not be read say nothing about the name).
fn proves_user(reason: FailureReason) -> bool {
    match reason {
        FailureReason::Disabled
        | FailureReason::BadPassword
        | FailureReason::NetworkNotAllowed
        | FailureReason::MechanismNotAllowed
        | FailureReason::MfaNotEnrolled
        | FailureReason::CodeMissing
        | FailureReason::BadCode
        | FailureReason::StaleCode
        | FailureReason::CodeReplayed
        | FailureReason::SuspectAppPassword
        | FailureReason::NetworkDenied => true,
        FailureReason::BadName
        | FailureReason::Malformed
        | FailureReason::UnknownUser
        | FailureReason::StateUnavailable
        | FailureReason::AttackMode
        | FailureReason::Token(_)
        | FailureReason::OAuthNotConfigured => false,
    }
}

impl LoginRecord<'_> {
    /// Whether this attempt belongs in the user's login history: a good credential (whatever
    /// happened after it), or a refusal whose reason proves the user exists. Not a refusal by
    /// the guard before any check (it does not know whether the name exists, and must not ask
    /// the store for every throttled guess), nor an unknown or invalid name.
    pub fn in_history(&self, reason: Reason) -> bool {
        self.verified || matches!(reason, Reason::Credential(r) if proves_user(r))
    }

    /// The login-history event of this attempt.
    fn event(&self, ending: Ending, reason: Reason) -> LoginEvent {
        let ok = ending == Ending::Success;
        let client = match (self.client_id.name(), self.client_id.version()) {
            ("", _) => String::new(),
            (name, "") => name.to_owned(),
            (name, version) => format!("{name}/{version}"),
        };
        LoginEvent {
            user: self.user.clone(),
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
            address: self.client.ip().to_string(),
            listener: self.listener.to_owned(),
            mechanism: self.mechanism.as_str().to_ascii_uppercase(),
            result: if ok { "ok" } else { "fail" }.to_owned(),
            reason: reason.as_str().to_owned(),
            client,
            credential: if ok {
                self.credential.clone()
            } else {
                String::new()
            },
        }
    }

    /// Writes the audit line, counts the attempt and notes it in the user's login history.
    pub fn emit(&self, metrics: &Metrics, ending: Ending, reason: Reason) {
        if self.in_history(reason) {
            // Buffered; written by a background task (a login never waits for it).
            self.history.record(self.event(ending, reason));
        }
        let mechanism = self.mechanism.as_str();
        metrics
            .auth_attempts
            .with_label_values(&[mechanism, self.protocol.as_str(), ending.metric()])
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
            protocol: self.protocol.as_str(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::activity::Keep;

    #[test]
    fn only_attempts_that_prove_the_user_reach_the_history() {
        let metrics = Metrics::new().unwrap();
        let history = LoginHistory::new(
            prometheus::IntCounter::new("d", "d").unwrap(),
            Keep::UntilWritten,
        );
        let id = super::super::ClientId {
            name: Some("Mail".into()),
            version: Some("16.0".into()),
        };
        let mut r = LoginRecord {
            session: 1,
            listener: "imaps",
            protocol: crate::config::Protocol::Imap,
            client: "192.0.2.7:5000".parse().unwrap(),
            client_id: &id,
            user: "a@example.org".into(),
            mechanism: Mechanism::Plain,
            guard: "allow",
            backend: String::new(),
            credential: "ap_1".into(),
            mfa: "",
            started: Instant::now(),
            verified: false,
            history: &history,
        };
        let nothing = [
            Reason::Guard,
            Reason::Credential(FailureReason::UnknownUser),
            Reason::Credential(FailureReason::BadName),
            Reason::Credential(FailureReason::Malformed),
            Reason::Credential(FailureReason::AttackMode),
            Reason::Credential(FailureReason::StateUnavailable),
            Reason::Credential(FailureReason::OAuthNotConfigured),
            Reason::Credential(FailureReason::Token(
                crate::auth::oauth::OAuthError::UnknownIssuer,
            )),
            Reason::Deadline,
        ];
        for reason in nothing {
            r.emit(&metrics, Ending::Failure, reason);
        }
        assert!(
            history.recent("a@example.org", 50).is_empty(),
            "an attempt that does not prove the user was recorded"
        );
        r.emit(
            &metrics,
            Ending::Failure,
            Reason::Credential(FailureReason::BadCode),
        );
        r.verified = true;
        r.emit(&metrics, Ending::Success, Reason::None);
        r.emit(&metrics, Ending::Timeout, Reason::Deadline);
        let got = history.recent("a@example.org", 50);
        let summary: Vec<(&str, &str, &str)> = got
            .iter()
            .map(|e| (e.result.as_str(), e.reason.as_str(), e.credential.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("fail", "deadline", ""),
                ("ok", "", "ap_1"),
                ("fail", "bad_code", "")
            ]
        );
        let ok = &got[1];
        assert_eq!(
            (
                ok.address.as_str(),
                ok.listener.as_str(),
                ok.mechanism.as_str(),
                ok.client.as_str()
            ),
            ("192.0.2.7", "imaps", "PLAIN", "Mail/16.0")
        );
    }
}
