//! The credential store's backends (file, SQLite, PostgreSQL): the same records and the same
//! guarantees from each — no lost change when two operators edit one user at once, exports that
//! import unchanged, a first-schema database upgraded in place — and a gateway on a database
//! store: logins, and a revocation made with the CLI ending the live session on every replica.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use imapgate::auth::users::{AppPassword, User, UsersFile};
use imapgate::config::{Config, MfaMode, StoreBackend};
use imapgate::store::{ListQuery, UserStore};
use time::OffsetDateTime;

use crate::harness::{last, Options, TestGateway, TestStore};
use crate::pg::postgres;

const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

fn ap(id: &str, created: i64) -> AppPassword {
    AppPassword {
        id: id.into(),
        label: format!("label {id}"),
        hash: PHC.into(),
        lookup: Some(format!("k1:{}", "0a".repeat(32))),
        created: OffsetDateTime::from_unix_timestamp(created).unwrap(),
        expires: Some(OffsetDateTime::from_unix_timestamp(created + 86400).unwrap()),
        revoked: false,
    }
}

fn sample() -> UsersFile {
    let mut f = UsersFile {
        version: 1,
        users: Default::default(),
    };
    f.users.insert(
        "ann@example.org".into(),
        User {
            disabled: false,
            mfa: Some(MfaMode::Required),
            mechanisms: vec!["plain".into(), "login".into()],
            allowed_networks: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            totp: Some(format!("k1:{}", "QUJD".repeat(20))),
            upstream_user: Some("ann".into()),
            app_passwords: vec![ap("ap_one", 1_700_000_000), ap("ap_two", 1_700_000_100)],
        },
    );
    f.users.insert(
        "ben@example.org".into(),
        User {
            disabled: true,
            ..Default::default()
        },
    );
    f.users.insert("b_n%@example.org".into(), User::default());
    f
}

/// A store of each backend: (name, store). PostgreSQL only when it is installed (required
/// under IMAPGATE_REQUIRE_REAL=1).
async fn stores(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn UserStore>)> {
    let mut out = Vec::new();
    let mut kinds = vec![
        (
            "file",
            format!("  users_file: {}/users.yaml", dir.display()),
        ),
        (
            "sqlite",
            format!(
                "  store: {{ backend: sqlite, sqlite: {{ path: {}/db/imapgate.db }} }}",
                dir.display()
            ),
        ),
    ];
    if let Some(pg) = postgres() {
        let url = dir.join("pg.url");
        crate::harness::write_secret(&url, pg.database());
        kinds.push((
            "postgres",
            format!(
                "  store: {{ backend: postgres, postgres: {{ url_file: {} }} }}",
                url.display()
            ),
        ));
    }
    for (name, auth) in kinds {
        let cfg = config_with(dir, name, &auth);
        out.push((name, imapgate::store::open(&cfg.auth).await.unwrap()));
    }
    out
}

