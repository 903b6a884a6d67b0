//! Relayed sessions: the per-user cap (`max_sessions_per_user`), what is known about each
//! session (for `imapgate sessions list` and the admin API), and the handle that ends a session
//! when its credential is revoked (`auth.revoke_closes_sessions`) or an operator ends it.
//!
//! Every session has an id unique across replicas, `<replica>-<n>`: the replica's name
//! (`IMAPGATE_REPLICA`, e.g. the pod name, or a random one made at start) and the connection's
//! number in this process (the audit line's `session`). A database store mirrors this registry
//! into its `sessions` table (see `store::activity`), so every replica and the CLI can list and
//! end the sessions of all of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use super::ClientId;

/// One relayed session, as `sessions list` and the admin API show it. Every field is a value
/// the gateway chose or already sanitised (the client's `ID` words are cut to printable ASCII);
/// nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    /// `<replica>-<n>`, unique across replicas.
    pub id: String,
    /// The replica that relays it.
    pub replica: String,
    pub user: String,
    /// The app password id, or `oauth:{issuer name}`.
    pub credential: String,
    /// The client's address (the PROXY header's, where trusted).
    pub client_address: String,
    /// The client's IMAP `ID` name and version, when it sent them.
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    /// The listener's name.
    pub listener: String,
    /// When it logged in (Unix seconds).
    pub since: i64,
}

/// Why a session was ended from outside (the audit line's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its credential was revoked, expired or removed, or its user disabled or deleted.
    Revoked,
    /// An operator ended it (`imapgate sessions kill`, the admin API).
    Operator,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Revoked => "revoked",
            EndReason::Operator => "operator",
        }
    }

    /// The last line the client gets: IMAP's `* BYE` (RFC 3501 §7.1.5), SMTP's `421` (RFC 5321
    /// §3.8: a server may close with 421 at any time) or POP3's `-ERR`.
    pub fn bye(self, protocol: crate::config::Protocol) -> &'static [u8] {
        use crate::config::Protocol;
        match (protocol, self) {
            (Protocol::Imap, EndReason::Revoked) => b"* BYE Session ended: access revoked\r\n",
            (Protocol::Imap, EndReason::Operator) => b"* BYE Session ended by an administrator\r\n",
            (Protocol::Smtp, EndReason::Revoked) => b"421 4.7.0 Session ended: access revoked\r\n",
            (Protocol::Smtp, EndReason::Operator) => {
                b"421 4.7.0 Session ended by an administrator\r\n"
            }
            (Protocol::Pop3, EndReason::Revoked) => {
                b"-ERR [AUTH] Session ended: access revoked\r\n"
            }
            (Protocol::Pop3, EndReason::Operator) => {
                b"-ERR [SYS/TEMP] Session ended by an administrator\r\n"
            }
        }
    }
}

/// What a new session tells the registry about itself.
#[derive(Debug, Clone, Copy)]
pub struct NewSession<'a> {
    pub user: &'a str,
    pub credential: &'a str,
    /// The connection's number in this process.
    pub session: u64,
    pub client: IpAddr,
    pub client_id: &'a ClientId,
    pub listener: &'a str,
    /// The TOTP enrolment the login's second factor was met with (`auth::enrolment_tag`).
    pub enrolment: Option<&'a str>,
}

type Map = Arc<Mutex<HashMap<String, Vec<SessionEntry>>>>;

/// Relayed sessions per user, capped by `max_sessions_per_user`; each with a token that
/// closes it when its credential is revoked or an operator ends it.
#[derive(Clone)]
pub struct UserSessions {
    replica: Arc<str>,
    map: Map,
    /// Bumped at every session added or removed (the mirror writes when it moved).
    version: Arc<AtomicU64>,
}

impl Default for UserSessions {
    /// A registry under a random replica name.
    fn default() -> Self {
        Self::new(&random_replica())
    }
}

struct SessionEntry {
    session: u64,
    info: SessionInfo,
    /// See [`NewSession::enrolment`].
    enrolment: Option<String>,
    revoked: CancellationToken,
    reason: Arc<OnceLock<EndReason>>,
}

