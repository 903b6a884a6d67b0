//! Admission: the connection caps checked in the accept loop, before any TLS work.
//!
//! A global cap (`max_connections`), all connections per client source (`max_sessions_per_ip`,
//! generous for offices behind one NAT) and not-yet-authenticated connections per client
//! source (`max_preauth_per_ip`). A source is an IPv4 address, or an IPv6 prefix
//! (`guard.subnet_v6`, default /64: one host holds a whole /64 and could otherwise open
//! `max_preauth_per_ip` connections from each of its addresses). The ticket moves into the
//! session task; dropping it frees its slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::session::AdmissionTicket;

/// Why a connection was refused (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Global,
    PerIp,
    PreauthPerIp,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "refused_global",
            Refusal::PerIp => "refused_per_ip",
            Refusal::PreauthPerIp => "refused_preauth_per_ip",
        }
    }
}

#[derive(Default)]
struct Counts {
    all: u32,
    preauth: u32,
}

pub struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpNet, Counts>>>,
    max_per_ip: u32,
    max_preauth_per_ip: u32,
    /// IPv6 clients are counted per prefix of this length.
    v6_prefix: u8,
}

impl Admission {
    pub fn new(
        max_connections: u32,
        max_per_ip: u32,
        max_preauth_per_ip: u32,
        v6_prefix: u8,
    ) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_connections as usize)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip,
            max_preauth_per_ip,
            v6_prefix,
        }
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, Refusal> {
        let permit = self.reserve()?;
        self.admit_reserved(permit, ip)
    }

    /// A place under the global cap, before the client address is known (a PROXY header is
    /// read while holding it, so header reads count against `max_connections`).
    pub fn reserve(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Global)
    }

    /// [`Admission::admit`] with a place already reserved.
    pub fn admit_reserved(
        &self,
        permit: OwnedSemaphorePermit,
        ip: IpAddr,
    ) -> Result<Ticket, Refusal> {
        let source = crate::net::source(ip, self.v6_prefix);
        let mut map = self.per_ip.lock().map_err(|_| Refusal::Global)?;
        let c = map.entry(source).or_default();
        if c.all >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        if c.preauth >= self.max_preauth_per_ip {
            return Err(Refusal::PreauthPerIp);
        }
        c.all += 1;
        c.preauth += 1;
        Ok(Ticket {
            source,
            preauth: true,
            map: self.per_ip.clone(),
            _permit: permit,
        })
    }

    /// Connections currently admitted from `ip`'s source (for tests and the log).
    pub fn open(&self, ip: IpAddr) -> (u32, u32) {
        let source = crate::net::source(ip, self.v6_prefix);
        self.per_ip
            .lock()
            .ok()
            .and_then(|m| m.get(&source).map(|c| (c.all, c.preauth)))
            .unwrap_or((0, 0))
    }
}

/// Holds one connection's slots.
pub struct Ticket {
    source: IpNet,
    preauth: bool,
    map: Arc<Mutex<HashMap<IpNet, Counts>>>,
    _permit: OwnedSemaphorePermit,
}

impl AdmissionTicket for Ticket {
    fn authenticated(&mut self) {
        if self.preauth {
            self.preauth = false;
            if let Ok(mut map) = self.map.lock() {
                if let Some(c) = map.get_mut(&self.source) {
                    c.preauth = c.preauth.saturating_sub(1);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(c) = map.get_mut(&self.source) {
                c.all = c.all.saturating_sub(1);
                if self.preauth {
                    c.preauth = c.preauth.saturating_sub(1);
                }
                if c.all == 0 {
                    map.remove(&self.source);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let a = Admission::new(10, 3, 2, 64);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut t1 = a.admit(ip).unwrap();
        let _t2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(Refusal::PreauthPerIp));
        t1.authenticated();
        let t3 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(Refusal::PerIp));
        drop(t3);
        assert_eq!(a.open(ip), (2, 1));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(a.admit(other).is_ok());
    }

    #[test]
    fn global_cap() {
        let a = Admission::new(1, 5, 5, 64);
        let _t = a.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("192.0.2.2".parse().unwrap()).err(),
            Some(Refusal::Global)
        );
    }

    #[test]
    fn ipv6_is_counted_per_prefix() {
        let a = Admission::new(100, 10, 3, 64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Three addresses of one /64 fill its pre-auth places; the fourth is refused.
        let _t: Vec<_> = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"]
            .iter()
            .map(|s| a.admit(ip(s)).unwrap())
            .collect();
        assert_eq!(
            a.admit(ip("2001:db8:1:2:abcd::1")).err(),
            Some(Refusal::PreauthPerIp)
        );
        assert_eq!(a.open(ip("2001:db8:1:2::77")), (3, 3));
        // The next /64 is another source.
        assert!(a.admit(ip("2001:db8:1:3::1")).is_ok());
        // IPv4 stays per address, and a v4-mapped address is that IPv4 address.
        let _v4 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.open(ip("::ffff:192.0.2.1")), (1, 1));
        assert_eq!(a.open(ip("192.0.2.2")), (0, 0));
    }
}