/// A minimal configuration whose `auth` section holds `auth_lines`.
fn config_with(dir: &std::path::Path, tag: &str, auth_lines: &str) -> Config {
    let (cert, key) =
        crate::harness::Pki::new(&dir.join(format!("pki-{tag}"))).issue("gw", &["localhost"]);
    let keyfile = dir.join("k1.key");
    if !keyfile.exists() {
        crate::harness::write_secret(&keyfile, imapgate::auth::keyring::generate_key().expose());
    }
    let yaml = format!(
        "listeners:\n  - {{ name: imaps, address: \"127.0.0.1:0\", tls: implicit }}\n\
         tls:\n  certificates:\n    - {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
         auth:\n{auth_lines}\n  secret_keys: [{{ id: k1, file: \"{}\" }}]\n\
         backends:\n  - {{ name: b, address: \"127.0.0.1:1\", tls: none, login: sasl_authzid, master_user: m, master_password_env: HOME }}\n\
         routes: {{ default: b }}\n",
        cert.display(),
        key.display(),
        keyfile.display()
    );
    let p = dir.join(format!("{tag}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    Config::load(&p).unwrap_or_else(|e| panic!("{tag}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_backend_keeps_the_records_and_every_concurrent_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = sample();
    for (backend, store) in stores(dir.path()).await {
        // Import, then read back exactly what went in.
        let r = store.import(&file, false).await.unwrap();
        assert_eq!((r.added, r.skipped), (3, 0), "{backend}");
        let again = store.import(&file, false).await.unwrap();
        assert_eq!(
            (again.added, again.skipped),
            (0, 3),
            "{backend}: import twice"
        );
        assert_eq!(
            store.export().await.unwrap(),
            file,
            "{backend}: export ≠ import"
        );
        assert_eq!(
            store.user("ann@example.org").await.unwrap().as_ref(),
            file.users.get("ann@example.org"),
            "{backend}"
        );
        assert!(store.user("nobody@example.org").await.unwrap().is_none());

        // Paging and search; `%` and `_` in a search match themselves only.
        let page = |after: Option<&str>, search: Option<&str>| ListQuery {
            after: after.map(str::to_owned),
            search: search.map(str::to_owned),
            limit: 2,
        };
        let names = |v: Vec<(String, User)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        let first = names(store.list(&page(None, None)).await.unwrap());
        assert_eq!(first, ["ann@example.org", "b_n%@example.org"], "{backend}");
        let second = names(
            store
                .list(&page(Some("b_n%@example.org"), None))
                .await
                .unwrap(),
        );
        assert_eq!(second, ["ben@example.org"], "{backend}");
        let found = names(store.list(&page(None, Some("_n%"))).await.unwrap());
        assert_eq!(found, ["b_n%@example.org"], "{backend}: search is literal");

        // Two operators change one user at the same moment, 2 × 20 times: one revokes app
        // passwords one by one, the other adds new ones. Nothing may be lost either way.
        let user = "ann@example.org";
        store
            .modify(
                user,
                Box::new(|u| {
                    let u = u.as_mut().ok_or("gone")?;
                    u.app_passwords = (0..20)
                        .map(|i| ap(&format!("ap_old{i:02}"), 1_700_000_000 + i))
                        .collect();
                    Ok(true)
                }),
            )
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..20i64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.modify(
                    user,
                    Box::new(move |u| {
                        let u = u.as_mut().ok_or("gone")?;
                        let a = u
                            .app_passwords
                            .iter_mut()
                            .find(|a| a.id == format!("ap_old{i:02}"))
                            .ok_or("missing")?;
                        a.revoked = true;
                        Ok(true)
                    }),
                )
                .await
            }));
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.modify(
                    user,
                    Box::new(move |u| {
                        let u = u.as_mut().ok_or("gone")?;
                        u.app_passwords
                            .push(ap(&format!("ap_new{i:02}"), 1_800_000_000 + i));
                        Ok(true)
                    }),
                )
                .await
            }));
        }
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{backend}: {e}"));
        }
        let ann = store.user(user).await.unwrap().unwrap();
        assert_eq!(
            ann.app_passwords.len(),
            40,
            "{backend}: lost an added app password"
        );
        let revoked = ann.app_passwords.iter().filter(|a| a.revoked).count();
        assert_eq!(revoked, 20, "{backend}: lost a revocation");
        assert!(ann
            .app_passwords
            .iter()
            .filter(|a| a.id.starts_with("ap_new"))
            .all(|a| !a.revoked));

        // A refused change writes nothing; deleting a user removes their app passwords.
        let refused = store
            .modify(
                user,
                Box::new(|u| {
                    if let Some(u) = u.as_mut() {
                        u.disabled = true;
                    }
                    Err("no".into())
                }),
            )
            .await;
        assert!(refused.is_err());
        assert!(
            !store.user(user).await.unwrap().unwrap().disabled,
            "{backend}"
        );
        store
            .modify(user, Box::new(|u| Ok(u.take().is_some())))
            .await
            .unwrap();
        assert!(store.user(user).await.unwrap().is_none(), "{backend}");
        // A record the users file would refuse (a TOTP secret in the clear) is refused.
        let bad = store
            .modify(
                "eve@example.org",
                Box::new(|u| {
                    *u = Some(User {
                        totp: Some("JBSWY3DPEHPK3PXP".into()),
                        ..Default::default()
                    });
                    Ok(true)
                }),
            )
            .await;
        if backend != "file" {
            assert!(bad.is_err(), "{backend}: stored a TOTP secret in the clear");
        }
        // The database stores log each change for the other replicas.
        let (events, newest) = store.changes_since(0, 1000).await.unwrap();
        if backend == "file" {
            assert!(events.is_empty());
        } else {
            // The import (3 users), the setup, the 40 changes and the deletion; nothing refused.
            assert_eq!(events.len(), 3 + 1 + 40 + 1, "{backend}");
            assert_eq!(events.last().unwrap().seq, newest);
        }
    }
}

