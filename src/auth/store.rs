//! The credential store: app passwords (argon2id) + TOTP from the users file, with unlock
//! windows, replay protection and the verified-credential cache.
//!
//! One login, in order (DESIGN.md, "App password + TOTP"):
//! 1. the name is normalised; the password field is split into the 16-letter app password and
//!    an optional code (letters only, so the split is never ambiguous);
//! 2. the app password is verified — from the verified cache, or by one argon2 run: the keyed
//!    lookup index (see `keyring`) names the one active app password the guess can be, and only
//!    that one is verified; when none matches, one dummy verification is paid instead, as for
//!    unknown and disabled users. So a login costs at most one argon2 run whatever the number
//!    of app passwords. App passwords made before indexes existed (no `lookup`, or one under a
//!    key no longer in the ring) are verified the old way when the index matches nothing: at
//!    most `auth.max_app_passwords_per_user` of them, newest first. After a successful
//!    verification the gateway writes back what the users file lacks — the index under the
//!    active key, a hash with the current argon2 parameters — under the users file's lock;
//!    a read-only file (a mounted Secret) just keeps what it has;
//! 3. policy: allowed mechanisms and client networks;
//! 4. MFA (`required`, `optional` = only if enrolled, `off`): if this app password is unlocked
//!    for the client's subnet, done (appended digits are not evaluated); otherwise a valid code
//!    (±1 step) that this user has not used before, which then unlocks the app password for
//!    `unlock_ttl` from that subnet.
//!
//! Every failure is the same to the client; the reason goes to the audit log and metrics.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::cache::VerifiedCache;
use super::keyring::KeyRing;
use super::users::{AppPassword, User, UsersError, UsersFile};
use super::write_back::{apply_write_back, WriteBack};
use super::{
    app_password, normalize_user_with, totp, Attempt, Authenticator, Credential, FailureReason,
    Identity, NameRules, Outcome,
};
use crate::config::{Argon2Params, AuthConfig, MfaConfig, MfaMode, StoreOnError};
use crate::observe::Metrics;
use crate::secret::Secret;
use crate::state::Store;
use crate::store::{ChangeEvent, ChangeKind, UserStore};

/// How long a used TOTP step stays remembered: the ±1-step window plus one step of margin.
const USED_CODE_TTL: Duration = Duration::from_secs(4 * totp::STEP_SECONDS);

