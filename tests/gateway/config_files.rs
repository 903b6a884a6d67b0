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

/// Writes a secret file as an operator should: mode 0600 (others may not read it).
fn write_secret(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path.as_ref(), contents).unwrap();
    std::fs::set_permissions(path.as_ref(), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The example config with its /etc/imapgate paths moved to `dir`/etc, which then holds a file
/// for each of them (certificates, CA, master password, OAuth client secret, key ring).
fn example_config_in(dir: &Path) -> String {
    let root = dir.join("etc");
    std::fs::create_dir_all(root.join("tls")).unwrap();
    let pki = Pki::new(&root.join("pki"));
    let (c, k) = pki.issue("tls", &["mail.example.org"]);
    std::fs::copy(c, root.join("tls/tls.crt")).unwrap();
    std::fs::copy(k, root.join("tls/tls.key")).unwrap();
    std::fs::copy(&pki.ca_pem, root.join("backend-ca.pem")).unwrap();
    write_secret(root.join("master.secret"), "s3cret\n");
    std::fs::create_dir_all(root.join("oauth")).unwrap();
    write_secret(root.join("oauth/corp.secret"), "client-secret\n");
    std::fs::create_dir_all(root.join("portal")).unwrap();
    write_secret(root.join("portal/oidc.secret"), "portal-client-secret\n");
    std::fs::create_dir_all(root.join("keys")).unwrap();
    write_secret(
        root.join("keys/k1.key"),
        imapgate::auth::keyring::generate_key().expose(),
    );
    let text = std::fs::read_to_string(manifest().join("config/imapgate.example.yaml")).unwrap();
    text.replace("/etc/imapgate/", &format!("{}/", root.display()))
}

#[test]
fn the_example_config_documents_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = example_config_in(dir.path());
    let cfg = Config::from_yaml(&text, dir.path())
        .unwrap_or_else(|e| panic!("example config invalid: {e}"));
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.limits.line_bytes, 8 * 1024);
    assert_eq!(cfg.limits.sasl_bytes, 24 * 1024);
    assert_eq!(cfg.limits.relay_idle_timeout.as_secs(), 31 * 60);
    assert_eq!(cfg.backends[0].master_password.expose(), b"s3cret");
    assert_eq!(
        cfg.route(imapgate::config::Protocol::Imap, "someone@example.org")
            .unwrap()
            .name,
        "dovecot"
    );
    assert_eq!(cfg.auth.mfa.default, imapgate::config::MfaMode::Required);
    assert_eq!(cfg.auth.mfa.unlock_ttl.as_secs(), 12 * 3600);
    assert_eq!(cfg.auth.active_key.as_deref(), Some("k1"));
    assert_eq!(cfg.auth.max_app_passwords_per_user, 20);
    assert!(!cfg.auth.allow_group_readable_secrets);
    let portal = cfg
        .portal
        .as_ref()
        .expect("the example documents the portal");
    assert_eq!(portal.reauth_after.as_secs(), 600);
    assert_eq!(portal.oidc.scopes, ["openid", "email", "profile"]);
    assert_eq!(portal.mail.imap_port, 993);
    // The guard values the example documents are the defaults the code applies.
    let d = imapgate::config::GuardConfig::default();
    let g = &cfg.guard;
    assert_eq!(
        (
            g.per_ip,
            g.per_subnet,
            g.per_account,
            g.per_token_ip,
            g.spray
        ),
        (
            d.per_ip,
            d.per_subnet,
            d.per_account,
            d.per_token_ip,
            d.spray
        )
    );
    assert_eq!(
        (g.tarpit_start, g.tarpit_max, g.known_good_ttl, g.block_for),
        (d.tarpit_start, d.tarpit_max, d.known_good_ttl, d.block_for)
    );
    assert_eq!(
        (g.subnet_v4, g.subnet_v6, g.max_delayed_per_ip, g.enforce),
        (d.subnet_v4, d.subnet_v6, d.max_delayed_per_ip, d.enforce)
    );
    assert_eq!(cfg.state.max_entries, 500_000);
    // The users file, and the store's documented values are the defaults the code applies.
    let store = &cfg.auth.store;
    assert_eq!(store.backend, imapgate::config::StoreBackend::File);
    assert_eq!(store.on_error, imapgate::config::StoreOnError::default());
    assert_eq!(
        (store.cache_ttl.as_secs(), store.poll_interval.as_secs()),
        (60, 1)
    );
    assert!(cfg.auth.revoke_closes_sessions);
    let issuer = &cfg.auth.oauth_issuers[0];
    assert_eq!(issuer.audiences, vec!["imap".to_owned()]);
    // The documented OAuth defaults: email_verified required, any domain, ASCII names.
    assert!(issuer.require_email_verified && issuer.domains.is_empty());
    assert!(!cfg.auth.unicode_names);
    assert!(issuer.jwks_uri.is_none(), "discovery by default");
    assert_eq!(
        issuer
            .introspection
            .as_ref()
            .unwrap()
            .client_secret
            .expose(),
        b"client-secret"
    );
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

