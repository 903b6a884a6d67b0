//! What a login writes back to the users file: a hash with the current argon2 parameters, the
//! lookup index under the active key. The change is applied to the file as it is when the
//! users file's lock is held (see `users::UsersFile::update`), and only to the app password
//! that was verified, still unrevoked and with the same hash; so a revocation, or any other
//! change an operator made after the login's verification, is never undone.

use std::time::Duration;

use super::users::{User, UsersError, UsersFile};

/// What a login writes back for one app password.
pub(super) struct WriteBack<'a> {
    pub(super) user: &'a str,
    pub(super) id: &'a str,
    /// The hash the login verified; nothing is written if the file holds another by now.
    pub(super) verified_hash: &'a str,
    pub(super) new_hash: Option<&'a str>,
    pub(super) lookup: Option<&'a str>,
}

/// Applies a write-back to the users file as it is now (read under its lock). `Ok(false)`:
/// the app password is gone, revoked or changed, and nothing was written.
pub(super) fn apply_write_back(
    path: &std::path::Path,
    wait: Duration,
    w: &WriteBack<'_>,
) -> Result<bool, UsersError> {
    UsersFile::update(path, wait, |file| {
        Ok(file
            .users
            .get_mut(w.user)
            .is_some_and(|u| apply_to_user(u, w)))
    })
}

/// Applies a write-back to one user's record as it is now; `false`: the app password is gone,
/// revoked or changed, and nothing was changed.
pub(super) fn apply_to_user(user: &mut User, w: &WriteBack<'_>) -> bool {
    let Some(ap) = user
        .app_passwords
        .iter_mut()
        .find(|a| a.id == w.id && a.hash == w.verified_hash && !a.revoked)
    else {
        return false;
    };
    if let Some(h) = w.new_hash {
        ap.hash = h.to_owned();
    }
    if let Some(l) = w.lookup {
        ap.lookup = Some(l.to_owned());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::app_password;
    use crate::auth::users::AppPassword;
    use crate::config::Argon2Params;
    use crate::secret::Secret;
    use time::OffsetDateTime;

    fn one_user_file(dir: &std::path::Path) -> (std::path::PathBuf, String) {
        let p = Argon2Params::light(64);
        let hash = app_password::hash(&Secret::from_slice(b"abcdefghijklmnop"), p).unwrap();
        let mut f = UsersFile {
            version: 1,
            users: Default::default(),
        };
        f.users.insert(
            "alice@example.org".into(),
            crate::auth::users::User {
                app_passwords: vec![AppPassword {
                    id: "ap_1".into(),
                    label: String::new(),
                    hash: hash.clone(),
                    lookup: None,
                    created: OffsetDateTime::UNIX_EPOCH,
                    expires: None,
                    revoked: false,
                }],
                ..Default::default()
            },
        );
        let path = dir.join("users.yaml");
        f.save(&path).unwrap();
        (path, hash)
    }

    /// A write-back for alice's `ap_1`, verified with `verified_hash`.
    fn alice_ap_1<'a>(
        verified_hash: &'a str,
        new_hash: Option<&'a str>,
        lookup: Option<&'a str>,
    ) -> WriteBack<'a> {
        WriteBack {
            user: "alice@example.org",
            id: "ap_1",
            verified_hash,
            new_hash,
            lookup,
        }
    }

    fn revoke(path: &std::path::Path) {
        UsersFile::update(path, Duration::from_secs(1), |f| {
            let u = f.users.get_mut("alice@example.org").unwrap();
            u.app_passwords[0].revoked = true;
            Ok(true)
        })
        .unwrap();
    }

    /// A login verified against the file as it was (its stale view: not revoked); the
    /// revocation is written before the login's write-back runs. The write-back re-reads the
    /// file under the lock and leaves the revocation (and the old hash) alone.
    #[test]
    fn a_write_back_with_a_stale_view_never_undoes_a_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let (path, verified) = one_user_file(dir.path());
        let stale = UsersFile::load(&path).unwrap();
        assert!(!stale.users["alice@example.org"].app_passwords[0].revoked);
        revoke(&path);
        let wrote = apply_write_back(
            &path,
            Duration::from_secs(1),
            &alice_ap_1(
                &verified,
                Some("$argon2id$v=19$m=128,t=1,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"),
                Some(&format!("k1:{}", "ab".repeat(32))),
            ),
        )
        .unwrap();
        assert!(!wrote);
        let now = UsersFile::load(&path).unwrap();
        let ap = &now.users["alice@example.org"].app_passwords[0];
        assert!(ap.revoked && ap.hash == verified && ap.lookup.is_none());
    }

    /// The same race with the write-back already running: it waits for the lock an operator
    /// command holds, and the revocation that command writes survives.
    #[test]
    fn a_write_back_waits_for_the_lock_and_applies_to_what_it_then_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (path, verified) = one_user_file(dir.path());
        let lock =
            crate::auth::locked_file::LockedFile::lock(&path, Duration::from_secs(1)).unwrap();
        let (p2, v2) = (path.clone(), verified.clone());
        let writer = std::thread::spawn(move || {
            apply_write_back(
                &p2,
                Duration::from_secs(10),
                &alice_ap_1(&v2, None, Some(&format!("k1:{}", "ab".repeat(32)))),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !writer.is_finished(),
            "the write-back did not wait for the lock"
        );
        // The operator command, holding the lock, writes the revocation.
        let mut f = UsersFile::load(&path).unwrap();
        f.users.get_mut("alice@example.org").unwrap().app_passwords[0].revoked = true;
        f.write_locked(&lock).unwrap();
        drop(lock);
        assert!(!writer.join().unwrap().unwrap());
        let ap = &UsersFile::load(&path).unwrap().users["alice@example.org"].app_passwords[0];
        assert!(ap.revoked && ap.lookup.is_none());
        // Without a revocation, the write-back lands on the file as it is, keeping what others
        // added meanwhile.
        let dir = tempfile::tempdir().unwrap();
        let (path, verified) = one_user_file(dir.path());
        UsersFile::update(&path, Duration::from_secs(1), |f| {
            f.users.insert("bob@example.org".into(), Default::default());
            Ok(true)
        })
        .unwrap();
        let lookup = format!("k1:{}", "ab".repeat(32));
        assert!(apply_write_back(
            &path,
            Duration::from_secs(1),
            &alice_ap_1(&verified, None, Some(&lookup)),
        )
        .unwrap());
        let f = UsersFile::load(&path).unwrap();
        assert!(f.users.contains_key("bob@example.org"));
        assert_eq!(
            f.users["alice@example.org"].app_passwords[0]
                .lookup
                .as_deref(),
            Some(lookup.as_str())
        );
    }
}
