//! Shared state: the one interface through which the guard and the authenticators keep what
//! must be shared between replicas (rate cells, counters, sets, one-time markers).
//!
//! Every operation is async and fallible, because Redis can fail; every key carries a TTL so
//! nothing grows without bound. [`MemoryStore`] is the default for a single instance; it bounds
//! its size and evicts as it goes. [`SharedStore`] is Redis ([`RedisStore`]) with that memory
//! store as the fallback, for several replicas (docs/state.md).
//!
//! Keys come in two classes ([`key_class`], decided here from the key's prefix and nowhere
//! else): guard state, which a flood of random keys may push out (losing a cell forgives a few
//! failures), and markers (used TOTP codes, unlock grants, blocks, known-good networks), which
//! must live out their TTL: a used code evicted early could be replayed. The memory store never
//! evicts a marker to make room; Redis must not evict either (`maxmemory-policy noeviction`,
//! checked by `doctor` and `/readyz`).

mod memory;
mod redis;
mod shared;

use std::time::Duration;

pub use memory::MemoryStore;
pub use redis::{Eviction, RedisStore};
pub use shared::SharedStore;

/// Prefixes of the keys that are guard state: rate cells, counters and sets the guard writes
/// on every failure (`src/guard/keys.rs`). Every other key is a [`KeyClass::Marker`]; a new
/// kind of guard key that may be lost under pressure must be listed here, or it is kept like
/// a marker (the safe side: kept too long, never dropped too early).
pub const GUARD_PREFIXES: &[&str] = &[
    "g:fail:",  // GCRA failure budgets
    "g:spray:", // distinct accounts failed from an address or subnet
    "g:tp:",    // tarpit counters
    "g:seen:",  // wrong secrets already counted
    "g:reset:", // a success already reset this network's budgets in this window
];

/// What a key holds, for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyClass {
    /// Rate cells, counters, sets: evicted first under memory pressure, and not recorded when
    /// there is no room (the guard then fails open for that one key).
    Guard,
    /// Used TOTP codes (`totp:`), unlock grants (`unlock:`), blocks and attack modes
    /// (`g:block:`), known-good networks (`g:good:`), and any key not listed as guard state:
    /// never evicted before its TTL ends.
    Marker,
}

/// The class of `key`, from its prefix (the one place that decides it).
pub fn key_class(key: &str) -> KeyClass {
    if GUARD_PREFIXES.iter().any(|p| key.starts_with(p)) {
        KeyClass::Guard
    } else {
        KeyClass::Marker
    }
}

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

/// The key under which a network the account's owner denied a sign-in from is blocked for
/// that account (`network` as the unlock windows spell it, e.g. `192.0.2.0/24`). Written by
/// the portal's approvals, read by the authenticator, listed and cleared by the guard.
pub fn denied_network_key(user: &str, network: &str) -> String {
    format!("g:block:account_network:{user}/{network}")
}

#[cfg(test)]
mod tests {
    use super::{key_class, KeyClass};

    #[test]
    fn keys_are_classed_by_prefix() {
        // The shapes written by src/guard/keys.rs and src/auth/store.rs.
        for k in [
            "g:fail:ip:192.0.2.7",
            "g:fail:account:alice@example.org",
            "g:spray:subnet:2001:db8::/64",
            "g:tp:ip:192.0.2.7",
            "g:tp:an:192.0.2.0/24:alice@example.org",
            "g:seen:0123abcd:alice@example.org",
            "g:reset:192.0.2.0/24",
            "g:fail:code:alice@example.org",
        ] {
            assert_eq!(key_class(k), KeyClass::Guard, "{k}");
        }
        for k in [
            "totp:alice@example.org:58000000",
            "unlock:alice@example.org:ap1:192.0.2.0/24:abcdef",
            "g:block:ip:192.0.2.7",
            "g:block:account:alice@example.org",
            "g:good:192.0.2.0/24:alice@example.org",
            &super::suspect_key("alice@example.org", "ap_1"),
            "g:something-new:x",
            "anything",
        ] {
            assert_eq!(key_class(k), KeyClass::Marker, "{k}");
        }
    }
}
