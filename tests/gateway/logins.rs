//! Each person's recent logins ("recent activity"): real IMAP logins through the gateway, then
//! what the admin API (and the CLI) lists for them — on SQLite, PostgreSQL and the users file.
//! A known user's success and failures are listed, newest first, with the address, mechanism,
//! result and reason; a name nobody holds leaves no trace anywhere, however often it is tried;
//! and the history keeps at most 50 logins per person.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::harness::{admin_request, last, Client, Options, TestGateway, TestStore};
use crate::pg::postgres;

/// The guard in dry run, without a tarpit: these tests fail many logins on purpose and the
/// guard must not decide what is recorded.
const DRY_RUN_GUARD: &str =
    "  enforce: false\n  tarpit: { start: 100ms, max: 100ms, enforce: false }";

/// Generous request limits for the admin listener.
const LIMITS: &str = ", rate_limit: { per_ip: 100000, burst: 10000, overall: 100000 }";

/// `GET /api/v1/users/{user}/logins[?limit=N]`: status and JSON.
async fn logins(t: &TestGateway, user: &str, query: &str) -> (u16, Value) {
    let (status, body) = admin_request(
        t.gw.admin,
        "GET",
        &format!("/api/v1/users/{user}/logins{query}"),
        Some(crate::harness::ADMIN_TOKEN),
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The API's list for `user`, once it has `n` entries (waiting up to 5 s).
async fn listed(t: &TestGateway, user: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, v) = logins(t, user, "").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["user"], user);
        let list = v["logins"].as_array().unwrap().clone();
        if list.len() >= n || std::time::Instant::now() > deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// LOGINs at once, each on its own connection: (local address, user, password) → the tagged
/// replies.
async fn logins_at_once(t: &TestGateway, attempts: Vec<(String, String, String)>) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for (local, user, password) in attempts {
        let (addr, ca) = (t.imaps(), t.pki.ca_der.clone());
        set.spawn(async move {
            let mut c = Client::tls_from(addr, &local, &ca).await;
            assert!(c.line().await.unwrap().starts_with("* OK"));
            let r = c.cmd("a", &format!("LOGIN {user} \"{password}\"")).await;
            last(&r).to_owned()
        });
    }
    set.join_all().await
}

/// A raw connection to the test's database (None: the users file).
async fn raw_db(t: &TestGateway, store: &TestStore) -> Option<sqlx::AnyPool> {
    sqlx::any::install_default_drivers();
    let url = match store {
        TestStore::File => return None,
        TestStore::Sqlite => format!("sqlite://{}", t.dir.path().join("imapgate.db").display()),
        TestStore::Postgres(url) => url.clone(),
    };
    Some(sqlx::AnyPool::connect(&url).await.unwrap())
}

/// Rows in `login_events`, of `user` only if given.
async fn rows(db: &sqlx::AnyPool, user: Option<&str>) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) AS n FROM login_events WHERE ($1 = '' OR user_name = $1)")
        .bind(user.unwrap_or_default().to_owned())
        .fetch_one(db)
        .await
        .unwrap()
        .try_get("n")
        .unwrap()
}

