//! The login history's buffer ([`LoginHistory`]): each user's recent logins, successful and
//! failed, as the portal's "recent activity" and `GET /api/v1/users/{user}/logins` show them.
//!
//! **What goes in.** The login record (`login::LoginRecord`) hands over one [`LoginEvent`] per
//! attempt of a user the gateway knows exists: every success, and a failure only when its
//! reason could only arise for a listed user (a wrong password or code, a disabled account, …;
//! see `LoginRecord::in_history`). An unknown name, a malformed credential, a token the issuer
//! refused or an attempt the guard refused unchecked never reaches this buffer, so someone
//! spraying made-up names grows neither the buffer nor the table. No password, token or code is
//! ever part of an event.
//!
//! **Bounds.** At most [`LOGIN_HISTORY_PER_USER`] events per user are held (older ones are
//! trimmed: the store would delete them anyway). With a database ([`Keep::UntilWritten`]) the
//! buffer holds at most [`MAX_PENDING_LOGINS`] events; one task writes them every
//! [`LOGINS_FLUSH`] in one transaction (`UserStore::record_logins`, which also prunes the table
//! to its bounds), and an event arriving at a full buffer is dropped and counted
//! (`imapgate_store_logins_dropped_total`). A store that cannot be written keeps them (within
//! the bound) for the next try; a crash loses at most one flush interval. With the users file
//! ([`Keep::InMemory`]) the buffer *is* the history: the newest [`LOGIN_HISTORY_PER_USER`] of at
//! most [`MAX_MEMORY_USERS`] users, in memory only, lost at restart; a new user at a full
//! buffer evicts the user whose last login is oldest (their events counted as dropped).
//! Events older than [`LOGIN_HISTORY_KEPT`](crate::store::LOGIN_HISTORY_KEPT) are never shown.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::store::{
    login_history_cutoff, LoginEvent, StoreError, UserStore, LOGIN_HISTORY_PER_USER,
};

/// Events held at most, with a database store, before they are written.
pub const MAX_PENDING_LOGINS: usize = 10_000;

/// Users whose history is held at most with the users file (each up to
/// [`LOGIN_HISTORY_PER_USER`] events).
pub const MAX_MEMORY_USERS: usize = 1_000;

/// How often the buffer is written to a database store.
pub const LOGINS_FLUSH: Duration = super::USAGE_FLUSH;

/// How long the last write at shutdown may take.
const LAST_WRITE_WAIT: Duration = Duration::from_secs(2);

/// Where the history lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A database store: events wait here until [`LoginHistory::run`] writes them.
    UntilWritten,
    /// The users file: the buffer is the history (memory only).
    InMemory,
}

#[derive(Default)]
struct Held {
    /// Per user, oldest first, at most [`LOGIN_HISTORY_PER_USER`].
    users: HashMap<String, VecDeque<LoginEvent>>,
    /// Events in `users`.
    total: usize,
    /// The batch being written (oldest first): still shown until it is in the store.
    in_flight: Arc<Vec<LoginEvent>>,
}

/// The login-history buffer (see the module documentation).
pub struct LoginHistory {
    held: Mutex<Held>,
    dropped: IntCounter,
    keep: Keep,
}

