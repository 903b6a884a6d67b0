//! The guard: asked before every credential check, told the outcome after (DESIGN.md,
//! "Abuse defence"; docs/guard.md for the policy in prose).
//!
//! It sees only cheap keys — the resolved client address, its subnet, the claimed account
//! name, a keyed fingerprint of the wrong secret — and never a secret. Security invariant 4:
//! the session calls [`Guard::check`] before the authenticator and does not call the
//! authenticator on `Reject`, so a throttled attempt never reaches argon2, a JWKS
//! fetch or an introspection call.
//!
//! What it keeps, all in the shared [`Store`] with a TTL (keys in [`keys`]):
//! - failure budgets (GCRA) per address, per subnet, per account, and per address for tokens;
//! - the distinct accounts that failed from an address and from a subnet (spraying);
//! - blocks (address, subnet, token address) and accounts in attack mode;
//! - the networks each account recently logged in from (known-good), which exempt that account
//!   from blocks and from its own attack mode: a lockout cannot be aimed at a user;
//! - failure counts per address and per (account, subnet) for the tarpit;
//! - fingerprints of recent wrong secrets per account, so a client repeating a stale password
//!   counts once.
//!
//! The in-flight cap (`max_delayed_per_ip`) is per process: it bounds this replica's sessions.

mod keys;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

use crate::config::{Budget, GuardConfig};
use crate::observe::{self, GuardAuditEvent, Metrics};
use crate::state::{RateDecision, Store};

/// What is being tried: password mechanisms or bearer tokens. Attack mode and source blocks
/// stop password guesses; tokens cannot be guessed, so they have their own budget (which
/// protects the identity provider's introspection endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Password,
    Token,
}

/// What the guard knows of an attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptKey<'a> {
    pub client_ip: IpAddr,
    /// The normalised user name, if it was valid.
    pub user: Option<&'a str>,
    pub kind: Kind,
}

/// The guard's answer before a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the credential.
    Allow,
    /// Do not check; answer as a failure (after the tarpit delay).
    Reject,
}

/// Which key decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    None,
    AllowList,
    /// Blocked or in attack mode, but this account logged in from this network recently.
    KnownGood,
    Ip,
    Subnet,
    Account,
    TokenIp,
    InFlight,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::None => "none",
            Scope::AllowList => "allow_list",
            Scope::KnownGood => "known_good",
            Scope::Ip => "ip",
            Scope::Subnet => "subnet",
            Scope::Account => "account",
            Scope::TokenIp => "token_ip",
            Scope::InFlight => "in_flight",
        }
    }
}

/// The decision before a check.
#[derive(Debug)]
pub struct Decision {
    pub verdict: Verdict,
    /// A failure is answered no sooner than this after the attempt began (the tarpit).
    pub delay: Duration,
    pub scope: Scope,
    /// A dry-run control would have refused this attempt (it is allowed).
    pub would_refuse: bool,
    /// Holds this attempt's place in the per-address in-flight count (and its account's
    /// slot) until dropped.
    pub permit: Option<Held>,
}

impl Decision {
    /// The metric/audit label of the action taken.
    pub fn action(&self) -> &'static str {
        match (self.verdict, self.would_refuse) {
            (Verdict::Reject, _) => "reject",
            (Verdict::Allow, true) => "would_reject",
            (Verdict::Allow, false) if !self.delay.is_zero() => "delay",
            (Verdict::Allow, false) => "allow",
        }
    }

    fn allow(scope: Scope) -> Self {
        Decision {
            verdict: Verdict::Allow,
            delay: Duration::ZERO,
            scope,
            would_refuse: false,
            permit: None,
        }
    }
}

/// How a checked attempt ended, as the guard is told.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Authenticated as `user` (the authoritative name, not the claimed one).
    Success { user: &'a str },
    /// The credential was checked and refused. `fingerprint` is [`Guard::fingerprint`] of
    /// the secret, when there was one.
    Failure { fingerprint: Option<&'a str> },
    /// Refused by the guard without a check.
    Refused,
}

/// One active block or attack mode, for `guard status` and the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockInfo {
    /// `ip`, `subnet`, `token_ip` or `account` (attack mode).
    pub scope: String,
    pub value: String,
    pub reason: String,
    pub expires_in_secs: u64,
    /// false: recorded by a dry-run control, not applied.
    pub enforced: bool,
}

