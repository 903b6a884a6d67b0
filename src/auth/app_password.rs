//! App passwords: 16 random lowercase letters (log2(26^16) ≈ 75 bits), shown once as four
//! groups of four, stored only as argon2id PHC strings. Letters only, so that a later
//! "app password + 6-digit code" is never ambiguous.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngExt;

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
    // 16 random bytes, the PHC format's recommended salt length.
    let salt: [u8; 16] = rand::rng().random();
    let h = hasher(params).map_err(|e| e.to_string())?;
    h.hash_password_with_salt(pw.expose(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
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

/// [`verify`], with argon2's working memory supplied by the caller and wiped afterwards. The
/// gateway keeps one such buffer per concurrent hash and reuses it: otherwise every worker
/// thread's allocator keeps its own freed 19 MiB block after a burst of logins, and the
/// process stays hundreds of MiB larger than it needs to be.
pub fn verify_in(pw: &Secret, phc: &str, memory: &mut Vec<argon2::Block>) -> bool {
    use subtle::ConstantTimeEq;
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let Some(work) = memory.get_mut(..blocks) else {
        return false;
    };
    let mut out = zeroize::Zeroizing::new(vec![0u8; expected.len()]);
    let computed = Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(pw.expose(), &salt, out.as_mut_slice(), &mut *work)
        .is_ok();
    work.iter_mut().for_each(|b| *b = argon2::Block::default());
    computed && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
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
        let p = Argon2Params::light(64);
        let pw = generate();
        let phc = hash(&pw, p).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(verify(&pw, &phc));
        assert!(!verify(&generate(), &phc));
        assert!(!verify(&pw, "garbage"));
        assert_ne!(new_id(), new_id());
    }
}

#[cfg(test)]
mod verify_in_tests {
    use super::*;

    #[test]
    fn verify_in_agrees_with_verify_and_reuses_its_memory() {
        let params = Argon2Params::light(1024);
        let pw = generate();
        let phc = hash(&pw, params).unwrap();
        let mut mem = Vec::new();
        assert!(verify_in(&pw, &phc, &mut mem));
        assert_eq!(mem.len(), 1024, "one block per KiB");
        assert!(!verify_in(&generate(), &phc, &mut mem));
        assert!(!verify_in(&pw, "not a phc", &mut mem));
        // A hash with smaller parameters runs in the same (larger) buffer.
        let small = hash(&pw, Argon2Params::light(256)).unwrap();
        assert!(verify_in(&pw, &small, &mut mem) && verify(&pw, &small));
        assert_eq!(mem.len(), 1024);
    }
}

/// Hashes made before the upgrade to argon2 0.6 / password-hash 0.6 (by argon2 0.5.3, through
/// [`hash`]): users files hold such strings, so they must keep verifying, and parse as the
/// users file and the store parse them.
#[cfg(test)]
mod stored_hash_compat {
    use super::*;

    const PW: &[u8] = b"qwertzuiopasdfgh";
    /// The default parameters (`m=19456,t=2,p=1`).
    const DEFAULT: &str = "$argon2id$v=19$m=19456,t=2,p=1$v7xjbgcsFfZJVnjzuU0RCg$GxjVVsdWrk1hcCWYsgstWKMCmp8caQfuZ0tAoOpxYno";
    /// Cheap parameters, with a `/` in the salt's B64 alphabet.
    const LIGHT: &str = "$argon2id$v=19$m=256,t=1,p=1$dGwJLCoMqnLhYxkL/64nJg$KvqlkXDfgqPuURR9jVuuP6dakfZOOWLf4ZcJpH73ORg";

    #[test]
    fn hashes_from_argon2_0_5_still_verify() {
        let pw = Secret::from_slice(PW);
        let wrong = Secret::from_slice(b"qwertzuiopasdfgj");
        let mut mem = Vec::new();
        for phc in [DEFAULT, LIGHT] {
            assert!(PasswordHash::new(phc).is_ok(), "{phc} no longer parses");
            assert!(verify(&pw, phc), "{phc} no longer verifies");
            assert!(verify_in(&pw, phc, &mut mem), "{phc} no longer verifies");
            assert!(!verify(&wrong, phc));
            assert!(!verify_in(&wrong, phc, &mut mem));
        }
        // A new hash has the same shape, so old and new lines sit side by side in a users file.
        let new = hash(&pw, Argon2Params::light(256)).unwrap();
        assert!(new.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{new}");
        assert_eq!(new.len(), LIGHT.len());
    }
}