#[tokio::test]
async fn a_database_of_the_first_schema_is_upgraded_with_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("old.db");
    let mut urls = vec![(
        "sqlite",
        format!(
            "  store: {{ backend: sqlite, sqlite: {{ path: {} }} }}",
            sqlite.display()
        ),
        format!("sqlite://{}", sqlite.display()),
    )];
    if let Some(pg) = postgres() {
        let url = dir.path().join("pg.url");
        let db = pg.database();
        crate::harness::write_secret(&url, &db);
        urls.push((
            "postgres",
            format!(
                "  store: {{ backend: postgres, postgres: {{ url_file: {} }} }}",
                url.display()
            ),
            db,
        ));
    }
    sqlx::any::install_default_drivers();
    for (backend, auth, raw_url) in urls {
        let cfg = config_with(dir.path(), backend, &auth);
        let old = imapgate::store::sql::SqlStore::connect(&cfg.auth.store)
            .await
            .unwrap();
        old.migrate_to(Some(1)).await.unwrap();
        assert_eq!(old.current_version().await.unwrap(), 1);
        old.close().await;
        // A user written by the first schema's code: its two tables only.
        let raw = sqlx::AnyPool::connect(&raw_url).await.unwrap();
        for sql in [
            "INSERT INTO users (name, disabled, mechanisms, allowed_networks, created, updated) \
             VALUES ('old@example.org', 0, '', '', 1700000000, 1700000000)"
                .to_owned(),
            format!(
                "INSERT INTO app_passwords (user_name, id, label, hash, created, revoked) \
                 VALUES ('old@example.org', 'ap_old', 'laptop', '{PHC}', 1700000000, 0)"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&raw)
                .await
                .unwrap();
        }
        raw.close().await;
        // `imapgate migrate` brings it to the current schema; the user is intact and usable.
        let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(["migrate", "-c"])
            .arg(dir.path().join(format!("{backend}.yaml")))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend}: {stderr}");
        let to = format!(
            "from schema 1 to {}",
            imapgate::store::sql::schema_version()
        );
        assert!(stderr.contains(&to), "{backend}: {stderr}");
        let store = imapgate::store::open(&cfg.auth).await.unwrap();
        let u = store.user("old@example.org").await.unwrap().unwrap();
        assert_eq!(u.app_passwords[0].id, "ap_old");
        assert_eq!(u.app_passwords[0].label, "laptop");
        store
            .modify(
                "old@example.org",
                Box::new(|u| {
                    u.as_mut().ok_or("gone")?.app_passwords[0].revoked = true;
                    Ok(true)
                }),
            )
            .await
            .unwrap();
        assert!(!store.changes_since(0, 10).await.unwrap().0.is_empty());
        // Run again: nothing to do.
        let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(["migrate", "-c"])
            .arg(dir.path().join(format!("{backend}.yaml")))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to do"));
    }
}

