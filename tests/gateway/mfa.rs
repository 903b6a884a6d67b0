//! App password + TOTP against the real Dovecot: codes, replay, unlock windows bound to the
//! client's subnet, revocation, the verified cache, and the operator CLI on a running gateway.
//! Users whose name starts with "m" are enrolled in TOTP by the harness; `127.0.1.1` is a
//! client address in another /24 than `127.0.0.1`.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

const FAILED: &str = "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n";

fn ok(reply: &str) -> bool {
    reply.starts_with("a OK [CAPABILITY ")
}

#[tokio::test]
async fn password_plus_code_unlocks_for_the_subnet_and_a_code_works_once() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "mia@example.org";
    let pw = t.password(user);
    // Outside a window, the bare app password is not enough.
    assert_eq!(t.login_from("127.0.0.1", user, &pw).await, FAILED);
    assert_eq!(
        t.metric("imapgate_totp_failures_total", &["reason=\"code_missing\""])
            .await,
        1.0
    );
    let code = t.code(user, 0);
    let saved = format!("{pw}{code}");
    // App password + code logs in and unlocks this app password for 127.0.0.0/24.
    assert!(ok(&t.login_from("127.0.0.1", user, &saved).await));
    // The client that saved "password + code" keeps reconnecting: appended digits are not evaluated.
    assert!(ok(&t.login_from("127.0.0.2", user, &saved).await));
    assert!(ok(&t
        .login_from("127.0.0.1", user, &format!("{pw}000000"))
        .await));
    // And the bare app password works inside the window too.
    assert!(ok(&t.login_from("127.0.0.1", user, &pw).await));
    // Another subnet: not unlocked, and the same code is refused there (used once).
    assert_eq!(t.login_from("127.0.1.1", user, &saved).await, FAILED);
    assert_eq!(
        t.metric(
            "imapgate_totp_failures_total",
            &["reason=\"code_replayed\""]
        )
        .await,
        1.0
    );
    assert_eq!(t.login_from("127.0.1.1", user, &pw).await, FAILED);
    // A fresh code unlocks that subnet as well.
    let next = t.code(user, 1);
    if next != code {
        assert!(ok(&t
            .login_from("127.0.1.1", user, &format!("{pw}{next}"))
            .await));
    }
}

