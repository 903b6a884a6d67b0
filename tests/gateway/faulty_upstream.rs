//! The faulty-upstream suite: a scripted IMAP backend that misbehaves in the ways Dovecot cannot
//! be made to (closing or stalling in the middle of the master login or of a FETCH literal,
//! answering with garbage), chosen by the user's name. Each fault must end in `NO [UNAVAILABLE]`
//! or a clean close within the configured timeouts, and never disturb another user's session:
//! every relayed NOOP answers with the name the backend logged in, so a session handed to the
//! wrong user would show. (Refused connections, silence, PREAUTH/BYE greetings, a missing
//! STARTTLS, a rejected master login and a wrong certificate are in `upstream.rs`.) It also
//! plays a backend that offers UNAUTHENTICATE (RFC 8437) after login, which Dovecot does not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

const UNAVAILABLE: &str = "NO [UNAVAILABLE] Service temporarily unavailable\r\n";
const FETCH_SIZE: usize = 2_000_000;
const FAULTY: &[&str] = &[
    "closelogin@example.org",
    "stalllogin@example.org",
    "garbagelogin@example.org",
    "rejectlogin@example.org",
    "cutfetch@example.org",
    "stallfetch@example.org",
    "deadlinelogin@example.org",
    "unauth@example.org",
];

/// Reads one command, literals included (synchronising ones get a `+`); `None` at the end.
async fn command(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut cmd = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        cmd.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        let Some(open) = text
            .trim_end()
            .strip_suffix('}')
            .and_then(|t| t.rfind('{').map(|i| (t, i)))
        else {
            return Some(cmd);
        };
        let (t, i) = open;
        let spec = &t[i + 1..];
        let (n, sync) = match spec.strip_suffix('+') {
            Some(n) => (n, false),
            None => (spec, true),
        };
        let n: usize = n.parse().ok()?;
        if sync {
            r.get_mut().write_all(b"+ go ahead\r\n").await.ok()?;
        }
        let mut lit = vec![0u8; n];
        r.read_exact(&mut lit).await.ok()?;
        cmd.extend_from_slice(&lit);
    }
}

/// The user of a master-user LOGIN (`LOGIN "user*gateway" "…"`, quoted, atom or literal).
fn login_user(cmd: &[u8]) -> String {
    let text = String::from_utf8_lossy(cmd);
    let rest = text.split_once(" LOGIN ").map(|x| x.1).unwrap_or_default();
    let rest = match rest.find("}\r\n") {
        Some(i) if rest.starts_with('{') => &rest[i + 3..],
        _ => rest.trim_start_matches('"'),
    };
    rest.split('*').next().unwrap_or_default().to_owned()
}

async fn serve(s: TcpStream) {
    let mut r = BufReader::new(s);
    if r.get_mut()
        .write_all(b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+] scripted ready\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut user = String::new();
    while let Some(cmd) = command(&mut r).await {
        let text = String::from_utf8_lossy(&cmd).into_owned();
        let mut words = text.split(' ');
        let tag = words.next().unwrap_or("*").to_owned();
        let verb = words.next().unwrap_or("").trim().to_ascii_uppercase();
        let w = r.get_mut();
        let reply = match verb.as_str() {
            "CAPABILITY" if user.starts_with("unauth@") => {
                format!("* CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE\r\n{tag} OK done\r\n")
            }
            "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 ID LITERAL+\r\n{tag} OK done\r\n"),
            // RFC 8437: back to the not-authenticated state, where LOGIN works again.
            "UNAUTHENTICATE" if !user.is_empty() => {
                user.clear();
                format!("{tag} OK [CAPABILITY IMAP4rev1 ID LITERAL+] back to the login\r\n")
            }
            "ID" => format!("* ID NIL\r\n{tag} OK ID done\r\n"),
            "LOGIN" => {
                user = login_user(&cmd);
                match user.split('@').next().unwrap_or_default() {
                    "closelogin" => return,
                    local @ ("stalllogin" | "deadlinelogin") => {
                        // Half a literal, then silence until the gateway hangs up.
                        let _ = w.write_all(b"* 1 FETCH (BODY[] {100}\r\nabc").await;
                        let count = if local == "stalllogin" {
                            &STALLED_LOGINS_HUNG_UP
                        } else {
                            &DEADLINE_LOGINS_HUNG_UP
                        };
                        wait_for_hangup(&mut r, count).await;
                        return;
                    }
                    "garbagelogin" => format!("\0\u{7f}garbage }}{{ ({tag}\r\n"),
                    "rejectlogin" => format!("{tag} NO [AUTHENTICATIONFAILED] master rejected\r\n"),
                    "unauth" => {
                        format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE] Logged in\r\n")
                    }
                    _ => format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
                }
            }
            "NOOP" => format!("* OK [ALERT] session of {user}\r\n{tag} OK NOOP done\r\n"),
            "LOGOUT" => {
                let _ = w
                    .write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes())
                    .await;
                return;
            }
            "FETCH" => {
                let head = format!("* 1 FETCH (BODY[] {{{FETCH_SIZE}}}\r\n");
                if w.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'm'; 100 * 1024];
                match user.split('@').next().unwrap_or_default() {
                    "cutfetch" => {
                        let _ = w.write_all(&chunk).await;
                        return;
                    }
                    "stallfetch" => {
                        let _ = w.write_all(&chunk).await;
                        wait_for_hangup(&mut r, &STALLED_FETCHES_HUNG_UP).await;
                        return;
                    }
                    _ => {}
                }
                for _ in 0..FETCH_SIZE / chunk.len() {
                    if w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let rest = FETCH_SIZE % chunk.len();
                let _ = w.write_all(&chunk[..rest]).await;
                format!(")\r\n{tag} OK FETCH done\r\n")
            }
            _ => format!("{tag} BAD unknown\r\n"),
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Stalled backend connections the gateway closed (the scripted backend sees the end).
static STALLED_LOGINS_HUNG_UP: AtomicUsize = AtomicUsize::new(0);
static STALLED_FETCHES_HUNG_UP: AtomicUsize = AtomicUsize::new(0);
static DEADLINE_LOGINS_HUNG_UP: AtomicUsize = AtomicUsize::new(0);

