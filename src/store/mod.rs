//! The credential store: users, their app passwords and TOTP enrolments, in one of three
//! backends (`auth.store.backend`):
//!
//! - `sqlite`: an embedded database file, the default for a single node;
//! - `postgres`: for several replicas;
//! - `file`: the YAML users file, kept for GitOps setups (a read-only mount refuses writes).
//!
//! Every backend stores the same records ([`User`], [`AppPassword`]) in the same formats
//! (argon2id PHC strings, `KEYID:BASE64` TOTP ciphertexts), so `imapgate users export` and
//! `users import` move them between backends unchanged. A change is one read-modify-write of
//! one user under that user's lock ([`UserStore::modify`]): two operators changing the same
//! user at once never lose each other's changes, and a revocation is never undone.
//!
//! The database backends also keep a *change log* (`changes`): each modification adds a row in
//! the same transaction. Every replica follows it (`auth.store.poll_interval`) to drop what it
//! cached about that user and to end the sessions a change revoked; so a revocation made on one
//! replica, or by the CLI beside it, reaches all of them within about a poll interval, and a
//! replica that was away catches up from the log.
//!
//! They also keep what the gateway writes about its own activity (see [`activity`]): the
//! *session directory* (`sessions`: each replica mirrors its relayed sessions there, so any
//! replica and the CLI can list and end them) and *last-used records* (when, from where and
//! with which client each app password, and each user, last logged in). Both are written in
//! the background, batched; a login never waits for them. So is each user's *login history*
//! (`login_events`: their recent successful and failed logins, [`LoginEvent`]), bounded to
//! [`LOGIN_HISTORY_PER_USER`] rows per user and [`LOGIN_HISTORY_KEPT`].
//!
//! The store holds no policy: whether a login passes is decided in `auth`.

use std::sync::Arc;

use crate::auth::users::{User, UsersError, UsersFile};
use crate::config::{AuthConfig, StoreBackend};

pub mod activity;
pub mod file;
pub mod sql;

pub use crate::login::SessionInfo;

/// The one change [`UserStore::modify`] applies: it gets the user as stored (`None`: no such
/// user) and edits it in place (setting `None` deletes the user); `Ok(true)` writes it,
/// `Ok(false)` leaves everything as it was, `Err` refuses with a message for the operator.
pub type Change<'a> = Box<dyn FnOnce(&mut Option<User>) -> Result<bool, String> + Send + 'a>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error (no secret in the text).
    #[error("the credential store is unavailable: {0}")]
    Unavailable(String),
    /// The change was refused (e.g. "no user x"); nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The file backend's users file.
    #[error(transparent)]
    File(#[from] UsersError),
    /// A stored row that does not make a valid record.
    #[error("the credential store holds an invalid record: {0}")]
    Invalid(String),
}

/// One page of users (`list`), in name order.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only names containing this text.
    pub search: Option<String>,
    /// Only names after this one (the last name of the previous page).
    pub after: Option<String>,
    /// At most this many (0: all).
    pub limit: u32,
}

/// What the change log says happened (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub seq: u64,
    pub kind: ChangeKind,
    pub user: String,
    /// The credential (app password id) or session a `sessions` event names; empty: all.
    pub credential: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The user's record changed (or was deleted): read it again, end what it no longer allows.
    User,
    /// End sessions of the user (all, one credential's, or one session) without a record
    /// change: `imapgate sessions kill`.
    Sessions,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::User => "user",
            ChangeKind::Sessions => "sessions",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(ChangeKind::User),
            "sessions" => Some(ChangeKind::Sessions),
            _ => None,
        }
    }
}

/// How many users an import added and how many it left alone (already there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub added: usize,
    pub skipped: usize,
    pub replaced: usize,
    /// The users left alone because they exist already.
    pub skipped_users: Vec<String>,
}

/// One successful login, as the last-used buffer keeps it until it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub user: String,
    /// The app password id, or `oauth:{issuer name}` (then only the user's last login).
    pub credential: String,
    /// Unix seconds.
    pub at: i64,
    pub address: String,
    /// The client's IMAP `ID` name (sanitised), or "".
    pub client: String,
}

/// What a last-used record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageScope {
    /// One app password's last use.
    AppPassword,
    /// The user's last login, with any credential.
    User,
}

/// When, from where and with which client a credential (or a user) last logged in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub scope: UsageScope,
    pub user: String,
    /// `app_password`: its id; `user`: the credential of the last login (an app password id or
    /// `oauth:{issuer name}`).
    pub credential: String,
    /// Unix seconds.
    pub last_used: i64,
    pub address: String,
    /// The client's IMAP `ID` name, or "".
    pub client: String,
}

/// The most logins the history keeps per user (the newest; older ones are deleted).
pub const LOGIN_HISTORY_PER_USER: usize = 50;

/// Logins older than this leave the history (and are never shown).
pub const LOGIN_HISTORY_KEPT: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// The oldest `at` the login history still shows: now minus [`LOGIN_HISTORY_KEPT`].
pub fn login_history_cutoff() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
        - i64::try_from(LOGIN_HISTORY_KEPT.as_secs()).unwrap_or(i64::MAX)
}

/// One login of a known user, successful or failed, as the login history keeps it (see
/// [`activity::LoginHistory`]). Never a password, token or code: the fields are the audit
/// line's, reduced to what a person recognises.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoginEvent {
    /// The normalised login name.
    pub user: String,
    /// Unix seconds.
    pub at: i64,
    /// The client's address (the PROXY header's, where trusted).
    pub address: String,
    /// The listener's name from the configuration.
    pub listener: String,
    /// `LOGIN`, `PLAIN`, `XOAUTH2` or `OAUTHBEARER`.
    pub mechanism: String,
    /// `ok` or `fail`.
    pub result: String,
    /// The audit line's `reason` (`""` on success, e.g. `bad_password`, `bad_code`).
    pub reason: String,
    /// The client's IMAP `ID` name and version (`name/version`, sanitised), or "".
    pub client: String,
    /// Successes: the app password id or `oauth:{issuer name}`; failures: "".
    pub credential: String,
}

