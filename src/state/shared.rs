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
//! an outage is still refused during it. Deletes go to both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{MemoryStore, Rate, RateDecision, RedisStore, Store, StoreError};
use crate::config::OnError;
use crate::observe::Metrics;

pub struct SharedStore {
    remote: RedisStore,
    local: Arc<MemoryStore>,
    on_error: OnError,
    metrics: Arc<Metrics>,
    up: AtomicBool,
}

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
        }
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
    /// gauge is true even when no login happens), until `stop`.
    pub async fn probe_loop(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            match self.remote.ping().await {
                Ok(()) => self.mark_up(),
                Err(e) => {
                    if self.is_up() {
                        self.mark_down("ping", &e);
                    }
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
        let fresh_here = self.local.set_if_absent(key, value, ttl).await?;
        let fresh = self
            .either(
                "set_if_absent",
                self.remote.set_if_absent(key, value, ttl),
                async { Ok(fresh_here) },
            )
            .await?;
        Ok(fresh && fresh_here)
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
        self.local.put(key, value, ttl).await?;
        self.either("put", self.remote.put(key, value, ttl), async { Ok(()) })
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
