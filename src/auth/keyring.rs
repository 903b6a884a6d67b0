//! The key ring for TOTP secrets at rest: ChaCha20-Poly1305 with 256-bit keys.
//!
//! A stored secret is `KEYID:BASE64(nonce ‖ ciphertext ‖ tag)` with a random 96-bit nonce and
//! the user name as associated data, so a ciphertext copied to another user's entry does not
//! decrypt. The key id travels with each ciphertext: new ones use the active key, old ones
//! still decrypt under theirs until `imapgate keys rotate` re-encrypts them.
//!
//! The ring also keys the app passwords' lookup index: per ring key an index key
//! HMAC-SHA-256(ring key, "imapgate app-password index v1"), and per app password
//! `KEYID:HEX(HMAC-SHA-256(index key, the 16 letters))`. App passwords are 75-bit random strings,
//! so an index without the key says nothing about the password; with the key and the users file
//! an attacker still has 2^75 HMACs to try. A login tries every key of the ring (HMAC is cheap),
//! so indexes made under an older key keep working after `keys rotate`.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use rand::RngExt;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

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
    /// Per ring key, the key of the app passwords' lookup index.
    index_keys: Vec<(String, Secret)>,
}

const NONCE: usize = 12;

/// Derives the lookup-index key from a ring key; versioned so a later scheme cannot collide.
const INDEX_LABEL: &[u8] = b"imapgate app-password index v1";

/// A key id as the configuration accepts it: 1-16 of a-z, A-Z, 0-9, - and _.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 16
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn hmac(key: &[u8], msg: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(msg);
    Some(Zeroizing::new(mac.finalize().into_bytes().into()))
}

/// One password's index under every key of the ring, computed once per login.
pub struct LookupTags(Vec<(String, Zeroizing<[u8; 32]>)>);

impl LookupTags {
    /// Whether a stored index (`KEYID:HEX`) is this password's. `None` when it cannot be
    /// checked: its key is not in the ring (any more), or it is malformed.
    pub fn check(&self, stored: &str) -> Option<bool> {
        let (id, hex) = stored.split_once(':')?;
        let (_, tag) = self.0.iter().find(|(k, _)| k == id)?;
        let mut want = Zeroizing::new([0u8; 32]);
        if hex.len() != 64 {
            return None;
        }
        for (i, out) in want.iter_mut().enumerate() {
            *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(bool::from(tag.as_slice().ct_eq(want.as_slice())))
    }
}

impl KeyRing {
    pub fn new(keys: Vec<(String, Secret)>, active: Option<String>) -> Self {
        let index_keys = keys
            .iter()
            .filter_map(|(id, k)| {
                let d = hmac(k.expose(), INDEX_LABEL)?;
                Some((id.clone(), Secret::from_slice(d.as_slice())))
            })
            .collect();
        Self {
            keys,
            active,
            index_keys,
        }
    }

    /// The lookup index of an app password (its 16 letters, normalised) under the active key:
    /// `KEYID:HEX`, the value of `lookup` in the users file.
    pub fn lookup_index(&self, letters: &Secret) -> Result<String, KeyError> {
        let id = self.active.as_deref().ok_or(KeyError::NoActiveKey)?;
        let (_, key) = self
            .index_keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| KeyError::UnknownKey(id.to_owned()))?;
        let tag = hmac(key.expose(), letters.expose())
            .ok_or_else(|| KeyError::UnknownKey(id.to_owned()))?;
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{id}:{hex}"))
    }

    /// The password's index under every key of the ring.
    pub fn lookup_tags(&self, letters: &Secret) -> LookupTags {
        LookupTags(
            self.index_keys
                .iter()
                .filter_map(|(id, k)| Some((id.clone(), hmac(k.expose(), letters.expose())?)))
                .collect(),
        )
    }