pub struct Guard {
    /// Replaced as a whole on reload; each decision reads one snapshot.
    cfg: std::sync::RwLock<Arc<GuardConfig>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Keys the fingerprints of wrong secrets (never stored, never logged).
    fingerprint_key: [u8; 32],
    /// Attempts per address (per `subnet_v6` subnet for IPv6) run `max_delayed_per_ip` at a time; the others
    /// wait their turn (within the session's pre-auth deadline). A burst of good logins from
    /// one NAT or webmail host only waits milliseconds; an attacker cannot have more guesses
    /// in flight, nor more connections parked in the tarpit, than that.
    in_flight: Slots<IpNet>,
    /// Password attempts per account run [`ACCOUNT_SLOTS`] at a time, so that a burst from
    /// many addresses is counted as it goes instead of all passing the check before the first
    /// failure is recorded.
    accounts: Slots<String>,
    /// Blocks seen by the last sweep, to report the ones that ended.
    seen: Mutex<HashSet<(String, String)>>,
    /// Refuse (rather than allow) when the state store cannot be read (`on_error: fail_closed`).
    fail_closed: bool,
}

/// Concurrent password attempts per account (the others wait their turn, within the
/// session's pre-auth deadline).
const ACCOUNT_SLOTS: usize = 4;

/// Most entries listed at once (admin endpoint, gauges).
const LIST_LIMIT: usize = 10_000;

impl Guard {
    /// `seed`: a secret every replica shares (with Redis), so that fingerprints agree across
    /// replicas; without one, a random key (one process).
    pub fn new(
        cfg: GuardConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        seed: Option<&[u8]>,
    ) -> Self {
        let fingerprint_key = match seed.and_then(|s| Hmac::<Sha256>::new_from_slice(s).ok()) {
            Some(mut mac) => {
                mac.update(b"imapgate guard fingerprint key v1");
                mac.finalize().into_bytes().into()
            }
            None => rand::random(),
        };
        Self {
            cfg: std::sync::RwLock::new(Arc::new(cfg)),
            store,
            metrics,
            fingerprint_key,
            in_flight: Slots::default(),
            accounts: Slots::default(),
            seen: Mutex::new(HashSet::new()),
            fail_closed: false,
        }
    }

    /// With `state.redis.on_error: fail_closed`: an unreadable store refuses the attempt.
    pub fn fail_closed(mut self, yes: bool) -> Self {
        self.fail_closed = yes;
        self
    }

    pub fn config(&self) -> Arc<GuardConfig> {
        match self.cfg.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A new policy and lists (reload). State already recorded stays.
    pub fn reconfigure(&self, cfg: GuardConfig) {
        let cfg = Arc::new(cfg);
        match self.cfg.write() {
            Ok(mut c) => *c = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
    }

    /// The client's subnet (`subnet_v4`/`subnet_v6`).
    pub fn subnet(&self, ip: IpAddr) -> IpNet {
        let prefix = match ip {
            IpAddr::V4(_) => self.config().subnet_v4,
            IpAddr::V6(_) => self.config().subnet_v6,
        };
        IpNet::new(ip, prefix).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
    }

    /// True if connections from `ip` are refused before TLS (and the deny list is enforced).
    /// In dry run the refusal is counted and logged but not applied.
    pub fn denied(&self, ip: IpAddr) -> bool {
        if !self.config().deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if self.config().enforce {
            self.count_decision("reject", "deny_list");
            true
        } else {
            self.count_decision("would_reject", "deny_list");
            tracing::info!(client = %ip, "dry run: the deny list would refuse this connection");
            false
        }
    }

    /// True if a PROXY protocol header from `peer` is believed.
    pub fn trusted_proxy(&self, peer: IpAddr) -> bool {
        self.config()
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer))
    }

