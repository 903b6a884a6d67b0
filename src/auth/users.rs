//! The users file: who may log in, with which app passwords (argon2id PHC strings only).
//!
//! Shape (`version: 1`): a map from the full, lower-cased address to the user's entry. The file
//! holds no usable secret. It is written atomically (temp file + rename, mode 0600) by the CLI
//! and re-read by the gateway when it changes on disk.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const VERSION: u32 = 1;

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
    #[serde(default)]
    pub users: BTreeMap<String, User>,
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mechanisms: Vec<String>,
    /// Client networks this user may log in from; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// The TOTP secret, encrypted: `KEYID:BASE64(nonce ‖ ciphertext)` (see `keyring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<String>,
    /// The name the backend knows, when it differs from the login address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    #[serde(default)]
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
            }
        }
        Ok(file)
    }

    /// Writes the file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        let werr = |source| UsersError::Write {
            path: path.display().to_string(),
            source,
        };
        let text = serde_saphyr::to_string(self)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("users"),
            std::process::id()
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(werr)?;
        let header = "# imapgate users file: written by `imapgate users`, `app-password` and `totp`.\n\
                      # App passwords are argon2id hashes; TOTP secrets are encrypted under the key ring\n\
                      # (auth.secret_keys), useless without it. Keep it mode 0600.\n";
        f.write_all(header.as_bytes()).map_err(werr)?;
        f.write_all(text.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
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
    }
}
