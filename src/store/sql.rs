//! `backend: sqlite` and `backend: postgres`, through sqlx's Any driver: both run the same SQL
//! (`$N` parameters, `ON CONFLICT … DO UPDATE`), with one migration set per dialect embedded in
//! the binary, forward-only, applied at start and by `imapgate migrate`.
//!
//! Layout: `users` (one row per user), `app_passwords` (one row per app password, deleted with
//! its user), `changes` (the change log the replicas follow), `app_password_usage` and
//! `user_logins` (last use, see `store::activity`), `sessions` (the session directory),
//! `login_events` (each user's recent logins, bounded by [`UserStore::record_logins`]).
//! Times are Unix seconds. A user's row is the unit of locking: SQLite takes the database's
//! write lock at the start of each change (`BEGIN IMMEDIATE`), PostgreSQL a transaction-scoped
//! advisory lock on the user's name, so two changes of one user run one after the other and
//! the second sees the first.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, AssertSqlSafe, Row, SqlSafeStr};
use time::OffsetDateTime;

use super::{
    ChangeEvent, ChangeKind, ImportReport, ListQuery, LoginEvent, SessionInfo, StoreError, Usage,
    UsageRecord, UsageScope, UserStore, LOGIN_HISTORY_PER_USER,
};
use crate::auth::users::{AppPassword, User, UsersFile, VERSION};
use crate::config::{MfaMode, StoreBackend, StoreConfig};

/// Change-log entries older than this are deleted (a replica away longer re-reads everything
/// it caches anyway: its cache lives `cache_ttl`).
const CHANGES_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How long a SQLite writer waits for another one before the change fails.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5000;

pub struct SqlStore {
    pool: AnyPool,
    backend: StoreBackend,
    /// PostgreSQL: the URL for the `LISTEN` connection that wakes the change-log follower.
    listen_url: Option<String>,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
}

/// The channel each change notifies (PostgreSQL), so replicas read the log at once instead of
/// at their next poll.
const CHANNEL: &str = "imapgate_changes";

