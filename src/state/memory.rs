//! The in-process [`Store`]: one mutex-protected map, bounded in size, with expiry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Rate, RateDecision, Store, StoreError};

/// Entries kept at most; beyond, expired entries are swept and then the oldest-expiring go.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

enum Value {
    /// GCRA theoretical arrival time.
    Tat(Instant),
    Counter(u64),
    Text(String),
    Set(BTreeSet<String>),
}

struct Entry {
    value: Value,
    expires: Instant,
}

pub struct MemoryStore {
    map: Mutex<HashMap<String, Entry>>,
    max_entries: usize,
    /// Members per set at most (a spray of random names cannot grow one set without bound).
    max_set_members: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            max_set_members: 10_000,
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T,
    ) -> Result<T, StoreError> {
        let mut map = self
            .map
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))?;
        let now = Instant::now();
        if map.len() >= self.max_entries {
            map.retain(|_, e| e.expires > now);
            while map.len() >= self.max_entries {
                let Some(victim) = map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&victim);
            }
        }
        Ok(f(&mut map, now))
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live<'m>(map: &'m mut HashMap<String, Entry>, key: &str, now: Instant) -> Option<&'m mut Entry> {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.get_mut(key)
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn rate_check(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        let interval = rate.period / rate.burst.max(1);
        let tolerance = rate.period.saturating_sub(interval);
        self.with(|map, now| {
            let tat = match live(map, key, now).map(|e| &e.value) {
                Some(Value::Tat(t)) => (*t).max(now),
                _ => now,
            };
            let allow_at = tat.checked_sub(tolerance).unwrap_or(now);
            if allow_at > now {
                return RateDecision::Limited(allow_at - now);
            }
            let new_tat = tat + interval;
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Tat(new_tat),
                    expires: new_tat,
                },
            );
            RateDecision::Allowed
        })
    }

    async fn incr(&self, key: &str, by: u64, ttl: Duration) -> Result<u64, StoreError> {
        self.with(|map, now| {
            if let Some(Entry {
                value: Value::Counter(n),
                ..
            }) = live(map, key, now)
            {
                *n = n.saturating_add(by);
                return *n;
            }
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Counter(by),
                    expires: now + ttl,
                },
            );
            by
        })
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.with(|map, now| {
            if live(map, key, now).is_some() {
                return false;
            }
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Text(value.to_owned()),
                    expires: now + ttl,
                },
            );
            true
        })
    }

    async fn set_add_count(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let cap = self.max_set_members;
        self.with(|map, now| {
            if let Some(Entry {
                value: Value::Set(s),
                expires,
            }) = live(map, key, now)
            {
                if s.len() < cap {
                    s.insert(member.to_owned());
                }
                *expires = now + ttl;
                return s.len() as u64;
            }
            let set = BTreeSet::from([member.to_owned()]);
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Set(set),
                    expires: now + ttl,
                },
            );
            1
        })
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|map, now| match live(map, key, now).map(|e| &e.value) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with(|map, _| {
            map.remove(key);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gcra_allows_burst_then_limits_then_refills() {
        let s = MemoryStore::default();
        let rate = Rate {
            burst: 3,
            period: Duration::from_secs(30),
        };
        for _ in 0..3 {
            assert_eq!(
                s.rate_check("k", rate).await.unwrap(),
                RateDecision::Allowed
            );
        }
        let RateDecision::Limited(wait) = s.rate_check("k", rate).await.unwrap() else {
            panic!()
        };
        assert!(wait <= Duration::from_secs(10) && wait > Duration::ZERO);
        tokio::time::advance(wait).await;
        assert_eq!(
            s.rate_check("k", rate).await.unwrap(),
            RateDecision::Allowed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_counters_sets_and_markers() {
        let s = MemoryStore::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(s.incr("c", 1, ttl).await.unwrap(), 1);
        assert_eq!(s.incr("c", 2, ttl).await.unwrap(), 3);
        assert!(s.set_if_absent("m", "v", ttl).await.unwrap());
        assert!(!s.set_if_absent("m", "w", ttl).await.unwrap());
        assert_eq!(s.get("m").await.unwrap().as_deref(), Some("v"));
        assert_eq!(s.set_add_count("s", "a", ttl).await.unwrap(), 1);
        assert_eq!(s.set_add_count("s", "a", ttl).await.unwrap(), 1);
        assert_eq!(s.set_add_count("s", "b", ttl).await.unwrap(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(s.incr("c", 1, ttl).await.unwrap(), 1);
        assert_eq!(s.get("m").await.unwrap(), None);
        assert_eq!(s.set_add_count("s", "c", ttl).await.unwrap(), 1);
        s.delete("s").await.unwrap();
        assert_eq!(s.set_add_count("s", "d", ttl).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn size_is_bounded() {
        let s = MemoryStore::new(100);
        for i in 0..1000 {
            s.incr(&format!("k{i}"), 1, Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(s.len() <= 100);
    }
}
