//! The in-process [`Store`]: one mutex-protected map, bounded in size, with expiry.
//!
//! When the map reaches its bound, expired entries are swept and then guard state
//! ([`KeyClass::Guard`]: rate cells, counters, sets), soonest-expiring first, down to nine
//! tenths of the bound. A marker ([`KeyClass::Marker`]: used TOTP codes, unlock grants, blocks,
//! known-good networks) is never evicted: it leaves when its TTL ends or it is deleted. If
//! markers alone fill the store, a write that would add a key finds no room: a new guard key is
//! not recorded (the guard fails open for it: a rate cell allows, a counter or a set counts
//! one) and a new marker is refused with [`StoreError::Unavailable`] (a TOTP login then fails
//! as `state_unavailable`: a code is never accepted without being remembered). Writes to keys
//! that exist always succeed. docs/state.md says what this means for an operator.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{key_class, KeyClass, Rate, RateDecision, Store, StoreError};

/// Entries kept at most; beyond, expired entries are swept and then guard state goes.
pub(super) const DEFAULT_MAX_ENTRIES: usize = 500_000;

/// After a sweep that could not free a tenth of the store (markers fill it), no new sweep for
/// this long: a full store costs one O(n) pass per second, not one per write.
const SWEEP_BACKOFF: Duration = Duration::from_secs(1);

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

type Map = HashMap<String, Entry>;

