//! Request limits for the gateway's HTTP listeners: the admin listener today, the portal
//! (issue 19) next. In-process GCRA cells from `governor`; nothing here is shared between
//! replicas (each replica's listener protects itself).
//!
//! Three budgets, each in requests per minute ([`HttpRateLimits`]):
//! - **API requests** (everything but the probes, unknown paths included): per client address
//!   (`per_ip`, bursts of `burst`) and over all addresses together (`overall`, bursts of a tenth
//!   of it). A scraper or a script in a loop gets `429 Too Many Requests` with `Retry-After`.
//! - **Failed credential checks** per client address (`failed_auth`, bursts of as many): the
//!   check that uses up the last one sets a lockout, and until it ends that address's requests
//!   are answered 429 *before* their token is compared, so a guesser learns nothing from them.
//!   After the lockout one more guess is compared, and the next one locks it out again: one
//!   guess per `60 s / failed_auth` at most, from each address.
//! - **Probes** (`/metrics`, `/healthz`, `/readyz`, as the listener names them): their own
//!   per-address budget (`probes_per_ip`) and no overall cap, so neither a flood of API
//!   requests nor another address's flood can starve a kubelet or a Prometheus server.
//!
//! The client address is the socket's peer (no forwarding header is believed). IPv6 addresses
//! count per /64, the block one host usually holds, so a guesser cannot reset its budget by
//! changing the low bits; an IPv4-mapped IPv6 address counts as the IPv4 address.
//!
//! Memory is bounded: each per-address map holds at most [`MAX_KEYS`] addresses. When one is
//! full, addresses whose cells are back to fresh are dropped (`retain_recent`, at most once a
//! second while that frees nothing); if it is still full, a request is not tracked per address
//! and only the `overall` cap applies to it (probes: none). The lockouts are bounded the same
//! way.
//!
//! Refusals are counted in `imapgate_http_requests_limited_total{server, limit}`, labels from
//! [`Server`] and [`LimitKind`] (closed sets).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::IntCounterVec;

use crate::config::HttpRateLimits;

/// Client addresses tracked at most by each per-address budget (and by the lockouts).
pub const MAX_KEYS: usize = 10_000;

/// The HTTP listener a limiter protects (the `server` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Admin,
    Portal,
}

impl Server {
    pub const ALL: [Server; 2] = [Server::Admin, Server::Portal];

    pub fn as_str(self) -> &'static str {
        match self {
            Server::Admin => "admin",
            Server::Portal => "portal",
        }
    }
}

/// The budget that refused a request (the `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// API requests from one address.
    PerIp,
    /// API requests from all addresses together.
    Overall,
    /// Failed credential checks from one address (or its lockout).
    FailedAuth,
    /// Probe requests from one address.
    Probes,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        LimitKind::PerIp,
        LimitKind::Overall,
        LimitKind::FailedAuth,
        LimitKind::Probes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::PerIp => "per_ip",
            LimitKind::Overall => "overall",
            LimitKind::FailedAuth => "failed_auth",
            LimitKind::Probes => "probes",
        }
    }
}

/// Which budget a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/metrics`, `/healthz`, `/readyz`.
    Probe,
    /// Everything else.
    Api,
}

/// A refused request: answered `429 Too Many Requests` with `Retry-After` in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: LimitKind,
    pub retry_after: Duration,
}

impl Refused {
    /// `Retry-After` in whole seconds, rounded up, at least 1 (RFC 9110 §10.2.3).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut r = (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(self.retry_after_secs()),
        );
        r
    }
}

/// The key of a client address: IPv4 as it is, IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

type Cells =
    RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// A per-address budget: `governor`'s keyed cells, bounded to [`MAX_KEYS`] addresses.
struct Keyed {
    cells: Cells,
    /// No `retain_recent` before this: a sweep that freed nothing is not repeated for
    /// [`SWEEP_BACKOFF`], so a flood from many addresses costs one O(n) pass a second, not one
    /// per request.
    quiet_until: Mutex<Option<Instant>>,
}

/// See [`Keyed::quiet_until`].
const SWEEP_BACKOFF: Duration = Duration::from_secs(1);

