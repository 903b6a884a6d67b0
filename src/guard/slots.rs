//! Counting semaphores by key: the per-address in-flight cap and the per-account lanes.
//!
//! A place is taken only for an attempt that will be checked, and given back as soon as the
//! check is recorded — before any failure floor or tarpit sleep — so a place is held for the
//! length of one credential check. Every wait for one is bounded by the caller.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;

/// What a decision holds until the attempt is answered.
#[derive(Debug)]
pub struct Held {
    pub(super) _in_flight: Option<Slot<IpNet>>,
    pub(super) _account: Option<Slot<String>>,
}

/// Counting semaphores by key, created on first use and removed with their last holder or
/// waiter (so the map only holds keys with attempts in flight). Users are counted explicitly
/// under the lock (an `Arc` count read under the lock can be stale: its clones are dropped
/// outside it). A key whose size changed (a reload) gets a fresh semaphore; attempts already
/// holding the old one finish on it.
#[derive(Debug)]
pub(super) struct Slots<K: Hash + Eq + Clone> {
    map: Arc<Mutex<HashMap<K, SlotsEntry>>>,
}

#[derive(Debug)]
struct SlotsEntry {
    sem: Arc<tokio::sync::Semaphore>,
    size: usize,
    /// Live `Entry` values for this semaphore (holders and waiters).
    users: usize,
}

impl<K: Hash + Eq + Clone> Default for Slots<K> {
    fn default() -> Self {
        Slots {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Hash + Eq + Clone> Slots<K> {
    fn entry(&self, key: &K, permits: usize) -> Entry<K> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(key.clone()).or_insert_with(|| SlotsEntry {
            sem: Arc::new(tokio::sync::Semaphore::new(permits)),
            size: permits,
            users: 0,
        });
        if e.size != permits {
            *e = SlotsEntry {
                sem: Arc::new(tokio::sync::Semaphore::new(permits)),
                size: permits,
                users: 0,
            };
        }
        e.users += 1;
        Entry {
            sem: e.sem.clone(),
            map: self.map.clone(),
            key: key.clone(),
        }
    }

    /// A place now, or `None` when all `permits` are taken.
    pub(super) fn try_acquire(&self, key: &K, permits: usize) -> Option<Slot<K>> {
        let entry = self.entry(key, permits);
        let permit = entry.sem.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _permit: permit,
            _entry: entry,
        })
    }

    /// Waits for a place (cancel by dropping the future).
    pub(super) async fn acquire(&self, key: &K, permits: usize) -> Option<Slot<K>> {
        let entry = self.entry(key, permits);
        let permit = entry.sem.clone().acquire_owned().await.ok()?;
        Some(Slot {
            _permit: permit,
            _entry: entry,
        })
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One user of a key's semaphore (a holder or a waiter); the last one removes the key.
#[derive(Debug)]
struct Entry<K: Hash + Eq + Clone> {
    sem: Arc<tokio::sync::Semaphore>,
    map: Arc<Mutex<HashMap<K, SlotsEntry>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Entry<K> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let last = match map.get_mut(&self.key) {
            // Only the current semaphore's record counts (a reload may have replaced it).
            Some(e) if Arc::ptr_eq(&e.sem, &self.sem) => {
                e.users = e.users.saturating_sub(1);
                e.users == 0
            }
            _ => false,
        };
        if last {
            map.remove(&self.key);
        }
    }
}

/// One place; the permit is released before the entry is dropped (field order).
#[derive(Debug)]
pub(super) struct Slot<K: Hash + Eq + Clone> {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _entry: Entry<K>,
}
