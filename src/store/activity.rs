//! What the gateway writes about its own activity, in the background: last-used records and
//! the session directory. A login never waits for either; each has one task that writes in
//! batches and a bound on what it holds in memory.
//!
//! **Last-used records** ([`LastUsed`]): each successful login puts (user, credential, time,
//! client address, client `ID` name) into a buffer of at most [`MAX_PENDING`] entries, one per
//! (user, credential), the newest winning. Every [`USAGE_FLUSH`] one task writes the buffer to
//! the store in one transaction (`app_password_usage`, `user_logins`; a newer record in the
//! store is never overwritten by an older one). A new key arriving at a full buffer is dropped
//! and counted (`imapgate_store_usage_dropped_total`). A crash loses at most the records of the
//! last flush interval; a store that cannot be written keeps them (bounded) for the next try.
//! The file backend has nowhere to write them: its gateway keeps them in this buffer, in
//! memory only, lost at restart.
//!
//! **Session directory** ([`mirror_sessions`]): with a database store each replica mirrors its
//! relayed sessions into `sessions`, at most [`SESSIONS_FLUSH`] after a session starts or ends,
//! and renews all its rows every [`SESSIONS_HEARTBEAT`]. Rows not renewed for
//! [`SESSIONS_STALE`] (3 heartbeats: their replica died or lost the database) are left out of
//! every listing and deleted by the next replica that writes. A replica clears its own rows
//! when it starts (a restarted pod keeps its name) and when it stops.
//!
//! **Login history** ([`LoginHistory`], in [`logins`]): each known user's recent logins,
//! successful and failed, buffered the same way (bounded, batched, written every
//! [`logins::LOGINS_FLUSH`] into `login_events`; with the users file kept in memory only).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use super::{SessionInfo, Usage, UsageRecord, UsageScope, UserStore};
use crate::login::UserSessions;

pub mod logins;
pub use logins::{Keep, LoginHistory};

/// Last-used records held at most before they are written: (user, credential) pairs.
pub const MAX_PENDING: usize = 10_000;

/// How often the last-used buffer is written to the store.
pub const USAGE_FLUSH: Duration = Duration::from_secs(2);

/// How soon a session started or ended reaches the session directory.
pub const SESSIONS_FLUSH: Duration = Duration::from_secs(1);

/// How often a replica renews its rows in the session directory.
pub const SESSIONS_HEARTBEAT: Duration = Duration::from_secs(10);

/// Rows not renewed for this long belong to a replica that is gone (3 heartbeats).
pub const SESSIONS_STALE: Duration = Duration::from_secs(3 * 10);

/// How long a replica that stops waits to clear its rows.
const CLEAR_WAIT: Duration = Duration::from_secs(2);

/// The time, address and client of a credential's newest login, waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    at: i64,
    address: String,
    client: String,
}

/// The last-used buffer (see the module documentation).
pub struct LastUsed {
    pending: Mutex<HashMap<(String, String), Seen>>,
    dropped: IntCounter,
}

