//! The users file: who may log in, with which app passwords (argon2id PHC strings only).
//!
//! Shape (`version: 1`): a map from the full, lower-cased address to the user's entry. The file
//! holds no usable secret. Every write — the CLI's, and the gateway's write-back after a login
//! (re-hash, lookup index) — goes through [`UsersFile::update`]: an exclusive lock, a fresh read,
//! the change applied to what was read, a new file renamed into place (see `locked_file`). The
//! gateway re-reads the file when it changes on disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::locked_file::{LockedFile, WriteError};

pub const VERSION: u32 = 1;

/// How long a CLI command waits for another writer of the users file.
pub const CLI_LOCK_WAIT: Duration = Duration::from_secs(30);

/// `KEYID:HEX` with 64 hex digits (HMAC-SHA-256), the shape of [`AppPassword::lookup`].
pub fn is_lookup_index(s: &str) -> bool {
    let Some((id, hex)) = s.split_once(':') else {
        return false;
    };
    super::keyring::valid_key_id(id)
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Mechanism names a user entry may list.
pub const MECHANISMS: &[&str] = &["login", "plain", "xoauth2", "oauthbearer"];

/// `KEYID:BASE64` with a payload long enough for nonce + tag + a 160-bit secret.
fn looks_encrypted(t: &str) -> bool {
    use base64::Engine;
    let Some((id, b64)) = t.split_once(':') else {
        return false;
    };
    !id.is_empty()
        && base64::engine::general_purpose::STANDARD
            .decode(b64)
            .is_ok_and(|b| b.len() >= 12 + 16 + 16)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    pub version: u32,
    #[serde(default, deserialize_with = "users_null_is_empty")]
    pub users: BTreeMap<String, User>,
}

/// YAML null (`key:` with nothing after it) reads as empty, as it did before serde-saphyr 2.1
/// refused null for collections and structs: a users file edited by hand keeps loading.
fn null_is_empty<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// [`null_is_empty`] for `users:` and for each user (`alice@example.org:` alone is a user
/// with nothing set).
fn users_null_is_empty<'de, D>(d: D) -> Result<BTreeMap<String, User>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let users: Option<BTreeMap<String, Option<User>>> = Option::deserialize(d)?;
    Ok(users
        .unwrap_or_default()
        .into_iter()
        .map(|(name, user)| (name, user.unwrap_or_default()))
        .collect())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    #[serde(default)]
    pub disabled: bool,
    /// Overrides `auth.mfa.default` for this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa: Option<crate::config::MfaMode>,
    /// Mechanisms this user may log in with (`login`, `plain`); empty: all.
    #[serde(
        default,
        deserialize_with = "null_is_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mechanisms: Vec<String>,
    /// Client networks this user may log in from; empty: any.
    #[serde(
        default,
        deserialize_with = "null_is_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// The TOTP secret, encrypted: `KEYID:BASE64(nonce ‖ ciphertext)` (see `keyring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<String>,
    /// The name the backend knows, when it differs from the login address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub app_passwords: Vec<AppPassword>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppPassword {
    pub id: String,
    #[serde(default)]
    pub label: String,
    /// argon2id PHC string.
    pub hash: String,
    /// The keyed lookup index, `KEYID:HEX(HMAC-SHA-256(index key, password))` (see
    /// `keyring::KeyRing::lookup_index`): a login finds the one app password to verify by it
    /// instead of running argon2 over all of them. Absent on app passwords made before indexes
    /// existed; they are verified the old way and gain one at their next successful login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
    #[serde(default)]
    pub revoked: bool,
}

impl AppPassword {
    /// Usable now: not revoked and not expired.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        !self.revoked && self.expires.is_none_or(|e| e > now)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Locked(#[from] WriteError),
    /// The change itself was refused (e.g. "no user x"); nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The file can be read by others (see `config::file_mode`).
    #[error("{0}")]
    Exposed(String),
}