    /// A keyed fingerprint of a wrong secret, so that a repeated one counts once. Bound to the
    /// account so equal secrets of two accounts do not collide.
    pub fn fingerprint(&self, user: &str, secret: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.fingerprint_key) else {
            return String::new();
        };
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(secret);
        hex16(&mac.finalize().into_bytes())
    }

    fn count_decision(&self, action: &str, scope: &str) {
        self.metrics
            .guard_decisions
            .with_label_values(&[action, scope])
            .inc();
    }

    fn store_error(&self, op: &str, e: &crate::state::StoreError) {
        self.metrics
            .state_store_errors
            .with_label_values(&[op])
            .inc();
        tracing::warn!(error = %e, op, "guard: state store failed; deciding without it");
    }

    /// Before the check. Reads at most one batch of keys (one round trip).
    pub async fn check(&self, key: AttemptKey<'_>) -> Decision {
        let d = self.decide(key).await;
        self.count_decision(d.action(), d.scope.as_str());
        if d.would_refuse {
            tracing::info!(
                client = %key.client_ip,
                scope = d.scope.as_str(),
                "dry run: the guard would refuse this attempt"
            );
        }
        d
    }

    async fn decide(&self, key: AttemptKey<'_>) -> Decision {
        let c = self.config();
        let ip = key.client_ip;
        if c.allow.iter().any(|n| n.contains(&ip)) {
            return Decision::allow(Scope::AllowList);
        }
        let cap = usize::try_from(c.max_delayed_per_ip).unwrap_or(usize::MAX);
        let in_flight_key = self.in_flight_key(ip);
        let in_flight = match self.in_flight.try_acquire(&in_flight_key, cap) {
            Some(slot) => Some(slot),
            None if c.enforce => {
                // Every place is taken: wait for one (counted, so a saturating source shows).
                self.count_decision("queue", Scope::InFlight.as_str());
                self.in_flight.acquire(&in_flight_key, cap).await
            }
            None => {
                // Dry run: counted, then decided like any other attempt (controls enforced on
                // their own still apply), without a place.
                self.count_decision("would_queue", Scope::InFlight.as_str());
                None
            }
        };
        let account = match (key.kind, key.user) {
            (Kind::Password, Some(u)) => self.accounts.acquire(&u.to_owned(), ACCOUNT_SLOTS).await,
            _ => None,
        };
        let permit = Some(Held {
            _in_flight: in_flight,
            _account: account,
        });
        let net = self.subnet(ip);
        let user = key.user;
        // One batch: [tarpit ip, tarpit account+net, then per kind…]
        let mut wanted = vec![
            keys::tarpit_ip(ip),
            user.map(|u| keys::tarpit_account_net(u, &net))
                .unwrap_or_default(),
        ];
        match key.kind {
            Kind::Password => {
                wanted.push(keys::block(Scope::Ip, &ip.to_string()));
                wanted.push(keys::block(Scope::Subnet, &net.to_string()));
                wanted.push(
                    user.map(|u| keys::block(Scope::Account, u))
                        .unwrap_or_default(),
                );
                wanted.push(user.map(|u| keys::known_good(u, &net)).unwrap_or_default());
            }
            Kind::Token => wanted.push(keys::block(Scope::TokenIp, &ip.to_string())),
        }
        let values = match self.store.get_many(&wanted).await {
            Ok(v) => v,
            Err(e) => {
                self.store_error("get_many", &e);
                let verdict = if self.fail_closed {
                    Verdict::Reject
                } else {
                    Verdict::Allow
                };
                return Decision {
                    verdict,
                    permit,
                    ..Decision::allow(Scope::None)
                };
            }
        };
        let at = |i: usize| values.get(i).and_then(|v| v.as_deref());
        let count = |i: usize| at(i).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        let failures = count(0).max(count(1));
        let delay = if c.tarpit_enforce {
            tarpit(c.tarpit_start, c.tarpit_max, failures)
        } else {
            Duration::ZERO
        };
        // The refusing keys: an enforced one refuses; dry-run ones only report.
        let hits: Vec<(Scope, bool)> = match key.kind {
            Kind::Password => [
                (Scope::Ip, at(2)),
                (Scope::Subnet, at(3)),
                (Scope::Account, at(4)),
            ]
            .iter()
            .filter_map(|(s, v)| v.map(|v| (*s, self.enforced(*s, v))))
            .collect(),
            Kind::Token => at(2)
                .map(|v| (Scope::TokenIp, self.enforced(Scope::TokenIp, v)))
                .into_iter()
                .collect(),
        };
        if !hits.is_empty() && key.kind == Kind::Password && at(5).is_some() {
            // Known-good: this account succeeded from this network recently.
            return Decision {
                delay,
                permit,
                ..Decision::allow(Scope::KnownGood)
            };
        }
        let refusal = hits
            .iter()
            .find(|(_, enforced)| *enforced)
            .or_else(|| hits.first())
            .copied();
        match refusal {
            Some((scope, true)) => Decision {
                verdict: Verdict::Reject,
                delay,
                scope,
                would_refuse: false,
                permit,
            },
            Some((scope, false)) => Decision {
                verdict: Verdict::Allow,
                delay,
                scope,
                would_refuse: true,
                permit,
            },
            None => Decision {
                verdict: Verdict::Allow,
                delay,
                scope: if delay.is_zero() {
                    Scope::None
                } else if count(1) > count(0) {
                    Scope::Account
                } else {
                    Scope::Ip
                },
                would_refuse: false,
                permit,
            },
        }
    }

    /// Is a block of this scope, recorded with this value (`reason`), enforced?
    fn enforced(&self, scope: Scope, value: &str) -> bool {
        let b = match (scope, reason_of(value)) {
            (_, "manual") => return self.config().enforce,
            (Scope::Account, _) => self.config().per_account,
            (Scope::TokenIp, _) => self.config().per_token_ip,
            (_, "spray") => self.config().spray,
            (Scope::Subnet, _) => self.config().per_subnet,
            _ => self.config().per_ip,
        };
        b.enforce
    }

    /// The in-flight key: the address for IPv4, the subnet for IPv6 (where one customer has a
    /// whole /64 to rotate through).
    fn in_flight_key(&self, ip: IpAddr) -> IpNet {
        match ip {
            IpAddr::V4(_) => IpNet::from(ip),
            IpAddr::V6(_) => self.subnet(ip),
        }
    }

    /// After the check (or the refusal).
    pub async fn record(&self, key: AttemptKey<'_>, outcome: Outcome<'_>) {
        let ip = key.client_ip;
        if self.config().allow.iter().any(|n| n.contains(&ip)) {
            return;
        }
        let net = self.subnet(ip);
        let r = match outcome {
            Outcome::Success { user } => self.success(key, &net, user).await,
            Outcome::Refused => self
                .store
                .incr(&keys::tarpit_ip(ip), 1, self.config().per_ip.per)
                .await
                .map(drop),
            Outcome::Failure { fingerprint } => self.failure(key, &net, fingerprint).await,
        };
        if let Err(e) = r {
            self.store_error("record", &e);
        }
    }

    async fn success(
        &self,
        key: AttemptKey<'_>,
        net: &IpNet,
        user: &str,
    ) -> Result<(), crate::state::StoreError> {
        let ip = key.client_ip;
        let c = self.config();
        self.store
            .put(&keys::known_good(user, net), "1", c.known_good_ttl)
            .await?;
        let mut reset = vec![keys::tarpit_account_net(user, net)];
        // A password success from a network resets that network's failure budget — once per
        // window, so that an attacker who owns one account cannot launder an unlimited number
        // of guesses with it. Never the spray sets, the account budgets or existing blocks. A
        // token proves nothing about the passwords tried from there, so it resets nothing.
        if key.kind == Kind::Password
            && self
                .store
                .set_if_absent(&keys::reset(net), "1", c.per_ip.per)
                .await?
        {
            reset.extend([
                keys::failures(Scope::Ip, &ip.to_string()),
                keys::failures(Scope::Subnet, &net.to_string()),
                keys::tarpit_ip(ip),
            ]);
        }
        self.store.delete_many(&reset).await
    }

    async fn failure(
        &self,
        key: AttemptKey<'_>,
        net: &IpNet,
        fingerprint: Option<&str>,
    ) -> Result<(), crate::state::StoreError> {
        let ip = key.client_ip;
        let s = &self.store;
        let c = self.config();
        // A secret this account already failed with recently is not a new guess.
        // (A counter, not a marker: under memory pressure these are evicted first.)
        // It still slows its sender down: repeats grow the address's tarpit, which bounds how
        // often a loop of them can make argon2 run.
        if let (Some(user), Some(fp)) = (key.user, fingerprint) {
            if s.incr(&keys::seen(user, fp), 1, c.per_account.per).await? > 1 {
                tracing::debug!("guard: repeated wrong secret, not counted again");
                s.incr(&keys::tarpit_ip(ip), 1, c.per_ip.per).await?;
                return Ok(());
            }
        }
        let ip_text = ip.to_string();
        let net_text = net.to_string();
        let member = key
            .user
            .map_or_else(|| "-".to_owned(), |u| self.fingerprint(u, b""));
        // Independent updates, sent together (with Redis: pipelined on one connection, about
        // one round trip).
        let tarpit_ip = keys::tarpit_ip(ip);
        let tarpit_net = key.user.map(|u| keys::tarpit_account_net(u, net));
        let (_, from_this_net) = tokio::try_join!(s.incr(&tarpit_ip, 1, c.per_ip.per), async {
            match &tarpit_net {
                Some(k) => s.incr(k, 1, c.per_ip.per).await,
                None => Ok(0),
            }
        })?;
        if key.kind == Kind::Token {
            if let RateDecision::Limited(_) = s
                .rate_check(
                    &keys::failures(Scope::TokenIp, &ip_text),
                    rate(c.per_token_ip),
                )
                .await?
            {
                self.impose(
                    Scope::TokenIp,
                    &ip_text,
                    "failures",
                    c.per_token_ip.failures as u64,
                    c.per_token_ip.enforce,
                )
                .await?;
            }
            return Ok(());
        }
        let (fail_ip, fail_net, spray_ip, spray_net) = (
            keys::failures(Scope::Ip, &ip_text),
            keys::failures(Scope::Subnet, &net_text),
            keys::spray(Scope::Ip, &ip_text),
            keys::spray(Scope::Subnet, &net_text),
        );
        // Spraying: distinct accounts failed from this address and from this subnet.
        let (ip_rate, net_rate, ip_accounts, net_accounts) = tokio::try_join!(
            s.rate_check(&fail_ip, rate(c.per_ip)),
            s.rate_check(&fail_net, rate(c.per_subnet)),
            s.set_add_count(&spray_ip, &member, c.spray.per),
            s.set_add_count(&spray_net, &member, c.spray.per),
        )?;
        for (scope, value, budget, decision) in [
            (Scope::Ip, &ip_text, c.per_ip, ip_rate),
            (Scope::Subnet, &net_text, c.per_subnet, net_rate),
        ] {
            if let RateDecision::Limited(_) = decision {
                self.impose(
                    scope,
                    value,
                    "failures",
                    budget.failures as u64,
                    budget.enforce,
                )
                .await?;
            }
        }
        for (scope, value, n) in [
            (Scope::Ip, &ip_text, ip_accounts),
            (Scope::Subnet, &net_text, net_accounts),
        ] {
            if n > u64::from(c.spray.failures) {
                self.impose(scope, value, "spray", n, c.spray.enforce)
                    .await?;
            }
        }
        // A distributed attack on one account: attack mode, not lockout. Each subnet counts
        // for at most a quarter of the account's budget, so attack mode needs failures from
        // several networks: one source is the per-address budget's business, and must not be
        // able to put someone else's account in attack mode on its own.
        let share = u64::from((c.per_account.failures / 4).max(1));
        if let Some(user) = key.user.filter(|_| from_this_net <= share) {
            if let RateDecision::Limited(_) = s
                .rate_check(&keys::failures(Scope::Account, user), rate(c.per_account))
                .await?
            {
                self.impose(
                    Scope::Account,
                    user,
                    "failures",
                    c.per_account.failures as u64,
                    c.per_account.enforce,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Records a block (or attack mode) for `block_for`; reports it the first time.
    async fn impose(
        &self,
        scope: Scope,
        value: &str,
        reason: &str,
        count: u64,
        enforced: bool,
    ) -> Result<(), crate::state::StoreError> {
        let k = keys::block(scope, value);
        let mut fresh = self
            .store
            .set_if_absent(&k, reason, self.config().block_for)
            .await?;
        if !fresh && enforced {
            // A block recorded by a dry-run control must not hide an enforced one.
            let existing = self.store.get(&k).await?;
            if existing.is_some_and(|v| !self.enforced(scope, &v)) {
                self.store.put(&k, reason, self.config().block_for).await?;
                fresh = true;
            }
        }
        if !fresh {
            return Ok(());
        }
        self.metrics
            .guard_blocks
            .with_label_values(&[scope.as_str(), reason])
            .inc();
        let event = if scope == Scope::Account {
            "attack_mode"
        } else {
            "block"
        };
        observe::audit_guard(&GuardAuditEvent {
            event,
            scope: scope.as_str(),
            value,
            reason,
            count,
            enforced,
        });
        tracing::warn!(
            scope = scope.as_str(),
            key = value,
            reason,
            count,
            enforced,
            "guard: {}",
            if scope == Scope::Account {
                "account in attack mode"
            } else {
                "source blocked"
            }
        );
        Ok(())
    }

    /// Active blocks and attack modes.
    pub async fn status(&self) -> Result<Vec<BlockInfo>, crate::state::StoreError> {
        let entries = self
            .store
            .scan_prefix(keys::BLOCK_PREFIX, LIST_LIMIT)
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v, ttl)| {
                let (scope, value) = keys::parse_block(&k)?;
                Some(BlockInfo {
                    scope: scope.as_str().to_owned(),
                    value: value.to_owned(),
                    reason: reason_of(&v).to_owned(),
                    expires_in_secs: ttl.as_secs(),
                    enforced: self.enforced(scope, &v),
                })
            })
            .collect())
    }

    /// Clears the blocks matching `scope` (None: every scope) and `value` (None: all), with
    /// the budgets that led to them, so the next failure does not block again at once.
    /// Returns how many were cleared.
    pub async fn clear(
        &self,
        scope: Option<&str>,
        value: Option<&str>,
    ) -> Result<usize, crate::state::StoreError> {
        // The same spelling the guard stores: canonical addresses and networks, lower-case
        // account names.
        let value = value.map(|v| {
            let v = v.trim();
            if let Ok(ip) = v.parse::<IpAddr>() {
                ip.to_string()
            } else if let Ok(net) = v.parse::<IpNet>() {
                net.trunc().to_string()
            } else {
                v.to_lowercase()
            }
        });
        let value = value.as_deref();
        let mut n = 0;
        let mut cleared = Vec::new();
        for b in self.status().await? {
            if scope.is_some_and(|s| s != b.scope) || value.is_some_and(|v| v != b.value) {
                continue;
            }
            let Some(sc) = keys::scope_named(&b.scope) else {
                continue;
            };
            let mut doomed = vec![keys::block(sc, &b.value), keys::failures(sc, &b.value)];
            match sc {
                Scope::Ip | Scope::Subnet => doomed.push(keys::spray(sc, &b.value)),
                _ => {}
            }
            if let Ok(ip) = b.value.parse::<IpAddr>() {
                doomed.push(keys::tarpit_ip(ip));
            }
            self.store.delete_many(&doomed).await?;
            observe::audit_guard(&GuardAuditEvent {
                event: "cleared",
                scope: &b.scope,
                value: &b.value,
                reason: &b.reason,
                count: 0,
                enforced: b.enforced,
            });
            cleared.push((b.scope, b.value));
            n += 1;
        }
        // Reported as cleared above, not as ended by the next sweep.
        if let Ok(mut seen) = self.seen.lock() {
            for c in &cleared {
                seen.remove(c);
            }
        }
        self.sweep().await;
        Ok(n)
    }

    /// Refreshes the gauges and reports the blocks and attack modes that ended.
    pub async fn sweep(&self) {
        let now = match self.status().await {
            Ok(s) => s,
            Err(e) => {
                self.store_error("scan", &e);
                return;
            }
        };
        let accounts = now.iter().filter(|b| b.scope == "account").count();
        self.metrics
            .guard_attack_mode_accounts
            .set(i64::try_from(accounts).unwrap_or(i64::MAX));
        self.metrics
            .guard_blocked_sources
            .set(i64::try_from(now.len() - accounts).unwrap_or(i64::MAX));
        let current: HashSet<(String, String)> = now
            .iter()
            .map(|b| (b.scope.clone(), b.value.clone()))
            .collect();
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        for (scope, value) in seen.difference(&current) {
            let event = if scope == "account" {
                "attack_mode_ended"
            } else {
                "block_ended"
            };
            observe::audit_guard(&GuardAuditEvent {
                event,
                scope,
                value,
                reason: "expired",
                count: 0,
                enforced: true,
            });
        }
        *seen = current;
    }

    /// Sweeps every `every` until `stop`.
    pub async fn sweep_loop(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => self.sweep().await,
            }
        }
    }
}