impl std::fmt::Debug for LoginHistory {
    /// Not the events (user names and addresses): only what kind of buffer this is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginHistory")
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl LoginHistory {
    /// An empty buffer; `dropped` counts the events a bound refused.
    pub fn new(dropped: IntCounter, keep: Keep) -> Self {
        Self {
            held: Mutex::new(Held::default()),
            dropped,
            keep,
        }
    }

    /// Notes one login. Never waits for the store.
    pub fn record(&self, event: LoginEvent) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        let Held { users, total, .. } = &mut *held;
        if let Some(q) = users.get_mut(&event.user) {
            if q.len() >= LOGIN_HISTORY_PER_USER {
                // The oldest makes room: the number held does not grow.
                q.pop_front();
            } else if self.keep == Keep::UntilWritten && *total >= MAX_PENDING_LOGINS {
                self.dropped.inc();
                return;
            } else {
                *total += 1;
            }
            if self.keep == Keep::InMemory {
                let cutoff = login_history_cutoff();
                while q.front().is_some_and(|e| e.at < cutoff) {
                    q.pop_front();
                    *total = total.saturating_sub(1);
                }
            }
            q.push_back(event);
            return;
        }
        match self.keep {
            Keep::UntilWritten if *total >= MAX_PENDING_LOGINS => {
                self.dropped.inc();
                return;
            }
            Keep::InMemory if users.len() >= MAX_MEMORY_USERS => {
                // The user whose last login is oldest makes room.
                let idlest = users
                    .iter()
                    .min_by_key(|(_, q)| q.back().map_or(i64::MIN, |e| e.at))
                    .map(|(u, _)| u.clone());
                if let Some(q) = idlest.and_then(|u| users.remove(&u)) {
                    *total = total.saturating_sub(q.len());
                    self.dropped.inc_by(u64::try_from(q.len()).unwrap_or(0));
                }
            }
            _ => {}
        }
        *total += 1;
        users.insert(event.user.clone(), VecDeque::from([event]));
    }

    /// What this buffer holds about `user`, newest first, at most `limit`: with the users file
    /// all there is; with a database what is not written yet (or being written).
    pub fn recent(&self, user: &str, limit: usize) -> Vec<LoginEvent> {
        let Ok(held) = self.held.lock() else {
            return Vec::new();
        };
        let cutoff = login_history_cutoff();
        held.users
            .get(user)
            .into_iter()
            .flat_map(|q| q.iter().rev())
            .chain(held.in_flight.iter().rev().filter(|e| e.user == user))
            .filter(|e| e.at >= cutoff)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Empties the buffer into a batch, oldest first, shown as in flight until
    /// [`Self::written`] or [`Self::put_back`].
    fn take(&self) -> Arc<Vec<LoginEvent>> {
        let Ok(mut held) = self.held.lock() else {
            return Arc::default();
        };
        let users = std::mem::take(&mut held.users);
        held.total = 0;
        let mut batch: Vec<LoginEvent> = users.into_values().flatten().collect();
        // Stable: one user's logins of the same second keep their order.
        batch.sort_by_key(|e| e.at);
        let batch = Arc::new(batch);
        held.in_flight = batch.clone();
        batch
    }

    /// The batch in flight is in the store now.
    fn written(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.in_flight = Arc::default();
        }
    }

