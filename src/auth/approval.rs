//! Sign-in approval (`auth.mfa.approval: portal`): a login whose app password is right but
//! which carries no code, from a network where that app password is not unlocked, is recorded
//! as a *pending sign-in*; the person approves it in the portal (which opens the app password's
//! unlock window for that network, exactly as a valid code would) or denies it (which blocks
//! that network for the account for `guard.block_for`).
//!
//! What keeps this from being a new way in:
//! - only the authenticator records one, after the app password verified (never for an unknown
//!   user or a wrong password), and never in attack mode (where only a fresh code counts);
//! - one entry per (account, app password, network): a client retrying every minute refreshes
//!   its entry instead of adding one, so the person sees one request per device and network;
//! - at most `approval_max_pending` new entries per account and `approval_per_source` per
//!   source network within `approval_ttl`; more are dropped and counted;
//! - approving is a portal action behind the organisation's sign-in (and a fresh one), bound to
//!   the network the login came from, and happens once: the entry is taken before it is used;
//! - the client's answer is the same failure as any wrong credential (the IMAP front adds the
//!   same `[ALERT]` text to every failed password login), so it learns nothing.
//!
//! Entries live in the shared state store (`approval:p:{user}:{id}`, with the TTL), so any
//! replica's portal sees any replica's logins; the account's n-th request of the window is
//! listed under `approval:slot:{user}:{n}` (n ≤ `approval_max_pending`), so listing reads a
//! few keys and never scans the store.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ApprovalConfig;
use crate::observe::Metrics;
use crate::state::Store;

/// Webhook calls in flight at most (more are dropped and counted).
const MAX_WEBHOOKS: usize = 16;

/// How long one webhook call may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// A sign-in waiting for the person's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Stable for (user, app password, network): 16 hex digits.
    pub id: String,
    pub user: String,
    /// The app password's id and label.
    pub credential: String,
    pub label: String,
    /// The client's address and the network an approval unlocks (as unlock windows name it).
    pub address: String,
    pub network: String,
    /// The client's IMAP `ID` name and version ("" when not sent).
    pub client: String,
    /// First seen and expiry, Unix seconds.
    pub at: i64,
    pub expires: i64,
}

/// What [`Approvals::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// The same device and network asked again: its entry was kept.
    Again,
    /// Over a cap (or the store failed): nothing recorded.
    Dropped,
}

pub struct Approvals {
    state: Arc<dyn Store>,
    cfg: ApprovalConfig,
    metrics: Arc<Metrics>,
    /// Blocks of denied networks last this long (`guard.block_for`).
    block_for: Duration,
    http: reqwest::Client,
    webhooks: Arc<tokio::sync::Semaphore>,
    /// The portal's URL, for the webhook's message.
    portal_url: String,
}

fn key(user: &str, id: &str) -> String {
    format!("approval:p:{user}:{id}")
}

/// The n-th request of an account within the window names its entry here.
fn slot_key(user: &str, n: u64) -> String {
    format!("approval:slot:{user}:{n}")
}

