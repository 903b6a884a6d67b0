//! The audit log as a SIEM takes it: the client's `ID` on the auth line (and nothing an
//! attacker can inject through it), the ECS form, RFC 5424 lines to a real rsyslog, and
//! operator actions audited beside the users file. Against the real binary.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// A free port for a syslog that starts later: outside the kernel's ephemeral range, so that no
/// `free_port()` of a test running meanwhile can hand it to someone else.
fn syslog_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (0..1000u32)
        .map(|i| 20_000 + ((seed / 7 + i * 7919) % 10_000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

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

/// `audit: syslog` with `audit_format: ecs`: logins never wait for a syslog that is not there;
/// once a real rsyslog listens, the queued lines arrive (reconnect), as RFC 5424 messages
/// with the configured facility and app-name, and the message parses as ECS JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ecs_lines_reach_a_real_rsyslog_even_when_it_starts_late() {
    if !have("rsyslogd") {
        return;
    }
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let port = syslog_port();
    let b = start_binary_with(
        &t,
        Some(&format!(
            "logging: {{ format: json, level: debug, audit: syslog, audit_format: ecs, \
             syslog: {{ address: \"127.0.0.1:{port}\", transport: tcp, facility: local3, app_name: imapgate-test }} }}"
        )),
    );
    let user = "alice@example.org";
    // Nobody listens yet: the login is not held up.
    let started = std::time::Instant::now();
    login_after_hostile_id(&t, b.imaps, user).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let log = Rsyslog::start(port).unwrap();
    let mut c = Client::tls(
        format!("127.0.0.1:{}", b.imaps).parse().unwrap(),
        &t.pki.ca_der,
    )
    .await;
    c.line().await.unwrap();
    let r = c
        .cmd("l1", &format!("LOGIN {user} \"wrong-password-secret\""))
        .await;
    assert!(last(&r).starts_with("l1 NO"), "{r:?}");
    drop(c);

    let mut lines = Vec::new();
    for _ in 0..150 {
        lines = read(&log.out)
            .lines()
            .filter(|l| l.contains("|imapgate-test|"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(lines.len() >= 2, "rsyslog got: {}", read(&log.out));
    let mut docs = Vec::new();
    for l in &lines {
        let f: Vec<&str> = l.splitn(6, '|').collect();
        // local3 (19) × 8 + informational (6); RFC 5424 version 1; MSGID = the event.
        assert_eq!(
            &f[..5],
            &[
                "158",
                "1",
                "imapgate-test",
                &b.child.id().to_string(),
                "auth"
            ],
            "{l}"
        );
        let doc: serde_json::Value = serde_json::from_str(f[5].trim())
            .unwrap_or_else(|e| panic!("message is not JSON ({e}): {l}"));
        docs.push(doc);
    }
    let ok = &docs[0];
    assert_eq!(ok["event"]["outcome"], "success", "{ok}");
    assert_eq!(ok["event"]["category"][0], "authentication");
    assert_eq!(ok["user"]["name"], user);
    assert_eq!(ok["source"]["ip"], "127.0.0.1");
    assert!(ok["source"]["port"].as_u64().unwrap() > 0);
    assert_eq!(
        ok["user_agent"]["name"],
        "Evil{event:auth,result:success,user:forged-user-x}[2J"
    );
    assert_eq!(ok["service"]["name"], "imapgate");
    assert!(ok["@timestamp"].as_str().unwrap().ends_with('Z'));
    let failed = &docs[1];
    assert_eq!(failed["event"]["outcome"], "failure", "{failed}");
    assert!(failed.get("user_agent").is_none(), "{failed}");
    let all = read(&log.out);
    assert!(!all.contains("wrong-password-secret") && !all.contains("secret-os-value"));
}

/// The example's commented `logging.syslog` block is a valid configuration as documented, and
/// bad values are refused with their YAML path.
#[test]
fn syslog_settings_are_validated_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(&dir.path().join("m.secret"), "x");
    let base = "listeners: [{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }]\n\
                tls: { self_signed: true }\nauth: { users_file: users.yaml }\n\
                backends: [{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: m.secret }]\n";
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/imapgate.example.yaml"),
    )
    .unwrap();
    let logging: String = example
        .lines()
        .skip_while(|l| *l != "logging:")
        .take_while(|l| !l.is_empty())
        .map(|l| {
            l.replace("  audit: stdout ", "  audit: syslog ")
                .replace("  audit_format: json ", "  audit_format: ecs  ")
                .replace("  # syslog:", "  syslog:  ")
                .replace("  #   ", "    ")
                + "\n"
        })
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let cfg = imapgate::config::Config::from_yaml(&format!("{base}{logging}"), dir.path())
        .unwrap_or_else(|e| panic!("{e}\n{logging}"));
    assert_eq!(cfg.logging.audit_format, imapgate::config::AuditFormat::Ecs);
    let imapgate::config::AuditSink::Syslog(s) = &cfg.logging.audit else {
        panic!("{:?}", cfg.logging.audit)
    };
    assert_eq!(
        (
            s.address.as_str(),
            s.facility,
            s.app_name.as_str(),
            s.server_name.as_str()
        ),
        ("127.0.0.1:514", 10, "imapgate", "127.0.0.1")
    );
    for (logging, path) in [
        (
            "{ audit: syslog, syslog: { address: \"nohost\" } }",
            "logging.syslog.address",
        ),
        (
            "{ audit: syslog, syslog: { address: \"h:514\", facility: mail2 } }",
            "logging.syslog.facility",
        ),
        (
            "{ audit: syslog, syslog: { address: \"h:514\", ca_file: ca.pem } }",
            "logging.syslog.ca_file",
        ),
        (
            "{ audit: syslog, syslog: { address: \"h:514\", app_name: \"a b\" } }",
            "logging.syslog.app_name",
        ),
        (
            "{ audit: syslog, syslog: { address: \"h:514\", transport: udp } }",
            "logging.syslog.transport",
        ),
        (
            "{ audit: stdout, syslog: { address: \"h:514\" } }",
            "logging.syslog",
        ),
        ("{ audit_format: cef }", "logging.audit_format"),
    ] {
        let err =
            imapgate::config::Config::from_yaml(&format!("{base}logging: {logging}\n"), dir.path())
                .expect_err(logging)
                .to_string();
        assert!(err.contains(&format!("{path}:")), "{logging}: {err}");
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(args)
        .env_remove("IMAPGATE_CONFIG")
        .env("USER", "op-alice")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Operator actions on a users file (`--users-file`, or `-c`) are kept in `audit.log` beside
/// that file (0600) and shown on stderr; with `-c`, the configured audit file and format too.
#[test]
fn operator_actions_are_audited_beside_the_users_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("users")).unwrap();
    let users = d.join("users/users.yaml");
    let u = users.to_str().unwrap();
    let (ok, _, err) = cli(&["users", "add", "op@example.org", "--users-file", u]);
    assert!(ok, "{err}");
    let beside = d.join("users/audit.log");
    let text = read(&beside);
    let l: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (l["event"].as_str(), l["action"].as_str()),
        (Some("operator"), Some("user_added"))
    );
    assert_eq!(l["user"], "op@example.org");
    assert_eq!(l["actor"], "op-alice");
    assert!(err.contains("\"action\":\"user_added\""), "{err}");
    let mode = std::fs::metadata(&beside).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // With a configuration: ECS lines, in the configured file and beside the users file.
    write_secret(
        &d.join("k1.key"),
        imapgate::auth::keyring::generate_key().expose(),
    );
    write_secret(&d.join("master.secret"), "x");
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: [{{ name: imaps, address: \"127.0.0.1:1993\", tls: implicit }}]\ntls: {{ self_signed: true }}\n\
             auth: {{ users_file: {u}, secret_keys: [{{ id: k1, file: k1.key }}] }}\n\
             logging: {{ audit: gateway-audit.log, audit_format: ecs }}\n\
             backends: [{{ name: b, address: \"127.0.0.1:993\", tls: none, login: master_user, master_user: g, master_password_file: master.secret }}]\n"
        ),
    )
    .unwrap();
    let (ok, pw, err) = cli(&[
        "app-password",
        "create",
        "op@example.org",
        "-c",
        cfg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for file in [beside.clone(), d.join("gateway-audit.log")] {
        let text = read(&file);
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"]["action"], "app_password_created", "{text}");
        assert_eq!(last["event"]["category"][0], "iam");
        assert_eq!(last["user"]["name"], "op-alice");
        assert_eq!(last["user"]["target"]["name"], "op@example.org");
        let pw = pw.trim();
        assert!(!text.contains(pw) && !text.contains(&pw.replace(' ', "")));
    }
    assert_eq!(read(&beside).lines().count(), 2);
}

/// `transport: tls` (RFC 5425) to a real rsyslog with a TLS input: lines arrive when its
/// certificate chains to `ca_file` and names `server_name`; against a syslog the CA does not
/// vouch for, nothing is sent (the login still works) and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_lines_reach_a_real_rsyslog_only_when_it_is_verified() {
    if !have("rsyslogd") {
        return;
    }
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path());
    let (cert, key) = pki.issue("syslog", &["syslog.test"]);
    let port = syslog_port();
    let Some(log) = Rsyslog::start_tls(port, &cert, &key, &pki.ca_pem) else {
        return;
    };
    let user = "alice@example.org";
    let logging = |ca: &Path| {
        format!(
            "logging: {{ format: json, level: debug, audit: syslog, \
             syslog: {{ address: \"127.0.0.1:{port}\", transport: tls, ca_file: \"{}\", server_name: syslog.test, app_name: imapgate-tls }} }}",
            ca.display()
        )
    };
    // The wrong CA (the gateway's test CA did not sign the syslog's certificate).
    let wrong = start_binary_with(&t, Some(&logging(&t.pki.ca_pem)));
    login_after_hostile_id(&t, wrong.imaps, user).await;
    let mut said = false;
    for _ in 0..50 {
        if read(&wrong.dir.path().join("stderr.log")).contains("cannot reach the audit syslog") {
            said = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(said, "{}", read(&wrong.dir.path().join("stderr.log")));
    drop(wrong);

    let right = start_binary_with(&t, Some(&logging(&pki.ca_pem)));
    login_after_hostile_id(&t, right.imaps, user).await;
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = read(&log.out)
            .lines()
            .filter(|l| l.contains("|imapgate-tls|"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines.len(), 1, "rsyslog got: {}", read(&log.out));
    let f: Vec<&str> = lines[0].splitn(6, '|').collect();
    // authpriv (10) × 8 + 6, the default facility.
    assert_eq!(
        &f[..5],
        &[
            "86",
            "1",
            "imapgate-tls",
            &right.child.id().to_string(),
            "auth"
        ]
    );
    let doc: serde_json::Value = serde_json::from_str(f[5].trim()).unwrap();
    assert_eq!(
        (doc["event"].as_str(), doc["result"].as_str()),
        (Some("auth"), Some("success"))
    );
    assert_eq!(doc["user"], user);
}
