//! Blocks and attack modes as operators see them: listing, clearing, and the sweep that
//! refreshes the gauges and reports the ones that ended.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::{keys, reason_of, BlockInfo, Guard, Scope, LIST_LIMIT};
use crate::observe::{self, GuardAuditEvent};

impl Guard {
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
                Scope::TokenIp => doomed.push(keys::spray(Scope::Ip, &b.value)),
                Scope::TokenSubnet => doomed.push(keys::spray(Scope::Subnet, &b.value)),
                Scope::AppPassword => {
                    if let Some((user, _)) = b.value.split_once('/') {
                        doomed.push(keys::wrong_codes(user));
                    }
                }
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
        let sources = now
            .iter()
            .filter(|b| !["account", "app_password", "account_network"].contains(&b.scope.as_str()))
            .count();
        self.metrics
            .guard_attack_mode_accounts
            .set(i64::try_from(accounts).unwrap_or(i64::MAX));
        self.metrics
            .guard_blocked_sources
            .set(i64::try_from(sources).unwrap_or(i64::MAX));
        let current: HashSet<(String, String)> = now
            .iter()
            .map(|b| (b.scope.clone(), b.value.clone()))
            .collect();
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        for (scope, value) in seen.difference(&current) {
            let event = match scope.as_str() {
                "account" => "attack_mode_ended",
                "app_password" => "app_password_suspect_ended",
                _ => "block_ended",
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

#[async_trait::async_trait]
impl observe::BlockAdmin for Guard {
    async fn blocks_json(&self) -> Result<String, ()> {
        let list = self.status().await.map_err(drop)?;
        serde_json::to_string(&list).map_err(drop)
    }

    async fn clear_blocks(&self, scope: Option<&str>, value: Option<&str>) -> Result<usize, ()> {
        self.clear(scope, value).await.map_err(drop)
    }
}