/// How long a write-back after a login waits for the users file's lock (an operator command
/// holding it longer makes the gateway skip the write-back, not wait).
const WRITE_BACK_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Called after each successful reload (e.g. to close revoked users' sessions).
pub(super) type ReloadHook = Box<dyn Fn(&UsersFile) + Send + Sync>;

/// Called for each change-log entry of a database store, with the user's record as it is
/// now (`None`: deleted), e.g. to end the sessions a revocation took away.
pub(super) type ChangeHook = Box<dyn Fn(&ChangeEvent, Option<&User>) + Send + Sync>;

/// A user's record as a login reads it: the stored entry and the decrypted TOTP secret.
struct Entry {
    user: User,
    totp: Option<Secret>,
}

struct Loaded {
    file: Arc<UsersFile>,
    entries: Arc<HashMap<String, Arc<Entry>>>,
}

/// What a login finds for a name.
enum Lookup {
    Found(Arc<Entry>),
    Absent,
    /// The store cannot be read (and nothing cached may stand in for it).
    Unavailable,
}

/// A record read from a database store, and when (`None`: no such user).
type Cached = (tokio::time::Instant, Option<Arc<Entry>>);

/// Whether a database store answers, as the change-log follower last found it (`/readyz`,
/// `imapgate_store_up`).
pub struct StoreHealth {
    backend: crate::config::StoreBackend,
    on_error: StoreOnError,
    up: std::sync::atomic::AtomicBool,
    gauge: prometheus::IntGauge,
}

impl StoreHealth {
    fn set(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::Relaxed);
        self.gauge.set(i64::from(up));
    }

    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl crate::observe::StateReadiness for StoreHealth {
    /// Ready while the store answers. While it does not, `on_error: cache` stays ready (the
    /// logins the verified cache vouches for still work there, and on Kubernetes an unready pod
    /// would get none at all), `fail_closed` is not.
    fn readiness(&self) -> (bool, String) {
        let backend = self.backend.as_str();
        match (self.is_up(), self.on_error) {
            (true, _) => (true, format!("store ({backend}): ok")),
            (false, StoreOnError::Cache) => (
                true,
                format!("store ({backend}, on_error: cache): not ok: unreachable; only credentials in the verified cache log in"),
            ),
            (false, StoreOnError::FailClosed) => (
                false,
                format!("store ({backend}, on_error: fail_closed): not ok: unreachable"),
            ),
        }
    }
}

/// A database store and this replica's short-lived copies of the records it read.
struct Db {
    store: Arc<dyn UserStore>,
    health: Arc<StoreHealth>,
    on_error: StoreOnError,
    ttl: Duration,
    poll: Duration,
    /// name → (read at, record; `None`: no such user).
    records: std::sync::Mutex<HashMap<String, Cached>>,
    on_change: RwLock<Option<ChangeHook>>,
}

/// At most this many records are kept per replica (a flood of unknown names cannot grow it
/// beyond).
const MAX_RECORDS: usize = 100_000;

pub struct CredentialStore {
    /// A database store (`sqlite`, `postgres`); `None`: the users file at `path`.
    db: Option<Db>,
    path: PathBuf,
    loaded: RwLock<Loaded>,
    stamp: RwLock<Option<(SystemTime, u64)>>,
    dummy: String,
    hash_permits: Semaphore,
    /// argon2 working memory, one buffer per permit, reused.
    hash_memory: Arc<std::sync::Mutex<Vec<Vec<argon2::Block>>>>,
    metrics: Arc<Metrics>,
    keyring: KeyRing,
    state: Arc<dyn Store>,
    cache: VerifiedCache,
    mfa: MfaConfig,
    argon2: Argon2Params,
    on_reload: RwLock<Option<ReloadHook>>,
    oauth: Option<super::oauth::OAuthValidator>,
    /// How login names and token claims are compared (`auth.unicode_names`).
    names: NameRules,
    /// App passwords verified the old way at most this many per guess.
    max_per_user: usize,
    allow_group_readable: bool,
    /// (user, app password id) already written back (or tried) since the last reload.
    written_back: std::sync::Mutex<HashSet<(String, String)>>,
    /// Sign-in approval (`auth.mfa.approval: portal`), once the gateway installed it.
    approvals: std::sync::OnceLock<Arc<super::approval::Approvals>>,
}

/// The client's subnet for unlock binding: /24 for IPv4, /64 for IPv6 (the same function the
/// guard uses, with the documented unlock prefixes).
pub(super) fn subnet(ip: IpAddr) -> String {
    crate::net::subnet(ip, 24, 64).to_string()
}

/// Splits a password field into the app password (16 letters, lower-cased, spaces removed)
/// and an optional code of `digits` digits.
pub(super) fn split_password(input: &Secret, digits: u8) -> Option<(Secret, Option<String>)> {
    let mut s = input.clone();
    s.retain(|b| *b != b' ');
    let bytes = s.expose();
    let (letters, code) = if bytes.len() == app_password::LEN {
        (bytes, None)
    } else if bytes.len() == app_password::LEN + usize::from(digits) {
        let (l, c) = bytes.split_at(app_password::LEN);
        if !c.iter().all(u8::is_ascii_digit) {
            return None;
        }
        (l, Some(String::from_utf8_lossy(c).into_owned()))
    } else {
        return None;
    };
    if !letters.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some((
        Secret::new(letters.iter().map(u8::to_ascii_lowercase).collect()),
        code,
    ))
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads the users file and decrypts every TOTP secret; any failure refuses the whole file,
/// and so does a file that others can read (see `config::file_mode`).
fn load(
    path: &std::path::Path,
    keyring: &KeyRing,
    allow_group: bool,
) -> Result<Loaded, UsersError> {
    match crate::config::file_mode::check(path, allow_group) {
        Ok(None) => {}
        Ok(Some(w)) => tracing::warn!("auth.users_file: {w}"),
        Err(e) => return Err(UsersError::Exposed(format!("auth.users_file: {e}"))),
    }
    let file = UsersFile::load(path)?;
    let mut entries = HashMap::new();
    for (name, user) in &file.users {
        let entry = entry(keyring, name, user.clone()).map_err(|message| UsersError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        entries.insert(name.clone(), Arc::new(entry));
    }
    Ok(Loaded {
        file: Arc::new(file),
        entries: Arc::new(entries),
    })
}

/// A record with its TOTP secret decrypted.
fn entry(keyring: &KeyRing, name: &str, user: User) -> Result<Entry, String> {
    let totp = match &user.totp {
        Some(stored) => Some(
            keyring
                .decrypt(name, stored)
                .map_err(|e| format!("users.{name}.totp: {e}"))?,
        ),
        None => None,
    };
    Ok(Entry { user, totp })
}

/// The limits a user's entry puts on its logins: the mechanisms and the networks it may use
/// (an empty list allows any).
fn user_policy(user: &User, attempt: &Attempt) -> Result<(), FailureReason> {
    if !user.mechanisms.is_empty()
        && !user
            .mechanisms
            .iter()
            .any(|m| m == attempt.mechanism.as_str())
    {
        return Err(FailureReason::MechanismNotAllowed);
    }
    if !user.allowed_networks.is_empty()
        && !user
            .allowed_networks
            .iter()
            .any(|n| n.contains(&attempt.client_ip))
    {
        return Err(FailureReason::NetworkNotAllowed);
    }
    Ok(())
}

/// Whether a PHC string was made with other parameters than `want`.
fn needs_rehash(phc: &str, want: Argon2Params) -> bool {
    let Ok(hash) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    match argon2::Params::try_from(&hash) {
        Ok(p) => p.m_cost() != want.m_kib || p.t_cost() != want.t || p.p_cost() != want.p,
        Err(_) => false,
    }
}

impl CredentialStore {
    /// Loads the users file (it must exist, be valid, and every TOTP secret must decrypt).
    pub fn open(
        cfg: &AuthConfig,
        state: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UsersError> {
        Self::open_with(cfg, None, state, metrics)
    }

    /// With a database store (`store`: `sqlite`/`postgres`), records are read from it per
    /// user and kept for `auth.store.cache_ttl`; without, the users file is loaded whole.
    pub fn open_with(
        cfg: &AuthConfig,
        store: Option<Arc<dyn UserStore>>,
        state: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UsersError> {
        let keyring = KeyRing::new(cfg.secret_keys.clone(), cfg.active_key.clone());
        let db = store
            .filter(|s| s.backend() != crate::config::StoreBackend::File)
            .map(|store| Db {
                health: Arc::new(StoreHealth {
                    backend: store.backend(),
                    on_error: cfg.store.on_error,
                    up: std::sync::atomic::AtomicBool::new(true),
                    gauge: metrics.store_up.clone(),
                }),
                store,
                on_error: cfg.store.on_error,
                ttl: cfg.store.cache_ttl,
                poll: cfg.store.poll_interval,
                records: Default::default(),
                on_change: RwLock::new(None),
            });
        let loaded = if db.is_some() {
            Loaded {
                file: Arc::default(),
                entries: Arc::default(),
            }
        } else {
            load(&cfg.users_file, &keyring, cfg.allow_group_readable_secrets)?
        };
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let oauth = if cfg.oauth_issuers.is_empty() {
            None
        } else {
            Some(
                super::oauth::OAuthValidator::new(
                    &cfg.oauth_issuers,
                    metrics.clone(),
                    NameRules::from_config(cfg.unicode_names),
                )
                .map_err(|message| UsersError::Invalid {
                    path: "auth.oauth.issuers".into(),
                    message,
                })?,
            )
        };
        Ok(Self {
            db,
            stamp: RwLock::new(file_stamp(&cfg.users_file)),
            path: cfg.users_file.clone(),
            loaded: RwLock::new(loaded),
            dummy: app_password::dummy_hash(cfg.argon2),
            hash_permits: Semaphore::new(permits),
            hash_memory: Default::default(),
            metrics,
            keyring,
            state,
            cache: VerifiedCache::new(cfg.verified_cache_ttl),
            mfa: cfg.mfa.clone(),
            argon2: cfg.argon2,
            on_reload: RwLock::new(None),
            oauth,
            names: NameRules::from_config(cfg.unicode_names),
            max_per_user: usize::try_from(cfg.max_app_passwords_per_user).unwrap_or(usize::MAX),
            allow_group_readable: cfg.allow_group_readable_secrets,
            written_back: Default::default(),
            approvals: Default::default(),
        })
    }

    /// Installs a hook run after every successful reload.
    pub fn set_reload_hook(&self, hook: ReloadHook) {
        if let Ok(mut h) = self.on_reload.write() {
            *h = Some(hook);
        }
    }

    /// Users in the users file (a database store: 0, it is not loaded whole).
    pub fn user_count(&self) -> usize {
        self.loaded.read().map(|l| l.file.users.len()).unwrap_or(0)
    }

    /// Whether the database store answers (`None`: the users file).
    pub fn store_health(&self) -> Option<Arc<StoreHealth>> {
        self.db.as_ref().map(|db| db.health.clone())
    }

    /// Installs the hook run for each change-log entry (database stores only).
    /// Installs sign-in approval: code-less logins from networks where the app password is
    /// not unlocked are recorded for the person to approve.
    pub fn set_approvals(&self, approvals: Arc<super::approval::Approvals>) {
        let _ = self.approvals.set(approvals);
    }

    pub fn set_change_hook(&self, hook: ChangeHook) {
        if let Some(db) = &self.db {
            if let Ok(mut h) = db.on_change.write() {
                *h = Some(hook);
            }
        }
    }

    /// The record of `name`. From a database store: the copy read less than `cache_ttl`
    /// ago, or a fresh read; when the store cannot be read, `on_error: cache` lets a stale copy
    /// stand in only for a credential the verified cache vouches for (`letters`).
    async fn lookup(&self, name: &str, letters: Option<&Secret>) -> Lookup {
        let Some(db) = &self.db else {
            let Ok(l) = self.loaded.read() else {
                return Lookup::Unavailable;
            };
            return match l.entries.get(name) {
                Some(e) => Lookup::Found(e.clone()),
                None => Lookup::Absent,
            };
        };
        let now = tokio::time::Instant::now();
        let cached = db.records.lock().ok().and_then(|r| r.get(name).cloned());
        if let Some((at, record)) = &cached {
            if now.duration_since(*at) < db.ttl {
                return record.clone().map_or(Lookup::Absent, Lookup::Found);
            }
        }
        match db.store.user(name).await {
            Ok(user) => {
                let record = match user.map(|u| entry(&self.keyring, name, u)).transpose() {
                    Ok(r) => r.map(Arc::new),
                    Err(e) => {
                        tracing::error!(user = %name, error = %e, "stored TOTP enrolment does not decrypt");
                        return Lookup::Unavailable;
                    }
                };
                if let Ok(mut r) = db.records.lock() {
                    if r.len() >= MAX_RECORDS {
                        r.retain(|_, (at, _)| now.duration_since(*at) < db.ttl);
                        if r.len() >= MAX_RECORDS {
                            r.clear();
                        }
                    }
                    r.insert(name.to_owned(), (now, record.clone()));
                }
                record.map_or(Lookup::Absent, Lookup::Found)
            }
            Err(e) => {
                tracing::warn!(error = %e, "credential store unavailable");
                let vouched = db.on_error == StoreOnError::Cache
                    && letters.is_some_and(|l| self.cache.get(name, l).is_some());
                match cached {
                    Some((_, Some(stale))) if vouched => Lookup::Found(stale),
                    _ => Lookup::Unavailable,
                }
            }
        }
    }

    /// Forgets what this replica cached about `name` (its record changed).
    pub fn invalidate(&self, name: &str) {
        if let Some(db) = &self.db {
            if let Ok(mut r) = db.records.lock() {
                r.remove(name);
            }
        }
        self.cache.drop_user(name);
        if let Ok(mut w) = self.written_back.lock() {
            w.retain(|(u, _)| u != name);
        }
    }

    /// Follows a database store's change log until cancelled: each entry drops this
    /// replica's copies of that user and runs the change hook. The first read starts from
    /// the newest entry; a read that fails is retried at the next interval from where it
    /// left off, so a replica cut off for a while catches up (a revocation made meanwhile
    /// ends its sessions as soon as the store answers again). A failure is logged once per
    /// outage and marks the store down (`/readyz`, `imapgate_store_up`) until a read succeeds.
    pub async fn follow_changes(self: Arc<Self>, stop: CancellationToken) {
        let Some(db) = &self.db else { return };
        let mut last = None;
        let mut pruned = tokio::time::Instant::now();
        loop {
            let read = match last {
                None => db
                    .store
                    .changes_since(u64::MAX - 1, 1)
                    .await
                    .map(|(_, newest)| last = Some(newest)),
                Some(seq) => match db.store.changes_since(seq, 1000).await {
                    Ok((events, newest)) => {
                        // A database restored from an older backup starts lower: follow it.
                        let next = match events.last() {
                            Some(_) => self.apply_changes(db, &events).await.unwrap_or(seq),
                            None => seq.min(newest),
                        };
                        last = Some(next);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            match read {
                Ok(()) if !db.health.is_up() => {
                    tracing::info!("the credential store can be read again");
                    db.health.set(true);
                }
                Ok(()) => {}
                Err(e) if db.health.is_up() => {
                    db.health.set(false);
                    tracing::warn!(error = %e, "cannot read the store's change log; retrying every poll interval");
                }
                Err(_) => {}
            }
            if pruned.elapsed() > Duration::from_secs(3600) {
                pruned = tokio::time::Instant::now();
                let _ = db.store.prune_changes().await;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = db.store.wait_for_change(db.poll) => {}
            }
        }
    }

    /// Applies `events` in order; the sequence number of the last one applied (`None`: not
    /// even the first). A changed user that cannot be read stops here, so that entry is applied
    /// again at the next poll rather than skipped (a revocation is never lost).
    async fn apply_changes(&self, db: &Db, events: &[ChangeEvent]) -> Option<u64> {
        let mut applied = None;
        for e in events {
            self.invalidate(&e.user);
            let hooked = db.on_change.read().is_ok_and(|h| h.is_some());
            if hooked {
                let user = match e.kind {
                    ChangeKind::Sessions => None,
                    ChangeKind::User => match db.store.user(&e.user).await {
                        Ok(u) => u,
                        Err(err) => {
                            tracing::warn!(error = %err, user = %e.user, "cannot read a changed user; trying again at the next poll");
                            return applied;
                        }
                    },
                };
                if let Ok(hook) = db.on_change.read() {
                    if let Some(h) = hook.as_ref() {
                        h(e, user.as_ref());
                    }
                }
            }
            applied = Some(e.seq);
        }
        applied
    }

    /// Re-reads the users file now (SIGHUP).
    pub fn reload(&self) {
        if let Ok(mut s) = self.stamp.write() {
            *s = None;
        }
        self.reload_if_changed();
    }

    /// Re-reads the users file if it changed on disk (including a Kubernetes Secret's symlink
    /// swap). A file that does not load is ignored and the previous one kept. A reload flushes
    /// the verified cache, so revocations take effect at once.
    pub fn reload_if_changed(&self) {
        let now = file_stamp(&self.path);
        let old = self.stamp.read().map(|s| *s).unwrap_or(None);
        if now.is_none() || now == old {
            return;
        }
        if let Ok(mut s) = self.stamp.write() {
            *s = now;
        }
        match load(&self.path, &self.keyring, self.allow_group_readable) {
            Ok(loaded) => {
                let file = loaded.file.clone();
                if let Ok(mut l) = self.loaded.write() {
                    *l = loaded;
                }
                self.cache.clear();
                if let Ok(mut w) = self.written_back.lock() {
                    w.clear();
                }
                self.metrics.users_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(users = file.users.len(), "users file reloaded");
                if let Ok(hook) = self.on_reload.read() {
                    if let Some(h) = hook.as_ref() {
                        h(&file);
                    }
                }
            }
            Err(e) => {
                self.metrics
                    .users_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(error = %e, "users file changed but does not load; keeping the previous one");
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

    /// argon2 over the candidates (or one dummy run); the index of the match.
    async fn verify(&self, password: Secret, phcs: Vec<String>) -> Option<usize> {
        let _permit = self.hash_permits.acquire().await.ok()?;
        let runs = phcs.len().max(1) as u64;
        let dummy = self.dummy.clone();
        let pool = self.hash_memory.clone();
        let res = tokio::task::spawn_blocking(move || {
            // One working buffer per permit, reused (see `app_password::verify_in`).
            let mut memory = pool
                .lock()
                .ok()
                .and_then(|mut p| p.pop())
                .unwrap_or_default();
            let found = if phcs.is_empty() {
                app_password::verify_in(&password, &dummy, &mut memory);
                None
            } else {
                // Check every candidate so the time does not depend on which one matches.
                let mut found = None;
                for (i, phc) in phcs.iter().enumerate() {
                    if app_password::verify_in(&password, phc, &mut memory) && found.is_none() {
                        found = Some(i);
                    }
                }
                found
            };
            if let Ok(mut p) = pool.lock() {
                p.push(memory);
            }
            found
        })
        .await
        .ok()
        .flatten();
        self.metrics.hash_runs.inc_by(runs);
        res
    }

    async fn dummy(&self) {
        self.verify(Secret::default(), Vec::new()).await;
    }

    /// The app passwords worth an argon2 run for this guess: the one whose lookup index
    /// matches, or else those whose index cannot be checked (none yet, or under a key no longer
    /// in the ring), newest first and at most `max_per_user`. Empty: nothing can match (the
    /// caller pays one dummy run).
    fn candidates<'a>(&self, letters: &Secret, active: &[&'a AppPassword]) -> Vec<&'a AppPassword> {
        let tags = self.keyring.lookup_tags(letters);
        let mut unindexed = Vec::new();
        for ap in active {
            match ap.lookup.as_deref().and_then(|l| tags.check(l)) {
                Some(true) => return vec![*ap],
                Some(false) => {}
                None => unindexed.push(*ap),
            }
        }
        unindexed.sort_by_key(|a| std::cmp::Reverse(a.created));
        unindexed.truncate(self.max_per_user);
        unindexed
    }

    /// After a successful verification: writes back what the stored app password lacks — the
    /// lookup index under the active key, a hash with the current argon2 parameters — once per
    /// app password and loaded file, in the background, under the users file's lock. The
    /// change is applied to the file as re-read under the lock and only if that app password
    /// is still there, unrevoked, with the hash that was verified; so a revocation or any other
    /// change made meanwhile is never undone. A read-only users file (a mounted Secret) keeps
    /// what it has.
    fn write_back(&self, user: &str, ap: &AppPassword, password: &Secret) {
        let rehash = needs_rehash(&ap.hash, self.argon2);
        let index = self
            .keyring
            .lookup_index(password)
            .ok()
            .filter(|i| ap.lookup.as_deref() != Some(i.as_str()));
        if !rehash && index.is_none() {
            return;
        }
        let first = self
            .written_back
            .lock()
            .is_ok_and(|mut done| done.insert((user.to_owned(), ap.id.clone())));
        if !first {
            return;
        }
        let params = self.argon2;
        let (user, id, old_hash) = (user.to_owned(), ap.id.clone(), ap.hash.clone());
        let password = password.clone();
        if let Some(db) = &self.db {
            let store = db.store.clone();
            tokio::spawn(async move {
                let new_hash = if rehash {
                    tokio::task::spawn_blocking(move || app_password::hash(&password, params).ok())
                        .await
                        .ok()
                        .flatten()
                } else {
                    None
                };
                if new_hash.is_none() && index.is_none() {
                    return;
                }
                let (u, i) = (user.clone(), id.clone());
                let written = store
                    .modify(
                        &user,
                        Box::new(move |record| {
                            Ok(record.as_mut().is_some_and(|r| {
                                super::write_back::apply_to_user(
                                    r,
                                    &WriteBack {
                                        user: &u,
                                        id: &i,
                                        verified_hash: &old_hash,
                                        new_hash: new_hash.as_deref(),
                                        lookup: index.as_deref(),
                                    },
                                )
                            }))
                        }),
                    )
                    .await;
                match written {
                    Ok(w) => {
                        tracing::debug!(user = %user, credential = %id, written = w, "app password write-back")
                    }
                    Err(e) => {
                        tracing::info!(user = %user, credential = %id, error = %e, "could not update the app password in the store (it keeps working as it is)")
                    }
                }
            });
            return;
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let new_hash = if rehash {
                app_password::hash(&password, params).ok()
            } else {
                None
            };
            if new_hash.is_none() && index.is_none() {
                return;
            }
            let written = apply_write_back(
                &path,
                WRITE_BACK_LOCK_WAIT,
                &WriteBack {
                    user: &user,
                    id: &id,
                    verified_hash: &old_hash,
                    new_hash: new_hash.as_deref(),
                    lookup: index.as_deref(),
                },
            );
            match written {
                Ok(true) => tracing::info!(
                    user = %user,
                    credential = %id,
                    rehashed = new_hash.is_some(),
                    indexed = index.is_some(),
                    "app password updated in the users file"
                ),
                Ok(false) => tracing::debug!(
                    user = %user,
                    credential = %id,
                    "app password changed meanwhile; nothing written back"
                ),
                Err(e) => tracing::info!(
                    user = %user,
                    credential = %id,
                    error = %e,
                    "could not update the app password in the users file (it keeps working as it is)"
                ),
            }
        });
    }

    /// Whether token mechanisms are offered.
    pub fn oauth_enabled(&self) -> bool {
        self.oauth.is_some()
    }

    /// The discovery URL and scope for the RFC 7628 error challenge.
    pub fn oauth_challenge_hints(&self) -> (Option<String>, String) {
        self.oauth
            .as_ref()
            .map(|o| o.challenge_hints())
            .unwrap_or((None, String::new()))
    }

    /// A bearer token: validated by the issuer's keys, then the users file's policy (a user
    /// need not be listed; if listed, `disabled`, `mechanisms` and `allowed_networks` apply).
    async fn authenticate_token(
        &self,
        attempt: &Attempt,
        user: Option<&str>,
        token: &Secret,
    ) -> Outcome {
        let Some(oauth) = &self.oauth else {
            return Outcome::Failure(FailureReason::OAuthNotConfigured);
        };
        let claimed = match user.map(|u| normalize_user_with(u, self.names)) {
            None => None,
            Some(Ok(u)) => Some(u),
            Some(Err(r)) => return Outcome::Failure(r),
        };
        let id = match oauth.validate(token, claimed.as_deref()).await {
            Ok(id) => id,
            Err(e) => {
                self.metrics
                    .oauth_tokens
                    .with_label_values(&[e.as_str()])
                    .inc();
                return Outcome::Failure(FailureReason::Token(e));
            }
        };
        self.metrics
            .oauth_tokens
            .with_label_values(&["valid"])
            .inc();
        let found = match self.lookup(&id.user, None).await {
            Lookup::Found(e) => Some(e),
            Lookup::Absent => None,
            Lookup::Unavailable => return Outcome::Failure(FailureReason::StateUnavailable),
        };
        let entry = found.as_deref().map(|e| &e.user);
        if entry.is_some_and(|e| e.disabled) {
            return Outcome::Failure(FailureReason::Disabled);
        }
        if let Some(Err(r)) = entry.map(|e| user_policy(e, attempt)) {
            return Outcome::Failure(r);
        }
        Outcome::Success(Identity {
            upstream_user: entry
                .and_then(|e| e.upstream_user.clone())
                .unwrap_or_else(|| id.user.clone()),
            credential_id: format!("oauth:{}", id.issuer),
            user: id.user,
            mfa: "idp",
            enrolment: None,
            session_until: id.end_session_at,
        })
    }

    fn totp_failure(&self, reason: FailureReason) -> Outcome {
        self.metrics
            .totp_failures
            .with_label_values(&[reason.as_str()])
            .inc();
        Outcome::Failure(reason)
    }
}

#[async_trait::async_trait]
impl Authenticator for CredentialStore {
    async fn authenticate(&self, attempt: &Attempt) -> Outcome {
        let (user, password) = match &attempt.credential {
            Credential::Password { user, password } => (user, password),
            Credential::Malformed(_) => {
                self.dummy().await;
                return Outcome::Failure(FailureReason::Malformed);
            }
            Credential::Bearer { user, token } => {
                return self
                    .authenticate_token(attempt, user.as_deref(), token)
                    .await
            }
            Credential::MalformedBearer(_) => return Outcome::Failure(FailureReason::Malformed),
        };
        let Ok(name) = normalize_user_with(user, self.names) else {
            self.dummy().await;
            return Outcome::Failure(FailureReason::BadName);
        };
        if attempt.require_code
            && split_password(password, self.mfa.code_digits).is_none_or(|(_, c)| c.is_none())
        {
            // Attack mode from an unknown network: a code-less login cannot pass, whoever
            // sends it, so it is refused before any lookup or hash (the floor hides the
            // difference in time).
            return Outcome::Failure(FailureReason::AttackMode);
        }
        let split = split_password(password, self.mfa.code_digits);
        let record = match self
            .lookup(&name, split.as_ref().map(|(letters, _)| letters))
            .await
        {
            Lookup::Found(e) => e,
            Lookup::Absent => {
                self.dummy().await;
                return Outcome::Failure(FailureReason::UnknownUser);
            }
            Lookup::Unavailable => {
                self.dummy().await;
                return Outcome::Failure(FailureReason::StateUnavailable);
            }
        };
        let entry = &record.user;
        if entry.disabled {
            self.dummy().await;
            return Outcome::Failure(FailureReason::Disabled);
        }
        let Some((letters, code)) = split else {
            self.dummy().await;
            return Outcome::Failure(FailureReason::BadPassword);
        };

        // 1. The app password.
        let now = OffsetDateTime::now_utc();
        let active: Vec<_> = entry
            .app_passwords
            .iter()
            .filter(|a| a.is_active(now))
            .collect();
        let flight = self.cache.flight(&name, &letters);
        let _one_at_a_time = match &flight {
            Some(f) => Some(f.wait().await),
            None => None,
        };
        let cached = self
            .cache
            .get(&name, &letters)
            .filter(|id| active.iter().any(|a| &a.id == id));
        let ap = match cached {
            Some(id) => {
                self.metrics.auth_cache_hits.inc();
                active.iter().find(|a| a.id == id).copied()
            }
            None => {
                let candidates = self.candidates(&letters, &active);
                let phcs = candidates.iter().map(|a| a.hash.clone()).collect();
                let found = self
                    .verify(letters.clone(), phcs)
                    .await
                    .and_then(|i| candidates.get(i).copied());
                if let Some(ap) = found {
                    self.cache.insert(&name, &letters, &ap.id);
                    self.write_back(&name, ap, &letters);
                }
                found
            }
        };
        drop(_one_at_a_time);
        drop(flight);
        let Some(ap) = ap else {
            return Outcome::Failure(FailureReason::BadPassword);
        };
        let _ = attempt.matched_credential.set(ap.id.clone());

        // 2. Policy.
        if let Err(r) = user_policy(entry, attempt) {
            return Outcome::Failure(r);
        }
        let identity = |mfa: &'static str| Identity {
            user: name.clone(),
            upstream_user: entry.upstream_user.clone().unwrap_or_else(|| name.clone()),
            credential_id: ap.id.clone(),
            mfa,
            enrolment: matches!(mfa, "totp" | "unlocked")
                .then(|| super::enrolment_tag(entry.totp.as_deref())),
            session_until: None,
        };

        // 3. The second factor.
        let secret = record.totp.as_ref();
        let needed = match entry.mfa.unwrap_or(self.mfa.default) {
            MfaMode::Off => false,
            MfaMode::Optional => secret.is_some(),
            MfaMode::Required => true,
        };
        if !needed && !attempt.require_code {
            // A network its owner denied stays refused even when no code is needed (their
            // authenticator was removed since, under `mfa: optional`).
            if self.approvals.get().is_some() {
                let denied = crate::state::denied_network_key(&name, &subnet(attempt.client_ip));
                match self.state.get(&denied).await {
                    Ok(None) => {}
                    Ok(Some(_)) => return self.totp_failure(FailureReason::NetworkDenied),
                    Err(e) => {
                        tracing::warn!(error = %e, "state store unavailable for the denial lookup");
                        return Outcome::Failure(FailureReason::StateUnavailable);
                    }
                }
            }
            return Outcome::Success(identity("none"));
        }
        let Some(secret) = secret else {
            if attempt.require_code {
                // Attack mode and no second factor to prove who this is.
                return Outcome::Failure(FailureReason::AttackMode);
            }
            return self.totp_failure(FailureReason::MfaNotEnrolled);
        };
        let scope = if self.mfa.unlock_bind_subnet {
            subnet(attempt.client_ip)
        } else {
            "any".to_owned()
        };
        // The enrolment is part of the key: `totp reset` or a new enrolment ends every window.
        let enrolment = super::enrolment_tag(entry.totp.as_deref());
        let unlock_key = super::unlock_key(&name, &ap.id, &scope, &enrolment);
        // One read: is this app password unlocked here, has the guard marked it suspect
        // (correct, but given too many wrong codes), and has its owner denied a sign-in from
        // this network?
        let mut keys = vec![unlock_key.clone(), crate::state::suspect_key(&name, &ap.id)];
        if self.approvals.get().is_some() {
            keys.push(crate::state::denied_network_key(&name, &scope));
        }
        let (unlocked, suspect, denied) = match self.state.get_many(&keys).await {
            Ok(v) => (
                !self.mfa.unlock_ttl.is_zero() && v.first().is_some_and(Option::is_some),
                v.get(1).is_some_and(Option::is_some),
                v.get(2).is_some_and(Option::is_some),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "state store unavailable for unlock lookup");
                return Outcome::Failure(FailureReason::StateUnavailable);
            }
        };
        // A network its owner denied stays refused, code or not, until the block ends.
        if denied {
            return self.totp_failure(FailureReason::NetworkDenied);
        }
        // In attack mode from an unknown network an unlock window does not count: only a
        // fresh code does.
        if unlocked && !attempt.require_code {
            return Outcome::Success(identity("unlocked"));
        }
        if suspect {
            // Someone else holds this app password: it keeps working only where its owner
            // already unlocked it, and no code — not even a right one — unlocks it anew.
            return self.totp_failure(FailureReason::SuspectAppPassword);
        }
        let Some(code) = code else {
            // Approval: the person may let this device in from the portal (never in attack
            // mode, where only a fresh code counts).
            if let (Some(approvals), false) = (self.approvals.get(), attempt.require_code) {
                approvals
                    .record(super::approval::Pending {
                        id: String::new(),
                        user: name.clone(),
                        credential: ap.id.clone(),
                        label: ap.label.clone(),
                        address: attempt.client_ip.to_string(),
                        network: scope.clone(),
                        client: attempt
                            .client
                            .chars()
                            .filter(|c| !c.is_control())
                            .take(100)
                            .collect(),
                        at: 0,
                        expires: 0,
                    })
                    .await;
            }
            return self.totp_failure(FailureReason::CodeMissing);
        };
        let Some(step) = totp::verify(secret, &code, unix_now(), self.mfa.code_digits) else {
            // A code from earlier in the window is a client replaying what it saved; anything
            // else with a valid app password suggests the app password has leaked.
            let stale = totp::was_valid_within(
                secret,
                &code,
                unix_now(),
                self.mfa.code_digits,
                self.mfa.unlock_ttl.max(Duration::from_secs(3600)),
            );
            return self.totp_failure(if stale {
                FailureReason::StaleCode
            } else {
                FailureReason::BadCode
            });
        };
        // Each code at most once per user and enrolment (the step identifies it within the
        // window; a new enrolment has new codes, so its first one is never refused as used).
        match self
            .state
            .set_if_absent(
                &format!("totp:{name}:{enrolment}:{step}"),
                &ap.id,
                USED_CODE_TTL,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return self.totp_failure(FailureReason::CodeReplayed),
            Err(e) => {
                tracing::warn!(error = %e, "state store unavailable for TOTP replay check");
                return Outcome::Failure(FailureReason::StateUnavailable);
            }
        }
        if !self.mfa.unlock_ttl.is_zero() {
            if let Err(e) = self
                .state
                .set_if_absent(&unlock_key, "1", self.mfa.unlock_ttl)
                .await
            {
                tracing::warn!(error = %e, "could not record the unlock");
            }
        }
        Outcome::Success(identity("totp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_field_split() {
        let s = |x: &str| Secret::from_slice(x.as_bytes());
        let (l, c) = split_password(&s("abcd efgh ijkl mnop"), 6).unwrap();
        assert!(l.ct_eq(b"abcdefghijklmnop") && c.is_none());
        let (l, c) = split_password(&s("ABCDefghijklmnop123456"), 6).unwrap();
        assert!(l.ct_eq(b"abcdefghijklmnop"));
        assert_eq!(c.as_deref(), Some("123456"));
        let (_, c) = split_password(&s("abcd efgh ijkl mnop 123 456"), 6).unwrap();
        assert_eq!(c.as_deref(), Some("123456"));
        for bad in [
            "abcdefghijklmnop12345",
            "abcdefghijklmno1123456",
            "abcdefghijklmnop12345x",
            "",
            "abc",
        ] {
            assert!(split_password(&s(bad), 6).is_none(), "{bad}");
        }
    }

    #[test]
    fn subnets() {
        assert_eq!(subnet("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(
            subnet("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn rehash_detection() {
        let p = Argon2Params::light(64);
        let h = app_password::hash(&Secret::from_slice(b"abcdefghijklmnop"), p).unwrap();
        assert!(!needs_rehash(&h, p));
        assert!(needs_rehash(&h, Argon2Params::light(128)));
    }
}