impl SessionEntry {
    /// Ends the session (once); whether this call ended it.
    fn end(&self, why: EndReason) -> bool {
        if self.revoked.is_cancelled() {
            return false;
        }
        let _ = self.reason.set(why);
        self.revoked.cancel();
        true
    }
}

/// A held slot; dropping it frees the slot.
pub struct UserSlot {
    map: Map,
    version: Arc<AtomicU64>,
    user: String,
    session: u64,
    id: String,
    credential: String,
    pub revoked: CancellationToken,
    reason: Arc<OnceLock<EndReason>>,
}

impl UserSlot {
    /// The session's id (`<replica>-<n>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The credential it logged in with (an app password id or `oauth:{issuer name}`).
    pub fn credential(&self) -> &str {
        &self.credential
    }

    /// Why the session was ended from outside (`None`: it was not).
    pub fn end_reason(&self) -> Option<EndReason> {
        self.reason.get().copied()
    }
}

/// The longest replica name kept (a pod name is at most 63 characters).
const MAX_REPLICA: usize = 63;

/// A replica name from the environment (`IMAPGATE_REPLICA`), if it is usable: 1 to 63 of
/// `A-Z a-z 0-9 . _ -`.
pub fn replica_from(value: Option<&str>) -> Option<String> {
    let v = value?.trim();
    let ok = !v.is_empty()
        && v.len() <= MAX_REPLICA
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| v.to_owned())
}

