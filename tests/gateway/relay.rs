//! After login: the relay is byte-for-byte (a 5 MB FETCH compared with Dovecot's own answer),
//! IDLE sees pushes, APPEND with large literals works.

use std::time::Duration;

use crate::harness::*;

/// A deterministic 5 MB message.
fn big_message() -> Vec<u8> {
    let mut m =
        b"From: big@example.org\r\nTo: alice@example.org\r\nSubject: five megabytes\r\n\r\n"
            .to_vec();
    let mut i = 0u64;
    while m.len() < 5 * 1024 * 1024 {
        m.extend_from_slice(format!("line {i:08} {}\r\n", "x".repeat(60)).as_bytes());
        i += 1;
    }
    m
}

/// Reads a FETCH response's bytes up to (not including) the tagged OK, whose text carries
/// Dovecot's timing and so differs between runs.
async fn fetch_raw(c: &mut Client, tag: &str, cmd: &str) -> Vec<u8> {
    c.send(format!("{tag} {cmd}\r\n")).await;
    let mut raw = Vec::new();
    loop {
        let l = c.line().await.expect("EOF in FETCH");
        if l.starts_with(&format!("{tag} ")) {
            assert!(l.starts_with(&format!("{tag} OK")), "{l}");
            return raw;
        }
        raw.extend_from_slice(l.as_bytes());
        if let Some(n) = l
            .trim_end()
            .strip_suffix('}')
            .and_then(|x| x.rsplit_once('{'))
            .and_then(|(_, n)| n.parse::<usize>().ok())
        {
            raw.extend(c.exact(n).await);
        }
    }
}

#[tokio::test]
async fn five_megabyte_fetch_is_byte_identical_to_dovecot() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "alice@example.org";
    let msg = big_message();
    append_direct(&t.dovecot, user, &msg).await;
    let mut direct = dovecot_direct(&t.dovecot, user).await;
    direct.cmd("s", "EXAMINE INBOX").await;
    let want = fetch_raw(&mut direct, "f", "UID FETCH 1:* (UID BODY.PEEK[])").await;
    let mut gw = t.logged_in(user).await;
    gw.cmd("s", "EXAMINE INBOX").await;
    let got = fetch_raw(&mut gw, "f", "UID FETCH 1:* (UID BODY.PEEK[])").await;
    assert!(want.len() > 5 * 1024 * 1024, "{}", want.len());
    assert!(
        got == want,
        "gateway FETCH differs from Dovecot's ({} vs {} bytes)",
        got.len(),
        want.len()
    );
    let relayed = t
        .metric("imapgate_relay_bytes_total", &["direction=\"to_client\""])
        .await;
    assert!(relayed >= want.len() as f64);
}

#[tokio::test]
async fn idle_receives_exists_when_mail_arrives() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "bob@example.org";
    let mut c = t.logged_in(user).await;
    let sel = c.cmd("s", "SELECT INBOX").await;
    let exists = sel
        .iter()
        .find_map(|l| {
            l.strip_prefix("* ")
                .and_then(|r| r.strip_suffix(" EXISTS\r\n"))
                .and_then(|n| n.parse::<u32>().ok())
        })
        .unwrap();
    c.send("i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with('+'));
    append_direct(
        &t.dovecot,
        user,
        b"From: a@example.org\r\nSubject: ping\r\n\r\nhello\r\n",
    )
    .await;
    let pushed = c.line_within(Duration::from_secs(15)).await.unwrap();
    assert_eq!(pushed, format!("* {} EXISTS\r\n", exists + 1));
    c.send("DONE\r\n").await;
    let r = c.until_tagged("i").await;
    assert!(last(&r).starts_with("i OK"), "{r:?}");
}

#[tokio::test]
async fn append_of_a_large_literal_through_the_gateway() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "carol@example.org";
    let mut c = t.logged_in(user).await;
    let msg = big_message();
    c.send(format!("a APPEND INBOX {{{}}}\r\n", msg.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send(&msg).await;
    c.send("\r\n").await;
    let r = c.until_tagged("a").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    let r = c.cmd("b", "STATUS INBOX (MESSAGES)").await;
    assert!(r[0].contains("MESSAGES"), "{r:?}");
}

#[tokio::test]
async fn compress_deflate_passes_through() {
    use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let user = "frank@example.org";
    let mut c = t.client().await;
    let r = c
        .cmd("l", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(
        last(&r).contains("COMPRESS=DEFLATE"),
        "backend capability not passed on: {r:?}"
    );
    let r = c.cmd("z", "COMPRESS DEFLATE").await;
    assert!(last(&r).starts_with("z OK"), "{r:?}");
    // From here on both directions are raw DEFLATE (RFC 4978); the gateway relays it unchanged.
    let mut comp = Compress::new(Compression::default(), false);
    let mut dec = Decompress::new(false);
    let mut wire = Vec::with_capacity(256);
    comp.compress_vec(b"n SELECT INBOX\r\n", &mut wire, FlushCompress::Sync)
        .unwrap();
    c.send(&wire).await;
    let mut text = Vec::new();
    while !String::from_utf8_lossy(&text).contains("n OK") {
        let chunk = c.raw().await;
        let mut out = Vec::with_capacity(64 * 1024);
        dec.decompress_vec(&chunk, &mut out, FlushDecompress::Sync)
            .unwrap();
        text.extend(out);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("EXISTS") && text.contains("n OK [READ-WRITE]"),
        "{text}"
    );
}
