//! App passwords: 16 random lowercase letters (log2(26^16) ≈ 75 bits), shown once as four
//! groups of four, stored only as argon2id PHC strings. Letters only, so that a later
//! "app password + 6-digit code" is never ambiguous.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::Rng;

use crate::config::Argon2Params;
use crate::secret::Secret;

pub const LEN: usize = 16;

/// A new random app password (lowercase letters, no spaces).
pub fn generate() -> Secret {
    let mut rng = rand::rng();
    let bytes: Vec<u8> = (0..LEN).map(|_| b'a' + rng.random_range(0..26u8)).collect();
    Secret::new(bytes)
}

/// `abcd efgh ijkl mnop`, for showing once.
pub fn grouped(pw: &Secret) -> Secret {
    let mut out = Vec::with_capacity(LEN + 3);
    for (i, b) in pw.expose().iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(b' ');
        }
        out.push(*b);
    }
    Secret::new(out)
}

/// What a client typed, normalised: spaces removed, letters lower-cased. `None` when it cannot
/// be an app password (wrong length or characters), which still fails like a wrong password.
pub fn normalize(input: &Secret) -> Option<Secret> {
    let mut s = input.clone();
    s.retain(|b| *b != b' ');
    let ok = s.len() == LEN && s.expose().iter().all(u8::is_ascii_alphabetic);
    if !ok {
        return None;
    }
    Some(Secret::new(
        s.expose().iter().map(u8::to_ascii_lowercase).collect(),
    ))
}

fn hasher(p: Argon2Params) -> Result<Argon2<'static>, argon2::Error> {
    Ok(Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(p.m_kib, p.t, p.p, None)?,
    ))
}

/// Hashes a password into a PHC string.
pub fn hash(pw: &Secret, params: Argon2Params) -> Result<String, String> {
    let salt = SaltString::from_b64(&base64_salt()).map_err(|e| e.to_string())?;
    let h = hasher(params).map_err(|e| e.to_string())?;
    h.hash_password(pw.expose(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn base64_salt() -> String {
    use base64::Engine;
    let salt: [u8; 16] = rand::rng().random();
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(salt)
}

/// Verifies against a PHC string, with the parameters stored in it.
pub fn verify(pw: &Secret, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(pw.expose(), &parsed)
        .is_ok()
}

/// A PHC string for the dummy verification paid by unknown users, made once per process with
/// the configured parameters so that it costs the same as a real one.
pub fn dummy_hash(params: Argon2Params) -> String {
    hash(&generate(), params).unwrap_or_default()
}

/// A short random id such as `ap_7f3k9q`.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let tail: String = (0..6)
        .map(|_| {
            char::from(
                *ALPHABET
                    .get(rng.random_range(0..ALPHABET.len()))
                    .unwrap_or(&b'x'),
            )
        })
        .collect();
    format!("ap_{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_normalisation() {
        let pw = generate();
        assert_eq!(pw.len(), 16);
        assert!(pw.expose().iter().all(u8::is_ascii_lowercase));
        let g = grouped(&pw);
        assert_eq!(g.len(), 19);
        assert_eq!(normalize(&g).unwrap(), pw);
        let upper = Secret::new(g.expose().to_ascii_uppercase());
        assert_eq!(normalize(&upper).unwrap(), pw);
        assert!(normalize(&Secret::from_slice(b"abcd")).is_none());
        assert!(normalize(&Secret::from_slice(b"abcdefghijklmno1")).is_none());
    }

    #[test]
    fn hash_and_verify() {
        let p = Argon2Params {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let pw = generate();
        let phc = hash(&pw, p).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(verify(&pw, &phc));
        assert!(!verify(&generate(), &phc));
        assert!(!verify(&pw, "garbage"));
        assert_ne!(new_id(), new_id());
    }
}
