//! The audit log as a SIEM takes it: the client's `ID` on the auth line (and nothing an
//! attacker can inject through it), the ECS form, RFC 5424 lines to a real rsyslog, and
//! operator actions audited beside the users file. Against the real binary.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

fn read(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The JSON lines of a file (every line must be one), waiting until `want` of them match.
async fn lines_matching(
    p: &Path,
    want: usize,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    for _ in 0..100 {
        got = read(p)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l:?}"))
            })
            .filter(|v| pred(v))
            .collect();
        if got.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

/// Logs in over implicit TLS after an `ID` whose name is a synchronising literal carrying
/// CR/LF, quotes and a forged JSON line, with a huge version and another field.
async fn login_after_hostile_id(t: &TestGateway, port: u16, user: &str) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::tls(addr, &t.pki.ca_der).await;
    c.line().await.unwrap();
    let forged =
        "Evil\r\n{\"event\":\"auth\",\"result\":\"success\",\"user\":\"forged-user-x\"}\r\n\x1b[2J";
    c.send(format!("i1 ID (\"name\" {{{}}}\r\n", forged.len()))
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    let huge = "9".repeat(4000);
    c.send(format!(
        "{forged} \"os\" \"secret-os-value\" \"version\" \"{huge}\\\"x\")\r\n"
    ))
    .await;
    let r = c.until_tagged("i1").await;
    assert!(last(&r).starts_with("i1 OK"), "{r:?}");
    let r = c
        .cmd("l1", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("l1 OK"), "{r:?}");
    c.cmd("o1", "LOGOUT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_auth_line_carries_the_clients_id_and_nothing_injected() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let b = start_binary(&t);
    let user = "alice@example.org";
    login_after_hostile_id(&t, b.imaps, user).await;
    // A client without ID.
    let mut c = Client::tls(
        format!("127.0.0.1:{}", b.imaps).parse().unwrap(),
        &t.pki.ca_der,
    )
    .await;
    c.line().await.unwrap();
    let r = c
        .cmd("l1", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("l1 OK"), "{r:?}");
    drop(c);

    let audit = b.dir.path().join("audit.log");
    let auth = lines_matching(&audit, 2, |v| {
        v["event"] == "auth" && v["result"] == "success"
    })
    .await;
    assert_eq!(auth.len(), 2, "{}", read(&audit));
    let with_id = &auth[0];
    assert_eq!(
        with_id["client_name"],
        "Evil{event:auth,result:success,user:forged-user-x}[2J"
    );
    assert_eq!(with_id["client_version"], "9".repeat(64));
    assert_eq!(with_id["user"], user);
    assert_eq!(auth[1]["client_name"], "");
    assert_eq!(auth[1]["client_version"], "");
    // Nothing else of the ID reached any log, and no forged line exists.
    let all = read(&audit) + &read(&b.dir.path().join("stderr.log"));
    assert!(!all.contains("secret-os-value"), "{all}");
    assert!(!all.contains("forged-user-x\""), "{all}");
}
