//! Admission: the connection caps checked in the accept loop, before any TLS work.
//!
//! A global cap (`max_connections`), all connections per client IP (`max_sessions_per_ip`,
//! generous for offices behind one NAT) and not-yet-authenticated connections per client IP
//! (`max_preauth_per_ip`). The ticket moves into the session task; dropping it frees its slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
    per_ip: Arc<Mutex<HashMap<IpAddr, Counts>>>,
    max_per_ip: u32,
    max_preauth_per_ip: u32,
}

impl Admission {
    pub fn new(max_connections: u32, max_per_ip: u32, max_preauth_per_ip: u32) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_connections as usize)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip,
            max_preauth_per_ip,
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
        let mut map = self.per_ip.lock().map_err(|_| Refusal::Global)?;
        let c = map.entry(ip).or_default();
        if c.all >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        if c.preauth >= self.max_preauth_per_ip {
            return Err(Refusal::PreauthPerIp);
        }
        c.all += 1;
        c.preauth += 1;
        Ok(Ticket {
            ip,
            preauth: true,
            map: self.per_ip.clone(),
            _permit: permit,
        })
    }

    /// Connections currently admitted (for tests and the log).
    pub fn open(&self, ip: IpAddr) -> (u32, u32) {
        self.per_ip
            .lock()
            .ok()
            .and_then(|m| m.get(&ip).map(|c| (c.all, c.preauth)))
            .unwrap_or((0, 0))
    }
}

/// Holds one connection's slots.
pub struct Ticket {
    ip: IpAddr,
    preauth: bool,
    map: Arc<Mutex<HashMap<IpAddr, Counts>>>,
    _permit: OwnedSemaphorePermit,
}

impl AdmissionTicket for Ticket {
    fn authenticated(&mut self) {
        if self.preauth {
            self.preauth = false;
            if let Ok(mut map) = self.map.lock() {
                if let Some(c) = map.get_mut(&self.ip) {
                    c.preauth = c.preauth.saturating_sub(1);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(c) = map.get_mut(&self.ip) {
                c.all = c.all.saturating_sub(1);
                if self.preauth {
                    c.preauth = c.preauth.saturating_sub(1);
                }
                if c.all == 0 {
                    map.remove(&self.ip);
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
        let a = Admission::new(10, 3, 2);
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
        let a = Admission::new(1, 5, 5);
        let _t = a.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("192.0.2.2".parse().unwrap()).err(),
            Some(Refusal::Global)
        );
    }
}
