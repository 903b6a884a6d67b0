//! OAuth 2.0 logins (XOAUTH2, OAUTHBEARER) against a real OpenID provider (npm oidc-provider,
//! tests/idp) and the real Dovecot: valid tokens open sessions; every kind of bad token gets
//! the RFC 7628 error challenge and then `NO [AUTHENTICATIONFAILED]`.

use std::time::Duration;

use base64::Engine;

use crate::harness::*;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn xoauth2(user: &str, token: &str) -> String {
    b64(format!("user={user}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

fn oauthbearer(user: Option<&str>, token: &str) -> String {
    let a = user.map(|u| format!("a={u}")).unwrap_or_default();
    b64(format!("n,{a},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01").as_bytes())
}

async fn start(extra: &'static str) -> Option<(TestGateway, std::sync::Arc<Idp>)> {
    let t = TestGateway::start_with(Options {
        oauth: Some(extra),
        ..Default::default()
    })
    .await?;
    Some((t, idp()?))
}

/// Sends `AUTHENTICATE mech ir` and expects a refusal done the RFC 7628 way: an error
/// challenge, then NO after the client's dummy response. Returns the decoded challenge.
async fn refused(t: &TestGateway, mech: &str, ir: &str) -> serde_json::Value {
    let mut c = t.client().await;
    c.send(format!("a AUTHENTICATE {mech} {ir}\r\n")).await;
    let l = c.line().await.unwrap();
    let challenge = l
        .strip_prefix("+ ")
        .unwrap_or_else(|| panic!("no error challenge: {l}"))
        .trim_end();
    let json: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(challenge)
            .unwrap(),
    )
    .unwrap();
    c.send(if mech == "OAUTHBEARER" {
        "AQ==\r\n"
    } else {
        "\r\n"
    })
    .await;
    assert_eq!(
        c.line().await.unwrap(),
        "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    );
    json
}

async fn accepted(t: &TestGateway, mech: &str, ir: &str) {
    let mut c = t.client().await;
    let r = c.cmd("a", &format!("AUTHENTICATE {mech} {ir}")).await;
    assert!(last(&r).starts_with("a OK [CAPABILITY "), "{r:?}");
    let r = c.cmd("s", "SELECT INBOX").await;
    assert!(last(&r).starts_with("s OK"), "{r:?}");
}

#[tokio::test]
async fn valid_tokens_open_sessions_with_both_mechanisms() {
    let Some((t, idp)) = start("").await else {
        return;
    };
    let caps = t.client().await.cmd("c", "CAPABILITY").await;
    assert!(
        caps[0].contains("AUTH=XOAUTH2") && caps[0].contains("AUTH=OAUTHBEARER"),
        "{caps:?}"
    );
    let rs = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &rs)).await;
    let es = idp.token("alice", "urn:imapgate:es256", "imap").await;
    accepted(
        &t,
        "OAUTHBEARER",
        &oauthbearer(Some("Alice@Example.org"), &es),
    )
    .await;
    // No a=: the user comes from the token.
    accepted(&t, "OAUTHBEARER", &oauthbearer(None, &es)).await;
    // With continuation instead of SASL-IR.
    let mut c = t.client().await;
    c.send("b AUTHENTICATE XOAUTH2\r\n").await;
    assert_eq!(c.line().await.unwrap(), "+ \r\n");
    c.send(format!("{}\r\n", xoauth2("alice@example.org", &rs)))
        .await;
    let r = c.until_tagged("b").await;
    assert!(last(&r).starts_with("b OK [CAPABILITY "), "{r:?}");
    assert!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"valid\""])
            .await
            >= 4.0
    );
}