impl UsersFile {
    /// Loads and checks the file: version, user names, PHC strings.
    pub fn load(path: &Path) -> Result<UsersFile, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| UsersError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Loads the file, or an empty one if it does not exist yet (CLI).
    pub fn load_or_empty(path: &Path) -> Result<UsersFile, UsersError> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(UsersFile {
                version: VERSION,
                users: BTreeMap::new(),
            })
        }
    }

    pub fn parse(text: &str) -> Result<UsersFile, String> {
        let file: UsersFile = serde_saphyr::from_str(text).map_err(|e| {
            e.to_string()
                .lines()
                .next()
                .unwrap_or("invalid YAML")
                .to_owned()
        })?;
        if file.version != VERSION {
            return Err(format!(
                "version {} is not supported (expected {VERSION})",
                file.version
            ));
        }
        for (name, user) in &file.users {
            // The wider rule: a Unicode name is kept (it can log in only with
            // `auth.unicode_names`); every name must already be in its normalised form.
            match super::normalize_user_with(name, super::NameRules::Unicode) {
                Ok(n) if &n == name => {}
                _ => return Err(format!("users.{name}: not a valid, lower-case user name")),
            }
            for m in &user.mechanisms {
                if !MECHANISMS.contains(&m.as_str()) {
                    return Err(format!(
                        "users.{name}.mechanisms: `{m}` is not one of {}",
                        MECHANISMS.join(", ")
                    ));
                }
            }
            if let Some(t) = &user.totp {
                if !looks_encrypted(t) {
                    return Err(format!(
                        "users.{name}.totp: not an encrypted secret (KEYID:BASE64); a TOTP secret in the clear is refused"
                    ));
                }
            }
            for (i, ap) in user.app_passwords.iter().enumerate() {
                if !ap.hash.starts_with("$argon2id$")
                    || argon2::PasswordHash::new(&ap.hash).is_err()
                {
                    return Err(format!(
                        "users.{name}.app_passwords[{i}].hash: not an argon2id PHC string"
                    ));
                }
                if ap.lookup.as_deref().is_some_and(|l| !is_lookup_index(l)) {
                    return Err(format!(
                        "users.{name}.app_passwords[{i}].lookup: not a lookup index (KEYID:64 hex digits)"
                    ));
                }
            }
        }
        Ok(file)
    }

    /// The file's text as written (a header, then the YAML).
    fn render(&self) -> Result<String, String> {
        let text = serde_saphyr::to_string(self).map_err(|e| e.to_string())?;
        let header = "# imapgate users file: written by `imapgate users`, `app-password` and `totp`.\n\
                      # App passwords are argon2id hashes; TOTP secrets are encrypted under the key ring\n\
                      # (auth.secret_keys), useless without it. Keep it mode 0600.\n";
        Ok(format!("{header}{text}"))
    }

    /// Replaces the file with this content, under the lock (see [`Self::update`]). For a new
    /// file or a test; a change to an existing file goes through [`Self::update`], which
    /// re-reads it under the lock first.
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        let lock = LockedFile::lock(path, CLI_LOCK_WAIT)?;
        self.write_locked(&lock)
    }

    pub(crate) fn write_locked(&self, lock: &LockedFile) -> Result<(), UsersError> {
        let text = self.render().map_err(|e| UsersError::Write {
            path: lock.path().display().to_string(),
            source: std::io::Error::other(e),
        })?;
        lock.replace(text.as_bytes())?;
        Ok(())
    }

    /// Read-modify-write with the exclusive lock held throughout: waits at most `wait` for
    /// the lock, reads the file (an empty one if it does not exist), lets `change` edit it,
    /// and writes it back only if `change` says it changed something (`Ok(true)`). An `Err`
    /// from `change` writes nothing and comes back as [`UsersError::Refused`]. Because the
    /// change is applied to what was read under the lock, a change another process made
    /// meanwhile (a revocation, say) is never undone.
    pub fn update(
        path: &Path,
        wait: Duration,
        change: impl FnOnce(&mut UsersFile) -> Result<bool, String>,
    ) -> Result<bool, UsersError> {
        let lock = LockedFile::lock(path, wait)?;
        let mut file = Self::load_or_empty(path)?;
        if !change(&mut file).map_err(UsersError::Refused)? {
            return Ok(false);
        }
        file.write_locked(&lock)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let mut f = UsersFile {
            version: 1,
            users: BTreeMap::new(),
        };
        f.users.insert(
            "alice@example.org".into(),
            User {
                disabled: false,
                upstream_user: Some("alice".into()),
                mfa: None,
                mechanisms: Vec::new(),
                allowed_networks: Vec::new(),
                totp: None,
                app_passwords: vec![AppPassword {
                    id: "ap_abcd".into(),
                    label: "laptop".into(),
                    hash: "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG".into(),
                    lookup: Some(format!("k1:{}", "0a".repeat(32))),
                    created: OffsetDateTime::UNIX_EPOCH,
                    expires: None,
                    revoked: false,
                }],
            },
        );
        let text = serde_saphyr::to_string(&f).unwrap();
        assert_eq!(UsersFile::parse(&text).unwrap(), f);
        assert!(UsersFile::parse("version: 2\nusers: {}\n").is_err());
        assert!(UsersFile::parse("version: 1\nusers:\n  Alice@x: {}\n").is_err());
        assert!(UsersFile::parse("version: 1\nusers: {}\nextra: 1\n").is_err());
        let clear = text.replace(
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
            "plaintext",
        );
        assert!(UsersFile::parse(&clear).is_err());
        // A TOTP secret in the clear is refused at load.
        let plain_totp = "version: 1\nusers:\n  a@x:\n    totp: JBSWY3DPEHPK3PXP\n";
        assert!(UsersFile::parse(plain_totp)
            .unwrap_err()
            .contains("in the clear"));
        let bad_mech = "version: 1\nusers:\n  a@x:\n    mechanisms: [cram-md5]\n";
        assert!(UsersFile::parse(bad_mech).is_err());
        // A lookup index must have its shape (a key id, 64 hex digits).
        let good_lookup = format!("k1:{}", "0a".repeat(32));
        for bad in [
            "k1:0a0a",
            "nokey",
            "k 1:00",
            &format!("k1:{}", "0A".repeat(32)),
        ] {
            let t = text.replace(&good_lookup, bad);
            assert!(
                UsersFile::parse(&t).unwrap_err().contains("lookup"),
                "{bad}"
            );
        }
    }
}

/// What the YAML parser (serde-saphyr 2.x) does with a hand-edited users file.
#[cfg(test)]
mod yaml_tests {
    use super::*;

    #[test]
    fn empty_values_read_as_empty_as_before_the_parser_upgrade() {
        let f = UsersFile::parse("version: 1\nusers:\n").unwrap();
        assert!(f.users.is_empty());
        let f = UsersFile::parse(
            "version: 1\nusers:\n  alice@example.org:\n  bob@example.org:\n    mechanisms:\n    allowed_networks:\n    app_passwords:\n    disabled: true\n",
        )
        .unwrap();
        assert_eq!(f.users.get("alice@example.org"), Some(&User::default()));
        let bob = f.users.get("bob@example.org").unwrap();
        assert!(bob.disabled && bob.app_passwords.is_empty() && bob.mechanisms.is_empty());
    }

    #[test]
    fn a_user_twice_is_refused_with_its_line() {
        // A key twice is an error, never "last one wins": two entries for one user must not
        // silently drop the app passwords of the first.
        let e = UsersFile::parse(
            "version: 1\nusers:\n  alice@example.org: {}\n  alice@example.org: { disabled: true }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("duplicate mapping key") && e.contains("line 4"),
            "{e}"
        );
    }
}