/// The example's commented entry for `block` (`sqlite` or `postgres`) under auth.store,
/// uncommented, with that backend chosen and the users file left out.
fn example_with_store(text: &str, block: &str) -> String {
    let start = format!("    # {block}:");
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line == start {
            inside = true;
        } else if inside && !line.starts_with("    #   ") && !line.starts_with("    #         ") {
            inside = false;
        }
        if line.starts_with("  users_file:")
            || line.trim_start().starts_with("# (store.backend file only")
        {
            continue;
        }
        match line {
            l if inside => out.push(l.replacen("    # ", "    ", 1)),
            l if l.starts_with("    backend: file ") => {
                out.push(l.replacen("backend: file", &format!("backend: {block}"), 1))
            }
            l => out.push(l.to_owned()),
        }
    }
    out.join("\n")
}

#[test]
fn the_example_config_documents_the_database_stores() {
    let dir = tempfile::tempdir().unwrap();
    let text = example_config_in(dir.path());
    let etc = dir.path().join("etc");

    // SQLite: the documented path is the default one.
    let sqlite = example_with_store(&text, "sqlite");
    assert!(
        sqlite.contains("    sqlite:\n      path: /var/lib/imapgate/imapgate.db"),
        "{sqlite}"
    );
    let cfg = Config::from_yaml(&sqlite, dir.path())
        .unwrap_or_else(|e| panic!("the example's sqlite store is invalid: {e}\n{sqlite}"));
    assert_eq!(
        cfg.auth.store.backend,
        imapgate::config::StoreBackend::Sqlite
    );
    assert_eq!(
        cfg.auth.store.sqlite_path,
        Path::new("/var/lib/imapgate/imapgate.db")
    );

    // PostgreSQL: the URL from a file, TLS with the CA, the documented pool and timeout.
    write_secret(
        etc.join("postgres.url"),
        "postgres://imapgate:pw@db.example.org:5432/imapgate\n",
    );
    std::fs::copy(etc.join("backend-ca.pem"), etc.join("postgres-ca.pem")).unwrap();
    let postgres = example_with_store(&text, "postgres");
    let cfg = Config::from_yaml(&postgres, dir.path())
        .unwrap_or_else(|e| panic!("the example's postgres store is invalid: {e}\n{postgres}"));
    assert_eq!(
        cfg.auth.store.backend,
        imapgate::config::StoreBackend::Postgres
    );
    let pg = cfg.auth.store.postgres.as_ref().unwrap();
    assert_eq!(
        pg.ca_file.as_deref(),
        Some(etc.join("postgres-ca.pem").as_path())
    );
    assert_eq!((pg.pool_size, pg.statement_timeout.as_secs()), (8, 5));
    assert_eq!(
        pg.url.expose(),
        b"postgres://imapgate:pw@db.example.org:5432/imapgate"
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

/// What the YAML parser (serde-saphyr) refuses before validation sees the file: a key given
/// twice (never "the last one wins"), an alias bomb, nesting past its depth budget. Each is
/// one line at `(file)` naming the line, and the bomb is refused in bounded time.
#[test]
fn hostile_or_ambiguous_yaml_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |text: &str, want: &str| {
        let err = Config::from_yaml(text, dir.path()).expect_err("loaded");
        let errors = err.field_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.path, "(file)");
        assert!(!e.message.contains('\n'), "{:?}", e.message);
        assert!(e.message.contains(want), "{want:?} not in {:?}", e.message);
    };
    refused(
        "admin: { address: \"127.0.0.1:9190\" }\nadmin: { address: \"0.0.0.0:9190\" }\n",
        "duplicate mapping key: admin",
    );
    refused(
        "listeners:\n  - name: a\n    address: \"127.0.0.1:993\"\n    address: \"0.0.0.0:993\"\n",
        "line 4",
    );
    let mut bomb = String::from("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n");
    for i in 1..8 {
        let aliases = vec![format!("*x{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("x{i}: &x{i} [{aliases}]\n"));
    }
    let t = std::time::Instant::now();
    refused(&bomb, "budget");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    refused(
        &format!("listeners: {}{}\n", "[".repeat(200), "]".repeat(200)),
        "budget",
    );
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

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(args)
        .env_remove("IMAPGATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration for the CLI in `dir`, with key `k1` (mode 0600) and `auth_extra` in its
/// `auth` mapping (e.g. `users_file: users.yaml`).
fn admin_config(dir: &Path, auth_extra: &str) -> std::path::PathBuf {
    write_secret(
        dir.join("k1.key"),
        imapgate::auth::keyring::generate_key().expose(),
    );
    write_secret(dir.join("master.secret"), "x");
    let cfg = dir.join("admin.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{ name: imaps, address: \"127.0.0.1:0\", tls: implicit }}]\ntls: {{ self_signed: true }}\n\
             auth: {{ secret_keys: [{{ id: k1, file: k1.key }}], {auth_extra} }}\n\
             backends: [{{ name: b, address: \"127.0.0.1:9\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }}]\n\
             admin: {{ address: \"127.0.0.1:0\" }}\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn operator_cli_manages_users_and_app_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.yaml");
    let u = users.to_str().unwrap();
    assert!(cli(&["users", "add", "Alice@Example.org", "--users-file", u]).0);
    assert!(
        !cli(&["users", "add", "alice@example.org", "--users-file", u]).0,
        "duplicate accepted"
    );
    assert!(!cli(&["users", "add", "bad\nname@example.org", "--users-file", u]).0);
    // A new app password gets a lookup index, which needs the key ring: --users-file alone
    // is not enough, a configuration supplies the ring (and --users-file still names the file).
    let (ok, _, stderr) = cli(&[
        "app-password",
        "create",
        "alice@example.org",
        "--users-file",
        u,
    ]);
    assert!(!ok && stderr.contains("key ring"), "{stderr}");
    let c = admin_config(dir.path(), "users_file: elsewhere.yaml");
    let c = c.to_str().unwrap();
    let (ok, stdout, stderr) = cli(&[
        "app-password",
        "create",
        "alice@example.org",
        "--label",
        "laptop",
        "--users-file",
        u,
        "-c",
        c,
    ]);
    assert!(ok, "{stderr}");
    assert!(!dir.path().join("elsewhere.yaml").exists());
    let pw = stdout.trim_end();
    let groups: Vec<&str> = pw.split(' ').collect();
    assert_eq!(groups.len(), 4, "{pw:?}");
    assert!(
        groups
            .iter()
            .all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_lowercase())),
        "{pw:?}"
    );
    // The file holds a hash, never the password; mode 0600.
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        text.contains("$argon2id$") && !text.contains(&pw.replace(' ', "")) && !text.contains(pw)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&users).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let file = imapgate::auth::users::UsersFile::load(&users).unwrap();
    let ap = &file.users["alice@example.org"].app_passwords[0];
    let secret = imapgate::secret::Secret::from_slice(pw.replace(' ', "").as_bytes());
    assert!(imapgate::auth::app_password::verify(&secret, &ap.hash));
    // list shows ids and labels, never hashes; revoke and disable work.
    let (ok, listing, _) = cli(&[
        "app-password",
        "list",
        "alice@example.org",
        "--users-file",
        u,
    ]);
    assert!(
        ok && listing.contains(&ap.id)
            && listing.contains("laptop")
            && listing.contains("active")
            && !listing.contains("argon2")
    );
    assert!(
        cli(&[
            "app-password",
            "revoke",
            "alice@example.org",
            &ap.id,
            "--users-file",
            u
        ])
        .0
    );
    assert!(
        !cli(&[
            "app-password",
            "create",
            "alice@example.org",
            "--expires-in",
            "soon",
            "--users-file",
            u,
            "-c",
            c
        ])
        .0
    );
    let (ok, _, err) = cli(&[
        "app-password",
        "create",
        "alice@example.org",
        "--expires-in",
        "90d",
        "--users-file",
        u,
        "-c",
        c,
    ]);
    assert!(ok, "{err}");
    let file = imapgate::auth::users::UsersFile::load(&users).unwrap();
    let exp = file.users["alice@example.org"].app_passwords[1]
        .expires
        .unwrap();
    let days = (exp - time::OffsetDateTime::now_utc()).whole_days();
    assert!((89..=90).contains(&days), "{days}");
    assert!(cli(&[
        "app-password",
        "list",
        "alice@example.org",
        "--users-file",
        u
    ])
    .1
    .contains("revoked"));
    assert!(cli(&["users", "disable", "alice@example.org", "--users-file", u]).0);
    assert!(cli(&["users", "list", "--users-file", u])
        .1
        .contains("alice@example.org\tdisabled"));
    assert!(cli(&["users", "remove", "alice@example.org", "--users-file", u]).0);
    assert!(!cli(&["users", "list", "--users-file", u])
        .1
        .contains("alice"));
}

#[test]
fn users_whose_name_holds_the_master_separator_are_refused_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path().join("master.secret"), "x");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "listeners: [{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }]\ntls: { self_signed: true }\n\
         auth: { users_file: users.yaml }\n\
         backends: [{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (ok, _, err) = cli(&["users", "add", "a*b@example.org", "-c", c]);
    assert!(!ok && err.contains("master separator"), "{err}");
    assert!(cli(&["users", "add", "ab@example.org", "-c", c]).0);
}