#[tokio::test]
async fn bad_tokens_get_the_error_challenge_then_no() {
    let Some((t, idp)) = start("").await else {
        return;
    };
    let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    let (conf, scope) = {
        let json = refused(
            &t,
            "OAUTHBEARER",
            &oauthbearer(Some("bob@example.org"), &alice),
        )
        .await;
        (
            json["openid-configuration"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            json["scope"].clone(),
        )
    };
    assert_eq!(
        conf,
        format!("{}/.well-known/openid-configuration", idp.url)
    );
    assert_eq!(scope, "imap");
    // XOAUTH2 gets Google's status.
    let json = refused(&t, "XOAUTH2", &xoauth2("bob@example.org", &alice)).await;
    assert_eq!(json["status"], "401");
    // Wrong audience, missing scope, expired.
    let other = idp.token("alice", "urn:imapgate:other-aud", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &other)).await;
    let unscoped = idp.token("alice", "urn:imapgate:rs256", "other").await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &unscoped)).await;
    let short = idp.token("alice", "urn:imapgate:short", "imap").await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &short)).await;
    // Tampered payload (alice → bob) with alice's signature.
    let parts: Vec<&str> = alice.split('.').collect();
    let mut payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    payload["email"] = "bob@example.org".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(payload.to_string().as_bytes()),
        parts[2]
    );
    refused(&t, "XOAUTH2", &xoauth2("bob@example.org", &tampered)).await;
    // alg: none.
    let none = format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &none)).await;
    // HS256 "signed" with the issuer's public key material, under a real kid.
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .unwrap(),
    )
    .unwrap();
    let jwks: serde_json::Value = reqwest::get(format!("{}/jwks", idp.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n = jwks["keys"][0]["n"].as_str().unwrap_or("k").to_owned();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::HS256,
            kid: header["kid"].as_str().map(str::to_owned),
            ..Default::default()
        },
        &payload_for(&idp, "alice@example.org"),
        &jsonwebtoken::EncodingKey::from_secret(n.as_bytes()),
    )
    .unwrap();
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &hs)).await;
    // Another issuer.
    let mut foreign = payload_for(&idp, "alice@example.org");
    foreign["iss"] = "https://evil.example".into();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &foreign,
        &jsonwebtoken::EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &forged)).await;
    // Garbage and an opaque token (no introspection configured).
    refused(&t, "XOAUTH2", &b64(b"not an xoauth2 message")).await;
    let opaque = idp.token("alice", "urn:imapgate:opaque", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &opaque)).await;
    for reason in [
        "user_mismatch",
        "wrong_audience",
        "missing_scope",
        "expired",
        "bad_signature",
        "algorithm",
        "unknown_issuer",
        "malformed",
    ] {
        assert!(
            t.metric(
                "imapgate_oauth_tokens_total",
                &[&format!("result=\"{reason}\"")]
            )
            .await
                >= 1.0,
            "{reason} not counted"
        );
    }
    // Anything but the dummy response after the challenge is a protocol error.
    let mut c = t.client().await;
    c.send(format!(
        "z AUTHENTICATE OAUTHBEARER {}\r\n",
        oauthbearer(Some("bob@example.org"), &alice)
    ))
    .await;
    assert!(c.line().await.unwrap().starts_with("+ "));
    c.send("bm90IGR1bW15\r\n").await;
    assert_eq!(c.line().await.unwrap(), "z BAD Invalid SASL response\r\n");
}

/// Claims for forged tokens.
fn payload_for(idp: &Idp, email: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({ "iss": idp.url, "aud": "imap", "exp": now + 300, "iat": now, "scope": "imap", "email": email, "sub": "x" })
}

#[tokio::test]
async fn unknown_kids_refresh_at_most_once_per_interval_and_rotation_is_picked_up() {
    let Some((t, idp)) = start("").await else {
        return;
    };
    let valid = idp.token("mia", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("mia@example.org", &valid)).await;
    let fetches = || t.metric("imapgate_oauth_key_fetches_total", &["result=\"ok\""]);
    let before = fetches().await;
    // A flood of unknown kids: at most one fetch per refresh interval (1 s here), however many
    // tokens arrive.
    let flood = std::time::Instant::now();
    for i in 0..20 {
        let header = jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::RS256,
            kid: Some(format!("nope-{i}")),
            ..Default::default()
        };
        let token = format!(
            "{}.{}.{}",
            b64url(serde_json::to_string(&header).unwrap().as_bytes()),
            b64url(payload_for(&idp, "mia@example.org").to_string().as_bytes()),
            b64url(b"sig")
        );
        refused(&t, "XOAUTH2", &xoauth2("mia@example.org", &token)).await;
    }
    let storm = fetches().await - before;
    let bound = flood.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(
        storm <= bound && storm < 20.0,
        "{storm} key fetches for 20 unknown kids in {:?}",
        flood.elapsed()
    );
    assert!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"unknown_key\""])
            .await
            >= 20.0
    );
    // The provider rotates its keys: a token with the new kid is accepted without a restart.
    idp.rotate().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotated = idp.token("mia", "urn:imapgate:es256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("mia@example.org", &rotated)).await;
}