/// Waits until the database has `n` rows of `user` (the writer flushes every 2 s).
async fn rows_become(db: &sqlx::AnyPool, user: Option<&str>, n: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let got = rows(db, user).await;
        if got == n || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn history_on(store: TestStore) {
    let Some(t) = TestGateway::start_with(Options {
        store: store.clone(),
        guard: DRY_RUN_GUARD.to_owned(),
        failure_floor: "100ms",
        admin_extra: LIMITS,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let which = format!("{store:?}");
    let alice = "alice@example.org";

    // 1. A success with an app password, from 127.0.0.1, by a client that said who it is.
    let mut c = Client::tls_from(t.imaps(), "127.0.0.1", &t.pki.ca_der).await;
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let r = c
        .cmd("i", "ID (\"name\" \"HistoryTest\" \"version\" \"2.5\")")
        .await;
    assert!(last(&r).starts_with("i OK"), "{r:?}");
    let r = c
        .cmd("a", &format!("LOGIN {alice} \"{}\"", t.password(alice)))
        .await;
    assert!(last(&r).starts_with("a OK"), "{which}: {r:?}");
    c.cmd("z", "LOGOUT").await;
    // 2. A wrong app password for alice, through AUTHENTICATE PLAIN, from 127.0.0.2.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut c = Client::tls_from(t.imaps(), "127.0.0.2", &t.pki.ca_der).await;
    assert!(c.line().await.unwrap().starts_with("* OK"));
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{alice}\0wrongwrongwrongw"));
    let r = c.cmd("p", &format!("AUTHENTICATE PLAIN {plain}")).await;
    assert!(last(&r).contains("NO"), "{r:?}");
    // 3. A name nobody holds, and a spray of more of them.
    let ghost = "ghost@example.org";
    assert!(t
        .login_from("127.0.0.3", ghost, "aaaabbbbccccdddd")
        .await
        .contains("NO"));
    let spray = (0..20)
        .map(|i| {
            (
                format!("127.0.3.{}", i + 1),
                format!("sprayed{i}@example.org"),
                "aaaabbbbccccdddd".to_owned(),
            )
        })
        .collect();
    for r in logins_at_once(&t, spray).await {
        assert!(r.contains("NO"), "{r}");
    }

    // The API lists alice's two, newest first, at once (from this replica's buffer) …
    let check = |list: &[Value], when: &str| {
        assert_eq!(list.len(), 2, "{which} {when}: {list:?}");
        let (fail, ok) = (&list[0], &list[1]);
        assert_eq!(fail["result"], "fail", "{which} {when}: {fail}");
        assert_eq!(fail["reason"], "bad_password", "{which} {when}");
        assert_eq!(fail["address"], "127.0.0.2", "{which} {when}");
        assert_eq!(fail["mechanism"], "PLAIN", "{which} {when}");
        assert_eq!(
            fail["credential"], "",
            "{which} {when}: failures name no credential"
        );
        assert_eq!(ok["result"], "ok", "{which} {when}: {ok}");
        assert_eq!(ok["reason"], "", "{which} {when}");
        assert_eq!(ok["address"], "127.0.0.1", "{which} {when}");
        assert_eq!(ok["mechanism"], "LOGIN", "{which} {when}");
        assert_eq!(ok["listener"], "imaps", "{which} {when}");
        assert_eq!(ok["client"], "HistoryTest/2.5", "{which} {when}");
        assert!(
            ok["credential"].as_str().unwrap().starts_with("ap_"),
            "{which} {when}: {ok}"
        );
        let at = |v: &Value| {
            time::OffsetDateTime::parse(
                v["at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        assert!(at(fail) > at(ok), "{which} {when}: newest first");
        let text = serde_json::to_string(list).unwrap();
        assert!(
            !text.contains("wrongwrong") && !text.contains(&t.password(alice).replace(' ', "")),
            "{which}: a secret in the history"
        );
    };
    check(&listed(&t, alice, 2).await, "buffered");
    // … and the unknown names have nothing: not even a user to ask about.
    assert_eq!(logins(&t, ghost, "").await.0, 404);

    let db = raw_db(&t, &store).await;
    if let Some(db) = &db {
        // Written within a flush: the same two, once each, and no row for any made-up name.
        assert_eq!(rows_become(db, Some(alice), 2).await, 2, "{which}");
        assert_eq!(rows(db, None).await, 2, "{which}: rows of unknown names");
        check(&listed(&t, alice, 2).await, "stored");
    }

    // 4. The cap: 60 failed logins of bob (wrong passwords, 10 addresses at a time), in two
    //    halves that reach the database in different writes, leave his newest 50.
    let bob = "bob@example.org";
    for round in 0..6 {
        let wrong = (0..10)
            .map(|i| {
                (
                    format!("127.0.4.{}", i + 1),
                    bob.to_owned(),
                    format!("wrong{round}x{i}wrongwrong"),
                )
            })
            .collect();
        for r in logins_at_once(&t, wrong).await {
            assert!(r.contains("NO"), "{r}");
        }
        if round == 2 {
            if let Some(db) = &db {
                assert_eq!(rows_become(db, Some(bob), 30).await, 30, "{which}");
            }
        }
    }
    let list = listed(&t, bob, 50).await;
    assert_eq!(list.len(), 50, "{which}");
    assert!(list
        .iter()
        .all(|e| e["result"] == "fail" && e["reason"] == "bad_password"));
    assert_eq!(
        logins(&t, bob, "?limit=5").await.1["logins"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    if let Some(db) = &db {
        assert_eq!(
            rows_become(db, Some(bob), 50).await,
            50,
            "{which}: the per-user cap"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(rows(db, Some(bob)).await, 50, "{which}");
        assert_eq!(rows(db, None).await, 52, "{which}");
        assert_eq!(listed(&t, bob, 50).await.len(), 50, "{which}: stored");
    }
    assert_eq!(
        t.metric("imapgate_store_logins_dropped_total", &[]).await,
        0.0,
        "{which}"
    );

    // The CLI reads the same history from a database store.
    if db.is_some() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(["users", "logins", alice, "-c"])
            .arg(&t.config_path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        assert!(
            lines[0].contains("fail")
                && lines[0].contains("bad_password")
                && lines[0].contains("127.0.0.2"),
            "{stdout}"
        );
        assert!(
            lines[1].contains("ok") && lines[1].contains("HistoryTest/2.5"),
            "{stdout}"
        );
    }

    // Deleting a user deletes their history.
    if let Some(db) = &db {
        let (status, _) = admin_request(
            t.gw.admin,
            "DELETE",
            &format!("/api/v1/users/{alice}"),
            Some(crate::harness::ADMIN_TOKEN),
        )
        .await;
        assert_eq!(status, 204);
        assert_eq!(rows(db, Some(alice)).await, 0, "{which}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_logins_on_sqlite() {
    history_on(TestStore::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_logins_on_postgres() {
    let Some(pg) = postgres() else { return };
    history_on(TestStore::Postgres(pg.database())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_logins_with_the_users_file_in_memory() {
    history_on(TestStore::File).await;
}

/// Someone spraying a thousand made-up names cannot push a real person's history out of a
/// users-file gateway's memory (it holds 1,000 users): the names never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_of_made_up_names_leaves_the_history_alone() {
    let Some(t) = TestGateway::start_with(Options {
        guard: DRY_RUN_GUARD.to_owned(),
        failure_floor: "100ms",
        admin_extra: LIMITS,
        limits: "  max_connections: 1000\n  auth_failures_per_connection: 60".to_owned(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let alice = "alice@example.org";
    assert!(t
        .login_from("127.0.0.1", alice, &t.password(alice))
        .await
        .starts_with("a OK"));
    assert_eq!(listed(&t, alice, 1).await.len(), 1);
    // 20 connections, 51 names each: more names than the history holds users.
    let mut set = tokio::task::JoinSet::new();
    for c in 0..20 {
        let (addr, ca) = (t.imaps(), t.pki.ca_der.clone());
        set.spawn(async move {
            let mut client = Client::tls_from(addr, &format!("127.0.6.{}", c + 1), &ca).await;
            assert!(client.line().await.unwrap().starts_with("* OK"));
            for i in 0..51 {
                let r = client
                    .cmd(
                        "a",
                        &format!("LOGIN spray{c}x{i}@example.org \"aaaabbbbccccdddd\""),
                    )
                    .await;
                assert!(last(&r).starts_with("a NO"), "{r:?}");
            }
        });
    }
    set.join_all().await;
    assert_eq!(
        listed(&t, alice, 1).await.len(),
        1,
        "the spray pushed alice's login out"
    );
    assert_eq!(
        t.metric("imapgate_store_logins_dropped_total", &[]).await,
        0.0
    );
}