#[test]
fn keys_rotate_reencrypts_every_totp_secret() {
    use imapgate::auth::keyring::{generate_key, KeyRing};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k1, k2) = (generate_key(), generate_key());
    write_secret(d.join("k1.key"), k1.expose());
    write_secret(d.join("k2.key"), k2.expose());
    write_secret(d.join("master.secret"), "x");
    let base = "listeners: [{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }]\ntls: { self_signed: true }\n\
                backends: [{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }]\n";
    let one = d.join("one.yaml");
    std::fs::write(
        &one,
        format!(
            "{base}auth: {{ users_file: users.yaml, secret_keys: [{{ id: k1, file: k1.key }}] }}\n"
        ),
    )
    .unwrap();
    let two = d.join("two.yaml");
    std::fs::write(
        &two,
        format!("{base}auth: {{ users_file: users.yaml, secret_keys: [{{ id: k1, file: k1.key }}, {{ id: k2, file: k2.key }}], active_key: k2 }}\n"),
    )
    .unwrap();
    let c1 = one.to_str().unwrap();
    assert!(cli(&["users", "add", "a@example.org", "-c", c1]).0);
    assert!(cli(&["users", "add", "b@example.org", "-c", c1]).0);
    let (ok, uri, err) = cli(&["totp", "enroll", "a@example.org", "--no-verify", "-c", c1]);
    assert!(ok, "{err}");
    assert!(
        !cli(&["totp", "enroll", "a@example.org", "--no-verify", "-c", c1]).0,
        "enrolled twice without --force"
    );
    let users = imapgate::auth::users::UsersFile::load(&d.join("users.yaml")).unwrap();
    assert!(users.users["a@example.org"]
        .totp
        .as_deref()
        .unwrap()
        .starts_with("k1:"));
    let (ok, _, err) = cli(&["keys", "rotate", "-c", two.to_str().unwrap()]);
    assert!(ok && err.contains("re-encrypted 1"), "{err}");
    let users = imapgate::auth::users::UsersFile::load(&d.join("users.yaml")).unwrap();
    let stored = users.users["a@example.org"].totp.clone().unwrap();
    assert!(stored.starts_with("k2:"), "{stored}");
    // Same secret as the URI shows, now under k2 only.
    use base64::Engine;
    let raw2 = base64::engine::general_purpose::STANDARD
        .decode(k2.expose())
        .unwrap();
    let ring = KeyRing::new(
        vec![("k2".into(), imapgate::secret::Secret::new(raw2))],
        Some("k2".into()),
    );
    let secret = ring.decrypt("a@example.org", &stored).unwrap();
    assert!(
        uri.contains(&format!(
            "secret={}&",
            imapgate::auth::totp::base32(&secret)
        )),
        "{uri}"
    );
    // show never prints the secret.
    let (_, shown, _) = cli(&["users", "show", "a@example.org", "-c", c1]);
    assert!(
        shown.contains("totp: enrolled (key k2)") && !shown.contains(&stored),
        "{shown}"
    );
    assert!(cli(&["totp", "reset", "a@example.org", "-c", c1]).0);
    assert!(cli(&["users", "show", "a@example.org", "-c", c1])
        .1
        .contains("totp: not enrolled"));
    // `keys generate` makes a usable key.
    let (ok, key, _) = cli(&["keys", "generate"]);
    assert!(
        ok && base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .unwrap()
            .len()
            == 32
    );
}

