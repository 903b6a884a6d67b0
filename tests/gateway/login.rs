//! Authentication: one generic failure for every reason, the failure floor, dummy hashing for
//! unknown users (counted, not timed), PLAIN with SASL-IR and continuation, per-user caps,
//! pipelining behind the login (invariant 3), and the audit trail.

use std::time::{Duration, Instant};

use base64::Engine;

use crate::harness::*;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

const FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed\r\n";

#[tokio::test]
async fn every_failure_looks_the_same_and_waits_for_the_floor() {
    let Some(t) = TestGateway::start_with(Options {
        failure_floor: "700ms",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let alice_pw = t.password("alice@example.org");
    let cases = [
        (
            "wrong password",
            format!("LOGIN alice@example.org \"{}\"", "abcd efgh ijkl mnop"),
        ),
        (
            "unknown user",
            format!("LOGIN nobody@example.org \"{alice_pw}\""),
        ),
        (
            "disabled user",
            format!(
                "LOGIN disabled@example.org \"{}\"",
                t.password("disabled@example.org")
            ),
        ),
        (
            "malformed password",
            "LOGIN alice@example.org \"x\"".to_owned(),
        ),
        (
            "bad name",
            format!("LOGIN \"a\\\"b@example.org\" \"{alice_pw}\""),
        ),
    ];
    for (what, cmd) in cases {
        let mut c = t.client().await;
        let started = Instant::now();
        let r = c.cmd("a", &cmd).await;
        assert_eq!(r, vec![format!("a {FAILED}")], "{what}");
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "{what} answered before the floor: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn unknown_users_pay_a_dummy_hash() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let before = t.metric("imapgate_auth_hash_runs_total", &[]).await;
    let mut c = t.client().await;
    let r = c
        .cmd("a", "LOGIN ghost@example.org \"abcd efgh ijkl mnop\"")
        .await;
    assert_eq!(last(&r), format!("a {FAILED}"));
    let after_unknown = t.metric("imapgate_auth_hash_runs_total", &[]).await;
    assert_eq!(
        after_unknown - before,
        1.0,
        "an unknown user must cost one argon2 run"
    );
    let r = c
        .cmd("b", "LOGIN erin@example.org \"abcd efgh ijkl mnop\"")
        .await;
    assert_eq!(last(&r), format!("b {FAILED}"));
    let after_known = t.metric("imapgate_auth_hash_runs_total", &[]).await;
    assert_eq!(
        after_known - after_unknown,
        1.0,
        "a known user with one app password: one run"
    );
}

#[tokio::test]
async fn too_many_failures_end_the_connection() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    for tag in ["a", "b"] {
        let r = c
            .cmd(tag, "LOGIN frank@example.org \"abcd efgh ijkl mnop\"")
            .await;
        assert_eq!(last(&r), format!("{tag} {FAILED}"));
    }
    c.send("c LOGIN frank@example.org \"abcd efgh ijkl mnop\"\r\n")
        .await;
    assert_eq!(c.line().await.unwrap(), format!("c {FAILED}"));
    assert_eq!(
        c.line().await.unwrap(),
        "* BYE Too many authentication failures\r\n"
    );
    assert!(c.closed_within(Duration::from_secs(3)).await);
}

#[tokio::test]
async fn authenticate_plain_with_initial_response_and_continuation() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "alice@example.org";
    let pw = t.password(user);
    // SASL-IR.
    let mut c = t.client().await;
    let r = c
        .cmd(
            "a",
            &format!(
                "AUTHENTICATE PLAIN {}",
                b64(format!("\0{user}\0{pw}").as_bytes())
            ),
        )
        .await;
    assert!(last(&r).starts_with("a OK [CAPABILITY "), "{r:?}");
    // Continuation, with authzid = authcid.
    let mut c = t.client().await;
    c.send("b AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await.unwrap(), "+ \r\n");
    c.send(format!(
        "{}\r\n",
        b64(format!("{user}\0{user}\0{pw}").as_bytes())
    ))
    .await;
    let r = c.until_tagged("b").await;
    assert!(last(&r).starts_with("b OK [CAPABILITY "), "{r:?}");
    // `*` cancels.
    let mut c = t.client().await;
    c.send("c AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await.unwrap(), "+ \r\n");
    c.send("*\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        "c BAD Authentication cancelled\r\n"
    );
    // authzid ≠ authcid: refused like a wrong password (no acting for someone else).
    let r = c
        .cmd(
            "d",
            &format!(
                "AUTHENTICATE PLAIN {}",
                b64(format!("bob@example.org\0{user}\0{pw}").as_bytes())
            ),
        )
        .await;
    assert_eq!(last(&r), format!("d {FAILED}"));
    // Not base64: BAD.
    c.send("e AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await.unwrap(), "+ \r\n");
    c.send("!!!notbase64\r\n").await;
    assert_eq!(c.line().await.unwrap(), "e BAD Invalid SASL response\r\n");
}

#[tokio::test]
async fn app_password_with_or_without_spaces_and_in_capitals() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "bob@example.org";
    let pw = t.password(user);
    for variant in [pw.clone(), pw.replace(' ', ""), pw.to_uppercase()] {
        let mut c = t.client().await;
        let r = c
            .cmd("a", &format!("LOGIN {} \"{variant}\"", user.to_uppercase()))
            .await;
        assert!(
            last(&r).starts_with("a OK [CAPABILITY "),
            "{variant}: {r:?}"
        );
        assert!(
            !last(&r).contains("STARTTLS")
                && !last(&r).contains("LOGINDISABLED")
                && !last(&r).contains("AUTH="),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn commands_pipelined_behind_login_are_forwarded_in_order() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "carol@example.org";
    let mut c = t.client().await;
    c.send(format!(
        "a LOGIN {user} \"{}\"\r\nb SELECT INBOX\r\nc NOOP\r\nd LOGOUT\r\n",
        t.password(user)
    ))
    .await;
    let lines = c.until_tagged("d").await;
    let tagged: Vec<&str> = lines
        .iter()
        .filter(|l| !l.starts_with('*'))
        .map(|l| &l[..l.find(' ').unwrap()])
        .collect();
    assert_eq!(tagged, vec!["a", "b", "c", "d"], "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("b OK [READ-WRITE]")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn sessions_per_user_are_capped() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  max_sessions_per_user: 2".into(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "dave@example.org";
    let _a = t.logged_in(user).await;
    let b = t.logged_in(user).await;
    let mut c = t.client().await;
    let r = c
        .cmd("x", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert_eq!(last(&r), "x NO [LIMIT] Too many sessions for this user\r\n");
    drop(b);
    // The slot is freed when a session ends.
    let mut ok = false;
    for _ in 0..50 {
        let r = c
            .cmd("y", &format!("LOGIN {user} \"{}\"", t.password(user)))
            .await;
        if last(&r).starts_with("y OK") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "slot not freed");
}

#[tokio::test]
async fn revoked_app_passwords_stop_working_after_the_file_changes() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "erin@example.org";
    let _ = t.logged_in(user).await;
    let mut file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    for ap in &mut file.users.get_mut(user).unwrap().app_passwords {
        ap.revoked = true;
    }
    // Make sure the modification time changes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    file.save(&t.users_file).unwrap();
    let mut refused = false;
    for _ in 0..40 {
        let mut c = t.client().await;
        let r = c
            .cmd("a", &format!("LOGIN {user} \"{}\"", t.password(user)))
            .await;
        if last(&r) == format!("a {FAILED}") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused, "revoked app password still accepted");
    assert!(
        t.metric("imapgate_users_reloads_total", &["result=\"ok\""])
            .await
            >= 1.0
    );
}

// --- one argon2 run per guess (the keyed lookup index) ---------------------------------------

async fn hash_runs(t: &TestGateway) -> f64 {
    t.metric("imapgate_auth_hash_runs_total", &[]).await
}

/// LOGIN on a new connection; the tagged reply and the argon2 runs it cost.
async fn login_cost(t: &TestGateway, user: &str, password: &str) -> (String, f64) {
    let mut c = t.client().await;
    let before = hash_runs(t).await;
    let r = c.cmd("a", &format!("LOGIN {user} \"{password}\"")).await;
    (last(&r).to_owned(), hash_runs(t).await - before)
}

/// `imapgate app-password create USER -c CONFIG`, as an operator runs it; the new password.
fn create_app_password(t: &TestGateway, user: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["app-password", "create", user, "-c"])
        .arg(&t.config_path)
        .env_remove("IMAPGATE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_guess_costs_one_argon2_run_whatever_the_number_of_app_passwords() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "erin@example.org";
    // Nine more app passwords: ten active ones.
    let made: Vec<String> = (0..9).map(|_| create_app_password(&t, user)).collect();
    t.gw.reload();
    let (r, runs) = login_cost(&t, user, "abcd efgh ijkl mnop").await;
    assert_eq!(r, format!("a {FAILED}"));
    assert_eq!(runs, 1.0, "a wrong guess against ten app passwords");
    for pw in [&made[4], &made[8], &t.password(user)] {
        let (r, runs) = login_cost(&t, user, pw).await;
        assert!(r.starts_with("a OK"), "{r}");
        assert_eq!(runs, 1.0, "a right app password among ten");
    }
    let (r, runs) = login_cost(&t, "ghost@example.org", "abcd efgh ijkl mnop").await;
    assert_eq!(r, format!("a {FAILED}"));
    assert_eq!(runs, 1.0, "an unknown user");
    // A revoked app password's index no longer counts: one (dummy) run, and a failure.
    let file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    assert!(file.users[user]
        .app_passwords
        .iter()
        .all(|a| a.lookup.as_deref().is_some_and(|l| l.starts_with("k1:"))));
    let id = file.users[user].app_passwords[5].id.clone();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["app-password", "revoke", user, &id, "-c"])
        .arg(&t.config_path)
        .env_remove("IMAPGATE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    t.gw.reload();
    let (r, runs) = login_cost(&t, user, &made[4]).await;
    assert_eq!(r, format!("a {FAILED}"), "revoked app password accepted");
    assert_eq!(runs, 1.0);
}

#[tokio::test]
async fn app_passwords_made_before_indexes_are_capped_and_gain_an_index_at_their_first_login() {
    use imapgate::auth::users::{AppPassword, UsersFile};
    let Some(t) = TestGateway::start_with(Options {
        auth_extra: "  max_app_passwords_per_user: 2",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "frank@example.org";
    // Three app passwords from before indexes existed (no `lookup`), oldest first.
    let old: Vec<imapgate::secret::Secret> = (0..3)
        .map(|_| imapgate::auth::app_password::generate())
        .collect();
    let mut file = UsersFile::load(&t.users_file).unwrap();
    let now = time::OffsetDateTime::now_utc();
    file.users.get_mut(user).unwrap().app_passwords = old
        .iter()
        .zip(0i64..)
        .map(|(pw, i)| AppPassword {
            id: format!("ap_old{i}"),
            label: String::new(),
            hash: imapgate::auth::app_password::hash(pw, TEST_ARGON2).unwrap(),
            lookup: None,
            created: now - time::Duration::days(3 - i),
            expires: None,
            revoked: false,
        })
        .collect();
    file.save(&t.users_file).unwrap();
    t.gw.reload();
    let text = |pw: &imapgate::secret::Secret| pw.expose_str().unwrap().to_owned();
    let wrong = "abcd efgh ijkl mnop";
    // Verified the old way, but never more than the cap: the two newest.
    assert_eq!(
        login_cost(&t, user, wrong).await,
        (format!("a {FAILED}"), 2.0)
    );
    // The oldest is beyond the cap: not tried (`doctor` warns about such users).
    assert_eq!(
        login_cost(&t, user, &text(&old[0])).await,
        (format!("a {FAILED}"), 2.0)
    );
    for pw in [&old[2], &old[1]] {
        let (r, runs) = login_cost(&t, user, &text(pw)).await;
        assert!(r.starts_with("a OK"), "{r}");
        assert_eq!(runs, 2.0);
    }
    // The gateway writes their indexes back to the users file.
    let indexed = |ids: &[&str]| {
        let f = UsersFile::load(&t.users_file).unwrap();
        f.users[user]
            .app_passwords
            .iter()
            .filter(|a| ids.contains(&a.id.as_str()))
            .all(|a| a.lookup.as_deref().is_some_and(|l| l.starts_with("k1:")))
    };
    let mut done = false;
    for _ in 0..50 {
        if indexed(&["ap_old1", "ap_old2"]) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "no index written back");
    t.gw.reload();
    // Only the oldest lacks one now: a wrong guess costs its single run, and it logs in.
    assert_eq!(
        login_cost(&t, user, wrong).await,
        (format!("a {FAILED}"), 1.0)
    );
    let (r, runs) = login_cost(&t, user, &text(&old[0])).await;
    assert!(r.starts_with("a OK") && runs == 1.0, "{r} {runs}");
    for _ in 0..50 {
        if indexed(&["ap_old0"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.gw.reload();
    let f = UsersFile::load(&t.users_file).unwrap();
    for (i, ap) in f.users[user].app_passwords.iter().enumerate() {
        assert!(ap.lookup.is_some() && !ap.revoked, "ap {i} {ap:?}");
        assert!(imapgate::auth::app_password::verify(&old[i], &ap.hash));
    }
    // All indexed: one run per guess, right or wrong.
    assert_eq!(
        login_cost(&t, user, wrong).await,
        (format!("a {FAILED}"), 1.0)
    );
}

// --- the users file is written safely ----------------------------------------------------------

/// Gives `user`'s app password a hash with other argon2 parameters than the gateway's, so that
/// its next login writes a re-hash back to the users file.
fn make_rehash_due(t: &TestGateway, user: &str) {
    use imapgate::auth::users::UsersFile;
    let pw = secret(&t.password(user).replace(' ', ""));
    let mut file = UsersFile::load(&t.users_file).unwrap();
    let params = imapgate::config::Argon2Params {
        m_kib: 2048,
        t: 1,
        p: 1,
    };
    file.users.get_mut(user).unwrap().app_passwords[0].hash =
        imapgate::auth::app_password::hash(&pw, params).unwrap();
    file.save(&t.users_file).unwrap();
    t.gw.reload();
}

#[tokio::test]
async fn a_revocation_written_while_a_login_writes_back_survives() {
    use imapgate::auth::users::UsersFile;
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "dave@example.org";
    make_rehash_due(&t, user);
    let before = std::fs::read_to_string(&t.users_file).unwrap();
    // An operator command holds the users file's lock while it reads and writes the file.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(t.users_file.with_file_name(".users.yaml.lock"))
        .unwrap();
    lock.lock().unwrap();
    let (r, _) = login_cost(&t, user, &t.password(user)).await;
    assert!(r.starts_with("a OK"), "{r}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        std::fs::read_to_string(&t.users_file).unwrap(),
        before,
        "the gateway wrote the users file while another writer held its lock"
    );
    // The command writes the revocation it was making (from what it read) and lets go.
    let mut revoked = UsersFile::parse(&before).unwrap();
    revoked.users.get_mut(user).unwrap().app_passwords[0].revoked = true;
    let tmp = t.users_file.with_file_name(".users.yaml.test.tmp");
    std::fs::write(&tmp, serde_saphyr::to_string(&revoked).unwrap()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::rename(&tmp, &t.users_file).unwrap();
    drop(lock);
    // The re-hash now runs on the file as it is: the revocation stays, and counts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = UsersFile::load(&t.users_file).unwrap();
    assert!(
        now.users[user].app_passwords[0].revoked,
        "the re-hash undid the revocation"
    );
    t.gw.reload();
    let (r, _) = login_cost(&t, user, &t.password(user)).await;
    assert_eq!(r, format!("a {FAILED}"));
}

#[tokio::test]
async fn a_symlink_planted_at_the_old_temporary_name_is_not_followed() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "carol@example.org";
    make_rehash_due(&t, user);
    // The name the gateway used to write through (this process is the gateway).
    let planted = t
        .users_file
        .with_file_name(format!(".users.yaml.tmp{}", std::process::id()));
    let victim = t.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let (r, _) = login_cost(&t, user, &t.password(user)).await;
    assert!(r.starts_with("a OK"), "{r}");
    // Wait for the re-hash to land.
    let first = std::fs::read_to_string(&t.users_file).unwrap_or_default();
    for _ in 0..50 {
        if std::fs::read_to_string(&t.users_file).unwrap_or_default() != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let meta = std::fs::symlink_metadata(&t.users_file).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the users file became a symlink"
    );
    let file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    assert!(file.users[user].app_passwords[0]
        .hash
        .contains("m=1024,t=1,p=1"));
}