/// A users file moved into SQLite with one command, then a CSV of new users; the export
/// matches, and the CSV's app passwords are printed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_file_moves_into_sqlite_and_a_csv_creates_users() {
    let dir = tempfile::tempdir().unwrap();
    let file = sample();
    let users = dir.path().join("users.yaml");
    file.save(&users).unwrap();
    let cfg = config_with(
        dir.path(),
        "sqlite",
        &format!(
            "  store: {{ backend: sqlite, sqlite: {{ path: {}/imapgate.db }} }}",
            dir.path().display()
        ),
    );
    let _ = cfg;
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(args)
            .arg("-c")
            .arg(dir.path().join("sqlite.yaml"))
            .output()
            .unwrap()
    };
    let out = cli(&["users", "import", users.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 added"));
    let out = cli(&["doctor"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("[ok]   credential store sqlite") && report.contains("3 user(s), schema"),
        "{report}"
    );
    let out = cli(&["users", "export"]);
    assert!(out.status.success());
    let exported = UsersFile::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(exported, file, "sqlite export ≠ the users file");
    // The database file is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("imapgate.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "database readable by others: {mode:o}");
    // Made readable by others, it is refused (with the fix in the message).
    std::fs::set_permissions(
        dir.path().join("imapgate.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = cli(&["users", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod"), "{err}");
    std::fs::set_permissions(
        dir.path().join("imapgate.db"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let csv = dir.path().join("new.csv");
    std::fs::write(
        &csv,
        "address,upstream_user,mfa\nNew.One@Example.org,,required\nnew2@example.org,n2,\nann@example.org,,\n",
    )
    .unwrap();
    let out = cli(&["users", "import", "--csv", csv.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 added") && stderr.contains("1 already there"),
        "{stderr}"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "one password per added user: {printed}");
    assert!(lines[0].starts_with("new.one@example.org,"));
    assert!(
        !printed.contains("ann@example.org"),
        "an existing user got a password line"
    );
    let out = cli(&["users", "show", "new2@example.org"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("upstream user: n2"), "{shown}");
    // A CSV with a bad line changes nothing and names the line.
    std::fs::write(&csv, "x@example.org,,\nnot an address,,\n").unwrap();
    let out = cli(&["users", "import", "--csv", csv.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2:"));
    let out = cli(&["users", "show", "x@example.org"]);
    assert!(!out.status.success(), "a refused CSV left a user behind");
}

/// `state`: the `state` section's body (empty: memory); `poll`: how often each replica reads
/// the change log.
async fn login_and_revoke_on(store: TestStore, state: String, poll: &'static str) {
    let Some(t) = TestGateway::start_with(Options {
        store: store.clone(),
        state,
        store_poll: poll,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let backend = format!("{store:?}");
    let user = "alice@example.org";
    // Logins read the database: the right app password, a wrong one, a disabled user, and an
    // MFA user with a code.
    assert!(
        t.login_from("127.0.0.1", user, &t.password(user))
            .await
            .starts_with("a OK"),
        "{backend}"
    );
    assert!(t
        .login_from("127.0.0.1", user, "aaaabbbbccccdddd")
        .await
        .contains("NO"));
    let disabled = "disabled@example.org";
    assert!(t
        .login_from("127.0.0.1", disabled, &t.password(disabled))
        .await
        .contains("NO"));
    let mia = "mia@example.org";
    let with_code = format!("{}{}", t.password(mia), t.code(mia, 0));
    assert!(
        t.login_from("127.0.0.1", mia, &with_code)
            .await
            .contains("OK"),
        "{backend}"
    );

    // A second replica on the same database (PostgreSQL) or the same file (SQLite).
    let config = Config::load(&t.config_path).unwrap();
    assert_ne!(config.auth.store.backend, StoreBackend::File);
    let replica = imapgate::server::Gateway::start(config).await.unwrap();
    let replica_imaps = replica
        .listeners
        .iter()
        .find(|(n, _)| n == "imaps")
        .unwrap()
        .1;

    // alice idles on both replicas; the CLI revokes her app password in the store.
    let mut here = t.logged_in(user).await;
    here.cmd("s", "SELECT INBOX").await;
    let mut there = crate::harness::Client::tls(replica_imaps, &t.pki.ca_der).await;
    assert!(there.line().await.unwrap().starts_with("* OK"));
    let r = there
        .cmd("a", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("a OK"), "{backend}: {r:?}");
    there.cmd("s", "SELECT INBOX").await;
    for c in [&mut here, &mut there] {
        c.send("i IDLE\r\n").await;
        assert!(c.line().await.unwrap().starts_with('+'));
    }
    let store_handle = imapgate::store::open(&Config::load(&t.config_path).unwrap().auth)
        .await
        .unwrap();
    let id = store_handle
        .user(user)
        .await
        .unwrap()
        .unwrap()
        .app_passwords[0]
        .id
        .clone();
    let revoked_at = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["app-password", "revoke", user, &id, "-c"])
        .arg(&t.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, c) in [("first", &mut here), ("second", &mut there)] {
        assert!(
            c.closed_within(Duration::from_secs(2)).await,
            "{backend}: the {name} replica kept the revoked session open"
        );
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(4));
    assert!(
        t.login_from("127.0.0.1", user, &t.password(user))
            .await
            .contains("NO"),
        "{backend}"
    );
    replica.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_revocation_on_sqlite() {
    login_and_revoke_on(TestStore::Sqlite, String::new(), "200ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_revocation_across_two_replicas_on_postgres_and_redis() {
    let Some(pg) = postgres() else { return };
    // The deployment of several replicas: credentials in PostgreSQL, guard and unlock state in
    // Redis.
    let Some(redis) = crate::harness::RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("redis.url");
    crate::harness::write_secret(&url_file, redis.url());
    let state = format!(
        "  backend: redis\n  redis: {{ url_file: \"{}\", key_prefix: \"s:\" }}",
        url_file.display()
    );
    // Polled only every 30 s: the revocation reaches both replicas within 2 s through the
    // database's NOTIFY, which wakes each replica's reading of the change log.
    login_and_revoke_on(TestStore::Postgres(pg.database()), state, "30s").await;
}
