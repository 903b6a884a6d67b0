//! Sessions known everywhere, last-used records, and what a database store's outage does: an
//! operator lists the relayed sessions of every replica with the CLI and ends one session, one
//! credential's or all of a user's, and each gets `* BYE` and an audit line; `app-password list`
//! says when, from where and with which client an app password was last used; a PostgreSQL
//! store that the gateway cannot reach keeps only cached credentials working (`on_error:
//! cache`) or none (`fail_closed`), `/readyz` and `imapgate_store_up` say so, and a revocation
//! made meanwhile ends the session as soon as the store answers again.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use imapgate::config::Config;

use crate::harness::*;
use crate::pg::postgres;

fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A session on `addr`: greeting, an optional `ID` with this client name, LOGIN.
async fn session(
    addr: SocketAddr,
    t: &TestGateway,
    user: &str,
    client_name: Option<&str>,
) -> Client {
    let mut c = Client::tls(addr, &t.pki.ca_der).await;
    assert!(c.line().await.unwrap().starts_with("* OK"));
    if let Some(name) = client_name {
        let r = c
            .cmd(
                "i",
                &format!("ID (\"name\" \"{name}\" \"version\" \"1.0\")"),
            )
            .await;
        assert!(last(&r).starts_with("i OK"), "{r:?}");
    }
    let r = c
        .cmd("a", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    c
}

/// The `sessions list` rows (tab-separated fields), waiting up to 5 s until `ready` holds.
async fn listed(
    config: &std::path::Path,
    user: Option<&str>,
    ready: impl Fn(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let mut args = vec!["sessions", "list"];
    args.extend(user);
    let mut rows = Vec::new();
    for _ in 0..50 {
        let (ok, out, err) = cli(config, &args);
        assert!(ok, "{err}");
        rows = out
            .lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect::<Vec<_>>())
            .collect();
        if ready(&rows) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sessions list never matched: {rows:?}");
}

/// The next line is the given BYE, then the connection closes.
async fn ends_with_bye(c: &mut Client, bye: &str, what: &str) {
    let line = c.line_within(Duration::from_secs(5)).await;
    assert_eq!(line.as_deref(), Some(bye), "{what}");
    assert!(c.closed_within(Duration::from_secs(3)).await, "{what}");
}

/// Two replicas on one database: the in-process test gateway and the real binary (named
/// `pod-b` through `IMAPGATE_REPLICA`, with its audit log in a file).
async fn directory_on(store: TestStore) {
    let Some(t) = TestGateway::start_with(Options {
        store: store.clone(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let backend = format!("{store:?}");
    let b = spawn_binary(&t, None, &[("IMAPGATE_REPLICA", "pod-b".as_ref())]);
    let b_imaps: SocketAddr = format!("127.0.0.1:{}", b.imaps).parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(b_imaps).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = t.config_path.clone();
    let (alice, bob) = ("alice@example.org", "bob@example.org");

    // alice on both replicas (on pod-b with a client ID), bob on the first.
    let mut alice_a = session(t.imaps(), &t, alice, None).await;
    let mut alice_b = session(b_imaps, &t, alice, Some("TestMail")).await;
    let mut bob_a = session(t.imaps(), &t, bob, Some("BobMail")).await;
    let rows = listed(&cfg, None, |r| r.len() >= 3).await;
    assert_eq!(rows.len(), 3, "{backend}: {rows:?}");
    let of = |user: &str, replica_b: bool| -> Vec<String> {
        rows.iter()
            .find(|r| r[1] == user && r[0].starts_with("pod-b-") == replica_b)
            .unwrap_or_else(|| panic!("{backend}: no session of {user}: {rows:?}"))
            .clone()
    };
    let on_b = of(alice, true);
    let on_a = of(alice, false);
    assert!(on_a[0].ends_with(char::is_numeric) && on_a[0] != on_b[0]);
    // id, user, credential, client address, client ID, listener, since.
    assert!(on_b[2].starts_with("ap_"), "{on_b:?}");
    assert_eq!(on_b[3], "127.0.0.1");
    assert_eq!(on_b[4], "TestMail/1.0");
    assert_eq!(on_b[5], "imaps");
    assert!(on_b[6].contains('T'), "{on_b:?}");
    assert_eq!(on_a[4], "-");
    let only_bob = listed(&cfg, Some(bob), |r| !r.is_empty()).await;
    assert_eq!(only_bob.len(), 1, "{only_bob:?}");
    assert_eq!(only_bob[0][1], bob);

    // One session by its id: only pod-b's alice session ends, with a BYE and an audit line.
    let (ok, _, err) = cli(&cfg, &["sessions", "kill", alice, "--session", &on_b[0]]);
    assert!(ok, "{err}");
    assert!(
        err.contains("1 of the 1 listed session(s) ended"),
        "{backend}: {err}"
    );
    assert!(err.contains("\"action\":\"sessions_killed\""), "{err}");
    ends_with_bye(
        &mut alice_b,
        "* BYE Session ended by an administrator\r\n",
        "the killed session",
    )
    .await;
    let r = alice_a.cmd("n", "NOOP").await;
    assert!(
        last(&r).starts_with("n OK"),
        "{backend}: the other session ended too"
    );
    let audit = std::fs::read_to_string(b.dir.path().join("audit.log")).unwrap_or_default();
    let ended = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "session")
        .unwrap_or_else(|| panic!("{backend}: no session audit line: {audit}"));
    assert_eq!(ended["session"], on_b[0].as_str());
    assert_eq!(ended["user"], alice);
    assert_eq!(ended["reason"], "operator");
    assert_eq!(ended["credential"], on_b[2].as_str());
    assert_eq!(ended["client_ip"], "127.0.0.1");

    // One credential's sessions, then all of a user's.
    let bob_id = of(bob, false)[2].clone();
    let (ok, _, err) = cli(&cfg, &["sessions", "kill", bob, "--credential", &bob_id]);
    assert!(ok && err.contains("1 of the 1"), "{backend}: {err}");
    ends_with_bye(
        &mut bob_a,
        "* BYE Session ended by an administrator\r\n",
        "bob",
    )
    .await;
    let (ok, _, err) = cli(&cfg, &["sessions", "kill", alice]);
    assert!(ok && err.contains("1 of the 1"), "{backend}: {err}");
    ends_with_bye(
        &mut alice_a,
        "* BYE Session ended by an administrator\r\n",
        "alice's last session",
    )
    .await;
    let (ok, out, err) = cli(&cfg, &["sessions", "list"]);
    assert!(
        ok && out.is_empty() && err.contains("no sessions"),
        "{out}{err}"
    );

    // Last use: when, from where, with which client; nothing for an app password never used.
    let mut shown = String::new();
    for _ in 0..60 {
        shown = cli(&cfg, &["app-password", "list", bob]).1;
        if shown.contains("last used 20") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        shown.contains(&bob_id) && shown.contains("from 127.0.0.1 (BobMail)"),
        "{backend}: {shown}"
    );
    let (_, carol, _) = cli(&cfg, &["app-password", "list", "carol@example.org"]);
    assert!(carol.contains("last used: never"), "{carol}");
    let db = imapgate::store::open(&Config::load(&cfg).unwrap().auth)
        .await
        .unwrap();
    let usage = db.usage(bob).await.unwrap();
    let user_row = usage
        .iter()
        .find(|u| u.scope == imapgate::store::UsageScope::User)
        .unwrap_or_else(|| panic!("no last login of bob: {usage:?}"));
    assert_eq!(
        (user_row.credential.as_str(), user_row.client.as_str()),
        (bob_id.as_str(), "BobMail")
    );

    // A replica that died without clearing its rows: left out once stale, then deleted.
    let stale = imapgate::login::SessionInfo {
        id: "dead-1".into(),
        replica: "dead".into(),
        user: alice.into(),
        credential: "ap_x".into(),
        client_address: "192.0.2.1".into(),
        client_name: None,
        client_version: None,
        listener: "imaps".into(),
        since: 1,
    };
    db.write_sessions("dead", &[stale], &[]).await.unwrap();
    assert_eq!(db.sessions(Some(alice)).await.unwrap().len(), 1);
    let raw_url = match &store {
        TestStore::Postgres(url) => url.clone(),
        _ => format!("sqlite://{}", t.dir.path().join("imapgate.db").display()),
    };
    let raw = sqlx::AnyPool::connect(&raw_url).await.unwrap();
    sqlx::query("UPDATE sessions SET seen = seen - 31 WHERE replica = 'dead'")
        .execute(&raw)
        .await
        .unwrap();
    assert!(db.sessions(None).await.unwrap().is_empty(), "{backend}");
    assert_eq!(db.write_sessions("other", &[], &[]).await.unwrap(), 0);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE replica = 'dead'")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(left, 0, "{backend}: the stale row was not deleted");
    raw.close().await;

    // The users file has no directory: the CLI says where to look instead.
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["sessions", "list", "--users-file"])
        .arg(&t.users_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--admin"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_every_replica_are_listed_and_ended_on_sqlite() {
    sqlx::any::install_default_drivers();
    directory_on(TestStore::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_every_replica_are_listed_and_ended_on_postgres() {
    sqlx::any::install_default_drivers();
    let Some(pg) = postgres() else { return };
    directory_on(TestStore::Postgres(pg.database())).await;
}

async fn metric_at(admin: SocketAddr, name: &str) -> Option<f64> {
    http_get(admin, "/metrics")
        .await
        .1
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// LOGIN on `addr`; the tagged reply and how long it took.
async fn login_at(addr: SocketAddr, t: &TestGateway, user: &str) -> (String, Duration) {
    let mut c = Client::tls(addr, &t.pki.ca_der).await;
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let started = Instant::now();
    let r = c
        .cmd("a", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    (last(&r).to_owned(), started.elapsed())
}

/// Waits (up to 10 s) until `/readyz` answers `code` with `line` in its body.
async fn readyz(admin: SocketAddr, code: u16, line: &str) {
    let mut seen = (0, String::new());
    for _ in 0..100 {
        seen = http_get(admin, "/readyz").await;
        if seen.0 == code && seen.1.contains(line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never said {code} {line:?}: {seen:?}");
}

/// A test gateway on a PostgreSQL database of its own role, so that the gateway can be cut off
/// while an operator still reaches the database (a partitioned replica); the role, and a
/// configuration for the operator (the same store, through the superuser).
struct Partitionable {
    t: TestGateway,
    /// The database's name.
    db: String,
    role: String,
    operator: std::path::PathBuf,
}

async fn partitionable(pg: &crate::pg::Postgres) -> Option<Partitionable> {
    let url = pg.database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let role = format!("gw_{db}");
    pg.psql("postgres", &format!("CREATE ROLE {role} LOGIN"))
        .unwrap();
    pg.psql("postgres", &format!("ALTER DATABASE {db} OWNER TO {role}"))
        .unwrap();
    let gw_url = url.replace("postgres://postgres@", &format!("postgres://{role}@"));
    let t = TestGateway::start_with(Options {
        store: TestStore::Postgres(gw_url),
        ..Default::default()
    })
    .await?;
    let operator_url = t.dir.path().join("operator.url");
    write_secret(&operator_url, &url);
    let operator = t.dir.path().join("operator.yaml");
    std::fs::write(
        &operator,
        t.config_yaml.replace(
            &t.dir.path().join("pg.url").display().to_string(),
            &operator_url.display().to_string(),
        ),
    )
    .unwrap();
    Some(Partitionable {
        t,
        db,
        role,
        operator,
    })
}

/// The id of `user`'s first app password, read as the operator.
async fn first_app_password(operator: &std::path::Path, user: &str) -> String {
    imapgate::store::open(&Config::load(operator).unwrap().auth)
        .await
        .unwrap()
        .user(user)
        .await
        .unwrap()
        .unwrap()
        .app_passwords[0]
        .id
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_postgres_store_serves_cached_credentials_only_and_catches_up() {
    let Some(pg) = postgres() else { return };
    let Some(Partitionable {
        t, role, operator, ..
    }) = partitionable(&pg).await
    else {
        return;
    };
    // Two more replicas that re-read a record after 1 s: one per `on_error`.
    let start = |on_error: &str| {
        let yaml = t.config_yaml.replacen(
            "poll_interval: 200ms }",
            &format!("poll_interval: 200ms, cache_ttl: 1s, on_error: {on_error} }}"),
            1,
        );
        assert_ne!(yaml, t.config_yaml);
        let p = t.dir.path().join(format!("{on_error}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        imapgate::server::Gateway::start(Config::load(&p).unwrap())
    };
    let cache = start("cache").await.unwrap();
    let closed = start("fail_closed").await.unwrap();
    let imaps =
        |g: &imapgate::server::Gateway| g.listeners.iter().find(|(n, _)| n == "imaps").unwrap().1;
    let (alice, bob) = ("alice@example.org", "bob@example.org");
    let alice_ap = first_app_password(&operator, alice).await;

    // Before: alice logs in on both (her credential is now in their verified caches) and keeps
    // a session open on the `cache` replica; bob has not logged in anywhere.
    for g in [&cache, &closed] {
        readyz(g.admin, 200, "store (postgres): ok").await;
        assert!(login_at(imaps(g), &t, alice).await.0.starts_with("a OK"));
        assert_eq!(metric_at(g.admin, "imapgate_store_up").await, Some(1.0));
    }
    let mut open = session(imaps(&cache), &t, alice, None).await;
    let wrong = {
        let mut c = Client::tls(imaps(&cache), &t.pki.ca_der).await;
        c.line().await.unwrap();
        last(
            &c.cmd("a", &format!("LOGIN {bob} \"aaaabbbbccccdddd\""))
                .await,
        )
        .to_owned()
    };

    // The outage: the gateway's role may no longer log in, its connections are ended.
    pg.psql("postgres", &format!("ALTER ROLE {role} NOLOGIN"))
        .unwrap();
    pg.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"),
    )
    .unwrap();
    readyz(
        closed.admin,
        503,
        "store (postgres, on_error: fail_closed): not ok",
    )
    .await;
    readyz(
        cache.admin,
        200,
        "store (postgres, on_error: cache): not ok",
    )
    .await;
    for g in [&cache, &closed] {
        assert_eq!(metric_at(g.admin, "imapgate_store_up").await, Some(0.0));
    }
    // Past the 1 s record cache: every login needs the store now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (r, _) = login_at(imaps(&cache), &t, alice).await;
    assert!(
        r.starts_with("a OK"),
        "cache: a cached credential must log in: {r}"
    );
    for (g, user, why) in [
        (&cache, bob, "cache: a credential not in the cache"),
        (&closed, alice, "fail_closed: even a cached credential"),
        (&closed, bob, "fail_closed"),
    ] {
        let (r, took) = login_at(imaps(g), &t, user).await;
        assert_eq!(r, wrong, "{why}: not the reply of a wrong password");
        assert!(
            took >= Duration::from_millis(300),
            "{why}: before the floor ({took:?})"
        );
    }

    // alice's app password is revoked meanwhile (by an operator who reaches the database).
    let (ok, _, err) = cli(&operator, &["app-password", "revoke", alice, &alice_ap]);
    assert!(ok, "{err}");
    assert!(
        !open.closed_within(Duration::from_secs(1)).await,
        "the session ended while the store was unreachable"
    );

    // The store is back: the replica catches up from the change log and ends the session.
    pg.psql("postgres", &format!("ALTER ROLE {role} LOGIN"))
        .unwrap();
    ends_with_bye(
        &mut open,
        "* BYE Session ended: access revoked\r\n",
        "the session revoked during the outage",
    )
    .await;
    readyz(closed.admin, 200, "store (postgres): ok").await;
    for g in [&cache, &closed] {
        assert_eq!(metric_at(g.admin, "imapgate_store_up").await, Some(1.0));
    }
    assert!(login_at(imaps(&cache), &t, bob).await.0.starts_with("a OK"));
    assert_eq!(login_at(imaps(&cache), &t, alice).await.0, wrong);
    cache.shutdown();
    closed.shutdown();
}

/// The follower read a revocation from the change log but could not read the user's record
/// (here: the gateway's role lost SELECT on `users`): it must try that entry again, not skip it
/// and leave the revoked session running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_whose_user_cannot_be_read_yet_is_applied_later_not_skipped() {
    let Some(pg) = postgres() else { return };
    let Some(Partitionable {
        t,
        db,
        role,
        operator,
    }) = partitionable(&pg).await
    else {
        return;
    };
    let alice = "alice@example.org";
    let id = first_app_password(&operator, alice).await;
    let mut open = session(t.imaps(), &t, alice, None).await;
    pg.psql(&db, &format!("REVOKE SELECT ON users FROM {role}"))
        .unwrap();
    let (ok, _, err) = cli(&operator, &["app-password", "revoke", alice, &id]);
    assert!(ok, "{err}");
    // The change is read, the record is not: nothing can be decided yet.
    assert!(!open.closed_within(Duration::from_secs(1)).await);
    pg.psql(&db, &format!("GRANT SELECT ON users TO {role}"))
        .unwrap();
    ends_with_bye(
        &mut open,
        "* BYE Session ended: access revoked\r\n",
        "a revocation read while its user could not be",
    )
    .await;
}