    /// Puts a batch that could not be written back, in front of what arrived meanwhile; the
    /// newest win where a bound is reached.
    fn put_back(&self, batch: &[LoginEvent]) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        held.in_flight = Arc::default();
        let Held { users, total, .. } = &mut *held;
        for e in batch.iter().rev() {
            let full = users
                .get(&e.user)
                .is_some_and(|q| q.len() >= LOGIN_HISTORY_PER_USER);
            if full {
                // Older than the newest the history keeps: it would be deleted anyway.
                continue;
            }
            if *total >= MAX_PENDING_LOGINS {
                self.dropped.inc();
                continue;
            }
            users
                .entry(e.user.clone())
                .or_default()
                .push_front(e.clone());
            *total += 1;
        }
    }

    /// Writes the buffer to `store` every [`LOGINS_FLUSH`] until `stop`, then once more.
    pub async fn run(self: Arc<Self>, store: Arc<dyn UserStore>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(LOGINS_FLUSH) => false,
            };
            let batch = self.take();
            if !batch.is_empty() {
                let write = store.record_logins(&batch);
                let result = if stopping {
                    tokio::time::timeout(LAST_WRITE_WAIT, write)
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Unavailable("timed out".into())))
                } else {
                    write.await
                };
                match result {
                    Ok(()) => {
                        self.written();
                        if failing {
                            failing = false;
                            tracing::info!("the login history is written again");
                        }
                    }
                    Err(e) => {
                        if !failing {
                            failing = true;
                            tracing::warn!(error = %e, events = batch.len(), "cannot write the login history; keeping it for the next try");
                        }
                        self.put_back(&batch);
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, at: i64, reason: &str) -> LoginEvent {
        LoginEvent {
            user: user.into(),
            at,
            address: "192.0.2.1".into(),
            listener: "imaps".into(),
            mechanism: "LOGIN".into(),
            result: if reason.is_empty() { "ok" } else { "fail" }.into(),
            reason: reason.into(),
            client: String::new(),
            credential: String::new(),
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn history(keep: Keep) -> LoginHistory {
        LoginHistory::new(IntCounter::new("d", "d").unwrap(), keep)
    }

    #[test]
    fn newest_first_capped_per_user_and_in_flight_still_shown() {
        let h = history(Keep::UntilWritten);
        let t = now();
        for i in 0..60 {
            h.record(event("a@x", t + i, "bad_password"));
        }
        h.record(event("b@x", t, ""));
        let a = h.recent("a@x", 100);
        assert_eq!(a.len(), LOGIN_HISTORY_PER_USER);
        assert_eq!(a[0].at, t + 59, "newest first");
        assert_eq!(a[49].at, t + 10);
        assert_eq!(h.recent("a@x", 3).len(), 3);
        assert_eq!(h.dropped.get(), 0, "the per-user cap is not a drop");
        // Taken for writing: still shown until written; then gone from here.
        let batch = h.take();
        assert_eq!(batch.len(), 51);
        assert!(batch.windows(2).all(|w| w[0].at <= w[1].at), "oldest first");
        assert_eq!(h.recent("b@x", 10).len(), 1);
        h.record(event("b@x", t + 1, "bad_code"));
        let b = h.recent("b@x", 10);
        assert_eq!((b[0].at, b[1].at), (t + 1, t));
        h.written();
        assert_eq!(h.recent("b@x", 10).len(), 1);
        // A failed write goes back in front of what came meanwhile.
        let batch = h.take();
        h.record(event("b@x", t + 2, ""));
        h.put_back(&batch);
        let b = h.recent("b@x", 10);
        assert_eq!(b.iter().map(|e| e.at).collect::<Vec<_>>(), [t + 2, t + 1]);
        // Expired events are never shown.
        h.record(event("c@x", t - 91 * 86400, ""));
        assert!(h.recent("c@x", 10).is_empty());
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let h = history(Keep::UntilWritten);
        let t = now();
        for i in 0..MAX_PENDING_LOGINS {
            h.record(event(&format!("u{i}@x"), t, ""));
        }
        assert_eq!(h.dropped.get(), 0);
        h.record(event("new@x", t, ""));
        h.record(event("u1@x", t, "bad_password"));
        assert_eq!(h.dropped.get(), 2);
        assert!(h.recent("new@x", 10).is_empty());
        // A batch put back into a buffer that filled meanwhile: the overflow is counted.
        let batch = h.take();
        h.record(event("late@x", t + 1, ""));
        h.put_back(&batch);
        assert_eq!(h.dropped.get(), 3);
        assert_eq!(h.recent("late@x", 10).len(), 1, "the newer event stays");
    }

    #[test]
    fn in_memory_keeps_a_bounded_number_of_users() {
        let h = history(Keep::InMemory);
        let t = now();
        for i in 0..MAX_MEMORY_USERS {
            let at = t - 1000 + i64::try_from(i).unwrap();
            h.record(event(&format!("u{i}@x"), at, ""));
            h.record(event(&format!("u{i}@x"), at, "bad_code"));
        }
        // The idlest user (u0) makes room for a new one; nothing else is lost.
        h.record(event("new@x", t, ""));
        assert_eq!(h.dropped.get(), 2);
        assert!(h.recent("u0@x", 10).is_empty());
        assert_eq!(h.recent("u1@x", 10).len(), 2);
        assert_eq!(h.recent("new@x", 10).len(), 1);
        assert_eq!(h.held.lock().unwrap().users.len(), MAX_MEMORY_USERS);
    }
}