struct Inner {
    map: Map,
    /// No sweep before this (set when the last sweep found markers filling the store).
    quiet_until: Option<Instant>,
    /// The "full of markers" warning was logged and the store has not had room since.
    warned: bool,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    /// Members per set at most (a spray of random names cannot grow one set without bound).
    max_set_members: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

/// Whether `key` may be written: it exists, or there is room for one more entry.
fn fits(map: &Map, key: &str, max: usize) -> bool {
    map.len() < max || map.contains_key(key)
}

fn full_of_markers() -> StoreError {
    StoreError::Unavailable("memory store full of markers".into())
}

/// Sets `key` (new, or replaced) to `value` until `expires` and returns `answer`. With no room
/// for it, a guard key is not recorded and the caller gets `answer` all the same, as if the key
/// were new (fail open: a fresh counter, a set of one); a marker is refused.
fn insert<T>(
    map: &mut Map,
    key: &str,
    max: usize,
    value: Value,
    expires: Instant,
    answer: T,
) -> Result<T, StoreError> {
    if !fits(map, key, max) {
        return match key_class(key) {
            KeyClass::Guard => Ok(answer),
            KeyClass::Marker => Err(full_of_markers()),
        };
    }
    map.insert(key.to_owned(), Entry { value, expires });
    Ok(answer)
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                quiet_until: None,
                warned: false,
            }),
            max_entries: max_entries.max(1),
            max_set_members: 10_000,
        }
    }

    /// Runs `f` on the map (made room in first when full); `f` gets the bound to check with
    /// [`fits`] before adding a key.
    fn with<T>(&self, f: impl FnOnce(&mut Map, Instant, usize) -> T) -> Result<T, StoreError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))?;
        let now = Instant::now();
        if inner.map.len() >= self.max_entries {
            self.make_room(&mut inner, now);
        }
        Ok(f(&mut inner.map, now, self.max_entries))
    }

    /// Drops expired entries, then guard state, soonest-expiring first, down to nine tenths of
    /// the bound. Batching keeps a flood of new keys at amortised O(1) per insert (one O(n) pass
    /// per n/10 inserts); when markers leave less than that to free, the next pass waits
    /// [`SWEEP_BACKOFF`]. Markers are never evicted here.
    fn make_room(&self, inner: &mut Inner, now: Instant) {
        if inner.quiet_until.is_some_and(|t| now < t) {
            return;
        }
        let map = &mut inner.map;
        map.retain(|_, e| e.expires > now);
        let target = self.max_entries - self.max_entries / 10;
        if map.len() > target {
            let excess = map.len() - target;
            let mut guard: Vec<Instant> = map
                .iter()
                .filter(|(k, _)| key_class(k) == KeyClass::Guard)
                .map(|(_, e)| e.expires)
                .collect();
            if guard.len() <= excess {
                map.retain(|k, _| key_class(k) == KeyClass::Marker);
            } else {
                let (_, nth, _) = guard.select_nth_unstable(excess - 1);
                let threshold = *nth;
                let mut budget = excess;
                map.retain(|k, e| {
                    if budget > 0 && e.expires <= threshold && key_class(k) == KeyClass::Guard {
                        budget -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
        }
        if map.len() > target {
            inner.quiet_until = Some(now + SWEEP_BACKOFF);
            if !inner.warned {
                inner.warned = true;
                tracing::warn!(
                    entries = map.len(),
                    max_entries = self.max_entries,
                    "state store full of markers (blocks, used codes, unlocks, known-good networks): new guard counters are not recorded and new markers are refused until some expire; raise state.max_entries"
                );
            }
        } else {
            inner.quiet_until = None;
            inner.warned = false;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live<'m>(map: &'m mut Map, key: &str, now: Instant) -> Option<&'m mut Entry> {
    if map.get(key).is_some_and(|e| e.expires <= now) {
        map.remove(key);
    }
    map.get_mut(key)
}

fn text(map: &mut Map, key: &str, now: Instant) -> Option<String> {
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
        self.with(|map, now, max| {
            let tat = match live(map, key, now).map(|e| &e.value) {
                Some(Value::Tat(t)) => (*t).max(now),
                _ => now,
            };
            let allow_at = tat.checked_sub(tolerance).unwrap_or(now);
            if allow_at > now {
                return RateDecision::Limited(allow_at - now);
            }
            if !fits(map, key, max) {
                // No room for a new cell: this event is not counted (fail open).
                return RateDecision::Allowed;
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
        self.with(|map, now, max| {
            if let Some(Entry {
                value: Value::Counter(n),
                ..
            }) = live(map, key, now)
            {
                *n = n.saturating_add(by);
                return Ok(*n);
            }
            insert(map, key, max, Value::Counter(by), now + ttl, by)
        })?
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.with(|map, now, max| {
            if live(map, key, now).is_some() {
                return Ok(false);
            }
            insert(
                map,
                key,
                max,
                Value::Text(value.to_owned()),
                now + ttl,
                true,
            )
        })?
    }

    async fn set_add_count(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let cap = self.max_set_members;
        self.with(|map, now, max| {
            if let Some(Entry {
                value: Value::Set(s),
                expires,
            }) = live(map, key, now)
            {
                if s.len() < cap {
                    s.insert(member.to_owned());
                }
                *expires = now + ttl;
                return Ok(s.len() as u64);
            }
            let set = BTreeSet::from([member.to_owned()]);
            insert(map, key, max, Value::Set(set), now + ttl, 1)
        })?
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.with(|map, now, max| {
            live(map, key, now);
            insert(map, key, max, Value::Text(value.to_owned()), now + ttl, ())
        })?
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|map, now, _| text(map, key, now))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.with(|map, now, _| keys.iter().map(|k| text(map, k, now)).collect())
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Duration)>, StoreError> {
        self.with(|map, now, _| {
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
        self.with(|map, _, _| {
            map.remove(key);
        })
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.with(|map, _, _| {
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
            s.incr(&format!("g:tp:ip:{i}"), 1, Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(s.len() <= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_keeps_markers_over_cells_and_drops_the_soonest_cells_first() {
        let s = MemoryStore::new(1000);
        // A short-lived marker outlives long-lived cells.
        s.put("g:block:ip:192.0.2.7", "spray", Duration::from_secs(5))
            .await
            .unwrap();
        s.incr("g:tp:ip:long", 1, Duration::from_secs(3600))
            .await
            .unwrap();
        for i in 0..10_000 {
            s.incr(&format!("g:tp:ip:{i}"), 1, Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(s.len() <= 1000);
        assert_eq!(
            s.get("g:block:ip:192.0.2.7").await.unwrap().as_deref(),
            Some("spray")
        );
        assert_eq!(s.get("g:tp:ip:long").await.unwrap().as_deref(), Some("1"));
        let listed = s.scan_prefix("g:bl", 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            s.get_many(&["g:tp:ip:9999".into(), "nope".into()])
                .await
                .unwrap(),
            vec![Some("1".into()), None]
        );
    }

    /// Markers alone fill the store: new guard keys are not recorded (the guard fails open for
    /// them), new markers are refused with an error, keys that exist still change, and room
    /// comes back by itself when markers expire.
    #[tokio::test(start_paused = true)]
    async fn full_of_markers_refuses_new_keys_and_drops_none() {
        let s = MemoryStore::new(1000);
        let ttl = Duration::from_secs(60);
        for i in 0..1000 {
            s.put(&format!("g:block:ip:10.0.0.{i}"), "spray", ttl)
                .await
                .unwrap();
        }
        assert!(s
            .set_if_absent("totp:bob@example.org:7", "ap", ttl)
            .await
            .is_err());
        assert!(s.put("unlock:bob@example.org:x", "1", ttl).await.is_err());
        assert!(s.incr("totp:new", 1, ttl).await.is_err());
        let rate = Rate {
            burst: 1,
            period: Duration::from_secs(60),
        };
        for _ in 0..3 {
            assert_eq!(
                s.rate_check("g:fail:ip:192.0.2.1", rate).await.unwrap(),
                RateDecision::Allowed
            );
            assert_eq!(s.incr("g:tp:ip:192.0.2.1", 1, ttl).await.unwrap(), 1);
            assert_eq!(
                s.set_add_count("g:spray:ip:192.0.2.1", "a", ttl)
                    .await
                    .unwrap(),
                1
            );
            assert!(s
                .set_if_absent("g:reset:192.0.2.0/24", "1", ttl)
                .await
                .unwrap());
        }
        assert_eq!(s.len(), 1000);
        assert_eq!(s.scan_prefix("g:block:", 2000).await.unwrap().len(), 1000);
        // An existing marker can still be replaced (a dry-run block made enforced).
        s.put("g:block:ip:10.0.0.1", "enforced", ttl).await.unwrap();
        assert_eq!(
            s.get("g:block:ip:10.0.0.1").await.unwrap().as_deref(),
            Some("enforced")
        );
        // A deleted marker makes room for one more.
        s.delete("g:block:ip:10.0.0.2").await.unwrap();
        assert!(s
            .set_if_absent("totp:bob@example.org:7", "ap", ttl)
            .await
            .unwrap());
        assert!(!s
            .set_if_absent("totp:bob@example.org:7", "ap", ttl)
            .await
            .unwrap());
        // When the markers expire, everything is recorded again.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(s
            .set_if_absent("totp:carol@example.org:8", "ap", ttl)
            .await
            .unwrap());
        assert_eq!(s.incr("g:tp:ip:192.0.2.1", 1, ttl).await.unwrap(), 1);
        assert_eq!(s.incr("g:tp:ip:192.0.2.1", 1, ttl).await.unwrap(), 2);
    }

    /// Item 7 of issue 16: a sprayer's blocks fill most of the store, then a flood of random
    /// failure cells and spray sets fills the rest, again and again. A used TOTP code must stay
    /// refused through it (it has the shortest TTL of all markers, so an eviction that falls
    /// back to "soonest-expiring marker" drops it first), and so must every other marker.
    #[tokio::test(start_paused = true)]
    async fn a_flood_never_evicts_a_used_code_or_any_other_marker() {
        let s = MemoryStore::new(1000);
        let code = "totp:alice@example.org:58000000";
        let code_ttl = Duration::from_secs(120);
        assert!(s.set_if_absent(code, "ap1", code_ttl).await.unwrap());
        let unlock = "unlock:alice@example.org:ap1:192.0.2.0/24:abcdef";
        assert!(s
            .set_if_absent(unlock, "1", Duration::from_secs(12 * 3600))
            .await
            .unwrap());
        s.put(
            "g:good:192.0.2.0/24:alice@example.org",
            "1",
            Duration::from_secs(30 * 86_400),
        )
        .await
        .unwrap();
        // Blocks imposed one after the other (so each ends a little later than the last).
        for i in 0..950u32 {
            let k = format!("g:block:ip:10.0.{}.{}", i / 256, i % 256);
            let ttl = Duration::from_secs(900 + u64::from(i));
            s.put(&k, "spray", ttl).await.unwrap();
        }
        let rate = Rate {
            burst: 10,
            period: Duration::from_secs(900),
        };
        for i in 0..20_000u32 {
            let ip = std::net::Ipv4Addr::from(0xC000_0000u32 | i.wrapping_mul(2_654_435_761));
            s.rate_check(&format!("g:fail:ip:{ip}"), rate)
                .await
                .unwrap();
            s.set_add_count(&format!("g:spray:ip:{ip}"), "h", Duration::from_secs(3600))
                .await
                .unwrap();
            s.incr(&format!("g:tp:ip:{ip}"), 1, Duration::from_secs(900))
                .await
                .unwrap();
        }
        assert!(s.len() <= 1000, "{}", s.len());
        // The replay is refused, and every marker is still there.
        assert!(!s.set_if_absent(code, "ap1", code_ttl).await.unwrap());
        assert_eq!(s.get(unlock).await.unwrap().as_deref(), Some("1"));
        assert_eq!(
            s.get("g:good:192.0.2.0/24:alice@example.org")
                .await
                .unwrap()
                .as_deref(),
            Some("1")
        );
        assert_eq!(s.scan_prefix("g:block:", 2000).await.unwrap().len(), 950);
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
