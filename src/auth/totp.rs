//! TOTP (RFC 6238) with totp-rs: 160-bit secrets, SHA-1, 30-second steps, ±1 step of skew —
//! what authenticator apps expect. Codes are compared in constant time (totp-rs' `Token`), and
//! [`verify`] returns the time step that matched so the caller can refuse a second use of it.

use totp_rs::{Algorithm, Builder, Totp};

use crate::secret::Secret;

pub const STEP_SECONDS: u64 = 30;
pub const SECRET_BYTES: usize = 20;

/// A new random 160-bit secret.
pub fn new_secret() -> Secret {
    use rand::RngExt;
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    Secret::new(bytes.to_vec())
}

fn totp(secret: &Secret, digits: u8) -> Option<Totp> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(digits)
        .with_skew(1)
        .with_step_duration(STEP_SECONDS)
        .with_secret(secret.expose().to_vec())
        .build()
        .ok()
}

/// The time step (counter) whose code equals `code`, within ±1 step of `now` (Unix seconds).
pub fn verify(secret: &Secret, code: &str, now: u64, digits: u8) -> Option<u64> {
    if code.len() != usize::from(digits) || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    totp(secret, digits)?.check(code, now)
}

/// Whether `code` was this secret's code at some step in the `window` before `now` (a client
/// replaying a saved "app password + code" after its unlock window ended, not a guess).
pub fn was_valid_within(
    secret: &Secret,
    code: &str,
    now: u64,
    digits: u8,
    window: std::time::Duration,
) -> bool {
    let Some(t) = totp(secret, digits) else {
        return false;
    };
    let steps = window.as_secs() / STEP_SECONDS;
    (2..=steps).any(|back| {
        let at = now.saturating_sub(back * STEP_SECONDS);
        t.generate(at).to_string() == code
    })
}

/// The code for `now` (tests, `totp enroll` checks).
pub fn code_at(secret: &Secret, now: u64, digits: u8) -> Option<String> {
    Some(totp(secret, digits)?.generate(now).to_string())
}

/// Base32 (RFC 4648, no padding), as authenticator apps take it.
pub fn base32(secret: &Secret) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in secret.expose() {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            let idx = ((buffer >> bits) & 31) as usize;
            out.push(char::from(*ALPHABET.get(idx).unwrap_or(&b'A')));
        }
    }
    if bits > 0 {
        let idx = ((buffer << (5 - bits)) & 31) as usize;
        out.push(char::from(*ALPHABET.get(idx).unwrap_or(&b'A')));
    }
    out
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `otpauth://totp/ISSUER:USER?secret=…&issuer=…&algorithm=SHA1&digits=6&period=30`
/// (the Key Uri Format authenticator apps scan).
pub fn otpauth_uri(issuer: &str, user: &str, secret: &Secret, digits: u8) -> Secret {
    Secret::from(format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={digits}&period={STEP_SECONDS}",
        pct(issuer),
        pct(user),
        base32(secret),
        pct(issuer)
    ))
}

/// The URI as a QR code drawn with Unicode half blocks, for a terminal.
pub fn qr_terminal(uri: &Secret) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(uri.expose()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", 8 digits.
        let seed = Secret::from_slice(b"12345678901234567890");
        for (t, want) in [
            (59u64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
        ] {
            assert_eq!(code_at(&seed, t, 8).unwrap(), want, "t={t}");
            assert_eq!(verify(&seed, want, t, 8), Some(t / 30));
        }
    }

    #[test]
    fn skew_is_one_step() {
        let s = new_secret();
        assert_eq!(s.len(), 20);
        let now = 1_700_000_000;
        let prev = code_at(&s, now - 30, 6).unwrap();
        let next = code_at(&s, now + 30, 6).unwrap();
        let old = code_at(&s, now - 90, 6).unwrap();
        assert_eq!(verify(&s, &prev, now, 6), Some(now / 30 - 1));
        assert_eq!(verify(&s, &next, now, 6), Some(now / 30 + 1));
        if old != prev && old != code_at(&s, now, 6).unwrap() && old != next {
            assert_eq!(
                verify(&s, &old, now, 6),
                None,
                "a code three steps old was accepted"
            );
        }
        assert_eq!(verify(&s, "12345", now, 6), None);
        assert_eq!(verify(&s, "abcdef", now, 6), None);
    }

    #[test]
    fn stale_codes_are_recognised() {
        let s = new_secret();
        let now = 1_700_000_000;
        let hour = std::time::Duration::from_secs(3600);
        let old = code_at(&s, now - 600, 6).unwrap();
        assert!(was_valid_within(&s, &old, now, 6, hour));
        let ancient = code_at(&s, now - 7200, 6).unwrap();
        let recent: Vec<String> = (0..=120)
            .map(|b| code_at(&s, now - b * 30, 6).unwrap())
            .collect();
        if !recent.contains(&ancient) {
            assert!(!was_valid_within(&s, &ancient, now, 6, hour));
        }
    }

    #[test]
    fn uri_and_base32() {
        assert_eq!(
            base32(&Secret::from_slice(b"Hello!\xde\xad\xbe\xef")),
            "JBSWY3DPEHPK3PXP"
        );
        let uri = otpauth_uri(
            "imapgate",
            "alice@example.org",
            &Secret::from_slice(b"Hello!\xde\xad\xbe\xef"),
            6,
        );
        assert_eq!(
            uri.expose_str().unwrap(),
            "otpauth://totp/imapgate:alice@example.org?secret=JBSWY3DPEHPK3PXP&issuer=imapgate&algorithm=SHA1&digits=6&period=30"
        );
        assert!(qr_terminal(&uri).unwrap().lines().count() > 10);
    }
}
