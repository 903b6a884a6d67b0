//! Authentication: the `Authenticator` seam and the app-password credential store.
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
pub mod sasl;
pub mod users;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Argon2Params;
use crate::observe::Metrics;
use crate::secret::Secret;
use users::UsersFile;

/// The SASL mechanism or command used; a closed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Login,
    Plain,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
        }
    }
}

/// What the client presented.
#[derive(Debug)]
pub enum Credential {
    /// A user name and password (LOGIN, or a well-formed PLAIN message).
    Password { user: String, password: Secret },
    /// A PLAIN message that could not be decoded; fails like a wrong password.
    Malformed(sasl::PlainError),
}

/// One login attempt, as the guard and the authenticator see it.
#[derive(Debug)]
pub struct Attempt {
    pub client_ip: IpAddr,
    pub mechanism: Mechanism,
    pub credential: Credential,
}

/// Why an attempt failed (never shown to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    BadName,
    Malformed,
    UnknownUser,
    Disabled,
    BadPassword,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::BadName => "bad_name",
            FailureReason::Malformed => "malformed",
            FailureReason::UnknownUser => "unknown_user",
            FailureReason::Disabled => "disabled",
            FailureReason::BadPassword => "bad_password",
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

/// App passwords from the users file.
pub struct CredentialStore {
    path: PathBuf,
    users: RwLock<Arc<UsersFile>>,
    stamp: RwLock<Option<(SystemTime, u64)>>,
    dummy: String,
    hash_permits: Semaphore,
    metrics: Arc<Metrics>,
}

impl CredentialStore {
    /// Loads the users file (it must exist and be valid).
    pub fn open(
        path: PathBuf,
        params: Argon2Params,
        metrics: Arc<Metrics>,
    ) -> Result<Self, users::UsersError> {
        let file = UsersFile::load(&path)?;
        let stamp = file_stamp(&path);
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        Ok(Self {
            path,
            users: RwLock::new(Arc::new(file)),
            stamp: RwLock::new(stamp),
            dummy: app_password::dummy_hash(params),
            hash_permits: Semaphore::new(permits),
            metrics,
        })
    }

    pub fn user_count(&self) -> usize {
        self.users.read().map(|u| u.users.len()).unwrap_or(0)
    }

    /// Re-reads the users file now (SIGHUP).
    pub fn reload(&self) {
        if let Ok(mut s) = self.stamp.write() {
            *s = None;
        }
        self.reload_if_changed();
    }

    /// Re-reads the users file if it changed on disk (including a Kubernetes Secret's symlink
    /// swap). A file that no longer parses is ignored and the previous one kept.
    pub fn reload_if_changed(&self) {
        let now = file_stamp(&self.path);
        let old = self.stamp.read().map(|s| *s).unwrap_or(None);
        if now.is_none() || now == old {
            return;
        }
        match UsersFile::load(&self.path) {
            Ok(file) => {
                if let Ok(mut u) = self.users.write() {
                    *u = Arc::new(file);
                }
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                self.metrics.users_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(users = self.user_count(), "users file reloaded");
            }
            Err(e) => {
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                self.metrics
                    .users_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(error = %e, "users file changed but is invalid; keeping the previous one");
            }
        }
    }

    /// Polls the file every `every` until cancelled.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => self.reload_if_changed(),
            }
        }
    }

    async fn verify(&self, password: Secret, phcs: Vec<String>) -> Option<usize> {
        let _permit = self.hash_permits.acquire().await.ok()?;
        let runs = phcs.len().max(1) as u64;
        let dummy = self.dummy.clone();
        let res = tokio::task::spawn_blocking(move || {
            if phcs.is_empty() {
                app_password::verify(&password, &dummy);
                return None;
            }
            // Check every candidate so the time does not depend on which one matches.
            let mut found = None;
            for (i, phc) in phcs.iter().enumerate() {
                if app_password::verify(&password, phc) && found.is_none() {
                    found = Some(i);
                }
            }
            found
        })
        .await
        .ok()
        .flatten();
        self.metrics.hash_runs.inc_by(runs);
        res
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[async_trait::async_trait]
impl Authenticator for CredentialStore {
    async fn authenticate(&self, attempt: &Attempt) -> Outcome {
        let (user, password) = match &attempt.credential {
            Credential::Password { user, password } => (user, password),
            Credential::Malformed(_) => {
                self.verify(Secret::default(), Vec::new()).await;
                return Outcome::Failure(FailureReason::Malformed);
            }
        };
        let Ok(name) = normalize_user(user) else {
            self.verify(Secret::default(), Vec::new()).await;
            return Outcome::Failure(FailureReason::BadName);
        };
        let entry = self
            .users
            .read()
            .ok()
            .and_then(|u| u.users.get(&name).cloned());
        let now = OffsetDateTime::now_utc();
        let normalized = app_password::normalize(password);
        let (candidates, ids): (Vec<String>, Vec<String>) = match (&entry, &normalized) {
            (Some(u), Some(_)) if !u.disabled => u
                .app_passwords
                .iter()
                .filter(|a| a.is_active(now))
                .map(|a| (a.hash.clone(), a.id.clone()))
                .unzip(),
            _ => (Vec::new(), Vec::new()),
        };
        let found = self
            .verify(normalized.unwrap_or_default(), candidates)
            .await;
        match (entry, found) {
            (None, _) => Outcome::Failure(FailureReason::UnknownUser),
            (Some(u), _) if u.disabled => Outcome::Failure(FailureReason::Disabled),
            (Some(u), Some(i)) => Outcome::Success(Identity {
                upstream_user: u.upstream_user.clone().unwrap_or_else(|| name.clone()),
                user: name,
                credential_id: ids.get(i).cloned().unwrap_or_default(),
            }),
            (Some(_), None) => Outcome::Failure(FailureReason::BadPassword),
        }
    }
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
