//! The portal's two cookies, each a JSON value sealed with the auth key ring
//! (ChaCha20-Poly1305 under the active key, the cookie's purpose as associated data, so one
//! cannot be passed off as the other): the **session** (who, since when, whether an
//! administrator, the CSRF token) and the **sign-in** in flight (state, nonce, PKCE verifier,
//! where to return). Nothing is kept on the server: any replica opens them, a key rotation
//! keeps old cookies readable while their key is in the ring.
//!
//! Attributes: `__Host-` prefix (so `Secure`, `Path=/`, no `Domain`: no subdomain can set or
//! read it), `HttpOnly`, `SameSite=Lax` (sent on the top-level navigation back from the IdP,
//! never on cross-site sub-requests or POSTs). Over plain-http loopback (development) the
//! prefix and `Secure` are dropped, since browsers refuse them there.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::auth::keyring::KeyRing;
use crate::secret::Secret;

/// The associated data of each kind of cookie.
const SESSION_AAD: &str = "imapgate-portal-session";
const SIGNIN_AAD: &str = "imapgate-portal-signin";

/// A cookie value longer than this is not even tried (a browser keeps 4 KiB per cookie).
const MAX_COOKIE: usize = 4096;

/// How long a sign-in may take at the IdP.
pub const SIGNIN_TTL: Duration = Duration::from_secs(10 * 60);

/// A signed-in person, as the session cookie carries it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The mail address (the user name in the store).
    pub user: String,
    pub admin: bool,
    /// When the person last authenticated at the IdP (Unix seconds).
    pub auth_time: u64,
    /// When this session began (absolute lifetime).
    pub issued: u64,
    /// The last request (idle lifetime).
    pub seen: u64,
    /// The form token (random per session).
    pub csrf: String,
}

/// A sign-in in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignIn {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    /// A local path (`/…`) to return to.
    pub back: String,
    /// Asked with `max_age`: the new `auth_time` must be fresh.
    pub reauth: bool,
    pub started: u64,
}

/// Names and attributes, fixed by whether the portal is reached over HTTPS.
#[derive(Debug, Clone)]
pub struct Jar {
    secure: bool,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Jar {
    pub fn new(secure: bool) -> Self {
        Jar { secure }
    }

    fn name(&self, base: &str) -> String {
        if self.secure {
            format!("__Host-{base}")
        } else {
            base.to_owned()
        }
    }

    pub fn session_name(&self) -> String {
        self.name("imapgate-session")
    }

    pub fn signin_name(&self) -> String {
        self.name("imapgate-signin")
    }

    pub fn lang_name(&self) -> String {
        self.name("imapgate-lang")
    }

    /// A `Set-Cookie` value; `max_age` zero deletes the cookie.
    pub fn set(&self, name: &str, value: &str, max_age: Duration, http_only: bool) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let http_only = if http_only { "; HttpOnly" } else { "" };
        let v = format!(
            "{name}={value}; Path=/; Max-Age={}; SameSite=Lax{secure}{http_only}",
            max_age.as_secs()
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    pub fn clear(&self, name: &str) -> HeaderValue {
        self.set(name, "", Duration::ZERO, true)
    }
}

/// The value of cookie `name` in the request (the first one; later duplicates are ignored).
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| v.len() <= MAX_COOKIE)
}

fn seal<T: Serialize>(ring: &KeyRing, aad: &str, value: &T) -> Option<String> {
    let json = serde_json::to_vec(value).ok()?;
    ring.encrypt(aad, &Secret::new(json)).ok()
}

fn open<T: for<'de> Deserialize<'de>>(ring: &KeyRing, aad: &str, sealed: &str) -> Option<T> {
    let plain = ring.decrypt(aad, sealed).ok()?;
    serde_json::from_slice(plain.expose()).ok()
}

impl Session {
    pub fn seal(&self, ring: &KeyRing) -> Option<String> {
        seal(ring, SESSION_AAD, self)
    }