#[test]
fn totp_enroll_saves_only_after_a_valid_first_code() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_secret(
        d.join("k1.key"),
        imapgate::auth::keyring::generate_key().expose(),
    );
    write_secret(d.join("master.secret"), "x");
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        "listeners: [{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }]\ntls: { self_signed: true }\n\
         auth: { users_file: users.yaml, secret_keys: [{ id: k1, file: k1.key }] }\n\
         backends: [{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    assert!(cli(&["users", "add", "a@example.org", "-c", c]).0);
    // A wrong first code: nothing saved.
    let enroll = |answer: Box<dyn Fn(&str) -> String>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(["totp", "enroll", "a@example.org", "-c", c])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut uri = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut uri)
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer(uri.trim()).as_bytes())
            .unwrap();
        child.wait().unwrap().success()
    };
    assert!(
        !enroll(Box::new(|_| "000000\n".into())),
        "a wrong first code was accepted"
    );
    let users = std::fs::read_to_string(d.join("users.yaml")).unwrap();
    assert!(
        !users.contains("totp: "),
        "saved after a wrong code:\n{users}"
    );
    // The right code (computed from the URI it printed): saved.
    let ok = enroll(Box::new(|uri: &str| {
        let b32 = uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let secret = crate::mfa::base32_decode(b32);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        imapgate::auth::totp::code_at(&imapgate::secret::Secret::new(secret), now, 6).unwrap()
            + "\n"
    }));
    assert!(ok);
    assert!(std::fs::read_to_string(d.join("users.yaml"))
        .unwrap()
        .contains("totp: k1:"));
}

