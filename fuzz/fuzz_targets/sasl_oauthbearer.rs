//! SASL OAUTHBEARER (RFC 7628), after base64:
//! `n,a=<user>,^Ahost=…^Aport=…^Aauth=Bearer <token>^A^A`.
#![no_main]

use imapgate::auth::sasl::{decode_oauthbearer, MAX_TOKEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    if let Ok(b) = decode_oauthbearer(msg) {
        if let Some(user) = &b.user {
            // The field separator never leaks into the name (control bytes are refused later,
            // before a log line or a backend: upstream::login::check_user).
            assert!(!user.is_empty() && !user.contains('\x01'));
        }
        let t = b.token.expose();
        assert!(!t.is_empty() && t.len() <= MAX_TOKEN);
        assert!(t
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b)));
        // Channel binding required ("p=") is never accepted: the server cannot do it.
        assert!(!msg.starts_with(b"p="));
    }
});