#[tokio::test]
async fn require_amr_demands_mfa_evidence() {
    let Some((t, idp)) = start("        require_amr: [mfa]").await else {
        return;
    };
    let bob = idp.token("bob", "urn:imapgate:rs256", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("bob@example.org", &bob)).await;
    assert_eq!(
        t.metric(
            "imapgate_oauth_tokens_total",
            &["result=\"no_mfa_evidence\""]
        )
        .await,
        1.0
    );
    let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
}

#[tokio::test]
async fn an_unreachable_provider_refuses_without_hanging() {
    let Some(_) = idp() else { return };
    let Some(d) = dovecot() else { return };
    let dead = free_port();
    let (gw, pki, _dir) = oauth_only_gateway(
        &d,
        &format!("{{ name: dead, issuer: \"http://127.0.0.1:{dead}\", audiences: [imap] }}"),
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "iss": format!("http://127.0.0.1:{dead}"), "aud": "imap", "exp": now + 300, "email": "alice@example.org" });
    let header = jsonwebtoken::Header {
        alg: jsonwebtoken::Algorithm::RS256,
        kid: Some("k".into()),
        ..Default::default()
    };
    let token = format!(
        "{}.{}.{}",
        b64url(serde_json::to_string(&header).unwrap().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(b"sig")
    );
    let mut c = Client::tls(gw.listener("imaps").unwrap(), &pki.ca_der).await;
    c.line().await.unwrap();
    let started = std::time::Instant::now();
    c.send(format!(
        "a AUTHENTICATE XOAUTH2 {}\r\n",
        xoauth2("alice@example.org", &token)
    ))
    .await;
    assert!(c.line().await.unwrap().starts_with("+ "));
    c.send("\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_clients_python_imaplib_and_curl() {
    let Some((t, idp)) = start("").await else {
        return;
    };
    if !have("python3") || !have("curl") {
        return;
    }
    let token = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    let py = r#"
import imaplib, ssl, sys
port, ca, user, token = sys.argv[1:5]
m = imaplib.IMAP4_SSL("localhost", int(port), ssl_context=ssl.create_default_context(cafile=ca))
typ, data = m.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (user, token)).encode())
assert typ == "OK", (typ, data)
typ, data = m.select("INBOX")
assert typ == "OK", (typ, data)
m.logout()
print("ok")
"#;
    let ca = t.pki.ca_pem.display().to_string();
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            py,
            &t.imaps().port().to_string(),
            &ca,
            "alice@example.org",
            &token,
        ])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("ok"),
        "imaplib XOAUTH2: {text}"
    );
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            &ca,
            &format!("imaps://localhost:{}/", t.imaps().port()),
            "--user",
            "alice@example.org",
            "--oauth2-bearer",
            &token,
        ])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("INBOX"),
        "curl --oauth2-bearer: {text}"
    );
}

#[tokio::test]
async fn sessions_end_when_their_token_expires_if_configured() {
    let Some((t, idp)) = start("        end_session_at_expiry: true").await else {
        return;
    };
    let short = idp.token("alice", "urn:imapgate:short", "imap").await;
    let mut c = t.client().await;
    let r = c
        .cmd(
            "a",
            &format!(
                "AUTHENTICATE XOAUTH2 {}",
                xoauth2("alice@example.org", &short)
            ),
        )
        .await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    let started = std::time::Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(6)).await,
        "session outlived its token"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    // Without the setting, a session is not tied to the token (max_session_lifetime applies).
    let Some((t2, _)) = start("").await else {
        return;
    };
    let short = idp.token("alice", "urn:imapgate:short", "imap").await;
    let mut c = t2.client().await;
    let r = c
        .cmd(
            "a",
            &format!(
                "AUTHENTICATE XOAUTH2 {}",
                xoauth2("alice@example.org", &short)
            ),
        )
        .await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = c.cmd("n", "NOOP").await;
    assert!(last(&r).starts_with("n OK"), "{r:?}");
}

