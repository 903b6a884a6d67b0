//! Shared state: the one interface through which the guard and the authenticators keep what
//! must be shared between replicas (rate cells, counters, sets, one-time markers).
//!
//! Every operation is async and fallible, because Redis can fail; every key carries a TTL so
//! nothing grows without bound. [`MemoryStore`] is the default for a single instance; it bounds
//! its size and evicts as it goes. [`SharedStore`] is Redis ([`RedisStore`]) with that memory
//! store as the fallback, for several replicas (docs/state.md).

mod memory;
mod redis;
mod shared;

use std::time::Duration;

pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use shared::SharedStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// A GCRA rate: `burst` events at once, refilling one every `period / burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub period: Duration,
}

/// The answer of a rate cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Over the rate; retry after this long.
    Limited(Duration),
}

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// GCRA check-and-update of the cell `key`: counts one event if allowed.
    async fn rate_check(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError>;
    /// Adds `by` to a counter, creating it with `ttl`; returns the new value.
    async fn incr(&self, key: &str, by: u64, ttl: Duration) -> Result<u64, StoreError>;
    /// Sets `key` only if absent; true if this call set it.
    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Adds a member to a set (refreshing the set's TTL); returns the number of members.
    async fn set_add_count(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<u64, StoreError>;
    /// Sets `key` to `value` with `ttl`, replacing whatever was there.
    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError>;
    /// Reads a value set with `set_if_absent`/`put`, or a counter as its decimal text.
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// [`Store::get`] for several keys at once (one round trip for a remote store).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError>;
    /// Values and remaining lifetimes of the keys that start with `prefix`, at most `limit`.
    /// For operators (listing blocks), never on a login's path.
    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Duration)>, StoreError>;
    /// Removes a key of any kind.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Removes several keys (one round trip for a remote store).
    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError>;
}

/// The key under which the guard marks an app password suspect (a correct app password given
/// too many wrong codes): the authenticator then accepts it only where it is already unlocked.
/// One definition for the guard, which writes it, and the authenticator, which reads it.
pub fn suspect_key(user: &str, credential: &str) -> String {
    format!("g:block:app_password:{user}/{credential}")
}