/// Operator actions leave audit lines in the configured audit file (the same JSON shape as
/// the gateway's), naming the user and the credential id, never a secret.
#[test]
fn operator_actions_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_secret(d.join("master.secret"), "x");
    write_secret(
        d.join("k1.key"),
        imapgate::auth::keyring::generate_key().expose(),
    );
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        "listeners: [{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }]\ntls: { self_signed: true }\n\
         auth: { users_file: users.yaml, secret_keys: [{ id: k1, file: k1.key }] }\n\
         logging: { audit: audit.log }\n\
         backends: [{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    assert!(cli(&["users", "add", "op@example.org", "-c", c]).0);
    let (ok, pw, err) = cli(&["app-password", "create", "op@example.org", "-c", c]);
    assert!(ok, "{err}");
    let (ok, uri, err) = cli(&["totp", "enroll", "op@example.org", "--no-verify", "-c", c]);
    assert!(ok, "{err}");
    let file = imapgate::auth::users::UsersFile::load(&d.join("users.yaml")).unwrap();
    let id = file.users["op@example.org"].app_passwords[0].id.clone();
    assert!(cli(&["app-password", "revoke", "op@example.org", &id, "-c", c]).0);
    assert!(cli(&["totp", "reset", "op@example.org", "-c", c]).0);
    assert!(cli(&["users", "disable", "op@example.org", "-c", c]).0);
    // A refused change is not audited.
    assert!(!cli(&["users", "remove", "nobody@example.org", "-c", c]).0);
    assert!(cli(&["users", "remove", "op@example.org", "-c", c]).0);

    let text = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "user_added",
            "app_password_created",
            "totp_enrolled",
            "app_password_revoked",
            "totp_reset",
            "user_disabled",
            "user_removed"
        ]
    );
    for l in &lines {
        assert_eq!(l["event"], "operator");
        assert_eq!(l["target"], "imapgate::audit");
        assert_eq!(l["user"], "op@example.org");
    }
    assert_eq!(lines[1]["credential"], id.as_str());
    assert_eq!(lines[3]["credential"], id.as_str());
    // The new app password and the TOTP secret are nowhere in the audit file.
    let pw = pw.trim();
    assert!(!text.contains(pw) && !text.contains(&pw.replace(' ', "")));
    let secret = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert!(!text.contains(secret));
}