/// What a decision holds until the attempt is answered.
#[derive(Debug)]
pub struct Held {
    _in_flight: Option<Slot<IpNet>>,
    _account: Option<Slot<String>>,
}

/// Counting semaphores by key, created on first use and removed with their last holder or
/// waiter (so the map only holds keys with attempts in flight). Users are counted explicitly
/// under the lock (an `Arc` count read under the lock can be stale: its clones are dropped
/// outside it). A key whose size changed (a reload) gets a fresh semaphore; attempts already
/// holding the old one finish on it.
#[derive(Debug)]
struct Slots<K: Hash + Eq + Clone> {
    map: Arc<Mutex<HashMap<K, SlotsEntry>>>,
}

#[derive(Debug)]
struct SlotsEntry {
    sem: Arc<tokio::sync::Semaphore>,
    size: usize,
    /// Live `Entry` values for this semaphore (holders and waiters).
    users: usize,
}

impl<K: Hash + Eq + Clone> Default for Slots<K> {
    fn default() -> Self {
        Slots {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Hash + Eq + Clone> Slots<K> {
    fn entry(&self, key: &K, permits: usize) -> Entry<K> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(key.clone()).or_insert_with(|| SlotsEntry {
            sem: Arc::new(tokio::sync::Semaphore::new(permits)),
            size: permits,
            users: 0,
        });
        if e.size != permits {
            *e = SlotsEntry {
                sem: Arc::new(tokio::sync::Semaphore::new(permits)),
                size: permits,
                users: 0,
            };
        }
        e.users += 1;
        Entry {
            sem: e.sem.clone(),
            map: self.map.clone(),
            key: key.clone(),
        }
    }

    /// A place now, or `None` when all `permits` are taken.
    fn try_acquire(&self, key: &K, permits: usize) -> Option<Slot<K>> {
        let entry = self.entry(key, permits);
        let permit = entry.sem.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _permit: permit,
            _entry: entry,
        })
    }

