//! Relayed sessions per user: the per-user cap (`max_sessions_per_user`) and the handle that
//! ends a session when its credential is revoked (`auth.revoke_closes_sessions`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Relayed sessions per user, capped by `max_sessions_per_user`; each with a token that
/// closes it when its credential is revoked (`auth.revoke_closes_sessions`).
#[derive(Default, Clone)]
pub struct UserSessions {
    map: Arc<Mutex<HashMap<String, Vec<SessionEntry>>>>,
}

struct SessionEntry {
    id: u64,
    credential_id: String,
    revoked: CancellationToken,
}

/// A held slot; dropping it frees the slot.
pub struct UserSlot {
    map: Arc<Mutex<HashMap<String, Vec<SessionEntry>>>>,
    user: String,
    id: u64,
    pub revoked: CancellationToken,
}

impl UserSessions {
    pub fn try_acquire(
        &self,
        user: &str,
        credential_id: &str,
        session: u64,
        max: u32,
    ) -> Option<UserSlot> {
        let mut map = self.map.lock().ok()?;
        let list = map.entry(user.to_owned()).or_default();
        if list.len() >= max as usize {
            return None;
        }
        let revoked = CancellationToken::new();
        list.push(SessionEntry {
            id: session,
            credential_id: credential_id.to_owned(),
            revoked: revoked.clone(),
        });
        Some(UserSlot {
            map: self.map.clone(),
            user: user.to_owned(),
            id: session,
            revoked,
        })
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
    /// password id or `oauth:ISSUER`), or one session (`session:ID`).
    pub fn close_matching(&self, user: &str, which: &str) -> usize {
        let Ok(map) = self.map.lock() else { return 0 };
        let mut closed = 0;
        for s in map.get(user).into_iter().flatten() {
            let hit = which.is_empty()
                || s.credential_id == which
                || which
                    .strip_prefix("session:")
                    .and_then(|id| id.parse::<u64>().ok())
                    == Some(s.id);
            if hit && !s.revoked.is_cancelled() {
                s.revoked.cancel();
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
        // Token sessions have no app password (and their user need not be listed): only
        // disabling the user ends them.
        let active = if s.credential_id.starts_with("oauth:") {
            !record.is_some_and(|u| u.disabled)
        } else {
            enabled.is_some_and(|u| {
                u.app_passwords
                    .iter()
                    .any(|a| a.id == s.credential_id && a.is_active(now))
            })
        };
        if !active && !s.revoked.is_cancelled() {
            s.revoked.cancel();
            closed += 1;
        }
    }
    closed
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(list) = map.get_mut(&self.user) {
                list.retain(|s| s.id != self.id);
                if list.is_empty() {
                    map.remove(&self.user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::users::{AppPassword, User, UsersFile};

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
        let revoked = sessions.try_acquire("a@x", "ap_1", 1, 10).unwrap();
        let kept = sessions.try_acquire("a@x", "ap_2", 2, 10).unwrap();
        // A token user who is not in the users file keeps their session.
        let token = sessions.try_acquire("t@x", "oauth:corp", 3, 10).unwrap();
        assert_eq!(sessions.close_revoked(&file), 1);
        assert!(revoked.revoked.is_cancelled());
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
        assert!(sessions.try_acquire("a@x", "ap_2", 4, 2).is_some());
    }
}