/// The embedded migrations of one dialect, in order. Most are plain SQL both dialects run; a
/// migration that needs a dialect's own words has a file per dialect. Never edit one that has
/// been released: add the next.
fn migrations(backend: StoreBackend) -> Vec<Migration> {
    let postgres = backend == StoreBackend::Postgres;
    let set: [(&str, &'static str); 4] = [
        ("users", include_str!("migrations/0001_users.sql")),
        (
            "changes usage",
            if postgres {
                include_str!("migrations/0002_changes_usage.postgres.sql")
            } else {
                include_str!("migrations/0002_changes_usage.sqlite.sql")
            },
        ),
        (
            "sessions logins",
            include_str!("migrations/0003_sessions_logins.sql"),
        ),
        (
            "login events",
            if postgres {
                include_str!("migrations/0004_login_events.postgres.sql")
            } else {
                include_str!("migrations/0004_login_events.sqlite.sql")
            },
        ),
    ];
    set.iter()
        .zip(1i64..)
        .map(|((desc, sql), version)| {
            Migration::new(
                version,
                Cow::Owned((*desc).to_owned()),
                MigrationType::Simple,
                AssertSqlSafe(*sql).into_sql_str(),
                false,
            )
        })
        .collect()
}

/// The schema version this binary writes.
pub fn schema_version() -> i64 {
    i64::try_from(migrations(StoreBackend::Sqlite).len()).unwrap_or(i64::MAX)
}

fn db_err(e: sqlx::Error) -> StoreError {
    // sqlx's messages carry no connection URL or bound values.
    StoreError::Unavailable(e.to_string())
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_unix(s: i64, what: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(s).map_err(|_| StoreError::Invalid(format!("{what}: {s}")))
}

fn mfa_str(m: MfaMode) -> &'static str {
    match m {
        MfaMode::Required => "required",
        MfaMode::Optional => "optional",
        MfaMode::Off => "off",
    }
}

fn mfa_parse(s: &str) -> Result<MfaMode, StoreError> {
    match s {
        "required" => Ok(MfaMode::Required),
        "optional" => Ok(MfaMode::Optional),
        "off" => Ok(MfaMode::Off),
        other => Err(StoreError::Invalid(format!("mfa `{other}`"))),
    }
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

/// A `users` row, app passwords still empty.
fn user_of(row: &AnyRow) -> Result<(String, User), StoreError> {
    let name: String = row.try_get("name").map_err(db_err)?;
    let networks: String = row.try_get("allowed_networks").map_err(db_err)?;
    let allowed_networks = split_list(&networks)
        .map(|n| {
            ipnet::IpNet::from_str(n)
                .map_err(|_| StoreError::Invalid(format!("users.{name}.allowed_networks: `{n}`")))
        })
        .collect::<Result<_, _>>()?;
    let mechanisms: String = row.try_get("mechanisms").map_err(db_err)?;
    let mfa: Option<String> = row.try_get("mfa").map_err(db_err)?;
    let user = User {
        disabled: row.try_get::<i64, _>("disabled").map_err(db_err)? != 0,
        mfa: mfa.as_deref().map(mfa_parse).transpose()?,
        mechanisms: split_list(&mechanisms).map(str::to_owned).collect(),
        allowed_networks,
        totp: row.try_get("totp").map_err(db_err)?,
        upstream_user: row.try_get("upstream_user").map_err(db_err)?,
        app_passwords: Vec::new(),
    };
    Ok((name, user))
}

/// An `app_passwords` row and the user it belongs to.
fn app_password_of(row: &AnyRow) -> Result<(String, AppPassword), StoreError> {
    let user: String = row.try_get("user_name").map_err(db_err)?;
    let expires: Option<i64> = row.try_get("expires").map_err(db_err)?;
    let ap = AppPassword {
        id: row.try_get("id").map_err(db_err)?,
        label: row.try_get("label").map_err(db_err)?,
        hash: row.try_get("hash").map_err(db_err)?,
        lookup: row.try_get("lookup").map_err(db_err)?,
        created: from_unix(row.try_get("created").map_err(db_err)?, "created")?,
        expires: expires.map(|e| from_unix(e, "expires")).transpose()?,
        revoked: row.try_get::<i64, _>("revoked").map_err(db_err)? != 0,
    };
    Ok((user, ap))
}

const USER_COLUMNS: &str = "name, disabled, mfa, mechanisms, allowed_networks, totp, upstream_user";
const AP_COLUMNS: &str = "user_name, id, label, hash, lookup, created, expires, revoked";

/// Checks a record as the users file would (names, PHC strings, encrypted TOTP) before it is
/// stored, so a database never holds what the file format refuses.
fn check(name: &str, user: &User) -> Result<(), StoreError> {
    let mut one = UsersFile {
        version: VERSION,
        users: BTreeMap::new(),
    };
    one.users.insert(name.to_owned(), user.clone());
    let text = serde_saphyr::to_string(&one).map_err(|e| StoreError::Invalid(e.to_string()))?;
    UsersFile::parse(&text).map_err(StoreError::Refused)?;
    Ok(())
}

impl SqlStore {
    /// Connects (the pool opens connections as needed); the schema is not touched.
    pub async fn connect(cfg: &StoreConfig) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = cfg.backend;
        let (url, size, timeout) = match backend {
            StoreBackend::Postgres => {
                let Some(pg) = &cfg.postgres else {
                    return Err(StoreError::Refused("auth.store.postgres is missing".into()));
                };
                let mut url = pg.url.expose_str().unwrap_or_default().to_owned();
                if let Some(ca) = &pg.ca_file {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    url.push_str(&format!(
                        "{sep}sslmode=verify-full&sslrootcert={}",
                        percent(&ca.display().to_string())
                    ));
                }
                (url, pg.pool_size, pg.statement_timeout)
            }
            StoreBackend::Sqlite => {
                prepare_sqlite_file(&cfg.sqlite_path)?;
                (
                    format!(
                        "sqlite://{}?mode=rwc",
                        percent(&cfg.sqlite_path.display().to_string())
                    ),
                    4,
                    Duration::from_millis(u64::from(SQLITE_BUSY_TIMEOUT_MS)),
                )
            }
            StoreBackend::File => {
                return Err(StoreError::Refused(
                    "the file backend is not a database".into(),
                ))
            }
        };
        let options = AnyConnectOptions::from_str(&url)
            // The URL may hold a password: never echo it or sqlx's parse error about it.
            .map_err(|_| StoreError::Refused("the store URL cannot be parsed".into()))?;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let pool = AnyPoolOptions::new()
            .max_connections(size)
            .min_connections(0)
            .acquire_timeout(timeout.max(Duration::from_secs(1)))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    use sqlx::Executor;
                    if backend == StoreBackend::Postgres {
                        conn.execute(AssertSqlSafe(format!(
                            "SET statement_timeout = {timeout_ms}; SET application_name = 'imapgate'"
                        )))
                        .await?;
                    } else {
                        conn.execute(AssertSqlSafe(format!(
                            "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; PRAGMA foreign_keys = ON"
                        )))
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        let listen_url = (backend == StoreBackend::Postgres).then(|| url.clone());
        Ok(Self {
            pool,
            backend,
            listen_url,
            listener: tokio::sync::Mutex::new(None),
        })
    }

    /// PostgreSQL: tells the listening replicas that the log grew (delivered at commit).
    async fn notify(&self, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
        if self.backend == StoreBackend::Postgres {
            sqlx::query(AssertSqlSafe(format!("SELECT pg_notify('{CHANNEL}', '')")))
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    /// Applies the migrations this database lacks (a no-op when current). Several replicas
    /// starting at once are serialised by the migrator's lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_to(None).await
    }

    /// Applies migrations up to `target` (tests: build a database of an older schema).
    pub async fn migrate_to(&self, target: Option<i64>) -> Result<(), StoreError> {
        if self.backend == StoreBackend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
        }
        let m = Migrator::with_migrations(migrations(self.backend));
        let r = match target {
            None => m.run(&self.pool).await,
            Some(t) => m.run_to(t, &self.pool).await,
        };
        r.map_err(|e| StoreError::Unavailable(format!("migration: {e}")))
    }

    /// The schema version the database is at (0: none).
    pub async fn current_version(&self) -> Result<i64, StoreError> {
        let exists = match self.backend {
            StoreBackend::Postgres => {
                "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_name = '_sqlx_migrations'"
            }
            _ => "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        };
        let n: i64 = sqlx::query(exists)
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get("n"))
            .map_err(db_err)?;
        if n == 0 {
            return Ok(0);
        }
        sqlx::query(
            "SELECT COALESCE(MAX(version), 0) AS v FROM _sqlx_migrations WHERE success = TRUE",
        )
        .fetch_one(&self.pool)
        .await
        .and_then(|r| r.try_get("v"))
        .map_err(db_err)
    }

    /// Closes the pool (the CLI, before it exits).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a change transaction holding `name`'s lock.
    async fn begin_locked(
        &self,
        name: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        if self.backend == StoreBackend::Sqlite {
            return self
                .pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(db_err);
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("imapgate-user:{name}"))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        Ok(tx)
    }

    async fn read_user(
        conn: &mut sqlx::AnyConnection,
        name: &str,
    ) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let (_, mut user) = user_of(&row)?;
        let aps = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AP_COLUMNS} FROM app_passwords WHERE user_name = $1 ORDER BY created, id"
        )))
        .bind(name)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for r in &aps {
            user.app_passwords.push(app_password_of(r)?.1);
        }
        Ok(Some(user))
    }

    /// Writes `user` as the whole record of `name` (`None`: deletes it), given what was
    /// stored before; app passwords keep their rows (and their usage) when they stay.
    async fn write_user(
        conn: &mut sqlx::AnyConnection,
        name: &str,
        before: Option<&User>,
        user: Option<&User>,
    ) -> Result<(), StoreError> {
        let now = unix(OffsetDateTime::now_utc());
        let Some(u) = user else {
            for q in [
                "DELETE FROM app_password_usage WHERE user_name = $1",
                "DELETE FROM user_logins WHERE user_name = $1",
                "DELETE FROM login_events WHERE user_name = $1",
                "DELETE FROM app_passwords WHERE user_name = $1",
                "DELETE FROM users WHERE name = $1",
            ] {
                sqlx::query(q)
                    .bind(name)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?;
            }
            return Ok(());
        };
        let networks: Vec<String> = u.allowed_networks.iter().map(ToString::to_string).collect();
        sqlx::query(
            "INSERT INTO users (name, disabled, mfa, mechanisms, allowed_networks, totp, upstream_user, created, updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (name) DO UPDATE SET disabled = excluded.disabled, mfa = excluded.mfa, \
             mechanisms = excluded.mechanisms, allowed_networks = excluded.allowed_networks, \
             totp = excluded.totp, upstream_user = excluded.upstream_user, updated = excluded.updated",
        )
        .bind(name)
        .bind(i64::from(u.disabled))
        .bind(u.mfa.map(mfa_str))
        .bind(u.mechanisms.join(","))
        .bind(networks.join(","))
        .bind(u.totp.clone())
        .bind(u.upstream_user.clone())
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        for old in before.map(|b| b.app_passwords.as_slice()).unwrap_or(&[]) {
            if !u.app_passwords.iter().any(|a| a.id == old.id) {
                for q in [
                    "DELETE FROM app_password_usage WHERE user_name = $1 AND id = $2",
                    "DELETE FROM app_passwords WHERE user_name = $1 AND id = $2",
                ] {
                    sqlx::query(q)
                        .bind(name)
                        .bind(old.id.clone())
                        .execute(&mut *conn)
                        .await
                        .map_err(db_err)?;
                }
            }
        }
        for a in &u.app_passwords {
            let unchanged = before
                .and_then(|b| b.app_passwords.iter().find(|o| o.id == a.id))
                .is_some_and(|o| o == a);
            if unchanged {
                continue;
            }
            sqlx::query(
                "INSERT INTO app_passwords (user_name, id, label, hash, lookup, created, expires, revoked) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (user_name, id) DO UPDATE SET label = excluded.label, hash = excluded.hash, \
                 lookup = excluded.lookup, expires = excluded.expires, revoked = excluded.revoked",
            )
            .bind(name)
            .bind(a.id.clone())
            .bind(a.label.clone())
            .bind(a.hash.clone())
            .bind(a.lookup.clone())
            .bind(unix(a.created))
            .bind(a.expires.map(unix))
            .bind(i64::from(a.revoked))
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        }
        Ok(())
    }

    async fn log(
        conn: &mut sqlx::AnyConnection,
        kind: ChangeKind,
        user: &str,
        credential: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO changes (at, kind, user_name, credential) VALUES ($1, $2, $3, $4)",
        )
        .bind(unix(OffsetDateTime::now_utc()))
        .bind(kind.as_str())
        .bind(user)
        .bind(credential)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Deletes change-log entries older than a day.
    async fn prune(&self) -> Result<u64, StoreError> {
        let cutoff = unix(OffsetDateTime::now_utc())
            - i64::try_from(CHANGES_KEPT.as_secs()).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM changes WHERE at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(db_err)
    }

    /// Users (with app passwords) from `rows` of the users table, in order.
    async fn with_app_passwords(
        &self,
        rows: Vec<AnyRow>,
    ) -> Result<Vec<(String, User)>, StoreError> {
        let mut users: Vec<(String, User)> = rows.iter().map(user_of).collect::<Result<_, _>>()?;
        let (Some(first), Some(last)) = (users.first(), users.last()) else {
            return Ok(users);
        };
        let aps = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AP_COLUMNS} FROM app_passwords WHERE user_name >= $1 AND user_name <= $2 \
             ORDER BY user_name, created, id"
        )))
        .bind(first.0.clone())
        .bind(last.0.clone())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let mut by_user: BTreeMap<String, Vec<AppPassword>> = BTreeMap::new();
        for r in &aps {
            let (u, ap) = app_password_of(r)?;
            by_user.entry(u).or_default().push(ap);
        }
        for (name, user) in &mut users {
            if let Some(list) = by_user.remove(name) {
                user.app_passwords = list;
            }
        }
        Ok(users)
    }
}

