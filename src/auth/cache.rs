//! The verified-credential cache: spares argon2 when a client opens several connections at
//! once or reconnects quickly.
//!
//! It remembers, for `verified_cache_ttl`, that (user, app password) verified — keyed by
//! HMAC-SHA256 under a random key made at start and never written anywhere, so the cache holds
//! neither the password nor anything that can be checked offline. It stands in for the argon2
//! step only: TOTP codes, unlocks, revocation and policy are checked on every login, so a cache
//! hit can never let a code be reused. It is flushed whenever the users file is reloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngExt;
use sha2::Sha256;
use tokio::time::Instant;

use crate::secret::Secret;

const MAX_ENTRIES: usize = 100_000;

pub struct VerifiedCache {
    key: Secret,
    ttl: Duration,
    /// tag → (expiry, app password id, user).
    map: Mutex<HashMap<[u8; 32], (Instant, String, String)>>,
    /// One verification at a time per (user, password): parallel logins of one client wait
    /// for the first and then hit the cache instead of each running argon2.
    inflight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one verification for a (user, password) runs; frees its map slot on drop.
pub struct Flight<'a> {
    cache: &'a VerifiedCache,
    tag: [u8; 32],
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Flight<'_> {
    /// Waits for any verification of the same credential that is already running.
    pub async fn wait(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.cache.inflight.lock() {
            // Two references: the map's and ours. Remove the entry when nobody else waits.
            if Arc::strong_count(&self.lock) <= 2 {
                map.remove(&self.tag);
            }
        }
    }
}

impl VerifiedCache {
    pub fn new(ttl: Duration) -> Self {
        let key: [u8; 32] = rand::rng().random();
        Self {
            key: Secret::new(key.to_vec()),
            ttl,
            map: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Joins the single flight for (user, password).
    pub fn flight(&self, user: &str, password: &Secret) -> Option<Flight<'_>> {
        let tag = self.tag(user, password)?;
        let mut map = self.inflight.lock().ok()?;
        let lock = map.entry(tag).or_default().clone();
        Some(Flight {
            cache: self,
            tag,
            lock,
        })
    }

    fn tag(&self, user: &str, password: &Secret) -> Option<[u8; 32]> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose()).ok()?;
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password.expose());
        Some(mac.finalize().into_bytes().into())
    }

    /// The app password id that verified for (user, password), if still fresh.
    pub fn get(&self, user: &str, password: &Secret) -> Option<String> {
        if self.ttl.is_zero() {
            return None;
        }
        let tag = self.tag(user, password)?;
        let mut map = self.map.lock().ok()?;
        match map.get(&tag) {
            Some((expires, id, _)) if *expires > Instant::now() => Some(id.clone()),
            Some(_) => {
                map.remove(&tag);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, user: &str, password: &Secret, id: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let Some(tag) = self.tag(user, password) else {
            return;
        };
        let Ok(mut map) = self.map.lock() else { return };
        let now = Instant::now();
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (e, _, _)| *e > now);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(tag, (now + self.ttl, id.to_owned(), user.to_owned()));
    }

    /// Forgets every entry of `user` (their record changed: a revocation must not wait for
    /// the TTL).
    pub fn drop_user(&self, user: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, (_, _, u)| u != user);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_for_the_ttl_only() {
        let c = VerifiedCache::new(Duration::from_secs(300));
        let pw = Secret::from_slice(b"abcdefghijklmnop");
        assert_eq!(c.get("alice", &pw), None);
        c.insert("alice", &pw, "ap_1");
        assert_eq!(c.get("alice", &pw).as_deref(), Some("ap_1"));
        assert_eq!(c.get("bob", &pw), None);
        assert_eq!(
            c.get("alice", &Secret::from_slice(b"abcdefghijklmnoq")),
            None
        );
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(c.get("alice", &pw), None);
        c.insert("alice", &pw, "ap_1");
        c.clear();
        assert!(c.is_empty());
    }
}
