//! `Secret`: the one home of every credential the gateway handles.
//!
//! Passwords, SASL payloads, app passwords, the master password and keys live in this type.
//! Invariant (DESIGN.md, security invariant 8): `Debug` and `Display` print `[REDACTED]`, the
//! bytes are zeroized on drop, and equality is constant-time. There is deliberately no way to
//! format the content; code that needs the bytes calls [`Secret::expose`] and the call site
//! shows where a secret leaves its box.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A byte string that must never be logged, printed or compared in variable time.
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes; the caller's copy should be the only other one and dropped soon.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies a slice into a new secret.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The bytes, for the few places that must use them (hashing, the upstream login).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The content as UTF-8, if it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time equality (length is not hidden).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.0.as_slice().ct_eq(other).into()
    }

    /// Keeps only the bytes for which `keep` is true, in place (e.g. spaces in app passwords).
    pub fn retain(&mut self, keep: impl FnMut(&u8) -> bool) {
        self.0.retain(keep);
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self::new(s.into_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other.expose())
    }
}

impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::from_slice(b"hunter2");
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert_eq!(format!("{s}"), "[REDACTED]");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
    }

    #[test]
    fn equality_and_retain() {
        let mut s = Secret::from_slice(b"ab cd");
        s.retain(|b| *b != b' ');
        assert!(s.ct_eq(b"abcd"));
        assert_eq!(s, Secret::from_slice(b"abcd"));
        assert_ne!(s, Secret::from_slice(b"abce"));
    }
}