/// The credential store's operations; implemented by [`file::FileStore`] and
/// [`sql::SqlStore`].
#[async_trait::async_trait]
pub trait UserStore: Send + Sync {
    fn backend(&self) -> StoreBackend;

    /// One user with their app passwords and TOTP enrolment.
    async fn user(&self, name: &str) -> Result<Option<User>, StoreError>;

    /// Users in name order (see [`ListQuery`]).
    async fn list(&self, q: &ListQuery) -> Result<Vec<(String, User)>, StoreError>;

    /// Read-modify-write of one user under that user's lock (see [`Change`]). `Ok(true)`: the
    /// change was written (and logged for the other replicas).
    async fn modify(&self, name: &str, change: Change<'_>) -> Result<bool, StoreError>;

    /// Every user, as a users file.
    async fn export(&self) -> Result<UsersFile, StoreError>;

    /// Adds the users of `file`; a user who exists already is left alone, or replaced whole
    /// with `replace`. All or nothing.
    async fn import(&self, file: &UsersFile, replace: bool) -> Result<ImportReport, StoreError>;

    /// The change log after `seq`, oldest first, at most `limit` entries; and the newest
    /// sequence number there is (the file backend has no log: always empty).
    async fn changes_since(
        &self,
        seq: u64,
        limit: u32,
    ) -> Result<(Vec<ChangeEvent>, u64), StoreError>;

    /// Adds an entry to the change log without a record change (`sessions kill`).
    async fn log_event(
        &self,
        kind: ChangeKind,
        user: &str,
        credential: &str,
    ) -> Result<(), StoreError>;

    /// Returns when the change log may have grown (PostgreSQL: a notification from the
    /// changing transaction), or after `within` at the latest.
    async fn wait_for_change(&self, within: std::time::Duration) {
        tokio::time::sleep(within).await;
    }

    /// Deletes old change-log entries; how many.
    async fn prune_changes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The relayed sessions of every replica (of `user` only, if given) from the session
    /// directory, leaving out those of replicas that stopped renewing them.
    async fn sessions(&self, _user: Option<&str>) -> Result<Vec<SessionInfo>, StoreError> {
        Err(StoreError::Refused(
            "this store keeps no session directory: list sessions through the running gateway (--admin)".into(),
        ))
    }

    /// Mirrors replica `replica`'s sessions: adds (or replaces) `upsert`, deletes `remove`,
    /// marks all of the replica's rows as seen now, and deletes other replicas' rows that were
    /// not renewed in time. Returns how many rows the replica has now. One transaction.
    async fn write_sessions(
        &self,
        _replica: &str,
        _upsert: &[SessionInfo],
        _remove: &[String],
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Deletes replica `replica`'s rows from the session directory (at start and at shutdown).
    async fn clear_sessions(&self, _replica: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Writes last-used records (newer ones win; records of app passwords or users that are
    /// gone are dropped).
    async fn record_usage(&self, _batch: &[UsageRecord]) -> Result<(), StoreError> {
        Ok(())
    }

    /// The last-used records of `user`: one per app password used, and the user's last login.
    async fn usage(&self, _user: &str) -> Result<Vec<Usage>, StoreError> {
        Err(StoreError::Refused(
            "this store keeps no last-used records: the running gateway keeps them in memory (--admin)".into(),
        ))
    }

    /// Adds logins to the history, in the order given (oldest first). Only users the store
    /// lists get rows; afterwards each user of the batch keeps at most
    /// [`LOGIN_HISTORY_PER_USER`] rows, and rows older than [`LOGIN_HISTORY_KEPT`] are deleted.
    /// The users file keeps no history here (the gateway keeps it in memory): a no-op.
    async fn record_logins(&self, _events: &[LoginEvent]) -> Result<(), StoreError> {
        Ok(())
    }

    /// The newest logins of `user` (at most `limit`, at most [`LOGIN_HISTORY_PER_USER`]),
    /// newest first; nothing older than [`LOGIN_HISTORY_KEPT`]. The users file: none.
    async fn recent_logins(&self, _user: &str, _limit: u32) -> Result<Vec<LoginEvent>, StoreError> {
        Ok(Vec::new())
    }
}

/// Opens the store `auth` names; the database backends are migrated to the current schema
/// first (`imapgate migrate` does only that).
pub async fn open(auth: &AuthConfig) -> Result<Arc<dyn UserStore>, StoreError> {
    Ok(match auth.store.backend {
        StoreBackend::File => Arc::new(file::FileStore::new(
            auth.users_file.clone(),
            auth.allow_group_readable_secrets,
        )),
        StoreBackend::Sqlite | StoreBackend::Postgres => {
            if auth.store.backend == StoreBackend::Sqlite {
                // The database holds hashes and TOTP ciphertexts: refused when others can read
                // it, like the users file (`config::file_mode`).
                match crate::config::file_mode::check(
                    &auth.store.sqlite_path,
                    auth.allow_group_readable_secrets,
                ) {
                    Ok(None) => {}
                    Ok(Some(w)) => tracing::warn!("auth.store.sqlite.path: {w}"),
                    Err(e) => {
                        return Err(StoreError::Refused(format!("auth.store.sqlite.path: {e}")))
                    }
                }
            }
            let s = sql::SqlStore::connect(&auth.store).await?;
            s.migrate().await?;
            Arc::new(s)
        }
    })
}