#[tokio::test]
async fn with_unlock_ttl_zero_every_login_needs_a_fresh_code() {
    let Some(t) = TestGateway::start_with(Options {
        mfa: "{ default: optional, unlock_ttl: 0 }",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "max@example.org";
    let pw = t.password(user);
    let code = t.code(user, 0);
    assert!(ok(&t
        .login_from("127.0.0.1", user, &format!("{pw}{code}"))
        .await));
    assert_eq!(
        t.login_from("127.0.0.1", user, &format!("{pw}{code}"))
            .await,
        FAILED,
        "code replayed"
    );
    assert_eq!(
        t.login_from("127.0.0.1", user, &pw).await,
        FAILED,
        "unlocked with ttl 0"
    );
}

#[tokio::test]
async fn the_unlock_window_ends() {
    let Some(t) = TestGateway::start_with(Options {
        mfa: "{ default: optional, unlock_ttl: 2s }",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "mo@example.org";
    let pw = t.password(user);
    assert!(ok(&t
        .login_from("127.0.0.1", user, &format!("{pw}{}", t.code(user, 0)))
        .await));
    assert!(ok(&t.login_from("127.0.0.1", user, &pw).await));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        t.login_from("127.0.0.1", user, &pw).await,
        FAILED,
        "window did not end"
    );
}

#[tokio::test]
async fn old_codes_wrong_codes_and_wrong_passwords_look_identical() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "milo@example.org";
    let pw = t.password(user);
    // A code three steps old is refused (unless it happens to equal a code inside the window).
    let old = t.code(user, -3);
    let window = [t.code(user, -1), t.code(user, 0), t.code(user, 1)];
    if !window.contains(&old) {
        assert_eq!(
            t.login_from("127.0.0.1", user, &format!("{pw}{old}")).await,
            FAILED
        );
    }
    // Wrong code with the right password, and the right code with a wrong password: the same bytes.
    // A wrong code that was never this user's code in the last hours (so it counts as bad_code).
    let secret = &t.totp.iter().find(|(u, _)| u == user).unwrap().1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let wrong_code = (0..1000)
        .map(|i| format!("{:06}", 123_457 * i % 1_000_000))
        .find(|c| {
            !window.contains(c)
                && !imapgate::auth::totp::was_valid_within(
                    secret,
                    c,
                    now,
                    6,
                    Duration::from_secs(12 * 3600),
                )
        })
        .unwrap();
    let a = t
        .login_from("127.0.0.1", user, &format!("{pw}{wrong_code}"))
        .await;
    let b = t
        .login_from(
            "127.0.0.1",
            user,
            &format!("qqqqwwwweeeerrrr{}", t.code(user, 0)),
        )
        .await;
    assert_eq!(a, FAILED);
    assert_eq!(a.as_bytes(), b.as_bytes());
    assert!(
        t.metric("imapgate_totp_failures_total", &["reason=\"bad_code\""])
            .await
            >= 1.0,
        "leaked app password not counted"
    );
}

#[tokio::test]
async fn mfa_required_without_enrolment_and_network_policy_refuse() {
    let Some(t) = TestGateway::start_with(Options {
        mfa: "{ default: required }",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    // alice has no TOTP: under `required` she cannot log in at all.
    let user = "alice@example.org";
    assert_eq!(
        t.login_from("127.0.0.1", user, &t.password(user)).await,
        FAILED
    );
    assert_eq!(
        t.metric(
            "imapgate_totp_failures_total",
            &["reason=\"mfa_not_enrolled\""]
        )
        .await,
        1.0
    );
    // A per-user override (mfa: off) and allowed networks, edited while the gateway runs.
    let mut file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    file.users.get_mut(user).unwrap().mfa = Some(imapgate::config::MfaMode::Off);
    file.users.get_mut("bob@example.org").unwrap().mfa = Some(imapgate::config::MfaMode::Off);
    file.users
        .get_mut("bob@example.org")
        .unwrap()
        .allowed_networks = vec!["127.0.1.0/24".parse().unwrap()];
    tokio::time::sleep(Duration::from_millis(1100)).await;
    file.save(&t.users_file).unwrap();
    let mut reloaded = false;
    for _ in 0..40 {
        if ok(&t.login_from("127.0.0.1", user, &t.password(user)).await) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(reloaded, "mfa: off not picked up");
    let bob = "bob@example.org";
    assert_eq!(
        t.login_from("127.0.0.1", bob, &t.password(bob)).await,
        FAILED,
        "outside allowed_networks"
    );
    assert!(ok(&t.login_from("127.0.1.1", bob, &t.password(bob)).await));
}

#[tokio::test]
async fn five_parallel_logins_run_argon2_once() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "carol@example.org";
    let pw = t.password(user);
    let before = t.metric("imapgate_auth_hash_runs_total", &[]).await;
    let (a, b, c, d, e) = tokio::join!(
        t.login_from("127.0.0.1", user, &pw),
        t.login_from("127.0.0.2", user, &pw),
        t.login_from("127.0.0.3", user, &pw),
        t.login_from("127.0.0.4", user, &pw),
        t.login_from("127.0.0.5", user, &pw),
    );
    let replies = [a, b, c, d, e];
    assert!(replies.iter().all(|r| ok(r)), "{replies:?}");
    assert_eq!(
        t.metric("imapgate_auth_hash_runs_total", &[]).await - before,
        1.0
    );
    assert_eq!(t.metric("imapgate_auth_cache_hits_total", &[]).await, 4.0);
}

#[tokio::test]
async fn revoking_one_app_password_leaves_the_others_and_closes_its_sessions() {
    let Some(t) = TestGateway::start_with(Options {
        auth_extra: "  revoke_closes_sessions: true",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "dave@example.org";
    // A second app password for dave, created with the CLI against the running gateway's files.
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["app-password", "create", user, "--label", "phone", "-c"])
        .arg(&t.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut relayed = t.logged_in(user).await;
    relayed.cmd("s", "SELECT INBOX").await;
    // Revoke the first one with the CLI.
    let file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    let first_id = file.users[user].app_passwords[0].id.clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["app-password", "revoke", user, &first_id, "-c"])
        .arg(&t.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The session that used it is closed; new logins with it fail; the second keeps working.
    assert!(
        relayed.closed_within(Duration::from_secs(8)).await,
        "revoked session still open"
    );
    assert_eq!(
        t.login_from("127.0.0.1", user, &t.password(user)).await,
        FAILED
    );
    assert!(ok(&t.login_from("127.0.0.1", user, &second).await));
}

#[tokio::test]
async fn totp_enroll_with_the_cli_on_a_running_gateway() {
    let Some(t) = TestGateway::start_with(Options {
        mfa: "{ default: required }",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let user = "erin@example.org";
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["totp", "enroll", user, "--no-verify", "-c"])
        .arg(&t.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uri = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains('█') || stderr.contains('▀') || stderr.contains('▄'),
        "no QR code drawn"
    );
    // A valid otpauth URI.
    assert!(
        uri.starts_with("otpauth://totp/imapgate:erin@example.org?secret="),
        "{uri}"
    );
    for part in ["issuer=imapgate", "algorithm=SHA1", "digits=6", "period=30"] {
        assert!(uri.contains(part), "{uri}");
    }
    let b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    let secret = base32_decode(&b32);
    assert_eq!(secret.len(), 20, "160-bit secret");
    // The users file holds only the ciphertext.
    let on_disk = std::fs::read_to_string(&t.users_file).unwrap();
    assert!(
        !on_disk.contains(&b32) && on_disk.contains("totp: k1:"),
        "secret in the clear"
    );
    for (u, pw) in &t.passwords {
        assert!(
            !on_disk.contains(pw.as_str()) && !on_disk.contains(&pw.replace(' ', "")),
            "app password of {u} in the clear"
        );
    }
    // The running gateway sees the enrolment: app password + code from the URI logs in.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code =
        imapgate::auth::totp::code_at(&imapgate::secret::Secret::new(secret), now, 6).unwrap();
    let pw = t.password(user);
    let mut ok_seen = false;
    for _ in 0..40 {
        if ok(&t
            .login_from("127.0.0.1", user, &format!("{pw}{code}"))
            .await)
        {
            ok_seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ok_seen, "enrolment not seen by the running gateway");
    // totp reset: the next login without a window needs enrolment again.
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["totp", "reset", user, "-c"])
        .arg(&t.config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    assert!(file.users[user].totp.is_none());
    // The reset ends the unlock window that the enrolled code opened.
    let mut refused = false;
    for _ in 0..40 {
        if t.login_from("127.0.0.1", user, &pw).await == FAILED {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused, "unlock survived totp reset");
}

pub(crate) fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("not base32: {s}"),
        };
        buf = (buf << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn hashes_with_old_parameters_are_rehashed_at_login() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "frank@example.org";
    let pw = t.password(user);
    let old = imapgate::config::Argon2Params {
        m_kib: 512,
        t: 1,
        p: 1,
    };
    let mut file = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
    let secret = imapgate::secret::Secret::from_slice(pw.replace(' ', "").as_bytes());
    file.users.get_mut(user).unwrap().app_passwords[0].hash =
        imapgate::auth::app_password::hash(&secret, old).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    file.save(&t.users_file).unwrap();
    let mut rehashed = false;
    for _ in 0..40 {
        let _ = t.login_from("127.0.0.1", user, &pw).await;
        let now = imapgate::auth::users::UsersFile::load(&t.users_file).unwrap();
        if now.users[user].app_passwords[0]
            .hash
            .contains("m=1024,t=1,p=1")
        {
            rehashed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rehashed, "old-parameter hash not re-hashed");
    assert!(ok(&t.login_from("127.0.0.1", user, &pw).await));
}