/// Silence until the gateway closes the connection (bounded: the test's own limit).
async fn wait_for_hangup(r: &mut BufReader<TcpStream>, count: &AtomicUsize) {
    let mut sink = Vec::new();
    if let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut sink)).await
    {
        count.fetch_add(1, Ordering::SeqCst);
    }
}

async fn scripted_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    (addr, h)
}

async fn gateway(backend: SocketAddr, limits: &str) -> Option<TestGateway> {
    TestGateway::start_with(Options {
        backend_address: Some(backend),
        backend_tls: "none",
        extra_users: FAULTY.iter().map(|s| s.to_string()).collect(),
        limits: format!("  max_connections: 1000\n{limits}"),
        ..Default::default()
    })
    .await
}

async fn noop_says(c: &mut Client, user: &str) {
    let r = c.cmd("n", "NOOP").await;
    assert_eq!(
        r,
        vec![
            format!("* OK [ALERT] session of {user}\r\n"),
            "n OK NOOP done\r\n".to_owned()
        ]
    );
}

async fn login(t: &TestGateway, user: &str) -> (Vec<String>, Client) {
    let mut c = t.client().await;
    let r = c
        .cmd("a", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    (r, c)
}

#[tokio::test]
async fn faults_during_the_master_login_end_in_unavailable_within_the_login_timeout() {
    let (addr, h) = scripted_backend().await;
    let Some(t) = gateway(addr, "").await else {
        return;
    };
    // A bystander logged in before the faults and used after each.
    let (r, mut alice) = login(&t, "alice@example.org").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    noop_says(&mut alice, "alice@example.org").await;
    // The harness's backend login_timeout is 5 s.
    for (user, at_least, at_most) in [
        ("closelogin@example.org", 0, 3),
        ("garbagelogin@example.org", 0, 3),
        ("rejectlogin@example.org", 0, 3),
        ("stalllogin@example.org", 4, 8),
    ] {
        let started = Instant::now();
        let (r, mut c) = login(&t, user).await;
        let took = started.elapsed();
        assert_eq!(r, vec![format!("a {UNAVAILABLE}")], "{user}");
        assert!(
            took >= Duration::from_secs(at_least) && took < Duration::from_secs(at_most),
            "{user}: {took:?}"
        );
        // The connection stays in the pre-auth state: the client may try again or leave.
        assert_eq!(
            c.cmd("x", "NOOP").await,
            vec!["x OK NOOP completed\r\n"],
            "{user}"
        );
        noop_says(&mut alice, "alice@example.org").await;
    }
    assert_eq!(t.metric("imapgate_sessions_relayed", &[]).await, 1.0);
    // The timed-out login's backend connection was closed by the gateway, not left behind.
    let deadline = Instant::now() + Duration::from_secs(3);
    while STALLED_LOGINS_HUNG_UP.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled login's connection was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for result in ["closed", "protocol", "rejected", "timeout"] {
        let label = format!("result=\"{result}\"");
        assert_eq!(
            t.metric("imapgate_upstream_logins_total", &[&label]).await,
            1.0,
            "{result}"
        );
    }
    h.abort();
}