/// Set when an entry is answered, so a second answer finds nothing.
fn done_key(user: &str, id: &str) -> String {
    format!("approval:done:{user}:{id}")
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The id of a pending sign-in: a digest of who, which app password and where.
pub fn pending_id(user: &str, credential: &str, network: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(format!("{user}\n{credential}\n{network}").as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `sha256=HEX` of HMAC-SHA256(secret, "{timestamp}.{body}"): the webhook's signature header.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

impl Approvals {
    pub fn new(
        state: Arc<dyn Store>,
        cfg: ApprovalConfig,
        metrics: Arc<Metrics>,
        block_for: Duration,
        portal_url: String,
    ) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(WEBHOOK_TIMEOUT)
            .connect_timeout(WEBHOOK_TIMEOUT)
            .no_proxy()
            .build()
            .unwrap_or_default();
        Approvals {
            state,
            cfg,
            metrics,
            block_for,
            http,
            webhooks: Arc::new(tokio::sync::Semaphore::new(MAX_WEBHOOKS)),
            portal_url,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.cfg.ttl
    }

    /// Records a pending sign-in (see the module documentation for the caps); a new one is
    /// announced to the webhook.
    pub async fn record(&self, mut p: Pending) -> Recorded {
        let ttl = self.cfg.ttl;
        p.id = pending_id(&p.user, &p.credential, &p.network);
        let k = key(&p.user, &p.id);
        match self.state.get(&k).await {
            Ok(Some(_)) => return Recorded::Again,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "approvals: the state store cannot be read");
                return self.dropped();
            }
        }
        let over = |n: &Result<u64, crate::state::StoreError>, cap: u32| {
            n.as_ref().map_or(true, |n| *n > u64::from(cap))
        };
        let account = self
            .state
            .incr(&format!("approval:n:{}", p.user), 1, ttl)
            .await;
        if over(&account, self.cfg.max_pending) {
            return self.dropped();
        }
        // The account's n-th request of this window: its slot in the account's list.
        let slot = account.unwrap_or(0);
        let source = self
            .state
            .incr(&format!("approval:src:{}", p.network), 1, ttl)
            .await;
        if over(&source, self.cfg.per_source) {
            return self.dropped();
        }
        p.at = unix_now();
        p.expires = p.at + i64::try_from(ttl.as_secs()).unwrap_or(600);
        let Ok(json) = serde_json::to_string(&p) else {
            return self.dropped();
        };
        // A request answered earlier may come again (its unlock window ended): answerable anew.
        let _ = self.state.delete(&done_key(&p.user, &p.id)).await;
        match self.state.set_if_absent(&k, &json, ttl).await {
            Ok(true) => {}
            Ok(false) => return Recorded::Again,
            Err(_) => return self.dropped(),
        }
        if let Err(e) = self.state.put(&slot_key(&p.user, slot), &p.id, ttl).await {
            tracing::warn!(error = %e, "approvals: the request could not be listed");
        }
        self.metrics
            .signin_pending
            .with_label_values(&["recorded"])
            .inc();
        self.announce(&p);
        Recorded::New
    }

    fn dropped(&self) -> Recorded {
        self.metrics
            .signin_pending
            .with_label_values(&["dropped"])
            .inc();
        Recorded::Dropped
    }

    /// Posts the new pending sign-in to the webhook, in the background (bounded).
    fn announce(&self, p: &Pending) {
        let (Some(url), Some(secret)) = (&self.cfg.webhook_url, &self.cfg.webhook_secret) else {
            return;
        };
        let Ok(permit) = self.webhooks.clone().try_acquire_owned() else {
            self.metrics
                .signin_webhooks
                .with_label_values(&["dropped"])
                .inc();
            return;
        };
        let body = serde_json::json!({
            "event": "signin_pending",
            "id": p.id,
            "user": p.user,
            "app_password": { "id": p.credential, "label": p.label },
            "address": p.address,
            "network": p.network,
            "client": p.client,
            "at": p.at,
            "expires": p.expires,
            "approve_at": self.portal_url,
        })
        .to_string();
        let now = unix_now();
        let sig = signature(secret.expose(), now, body.as_bytes());
        let req = self
            .http
            .post(url.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-imapgate-timestamp", now.to_string())
            .header("x-imapgate-signature", sig)
            .body(body);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ok = req.send().await.is_ok_and(|r| r.status().is_success());
            let result = if ok { "sent" } else { "failed" };
            if !ok {
                tracing::warn!("approvals: the webhook did not accept a pending sign-in");
            }
            metrics.signin_webhooks.with_label_values(&[result]).inc();
        });
    }

    /// The pending sign-ins of `user`, oldest first: two reads (the account's slots, then
    /// their entries), never a scan of the store.
    pub async fn list(&self, user: &str) -> Vec<Pending> {
        let slots: Vec<String> = (1..=u64::from(self.cfg.max_pending))
            .map(|n| slot_key(user, n))
            .collect();
        let mut ids: Vec<String> = match self.state.get_many(&slots).await {
            Ok(v) => v.into_iter().flatten().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "approvals: the state store cannot be read");
                return Vec::new();
            }
        };
        ids.sort();
        ids.dedup();
        let keys: Vec<String> = ids.iter().map(|id| key(user, id)).collect();
        let mut out: Vec<Pending> = match self.state.get_many(&keys).await {
            Ok(v) => v
                .into_iter()
                .flatten()
                .filter_map(|v| serde_json::from_str(&v).ok())
                .filter(|p: &Pending| p.user == user)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "approvals: the state store cannot be read");
                Vec::new()
            }
        };
        out.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
        out
    }

    /// Takes a pending sign-in out of the store: of two answers at once only one gets it.
    async fn take(&self, user: &str, id: &str) -> Option<Pending> {
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let k = key(user, id);
        let value = self.state.get(&k).await.ok()??;
        let once = self
            .state
            .set_if_absent(&done_key(user, id), "1", self.cfg.ttl)
            .await
            .ok()?;
        if !once {
            return None;
        }
        let _ = self.state.delete(&k).await;
        serde_json::from_str(&value).ok()
    }

    /// Approves: opens the app password's unlock window for the network it came from, under
    /// the user's current TOTP enrolment (`enrolment`, [`super::enrolment_tag`]), for
    /// `unlock_ttl`. `None`: no such pending sign-in (answered, expired, or someone else's).
    pub async fn approve(
        &self,
        user: &str,
        id: &str,
        enrolment: &str,
        unlock_ttl: Duration,
    ) -> Option<Pending> {
        let p = self.take(user, id).await?;
        let unlock = super::unlock_key(user, &p.credential, &p.network, enrolment);
        if let Err(e) = self.state.put(&unlock, "1", unlock_ttl).await {
            tracing::warn!(error = %e, "approvals: the unlock could not be recorded");
            return None;
        }
        self.metrics.signin_approved.inc();
        Some(p)
    }

    /// Denies: the network is refused for this account for `guard.block_for` (a guard block
    /// of scope `account_network`, listed and cleared like the others).
    pub async fn deny(&self, user: &str, id: &str) -> Option<Pending> {
        let p = self.take(user, id).await?;
        let block = crate::state::denied_network_key(user, &p.network);
        if let Err(e) = self.state.put(&block, "denied", self.block_for).await {
            tracing::warn!(error = %e, "approvals: the denial could not be recorded");
            return None;
        }
        self.metrics.signin_denied.inc();
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_per_user_app_password_and_network() {
        let a = pending_id("a@example.org", "ap_1", "192.0.2.0/24");
        assert_eq!(a.len(), 16);
        assert_eq!(a, pending_id("a@example.org", "ap_1", "192.0.2.0/24"));
        assert_ne!(a, pending_id("a@example.org", "ap_1", "198.51.100.0/24"));
        assert_ne!(a, pending_id("a@example.org", "ap_2", "192.0.2.0/24"));
        assert_ne!(a, pending_id("b@example.org", "ap_1", "192.0.2.0/24"));
    }

    #[test]
    fn the_webhook_signature_is_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 key and data, with the timestamp prefix.
        let sig = signature(b"Jefe", 0, b"what do ya want for nothing?");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert_ne!(sig, signature(b"Jefe", 1, b"what do ya want for nothing?"));
        assert_ne!(sig, signature(b"jefe", 0, b"what do ya want for nothing?"));
    }
}
