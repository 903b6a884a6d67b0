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
//!   counts once;
//! - wrong TOTP codes after a correct app password, per account, and the app passwords that
//!   crossed that budget (suspect: they log in only where they are already unlocked).
//!
//! Order of a decision (no lockout an attacker can aim): the allow list; then one read of the
//! store decides blocks, attack mode and the known-good exemption; only an attempt that will be
//! checked then takes a place — per source address (`max_delayed_per_ip`) and in its account's
//! lane — and every wait for one is bounded ([`QUEUE_WAIT`]; a wait that runs out is refused
//! like a throttled attempt, never a stall). A login from a network where the account succeeded
//! recently has a lane of its own, so attempts from other networks never queue in front of it;
//! tokens take no account lane. The caller gives the places back (drops [`Decision::permit`])
//! as soon as the check is recorded, before any floor or tarpit sleep.
//!
//! The places are per process: they bound this replica's concurrent checks.

mod blocks;
mod keys;
mod record;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

use crate::config::{Budget, GuardConfig};
use crate::observe::Metrics;
use crate::state::Store;
pub use slots::Held;
use slots::Slots;

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
    /// The account is in attack mode and this network is not known-good for it: check the
    /// credential only as an app password with a fresh, never-used TOTP code (unlock windows
    /// and code-less logins do not count; accounts without TOTP are refused).
    RequireCode,
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
    TokenSubnet,
    /// An app password that was given wrong codes past the `wrong_codes` budget.
    AppPassword,
    /// The source's in-flight places stayed taken for [`QUEUE_WAIT`].
    InFlight,
    /// The account's lane stayed taken for [`QUEUE_WAIT`].
    AccountQueue,
    /// A network the account's owner denied a sign-in from (portal approvals): its password
    /// logins for that account are refused for `guard.block_for`. Checked by the
    /// authenticator, like [`Scope::AppPassword`].
    AccountNetwork,
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
            Scope::TokenSubnet => "token_subnet",
            Scope::AppPassword => "app_password",
            Scope::AccountNetwork => "account_network",
            Scope::InFlight => "in_flight",
            Scope::AccountQueue => "account_queue",
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
    /// The account logged in from this network recently: its own lane, exempt from blocks
    /// and attack mode.
    pub known_good: bool,
    /// Holds this attempt's place in the per-address in-flight count (and its account's
    /// lane) until dropped: drop it as soon as the check is recorded.
    pub permit: Option<Held>,
}

impl Decision {
    /// The metric/audit label of the action taken.
    pub fn action(&self) -> &'static str {
        match (self.verdict, self.would_refuse) {
            (Verdict::Reject, _) => "reject",
            (Verdict::RequireCode, _) => "require_code",
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
            known_good: false,
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
    /// the secret, when there was one; `wrong_code` the id of an app password that was
    /// correct while its TOTP code was wrong (it has probably leaked).
    Failure {
        fingerprint: Option<&'a str>,
        wrong_code: Option<&'a str>,
    },
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
    /// Checks per address (per `subnet_v6` subnet for IPv6) run `max_delayed_per_ip` at a
    /// time; the others wait their turn for at most [`QUEUE_WAIT`]. A burst of good logins
    /// from one NAT or webmail host only waits milliseconds; an attacker cannot have more
    /// guesses being checked at once than that.
    in_flight: Slots<IpNet>,
    /// Password checks per account lane run [`ACCOUNT_SLOTS`] at a time, so that a burst from
    /// many addresses is counted as it goes instead of all passing the check before the first
    /// failure is recorded. The lane is the account, or (account, network) for a network the
    /// account is known-good from: its owner never queues behind other networks.
    accounts: Slots<String>,
    /// Failures per source wait out their tarpit `max_delayed_per_ip` at a time (a place
    /// here is taken after the check places were given back): one source cannot run its
    /// guesses in parallel to share one delay, and only its own failure answers ever wait
    /// for it — never a success, never another source.
    parking: Slots<IpNet>,
    /// Blocks seen by the last sweep, to report the ones that ended.
    seen: Mutex<HashSet<(String, String)>>,
    /// Refuse (rather than allow) when the state store cannot be read (`on_error: fail_closed`).
    fail_closed: bool,
}

/// Concurrent password checks per account lane (the others wait their turn).
const ACCOUNT_SLOTS: usize = 4;

/// The longest an attempt waits for a place before it is refused as throttled. Well inside
/// the pre-auth deadline (`limits.preauth_total_timeout`, at least 10 s), so a queue can
/// never end a session with BYE.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

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
            parking: Slots::default(),
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
        let c = self.config();
        crate::net::subnet(ip, c.subnet_v4, c.subnet_v6)
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