impl Keyed {
    fn new(q: Quota) -> Self {
        Self {
            cells: RateLimiter::hashmap(q).with_middleware::<StateInformationMiddleware>(),
            quiet_until: Mutex::new(None),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether a new address fits, after dropping the cells that are back to fresh if needed.
    fn has_room(&self) -> bool {
        if self.cells.len() < MAX_KEYS {
            return true;
        }
        let now = Instant::now();
        let Ok(mut quiet) = self.quiet_until.lock() else {
            return false;
        };
        if quiet.is_some_and(|t| now < t) {
            return false;
        }
        self.cells.retain_recent();
        let room = self.cells.len() < MAX_KEYS;
        *quiet = (!room).then_some(now + SWEEP_BACKOFF);
        room
    }

    /// One cell for `key`: the burst left, or how long to wait. `None` when the map is full
    /// and `key` cannot be tracked (the caller then applies no per-address limit).
    fn take(&self, key: &IpAddr) -> Option<Result<u32, Duration>> {
        if !self.has_room() {
            return None;
        }
        Some(match self.cells.check_key(key) {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => Err(not_until.wait_time_from(self.cells.clock().now())),
        })
    }
}
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// `per_minute` cells a minute, `burst` at once.
fn quota(per_minute: u32, burst: u32) -> Quota {
    Quota::per_minute(nz(per_minute)).allow_burst(nz(burst))
}

fn keyed(q: Quota) -> Keyed {
    Keyed::new(q)
}

/// The limits of one HTTP listener. Cheap to share behind an `Arc`.
pub struct RequestLimiter {
    server: Server,
    per_ip: Keyed,
    overall: Direct,
    probes: Keyed,
    failed_auth: Keyed,
    /// Addresses whose failed-check budget is used up, until when.
    lockouts: Mutex<HashMap<IpAddr, Instant>>,
    /// `60 s / failed_auth`: how long a lockout lasts.
    lockout: Duration,
    refused: Option<IntCounterVec>,
}

impl RequestLimiter {
    /// `refused`: `imapgate_http_requests_limited_total` (labels `server`, `limit`), if counted.
    pub fn new(server: Server, limits: &HttpRateLimits, refused: Option<IntCounterVec>) -> Self {
        let failed = quota(limits.failed_auth, limits.failed_auth);
        Self {
            server,
            per_ip: keyed(quota(limits.per_ip, limits.burst)),
            overall: RateLimiter::direct(quota(limits.overall, (limits.overall / 10).max(1))),
            probes: keyed(quota(
                limits.probes_per_ip,
                (limits.probes_per_ip / 10).max(1),
            )),
            failed_auth: keyed(failed),
            lockouts: Mutex::new(HashMap::new()),
            lockout: failed.replenish_interval(),
            refused,
        }
    }

    fn refuse(&self, limit: LimitKind, retry_after: Duration) -> Refused {
        if let Some(c) = &self.refused {
            c.with_label_values(&[self.server.as_str(), limit.as_str()])
                .inc();
        }
        Refused { limit, retry_after }
    }

    /// Counts a request from `ip`; `Err` when a budget refuses it.
    pub fn check(&self, ip: IpAddr, route: Route) -> Result<(), Refused> {
        let key = client_key(ip);
        match route {
            Route::Probe => match self.probes.take(&key) {
                Some(Err(wait)) => Err(self.refuse(LimitKind::Probes, wait)),
                _ => Ok(()),
            },
            Route::Api => {
                if let Some(Err(wait)) = self.per_ip.take(&key) {
                    return Err(self.refuse(LimitKind::PerIp, wait));
                }
                self.overall.check().map_err(|not_until| {
                    let wait = not_until.wait_time_from(self.overall.clock().now());
                    self.refuse(LimitKind::Overall, wait)
                })
            }
        }
    }

    /// Before a credential check from `ip`: `Err` while that address is locked out, and then
    /// the credential must not be compared at all.
    pub fn auth_allowed(&self, ip: IpAddr) -> Result<(), Refused> {
        let key = client_key(ip);
        let now = Instant::now();
        let Ok(mut lockouts) = self.lockouts.lock() else {
            // A poisoned lock: refuse rather than compare credentials unlimited.
            return Err(self.refuse(LimitKind::FailedAuth, self.lockout));
        };
        match lockouts.get(&key) {
            Some(until) if *until > now => {
                let wait = *until - now;
                drop(lockouts);
                Err(self.refuse(LimitKind::FailedAuth, wait))
            }
            Some(_) => {
                lockouts.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a failed credential check from `ip`. `Some` when this failure used up the
    /// address's budget (or came while it was used up): answer with it instead of the usual
    /// 401, and refuse the address's checks until the lockout ends.
    pub fn auth_failed(&self, ip: IpAddr) -> Option<Refused> {
        let key = client_key(ip);
        let wait = match self.failed_auth.take(&key) {
            Some(Ok(remaining)) if remaining > 0 => return None,
            // The last one of the burst: this failure is answered as usual, the next is not
            // compared.
            Some(Ok(_)) => {
                self.lock_out(key, self.lockout);
                return None;
            }
            Some(Err(wait)) => wait,
            // Too many addresses to track: this one is refused now, unrecorded.
            None => self.lockout,
        };
        self.lock_out(key, wait);
        Some(self.refuse(LimitKind::FailedAuth, wait))
    }

    fn lock_out(&self, key: IpAddr, wait: Duration) {
        let now = Instant::now();
        let Ok(mut lockouts) = self.lockouts.lock() else {
            return;
        };
        if lockouts.len() >= MAX_KEYS && !lockouts.contains_key(&key) {
            lockouts.retain(|_, until| *until > now);
            if lockouts.len() >= MAX_KEYS {
                return;
            }
        }
        let until = now + wait.max(Duration::from_millis(1));
        let entry = lockouts.entry(key).or_insert(until);
        *entry = (*entry).max(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: u32, burst: u32, overall: u32, failed: u32, probes: u32) -> HttpRateLimits {
        HttpRateLimits {
            per_ip,
            burst,
            overall,
            failed_auth: failed,
            probes_per_ip: probes,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_burst_then_429_with_retry_after_others_unaffected() {
        let l = RequestLimiter::new(Server::Admin, &limits(60, 3, 6000, 5, 1200), None);
        for _ in 0..3 {
            assert_eq!(l.check(ip("192.0.2.1"), Route::Api), Ok(()));
        }
        let r = l.check(ip("192.0.2.1"), Route::Api).unwrap_err();
        assert_eq!(r.limit, LimitKind::PerIp);
        // One a second refills: at most a second to wait, announced as 1.
        assert!(r.retry_after <= Duration::from_secs(1), "{r:?}");
        assert_eq!(r.retry_after_secs(), 1);
        let resp = r.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        // Another address, and this address's probes, have their own budgets.
        assert_eq!(l.check(ip("192.0.2.2"), Route::Api), Ok(()));
        assert_eq!(l.check(ip("192.0.2.1"), Route::Probe), Ok(()));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = RequestLimiter::new(Server::Admin, &limits(60, 2, 6000, 5, 1200), None);
        assert_eq!(l.check(ip("2001:db8:1:2::1"), Route::Api), Ok(()));
        assert_eq!(l.check(ip("2001:db8:1:2:ffff::9"), Route::Api), Ok(()));
        assert!(l.check(ip("2001:db8:1:2:abcd::7"), Route::Api).is_err());
        assert_eq!(l.check(ip("2001:db8:1:3::1"), Route::Api), Ok(()));
        assert_eq!(l.check(ip("192.0.2.9"), Route::Api), Ok(()));
        assert_eq!(l.check(ip("::ffff:192.0.2.9"), Route::Api), Ok(()));
        assert!(l.check(ip("192.0.2.9"), Route::Api).is_err());
    }

    #[test]
    fn the_overall_cap_holds_across_addresses_but_never_for_probes() {
        // 60 a minute overall: bursts of 6.
        let l = RequestLimiter::new(Server::Admin, &limits(600, 100, 60, 5, 60), None);
        let mut refused = None;
        for i in 0..20u8 {
            if let Err(r) = l.check(IpAddr::from([198, 51, 100, i]), Route::Api) {
                refused = Some((i, r.limit));
                break;
            }
        }
        assert_eq!(refused, Some((6, LimitKind::Overall)));
        for i in 0..20u8 {
            assert_eq!(
                l.check(IpAddr::from([198, 51, 100, i]), Route::Probe),
                Ok(())
            );
        }
    }

    #[test]
    fn failed_checks_lock_the_address_out_before_its_next_comparison() {
        let m = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["server", "limit"]).unwrap();
        let l = RequestLimiter::new(
            Server::Admin,
            &limits(600, 100, 6000, 3, 1200),
            Some(m.clone()),
        );
        let guesser = ip("203.0.113.5");
        for n in 1..=3 {
            assert_eq!(l.auth_allowed(guesser), Ok(()), "guess {n} compared");
            assert_eq!(l.auth_failed(guesser), None, "guess {n} answered 401");
        }
        // The fourth is not compared: 429 for the 20 s a failed check takes to refill.
        let r = l.auth_allowed(guesser).unwrap_err();
        assert_eq!(r.limit, LimitKind::FailedAuth);
        assert!(
            r.retry_after > Duration::from_secs(15) && r.retry_after <= Duration::from_secs(20),
            "{r:?}"
        );
        assert_eq!(
            m.with_label_values(&["admin", "failed_auth"]).get(),
            1,
            "counted"
        );
        // The lockout is this address's alone.
        assert_eq!(l.auth_allowed(ip("203.0.113.6")), Ok(()));
        // A failure that races past the lockout is refused too.
        assert!(l.auth_failed(guesser).is_some());
    }

    #[test]
    fn a_full_map_drops_fresh_cells_and_then_stops_tracking_new_addresses() {
        let l = RequestLimiter::new(Server::Admin, &limits(60, 1, 1_000_000, 5, 1200), None);
        for i in 0..MAX_KEYS as u32 {
            let a = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            assert_eq!(l.check(a, Route::Api), Ok(()));
        }
        assert_eq!(l.per_ip.len(), MAX_KEYS);
        // Every cell is still in use (one a second refills): a new address is not tracked,
        // the overall cap alone applies to it, and the map does not grow.
        let new = ip("192.0.2.200");
        assert_eq!(l.check(new, Route::Api), Ok(()));
        assert_eq!(l.check(new, Route::Api), Ok(()));
        assert_eq!(l.per_ip.len(), MAX_KEYS);
        // Two seconds later every cell has been full again for one interval (governor's
        // `retain_recent` keeps a cell until then): the next sweep drops them and the new
        // address is limited as usual.
        std::thread::sleep(Duration::from_millis(2300));
        assert_eq!(l.check(new, Route::Api), Ok(()));
        assert!(l.per_ip.len() < MAX_KEYS);
        assert_eq!(
            l.check(new, Route::Api).map_err(|r| r.limit),
            Err(LimitKind::PerIp)
        );
    }
}
