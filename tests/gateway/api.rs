//! The admin API (`/api/v1`) against a running gateway with a real store: what an operator's
//! script sees (status codes, JSON, idempotent repeats) and what a mail client then notices
//! (a created app password logs in, a revoked one ends the live session and stops working).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Options, TestGateway, TestStore, ADMIN_TOKEN};

/// Generous request limits: these tests send many requests from one address.
const LIMITS: &str = ", rate_limit: { per_ip: 100000, burst: 10000, overall: 100000 }";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(t: &TestGateway) -> Api {
        Api {
            base: format!("http://{}/api/v1", t.gw.admin),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(m, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, body, Some(ADMIN_TOKEN)).await
    }
}

async fn api_on(store: TestStore) {
    let Some(t) = TestGateway::start_with(Options {
        store: store.clone(),
        admin_extra: LIMITS,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let api = Api::new(&t);
    let which = format!("{store:?}");

    // No token, a wrong one: refused, nothing disclosed.
    assert_eq!(api.call("GET", "/users", None, None).await.0, 401);
    assert_eq!(
        api.call("GET", "/users", None, Some("wrong-token-0123456789"))
            .await
            .0,
        401
    );

    // Users: add (201), the same again (200, nothing changed), other settings (409).
    let (s, v) = api
        .ok(
            "POST",
            "/users",
            Some(json!({"name": "Zoe@Example.org", "mfa": "optional"})),
        )
        .await;
    assert_eq!(s, 201, "{which}: {v}");
    assert_eq!(v["name"], "zoe@example.org");
    let (s, _) = api
        .ok(
            "POST",
            "/users",
            Some(json!({"name": "zoe@example.org", "mfa": "optional"})),
        )
        .await;
    assert_eq!(s, 200, "{which}: a repeated add is not an error");
    let (s, v) = api
        .ok(
            "POST",
            "/users",
            Some(json!({"name": "zoe@example.org", "mfa": "off"})),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("conflict")),
        "{which}: {v}"
    );
    let (s, v) = api
        .ok("POST", "/users", Some(json!({"name": "not an address"})))
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid")), "{v}");
    let (s, _) = api
        .ok(
            "POST",
            "/users",
            Some(json!({"name": "x@example.org", "extra": 1})),
        )
        .await;
    assert!((400..500).contains(&s), "unknown fields are refused: {s}");
    let (s, v) = api.ok("GET", "/users/nobody@example.org", None).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));

    // Paging: every user exactly once, in order, pages of 3.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (s, v) = api
            .ok("GET", &format!("/users?limit=3&after={after}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        let page: Vec<String> = v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(page.len() <= 3);
        seen.extend(page);
        match v["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
        assert!(seen.len() < 100, "paging does not end");
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "{which}: pages overlap or are out of order");
    assert!(
        seen.contains(&"zoe@example.org".to_owned())
            && seen.contains(&"alice@example.org".to_owned())
    );
    let (_, v) = api.ok("GET", "/users?search=zoe", None).await;
    assert_eq!(v["users"].as_array().unwrap().len(), 1);

    // An app password made through the API logs in; the response holds it, once.
    let (s, v) = api
        .ok(
            "POST",
            "/users/zoe@example.org/app-passwords",
            Some(json!({"label": "phone"})),
        )
        .await;
    assert_eq!(s, 201, "{which}: {v}");
    let password = v["password"].as_str().unwrap().to_owned();
    let id = v["app_password"]["id"].as_str().unwrap().to_owned();
    assert_eq!(v["app_password"]["state"], "active");
    let (_, listed) = api
        .ok("GET", "/users/zoe@example.org/app-passwords", None)
        .await;
    assert!(
        !listed.to_string().contains(&password.replace(' ', "")[..8]),
        "a listing shows the password"
    );
    assert!(
        !listed.to_string().contains("argon2"),
        "a listing shows the hash"
    );
    // zoe is not a Dovecot user: the gateway checks her credential, then the backend refuses.
    // Use alice, a real mailbox, for the session part.
    let (s, v) = api
        .ok(
            "POST",
            "/users/alice@example.org/app-passwords",
            Some(json!({"label": "api", "expires_in": "30d"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let alice_pw = v["password"].as_str().unwrap().to_owned();
    let alice_id = v["app_password"]["id"].as_str().unwrap().to_owned();
    assert!(v["app_password"]["expires"].is_string());
    let mut session = crate::harness::Client::tls(t.imaps(), &t.pki.ca_der).await;
    session.line().await.unwrap();
    let r = session
        .cmd("a", &format!("LOGIN alice@example.org \"{alice_pw}\""))
        .await;
    assert!(
        crate::harness::last(&r).starts_with("a OK"),
        "{which}: {r:?}"
    );
    session.cmd("s", "SELECT INBOX").await;
    session.send("i IDLE\r\n").await;
    assert!(session.line().await.unwrap().starts_with('+'));

    // The session directory shows it, with its client address and app password; the
    // listing of app passwords says when and from where it was last used.
    let (s, v) = api
        .ok("GET", "/sessions?user=alice@example.org", None)
        .await;
    assert_eq!(s, 200, "{v}");
    let mine: Vec<&Value> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["credential"] == alice_id.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{which}: {v}");
    assert_eq!(mine[0]["client_address"], "127.0.0.1", "{v}");
    let mut used = Value::Null;
    for _ in 0..40 {
        let (_, l) = api
            .ok("GET", "/users/alice@example.org/app-passwords", None)
            .await;
        used = l["app_passwords"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == alice_id.as_str())
            .unwrap()["last_used"]
            .clone();
        if !used.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        used["address"], "127.0.0.1",
        "{which}: no last-used record: {used}"
    );

    // Revoking it ends the live session within 2 s, and it no longer logs in; a repeat is
    // harmless; an unknown id is a 404.
    let (s, _) = api
        .ok(
            "DELETE",
            &format!("/users/alice@example.org/app-passwords/{alice_id}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert!(
        session.closed_within(Duration::from_secs(2)).await,
        "{which}: revoked session still open"
    );
    assert!(t
        .login_from("127.0.0.1", "alice@example.org", &alice_pw)
        .await
        .contains("NO"));
    let (s, _) = api
        .ok(
            "DELETE",
            &format!("/users/alice@example.org/app-passwords/{alice_id}"),
            None,
        )
        .await;
    assert_eq!(s, 204, "a repeated revocation is not an error");
    let (s, _) = api
        .ok(
            "DELETE",
            "/users/alice@example.org/app-passwords/ap_nope",
            None,
        )
        .await;
    assert_eq!(s, 404);
    // Her harness app password is untouched.
    assert!(t
        .login_from(
            "127.0.0.1",
            "alice@example.org",
            &t.password("alice@example.org")
        )
        .await
        .contains("OK"));

    // Ending sessions: one by its id, then every session of a user; each client gets * BYE.
    for by_id in [true, false] {
        let mut c = t.logged_in("carol@example.org").await;
        c.cmd("s", "SELECT INBOX").await;
        c.send("i IDLE\r\n").await;
        assert!(c.line().await.unwrap().starts_with('+'));
        let (_, v) = api
            .ok("GET", "/sessions?user=carol@example.org", None)
            .await;
        let id = v["sessions"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{which}: {v}"))
            .to_owned();
        let (s, _) = if by_id {
            api.ok("DELETE", &format!("/sessions/{id}"), None).await
        } else {
            api.ok("DELETE", "/users/carol@example.org/sessions", None)
                .await
        };
        assert_eq!(s, 202);
        let bye = c
            .line_within(Duration::from_secs(2))
            .await
            .unwrap_or_default();
        assert!(bye.starts_with("* BYE"), "{which}: {bye:?}");
        assert!(c.closed_within(Duration::from_secs(2)).await);
    }
    assert_eq!(api.ok("DELETE", "/sessions/nobody-1", None).await.0, 404);

    // Resetting TOTP ends the sessions whose second factor it was (mia logged in with a code).
    let mia = "mia@example.org";
    let mut c = crate::harness::Client::tls(t.imaps(), &t.pki.ca_der).await;
    c.line().await.unwrap();
    let r = c
        .cmd(
            "a",
            &format!("LOGIN {mia} \"{}{}\"", t.password(mia), t.code(mia, 0)),
        )
        .await;
    assert!(
        crate::harness::last(&r).starts_with("a OK"),
        "{which}: {r:?}"
    );
    c.cmd("s", "SELECT INBOX").await;
    c.send("i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with('+'));
    let mut other = t.logged_in("erin@example.org").await;
    assert_eq!(
        api.ok("DELETE", "/users/mia@example.org/totp", None)
            .await
            .0,
        204
    );
    assert!(
        c.closed_within(Duration::from_secs(2)).await,
        "{which}: a session that relied on the reset enrolment stayed open"
    );
    // A session without a second factor is not touched.
    assert!(!other.closed_within(Duration::from_millis(300)).await);
    other.cmd("n", "NOOP").await;

    // Disable / enable.
    let (s, v) = api
        .ok(
            "PATCH",
            "/users/bob@example.org",
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!((s, v["disabled"].as_bool()), (200, Some(true)), "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = "bob@example.org";
    assert!(
        t.login_from("127.0.0.1", bob, &t.password(bob))
            .await
            .contains("NO"),
        "{which}: disabled user logged in"
    );
    let (s, _) = api
        .ok(
            "PATCH",
            "/users/bob@example.org",
            Some(json!({"disabled": false})),
        )
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        t.login_from("127.0.0.1", bob, &t.password(bob))
            .await
            .contains("OK"),
        "{which}: enabled user refused"
    );

    // TOTP: begin (nothing stored), a wrong code (422, still not enrolled), the right code.
    let (s, v) = api
        .ok("POST", "/users/zoe@example.org/totp/enrolment", None)
        .await;
    assert_eq!(s, 201, "{v}");
    let uri = v["otpauth_uri"].as_str().unwrap().to_owned();
    let token = v["enrolment"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("otpauth://totp/"));
    let (_, u) = api.ok("GET", "/users/zoe@example.org", None).await;
    assert_eq!(u["totp_enrolled"], false, "begin stored something");
    let secret = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let secret = imapgate::secret::Secret::new(crate::mfa::base32_decode(secret));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = imapgate::auth::totp::code_at(&secret, now, 6).unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    let (s, _) = api
        .ok(
            "POST",
            "/users/zoe@example.org/totp/confirmation",
            Some(json!({"enrolment": token, "code": wrong})),
        )
        .await;
    assert_eq!(s, 422);
    // A token made for zoe does not enrol bob.
    let (s, _) = api
        .ok(
            "POST",
            "/users/bob@example.org/totp/confirmation",
            Some(json!({"enrolment": token, "code": code})),
        )
        .await;
    assert_eq!(s, 422, "an enrolment token worked for another user");
    let (s, v) = api
        .ok(
            "POST",
            "/users/zoe@example.org/totp/confirmation",
            Some(json!({"enrolment": token, "code": code})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    let (_, u) = api.ok("GET", "/users/zoe@example.org", None).await;
    assert_eq!(u["totp_enrolled"], true);
    let (s, _) = api
        .ok("POST", "/users/zoe@example.org/totp/enrolment", None)
        .await;
    assert_eq!(s, 409, "a second enrolment without force");
    assert_eq!(
        api.ok("DELETE", "/users/zoe@example.org/totp", None)
            .await
            .0,
        204
    );
    assert_eq!(
        api.ok("DELETE", "/users/zoe@example.org/totp", None)
            .await
            .0,
        204
    );
    let (_, u) = api.ok("GET", "/users/zoe@example.org", None).await;
    assert_eq!(u["totp_enrolled"], false);

    // Delete (twice: still 204), then gone.
    assert_eq!(
        api.ok("DELETE", "/users/zoe@example.org", None).await.0,
        204
    );
    assert_eq!(
        api.ok("DELETE", "/users/zoe@example.org", None).await.0,
        204
    );
    assert_eq!(api.ok("GET", "/users/zoe@example.org", None).await.0, 404);
    let _ = id;
    let _ = password;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_manages_users_on_sqlite() {
    api_on(TestStore::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_manages_users_on_postgres() {
    let Some(pg) = crate::pg::postgres() else {
        return;
    };
    api_on(TestStore::Postgres(pg.database())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_manages_users_in_the_users_file() {
    api_on(TestStore::File).await;
}

/// The OpenAPI document is served, and it names exactly the routes the API answers: every
/// documented operation is routed (not 404/405), and no undocumented method is.
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let Some(t) = TestGateway::start_with(Options {
        store: TestStore::Sqlite,
        admin_extra: LIMITS,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let api = Api::new(&t);
    let (s, served) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    let doc: Value = serde_json::from_str(imapgate::api::openapi::DOCUMENT).unwrap();
    assert_eq!(
        served, doc,
        "the served document is not the one in the source"
    );
    assert_eq!(doc["openapi"], "3.1.0");
    let methods = ["get", "post", "put", "patch", "delete"];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{user}", "alice@example.org")
            .replace("{id}", "unknown-id");
        for m in methods {
            let (status, body) = api.ok(&m.to_uppercase(), &concrete, Some(json!({}))).await;
            if item.get(m).is_some() {
                documented.insert(format!("{m} {path}"));
                // Routed: any answer but axum's "no route" (404 with an empty body) or 405.
                let unrouted =
                    status == 405 || (status == 404 && body == Value::String(String::new()));
                assert!(
                    !unrouted,
                    "{m} {path} is documented but not served ({status})"
                );
            } else {
                assert!(
                    status == 405 || (status == 404 && body == Value::String(String::new())),
                    "{m} {path} is served ({status}) but not documented"
                );
            }
        }
    }
    assert_eq!(documented.len(), 17, "{documented:?}");
    // Every documented operation has an id and its responses, and every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        out.push(x.as_str().unwrap().to_owned());
                    }
                    refs(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

/// The CLI through the API (`--admin URL --token-file FILE`), against the real binary: the
/// commands an operator types after a port-forward, and the audit lines naming the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_through_the_api_and_actions_are_audited_with_the_token_name() {
    let tokens = tempfile::tempdir().unwrap();
    let helpdesk = tokens.path().join("helpdesk.token");
    crate::harness::write_secret(&helpdesk, "helpdesk-token-0123456789abcdef\n");
    let extra: &'static str = Box::leak(
        format!(
            "{LIMITS}, tokens: [{{ name: helpdesk, file: \"{}\" }}]",
            helpdesk.display()
        )
        .into_boxed_str(),
    );
    let Some(t) = TestGateway::start_with(Options {
        store: TestStore::Sqlite,
        admin_extra: extra,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let b = crate::harness::start_binary(&t);
    let admin = format!("http://127.0.0.1:{}", b.admin);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .args(args)
            .args(["--admin", &admin, "--token-file"])
            .arg(&helpdesk)
            // No configuration at all: everything goes through the API.
            .env_remove("IMAPGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = cli(&["users", "add", "carl@example.org", "--mfa", "off"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&[
        "app-password",
        "create",
        "carl@example.org",
        "--label",
        "laptop",
    ]);
    assert!(ok, "{err}");
    let password = out.trim().to_owned();
    assert_eq!(password.replace(' ', "").len(), 16, "{out}");
    assert!(!err.contains(&password), "the password went to stderr too");
    let (ok, out, _) = cli(&["users", "list"]);
    assert!(
        ok && out.contains("carl@example.org\tenabled\tapp-passwords=1"),
        "{out}"
    );
    let (ok, out, _) = cli(&["app-password", "list", "carl@example.org"]);
    assert!(
        ok && out.contains("active") && out.contains("laptop"),
        "{out}"
    );
    let id = out.split('\t').next().unwrap().to_owned();
    let (ok, _, err) = cli(&["app-password", "revoke", "carl@example.org", &id]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&["users", "show", "carl@example.org"]);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, _, _) = cli(&["users", "disable", "carl@example.org"]);
    assert!(ok);
    // Sessions through the API: dave idles on this replica; the CLI lists and ends it.
    let dave = "dave@example.org";
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", b.imaps).parse().unwrap();
    let mut c = crate::harness::Client::tls(addr, &t.pki.ca_der).await;
    c.line().await.unwrap();
    let r = c
        .cmd("a", &format!("LOGIN {dave} \"{}\"", t.password(dave)))
        .await;
    assert!(crate::harness::last(&r).starts_with("a OK"), "{r:?}");
    c.cmd("s", "SELECT INBOX").await;
    c.send("i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with('+'));
    let (ok, out, err) = cli(&["sessions", "list", dave]);
    assert!(
        ok && out.contains(dave) && out.contains("127.0.0.1"),
        "{out}{err}"
    );
    // dave's login is in his recent logins, through the API.
    let (ok, out, err) = cli(&["users", "logins", dave, "--limit", "5"]);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        ok && first.contains("\tok\t") && first.contains("LOGIN") && first.contains("127.0.0.1"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(&["sessions", "kill", dave]);
    assert!(ok && err.contains("1 session(s) matched"), "{err}");
    assert!(
        c.closed_within(Duration::from_secs(2)).await,
        "the killed session stayed open"
    );

    let (ok, out, _) = cli(&["guard", "status", "--json"]);
    assert!(ok && out.trim().starts_with('['), "{out}");
    // Errors come back as the API's message and a failing exit code.
    let (ok, _, err) = cli(&["users", "show", "nobody@example.org"]);
    assert!(
        !ok && err.contains("404") && err.contains("no user"),
        "{err}"
    );
    let (ok, _, err) = cli(&["totp", "enroll", "carl@example.org", "--no-verify"]);
    assert!(!ok && err.contains("--no-verify"), "{err}");
    // A wrong token is refused.
    let bad = tokens.path().join("bad.token");
    crate::harness::write_secret(&bad, "not-the-token-0123456789");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["users", "list", "--admin", &admin, "--token-file"])
        .arg(&bad)
        .env_remove("IMAPGATE_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // The binary's audit log names the token behind every change, and never the password.
    // (The audit writer is asynchronous: wait for the five lines.)
    let mut audit = String::new();
    let mut ops: Vec<Value> = Vec::new();
    for _ in 0..50 {
        audit = std::fs::read_to_string(b.dir.path().join("audit.log")).unwrap_or_default();
        ops = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "operator")
            .collect();
        if ops.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let actions: Vec<&str> = ops
        .iter()
        .map(|v| v["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        actions,
        [
            "user_added",
            "app_password_created",
            "app_password_revoked",
            "user_disabled",
            "sessions_killed"
        ],
        "{audit}"
    );
    assert!(
        ops.iter()
            .all(|v| v["actor"] == "helpdesk" && v["via"] == "api"),
        "{audit}"
    );
    assert!(!audit.contains(&password.replace(' ', "")) && !audit.contains(&password));
}