    /// Opens a session cookie; `None` when it is forged, from an unknown key, or past its idle
    /// or absolute lifetime.
    pub fn open(ring: &KeyRing, sealed: &str, idle: Duration, max: Duration) -> Option<Self> {
        let s: Session = open(ring, SESSION_AAD, sealed)?;
        let now = now();
        let fresh = now.saturating_sub(s.seen) <= idle.as_secs()
            && now.saturating_sub(s.issued) <= max.as_secs()
            && s.issued <= now + 60;
        fresh.then_some(s)
    }
}

impl SignIn {
    pub fn seal(&self, ring: &KeyRing) -> Option<String> {
        seal(ring, SIGNIN_AAD, self)
    }

    pub fn open(ring: &KeyRing, sealed: &str) -> Option<Self> {
        let s: SignIn = open(ring, SIGNIN_AAD, sealed)?;
        (now().saturating_sub(s.started) <= SIGNIN_TTL.as_secs()).then_some(s)
    }
}

/// A local path to come back to: `/` and then letters, digits and `/-_.` only (no `//`, no
/// scheme, no query), so a sign-in can never be turned into an open redirect.
pub fn safe_back(path: &str) -> String {
    let ok = path.starts_with('/')
        && !path.starts_with("//")
        && path.len() <= 200
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.@%".contains(&b));
    if ok {
        path.to_owned()
    } else {
        "/".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(
            vec![("k1".into(), Secret::new(vec![7u8; 32]))],
            Some("k1".into()),
        )
    }

    fn session(seen: u64, issued: u64) -> Session {
        Session {
            user: "alice@example.org".into(),
            admin: false,
            auth_time: issued,
            issued,
            seen,
            csrf: "t".into(),
        }
    }

    #[test]
    fn a_session_opens_only_sealed_by_the_ring_and_within_its_lifetimes() {
        let r = ring();
        let idle = Duration::from_secs(600);
        let max = Duration::from_secs(3600);
        let n = now();
        let sealed = session(n, n).seal(&r).unwrap_or_default();
        assert_eq!(Session::open(&r, &sealed, idle, max), Some(session(n, n)));
        // Idle too long, or too old in all.
        let idle_out = session(n - 601, n - 700).seal(&r).unwrap_or_default();
        assert_eq!(Session::open(&r, &idle_out, idle, max), None);
        let too_old = session(n, n - 3601).seal(&r).unwrap_or_default();
        assert_eq!(Session::open(&r, &too_old, idle, max), None);
        // Another key, a flipped byte, or a sign-in cookie passed off as a session.
        let other = KeyRing::new(
            vec![("k1".into(), Secret::new(vec![8u8; 32]))],
            Some("k1".into()),
        );
        assert_eq!(Session::open(&other, &sealed, idle, max), None);
        let mut bytes = sealed.clone().into_bytes();
        if let Some(b) = bytes.last_mut() {
            *b = if *b == b'A' { b'B' } else { b'A' };
        }
        let flipped = String::from_utf8(bytes).unwrap_or_default();
        assert_eq!(Session::open(&r, &flipped, idle, max), None);
        let signin = SignIn {
            state: "s".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            back: "/".into(),
            reauth: false,
            started: n,
        }
        .seal(&r)
        .unwrap_or_default();
        assert_eq!(Session::open(&r, &signin, idle, max), None);
        assert!(SignIn::open(&r, &signin).is_some());
        assert!(SignIn::open(&r, &sealed).is_none());
    }

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(safe_back("/totp"), "/totp");
        assert_eq!(
            safe_back("/admin/users/a%40b.org"),
            "/admin/users/a%40b.org"
        );
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/x?y=1",
            "totp",
            "/\\evil",
        ] {
            assert_eq!(safe_back(bad), "/", "{bad}");
        }
    }

    #[test]
    fn cookies_are_host_only_secure_http_only_and_lax() {
        let j = Jar::new(true);
        assert_eq!(j.session_name(), "__Host-imapgate-session");
        let v = j.set(&j.session_name(), "x", Duration::from_secs(60), true);
        let v = v.to_str().unwrap_or_default();
        for part in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=60"] {
            assert!(v.contains(part), "{v}");
        }
        assert!(!v.contains("Domain"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-imapgate-session=v; b=2"),
        );
        assert_eq!(get(&h, "__Host-imapgate-session"), Some("v"));
        assert_eq!(get(&h, "imapgate-session"), None);
    }
}
