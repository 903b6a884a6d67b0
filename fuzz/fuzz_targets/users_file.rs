//! The users file (YAML, operator-written, reloaded live): parsing never panics or hangs.
#![no_main]

use imapgate::auth::users::UsersFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > 64 * 1024 {
        return;
    }
    let _ = UsersFile::parse(text);
});
