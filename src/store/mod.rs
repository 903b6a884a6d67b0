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
//! The store holds no policy: whether a login passes is decided in `auth`.

use std::sync::Arc;

use crate::auth::users::{User, UsersError, UsersFile};
use crate::config::{AuthConfig, StoreBackend};

pub mod file;
pub mod sql;

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

    /// Deletes old change-log entries; how many.
    async fn prune_changes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
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
            let s = sql::SqlStore::connect(&auth.store).await?;
            s.migrate().await?;
            Arc::new(s)
        }
    })
}
