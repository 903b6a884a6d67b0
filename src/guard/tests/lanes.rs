//! Issue 16's rules for places, lanes and new budgets: bounded waits, the owner's own lane, a
//! burst decided again after its wait, wrong codes that make an app password suspect, refused
//! tokens per subnet and in the spray sets.

use super::*;

/// A refused bearer token: checked, and recorded as a failure when it was let through.
async fn fail_token(g: &Guard, key: AttemptKey<'_>) {
    if g.check(key).await.verdict == Verdict::Allow {
        record_failure(g, key, None, None).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_wait_that_runs_out_is_refused_and_leaves_nothing_behind() {
    let g = Arc::new(guard());
    let cap = g.config().max_delayed_per_ip;
    let held: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..cap {
            v.push(
                g.check(pw("192.0.2.97", &format!("u{i}@example.org")))
                    .await,
            );
        }
        v
    };
    let started = tokio::time::Instant::now();
    let d = g.check(pw("192.0.2.97", "late@example.org")).await;
    // Refused as throttled after the bounded wait, never checked, holding nothing.
    assert_eq!((d.verdict, d.scope), (Verdict::Reject, Scope::InFlight));
    assert!(d.permit.is_none());
    assert_eq!(started.elapsed(), QUEUE_WAIT);
    drop(held);
    assert_eq!((g.in_flight.len(), g.accounts.len()), (0, 0));
}

/// The aimed lockout of issue 16: attackers from many networks hold every place of an
/// account's lane; its owner, from the network she used before, is not queued behind them.
#[tokio::test(start_paused = true)]
async fn the_owner_from_her_known_network_never_queues_behind_a_flood() {
    let g = Arc::new(guard());
    let owner = "alice@example.org";
    g.record(pw("198.51.100.7", owner), Outcome::Success { user: owner })
        .await;
    let mut attackers = Vec::new();
    for i in 0..ACCOUNT_SLOTS * 4 {
        let g = g.clone();
        attackers.push(tokio::spawn(async move {
            let d = g.check(pw(&format!("10.{i}.0.1"), owner)).await;
            // Each attacker holds its place for a long check.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(d);
        }));
    }
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let d = tokio::time::timeout(Duration::from_millis(1), g.check(pw("198.51.100.8", owner)))
        .await
        .expect("the owner waited behind the attackers");
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(d.known_good && d.permit.is_some());
    // A login from a network the account never used does wait (bounded) for the lane.
    let stranger = g.check(pw("203.0.113.9", owner)).await;
    assert_eq!(
        (stranger.verdict, stranger.scope),
        (Verdict::Reject, Scope::AccountQueue)
    );
    for a in attackers {
        a.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_that_reaches_attack_mode_while_queued_is_decided_again() {
    let g = Arc::new(guard());
    let user = "jay@example.org";
    // Four checks hold the lane; ten more queue behind them.
    let mut tasks = Vec::new();
    for i in 0..14u32 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let key = pw(&format!("10.{i}.7.1"), user);
            let d = g.check(key).await;
            let v = d.verdict;
            if v == Verdict::Allow {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let fp = g.fingerprint(user, format!("p{i}").as_bytes());
                record_failure(&g, key, Some(&fp), None).await;
            }
            v
        }));
    }
    let mut verdicts = Vec::new();
    for t in tasks {
        verdicts.push(t.await.unwrap());
    }
    let allowed = verdicts.iter().filter(|v| **v == Verdict::Allow).count();
    let budget = g.config().per_account.failures as usize;
    // At most the lane's width beyond the budget: those were already being checked.
    assert!(
        allowed <= budget + ACCOUNT_SLOTS,
        "{allowed} plain checks past a budget of {budget}"
    );
    assert!(verdicts.contains(&Verdict::RequireCode), "{verdicts:?}");
}

#[tokio::test(start_paused = true)]
async fn wrong_codes_past_their_budget_make_the_app_password_suspect() {
    let g = guard();
    let user = "kim@example.org";
    let budget = g.config().wrong_codes.failures;
    // A thief with kim's app password tries codes from several networks.
    for i in 0..=budget {
        let key = pw(&format!("10.{i}.9.1"), user);
        let d = g.check(key).await;
        assert_eq!(d.verdict, Verdict::Allow);
        let fp = g.fingerprint(user, format!("apppassword{i:06}").as_bytes());
        record_failure(&g, key, Some(&fp), Some("ap_stolen")).await;
    }
    assert_eq!(g.metrics.app_password_suspect.get(), 1);
    let marked = g
        .store
        .get(&crate::state::suspect_key(user, "ap_stolen"))
        .await
        .unwrap();
    assert!(marked.is_some(), "the authenticator would not see the mark");
    let status = g.status().await.unwrap();
    let entry = status
        .iter()
        .find(|b| b.scope == "app_password")
        .expect("listed for operators");
    assert_eq!(entry.value, "kim@example.org/ap_stolen");
    assert!(entry.expires_in_secs > 86_400, "lasts until someone acts");
    // It does not count as a blocked source, and an operator can clear it.
    g.sweep().await;
    assert_eq!(g.metrics.guard_blocked_sources.get(), 0);
    assert_eq!(g.clear(Some("app_password"), None).await.unwrap(), 1);
    assert!(g
        .store
        .get(&crate::state::suspect_key(user, "ap_stolen"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn refused_tokens_count_per_subnet_and_feed_spray_detection() {
    let g = guard();
    let token = |addr: &str, user: &'static str| AttemptKey {
        client_ip: ip(addr),
        user: Some(user),
        kind: Kind::Token,
    };
    // One token each from many addresses of one /24: no address is over its budget, the
    // subnet is.
    let budget = g.config().per_token_subnet.failures;
    for i in 0..=budget {
        let key = token(&format!("198.18.5.{}", i % 250 + 1), "t@example.org");
        fail_token(&g, key).await;
    }
    assert_eq!(
        verdict(&g, token("198.18.5.251", "t@example.org")).await,
        (Verdict::Reject, Scope::TokenSubnet)
    );
    // Tokens for many accounts from one address: spraying.
    let users = [
        "a@x.org", "b@x.org", "c@x.org", "d@x.org", "e@x.org", "f@x.org", "g@x.org",
    ];
    for u in users {
        let key = token("198.19.0.1", u);
        fail_token(&g, key).await;
    }
    assert_eq!(
        verdict(&g, token("198.19.0.1", "h@x.org")).await,
        (Verdict::Reject, Scope::TokenIp)
    );
    let status = g.status().await.unwrap();
    assert!(status
        .iter()
        .any(|b| b.scope == "token_ip" && b.value == "198.19.0.1" && b.reason == "spray"));
}
