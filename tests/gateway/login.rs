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
