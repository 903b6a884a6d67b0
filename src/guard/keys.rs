//! The guard's keys in the state store. All start with `g:`; values are short texts or
//! counters; every key is written with a TTL. User names are normalised (no spaces or control
//! characters), so they can end a key.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Scope;

/// Blocks and attack modes: `g:block:{scope}:{value}` → reason.
pub(super) const BLOCK_PREFIX: &str = "g:block:";

pub(super) fn block(scope: Scope, value: &str) -> String {
    format!("{BLOCK_PREFIX}{}:{value}", scope.as_str())
}

/// The scope and value of a block key (IPv6 values contain `:`, so split at the first).
pub(super) fn parse_block(key: &str) -> Option<(Scope, &str)> {
    let (scope, value) = key.strip_prefix(BLOCK_PREFIX)?.split_once(':')?;
    Some((scope_named(scope)?, value))
}

pub(super) fn scope_named(s: &str) -> Option<Scope> {
    Some(match s {
        "ip" => Scope::Ip,
        "subnet" => Scope::Subnet,
        "account" => Scope::Account,
        "token_ip" => Scope::TokenIp,
        "token_subnet" => Scope::TokenSubnet,
        "app_password" => Scope::AppPassword,
        "account_network" => Scope::AccountNetwork,
        _ => return None,
    })
}

/// GCRA cell of a failure budget.
pub(super) fn failures(scope: Scope, value: &str) -> String {
    format!("g:fail:{}:{value}", scope.as_str())
}

/// Distinct accounts failed from an address or subnet.
pub(super) fn spray(scope: Scope, value: &str) -> String {
    format!("g:spray:{}:{value}", scope.as_str())
}

/// Failures counted for the tarpit, per address.
pub(super) fn tarpit_ip(ip: IpAddr) -> String {
    format!("g:tp:ip:{ip}")
}

/// Failures counted for the tarpit, per (account, subnet).
pub(super) fn tarpit_account_net(user: &str, net: &IpNet) -> String {
    format!("g:tp:an:{net}:{user}")
}

/// The account logged in from this network recently.
pub(super) fn known_good(user: &str, net: &IpNet) -> String {
    format!("g:good:{net}:{user}")
}

/// A success from this network reset its budgets in the current window.
pub(super) fn reset(net: &IpNet) -> String {
    format!("g:reset:{net}")
}

/// GCRA cell of the account's budget of wrong codes after a correct app password.
pub(super) fn wrong_codes(user: &str) -> String {
    format!("g:fail:code:{user}")
}

/// The value of an app password's block: `{user}/{credential id}`. The whole key is
/// [`crate::state::suspect_key`], which the authenticator reads.
pub(super) fn app_password(user: &str, credential: &str) -> String {
    format!("{user}/{credential}")
}

/// A wrong secret (its keyed fingerprint) this account failed with recently.
pub(super) fn seen(user: &str, fingerprint: &str) -> String {
    format!("g:seen:{fingerprint}:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_round_trip_with_ipv6_values() {
        let k = block(Scope::Subnet, "2001:db8::/64");
        assert_eq!(parse_block(&k), Some((Scope::Subnet, "2001:db8::/64")));
        let k = block(Scope::Account, "alice@example.org");
        assert_eq!(parse_block(&k), Some((Scope::Account, "alice@example.org")));
        assert_eq!(parse_block("g:block:nope:x"), None);
        // The authenticator finds a suspect app password under the key the guard writes.
        assert_eq!(
            block(Scope::AppPassword, &app_password("bob@x", "ap_1")),
            crate::state::suspect_key("bob@x", "ap_1")
        );
    }
}
