//! After a check: what the guard records of its outcome — known-good networks and resets on
//! success; failure budgets, spray sets, the tarpit counters and the wrong-code budget on
//! failure — and the blocks, attack modes and suspect marks those impose.

use ipnet::IpNet;

use super::{event_name, keys, rate, AttemptKey, Guard, Kind, Outcome, Scope};
use crate::observe::{self, GuardAuditEvent};
use crate::state::RateDecision;

impl Guard {
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
            Outcome::Failure {
                fingerprint,
                wrong_code,
            } => self.failure(key, &net, fingerprint, wrong_code).await,
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
        wrong_code: Option<&str>,
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
        // Correct app password, wrong code: its own strict budget per account, across every
        // network (a 6-digit code must never be guessable by volume).
        if let (Some(user), Some(credential)) = (key.user, wrong_code) {
            if let RateDecision::Limited(_) = s
                .rate_check(&keys::wrong_codes(user), rate(c.wrong_codes))
                .await?
            {
                self.impose(
                    Scope::AppPassword,
                    &keys::app_password(user, credential),
                    "wrong_codes",
                    c.wrong_codes.failures as u64,
                    c.wrong_codes.enforce,
                )
                .await?;
            }
        }
        // Passwords and tokens each have their own budgets per address and subnet; both feed
        // the spray sets (distinct accounts failed from one source).
        let (ip_scope, net_scope, ip_budget, net_budget) = match key.kind {
            Kind::Password => (Scope::Ip, Scope::Subnet, c.per_ip, c.per_subnet),
            Kind::Token => (
                Scope::TokenIp,
                Scope::TokenSubnet,
                c.per_token_ip,
                c.per_token_subnet,
            ),
        };
        let (fail_ip, fail_net, spray_ip, spray_net) = (
            keys::failures(ip_scope, &ip_text),
            keys::failures(net_scope, &net_text),
            keys::spray(Scope::Ip, &ip_text),
            keys::spray(Scope::Subnet, &net_text),
        );
        // Spraying: distinct accounts failed from this address and from this subnet.
        let (ip_rate, net_rate, ip_accounts, net_accounts) = tokio::try_join!(
            s.rate_check(&fail_ip, rate(ip_budget)),
            s.rate_check(&fail_net, rate(net_budget)),
            s.set_add_count(&spray_ip, &member, c.spray.per),
            s.set_add_count(&spray_net, &member, c.spray.per),
        )?;
        for (scope, value, budget, decision) in [
            (ip_scope, &ip_text, ip_budget, ip_rate),
            (net_scope, &net_text, net_budget, net_rate),
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
            (ip_scope, &ip_text, ip_accounts),
            (net_scope, &net_text, net_accounts),
        ] {
            if n > u64::from(c.spray.failures) {
                self.impose(scope, value, "spray", n, c.spray.enforce)
                    .await?;
            }
        }
        if key.kind == Kind::Token {
            // A refused token says nothing about the account's passwords: no attack mode.
            return Ok(());
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
        let ttl = if scope == Scope::AppPassword {
            self.config().suspect_for
        } else {
            self.config().block_for
        };
        let mut fresh = self.store.set_if_absent(&k, reason, ttl).await?;
        if !fresh && enforced {
            // A block recorded by a dry-run control must not hide an enforced one.
            let existing = self.store.get(&k).await?;
            if existing.is_some_and(|v| !self.enforced(scope, &v)) {
                self.store.put(&k, reason, ttl).await?;
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
        if scope == Scope::AppPassword {
            self.metrics.app_password_suspect.inc();
        }
        let event = event_name(scope);
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
            match scope {
                Scope::Account => "account in attack mode",
                Scope::AppPassword => {
                    "app password suspect: correct password, too many wrong codes"
                }
                _ => "source blocked",
            }
        );
        Ok(())
    }
}