impl LastUsed {
    /// An empty buffer; `dropped` counts the records a full buffer refused.
    pub fn new(dropped: IntCounter) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            dropped,
        }
    }

    /// Notes a successful login now. Never waits for the store.
    pub fn record(&self, user: &str, credential: &str, client: IpAddr, client_name: &str) {
        let seen = Seen {
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
            address: client.to_string(),
            client: client_name.to_owned(),
        };
        self.merge(std::iter::once((
            (user.to_owned(), credential.to_owned()),
            seen,
        )));
    }

    /// Adds records, the newest winning per key; a new key at a full buffer is dropped.
    fn merge(&self, records: impl IntoIterator<Item = ((String, String), Seen)>) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        for (key, seen) in records {
            let full = pending.len() >= MAX_PENDING;
            match pending.get_mut(&key) {
                Some(old) if old.at <= seen.at => *old = seen,
                Some(_) => {}
                None if full => self.dropped.inc(),
                None => {
                    pending.insert(key, seen);
                }
            }
        }
    }

    /// Empties the buffer into a batch.
    fn take(&self) -> Vec<UsageRecord> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        std::mem::take(&mut *pending)
            .into_iter()
            .map(|((user, credential), s)| UsageRecord {
                user,
                credential,
                at: s.at,
                address: s.address,
                client: s.client,
            })
            .collect()
    }

    /// Puts a batch that could not be written back (newer records that arrived meanwhile win).
    fn put_back(&self, batch: Vec<UsageRecord>) {
        self.merge(batch.into_iter().map(|r| {
            (
                (r.user, r.credential),
                Seen {
                    at: r.at,
                    address: r.address,
                    client: r.client,
                },
            )
        }));
    }

    /// What the buffer holds about `user`: with the file backend, all there is (kept in memory
    /// only); with a database, what was not written yet.
    pub fn usage(&self, user: &str) -> Vec<Usage> {
        let Ok(pending) = self.pending.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Usage> = Vec::new();
        let mut newest: Option<Usage> = None;
        for ((u, credential), s) in pending.iter().filter(|((u, _), _)| u == user) {
            let usage = Usage {
                scope: UsageScope::AppPassword,
                user: u.clone(),
                credential: credential.clone(),
                last_used: s.at,
                address: s.address.clone(),
                client: s.client.clone(),
            };
            if newest.as_ref().is_none_or(|n| n.last_used < s.at) {
                newest = Some(Usage {
                    scope: UsageScope::User,
                    ..usage.clone()
                });
            }
            if !credential.starts_with("oauth:") {
                out.push(usage);
            }
        }
        out.sort_by(|a, b| a.credential.cmp(&b.credential));
        out.extend(newest);
        out
    }

    /// Writes the buffer to `store` every [`USAGE_FLUSH`] until `stop`, then once more.
    pub async fn run(self: Arc<Self>, store: Arc<dyn UserStore>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(USAGE_FLUSH) => false,
            };
            let batch = self.take();
            if !batch.is_empty() {
                let write = store.record_usage(&batch);
                let written = if stopping {
                    tokio::time::timeout(CLEAR_WAIT, write)
                        .await
                        .unwrap_or_else(|_| Err(super::StoreError::Unavailable("timed out".into())))
                } else {
                    write.await
                };
                match written {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("last-used records are written again");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if !failing {
                            failing = true;
                            tracing::warn!(error = %e, records = batch.len(), "cannot write last-used records; keeping them for the next try");
                        }
                        self.put_back(batch);
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Mirrors `sessions` into the store's session directory until `stop`, then clears this
/// replica's rows (see the module documentation).
pub async fn mirror_sessions(
    sessions: UserSessions,
    store: Arc<dyn UserStore>,
    stop: CancellationToken,
) {
    let replica = sessions.replica().to_owned();
    let mut cleared = false;
    let mut written: HashMap<String, SessionInfo> = HashMap::new();
    let mut version = None;
    let mut renewed = tokio::time::Instant::now();
    let mut resync = false;
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(if cleared { SESSIONS_FLUSH } else { Duration::ZERO }) => {}
        }
        if !cleared {
            match store.clear_sessions(&replica).await {
                Ok(()) => cleared = true,
                Err(e) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %e, "cannot write the session directory");
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(SESSIONS_FLUSH) => {}
                    }
                    continue;
                }
            }
        }
        let now_version = sessions.version();
        if version == Some(now_version) && !resync && renewed.elapsed() < SESSIONS_HEARTBEAT {
            continue;
        }
        let current: HashMap<String, SessionInfo> = sessions
            .list(None)
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let upsert: Vec<SessionInfo> = current
            .values()
            .filter(|s| resync || !written.contains_key(&s.id))
            .cloned()
            .collect();
        let remove: Vec<String> = written
            .keys()
            .filter(|id| !current.contains_key(*id))
            .cloned()
            .collect();
        match store.write_sessions(&replica, &upsert, &remove).await {
            Ok(rows) => {
                if failing {
                    failing = false;
                    tracing::info!("the session directory can be written again");
                }
                // Rows another replica deleted as stale (this one was cut off too long) are
                // written again at the next tick.
                resync = usize::try_from(rows).ok() != Some(current.len());
                written = current;
                version = Some(now_version);
                renewed = tokio::time::Instant::now();
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "cannot write the session directory");
                }
                resync = true;
            }
        }
    }
    if cleared || !written.is_empty() {
        let _ = tokio::time::timeout(CLEAR_WAIT, store.clear_sessions(&replica)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer() -> LastUsed {
        LastUsed::new(IntCounter::new("d", "d").unwrap())
    }

    #[test]
    fn newest_wins_and_a_full_buffer_drops_new_keys() {
        let b = buffer();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        b.record("a@x", "ap_1", ip, "Mail");
        b.record("a@x", "oauth:corp", "192.0.2.2".parse().unwrap(), "");
        let u = b.usage("a@x");
        assert_eq!(u.len(), 2, "{u:?}");
        assert_eq!(u[0].scope, UsageScope::AppPassword);
        assert_eq!(
            (u[0].credential.as_str(), u[0].client.as_str()),
            ("ap_1", "Mail")
        );
        assert_eq!(u[1].scope, UsageScope::User);
        assert!(b.usage("b@x").is_empty());
        // An older record put back does not replace a newer one.
        let mut batch = b.take();
        assert_eq!(batch.len(), 2);
        b.record("a@x", "ap_1", "198.51.100.9".parse().unwrap(), "New");
        for r in &mut batch {
            r.at -= 100;
        }
        b.put_back(batch);
        let u = b.usage("a@x");
        let ap = u.iter().find(|x| x.credential == "ap_1").unwrap();
        assert_eq!(ap.address, "198.51.100.9");
        // Full: new keys are dropped and counted, known keys still move.
        b.merge((0..MAX_PENDING).map(|i| {
            (
                (format!("u{i}"), "ap".to_owned()),
                Seen {
                    at: 1,
                    address: String::new(),
                    client: String::new(),
                },
            )
        }));
        assert_eq!(b.pending.lock().unwrap().len(), MAX_PENDING);
        assert!(b.dropped.get() > 0);
        let before = b.dropped.get();
        b.record("a@x", "ap_1", ip, "Again");
        assert_eq!(b.dropped.get(), before);
        b.record("new@x", "ap_1", ip, "");
        assert_eq!(b.dropped.get(), before + 1);
        assert_eq!(b.pending.lock().unwrap().len(), MAX_PENDING);
    }
}