#[tokio::test]
async fn opaque_tokens_via_introspection() {
    // Safe here: only this test reads the variable, before any thread uses the environment.
    std::env::set_var(
        "IMAPGATE_TEST_INTROSPECTION_SECRET",
        "secret-imapgate-gateway",
    );
    let Some((t, idp)) = start("        introspection: { client_id: imapgate-gateway, client_secret_env: IMAPGATE_TEST_INTROSPECTION_SECRET, cache_ttl: 30s }").await else {
        return;
    };
    let opaque = idp.token("alice", "urn:imapgate:opaque", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &opaque)).await;
    // Cached: a second login does not ask again (the metric counts validations, not requests).
    accepted(
        &t,
        "OAUTHBEARER",
        &oauthbearer(Some("alice@example.org"), &opaque),
    )
    .await;
    // Someone else's opaque token, an unknown one, and the wrong user.
    refused(
        &t,
        "XOAUTH2",
        &xoauth2("alice@example.org", "not-a-real-token"),
    )
    .await;
    assert!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"inactive\""])
            .await
            >= 1.0
    );
    let bob = idp.token("bob", "urn:imapgate:opaque", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &bob)).await;
    // JWTs still validate locally alongside.
    let jwt = idp.token("mia", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("mia@example.org", &jwt)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oauth_token_cli_runs_the_device_flow() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let Some((t, idp)) = start("").await else {
        return;
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args([
            "oauth",
            "token",
            "--issuer",
            "test",
            "--client-id",
            "imapgate-cli",
            "--resource",
            "urn:imapgate:rs256",
            "--timeout",
            "1m",
            "-c",
        ])
        .arg(&t.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The person is told where to go and which code to enter.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut code = None;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await
    {
        if let Some(c) = line.split("enter the code ").nth(1) {
            code = Some(c.trim_end_matches(')').trim().to_owned());
            break;
        }
    }
    let code = code.expect("no user code shown");
    // The person signs in (the test IdP's approval hook stands in for the browser).
    let resp = reqwest::Client::new()
        .post(format!("{}/__device/approve", idp.url))
        .form(&[("user_code", code.as_str()), ("account", "alice")])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "approve: {}", resp.status());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("device flow hung")
        .unwrap();
    assert!(out.status.success(), "oauth token failed");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &token)).await;
}

/// A scripted introspection endpoint for faults the real provider cannot be made to produce.
async fn fake_introspection(mode: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                match mode {
                    // Accepts and never answers.
                    "slow" => tokio::time::sleep(Duration::from_secs(60)).await,
                    // 2 MiB of JSON-ish bytes.
                    "huge" => {
                        let body = format!(
                            "{{\"active\":true,\"pad\":\"{}\"}}",
                            "x".repeat(2 * 1024 * 1024)
                        );
                        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes()).await;
                        let _ = s.write_all(body.as_bytes()).await;
                    }
                    // Not JSON at all.
                    _ => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 11\r\n\r\n<html></html>").await;
                    }
                }
            });
        }
    });
    (port, h)
}

