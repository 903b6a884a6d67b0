//! The policy, without sockets: a memory store, tokio's paused clock.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::GuardConfig;
use crate::state::MemoryStore;

mod lanes;

fn guard_with(cfg: GuardConfig, max_entries: usize) -> (Guard, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new(max_entries));
    let metrics = Arc::new(Metrics::new().unwrap());
    (Guard::new(cfg, store.clone(), metrics, None), store)
}

fn guard() -> Guard {
    guard_with(GuardConfig::default(), 100_000).0
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pw<'a>(addr: &str, user: &'a str) -> AttemptKey<'a> {
    AttemptKey {
        client_ip: ip(addr),
        user: Some(user),
        kind: Kind::Password,
    }
}

/// Records a checked attempt as failed: `fingerprint` of its secret (none for a token) and,
/// for a right app password with a wrong code, that app password's id.
async fn record_failure(
    g: &Guard,
    key: AttemptKey<'_>,
    fingerprint: Option<&str>,
    wrong_code: Option<&str>,
) {
    g.record(
        key,
        Outcome::Failure {
            fingerprint,
            wrong_code,
        },
    )
    .await;
}

/// One checked attempt that fails with a fresh wrong secret; returns the decision.
async fn fail(g: &Guard, key: AttemptKey<'_>, secret: &str) -> (Verdict, Scope) {
    let d = g.check(key).await;
    if d.verdict == Verdict::Allow {
        let fp = g.fingerprint(key.user.unwrap_or(""), secret.as_bytes());
        record_failure(g, key, Some(&fp), None).await;
    } else {
        g.record(key, Outcome::Refused).await;
    }
    (d.verdict, d.scope)
}

async fn verdict(g: &Guard, key: AttemptKey<'_>) -> (Verdict, Scope) {
    let d = g.check(key).await;
    (d.verdict, d.scope)
}

#[tokio::test(start_paused = true)]
async fn brute_force_from_one_address_is_blocked_within_its_budget() {
    let g = guard();
    let budget = g.config().per_ip.failures;
    for i in 0..budget {
        let (v, _) = fail(
            &g,
            pw("192.0.2.7", "alice@example.org"),
            &format!("guess{i}"),
        )
        .await;
        assert_eq!(v, Verdict::Allow, "attempt {i} is within the budget");
    }
    // The attempt that exceeds the budget is still checked; it imposes the block.
    fail(&g, pw("192.0.2.7", "alice@example.org"), "one-more").await;
    assert_eq!(
        verdict(&g, pw("192.0.2.7", "alice@example.org")).await,
        (Verdict::Reject, Scope::Ip)
    );
    // The block stops every account's password guesses from there…
    assert_eq!(
        verdict(&g, pw("192.0.2.7", "nobody@example.org")).await.0,
        Verdict::Reject
    );
    // …but not other addresses in other networks, and it ends after block_for.
    assert_eq!(
        verdict(&g, pw("198.51.100.1", "bob@example.org")).await.0,
        Verdict::Allow
    );
    tokio::time::advance(g.config().block_for + Duration::from_secs(1)).await;
    assert_eq!(
        verdict(&g, pw("192.0.2.7", "bob@example.org")).await.0,
        Verdict::Allow
    );
}

