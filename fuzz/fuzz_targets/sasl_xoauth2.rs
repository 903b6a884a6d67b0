//! SASL XOAUTH2, after base64: `user=<user>^Aauth=Bearer <token>^A^A`.
#![no_main]

use imapgate::auth::sasl::{decode_xoauth2, MAX_TOKEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    if let Ok(b) = decode_xoauth2(msg) {
        let user = b.user.expect("XOAUTH2 always names a user");
        assert!(!user.is_empty() && !user.contains('\x01'));
        check_token(b.token.expose());
        assert!(msg.ends_with(b"\x01\x01"));
    }
});

/// RFC 6750 b64token: never empty, bounded, no byte that could end a line or a field.
fn check_token(t: &[u8]) {
    assert!(!t.is_empty() && t.len() <= MAX_TOKEN);
    assert!(t
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b)));
}
