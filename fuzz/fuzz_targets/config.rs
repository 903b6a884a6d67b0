//! The configuration (YAML) through validation: never a panic, and every refusal names a field.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use imapgate::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

/// An empty directory for relative paths, so the loader reads no file the fuzzer did not name.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("imapgate-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > 64 * 1024 {
        return;
    }
    match Config::from_yaml(text, base()) {
        Ok(_) => {}
        Err(ConfigError::Invalid(errors)) => assert!(!errors.is_empty()),
        Err(_) => {}
    }
});