#[tokio::test]
async fn faults_in_the_middle_of_a_fetch_close_cleanly_and_touch_no_other_session() {
    let (addr, h) = scripted_backend().await;
    let Some(t) = gateway(addr, "").await else {
        return;
    };
    let (r, mut alice) = login(&t, "alice@example.org").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    // A whole 2 MB FETCH goes through for the bystander.
    alice.send("f FETCH 1 BODY[]\r\n").await;
    let head = alice.line().await.unwrap();
    assert_eq!(head, format!("* 1 FETCH (BODY[] {{{FETCH_SIZE}}}\r\n"));
    let body = alice.exact(FETCH_SIZE).await;
    assert!(body.iter().all(|b| *b == b'm'));
    assert_eq!(alice.line().await.unwrap(), ")\r\n");
    assert_eq!(alice.line().await.unwrap(), "f OK FETCH done\r\n");

    // The backend closes after 100 KiB of a 2 MB literal: the client gets those bytes, then
    // the end of the connection at once (nothing may be injected into a literal). Meanwhile
    // the bystander keeps using its session.
    let (r, mut c) = login(&t, "cutfetch@example.org").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    noop_says(&mut c, "cutfetch@example.org").await;
    c.send("f FETCH 1 BODY[]\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        format!("* 1 FETCH (BODY[] {{{FETCH_SIZE}}}\r\n")
    );
    let (closed, ()) = tokio::join!(c.closed_within(Duration::from_secs(3)), async {
        noop_says(&mut alice, "alice@example.org").await;
    });
    assert!(
        closed,
        "the client of a broken backend connection was left open"
    );
    assert_eq!(c.pending().len(), 100 * 1024);

    // The backend goes silent in the middle of the literal. The gateway invents nothing: the
    // client waits (a relay knows no IMAP; `relay_idle_timeout`, at least 30 min, ends it —
    // see relay::tests for that timer), other sessions are unaffected, and when the client
    // gives up, the gateway hangs up on the backend at once.
    let (r, mut c) = login(&t, "stallfetch@example.org").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    c.send("f FETCH 1 BODY[]\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        format!("* 1 FETCH (BODY[] {{{FETCH_SIZE}}}\r\n")
    );
    let (closed, ()) = tokio::join!(c.closed_within(Duration::from_secs(2)), async {
        for _ in 0..3 {
            noop_says(&mut alice, "alice@example.org").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    assert!(!closed);
    assert_eq!(c.pending().len(), 100 * 1024);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(3);
    while STALLED_FETCHES_HUNG_UP.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled backend connection was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everything of the broken sessions is gone; the user can log in again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.metric("imapgate_sessions_relayed", &[]).await != 1.0 {
        assert!(Instant::now() < deadline, "broken sessions still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (r, mut again) = login(&t, "cutfetch@example.org").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    noop_says(&mut again, "cutfetch@example.org").await;
    noop_says(&mut alice, "alice@example.org").await;
    h.abort();
}

#[tokio::test]
async fn a_login_still_waiting_at_the_preauth_deadline_is_ended_and_counted() {
    // The total pre-auth deadline (3 s) falls before the backend's login timeout (5 s): the
    // stalled login is ended with BYE, counted as result="timeout", and its backend hung up on.
    let (addr, h) = scripted_backend().await;
    let Some(t) = gateway(addr, "  preauth_total_timeout: 3s").await else {
        return;
    };
    let mut c = t.client().await;
    let user = "deadlinelogin@example.org";
    c.send(format!("a LOGIN {user} \"{}\"\r\n", t.password(user)))
        .await;
    assert!(c.closed_within(Duration::from_secs(6)).await);
    assert_eq!(c.pending(), "* BYE Authentication timeout\r\n");
    assert_eq!(
        t.metric("imapgate_auth_attempts_total", &["result=\"timeout\""])
            .await,
        1.0
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while DEADLINE_LOGINS_HUNG_UP.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled login's connection was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.abort();
}

/// Item 9 of issue 16: a backend that offers UNAUTHENTICATE after login. The client's login
/// reply never lists it; what follows the login is relayed byte for byte (a later CAPABILITY
/// reply, the UNAUTHENTICATE command itself), which is why `doctor` warns about such a backend
/// and docs/session-lifecycle.md tells the operator to turn it off there.
#[tokio::test(flavor = "multi_thread")]
async fn unauthenticate_is_not_offered_after_login_and_doctor_warns_about_the_backend() {
    let (addr, h) = scripted_backend().await;
    let Some(t) = gateway(addr, "").await else {
        return;
    };
    let user = "unauth@example.org";
    let (r, mut c) = login(&t, user).await;
    assert_eq!(r, vec!["a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"]);
    noop_says(&mut c, user).await;
    // The relay does not parse IMAP after login: the backend's own answers pass unchanged.
    assert_eq!(
        c.cmd("c", "CAPABILITY").await,
        vec![
            "* CAPABILITY IMAP4rev1 IDLE UNAUTHENTICATE\r\n",
            "c OK done\r\n"
        ]
    );
    assert_eq!(
        c.cmd("u", "UNAUTHENTICATE").await,
        vec!["u OK [CAPABILITY IMAP4rev1 ID LITERAL+] back to the login\r\n"]
    );

    let doctor = |who: &'static str| {
        let config = t.config_path.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
                .args(["doctor", "-c"])
                .arg(config)
                .args(["--user", who])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let out = doctor("unauth@example.org").await.unwrap();
    assert!(
        out.lines().any(|l| l.starts_with("[warn] backend dovecot")
            && l.contains("logged in as unauth@example.org")
            && l.contains("UNAUTHENTICATE")),
        "{out}"
    );
    let out = doctor("alice@example.org").await.unwrap();
    assert!(
        out.lines().any(|l| l.starts_with("[ok]   backend dovecot")
            && l.contains("logged in as alice@example.org")),
        "{out}"
    );
    assert!(!out.contains("UNAUTHENTICATE"), "{out}");
    h.abort();
}
