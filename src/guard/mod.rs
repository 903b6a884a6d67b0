//! The guard: asked before every credential check, told the outcome after.
//!
//! This is the seam for brute-force and spraying defence (DESIGN.md, "Abuse defence"). It
//! sees only cheap keys — the resolved client address, the claimed user name — and never a
//! secret. Today every attempt is allowed; the decision is still counted and audited so the
//! session flow, metrics and audit log already have their final shape, and security invariant
//! 4 (decide before any expensive check) holds by construction: the session calls
//! [`Guard::check`] before the authenticator and does not call the authenticator on `Reject`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Store;

/// The guard's answer before a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Check, but answer a failure no sooner than this.
    Delay(Duration),
    /// Do not check; answer as a failure.
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Delay(_) => "delay",
            Verdict::Reject => "reject",
        }
    }
}

/// What the guard knows of an attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptKey<'a> {
    pub client_ip: IpAddr,
    /// The normalised user name, if it was valid.
    pub user: Option<&'a str>,
}

pub struct Guard {
    #[allow(dead_code)] // used by the spraying defence (next issue)
    store: Arc<dyn Store>,
}

impl Guard {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Before the check. Allow-all until the brute-force defence lands.
    pub async fn check(&self, _key: AttemptKey<'_>) -> Verdict {
        Verdict::Allow
    }

    /// After the check.
    pub async fn record(&self, _key: AttemptKey<'_>, _success: bool) {}
}
