//! Hostile and malformed input before authentication: limits, literals, tags, NUL bytes,
//! deadlines. Each case asserts the reply and that the gateway still serves a fresh client.

use std::time::Duration;

use crate::harness::*;

async fn still_serves(t: &TestGateway) {
    let mut c = t.client().await;
    let r = c.cmd("z", "NOOP").await;
    assert_eq!(r, vec!["z OK NOOP completed\r\n"]);
}

#[tokio::test]
async fn oversized_line_is_refused_before_its_end() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    // 100 KiB without a line end: the gateway must not wait for the end.
    let _ = c.try_send(vec![b'a'; 100 * 1024]).await;
    let l = c.line().await.unwrap();
    assert_eq!(l, "* BYE [TOOBIG] Line too long\r\n");
    assert!(c.closed_within(Duration::from_secs(3)).await);
    still_serves(&t).await;
}

#[tokio::test]
async fn literals_before_authentication_are_bounded_and_synchronising_only() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    // Oversized literal: refused without a continuation, and the connection stays usable.
    for big in ["{9000}", "{4294967296}", "{18446744073709551616}"] {
        c.send(format!("a LOGIN {big}\r\n")).await;
        let l = c.line().await.unwrap();
        assert_eq!(l, "a BAD [TOOBIG] Literal too large\r\n", "{big}");
    }
    // `{-1}` is no literal: a parse error.
    let r = c.cmd("b", "LOGIN {-1}").await;
    assert_eq!(last(&r), "b BAD Invalid command\r\n");
    drop(c);
    // A non-synchronising literal smuggles bytes: the connection is closed.
    let mut c = t.client().await;
    c.send("c LOGIN {5+}\r\nalice x\r\nd CAPABILITY\r\n").await;
    let l = c.line().await.unwrap();
    assert!(l.starts_with("* BYE"), "{l}");
    assert!(c.closed_within(Duration::from_secs(3)).await);
    assert!(!c.pending().contains("d OK"));
    // A synchronising literal of allowed size works (the login goes through).
    let mut c = t.client().await;
    let user = "dave@example.org";
    let pw = t.password(user);
    c.send(format!("e LOGIN {{{}}}\r\n", user.len())).await;
    assert_eq!(c.line().await.unwrap(), "+ Ready\r\n");
    c.send(format!("{user} {{{}}}\r\n", pw.len())).await;
    assert_eq!(c.line().await.unwrap(), "+ Ready\r\n");
    c.send(format!("{pw}\r\n")).await;
    let r = c.until_tagged("e").await;
    assert!(last(&r).starts_with("e OK [CAPABILITY"), "{r:?}");
    still_serves(&t).await;
}

#[tokio::test]
async fn invalid_tags_are_never_echoed_and_bad_input_ends_in_bye() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    let long_tag = "t".repeat(1000) + "*";
    for input in [
        "* NOOP\r\n",
        "+ NOOP\r\n",
        "\r\n",
        &format!("{long_tag} NOOP\r\n"),
    ] {
        c.send(input).await;
        let l = c.line().await.unwrap();
        assert_eq!(l, "* BAD Invalid command\r\n", "input {input:?}");
    }
    // The fifth bad command: BAD then BYE and close.
    c.send("x\0y NOOP\r\n").await;
    assert_eq!(c.line().await.unwrap(), "* BAD Invalid command\r\n");
    assert_eq!(
        c.line().await.unwrap(),
        "* BYE Too many invalid commands\r\n"
    );
    assert!(c.closed_within(Duration::from_secs(3)).await);
    still_serves(&t).await;
}

#[tokio::test]
async fn nul_bytes_and_unknown_commands_get_bad() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    let r = c.cmd("a", "LOGIN \"al\0ice\" \"pw\"").await;
    assert_eq!(last(&r), "a BAD Invalid command\r\n");
    let r = c.cmd("b", "SELECT INBOX").await;
    assert_eq!(
        last(&r),
        "b BAD Command not allowed before authentication\r\n"
    );
    let r = c.cmd("c", "AUTHENTICATE CRAM-MD5").await;
    assert_eq!(last(&r), "c NO Unsupported mechanism\r\n");
    let r = c.cmd("d", "ID (\"name\" \"probe\")").await;
    assert_eq!(
        r,
        vec!["* ID NIL\r\n", "d OK ID completed\r\n"],
        "ID reveals no product"
    );
    let r = c.cmd("e", "LOGOUT").await;
    assert_eq!(
        r,
        vec!["* BYE Logging out\r\n", "e OK LOGOUT completed\r\n"]
    );
    assert!(c.closed_within(Duration::from_secs(3)).await);
}

#[tokio::test]
async fn deep_nesting_does_not_hurt() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = t.client().await;
    // Within the line limit: 8000 opening parentheses.
    let r = c.cmd("a", &format!("ID {}", "(".repeat(8000))).await;
    assert_eq!(last(&r), "a BAD Invalid command\r\n");
    still_serves(&t).await;
}

#[tokio::test]
async fn preauth_idle_and_total_deadlines() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  preauth_idle_timeout: 1s\n  preauth_total_timeout: 3s".into(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut c = t.client().await;
    assert_eq!(
        c.line_within(Duration::from_secs(5)).await.unwrap(),
        "* BYE Idle timeout\r\n"
    );
    assert!(c.closed_within(Duration::from_secs(3)).await);
    // Slowloris: one byte every 500 ms never idles out but hits the total deadline.
    let mut c = t.client().await;
    let started = std::time::Instant::now();
    for b in b"a NOOP".iter().cycle().take(20) {
        if c.try_send([*b]).await.is_err() || c.closed_within(Duration::from_millis(500)).await {
            break;
        }
    }
    assert!(
        c.pending().contains("* BYE Authentication timeout"),
        "{:?}",
        c.pending()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "slowloris lived {:?}",
        started.elapsed()
    );
}