#[tokio::test]
async fn a_broken_introspection_endpoint_fails_closed_without_hanging() {
    let Some(d) = dovecot() else { return };
    for mode in ["slow", "huge", "garbage"] {
        let (port, h) = fake_introspection(mode).await;
        let issuer = format!(
            "{{ name: fake, issuer: \"http://127.0.0.1:{port}\", discovery: false, jwks_uri: \"http://127.0.0.1:{port}/jwks\", audiences: [imap], introspection: {{ endpoint: \"http://127.0.0.1:{port}/introspect\", client_id: gw, client_secret_file: client.secret }} }}"
        );
        let (gw, pki, _dir) = oauth_only_gateway(&d, &issuer).await;
        let mut c = Client::tls(gw.listener("imaps").unwrap(), &pki.ca_der).await;
        c.line().await.unwrap();
        let started = std::time::Instant::now();
        c.send(format!(
            "a AUTHENTICATE XOAUTH2 {}\r\n",
            xoauth2("alice@example.org", "opaque-token-value")
        ))
        .await;
        let l = c.line_within(Duration::from_secs(15)).await.unwrap();
        assert!(l.starts_with("+ "), "{mode}: {l}");
        c.send("\r\n").await;
        assert_eq!(
            c.line().await.unwrap(),
            "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n",
            "{mode}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{mode}: took {:?}",
            started.elapsed()
        );
        // The gateway still serves.
        let r = c.cmd("n", "NOOP").await;
        assert_eq!(r, vec!["n OK NOOP completed\r\n"], "{mode}");
        h.abort();
    }
}

/// A gateway with one OAuth issuer (`issuer_yaml`, a flow mapping), no users, TOTP off, in
/// front of the shared Dovecot. A `client.secret` file ("s") sits beside its config.
async fn oauth_only_gateway(
    d: &Dovecot,
    issuer_yaml: &str,
) -> (imapgate::server::Gateway, Pki, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (cert, key) = pki.issue("gw", &["localhost"]);
    std::fs::write(dir.path().join("client.secret"), "s").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(dir.path().join("client.secret"), mode).unwrap();
    }
    imapgate::auth::users::UsersFile {
        version: 1,
        users: Default::default(),
    }
    .save(&dir.path().join("users.yaml"))
    .unwrap();
    let yaml = format!(
        "listeners: [{{ name: imaps, address: \"127.0.0.1:0\", tls: implicit }}]\n\
         tls: {{ certificates: [{{ cert_file: \"{}\", key_file: \"{}\" }}] }}\n\
         auth: {{ users_file: users.yaml, failure_floor: 100ms, mfa: {{ default: off }}, oauth: {{ issuers: [{issuer_yaml}] }} }}\n\
         backends: [{{ name: b, address: \"{}\", tls: implicit, ca_file: \"{}\", server_name: localhost, login: master_user, master_user: gateway, master_password_file: \"{}\" }}]\n\
         admin: {{ address: \"127.0.0.1:0\" }}\n",
        cert.display(),
        key.display(),
        d.imaps,
        d.pki.ca_pem.display(),
        d.master_secret_file.display()
    );
    let gw = imapgate::server::Gateway::start(
        imapgate::config::Config::from_yaml(&yaml, dir.path()).unwrap(),
    )
    .await
    .unwrap();
    (gw, pki, dir)
}

// ---------------------------------------------------------------------------------------------
// Issue 16: which issuer an opaque token goes to, strict introspection answers, key fetches
// that do not stall, email_verified, issuer domains, ASCII-only names.
// ---------------------------------------------------------------------------------------------

/// A string for a config fragment that lives as long as the test binary.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A name no other test (or earlier run against the same IdP) uses.
fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{t}-{n}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The gateway's introspection client secret, in a file (absolute path) for config fragments.
fn gateway_secret_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let p = dir.join("gateway.secret");
        write_secret(&p, "secret-imapgate-gateway");
        p.display().to_string()
    })
}

