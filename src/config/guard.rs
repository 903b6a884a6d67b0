//! Stage two for the `guard` section: budgets, tarpit, lists.

use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use super::ctx::Ctx;
use super::{raw, Budget, GuardConfig};

/// Bounds on the guard's durations: long enough to matter, short enough to be a mistake
/// otherwise.
const WINDOW_MAX: Duration = Duration::from_secs(7 * 86_400);
const KNOWN_GOOD_MAX: Duration = Duration::from_secs(400 * 86_400);
const TARPIT_CEILING: Duration = Duration::from_secs(60);

pub(super) fn guard(cx: &mut Ctx, v: &Value) -> GuardConfig {
    let d = GuardConfig::default();
    let g: raw::Guard = if v.is_null() {
        raw::Guard::default()
    } else {
        cx.decode(v, "guard").unwrap_or_default()
    };
    let enforce = g.enforce.unwrap_or(true);
    let subnet_v4 = g.subnet_v4.unwrap_or(d.subnet_v4);
    if !(8..=32).contains(&subnet_v4) {
        cx.err("guard.subnet_v4", "must be a prefix length from 8 to 32");
    }
    let subnet_v6 = g.subnet_v6.unwrap_or(d.subnet_v6);
    if !(32..=128).contains(&subnet_v6) {
        cx.err("guard.subnet_v6", "must be a prefix length from 32 to 128");
    }
    let allow = nets(cx, &g.allow, "guard.allow");
    let deny = nets(cx, &g.deny, "guard.deny");
    let trusted_proxies = nets(cx, &g.trusted_proxies, "guard.trusted_proxies");
    // A block list that covers a proxy would block everyone behind it.
    for (i, n) in deny.iter().enumerate() {
        if let Some(p) = trusted_proxies.iter().find(|p| overlaps(n, p)) {
            cx.err(
                format!("guard.deny[{i}]"),
                format!(
                    "{n} covers the trusted proxy {p}: every client behind it would be refused"
                ),
            );
        }
    }
    let per_ip = budget(cx, g.per_ip.as_ref(), "guard.per_ip", d.per_ip, enforce);
    let per_subnet = budget(
        cx,
        g.per_subnet.as_ref(),
        "guard.per_subnet",
        d.per_subnet,
        enforce,
    );
    let per_account = budget(
        cx,
        g.per_account.as_ref(),
        "guard.per_account",
        d.per_account,
        enforce,
    );
    let per_token_ip = budget(
        cx,
        g.per_token_ip.as_ref(),
        "guard.per_token_ip",
        d.per_token_ip,
        enforce,
    );
    let per_token_subnet = budget(
        cx,
        g.per_token_subnet.as_ref(),
        "guard.per_token_subnet",
        d.per_token_subnet,
        enforce,
    );
    let wrong_codes = budget(
        cx,
        g.wrong_codes.as_ref(),
        "guard.wrong_codes",
        d.wrong_codes,
        enforce,
    );
    let suspect_for = cx.duration(g.suspect_for.as_ref(), "guard.suspect_for", d.suspect_for);
    if suspect_for < Duration::from_secs(60) || suspect_for > KNOWN_GOOD_MAX {
        cx.err("guard.suspect_for", "must be between 1m and 400d");
    }
    let spray = match &g.spray {
        None => Budget { enforce, ..d.spray },
        Some(s) => budget(
            cx,
            Some(&raw::Budget {
                failures: s.distinct_accounts,
                per: s.per.clone(),
                enforce: s.enforce,
            }),
            "guard.spray",
            d.spray,
            enforce,
        ),
    };
    let known_good_ttl = cx.duration(
        g.known_good_ttl.as_ref(),
        "guard.known_good_ttl",
        d.known_good_ttl,
    );
    if known_good_ttl < Duration::from_secs(60) || known_good_ttl > KNOWN_GOOD_MAX {
        cx.err("guard.known_good_ttl", "must be between 1m and 400d");
    }
    let t = g.tarpit.unwrap_or_default();
    let tarpit_start = cx.duration(t.start.as_ref(), "guard.tarpit.start", d.tarpit_start);
    let tarpit_max = cx.duration(t.max.as_ref(), "guard.tarpit.max", d.tarpit_max);
    if tarpit_max > TARPIT_CEILING {
        cx.err("guard.tarpit.max", "must be at most 60s");
    }
    if tarpit_start > tarpit_max {
        cx.err(
            "guard.tarpit.start",
            "must not be more than guard.tarpit.max",
        );
    }
    let max_delayed_per_ip = cx.count(
        g.max_delayed_per_ip,
        "guard.max_delayed_per_ip",
        d.max_delayed_per_ip,
    );
    let block_for = cx.duration(g.block_for.as_ref(), "guard.block_for", d.block_for);
    if block_for < Duration::from_secs(1) || block_for > Duration::from_secs(30 * 86_400) {
        cx.err("guard.block_for", "must be between 1s and 30d");
    }
    GuardConfig {
        enforce,
        subnet_v4,
        subnet_v6,
        allow,
        deny,
        trusted_proxies,
        per_ip,
        per_subnet,
        per_account,
        per_token_ip,
        per_token_subnet,
        wrong_codes,
        suspect_for,
        spray,
        known_good_ttl,
        tarpit_start,
        tarpit_max,
        tarpit_enforce: t.enforce.unwrap_or(enforce),
        max_delayed_per_ip,
        block_for,
    }
}

fn budget(
    cx: &mut Ctx,
    r: Option<&raw::Budget>,
    path: &str,
    default: Budget,
    enforce: bool,
) -> Budget {
    let Some(r) = r else {
        return Budget { enforce, ..default };
    };
    let failures = cx.count(r.failures, &format!("{path}.failures"), default.failures);
    let per = cx.duration(r.per.as_ref(), &format!("{path}.per"), default.per);
    if per < Duration::from_secs(1) || per > WINDOW_MAX {
        cx.err(format!("{path}.per"), "must be between 1s and 7d");
    }
    Budget {
        failures,
        per,
        // A control can be dry-run on its own, but not enforced when the guard is dry-run.
        enforce: enforce && r.enforce.unwrap_or(true),
    }
}

/// `10.0.0.0/8`, `2001:db8::/32` or a bare address (one host).
pub(super) fn nets(cx: &mut Ctx, list: &[String], path: &str) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let t = text.trim();
        let parsed = t
            .parse::<IpNet>()
            .ok()
            .or_else(|| t.parse::<std::net::IpAddr>().ok().map(IpNet::from));
        match parsed {
            Some(n) => out.push(n.trunc()),
            None => cx.err(
                format!("{path}[{i}]"),
                format!("`{t}` is not an address or a network such as 192.0.2.0/24"),
            ),
        }
    }
    out
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_symmetric_and_family_aware() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(overlaps(&n("10.0.0.0/8"), &n("10.1.2.3/32")));
        assert!(overlaps(&n("10.1.2.3/32"), &n("10.0.0.0/8")));
        assert!(!overlaps(&n("10.0.0.0/8"), &n("11.0.0.0/8")));
        assert!(!overlaps(&n("::/0"), &n("10.0.0.0/8")));
    }
}
