//! SASL PLAIN (RFC 4616), after base64: `authzid NUL authcid NUL passwd`.
#![no_main]

use imapgate::auth::sasl::decode_plain;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    if let Ok(p) = decode_plain(msg) {
        // What is accepted is exactly what the RFC allows, and nothing is invented.
        assert!(!p.user.is_empty() && !p.password.is_empty());
        assert!(!p.user.contains('\0') && !p.password.expose().contains(&0));
        let mut parts = msg.split(|b| *b == 0);
        let authzid = parts.next().unwrap();
        assert!(
            authzid.is_empty() || authzid == p.user.as_bytes(),
            "authzid != authcid accepted"
        );
        assert_eq!(parts.next().unwrap(), p.user.as_bytes());
        assert_eq!(parts.next().unwrap(), p.password.expose());
        assert!(parts.next().is_none());
    }
});
