//! Redis with a local fallback: the [`Store`] of a replica among several.
//!
//! While Redis answers, everything goes there. When an operation fails or times out, Redis is
//! marked down (logged once, counted in `imapgate_state_store_errors_total{op}`, shown by
//! `imapgate_state_store_up` and `/readyz`) and, with `on_error: local`, the gateway keeps
//! protecting with this replica's own [`MemoryStore`] — budgets start afresh there, which is
//! the price of staying up. With `on_error: fail_closed`, operations fail instead (logins
//! that need the state are refused). A probe every second brings Redis back by itself.
//!
//! Markers (`set_if_absent`, `put`: used TOTP codes, unlock windows, blocks, known-good
//! networks) are also written to the local store, always: a code used on this replica before
//! an outage is still refused during it. Deletes go to both. When the local store is full of
//! markers and refuses a new one, Redis's answer alone decides while Redis is up.
//!
//! The probe also reads Redis's eviction policy when it connects and every minute
//! ([`RedisStore::eviction`]): a policy that may evict keys could drop a used-code marker, so
//! `/readyz` is false unless `state.redis.allow_eviction` accepts that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::redis::Eviction;
use super::{MemoryStore, Rate, RateDecision, RedisStore, Store, StoreError};
use crate::config::OnError;
use crate::observe::Metrics;

pub struct SharedStore {
    remote: RedisStore,
    local: Arc<MemoryStore>,
    on_error: OnError,
    metrics: Arc<Metrics>,
    up: AtomicBool,
    /// `state.redis.allow_eviction`: a policy that may evict keeps the replica ready.
    allow_eviction: bool,
    /// What the last check of the eviction policy found (None: not checked yet).
    eviction: Mutex<Option<Eviction>>,
}

/// How often the eviction policy is read again while Redis is up (and at every reconnect).
const EVICTION_CHECK_EVERY: Duration = Duration::from_secs(60);

impl SharedStore {
    pub fn new(
        remote: RedisStore,
        local: Arc<MemoryStore>,
        on_error: OnError,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.state_store_up.set(1);
        Self {
            remote,
            local,
            on_error,
            metrics,
            up: AtomicBool::new(true),
            allow_eviction: false,
            eviction: Mutex::new(None),
        }
    }

    /// Accepts a Redis policy that may evict keys (`state.redis.allow_eviction`).
    #[must_use]
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Whether a policy that may evict was accepted in the configuration.
    pub fn eviction_allowed(&self) -> bool {
        self.allow_eviction
    }

    /// The eviction policy as last read from Redis (None: not read yet).
    pub fn eviction(&self) -> Option<Eviction> {
        *self.eviction.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the eviction policy; logs when the verdict changes. False (the last verdict
    /// kept) when Redis did not answer.
    async fn check_eviction(&self) -> bool {
        let Ok(now) = self.remote.eviction().await else {
            return false;
        };
        let before = self
            .eviction
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(now);
        if before == Some(now) {
            return true;
        }
        let consequence = if self.allow_eviction {
            "accepted by state.redis.allow_eviction"
        } else {
            "/readyz is false until maxmemory-policy is noeviction (or maxmemory 0), or state.redis.allow_eviction accepts the risk"
        };
        match now {
            Eviction::Never => {
                if before.is_some() {
                    tracing::warn!("Redis no longer evicts keys: used TOTP codes are kept for their whole validity");
                }
            }
            Eviction::Possible(policy) => {
                if self.allow_eviction {
                    tracing::warn!(policy, "Redis may evict keys under memory pressure (maxmemory-policy): a used TOTP code could be evicted and replayed; {consequence}");
                } else {
                    tracing::error!(policy, "Redis may evict keys under memory pressure (maxmemory-policy): a used TOTP code could be evicted and replayed; {consequence}");
                }
            }
            Eviction::Unknown => {
                if self.allow_eviction {
                    tracing::warn!("cannot read Redis's maxmemory-policy (CONFIG GET and INFO refused); {consequence}");
                } else {
                    tracing::error!("cannot read Redis's maxmemory-policy (CONFIG GET and INFO refused: allow INFO for the gateway's ACL user); {consequence}");
                }
            }
        }
        true
    }

    /// True while Redis answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    fn mark_down(&self, op: &str, e: &StoreError) {
        self.metrics
            .state_store_errors
            .with_label_values(&[op])
            .inc();
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.state_store_up.set(0);
            match self.on_error {
                OnError::Local => {
                    tracing::error!(error = %e, op, "Redis unreachable: serving with this replica's local state until it is back")
                }
                OnError::FailClosed => {
                    tracing::error!(error = %e, op, "Redis unreachable: refusing what needs the shared state (on_error: fail_closed)")
                }
            }
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.state_store_up.set(1);
            tracing::warn!("Redis is back: shared state resumes");
        }
    }