/// Eight random characters: a replica name made at start.
pub fn random_replica() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| {
            char::from(
                *ALPHABET
                    .get(rng.random_range(0..ALPHABET.len()))
                    .unwrap_or(&b'x'),
            )
        })
        .collect()
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl UserSessions {
    /// An empty registry of the replica named `replica`.
    pub fn new(replica: &str) -> Self {
        Self {
            replica: Arc::from(replica),
            map: Arc::default(),
            version: Arc::default(),
        }
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The session id of connection `n` on this replica.
    pub fn session_id(&self, n: u64) -> String {
        format!("{}-{n}", self.replica)
    }

    /// Counts every session added or removed; the mirror compares it to know when to write.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// A slot for a new session, unless its user already has `max`.
    pub fn try_acquire(&self, s: NewSession<'_>, max: u32) -> Option<UserSlot> {
        let mut map = self.map.lock().ok()?;
        let list = map.entry(s.user.to_owned()).or_default();
        if list.len() >= max as usize {
            if list.is_empty() {
                map.remove(s.user);
            }
            return None;
        }
        let id = self.session_id(s.session);
        let revoked = CancellationToken::new();
        let reason = Arc::new(OnceLock::new());
        list.push(SessionEntry {
            session: s.session,
            enrolment: s.enrolment.map(str::to_owned),
            info: SessionInfo {
                id: id.clone(),
                replica: self.replica.to_string(),
                user: s.user.to_owned(),
                credential: s.credential.to_owned(),
                client_address: s.client.to_string(),
                client_name: s.client_id.name.clone(),
                client_version: s.client_id.version.clone(),
                listener: s.listener.to_owned(),
                since: unix_now(),
            },
            revoked: revoked.clone(),
            reason: reason.clone(),
        });
        self.version.fetch_add(1, Ordering::Relaxed);
        Some(UserSlot {
            map: self.map.clone(),
            version: self.version.clone(),
            user: s.user.to_owned(),
            session: s.session,
            id,
            credential: s.credential.to_owned(),
            revoked,
            reason,
        })
    }

    /// The sessions of `user` (`None`: of everyone) on this replica, by user, then age.
    pub fn list(&self, user: Option<&str>) -> Vec<SessionInfo> {
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        let mut out: Vec<SessionInfo> = match user {
            Some(u) => map
                .get(u)
                .into_iter()
                .flatten()
                .map(|s| s.info.clone())
                .collect(),
            None => map.values().flatten().map(|s| s.info.clone()).collect(),
        };
        drop(map);
        out.sort_by(|a, b| (&a.user, a.since, &a.id).cmp(&(&b.user, b.since, &b.id)));
        out
    }

    /// Closes the sessions whose user is gone or disabled, or whose app password is no longer
    /// active in `file`. Returns how many were closed.
    pub fn close_revoked(&self, file: &crate::auth::users::UsersFile) -> usize {
        let Ok(map) = self.map.lock() else { return 0 };
        let mut closed = 0;
        for (user, list) in map.iter() {
            closed += close_unless_allowed(list, file.users.get(user));
        }
        if closed > 0 {
            tracing::info!(sessions = closed, "closed sessions of revoked credentials");
        }
        closed
    }

    /// [`Self::close_revoked`] for one user whose record is now `record` (`None`: deleted).
    pub fn close_revoked_user(
        &self,
        user: &str,
        record: Option<&crate::auth::users::User>,
    ) -> usize {
        let Ok(map) = self.map.lock() else { return 0 };
        let closed = map
            .get(user)
            .map_or(0, |list| close_unless_allowed(list, record));
        if closed > 0 {
            tracing::info!(user = %user, sessions = closed, "closed sessions of revoked credentials");
        }
        closed
    }

    /// Ends sessions of `user`: all of them (`which` empty), those of one credential (an app
    /// password id or `oauth:ISSUER`), or one session (`session:ID`, the id `sessions list`
    /// shows). Returns how many were ended here (a session of another replica: none).
    pub fn close_matching(&self, user: &str, which: &str) -> usize {
        let Ok(map) = self.map.lock() else { return 0 };
        let session = which.strip_prefix("session:");
        let mut closed = 0;
        for s in map.get(user).into_iter().flatten() {
            let hit = match session {
                Some(id) => s.info.id == id,
                None => which.is_empty() || s.info.credential == which,
            };
            if hit && s.end(EndReason::Operator) {
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(user = %user, sessions = closed, "sessions ended by an operator");
        }
        closed
    }
}

/// Cancels the sessions in `list` that `record` no longer allows; how many.
fn close_unless_allowed(list: &[SessionEntry], record: Option<&crate::auth::users::User>) -> usize {
    let now = time::OffsetDateTime::now_utc();
    let enabled = record.filter(|u| !u.disabled);
    let mut closed = 0;
    for s in list {
        let credential = &s.info.credential;
        // Token sessions have no app password (and their user need not be listed): only
        // disabling the user ends them.
        let active = if credential.starts_with("oauth:") {
            !record.is_some_and(|u| u.disabled)
        } else {
            enabled.is_some_and(|u| {
                u.app_passwords
                    .iter()
                    .any(|a| &a.id == credential && a.is_active(now))
            })
        };
        // A session whose second factor was a TOTP enrolment since reset or replaced.
        let enrolment_gone = s.enrolment.as_deref().is_some_and(|tag| {
            record.is_none_or(|u| {
                crate::auth::enrolment_tag(u.totp.as_deref()) != tag || u.totp.is_none()
            })
        });
        if (!active || enrolment_gone) && s.end(EndReason::Revoked) {
            closed += 1;
        }
    }
    closed
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(list) = map.get_mut(&self.user) {
                list.retain(|s| s.session != self.session);
                if list.is_empty() {
                    map.remove(&self.user);
                }
            }
        }
        self.version.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::{AppPassword, User, UsersFile};

    fn acquire(
        s: &UserSessions,
        user: &str,
        credential: &str,
        n: u64,
        max: u32,
    ) -> Option<UserSlot> {
        s.try_acquire(
            NewSession {
                user,
                credential,
                session: n,
                enrolment: None,
                client: "192.0.2.7".parse().unwrap(),
                client_id: &ClientId {
                    name: Some("Thunderbird".into()),
                    version: None,
                },
                listener: "imaps",
            },
            max,
        )
    }

    #[test]
    fn revocation_closes_only_what_was_revoked() {
        let ap = |id: &str, revoked: bool| AppPassword {
            id: id.into(),
            label: String::new(),
            hash: String::new(),
            lookup: None,
            created: time::OffsetDateTime::UNIX_EPOCH,
            expires: None,
            revoked,
        };
        let mut file = UsersFile {
            version: 1,
            users: Default::default(),
        };
        file.users.insert(
            "a@x".into(),
            User {
                app_passwords: vec![ap("ap_1", true), ap("ap_2", false)],
                ..Default::default()
            },
        );
        let sessions = UserSessions::default();
        let revoked = acquire(&sessions, "a@x", "ap_1", 1, 10).unwrap();
        let kept = acquire(&sessions, "a@x", "ap_2", 2, 10).unwrap();
        // A token user who is not in the users file keeps their session.
        let token = acquire(&sessions, "t@x", "oauth:corp", 3, 10).unwrap();
        assert_eq!(sessions.close_revoked(&file), 1);
        assert!(revoked.revoked.is_cancelled());
        assert_eq!(revoked.end_reason(), Some(EndReason::Revoked));
        assert!(!kept.revoked.is_cancelled() && !token.revoked.is_cancelled());
        // Disabling the token user ends it.
        file.users.insert(
            "t@x".into(),
            User {
                disabled: true,
                ..Default::default()
            },
        );
        assert_eq!(sessions.close_revoked(&file), 1);
        assert!(token.revoked.is_cancelled());
        // The cap counts live sessions and frees on drop.
        drop(revoked);
        assert!(acquire(&sessions, "a@x", "ap_2", 4, 2).is_some());
    }

    #[test]
    fn sessions_are_listed_and_ended_by_their_ids() {
        let sessions = UserSessions::new("pod-a");
        let v0 = sessions.version();
        let one = acquire(&sessions, "a@x", "ap_1", 7, 10).unwrap();
        let two = acquire(&sessions, "a@x", "ap_2", 8, 10).unwrap();
        let other = acquire(&sessions, "b@x", "ap_9", 9, 10).unwrap();
        assert!(sessions.version() > v0);
        assert_eq!(one.id(), "pod-a-7");
        let listed = sessions.list(Some("a@x"));
        assert_eq!(listed.len(), 2);
        let first = listed.iter().find(|s| s.id == "pod-a-7").unwrap();
        assert_eq!(first.replica, "pod-a");
        assert_eq!(first.credential, "ap_1");
        assert_eq!(first.client_address, "192.0.2.7");
        assert_eq!(first.client_name.as_deref(), Some("Thunderbird"));
        assert_eq!(first.listener, "imaps");
        assert_eq!(sessions.list(None).len(), 3);
        // One session by its id; the number alone or another replica's id ends nothing.
        assert_eq!(sessions.close_matching("a@x", "session:7"), 0);
        assert_eq!(sessions.close_matching("a@x", "session:pod-b-8"), 0);
        assert_eq!(sessions.close_matching("a@x", "session:pod-a-8"), 1);
        assert!(two.revoked.is_cancelled() && !one.revoked.is_cancelled());
        assert_eq!(two.end_reason(), Some(EndReason::Operator));
        // Once ended, not counted again; one credential's; then all of a user's.
        assert_eq!(sessions.close_matching("a@x", "session:pod-a-8"), 0);
        assert_eq!(sessions.close_matching("a@x", "ap_9"), 0);
        assert_eq!(sessions.close_matching("b@x", "ap_9"), 1);
        assert_eq!(sessions.close_matching("a@x", ""), 1);
        assert!(one.revoked.is_cancelled() && other.revoked.is_cancelled());
        let before = sessions.version();
        drop((one, two, other));
        assert!(sessions.list(None).is_empty());
        assert!(sessions.version() > before);
        // A refused slot leaves no empty entry behind.
        assert!(acquire(&sessions, "c@x", "ap_3", 10, 0).is_none());
        assert!(sessions.map.lock().unwrap().is_empty());
    }

    #[test]
    fn replica_names_from_the_environment() {
        assert_eq!(
            replica_from(Some("imapgate-7d9f-x2")).as_deref(),
            Some("imapgate-7d9f-x2")
        );
        for bad in ["", "  ", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(replica_from(Some(bad)).is_none(), "{bad:?}");
        }
        assert!(replica_from(None).is_none());
        let r = random_replica();
        assert_eq!(r.len(), 8);
        assert_ne!(r, random_replica());
    }
}