#[test]
fn app_passwords_are_created_with_an_index_and_capped_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = admin_config(d, "users_file: users.yaml, max_app_passwords_per_user: 2");
    let c = c.to_str().unwrap();
    let users = d.join("users.yaml");
    assert!(cli(&["users", "add", "a@example.org", "-c", c]).0);
    for _ in 0..2 {
        let (ok, _, err) = cli(&["app-password", "create", "a@example.org", "-c", c]);
        assert!(ok, "{err}");
    }
    let (ok, out, err) = cli(&["app-password", "create", "a@example.org", "-c", c]);
    assert!(
        !ok && out.is_empty() && err.contains("already has 2 active app passwords"),
        "{err}"
    );
    let file = imapgate::auth::users::UsersFile::load(&users).unwrap();
    let aps = &file.users["a@example.org"].app_passwords;
    assert_eq!(aps.len(), 2, "the refused one was written");
    assert!(aps
        .iter()
        .all(|a| a.lookup.as_deref().is_some_and(|l| l.starts_with("k1:"))));
    assert!(!cli(&["users", "list", "-c", c]).1.contains("without-index"));
    // A revoked one no longer counts.
    assert!(
        cli(&[
            "app-password",
            "revoke",
            "a@example.org",
            &aps[0].id,
            "-c",
            c
        ])
        .0
    );
    assert!(cli(&["app-password", "create", "a@example.org", "-c", c]).0);
    // `users list` names app passwords from before indexes existed.
    let mut file = imapgate::auth::users::UsersFile::load(&users).unwrap();
    file.users.get_mut("a@example.org").unwrap().app_passwords[1].lookup = None;
    file.save(&users).unwrap();
    let (ok, out, err) = cli(&["users", "list", "-c", c]);
    assert!(
        ok && out.contains("app-passwords=2\twithout-index=1"),
        "{out}"
    );
    assert!(err.contains("no usable lookup index"), "{err}");
    let (_, out, _) = cli(&["doctor", "-c", c]);
    assert!(
        out.contains("[warn] users file")
            && out.contains("1 active app password(s) have no usable lookup index"),
        "{out}"
    );
    // No key ring in the configuration: refused, with what to do.
    std::fs::write(
        d.join("nokeys.yaml"),
        "listeners: [{ name: imaps, address: \"127.0.0.1:0\", tls: implicit }]\ntls: { self_signed: true }\n\
         auth: { users_file: users.yaml, mfa: { default: off } }\n\
         backends: [{ name: b, address: \"127.0.0.1:9\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }]\n",
    )
    .unwrap();
    let n = d.join("nokeys.yaml");
    let (ok, _, err) = cli(&[
        "app-password",
        "create",
        "a@example.org",
        "-c",
        n.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("auth.secret_keys is empty"), "{err}");
}

/// Runs `imapgate run -c CONFIG` for at most 10 s; its exit code (None: still running, killed)
/// and stderr.
fn run_briefly(cfg: &Path) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "-c"])
        .arg(cfg)
        .env_remove("IMAPGATE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code, err)
}

