//! The in-process [`Store`]: one mutex-protected map, bounded in size, with expiry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Rate, RateDecision, Store, StoreError};

/// Entries kept at most; beyond, expired entries are swept and then the oldest-expiring go.
pub const DEFAULT_MAX_ENTRIES: usize = 500_000;

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
            self.make_room(&mut map, now);
        }
        Ok(f(&mut map, now))
    }

    /// Drops expired entries; if that is not enough, the tenth of the entries that are
    /// cheapest to lose. Batching keeps a flood of new keys at amortised O(1) per insert (one
    /// O(n) pass per n/10 inserts). Rate cells, counters and sets go first (losing one forgives
    /// a little), soonest-expiring first; markers (`put`/`set_if_absent`: blocks, attack mode,
    /// known-good networks, used TOTP codes, unlocks) go only when nothing else is left, so a
    /// flood of random keys cannot wash them out.
    fn make_room(&self, map: &mut HashMap<String, Entry>, now: Instant) {
        map.retain(|_, e| e.expires > now);
        if map.len() < self.max_entries * 9 / 10 + 1 {
            return;
        }
        let rank = |e: &Entry| (matches!(e.value, Value::Text(_)), e.expires);
        let mut ranks: Vec<(bool, Instant)> = map.values().map(rank).collect();
        let cut = (self.max_entries / 10)
            .max(1)
            .min(ranks.len().saturating_sub(1));
        let (_, nth, _) = ranks.select_nth_unstable(cut);
        let threshold = *nth;
        let mut budget = cut + 1;
        map.retain(|_, e| {
            if budget > 0 && rank(e) <= threshold {
                budget -= 1;
                false
            } else {
                true
            }
        });
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

fn text(map: &mut HashMap<String, Entry>, key: &str, now: Instant) -> Option<String> {
    match live(map, key, now).map(|e| &e.value) {
        Some(Value::Text(t)) => Some(t.clone()),
        Some(Value::Counter(n)) => Some(n.to_string()),
        _ => None,
    }
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

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.with(|map, now| {
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Text(value.to_owned()),
                    expires: now + ttl,
                },
            );
        })
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|map, now| text(map, key, now))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.with(|map, now| keys.iter().map(|k| text(map, k, now)).collect())
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Duration)>, StoreError> {
        self.with(|map, now| {
            let mut out: Vec<(String, String, Duration)> = map
                .iter()
                .filter(|(k, e)| k.starts_with(prefix) && e.expires > now)
                .filter_map(|(k, e)| {
                    let v = match &e.value {
                        Value::Text(t) => t.clone(),
                        Value::Counter(n) => n.to_string(),
                        _ => return None,
                    };
                    Some((k.clone(), v, e.expires - now))
                })
                .collect();
            out.sort();
            out.truncate(limit);
            out
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with(|map, _| {
            map.remove(key);
        })
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.with(|map, _| {
            for k in keys {
                map.remove(k);
            }
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

    #[tokio::test(start_paused = true)]
    async fn eviction_keeps_long_lived_markers_over_short_cells() {
        let s = MemoryStore::new(1000);
        s.put("block", "spray", Duration::from_secs(900))
            .await
            .unwrap();
        for i in 0..10_000 {
            s.incr(&format!("k{i}"), 1, Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(s.len() <= 1000);
        assert_eq!(s.get("block").await.unwrap().as_deref(), Some("spray"));
        let listed = s.scan_prefix("bl", 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            s.get_many(&["k9999".into(), "nope".into()]).await.unwrap(),
            vec![Some("1".into()), None]
        );
    }

    /// Measures resident memory per entry for docs/guard.md:
    /// `cargo test --lib memory_per_entry -- --ignored --nocapture` (alone, so that no other
    /// test shares the process).
    #[tokio::test]
    #[ignore = "a measurement, not a check: it prints the figure docs/guard.md quotes, and needs the process to itself"]
    async fn memory_per_entry() {
        fn rss() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0)
                * 4096
        }
        let n = 1_000_000usize;
        let s = MemoryStore::new(n);
        let before = rss();
        let ttl = Duration::from_secs(900);
        for i in 0..n as u32 {
            // Guard-shaped keys: an address or an account plus a prefix.
            let ip = std::net::Ipv4Addr::from(0xC000_0000u32 | i.wrapping_mul(2_654_435_761));
            match i % 4 {
                0 => drop(s.incr(&format!("g:tp:ip:{ip}"), 1, ttl).await),
                1 => drop(
                    s.rate_check(
                        &format!("g:fail:ip:{ip}"),
                        Rate {
                            burst: 10,
                            period: ttl,
                        },
                    )
                    .await,
                ),
                2 => drop(
                    s.set_add_count(&format!("g:spray:ip:{ip}"), "0123456789abcdef", ttl)
                        .await,
                ),
                _ => drop(
                    s.incr(
                        &format!("g:seen:0123456789abcdef0123456789abcdef:user{i}@example.org"),
                        1,
                        ttl,
                    )
                    .await,
                ),
            }
        }
        let after = rss();
        println!(
            "{} entries: {} MiB resident, {} bytes per entry",
            s.len(),
            (after - before) / (1024 * 1024),
            (after - before) / s.len() as u64
        );
    }
}