const SESSION_COLUMNS: &str = "id, replica, user_name, credential, client_address, client_name, \
     client_version, listener, since";

/// Session rows per INSERT statement (10 values each, well under SQLite's bound on parameters).
const SESSIONS_PER_INSERT: usize = 50;

fn session_of(row: &AnyRow) -> Result<SessionInfo, StoreError> {
    Ok(SessionInfo {
        id: row.try_get("id").map_err(db_err)?,
        replica: row.try_get("replica").map_err(db_err)?,
        user: row.try_get("user_name").map_err(db_err)?,
        credential: row.try_get("credential").map_err(db_err)?,
        client_address: row.try_get("client_address").map_err(db_err)?,
        client_name: row.try_get("client_name").map_err(db_err)?,
        client_version: row.try_get("client_version").map_err(db_err)?,
        listener: row.try_get("listener").map_err(db_err)?,
        since: row.try_get("since").map_err(db_err)?,
    })
}

/// Login-history rows per INSERT statement (9 values each).
const LOGINS_PER_INSERT: usize = 50;

const LOGIN_COLUMNS: &str =
    "user_name, at, address, listener, mechanism, result, reason, client, credential";

fn login_of(row: &AnyRow) -> Result<LoginEvent, StoreError> {
    Ok(LoginEvent {
        user: row.try_get("user_name").map_err(db_err)?,
        at: row.try_get("at").map_err(db_err)?,
        address: row.try_get("address").map_err(db_err)?,
        listener: row.try_get("listener").map_err(db_err)?,
        mechanism: row.try_get("mechanism").map_err(db_err)?,
        result: row.try_get("result").map_err(db_err)?,
        reason: row.try_get("reason").map_err(db_err)?,
        client: row.try_get("client").map_err(db_err)?,
        credential: row.try_get("credential").map_err(db_err)?,
    })
}