#[test]
fn secret_files_others_can_read_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = admin_config(d, "users_file: users.yaml, mfa: { default: off }");
    let c = cfg.to_str().unwrap();
    assert!(cli(&["users", "add", "a@example.org", "-c", c]).0);
    let mode = |f: &str, m: u32| {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(m)).unwrap()
    };
    let key = d.join("k1.key").display().to_string();
    // A key file every user can read: check-config and run both refuse it, naming the fix.
    mode("k1.key", 0o644);
    let (ok, _, err) = cli(&["check-config", "-c", c]);
    assert!(!ok, "accepted");
    assert!(
        err.contains("auth.secret_keys[0].file") && err.contains(&format!("chmod 600 {key}")),
        "{err}"
    );
    let (code, err) = run_briefly(&cfg);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains(&format!("chmod 600 {key}")), "{err}");
    // Readable by its group: refused too, unless the configuration allows it (a warning).
    mode("k1.key", 0o640);
    assert!(!cli(&["check-config", "-c", c]).0);
    mode("k1.key", 0o600);
    mode("master.secret", 0o640);
    let (ok, _, err) = cli(&["check-config", "-c", c]);
    assert!(
        !ok && err.contains("backends[0].master_password_file"),
        "{err}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("auth: {", "auth: { allow_group_readable_secrets: true,"),
    )
    .unwrap();
    let (ok, _, err) = cli(&["check-config", "-c", c]);
    assert!(
        ok && err.contains("warning:") && err.contains("readable by its group"),
        "{err}"
    );
    // The users file: the gateway refuses to start with one others can read.
    mode("master.secret", 0o600);
    mode("users.yaml", 0o644);
    let users = d.join("users.yaml").display().to_string();
    let (code, err) = run_briefly(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("auth.users_file") && err.contains(&format!("chmod 600 {users}")),
        "{err}"
    );
}

#[tokio::test]
async fn secret_files_others_can_read_are_not_reloaded() {
    use std::os::unix::fs::PermissionsExt;
    let Some(t) = crate::harness::TestGateway::start().await else {
        return;
    };
    let user = "alice@example.org";
    let ok = |r: &str| r.starts_with("a OK");
    assert!(ok(&t
        .login_from("127.0.0.1", user, &t.password(user))
        .await));
    // The file changes (alice disabled) and becomes readable by every user.
    let mut file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    file.users.get_mut(user).unwrap().disabled = true;
    file.save(&t.users_file).unwrap();
    std::fs::set_permissions(&t.users_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    t.gw.reload();
    let errors = t
        .metric("imapgate_users_reloads_total", &["result=\"error\""])
        .await;
    assert!(errors >= 1.0, "no reload error counted");
    // The previous file stays in force.
    assert!(ok(&t
        .login_from("127.0.0.1", user, &t.password(user))
        .await));
    std::fs::set_permissions(&t.users_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    t.gw.reload();
    assert!(!ok(&t
        .login_from("127.0.0.1", user, &t.password(user))
        .await));
    // A key file of the configuration that everyone can read: the configuration reload is
    // refused (and counted); what was loaded stays in force.
    let refused = "result=\"error\"";
    let before = t.metric("imapgate_config_reloads_total", &[refused]).await;
    let key = t.dir.path().join("k1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    t.gw.reload();
    let after = t.metric("imapgate_config_reloads_total", &[refused]).await;
    assert_eq!(
        after - before,
        1.0,
        "the configuration reload was not refused"
    );
    let bob = "bob@example.org";
    assert!(ok(&t.login_from("127.0.0.1", bob, &t.password(bob)).await));
}

#[test]
fn the_cli_says_so_when_the_users_file_or_its_directory_is_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let users = d.join("users.yaml");
    let u = users.to_str().unwrap();
    assert!(cli(&["users", "add", "a@example.org", "--users-file", u]).0);
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    if root && !crate::harness::have("setpriv") {
        return;
    }
    // As a user who may not write there: root drops to nobody, anyone else loses the mode.
    let as_other = |args: &[&str]| {
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_imapgate"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_imapgate"))
        };
        let out = cmd
            .args(args)
            .env_remove("IMAPGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let before = std::fs::read(&users).unwrap();
    // The file itself cannot be written.
    if !root {
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let (code, err) = as_other(&["users", "disable", "a@example.org", "--users-file", u]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot write {u}")) && err.contains("read-only for this user"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The file can be written, its directory cannot.
    if root {
        std::os::unix::fs::chown(&users, Some(65534), Some(65534)).unwrap();
        std::fs::remove_file(d.join(".users.yaml.lock")).unwrap();
    } else {
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let (code, err) = as_other(&["users", "disable", "a@example.org", "--users-file", u]);
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("read-only for this user"), "{err}");
    assert_eq!(std::fs::read(&users).unwrap(), before, "the file changed");
}
