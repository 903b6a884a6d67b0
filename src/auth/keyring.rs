//! The key ring for TOTP secrets at rest: ChaCha20-Poly1305 with 256-bit keys.
//!
//! A stored secret is `KEYID:BASE64(nonce ‖ ciphertext ‖ tag)` with a random 96-bit nonce and
//! the user name as associated data, so a ciphertext copied to another user's entry does not
//! decrypt. The key id travels with each ciphertext: new ones use the active key, old ones
//! still decrypt under theirs until `imapgate keys rotate` re-encrypts them.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::Rng;

use crate::secret::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("no key ring is configured (auth.secret_keys)")]
    NoActiveKey,
    #[error("not an encrypted secret (expected KEYID:BASE64)")]
    Format,
    #[error("key `{0}` is not in the key ring")]
    UnknownKey(String),
    #[error("the secret does not decrypt under key `{0}` for this user")]
    Decrypt(String),
}

pub struct KeyRing {
    keys: Vec<(String, Secret)>,
    active: Option<String>,
}

const NONCE: usize = 12;

impl KeyRing {
    pub fn new(keys: Vec<(String, Secret)>, active: Option<String>) -> Self {
        Self { keys, active }
    }

    pub fn active_id(&self) -> Option<&str> {
        self.active.as_deref()
    }

    fn cipher(&self, id: &str) -> Option<ChaCha20Poly1305> {
        let (_, key) = self.keys.iter().find(|(k, _)| k == id)?;
        Some(ChaCha20Poly1305::new(Key::from_slice(key.expose())))
    }

    /// Encrypts `plain` for `user` under the active key.
    pub fn encrypt(&self, user: &str, plain: &Secret) -> Result<String, KeyError> {
        let id = self.active.as_deref().ok_or(KeyError::NoActiveKey)?;
        let cipher = self
            .cipher(id)
            .ok_or_else(|| KeyError::UnknownKey(id.to_owned()))?;
        let nonce: [u8; NONCE] = rand::rng().random();
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.expose(),
                    aad: user.as_bytes(),
                },
            )
            .map_err(|_| KeyError::Decrypt(id.to_owned()))?;
        let mut blob = nonce.to_vec();
        blob.extend(ct);
        Ok(format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        ))
    }

    /// Decrypts a stored secret of `user`.
    pub fn decrypt(&self, user: &str, stored: &str) -> Result<Secret, KeyError> {
        let (id, b64) = stored.split_once(':').ok_or(KeyError::Format)?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KeyError::Format)?;
        if blob.len() <= NONCE + 16 {
            return Err(KeyError::Format);
        }
        let (nonce, ct) = blob.split_at(NONCE);
        let cipher = self
            .cipher(id)
            .ok_or_else(|| KeyError::UnknownKey(id.to_owned()))?;
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: user.as_bytes(),
                },
            )
            .map(Secret::new)
            .map_err(|_| KeyError::Decrypt(id.to_owned()))
    }

    /// The key id a stored secret names.
    pub fn key_of(stored: &str) -> Option<&str> {
        stored.split_once(':').map(|(id, _)| id)
    }
}

/// A new random 256-bit key, base64 (for `imapgate keys generate`).
pub fn generate_key() -> Secret {
    let key: [u8; 32] = rand::rng().random();
    Secret::from(base64::engine::general_purpose::STANDARD.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(
            vec![
                ("k1".into(), Secret::new(vec![1; 32])),
                ("k2".into(), Secret::new(vec![2; 32])),
            ],
            Some("k2".into()),
        )
    }

    #[test]
    fn round_trip_bound_to_user_and_key() {
        let r = ring();
        let s = Secret::from_slice(b"0123456789abcdefghij");
        let c = r.encrypt("alice@example.org", &s).unwrap();
        assert!(c.starts_with("k2:"));
        assert!(!c.contains("0123456789"));
        assert_eq!(r.decrypt("alice@example.org", &c).unwrap(), s);
        assert_eq!(
            r.decrypt("bob@example.org", &c),
            Err(KeyError::Decrypt("k2".into()))
        );
        assert_ne!(
            c,
            r.encrypt("alice@example.org", &s).unwrap(),
            "nonce reuse"
        );
        let only_k1 = KeyRing::new(
            vec![("k1".into(), Secret::new(vec![1; 32]))],
            Some("k1".into()),
        );
        assert_eq!(
            only_k1.decrypt("alice@example.org", &c),
            Err(KeyError::UnknownKey("k2".into()))
        );
        // A secret in the clear (base32, as an authenticator shows it) is not accepted.
        assert_eq!(
            r.decrypt("alice@example.org", "JBSWY3DPEHPK3PXP"),
            Err(KeyError::Format)
        );
        assert!(r
            .decrypt("alice@example.org", "k1:JBSWY3DPEHPK3PXP")
            .is_err());
        // One character in the middle of the ciphertext changed (always to a different one, and
        // where all six bits count): the authentication tag no longer matches.
        let mut tampered: Vec<char> = c.chars().collect();
        let mid = tampered.len() / 2 + 2;
        tampered[mid] = if tampered[mid] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert_ne!(tampered, c);
        assert!(r.decrypt("alice@example.org", &tampered).is_err());
    }
}
