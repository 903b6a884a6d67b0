//! The config files: the documented example loads (with its paths pointed at real files), and
//! each invalid fixture fails with the YAML path it names on its first line; `check-config`
//! prints every problem and exits 64.

use std::path::Path;
use std::process::Command;

use imapgate::config::Config;

use crate::harness::Pki;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_example_config_documents_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("etc");
    std::fs::create_dir_all(root.join("tls")).unwrap();
    let pki = Pki::new(&root.join("pki"));
    let (c, k) = pki.issue("tls", &["mail.example.org"]);
    std::fs::copy(c, root.join("tls/tls.crt")).unwrap();
    std::fs::copy(k, root.join("tls/tls.key")).unwrap();
    std::fs::copy(&pki.ca_pem, root.join("backend-ca.pem")).unwrap();
    std::fs::write(root.join("master.secret"), "s3cret\n").unwrap();
    let text = std::fs::read_to_string(manifest().join("config/imapgate.example.yaml")).unwrap();
    let text = text.replace("/etc/imapgate/", &format!("{}/", root.display()));
    let cfg = Config::from_yaml(&text, dir.path())
        .unwrap_or_else(|e| panic!("example config invalid: {e}"));
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.limits.line_bytes, 8 * 1024);
    assert_eq!(cfg.limits.sasl_bytes, 24 * 1024);
    assert_eq!(cfg.limits.relay_idle_timeout.as_secs(), 31 * 60);
    assert_eq!(cfg.backends[0].master_password.expose(), b"s3cret");
    assert_eq!(cfg.route("someone@example.org").unwrap().name, "dovecot");
    // check-config agrees.
    let p = dir.path().join("example.yaml");
    std::fs::write(&p, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["check-config", "-c"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_fixtures_fail_with_their_path() {
    let dir = manifest().join("tests/fixtures/invalid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .take_while(|l| l.starts_with("# expect: "))
            .map(|l| l.trim_start_matches("# expect: ").trim())
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let err = Config::from_yaml(&text, &dir).expect_err(&format!("{} loaded", path.display()));
        let paths: Vec<&str> = err.field_errors().iter().map(|e| e.path.as_str()).collect();
        for want in &expected {
            assert!(
                paths.contains(want),
                "{}: expected an error at {want}, got {:?}",
                path.display(),
                err.field_errors()
            );
        }
        n += 1;
    }
    assert!(n >= 5, "too few fixtures");
}

#[test]
fn check_config_lists_every_problem_and_exits_64() {
    let p = manifest().join("tests/fixtures/invalid/many-errors.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["check-config", "-c"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "listeners[0].address",
        "limits.preauth_idle_timeout",
        "backends[0].tls",
        "routes.default",
    ] {
        assert!(err.contains(want), "{want} missing from:\n{err}");
    }
}
