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