    /// Before the check. Reads at most one batch of keys (one round trip); then, for an
    /// attempt that will be checked, takes its places (waiting at most [`QUEUE_WAIT`]).
    pub async fn check(&self, key: AttemptKey<'_>) -> Decision {
        let mut d = self.decide(key).await;
        if d.verdict != Verdict::Reject && d.scope != Scope::AllowList {
            match self.take_places(key, &mut d).await {
                Err(scope) => {
                    d.verdict = Verdict::Reject;
                    d.scope = scope;
                    d.would_refuse = false;
                }
                Ok(true) => {
                    // It waited: the attempts ahead of it were recorded meanwhile (a burst on
                    // one account is counted as it goes), so decide again with the places held.
                    let permit = d.permit.take();
                    d = self.decide(key).await;
                    if d.verdict != Verdict::Reject {
                        d.permit = permit;
                    }
                }
                Ok(false) => {}
            }
        }
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

    /// The places of an attempt that will be checked: one of its source's in-flight places,
    /// then (passwords) one in its account's lane. Each wait is bounded; `Err` names the
    /// queue that stayed full, `Ok(true)` says the attempt had to wait.
    async fn take_places(&self, key: AttemptKey<'_>, d: &mut Decision) -> Result<bool, Scope> {
        let mut waited = false;
        let c = self.config();
        let cap = usize::try_from(c.max_delayed_per_ip).unwrap_or(usize::MAX);
        let source = self.in_flight_key(key.client_ip);
        let in_flight = match self.in_flight.try_acquire(&source, cap) {
            Some(slot) => Some(slot),
            None if c.enforce => {
                // Every place is taken: wait for one (counted, so a saturating source shows).
                self.count_decision("queue", Scope::InFlight.as_str());
                waited = true;
                tokio::time::timeout(QUEUE_WAIT, self.in_flight.acquire(&source, cap))
                    .await
                    .map_err(|_| Scope::InFlight)?
            }
            None => {
                // Dry run: counted, then decided like any other attempt, without a place.
                self.count_decision("would_queue", Scope::InFlight.as_str());
                None
            }
        };
        let account = match (key.kind, key.user) {
            (Kind::Password, Some(u)) => {
                // Normalised names hold no space, so the two kinds of lane cannot collide.
                let lane = if d.known_good {
                    format!("{u} {}", self.subnet(key.client_ip))
                } else {
                    u.to_owned()
                };
                match self.accounts.try_acquire(&lane, ACCOUNT_SLOTS) {
                    Some(slot) => Some(slot),
                    None => {
                        self.count_decision("queue", Scope::AccountQueue.as_str());
                        waited = true;
                        tokio::time::timeout(
                            QUEUE_WAIT,
                            self.accounts.acquire(&lane, ACCOUNT_SLOTS),
                        )
                        .await
                        .map_err(|_| Scope::AccountQueue)?
                    }
                }
            }
            _ => None,
        };
        d.permit = Some(Held {
            _in_flight: in_flight,
            _account: account,
        });
        Ok(waited)
    }

    /// A place to wait out a failure's tarpit, per source; waits (unbounded here: the
    /// caller's pre-auth deadline bounds it) while the source's other failures are parked.
    /// Returns the place (hold it through the sleep) and when it was taken: the tarpit counts
    /// from then.
    pub async fn park(&self, ip: IpAddr) -> (Option<Held>, tokio::time::Instant) {
        let c = self.config();
        if !c.enforce || c.allow.iter().any(|n| n.contains(&ip)) {
            return (None, tokio::time::Instant::now());
        }
        let cap = usize::try_from(c.max_delayed_per_ip).unwrap_or(usize::MAX);
        let source = self.in_flight_key(ip);
        let slot = match self.parking.try_acquire(&source, cap) {
            Some(slot) => Some(slot),
            None => {
                self.count_decision("queue", "tarpit");
                self.parking.acquire(&source, cap).await
            }
        };
        let held = Held {
            _in_flight: slot,
            _account: None,
        };
        (Some(held), tokio::time::Instant::now())
    }

    /// The decision from the lists and one batch read of the store; takes no place.
    async fn decide(&self, key: AttemptKey<'_>) -> Decision {
        let c = self.config();
        let ip = key.client_ip;
        if c.allow.iter().any(|n| n.contains(&ip)) {
            return Decision::allow(Scope::AllowList);
        }
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
            Kind::Token => {
                wanted.push(keys::block(Scope::TokenIp, &ip.to_string()));
                wanted.push(keys::block(Scope::TokenSubnet, &net.to_string()));
            }
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
        let known_good = key.kind == Kind::Password && at(5).is_some();
        // The refusing keys, sources before the account: an enforced one refuses; dry-run
        // ones only report.
        let hits: Vec<(Scope, bool)> = match key.kind {
            Kind::Password => [
                (Scope::Ip, at(2)),
                (Scope::Subnet, at(3)),
                (Scope::Account, at(4)),
            ],
            Kind::Token => [
                (Scope::TokenIp, at(2)),
                (Scope::TokenSubnet, at(3)),
                (Scope::None, None),
            ],
        }
        .iter()
        .filter_map(|(s, v)| v.map(|v| (*s, self.enforced(*s, v))))
        .collect();
        let decision = |verdict, scope, would_refuse| Decision {
            verdict,
            delay,
            scope,
            would_refuse,
            known_good,
            permit: None,
        };
        if !hits.is_empty() && known_good {
            // Known-good: this account succeeded from this network recently.
            return decision(Verdict::Allow, Scope::KnownGood, false);
        }
        let refusal = hits
            .iter()
            .find(|(_, enforced)| *enforced)
            .or_else(|| hits.first())
            .copied();
        match refusal {
            // Attack mode alone: the account's own MFA still gets through.
            Some((Scope::Account, true)) => decision(Verdict::RequireCode, Scope::Account, false),
            Some((scope, true)) => decision(Verdict::Reject, scope, false),
            Some((scope, false)) => decision(Verdict::Allow, scope, true),
            None => decision(
                Verdict::Allow,
                if delay.is_zero() {
                    Scope::None
                } else if count(1) > count(0) {
                    Scope::Account
                } else {
                    Scope::Ip
                },
                false,
            ),
        }
    }

    /// Is a block of this scope, recorded with this value (`reason`), enforced?
    fn enforced(&self, scope: Scope, value: &str) -> bool {
        if scope == Scope::AccountNetwork {
            // The owner's own answer, never a dry run.
            return true;
        }
        let b = match (scope, reason_of(value)) {
            (_, "manual") => return self.config().enforce,
            (Scope::Account, _) => self.config().per_account,
            (Scope::AppPassword, _) => self.config().wrong_codes,
            (_, "spray") => self.config().spray,
            (Scope::TokenIp, _) => self.config().per_token_ip,
            (Scope::TokenSubnet, _) => self.config().per_token_subnet,
            (Scope::Subnet, _) => self.config().per_subnet,
            _ => self.config().per_ip,
        };
        b.enforce
    }

    /// The in-flight key: the address for IPv4, the subnet for IPv6 (where one customer has a
    /// whole /64 to rotate through).
    fn in_flight_key(&self, ip: IpAddr) -> IpNet {
        crate::net::source(ip, self.config().subnet_v6)
    }
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
        "spray" | "manual" | "failures" | "wrong_codes" | "denied" => value,
        _ => "failures",
    }
}

/// The audit event of a block imposed on this scope.
fn event_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Account => "attack_mode",
        Scope::AppPassword => "app_password_suspect",
        _ => "block",
    }
}

fn hex16(bytes: &[u8]) -> String {
    bytes.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