    /// Waits for a place (cancel by dropping the future).
    async fn acquire(&self, key: &K, permits: usize) -> Option<Slot<K>> {
        let entry = self.entry(key, permits);
        let permit = entry.sem.clone().acquire_owned().await.ok()?;
        Some(Slot {
            _permit: permit,
            _entry: entry,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One user of a key's semaphore (a holder or a waiter); the last one removes the key.
#[derive(Debug)]
struct Entry<K: Hash + Eq + Clone> {
    sem: Arc<tokio::sync::Semaphore>,
    map: Arc<Mutex<HashMap<K, SlotsEntry>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Entry<K> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let last = match map.get_mut(&self.key) {
            // Only the current semaphore's record counts (a reload may have replaced it).
            Some(e) if Arc::ptr_eq(&e.sem, &self.sem) => {
                e.users = e.users.saturating_sub(1);
                e.users == 0
            }
            _ => false,
        };
        if last {
            map.remove(&self.key);
        }
    }
}

/// One place; the permit is released before the entry is dropped (field order).
#[derive(Debug)]
struct Slot<K: Hash + Eq + Clone> {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _entry: Entry<K>,
}

fn rate(b: Budget) -> crate::state::Rate {
    crate::state::Rate {
        burst: b.failures,
        period: b.per,
    }
}

/// `start` doubled for each failure after the first, capped at `max`; zero before any.
pub fn tarpit(start: Duration, max: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    start.saturating_mul(1 << doublings).min(max)
}

/// The reason part of a block's stored value.
fn reason_of(value: &str) -> &str {
    match value {
        "spray" | "manual" | "failures" => value,
        _ => "failures",
    }
}

fn hex16(bytes: &[u8]) -> String {
    bytes.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