/// The test IdP's scripted introspection endpoint answers `answer` for `token`.
async fn script(idp: &Idp, token: &str, answer: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/__scripted/answer", idp.url))
        .json(&serde_json::json!({ "token": token, "answer": answer }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

/// How many introspection requests the scripted endpoint got for `token`.
async fn scripted_calls(idp: &Idp, token: &str) -> u64 {
    let v: serde_json::Value = reqwest::Client::new()
        // Tokens here are base64url or our own names: nothing to escape.
        .get(format!("{}/__scripted/calls?token={token}", idp.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["calls"].as_u64().unwrap()
}

/// A second issuer (not the test IdP's own `iss`) whose introspection endpoint is the scripted
/// one, so the test can count what reaches it. `more`: extra keys of its flow mapping.
fn other_issuer(idp: &Idp, more: &str) -> String {
    format!(
        "      - {{ name: other, issuer: \"{u}/other\", discovery: false, jwks_uri: \"{u}/jwks\", audiences: [imap], introspection: {{ endpoint: \"{u}/__scripted/introspect\", client_id: imapgate-gateway, client_secret_file: \"{s}\" }}{more} }}",
        u = idp.url,
        s = gateway_secret_file()
    )
}

/// The test issuer's own introspection (the real endpoint), with `more` issuer lines.
fn real_introspection(more: &str) -> String {
    format!(
        "        introspection: {{ client_id: imapgate-gateway, client_secret_file: \"{}\", cache_ttl: 30s }}\n{more}",
        gateway_secret_file()
    )
}

#[tokio::test]
async fn an_opaque_token_is_introspected_only_where_it_can_belong() {
    let Some(idp) = idp() else { return };
    // Two issuers introspect and neither says which domains it serves: the gateway cannot
    // tell whose token it is, so it sends it to neither (before: to each in turn).
    let extra = leak(format!(
        "{}{}",
        real_introspection(""),
        other_issuer(&idp, "")
    ));
    let Some((t, _)) = start(extra).await else {
        return;
    };
    let real = idp.token("alice", "urn:imapgate:opaque", "imap").await;
    let unknown = unique("opaque-unknown");
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &unknown)).await;
    assert_eq!(
        scripted_calls(&idp, &unknown).await,
        0,
        "a token for example.org reached the other issuer"
    );
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &real)).await;
    assert_eq!(scripted_calls(&idp, &real).await, 0, "alice's token leaked");
    assert_eq!(
        t.metric(
            "imapgate_oauth_tokens_total",
            &["result=\"unknown_issuer\""]
        )
        .await,
        2.0
    );

    // With domains, the SASL user's domain picks the one issuer.
    let extra = leak(format!(
        "{}{}",
        real_introspection("        domains: [example.org]\n"),
        other_issuer(&idp, ", domains: [other.test]")
    ));
    let Some((t, _)) = start(extra).await else {
        return;
    };
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &real)).await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &unknown)).await;
    assert_eq!(scripted_calls(&idp, &real).await, 0, "alice's token leaked");
    assert_eq!(scripted_calls(&idp, &unknown).await, 0, "token leaked");
    // A token for the other domain goes there, once, and nowhere else.
    let theirs = unique("opaque-other");
    refused(&t, "XOAUTH2", &xoauth2("someone@other.test", &theirs)).await;
    assert_eq!(scripted_calls(&idp, &theirs).await, 1);
    // A domain no issuer serves: refused without asking anyone.
    let nowhere = unique("opaque-nowhere");
    refused(&t, "XOAUTH2", &xoauth2("someone@nowhere.test", &nowhere)).await;
    assert_eq!(scripted_calls(&idp, &nowhere).await, 0);
    assert_eq!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"wrong_domain\""])
            .await,
        1.0
    );
}

