//! Authentication: the `Authenticator` seam and the app-password + TOTP credential store.
//!
//! The session hands an [`Attempt`] to an [`Authenticator`] and gets an [`Outcome`] back; it
//! never learns *how* a credential was checked, and the authenticator never touches a socket.
//! Every failure maps to the same client reply (`NO [AUTHENTICATIONFAILED]`); the
//! [`FailureReason`] exists only for metrics and the audit log.
//!
//! Cost model (security invariant 5): an unknown or disabled user, or a user without an
//! active app password, pays one dummy argon2 verification, so the work done does not reveal
//! whether an account exists. Hash runs are counted (`imapgate_auth_hash_runs_total`) so tests
//! can prove it. argon2 runs on the blocking pool behind a semaphore, so a login flood cannot
//! take more memory than `permits × m_kib`.

pub mod app_password;
pub mod cache;
pub mod keyring;
pub mod locked_file;
pub mod oauth;
pub mod sasl;
mod store;
pub mod totp;
pub mod users;
mod write_back;

pub use store::CredentialStore;

use std::net::IpAddr;

use crate::secret::Secret;

/// The SASL mechanism or command used; a closed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Login,
    Plain,
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::XOAuth2 => "xoauth2",
            Mechanism::OAuthBearer => "oauthbearer",
        }
    }

    /// Token mechanisms answer a failure with an error challenge first (RFC 7628 §3.2.2).
    pub fn is_oauth(self) -> bool {
        matches!(self, Mechanism::XOAuth2 | Mechanism::OAuthBearer)
    }
}

/// What the client presented.
#[derive(Debug)]
pub enum Credential {
    /// A user name and password (LOGIN, or a well-formed PLAIN message).
    Password { user: String, password: Secret },
    /// A PLAIN message that could not be decoded; fails like a wrong password.
    Malformed(sasl::PlainError),
    /// An OAuth 2.0 bearer token, with the user the client claims.
    Bearer { user: Option<String>, token: Secret },
    /// An XOAUTH2/OAUTHBEARER message that could not be decoded.
    MalformedBearer(sasl::BearerError),
}

/// One login attempt, as the guard and the authenticator see it.
#[derive(Debug)]
pub struct Attempt {
    pub client_ip: IpAddr,
    pub mechanism: Mechanism,
    pub credential: Credential,
    /// Set by the authenticator when an app password matched, also if the attempt then fails
    /// (a wrong TOTP code): the audit log names it, so the leaked one can be revoked.
    pub matched_credential: std::sync::OnceLock<String>,
}

/// Why an attempt failed (never shown to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    BadName,
    Malformed,
    UnknownUser,
    Disabled,
    BadPassword,
    /// The user may not log in from this address (`allowed_networks`).
    NetworkNotAllowed,
    /// The user may not use this mechanism.
    MechanismNotAllowed,
    /// MFA is required but the user has not enrolled TOTP.
    MfaNotEnrolled,
    /// Valid app password, no code, and not unlocked.
    CodeMissing,
    /// Valid app password, wrong code: the app password has probably leaked.
    BadCode,
    /// Valid app password and a code that was valid within the unlock window before now: a
    /// client replaying its saved "password + code" after the window ended (not a leak).
    StaleCode,
    /// Valid app password and a code that was already used.
    CodeReplayed,
    /// The shared state could not be consulted (fail closed).
    StateUnavailable,
    /// The bearer token was refused.
    Token(oauth::OAuthError),
    /// A token mechanism was used but no issuer is configured.
    OAuthNotConfigured,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::BadName => "bad_name",
            FailureReason::Malformed => "malformed",
            FailureReason::UnknownUser => "unknown_user",
            FailureReason::Disabled => "disabled",
            FailureReason::BadPassword => "bad_password",
            FailureReason::NetworkNotAllowed => "network_not_allowed",
            FailureReason::MechanismNotAllowed => "mechanism_not_allowed",
            FailureReason::MfaNotEnrolled => "mfa_not_enrolled",
            FailureReason::CodeMissing => "code_missing",
            FailureReason::BadCode => "bad_code",
            FailureReason::StaleCode => "stale_code",
            FailureReason::CodeReplayed => "code_replayed",
            FailureReason::StateUnavailable => "state_unavailable",
            FailureReason::Token(e) => e.as_str(),
            FailureReason::OAuthNotConfigured => "oauth_not_configured",
        }
    }
}

/// A user who proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The normalised login name (full address, lower case).
    pub user: String,
    /// The name to log into the backend as.
    pub upstream_user: String,
    /// Which app password was used (for the audit log).
    pub credential_id: String,
    /// How the second factor was satisfied: `totp`, `unlocked` or `none`.
    pub mfa: &'static str,
    /// End the relayed session at this Unix time (the token's expiry, when the issuer has
    /// `end_session_at_expiry`).
    pub session_until: Option<u64>,
}

#[derive(Debug)]
pub enum Outcome {
    Success(Identity),
    Failure(FailureReason),
}

/// Checks credentials. Implementations never write to sockets.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    async fn authenticate(&self, attempt: &Attempt) -> Outcome;
}

/// Normalises a login name: full address folded to lower case. Refuses names that are empty,
/// longer than 255 bytes, or contain whitespace, control characters (CR, LF, NUL, DEL …), or
/// quote/backslash, before any lookup or upstream contact.
pub fn normalize_user(name: &str) -> Result<String, FailureReason> {
    let bad = name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '"' || c == '\\');
    if bad {
        return Err(FailureReason::BadName);
    }
    Ok(name.to_lowercase())
}

/// A name safe to put in a log line: the normalised name, or a placeholder.
pub fn loggable_user(name: &str) -> String {
    normalize_user(name).unwrap_or_else(|_| "<invalid>".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert_eq!(
            normalize_user("Alice@Example.ORG"),
            Ok("alice@example.org".into())
        );
        for bad in [
            "", "a\rb", "a\nb", "a\0b", "a b", "a\tb", "a\u{7f}", "a\"b", "a\\b",
        ] {
            assert_eq!(normalize_user(bad), Err(FailureReason::BadName), "{bad:?}");
        }
        assert_eq!(
            normalize_user(&"a".repeat(256)),
            Err(FailureReason::BadName)
        );
        assert_eq!(loggable_user("x\r\ny"), "<invalid>");
    }
}
