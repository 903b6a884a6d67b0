//! Several replicas, one memory: two gateways on one real `redis-server` (Debian's, started on
//! a free loopback port with a password). What one replica learns — guard failures, used TOTP
//! codes, unlock windows, attack mode — the other acts on; when Redis dies they keep serving
//! with local state, and when it comes back the shared state resumes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use imapgate::config::Config;
use imapgate::server::Gateway;

use crate::harness::*;

/// Replica A (the test gateway) and replica B (the same configuration file, its own ports).
struct Pair {
    a: TestGateway,
    b: Gateway,
    redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Pair {
    async fn start(guard: &str, on_error: &str) -> Option<Pair> {
        let redis = RedisServer::start()?;
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("redis.url");
        std::fs::write(&url_file, redis.url()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let a = TestGateway::start_with(Options {
            guard: format!("  tarpit: {{ start: 100ms, max: 400ms }}\n{guard}"),
            state: format!(
                "  backend: redis\n  redis: {{ url_file: \"{}\", key_prefix: \"t:\", timeout: 300ms, on_error: {on_error} }}",
                url_file.display()
            ),
            ..Default::default()
        })
        .await?;
        let b = Gateway::start(Config::load(&a.config_path).unwrap())
            .await
            .unwrap();
        Some(Pair {
            a,
            b,
            redis,
            _dir: dir,
        })
    }

    fn a(&self) -> SocketAddr {
        self.a.imaps()
    }

    fn b(&self) -> SocketAddr {
        self.b.listener("imaps").unwrap()
    }

    /// LOGIN on replica `at` from the loopback address `from`; the tagged reply.
    async fn login(&self, at: SocketAddr, from: &str, user: &str, password: &str) -> String {
        let mut c = Client::tls_from(at, from, &self.a.pki.ca_der).await;
        c.line().await.unwrap();
        let r = c.cmd("a", &format!("LOGIN {user} \"{password}\"")).await;
        last(&r).to_owned()
    }

    async fn metric_b(&self, name: &str) -> f64 {
        let text = http_get(self.b.admin, "/metrics").await.1;
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A store configuration for `redis` (local fallback, 2 s timeout) with keys under `prefix`.
fn redis_config(redis: &RedisServer, prefix: &str) -> imapgate::config::RedisConfig {
    imapgate::config::RedisConfig {
        url: imapgate::secret::Secret::from(redis.url()),
        ca_file: None,
        key_prefix: prefix.into(),
        on_error: imapgate::config::OnError::Local,
        timeout: Duration::from_secs(2),
        allow_eviction: false,
    }
}

fn ok(r: &str) -> bool {
    r.starts_with("a OK")
}

#[tokio::test]
async fn guesses_spread_over_two_replicas_are_counted_once() {
    let Some(p) = Pair::start("  per_ip: { failures: 4, per: 15m }", "local").await else {
        return;
    };
    // Five wrong guesses from one address, alternating replicas: 3 on A, 2 on B. Each replica
    // alone would still be within its budget of 4; together they are over it.
    for (i, at) in [p.a(), p.b(), p.a(), p.b(), p.a()].into_iter().enumerate() {
        let r = p
            .login(at, "127.0.9.1", "bob@example.org", &format!("guess-{i}"))
            .await;
        assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    }
    let bob = p.a.password("bob@example.org");
    for at in [p.a(), p.b()] {
        assert!(
            !ok(&p.login(at, "127.0.9.1", "bob@example.org", &bob).await),
            "the address is blocked on both replicas"
        );
    }
    assert!(ok(&p
        .login(p.b(), "127.0.8.1", "bob@example.org", &bob)
        .await));
}

#[tokio::test]
async fn a_code_used_on_one_replica_is_refused_on_the_other_and_unlocks_are_shared() {
    let Some(p) = Pair::start("", "local").await else {
        return;
    };
    let user = "mia@example.org";
    let pw = p.a.password(user).replace(' ', "");
    let code = p.a.code(user, 0);
    assert!(ok(&p
        .login(p.a(), "127.0.10.1", user, &format!("{pw}{code}"))
        .await));
    // The same code on B, from a network that is not unlocked: replayed.
    assert!(p
        .login(p.b(), "127.0.11.1", user, &format!("{pw}{code}"))
        .await
        .starts_with("a NO [AUTHENTICATIONFAILED]"));
    // The unlock A granted for 127.0.10.0/24 works on B: the app password alone.
    assert!(ok(&p.login(p.b(), "127.0.10.2", user, &pw).await));
}

#[tokio::test]
async fn attack_mode_entered_on_one_replica_applies_on_the_other() {
    let Some(p) = Pair::start("  per_account: { failures: 4, per: 15m }", "local").await else {
        return;
    };
    let user = "carol@example.org";
    for i in 0..6 {
        let r = p
            .login(
                p.a(),
                &format!("127.{}.0.1", 20 + i),
                user,
                &format!("g{i}"),
            )
            .await;
        assert!(r.starts_with("a NO"), "{r}");
    }
    let pw = p.a.password(user);
    assert!(
        !ok(&p.login(p.b(), "127.40.0.1", user, &pw).await),
        "attack mode holds on B"
    );
    let (code, body) = admin_request(p.b.admin, "GET", "/guard/blocks", Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 200);
    assert!(
        body.contains("\"scope\":\"account\",\"value\":\"carol@example.org\""),
        "{body}"
    );
}

#[tokio::test]
async fn a_redis_outage_falls_back_to_local_state_and_recovers() {
    let Some(p) = Pair::start("", "local").await else {
        return;
    };
    let user = "max@example.org";
    let pw = p.a.password(user).replace(' ', "");
    let code = p.a.code(user, 0);
    assert!(ok(&p
        .login(p.a(), "127.0.50.1", user, &format!("{pw}{code}"))
        .await));
    let (_, ready) = http_get(p.b.admin, "/readyz").await;
    assert!(ready.contains("state: redis ok"), "{ready}");

    p.redis.kill();
    // Logins keep working on both replicas, with local limits.
    let alice = p.a.password("alice@example.org");
    for at in [p.a(), p.b()] {
        assert!(ok(&p
            .login(at, "127.0.51.1", "alice@example.org", &alice)
            .await));
    }
    // A has its own copy of the code it accepted: no replay on A during the outage.
    assert!(!ok(&p
        .login(p.a(), "127.0.52.1", user, &format!("{pw}{code}"))
        .await));
    assert!(p.metric_b("imapgate_state_store_errors_total").await >= 1.0);
    assert_eq!(p.metric_b("imapgate_state_store_up").await, 0.0);
    let (code_ready, ready) = http_get(p.b.admin, "/readyz").await;
    assert_eq!(
        code_ready, 200,
        "still ready under on_error: local: {ready}"
    );
    assert!(ready.contains("redis unreachable"), "{ready}");

    // Redis comes back (empty: no persistence): both replicas return to it by themselves.
    p.redis.resume();
    let mut back = false;
    for _ in 0..50 {
        if p.metric_b("imapgate_state_store_up").await == 1.0
            && p.a.metric("imapgate_state_store_up", &[]).await == 1.0
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "the replicas did not return to Redis");
    // Shared again: a new code used on B is refused on A.
    let user = "milo@example.org";
    let pw = p.a.password(user).replace(' ', "");
    let code = p.a.code(user, 0);
    assert!(ok(&p
        .login(p.b(), "127.0.53.1", user, &format!("{pw}{code}"))
        .await));
    assert!(!ok(&p
        .login(p.a(), "127.0.54.1", user, &format!("{pw}{code}"))
        .await));
    assert!(!p
        .redis
        .cli(&["--scan", "--pattern", "t:*"])
        .trim()
        .is_empty());
}

#[tokio::test]
async fn fail_closed_refuses_what_needs_the_shared_state() {
    let Some(p) = Pair::start("", "fail_closed").await else {
        return;
    };
    p.redis.kill();
    let alice = p.a.password("alice@example.org");
    assert!(
        !ok(&p
            .login(p.a(), "127.0.60.1", "alice@example.org", &alice)
            .await),
        "the guard cannot decide without Redis: refused"
    );
    let mut unready = false;
    for _ in 0..30 {
        let (code, body) = http_get(p.b.admin, "/readyz").await;
        if code == 503 && body.contains("fail_closed") {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unready, "not ready while the shared state is unreachable");
    p.redis.resume();
    let mut back = false;
    for _ in 0..50 {
        if ok(&p
            .login(p.a(), "127.0.61.1", "alice@example.org", &alice)
            .await)
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back);
}

/// Item 7 of issue 16: every gateway key has a TTL, so a Redis with a `maxmemory` and any
/// policy but `noeviction` may drop a used-code marker under memory pressure, and the code
/// could be replayed. Such a Redis keeps `/readyz` false with the reason and fails `doctor`
/// (read with `CONFIG GET`, or `INFO memory` where CONFIG is disabled as on managed Redis);
/// `noeviction` passes both; `allow_eviction: true` accepts the risk with a warning.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_may_evict_keys_is_not_ready_and_fails_doctor() {
    const LRU: &[&str] = &["--maxmemory", "1mb", "--maxmemory-policy", "allkeys-lru"];
    const NO_CONFIG: &[&str] = &["--rename-command", "CONFIG", ""];
    const NO_INFO: &[&str] = &["--rename-command", "INFO", ""];
    let cases: [(Vec<&str>, bool, &str, &str, &str); 5] = [
        // args, allow_eviction, readiness, /readyz line, doctor line
        (
            LRU.to_vec(),
            false,
            "503",
            "state (redis): not ok: maxmemory-policy allkeys-lru with a maxmemory may evict used TOTP codes",
            "[FAIL] state (redis): maxmemory-policy allkeys-lru with a maxmemory may evict used TOTP codes",
        ),
        (
            [LRU, NO_CONFIG].concat(),
            false,
            "503",
            "state (redis): not ok: maxmemory-policy allkeys-lru",
            "[FAIL] state (redis): maxmemory-policy allkeys-lru",
        ),
        (
            [LRU, NO_CONFIG, NO_INFO].concat(),
            false,
            "503",
            "state (redis): not ok: cannot read maxmemory-policy",
            "[FAIL] state (redis): cannot read maxmemory-policy",
        ),
        (
            LRU.to_vec(),
            true,
            "200",
            "state: redis ok; maxmemory-policy allkeys-lru may evict used TOTP codes (accepted by state.redis.allow_eviction)",
            "[warn] state (redis): maxmemory-policy allkeys-lru may evict",
        ),
        (
            vec!["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"],
            false,
            "200",
            "state: redis ok",
            "[ok]   state (redis): answers; keys are never evicted",
        ),
    ];
    for (args, allow, status, ready_line, doctor_line) in cases {
        let Some(redis) = RedisServer::start_with(&args) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("redis.url");
        write_secret(&url_file, redis.url());
        let t = TestGateway::start_with(Options {
            state: format!(
                "  backend: redis\n  redis: {{ url_file: \"{}\", key_prefix: \"e:\"{} }}",
                url_file.display(),
                if allow { ", allow_eviction: true" } else { "" }
            ),
            ..Default::default()
        })
        .await
        .unwrap();
        // The policy is read when the probe first reaches Redis, the backend is up after its
        // first probe: wait for both.
        let mut last_seen = (0, String::new());
        for _ in 0..50 {
            last_seen = http_get(t.gw.admin, "/readyz").await;
            if !last_seen.1.contains("not read yet") && last_seen.1.contains("backend dovecot: up")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (code, body) = last_seen;
        assert_eq!(code.to_string(), status, "{args:?}: {body}");
        assert!(
            body.lines().any(|l| l.starts_with(ready_line)),
            "{args:?}: {body}"
        );
        let config = t.config_path.clone();
        let out = tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"))
                .args(["doctor", "-c"])
                .arg(config)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .await
        .unwrap();
        assert!(
            out.lines().any(|l| l.starts_with(doctor_line)),
            "{args:?}: {out}"
        );
        if doctor_line.starts_with("[FAIL]") {
            assert!(out.contains("noeviction"), "the fix is named: {out}");
        }
        assert!(!out.contains(&redis.password), "{out}");
        assert!(!body.contains(&redis.password), "{body}");
    }
}

/// The replica's local store keeps a copy of every marker, and never evicts one: when markers
/// fill it, a new one is refused there, and Redis alone decides while it answers (a used code
/// is still refused, a new one accepted). Without Redis, the refusal stands: a code is never
/// accepted unremembered.
#[tokio::test]
async fn a_local_store_full_of_markers_defers_to_redis() {
    use imapgate::state::{MemoryStore, SharedStore, Store};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cfg = redis_config(&redis, "f:");
    let local = Arc::new(MemoryStore::new(1000));
    let ttl = Duration::from_secs(600);
    for i in 0..1000 {
        local
            .put(&format!("g:block:ip:10.0.0.{i}"), "spray", ttl)
            .await
            .unwrap();
    }
    let metrics = Arc::new(imapgate::observe::Metrics::new().unwrap());
    let shared = SharedStore::new(
        imapgate::state::RedisStore::new(&cfg).unwrap(),
        local.clone(),
        cfg.on_error,
        metrics,
    );
    let code = "totp:alice@example.org:58000001";
    assert!(shared.set_if_absent(code, "ap", ttl).await.unwrap());
    assert!(!shared.set_if_absent(code, "ap", ttl).await.unwrap());
    shared
        .put("unlock:alice@example.org:x", "1", ttl)
        .await
        .unwrap();
    assert_eq!(
        shared
            .get("unlock:alice@example.org:x")
            .await
            .unwrap()
            .as_deref(),
        Some("1")
    );
    assert_eq!(local.len(), 1000, "no marker was evicted to make room");
    redis.kill();
    assert!(shared
        .set_if_absent("totp:alice@example.org:58000002", "ap", ttl)
        .await
        .is_err());
}

/// Many attempts at once on one GCRA cell, from two independent store instances: exactly the
/// budget passes, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checks_on_one_key_never_exceed_the_budget() {
    use imapgate::state::{Rate, RateDecision, RedisStore, Store};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cfg = redis_config(&redis, "c:");
    let stores: Vec<Arc<RedisStore>> = (0..2)
        .map(|_| Arc::new(RedisStore::new(&cfg).unwrap()))
        .collect();
    let rate = Rate {
        burst: 10,
        period: Duration::from_secs(3600),
    };
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            s.rate_check("one-key", rate).await.unwrap() == RateDecision::Allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap());
    }
    assert_eq!(allowed, 10);
    // Markers are set once across instances too.
    let mut firsts = 0;
    for s in &stores {
        firsts += usize::from(
            s.set_if_absent("marker", "x", Duration::from_secs(60))
                .await
                .unwrap(),
        );
    }
    assert_eq!(firsts, 1);
    // Every key carries a TTL.
    let ttl = redis.cli(&["PTTL", "c:one-key"]);
    assert!(ttl.trim().parse::<i64>().unwrap() > 0, "{ttl}");
}

/// Sizing for docs/state.md: Redis memory for the guard's keys under a spray of random
/// addresses and accounts. `cargo test --test gateway redis_memory -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: it prints the sizing docs/state.md quotes (20,000 attempts, several seconds)"]
async fn redis_memory_per_failed_attempt() {
    use imapgate::guard::{AttemptKey, Guard, Kind, Outcome};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cfg = redis_config(&redis, "imapgate:");
    let store = Arc::new(imapgate::state::RedisStore::new(&cfg).unwrap());
    let metrics = Arc::new(imapgate::observe::Metrics::new().unwrap());
    let guard = Guard::new(Default::default(), store, metrics, Some(b"seed"));
    let used = |r: &RedisServer| -> u64 {
        r.cli(&["INFO", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before = used(&redis);
    let n = 20_000u32;
    for i in 0..n {
        let ip =
            std::net::IpAddr::from((0x0A00_0000u32 | i.wrapping_mul(2_654_435_761)).to_be_bytes());
        let user = format!("user{i}@example.org");
        let key = AttemptKey {
            client_ip: ip,
            user: Some(&user),
            kind: Kind::Password,
        };
        let d = guard.check(key).await;
        let fp = guard.fingerprint(&user, b"guess");
        guard
            .record(
                key,
                Outcome::Failure {
                    fingerprint: Some(&fp),
                    wrong_code: None,
                },
            )
            .await;
        drop(d);
    }
    let keys: u64 = redis.cli(&["DBSIZE"]).trim().parse().unwrap();
    let bytes = used(&redis) - before;
    println!(
        "{n} failed attempts from random addresses: {keys} keys, {} MiB, {} bytes per key, {} bytes per attempt",
        bytes / (1024 * 1024),
        bytes / keys,
        bytes / u64::from(n)
    );
}