    /// Redis when it is up; otherwise (or when it fails now) the local store or an error.
    async fn either<T>(
        &self,
        op: &'static str,
        remote: impl std::future::Future<Output = Result<T, StoreError>>,
        local: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if self.is_up() {
            match remote.await {
                Ok(v) => return Ok(v),
                Err(e) => self.mark_down(op, &e),
            }
        }
        match self.on_error {
            OnError::Local => local.await,
            OnError::FailClosed => Err(StoreError::Unavailable(
                "redis unreachable (on_error: fail_closed)".into(),
            )),
        }
    }

    /// Probes Redis every `every` while it is down (and now and then while up, so that the
    /// gauge is true even when no login happens), until `stop`. The eviction policy is read at
    /// the first answer, after every outage, and every [`EVICTION_CHECK_EVERY`].
    pub async fn probe_loop(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut checked: Option<Instant> = None;
        loop {
            match self.remote.ping().await {
                Ok(()) => {
                    self.mark_up();
                    if checked.is_none_or(|t| t.elapsed() >= EVICTION_CHECK_EVERY)
                        && self.check_eviction().await
                    {
                        checked = Some(Instant::now());
                    }
                }
                Err(e) => {
                    if self.is_up() {
                        self.mark_down("ping", &e);
                    }
                    // Read it again when Redis is back (it may be another server).
                    checked = None;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for SharedStore {
    async fn rate_check(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        self.either(
            "rate_check",
            self.remote.rate_check(key, rate),
            self.local.rate_check(key, rate),
        )
        .await
    }

    async fn incr(&self, key: &str, by: u64, ttl: Duration) -> Result<u64, StoreError> {
        self.either(
            "incr",
            self.remote.incr(key, by, ttl),
            self.local.incr(key, by, ttl),
        )
        .await
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // The local copy first: what this replica has seen stays refused through an outage.
        // A local store full of markers refuses a new one: then Redis alone decides (and
        // without Redis, the refusal stands).
        let here = self.local.set_if_absent(key, value, ttl).await;
        let fresh_here = here.as_ref().ok().copied();
        let fresh = self
            .either(
                "set_if_absent",
                self.remote.set_if_absent(key, value, ttl),
                async { here },
            )
            .await?;
        Ok(fresh && fresh_here.unwrap_or(true))
    }

    async fn set_add_count(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        self.either(
            "set_add_count",
            self.remote.set_add_count(key, member, ttl),
            self.local.set_add_count(key, member, ttl),
        )
        .await
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        // As above: a local refusal matters only when Redis cannot answer.
        let here = self.local.put(key, value, ttl).await;
        self.either("put", self.remote.put(key, value, ttl), async { here })
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.either("get", self.remote.get(key), self.local.get(key))
            .await
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.either(
            "get_many",
            self.remote.get_many(keys),
            self.local.get_many(keys),
        )
        .await
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Duration)>, StoreError> {
        self.either(
            "scan",
            self.remote.scan_prefix(prefix, limit),
            self.local.scan_prefix(prefix, limit),
        )
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.local.delete(key).await?;
        self.either("delete", self.remote.delete(key), async { Ok(()) })
            .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.local.delete_many(keys).await?;
        self.either("delete", self.remote.delete_many(keys), async { Ok(()) })
            .await
    }
}

impl crate::observe::StateReadiness for SharedStore {
    fn readiness(&self) -> (bool, String) {
        if self.is_up() {
            return redis_eviction(self);
        }
        match self.on_error() {
            OnError::Local => (
                true,
                "state: redis unreachable; serving with this replica's local state".into(),
            ),
            OnError::FailClosed => (false, "state (redis, on_error: fail_closed): not ok".into()),
        }
    }
}

/// The readiness line of a reachable Redis: not ready while its `maxmemory-policy` may evict
/// keys (a used TOTP code could be dropped and replayed) or has not been read yet, unless
/// `state.redis.allow_eviction` accepts it.
fn redis_eviction(s: &SharedStore) -> (bool, String) {
    let allowed = s.eviction_allowed();
    let (good, line) = match s.eviction() {
        Some(Eviction::Never) => (true, "state: redis ok".to_owned()),
        None => (
            false,
            "state (redis): not ok: maxmemory-policy not read yet".to_owned(),
        ),
        Some(Eviction::Possible(policy)) if allowed => (
            true,
            format!("state: redis ok; maxmemory-policy {policy} may evict used TOTP codes (accepted by state.redis.allow_eviction)"),
        ),
        Some(Eviction::Possible(policy)) => (
            false,
            format!("state (redis): not ok: maxmemory-policy {policy} with a maxmemory may evict used TOTP codes before they expire; set maxmemory-policy noeviction (or maxmemory 0), or accept it with state.redis.allow_eviction: true"),
        ),
        Some(Eviction::Unknown) if allowed => (
            true,
            "state: redis ok; maxmemory-policy unreadable (accepted by state.redis.allow_eviction)".to_owned(),
        ),
        Some(Eviction::Unknown) => (
            false,
            "state (redis): not ok: cannot read maxmemory-policy (CONFIG GET and INFO refused); allow INFO for the gateway's ACL user, or accept it with state.redis.allow_eviction: true".to_owned(),
        ),
    };
    (good, line)
}