    /// Whether the ring holds a key with this id.
    pub fn has_key(&self, id: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == id)
    }

    pub fn active_id(&self) -> Option<&str> {
        self.active.as_deref()
    }

    fn cipher(&self, id: &str) -> Option<ChaCha20Poly1305> {
        let (_, key) = self.keys.iter().find(|(k, _)| k == id)?;
        // A key of another length than 32 bytes is refused by the configuration; here it is
        // simply not usable.
        let key = Key::try_from(key.expose()).ok()?;
        Some(ChaCha20Poly1305::new(&key))
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
                &Nonce::from(nonce),
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
        let nonce = Nonce::try_from(nonce).map_err(|_| KeyError::Format)?;
        let cipher = self
            .cipher(id)
            .ok_or_else(|| KeyError::UnknownKey(id.to_owned()))?;
        cipher
            .decrypt(
                &nonce,
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

    #[test]
    fn lookup_index_is_keyed_and_survives_rotation() {
        let pw = Secret::from_slice(b"abcdefghijklmnop");
        let other = Secret::from_slice(b"abcdefghijklmnoq");
        let only_k1 = KeyRing::new(
            vec![("k1".into(), Secret::new(vec![1; 32]))],
            Some("k1".into()),
        );
        let idx = only_k1.lookup_index(&pw).unwrap();
        assert!(idx.starts_with("k1:") && idx.len() == 3 + 64, "{idx}");
        assert!(crate::auth::users::is_lookup_index(&idx));
        assert_eq!(idx, only_k1.lookup_index(&pw).unwrap(), "deterministic");
        assert_ne!(idx, only_k1.lookup_index(&other).unwrap());
        // Not a plain hash of the password: another key gives another index.
        let k9 = KeyRing::new(
            vec![("k1".into(), Secret::new(vec![9; 32]))],
            Some("k1".into()),
        );
        assert_ne!(idx, k9.lookup_index(&pw).unwrap());
        assert_eq!(k9.lookup_tags(&pw).check(&idx), Some(false));
        // After rotation (k2 active, k1 still in the ring) the k1 index still matches.
        let r = ring();
        assert!(r.lookup_index(&pw).unwrap().starts_with("k2:"));
        let tags = r.lookup_tags(&pw);
        assert_eq!(tags.check(&idx), Some(true));
        assert_eq!(tags.check(&r.lookup_index(&pw).unwrap()), Some(true));
        assert_eq!(r.lookup_tags(&other).check(&idx), Some(false));
        // A key no longer in the ring, or garbage: cannot be checked.
        assert_eq!(tags.check(&idx.replacen("k1", "k7", 1)), None);
        assert_eq!(tags.check("k1:zz"), None);
        assert_eq!(tags.check("nothing"), None);
        let empty = KeyRing::new(Vec::new(), None);
        assert_eq!(empty.lookup_index(&pw), Err(KeyError::NoActiveKey));
    }

    /// A TOTP secret encrypted before the upgrade to chacha20poly1305 0.11 (by 0.10.1, through
    /// [`KeyRing::encrypt`]; key bytes 0..32 as `k1`): users files hold such ciphertexts, so
    /// they must keep decrypting, bound to their user.
    #[test]
    fn ciphertext_from_chacha20poly1305_0_10_still_decrypts() {
        const STORED: &str =
            "k1:VptfxGcQFSuW8JfKQgFa0k/Af0NjvkHlyrctQD+3eobtEWaSwGjzqyv2QVc/gc+Iemk7O6FWYBZfCbKs";
        let r = KeyRing::new(
            vec![("k1".into(), Secret::new((0u8..32).collect()))],
            Some("k1".into()),
        );
        assert_eq!(
            r.decrypt("alice@example.org", STORED).unwrap(),
            Secret::from_slice(b"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
        );
        assert_eq!(
            r.decrypt("bob@example.org", STORED),
            Err(KeyError::Decrypt("k1".into()))
        );
        // What the new code writes has the same layout (12-byte nonce, ciphertext, 16-byte tag).
        let again = r
            .encrypt(
                "alice@example.org",
                &Secret::from_slice(b"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"),
            )
            .unwrap();
        assert_eq!(again.len(), STORED.len());
    }
}