#[tokio::test(start_paused = true)]
async fn the_tarpit_doubles_per_failure_up_to_its_cap() {
    let g = guard();
    let mut delays = Vec::new();
    for i in 0..7 {
        let key = pw("192.0.2.8", "alice@example.org");
        let d = g.check(key).await;
        delays.push(d.delay.as_secs());
        let fp = g.fingerprint("alice@example.org", format!("g{i}").as_bytes());
        record_failure(&g, key, Some(&fp), None).await;
    }
    assert_eq!(delays, vec![0, 1, 2, 4, 8, 15, 15]);
    // A success from that address resets its failure count.
    g.record(
        pw("192.0.2.8", "alice@example.org"),
        Outcome::Success {
            user: "alice@example.org",
        },
    )
    .await;
    assert_eq!(
        g.check(pw("192.0.2.8", "alice@example.org")).await.delay,
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn spraying_from_one_address_or_one_subnet_blocks_it() {
    let g = guard();
    let n = g.config().spray.failures;
    // From one address: n distinct accounts may fail, the next one blocks.
    for i in 0..=n {
        let user = format!("user{i}@example.org");
        fail(&g, pw("192.0.2.9", &user), "Winter2026!").await;
    }
    assert_eq!(
        verdict(&g, pw("192.0.2.9", "fresh@example.org")).await,
        (Verdict::Reject, Scope::Ip)
    );
    // From many addresses of one /24, one account each.
    for i in 0..=n {
        let user = format!("other{i}@example.org");
        fail(
            &g,
            pw(&format!("203.0.113.{}", i + 1), &user),
            "Winter2026!",
        )
        .await;
    }
    assert_eq!(
        verdict(&g, pw("203.0.113.200", "fresh@example.org")).await,
        (Verdict::Reject, Scope::Subnet)
    );
}

#[tokio::test(start_paused = true)]
async fn a_distributed_attack_puts_the_account_in_attack_mode_without_locking_out_its_owner() {
    let g = guard();
    let victim = "carol@example.org";
    // The owner logged in from her office network last week.
    g.record(
        pw("198.51.100.20", victim),
        Outcome::Success { user: victim },
    )
    .await;
    let budget = g.config().per_account.failures;
    for i in 0..=budget {
        // One guess from each of many subnets: no per-address or per-subnet budget is hit.
        let addr = format!("10.{i}.0.1");
        let (v, _) = fail(&g, pw(&addr, victim), &format!("guess{i}")).await;
        assert_eq!(v, Verdict::Allow);
    }
    // Attack mode: password logins from unknown networks are checked only with a fresh
    // TOTP code (the authenticator refuses code-less ones unchecked)…
    assert_eq!(
        verdict(&g, pw("10.200.0.1", victim)).await,
        (Verdict::RequireCode, Scope::Account)
    );
    // …from her known network (any address in it) they are checked as usual…
    assert_eq!(
        verdict(&g, pw("198.51.100.99", victim)).await,
        (Verdict::Allow, Scope::KnownGood)
    );
    // …and bearer tokens are not affected at all.
    let token = AttemptKey {
        kind: Kind::Token,
        ..pw("10.200.0.1", victim)
    };
    assert_eq!(verdict(&g, token).await.0, Verdict::Allow);
    // Other accounts are not affected.
    assert_eq!(
        verdict(&g, pw("10.200.0.1", "dave@example.org")).await.0,
        Verdict::Allow
    );
    let status = g.status().await.unwrap();
    assert!(status
        .iter()
        .any(|b| b.scope == "account" && b.value == victim && b.enforced));
}

#[tokio::test(start_paused = true)]
async fn a_blocked_campus_subnet_still_lets_its_known_users_in() {
    let g = guard();
    g.record(
        pw("192.0.2.50", "erin@example.org"),
        Outcome::Success {
            user: "erin@example.org",
        },
    )
    .await;
    // One sprayer behind the same NAT address.
    for i in 0..=g.config().spray.failures {
        fail(&g, pw("192.0.2.50", &format!("s{i}@example.org")), "pw").await;
    }
    assert_eq!(
        verdict(&g, pw("192.0.2.50", "sprayed@example.org")).await.0,
        Verdict::Reject
    );
    assert_eq!(
        verdict(&g, pw("192.0.2.50", "erin@example.org")).await,
        (Verdict::Allow, Scope::KnownGood)
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_saved_password_counts_once() {
    let g = guard();
    for _ in 0..50 {
        let (v, _) = fail(&g, pw("192.0.2.60", "frank@example.org"), "old-password").await;
        assert_eq!(v, Verdict::Allow);
    }
    assert!(g.status().await.unwrap().is_empty());
    // (Its tarpit grows, though: see repeating_one_wrong_secret_still_grows_the_tarpit.)
}

/// What `guard.enforce: false` gives (config/guard.rs): every control in dry run.
fn dry_run_config() -> GuardConfig {
    let d = GuardConfig::default();
    let dry = |b: crate::config::Budget| crate::config::Budget {
        enforce: false,
        ..b
    };
    GuardConfig {
        enforce: false,
        per_ip: dry(d.per_ip),
        per_subnet: dry(d.per_subnet),
        per_account: dry(d.per_account),
        per_token_ip: dry(d.per_token_ip),
        spray: dry(d.spray),
        tarpit_enforce: false,
        ..d
    }
}

#[tokio::test(start_paused = true)]
async fn dry_run_blocks_nothing_and_counts_everything() {
    let cfg = dry_run_config();
    let (g, _) = guard_with(cfg, 100_000);
    for i in 0..40 {
        let (v, _) = fail(&g, pw("192.0.2.70", &format!("u{i}@example.org")), "x").await;
        assert_eq!(v, Verdict::Allow);
    }
    let d = g.check(pw("192.0.2.70", "u0@example.org")).await;
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(d.would_refuse);
    assert_eq!(d.action(), "would_reject");
    assert_eq!(d.delay, Duration::ZERO);
    let status = g.status().await.unwrap();
    assert!(!status.is_empty() && status.iter().all(|b| !b.enforced));
    let would = g
        .metrics
        .guard_decisions
        .with_label_values(&["would_reject", "ip"])
        .get();
    assert!(would >= 1, "{would}");
}

#[tokio::test(start_paused = true)]
async fn attempts_in_flight_per_address_wait_for_a_place() {
    let g = Arc::new(guard());
    let cap = g.config().max_delayed_per_ip;
    let mut held = Vec::new();
    let users: Vec<String> = (0..cap + 3).map(|i| format!("u{i}@example.org")).collect();
    for u in users.iter().take(cap as usize) {
        let d = g.check(pw("192.0.2.80", u)).await;
        assert_eq!(d.verdict, Verdict::Allow);
        held.push(d.permit);
    }
    // One more: it is neither refused nor checked; it waits for a place (a bounded wait).
    let waiting = {
        let (g, u) = (g.clone(), users[cap as usize].clone());
        tokio::spawn(async move { g.check(pw("192.0.2.80", &u)).await.verdict })
    };
    tokio::time::sleep(QUEUE_WAIT - Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "an attempt over the cap went ahead");
    let queued = g
        .metrics
        .guard_decisions
        .with_label_values(&["queue", "in_flight"])
        .get();
    assert_eq!(queued, 1);
    // Another address is not affected; a finished attempt lets the waiting one in.
    assert_eq!(
        g.check(pw("192.0.2.81", "x@example.org")).await.verdict,
        Verdict::Allow
    );
    held.pop();
    assert_eq!(waiting.await.unwrap(), Verdict::Allow);
    // When everything is answered, nothing is left in the map.
    held.clear();
    assert_eq!((g.in_flight.len(), g.accounts.len()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_attempt_that_gives_up_leaves_nothing_behind() {
    let g = Arc::new(guard());
    let cap = g.config().max_delayed_per_ip;
    let mut held = Vec::new();
    for i in 0..cap {
        held.push(
            g.check(pw("192.0.2.90", &format!("u{i}@example.org")))
                .await
                .permit,
        );
    }
    // The session's pre-auth deadline cancels the wait.
    let gone = tokio::time::timeout(
        QUEUE_WAIT / 2,
        g.check(pw("192.0.2.90", "late@example.org")),
    )
    .await;
    assert!(gone.is_err());
    held.clear();
    assert_eq!(g.in_flight.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_cap_applies_to_an_address_that_is_never_idle() {
    let g = Arc::new(guard());
    let mut cfg = (*g.config()).clone();
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(
            g.check(pw("192.0.2.95", &format!("u{i}@example.org")))
                .await
                .permit,
        );
    }
    // The operator lowers the cap to 2 while the address is busy: once the attempts already
    // in flight finish, only 2 run at a time, although the address never went idle.
    cfg.max_delayed_per_ip = 2;
    g.reconfigure(cfg);
    let mut newer = Vec::new();
    for i in 0..2 {
        newer.push(
            g.check(pw("192.0.2.95", &format!("n{i}@example.org")))
                .await
                .permit,
        );
    }
    let third = {
        let g = g.clone();
        tokio::spawn(async move { g.check(pw("192.0.2.95", "n2@example.org")).await.verdict })
    };
    tokio::time::sleep(QUEUE_WAIT / 2).await;
    assert!(!third.is_finished(), "the old cap still applies");
    held.clear();
    assert!(!third.is_finished());
    newer.pop();
    assert_eq!(third.await.unwrap(), Verdict::Allow);
    newer.clear();
    assert_eq!(g.in_flight.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn places_taken_and_given_back_on_many_threads_leave_no_entry() {
    // Holders and waiters on several threads, ending at the same moments: the map must end
    // empty (an Arc count read under the lock could keep orphans).
    let g = Arc::new(guard());
    let mut tasks = Vec::new();
    for i in 0..400 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let ip = format!("192.0.2.{}", i % 3);
            let user = format!("u{}@example.org", i % 5);
            let d = g.check(pw(&ip, &user)).await;
            tokio::task::yield_now().await;
            drop(d);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!((g.in_flight.len(), g.accounts.len()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_cap_still_lets_enforced_controls_decide() {
    // Global dry run with the per-address budget enforced on its own: an address over the
    // in-flight cap is counted as would_queue, and its block still applies.
    let mut cfg = GuardConfig {
        enforce: false,
        max_delayed_per_ip: 1,
        ..GuardConfig::default()
    };
    cfg.per_ip.enforce = true;
    let (g, _) = guard_with(cfg, 100_000);
    // Over the cap in dry run: counted, not queued.
    let first = g.check(pw("192.0.2.96", "a@example.org")).await;
    let second = g.check(pw("192.0.2.96", "b@example.org")).await;
    assert_eq!(
        (first.verdict, second.verdict),
        (Verdict::Allow, Verdict::Allow)
    );
    let would = g
        .metrics
        .guard_decisions
        .with_label_values(&["would_queue", "in_flight"])
        .get();
    assert_eq!(would, 1);
    drop((first, second));
    // The enforced address budget still blocks, and a blocked attempt takes no place.
    for i in 0..12 {
        fail(&g, pw("192.0.2.96", &format!("w{i}@example.org")), "x").await;
    }
    let held = g.check(pw("192.0.2.96", "c@example.org")).await;
    assert_eq!((held.verdict, held.scope), (Verdict::Reject, Scope::Ip));
    assert!(held.permit.is_none());
}

#[tokio::test(start_paused = true)]
async fn ipv6_attempts_in_flight_are_counted_per_64() {
    let g = Arc::new(guard());
    let cap = g.config().max_delayed_per_ip;
    let mut held = Vec::new();
    for i in 0..cap {
        // A different address of the same /64 each time.
        let addr = format!("2001:db8:1:2::{:x}", i + 1);
        let d = g.check(pw(&addr, &format!("u{i}@example.org"))).await;
        assert_eq!(d.verdict, Verdict::Allow);
        held.push(d.permit);
    }
    let same_64 = {
        let g = g.clone();
        tokio::spawn(async move {
            g.check(pw("2001:db8:1:2::ffff", "z@example.org"))
                .await
                .verdict
        })
    };
    tokio::time::sleep(QUEUE_WAIT / 2).await;
    assert!(!same_64.is_finished());
    assert_eq!(
        g.check(pw("2001:db8:1:3::1", "z@example.org"))
            .await
            .verdict,
        Verdict::Allow
    );
    held.clear();
    assert_eq!(same_64.await.unwrap(), Verdict::Allow);
}

#[tokio::test(start_paused = true)]
async fn the_allow_list_is_never_throttled() {
    let cfg = GuardConfig {
        allow: vec!["192.0.2.0/28".parse().unwrap()],
        ..GuardConfig::default()
    };
    let (g, store) = guard_with(cfg, 100_000);
    for i in 0..100 {
        let (v, s) = fail(&g, pw("192.0.2.5", &format!("u{i}@example.org")), "x").await;
        assert_eq!((v, s), (Verdict::Allow, Scope::AllowList));
    }
    assert!(
        store.is_empty(),
        "nothing is recorded for allow-listed probes"
    );
}

#[tokio::test(start_paused = true)]
async fn token_failures_have_their_own_budget() {
    let g = guard();
    let key = AttemptKey {
        client_ip: ip("192.0.2.90"),
        user: None,
        kind: Kind::Token,
    };
    for _ in 0..=g.config().per_token_ip.failures {
        g.check(key).await;
        record_failure(&g, key, None, None).await;
    }
    assert_eq!(verdict(&g, key).await, (Verdict::Reject, Scope::TokenIp));
    // Password logins from there are not blocked by bad tokens.
    assert_eq!(
        verdict(&g, pw("192.0.2.90", "a@example.org")).await.0,
        Verdict::Allow
    );
}

#[tokio::test(start_paused = true)]
async fn clearing_a_block_restores_access_and_its_budget() {
    let g = guard();
    for i in 0..=g.config().per_ip.failures {
        fail(&g, pw("192.0.2.100", "a@example.org"), &format!("g{i}")).await;
    }
    assert_eq!(
        verdict(&g, pw("192.0.2.100", "b@example.org")).await.0,
        Verdict::Reject
    );
    assert_eq!(g.clear(Some("ip"), Some("192.0.2.100")).await.unwrap(), 1);
    assert_eq!(
        verdict(&g, pw("192.0.2.100", "b@example.org")).await.0,
        Verdict::Allow
    );
    // The budget was cleared too: one more failure does not block again.
    fail(&g, pw("192.0.2.100", "b@example.org"), "new").await;
    assert_eq!(
        verdict(&g, pw("192.0.2.100", "b@example.org")).await.0,
        Verdict::Allow
    );
}

/// Issue 5 item 7: a flood of random addresses and accounts keeps the store within its bound
/// and the guard answering; the blocks it imposes survive the flood's churn.
#[tokio::test(start_paused = true)]
async fn a_flood_of_random_keys_stays_bounded() {
    let cap = 20_000;
    let (g, store) = guard_with(GuardConfig::default(), cap);
    // A real attacker's block, imposed first.
    for i in 0..=g.config().per_ip.failures {
        fail(&g, pw("192.0.2.110", "a@example.org"), &format!("g{i}")).await;
    }
    for i in 0u32..100_000 {
        let addr = IpAddr::from((0xC000_0000u32 | i.wrapping_mul(2_654_435_761)).to_be_bytes());
        let user = format!("random{i}@example.org");
        let key = AttemptKey {
            client_ip: addr,
            user: Some(&user),
            kind: Kind::Password,
        };
        g.check(key).await;
        record_failure(&g, key, Some("f"), None).await;
        assert!(store.len() <= cap);
    }
    assert!(store.len() <= cap, "{}", store.len());
    assert_eq!(
        verdict(&g, pw("192.0.2.110", "b@example.org")).await,
        (Verdict::Reject, Scope::Ip)
    );
    assert_eq!(
        verdict(&g, pw("198.51.100.1", "b@example.org")).await.0,
        Verdict::Allow
    );
}

#[test]
fn tarpit_curve() {
    let s = Duration::from_secs(1);
    let m = Duration::from_secs(15);
    let got: Vec<u64> = (0..8).map(|n| tarpit(s, m, n).as_secs()).collect();
    assert_eq!(got, vec![0, 1, 2, 4, 8, 15, 15, 15]);
    assert_eq!(tarpit(s, m, u32::MAX), m);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_control_never_hides_an_enforced_one() {
    // The address budget in dry run, attack mode enforced.
    let mut cfg = GuardConfig::default();
    cfg.per_ip.enforce = false;
    let (g, _) = guard_with(cfg, 100_000);
    // The attacker's address collects a dry-run block.
    for i in 0..=g.config().per_ip.failures {
        fail(&g, pw("192.0.2.120", "other@example.org"), &format!("g{i}")).await;
    }
    let d = g.check(pw("192.0.2.120", "other@example.org")).await;
    assert_eq!((d.verdict, d.would_refuse), (Verdict::Allow, true));
    drop(d);
    // The victim's account goes into attack mode, attacked from many networks.
    for i in 0..=g.config().per_account.failures {
        fail(
            &g,
            pw(&format!("10.{i}.1.1"), "victim@example.org"),
            &format!("v{i}"),
        )
        .await;
    }
    assert_eq!(
        verdict(&g, pw("192.0.2.120", "victim@example.org")).await,
        (Verdict::RequireCode, Scope::Account)
    );
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_block_gives_way_to_an_enforced_one_on_the_same_key() {
    let mut cfg = GuardConfig::default();
    cfg.spray.enforce = false;
    let (g, _) = guard_with(cfg, 100_000);
    // Spraying first (dry run), then enough failures for the enforced address budget.
    for i in 0..=g.config().per_ip.failures {
        fail(&g, pw("192.0.2.130", &format!("s{i}@example.org")), "pw").await;
    }
    assert_eq!(
        verdict(&g, pw("192.0.2.130", "x@example.org")).await,
        (Verdict::Reject, Scope::Ip)
    );
}

#[tokio::test(start_paused = true)]
async fn one_network_cannot_put_an_account_in_attack_mode() {
    let g = guard();
    // Thirty addresses of one /24, one guess each against the same account.
    for i in 1..=30 {
        fail(
            &g,
            pw(&format!("192.0.2.{i}"), "grace@example.org"),
            &format!("g{i}"),
        )
        .await;
    }
    assert!(
        !g.status()
            .await
            .unwrap()
            .iter()
            .any(|b| b.scope == "account"),
        "{:?}",
        g.status().await.unwrap()
    );
    // The owner logs in from anywhere as usual.
    assert_eq!(
        verdict(&g, pw("198.51.100.44", "grace@example.org")).await,
        (Verdict::Allow, Scope::None)
    );
}

#[tokio::test(start_paused = true)]
async fn repeating_one_wrong_secret_still_grows_the_tarpit() {
    let g = guard();
    for _ in 0..6 {
        fail(&g, pw("192.0.2.140", "henry@example.org"), "same-old").await;
    }
    // Counted once as a guess, but the sender waits the full tarpit.
    assert_eq!(
        g.check(pw("192.0.2.140", "henry@example.org")).await.delay,
        g.config().tarpit_max
    );
    assert!(g.status().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_its_networks_budget_once_per_window() {
    let g = guard();
    let budget = g.config().per_ip.failures;
    for i in 0..budget {
        fail(
            &g,
            pw("192.0.2.150", "target@example.org"),
            &format!("a{i}"),
        )
        .await;
    }
    owner_ok(&g).await; // resets the address's budget
    for i in 0..budget {
        fail(
            &g,
            pw("192.0.2.150", "target@example.org"),
            &format!("b{i}"),
        )
        .await;
    }
    owner_ok(&g).await; // same window: no second reset
    fail(&g, pw("192.0.2.150", "target@example.org"), "c").await;
    assert_eq!(
        verdict(&g, pw("192.0.2.150", "target@example.org")).await,
        (Verdict::Reject, Scope::Ip)
    );
}

async fn owner_ok(g: &Guard) {
    let user = "owner@example.org";
    g.record(pw("192.0.2.150", user), Outcome::Success { user })
        .await;
}

/// A burst from many networks at once is counted as it goes: the account's slots make the
/// checks wait for the records, so no more than a few attempts get past the budget.
#[tokio::test(start_paused = true)]
async fn a_simultaneous_burst_on_one_account_stays_near_its_budget() {
    let g = Arc::new(guard());
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let addr = format!("10.{}.{}.1", i / 200, i % 200);
            let key = pw(&addr, "ivy@example.org");
            let d = g.check(key).await;
            if d.verdict != Verdict::Allow {
                return false;
            }
            // The credential check takes a while.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let fp = g.fingerprint("ivy@example.org", format!("p{i}").as_bytes());
            record_failure(&g, key, Some(&fp), None).await;
            true
        }));
    }
    let mut checked = 0;
    for t in tasks {
        checked += u32::from(t.await.unwrap());
    }
    let budget = g.config().per_account.failures;
    assert!(
        checked <= budget + 1 + ACCOUNT_SLOTS as u32,
        "{checked} guesses were checked against a budget of {budget}"
    );
}