#[tokio::test]
async fn introspection_answers_are_checked_strictly_and_only_good_ones_cached() {
    let Some(idp) = idp() else { return };
    let extra = leak(format!(
        "        introspection: {{ endpoint: \"{}/__scripted/introspect\", client_id: imapgate-gateway, client_secret_file: \"{}\", cache_ttl: 30s }}",
        idp.url,
        gateway_secret_file()
    ));
    let Some((t, _)) = start(extra).await else {
        return;
    };
    let now = unix_now();
    let good = serde_json::json!({
        "active": true, "exp": now + 600, "iat": now, "iss": idp.url, "aud": "imap",
        "client_id": "alice", "scope": "imap", "email": "alice@example.org",
        "email_verified": true, "token_type": "Bearer"
    });
    let with = |changes: &[(&str, serde_json::Value)]| {
        let mut v = good.clone();
        for (k, x) in changes {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(*k);
            } else {
                v[*k] = x.clone();
            }
        }
        v
    };
    // Accepted: the well-formed answer, and one whose audience is in `client_id` only
    // (RFC 7662 §2.2). The good one is cached: the second login asks nobody.
    let ok = unique("good");
    script(&idp, &ok, good.clone()).await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &ok)).await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &ok)).await;
    assert_eq!(scripted_calls(&idp, &ok).await, 1);
    let by_client = unique("client-id");
    script(
        &idp,
        &by_client,
        with(&[
            ("aud", serde_json::Value::Null),
            ("client_id", "imap".into()),
        ]),
    )
    .await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &by_client)).await;
    // Refused, each asked again at the next attempt (a refused answer is never cached).
    let null = serde_json::Value::Null;
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("inactive", with(&[("active", false.into())])),
        ("active-string", with(&[("active", "true".into())])),
        ("no-exp", with(&[("exp", null.clone())])),
        ("expired", with(&[("exp", (now - 5).into())])),
        ("no-iss", with(&[("iss", null.clone())])),
        ("other-iss", with(&[("iss", "https://evil.example".into())])),
        (
            "other-aud",
            with(&[("aud", "not-imap".into()), ("client_id", "alice".into())]),
        ),
        (
            "no-aud",
            with(&[("aud", null.clone()), ("client_id", "alice".into())]),
        ),
    ];
    for (name, answer) in cases {
        let token = unique(name);
        script(&idp, &token, answer).await;
        refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &token)).await;
        refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &token)).await;
        assert_eq!(scripted_calls(&idp, &token).await, 2, "{name} was cached");
    }
    for reason in [
        "inactive",
        "malformed",
        "expired",
        "wrong_issuer",
        "wrong_audience",
    ] {
        assert!(
            t.metric(
                "imapgate_oauth_tokens_total",
                &[&format!("result=\"{reason}\"")]
            )
            .await
                >= 2.0,
            "{reason} not counted"
        );
    }
    // A good answer is cached no longer than its exp.
    let short = unique("short");
    script(&idp, &short, with(&[("exp", (unix_now() + 2).into())])).await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &short)).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &short)).await;
    assert_eq!(scripted_calls(&idp, &short).await, 2);
}

/// An RS256 token with a `kid` the issuer never published, for `email`.
fn unknown_kid_token(idp: &Idp, email: &str) -> String {
    let header = jsonwebtoken::Header {
        alg: jsonwebtoken::Algorithm::RS256,
        kid: Some(unique("kid")),
        ..Default::default()
    };
    format!(
        "{}.{}.{}",
        b64url(serde_json::to_string(&header).unwrap().as_bytes()),
        b64url(payload_for(idp, email).to_string().as_bytes()),
        b64url(b"sig")
    )
}