/// The oldest `seen` a live replica's session row can have.
fn sessions_cutoff() -> i64 {
    unix(OffsetDateTime::now_utc())
        - i64::try_from(super::activity::SESSIONS_STALE.as_secs()).unwrap_or(i64::MAX)
}

/// Percent-encodes what would end or confuse a URL's path or parameter.
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Creates the SQLite file with mode 0600 (and its directory with 0700) if missing, so the
/// database — hashes, encrypted TOTP secrets — is never readable by others, even for a moment.
fn prepare_sqlite_file(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
        }
    }
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))
            })?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl UserStore for SqlStore {
    fn backend(&self) -> StoreBackend {
        self.backend
    }

    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        Self::read_user(&mut conn, name).await
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<(String, User)>, StoreError> {
        let limit = if q.limit == 0 {
            i64::MAX
        } else {
            i64::from(q.limit)
        };
        // LIKE with the search text escaped, so `%` and `_` in it match themselves.
        let pattern = q.search.as_deref().map(|s| {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE name > $1 AND name LIKE $2 ESCAPE '\\' \
             ORDER BY name LIMIT $3"
        )))
        .bind(q.after.clone().unwrap_or_default())
        .bind(pattern.unwrap_or_else(|| "%".to_owned()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        self.with_app_passwords(rows).await
    }

    async fn modify(&self, name: &str, change: super::Change<'_>) -> Result<bool, StoreError> {
        let mut tx = self.begin_locked(name).await?;
        let before = Self::read_user(&mut tx, name).await?;
        let mut user = before.clone();
        match change(&mut user) {
            Ok(true) => {}
            Ok(false) => {
                tx.rollback().await.map_err(db_err)?;
                return Ok(false);
            }
            Err(m) => {
                tx.rollback().await.map_err(db_err)?;
                return Err(StoreError::Refused(m));
            }
        }
        if let Some(u) = &user {
            check(name, u)?;
        }
        Self::write_user(&mut tx, name, before.as_ref(), user.as_ref()).await?;
        Self::log(&mut tx, ChangeKind::User, name, "").await?;
        self.notify(&mut tx).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    async fn export(&self) -> Result<UsersFile, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(UsersFile {
            version: VERSION,
            users: self.with_app_passwords(rows).await?.into_iter().collect(),
        })
    }

    async fn import(&self, file: &UsersFile, replace: bool) -> Result<ImportReport, StoreError> {
        for (name, user) in &file.users {
            check(name, user)?;
        }
        let mut report = ImportReport::default();
        let mut tx = if self.backend == StoreBackend::Sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            self.pool.begin().await
        }
        .map_err(db_err)?;
        for (name, user) in &file.users {
            let before = Self::read_user(&mut tx, name).await?;
            match &before {
                Some(_) if !replace => {
                    report.skipped += 1;
                    report.skipped_users.push(name.clone());
                    continue;
                }
                Some(_) => report.replaced += 1,
                None => report.added += 1,
            }
            Self::write_user(&mut tx, name, before.as_ref(), Some(user)).await?;
            Self::log(&mut tx, ChangeKind::User, name, "").await?;
        }
        self.notify(&mut tx).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(report)
    }

    async fn changes_since(
        &self,
        seq: u64,
        limit: u32,
    ) -> Result<(Vec<ChangeEvent>, u64), StoreError> {
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT seq, kind, user_name, credential FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let newest: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS s FROM changes")
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get("s"))
            .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get("seq").map_err(db_err)?;
            let kind: String = r.try_get("kind").map_err(db_err)?;
            let Some(kind) = ChangeKind::parse(&kind) else {
                // A kind from a newer version: read the user again, the safe reading.
                tracing::debug!(kind = %kind, "unknown change kind");
                continue;
            };
            out.push(ChangeEvent {
                seq: u64::try_from(seq).unwrap_or(0),
                kind,
                user: r.try_get("user_name").map_err(db_err)?,
                credential: r.try_get("credential").map_err(db_err)?,
            });
        }
        Ok((out, u64::try_from(newest).unwrap_or(0)))
    }

    async fn log_event(
        &self,
        kind: ChangeKind,
        user: &str,
        credential: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        Self::log(&mut conn, kind, user, credential).await?;
        self.notify(&mut conn).await
    }

    async fn wait_for_change(&self, within: Duration) {
        let Some(url) = &self.listen_url else {
            tokio::time::sleep(within).await;
            return;
        };
        let started = tokio::time::Instant::now();
        let mut slot = self.listener.lock().await;
        if slot.is_none() {
            let connected = tokio::time::timeout(within, async {
                let mut l = sqlx::postgres::PgListener::connect(url).await?;
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            })
            .await;
            match connected {
                Ok(Ok(l)) => *slot = Some(l),
                // No notifications for now: the poll still reads the log.
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot LISTEN for store changes"),
                Err(_) => {}
            }
        }
        let left = within.saturating_sub(started.elapsed());
        let Some(listener) = slot.as_mut() else {
            drop(slot);
            tokio::time::sleep(left).await;
            return;
        };
        match tokio::time::timeout(left, listener.recv()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // Connect again next time; meanwhile the poll interval holds.
                tracing::debug!(error = %e, "the LISTEN connection failed");
                *slot = None;
                drop(slot);
                tokio::time::sleep(within.saturating_sub(started.elapsed())).await;
            }
            Err(_) => {}
        }
    }

    async fn prune_changes(&self) -> Result<u64, StoreError> {
        self.prune().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(db_err)
    }

    async fn sessions(&self, user: Option<&str>) -> Result<Vec<SessionInfo>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE seen >= $1 AND ($2 = '' OR user_name = $2) \
             ORDER BY user_name, since, id"
        )))
        .bind(sessions_cutoff())
        .bind(user.unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(session_of).collect()
    }

    async fn write_sessions(
        &self,
        replica: &str,
        upsert: &[SessionInfo],
        remove: &[String],
    ) -> Result<u64, StoreError> {
        let now = unix(OffsetDateTime::now_utc());
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        for id in remove {
            sqlx::query("DELETE FROM sessions WHERE id = $1 AND replica = $2")
                .bind(id.clone())
                .bind(replica)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        for chunk in upsert.chunks(SESSIONS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=10).map(|k| format!("${}", i * 10 + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}, seen) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET replica = excluded.replica, \
                 user_name = excluded.user_name, credential = excluded.credential, \
                 client_address = excluded.client_address, client_name = excluded.client_name, \
                 client_version = excluded.client_version, listener = excluded.listener, \
                 since = excluded.since, seen = excluded.seen",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for s in chunk {
                q = q
                    .bind(s.id.clone())
                    .bind(replica.to_owned())
                    .bind(s.user.clone())
                    .bind(s.credential.clone())
                    .bind(s.client_address.clone())
                    .bind(s.client_name.clone())
                    .bind(s.client_version.clone())
                    .bind(s.listener.clone())
                    .bind(s.since)
                    .bind(now);
            }
            q.execute(&mut *tx).await.map_err(db_err)?;
        }
        let rows = sqlx::query("UPDATE sessions SET seen = $1 WHERE replica = $2")
            .bind(now)
            .bind(replica)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        sqlx::query("DELETE FROM sessions WHERE seen < $1")
            .bind(sessions_cutoff())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(rows)
    }

    async fn clear_sessions(&self, replica: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE replica = $1")
            .bind(replica)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(db_err)
    }

    async fn record_usage(&self, batch: &[UsageRecord]) -> Result<(), StoreError> {
        // The newest login per user, for `user_logins`.
        let mut newest: BTreeMap<&str, &UsageRecord> = BTreeMap::new();
        for r in batch {
            let e = newest.entry(r.user.as_str()).or_insert(r);
            if e.at < r.at {
                *e = r;
            }
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        for r in batch.iter().filter(|r| !r.credential.starts_with("oauth:")) {
            // Only for an app password that (still) exists: a record never outlives it.
            sqlx::query(
                "INSERT INTO app_password_usage (user_name, id, last_used, last_address, last_client) \
                 SELECT $1, $2, $3, $4, $5 \
                 WHERE EXISTS (SELECT 1 FROM app_passwords WHERE user_name = $1 AND id = $2) \
                 ON CONFLICT (user_name, id) DO UPDATE SET last_used = excluded.last_used, \
                 last_address = excluded.last_address, last_client = excluded.last_client \
                 WHERE excluded.last_used >= app_password_usage.last_used",
            )
            .bind(r.user.clone())
            .bind(r.credential.clone())
            .bind(r.at)
            .bind(r.address.clone())
            .bind(r.client.clone())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        for r in newest.values() {
            sqlx::query(
                "INSERT INTO user_logins (user_name, last_login, last_address, last_client, last_credential) \
                 SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM users WHERE name = $1) \
                 ON CONFLICT (user_name) DO UPDATE SET last_login = excluded.last_login, \
                 last_address = excluded.last_address, last_client = excluded.last_client, \
                 last_credential = excluded.last_credential \
                 WHERE excluded.last_login >= user_logins.last_login",
            )
            .bind(r.user.clone())
            .bind(r.at)
            .bind(r.address.clone())
            .bind(r.client.clone())
            .bind(r.credential.clone())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn usage(&self, user: &str) -> Result<Vec<Usage>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, last_used, last_address, last_client FROM app_password_usage \
             WHERE user_name = $1 ORDER BY id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len() + 1);
        for r in &rows {
            out.push(Usage {
                scope: UsageScope::AppPassword,
                user: user.to_owned(),
                credential: r.try_get("id").map_err(db_err)?,
                last_used: r.try_get("last_used").map_err(db_err)?,
                address: r.try_get("last_address").map_err(db_err)?,
                client: r.try_get("last_client").map_err(db_err)?,
            });
        }
        let login = sqlx::query(
            "SELECT last_login, last_address, last_client, last_credential FROM user_logins \
             WHERE user_name = $1",
        )
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        if let Some(r) = login {
            out.push(Usage {
                scope: UsageScope::User,
                user: user.to_owned(),
                credential: r.try_get("last_credential").map_err(db_err)?,
                last_used: r.try_get("last_login").map_err(db_err)?,
                address: r.try_get("last_address").map_err(db_err)?,
                client: r.try_get("last_client").map_err(db_err)?,
            });
        }
        Ok(out)
    }

    /// One transaction: the batch's rows (users the store does not list are skipped), then
    /// the bounds: each user of the batch keeps the newest [`LOGIN_HISTORY_PER_USER`] rows, and
    /// rows older than [`super::LOGIN_HISTORY_KEPT`] go, whoever they belong to (an index on
    /// `at` makes that a short range scan).
    async fn record_logins(&self, events: &[LoginEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        for chunk in events.chunks(LOGINS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=9).map(|k| format!("${}", i * 9 + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            // `VALUES` names its columns column1…column9 in both dialects.
            let sql = format!(
                "INSERT INTO login_events ({LOGIN_COLUMNS}) \
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, \
                 v.column7, v.column8, v.column9 FROM (VALUES {}) AS v \
                 WHERE EXISTS (SELECT 1 FROM users WHERE name = v.column1)",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                q = q
                    .bind(e.user.clone())
                    .bind(e.at)
                    .bind(e.address.clone())
                    .bind(e.listener.clone())
                    .bind(e.mechanism.clone())
                    .bind(e.result.clone())
                    .bind(e.reason.clone())
                    .bind(e.client.clone())
                    .bind(e.credential.clone());
            }
            q.execute(&mut *tx).await.map_err(db_err)?;
        }
        let users: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.user.as_str()).collect();
        let keep = i64::try_from(LOGIN_HISTORY_PER_USER).unwrap_or(i64::MAX);
        for user in users {
            sqlx::query(
                "DELETE FROM login_events WHERE user_name = $1 AND seq NOT IN \
                 (SELECT seq FROM login_events WHERE user_name = $1 ORDER BY at DESC, seq DESC LIMIT $2)",
            )
            .bind(user)
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        sqlx::query("DELETE FROM login_events WHERE at < $1")
            .bind(super::login_history_cutoff())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn recent_logins(&self, user: &str, limit: u32) -> Result<Vec<LoginEvent>, StoreError> {
        let limit = i64::from(limit).clamp(0, i64::try_from(LOGIN_HISTORY_PER_USER).unwrap_or(0));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {LOGIN_COLUMNS} FROM login_events WHERE user_name = $1 AND at >= $2 \
             ORDER BY at DESC, seq DESC LIMIT $3"
        )))
        .bind(user)
        .bind(super::login_history_cutoff())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(login_of).collect()
    }
}