async fn gate(idp: &Idp, name: &str, action: &str) -> serde_json::Value {
    let c = reqwest::Client::new();
    let url = format!("{}/__gated/{name}/{action}", idp.url);
    let r = if action == "state" {
        c.get(url)
    } else {
        c.post(url)
    };
    r.send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_key_fetch_does_not_stall_logins_whose_key_is_known() {
    let Some(idp) = idp() else { return };
    let name = unique("gate");
    let extra = leak(format!(
        "        discovery: false\n        jwks_uri: \"{}/__gated/{name}/jwks\"",
        idp.url
    ));
    let Some((t, _)) = start(extra).await else {
        return;
    };
    let t = std::sync::Arc::new(t);
    // The keys are fetched once and known.
    let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
    // Now the IdP hangs, and past the refresh interval (1 s) two tokens with unknown kids
    // make the gateway fetch again.
    gate(&idp, &name, "hold").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut waiting = Vec::new();
    for user in ["mia@example.org", "bob@example.org"] {
        let t = t.clone();
        let token = unknown_kid_token(&idp, user);
        waiting.push(tokio::spawn(async move {
            refused(&t, "XOAUTH2", &xoauth2(user, &token)).await;
        }));
        // The first one's fetch is under way before the second arrives.
        let since = std::time::Instant::now();
        while gate(&idp, &name, "state").await["waiting"] == 0 {
            assert!(since.elapsed() < Duration::from_secs(5), "no key fetch");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A token whose key is known is answered at once, fetch or no fetch.
    let started = std::time::Instant::now();
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
    // (Before, it waited for the fetch to time out: about 5 s.)
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a known key waited {:?} for a slow fetch",
        started.elapsed()
    );
    // One fetch at a time: the second unknown kid waits for the first's.
    assert_eq!(gate(&idp, &name, "state").await["waiting"], 1);
    gate(&idp, &name, "release").await;
    for w in waiting {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("unknown kids hung")
            .unwrap();
    }
    // The second unknown kid was answered by the first one's fetch, not a fetch of its own.
    assert_eq!(gate(&idp, &name, "state").await["served"], 2);
}

#[tokio::test]
async fn the_email_claim_needs_email_verified_true() {
    let Some((t, idp)) = start("").await else {
        return;
    };
    // eve's address is unverified; sam's provider says "true", a string.
    let eve = idp.token("eve", "urn:imapgate:rs256", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("eve@example.org", &eve)).await;
    let sam = idp.token("sam", "urn:imapgate:rs256", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("sam@example.org", &sam)).await;
    assert_eq!(
        t.metric(
            "imapgate_oauth_tokens_total",
            &["result=\"email_not_verified\""]
        )
        .await,
        2.0
    );
    let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
    // Switched off: eve's token passes the token checks (the backend, which has no eve, is
    // then the one to refuse her).
    let Some((t, _)) = start("        require_email_verified: false").await else {
        return;
    };
    let mut c = t.client().await;
    let r = c
        .cmd(
            "a",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2("eve@example.org", &eve)),
        )
        .await;
    assert!(!r[0].starts_with("+ "), "{r:?}");
    assert_eq!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"valid\""])
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_issuer_opens_only_the_domains_it_lists() {
    let Some((t, idp)) = start("        domains: [example.net, Example.COM]").await else {
        return;
    };
    let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
    refused(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
    refused(&t, "OAUTHBEARER", &oauthbearer(None, &alice)).await;
    assert_eq!(
        t.metric("imapgate_oauth_tokens_total", &["result=\"wrong_domain\""])
            .await,
        2.0
    );
    let Some((t, _)) = start("        domains: [example.net, example.org]").await else {
        return;
    };
    accepted(&t, "XOAUTH2", &xoauth2("alice@example.org", &alice)).await;
}

#[tokio::test]
async fn a_kelvin_sign_opens_no_mailbox() {
    // The IdP's kelvin account has the email "\u{212A}ate@example.org" (KELVIN SIGN, not k).
    // A full Unicode lower-casing would take it for kate@example.org.
    for unicode in [false, true] {
        let Some(t) = TestGateway::start_with(Options {
            oauth: Some(""),
            auth_extra: if unicode { "  unicode_names: true" } else { "" },
            ..Default::default()
        })
        .await
        else {
            return;
        };
        let idp = idp().unwrap();
        let kelvin = idp.token("kelvin", "urn:imapgate:rs256", "imap").await;
        refused(&t, "XOAUTH2", &xoauth2("kate@example.org", &kelvin)).await;
        refused(&t, "OAUTHBEARER", &oauthbearer(None, &kelvin)).await;
        assert_eq!(
            t.metric("imapgate_oauth_tokens_total", &["result=\"no_user\""])
                .await,
            2.0,
            "unicode_names: {unicode}"
        );
        // The SASL user with a Kelvin sign is refused before the token is looked at.
        let alice = idp.token("alice", "urn:imapgate:rs256", "imap").await;
        refused(&t, "XOAUTH2", &xoauth2("\u{212A}ate@example.org", &alice)).await;
        // A LOGIN name with one is refused like an unknown user.
        let mut c = t.client().await;
        let r = c
            .cmd(
                "l",
                "LOGIN \"\u{212A}ate@example.org\" \"abcdabcdabcdabcd\"",
            )
            .await;
        assert!(
            last(&r).starts_with("l NO") || last(&r).starts_with("l BAD"),
            "{r:?}"
        );
    }
}
