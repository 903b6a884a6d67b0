//! The `portal:` section: the self-service portal's listener, its OpenID Connect client and
//! what it tells mail clients. Absent: no portal.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::auth_section::url_ok;
use super::ctx::Ctx;
use super::units::Scalar;
use super::{HttpRateLimits, IssuerConfig};
use crate::secret::Secret;

/// Secure defaults of the section.
pub mod defaults {
    use std::time::Duration;

    pub const REAUTH_AFTER: Duration = Duration::from_secs(10 * 60);
    pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
    pub const SESSION_MAX: Duration = Duration::from_secs(8 * 3600);
    /// Requests per minute from one address (pages, forms, assets together).
    pub const PER_IP: u32 = 300;
    pub const BURST: u32 = 60;
    pub const OVERALL: u32 = 20_000;
    /// Failed sign-ins (callbacks that did not verify) per minute from one address.
    pub const FAILED_AUTH: u32 = 10;
    pub const PROBES_PER_IP: u32 = 600;
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortalConfig {
    pub address: SocketAddr,
    /// HTTPS with the gateway's certificates; `false`: plain HTTP behind a TLS-terminating proxy.
    pub tls: bool,
    /// Peers whose `X-Forwarded-For` is believed (read from the right).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `scheme://host[:port]`, no trailing slash: the origin people use.
    pub public_url: String,
    pub autoprovision: bool,
    pub reauth_after: Duration,
    pub session_idle: Duration,
    pub session_max: Duration,
    pub rate_limit: HttpRateLimits,
    pub mail: MailSettings,
    pub oidc: PortalOidc,
}

/// What mail clients are told (autoconfig, the Apple profile, the settings on the pages).
#[derive(Debug, Clone, PartialEq)]
pub struct MailSettings {
    pub imap_host: String,
    pub imap_port: u16,
    pub imap_starttls_port: Option<u16>,
    /// The port people reach the gateway's SMTP submission (POP3) listener on, when it is not
    /// the one the listener binds (a container's port mapping, a load balancer).
    pub smtp_port: Option<u16>,
    pub pop3_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortalOidc {
    /// The issuer as the token checks use it (audience = the client id, ID tokens accepted).
    pub issuer: IssuerConfig,
    pub client_id: String,
    pub client_secret: Secret,
    /// Always starts with `openid`.
    pub scopes: Vec<String>,
    pub admin_claim: String,
    pub admin_values: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    address: String,
    #[serde(default = "yes")]
    tls: bool,
    #[serde(default)]
    trusted_proxies: Vec<ipnet::IpNet>,
    public_url: String,
    #[serde(default = "yes")]
    autoprovision: bool,
    reauth_after: Option<Scalar>,
    session_idle: Option<Scalar>,
    session_max: Option<Scalar>,
    rate_limit: Option<super::raw::RateLimit>,
    mail: Option<RawMail>,
    oidc: RawOidc,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMail {
    imap_host: Option<String>,
    imap_port: Option<u16>,
    imap_starttls_port: Option<u16>,
    smtp_port: Option<u16>,
    pop3_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    client_id: String,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    ca_file: Option<String>,
    scopes: Option<Vec<String>>,
    user_claim: Option<String>,
    user_domain: Option<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    require_amr: Vec<String>,
    #[serde(default)]
    require_acr: Vec<String>,
    admin: Option<RawAdmin>,
    /// An unknown `kid` re-fetches the key set at most once per this (as for OAuth issuers).
    key_refresh_interval: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    claim: String,
    values: Vec<String>,
}

/// The host of `scheme://host[:port]` (IPv6 in brackets kept).
pub(crate) fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[');
    }
    authority.split(':').next().unwrap_or("")
}

/// An origin as browsers serialise it in `Origin`: scheme and host in lower case, no default
/// port (443 for https, 80 for http).
pub(crate) fn normalise_origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let mut rest = rest.to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    if rest.ends_with(default) && !rest.contains('/') {
        rest.truncate(rest.len() - default.len());
    }
    format!("{scheme}://{rest}")
}

pub(super) fn portal(cx: &mut Ctx, v: &Value) -> Option<PortalConfig> {
    if v.is_null() {
        return None;
    }
    let r: Raw = cx.decode(v, "portal")?;
    let address = r.address.parse::<SocketAddr>().unwrap_or_else(|_| {
        cx.err(
            "portal.address",
            format!("`{}` is not an IP:port", r.address),
        );
        SocketAddr::from(([127, 0, 0, 1], 8443))
    });
    let public_url = normalise_origin(r.public_url.trim_end_matches('/'));
    let origin_only = public_url
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.is_empty() && !rest.contains(['/', '?', '#', '@']));
    if !origin_only || !(public_url.starts_with("https://") || url_ok(&public_url)) {
        cx.err(
            "portal.public_url",
            "must be scheme://host[:port] without a path: https:// (http:// only for loopback)",
        );
    }
    if !public_url.starts_with("https://") {
        cx.warnings.push(
            "portal.public_url is plain http: browsers refuse its __Host- session cookie except on loopback"
                .into(),
        );
    }
    if !r.tls && r.trusted_proxies.is_empty() && !address.ip().is_loopback() {
        cx.warnings.push(
            "portal.tls is false and portal.trusted_proxies is empty: put the portal behind a proxy that terminates TLS".into(),
        );
    }
    let reauth_after = cx.duration(
        r.reauth_after.as_ref(),
        "portal.reauth_after",
        defaults::REAUTH_AFTER,
    );
    let session_idle = cx.duration(
        r.session_idle.as_ref(),
        "portal.session_idle",
        defaults::SESSION_IDLE,
    );
    let session_max = cx.duration(
        r.session_max.as_ref(),
        "portal.session_max",
        defaults::SESSION_MAX,
    );
    if reauth_after < Duration::from_secs(60) {
        cx.err("portal.reauth_after", "must be at least 1m");
    }
    if session_idle < Duration::from_secs(60) || session_idle > session_max {
        cx.err(
            "portal.session_idle",
            "must be at least 1m and at most portal.session_max",
        );
    }
    if session_max > Duration::from_secs(7 * 86_400) {
        cx.err("portal.session_max", "must be at most 7d");
    }
    let rl = r.rate_limit.unwrap_or_default();
    let mut limit =
        |v: Option<u32>, key: &str, d: u32| cx.count(v, &format!("portal.rate_limit.{key}"), d);
    let rate_limit = HttpRateLimits {
        per_ip: limit(rl.per_ip, "per_ip", defaults::PER_IP),
        burst: limit(rl.burst, "burst", defaults::BURST),
        overall: limit(rl.overall, "overall", defaults::OVERALL),
        failed_auth: limit(rl.failed_auth, "failed_auth", defaults::FAILED_AUTH),
        probes_per_ip: limit(rl.probes_per_ip, "probes_per_ip", defaults::PROBES_PER_IP),
    };
    let m = r.mail.unwrap_or_default();
    let mail = MailSettings {
        imap_host: m
            .imap_host
            .unwrap_or_else(|| url_host(&public_url).to_owned()),
        imap_port: m.imap_port.unwrap_or(993),
        imap_starttls_port: m.imap_starttls_port,
        smtp_port: m.smtp_port,
        pop3_port: m.pop3_port,
    };
    for (key, port) in [("smtp_port", m.smtp_port), ("pop3_port", m.pop3_port)] {
        if port == Some(0) {
            cx.err(format!("portal.mail.{key}"), "must be a port (1-65535)");
        }
    }
    if mail.imap_host.is_empty()
        || mail
            .imap_host
            .chars()
            .any(|c| c.is_whitespace() || "<>\"'&/".contains(c))
    {
        cx.err("portal.mail.imap_host", "must be a host name or address");
    }
    let oidc = oidc(cx, r.oidc)?;
    Some(PortalConfig {
        address,
        tls: r.tls,
        trusted_proxies: r.trusted_proxies,
        public_url,
        autoprovision: r.autoprovision,
        reauth_after,
        session_idle,
        session_max,
        rate_limit,
        mail,
        oidc,
    })
}

fn oidc(cx: &mut Ctx, o: RawOidc) -> Option<PortalOidc> {
    let path = "portal.oidc";
    if !url_ok(&o.issuer) {
        cx.err(
            format!("{path}.issuer"),
            "must be an https:// URL (http:// only for loopback)",
        );
    }
    if o.client_id.is_empty() || o.client_id.chars().any(char::is_control) {
        cx.err(format!("{path}.client_id"), "must be a non-empty name");
    }
    let client_secret = cx.secret_file_or_env(
        path,
        ["client_secret_file", "client_secret_env"],
        o.client_secret_file.as_deref(),
        o.client_secret_env.as_deref(),
    );
    let ca_file = o.ca_file.as_deref().map(|f| cx.path(f));
    if let Some(p) = &ca_file {
        if let Err(e) = std::fs::metadata(p) {
            cx.err(
                format!("{path}.ca_file"),
                format!("cannot read {}: {e}", p.display()),
            );
        }
    }
    let user_claim = o.user_claim.unwrap_or_else(|| "email".into());
    if !["email", "preferred_username", "upn", "sub", "unique_name"].contains(&user_claim.as_str())
    {
        cx.err(
            format!("{path}.user_claim"),
            "must be email, preferred_username, upn, unique_name or sub",
        );
    }
    let mut scopes = vec!["openid".to_owned()];
    for s in o
        .scopes
        .unwrap_or_else(|| vec!["email".into(), "profile".into()])
    {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            cx.err(format!("{path}.scopes"), format!("`{s}` is not a scope"));
        } else if !scopes.contains(&s) {
            scopes.push(s);
        }
    }
    let domains: Vec<String> = o.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    let (admin_claim, admin_values) = match o.admin {
        Some(a) => {
            if a.claim.is_empty() || a.values.is_empty() {
                cx.err(
                    format!("{path}.admin"),
                    "needs a claim and at least one value",
                );
            }
            (a.claim, a.values)
        }
        None => (String::new(), Vec::new()),
    };
    let key_refresh_interval = cx.duration(
        o.key_refresh_interval.as_ref(),
        &format!("{path}.key_refresh_interval"),
        Duration::from_secs(60),
    );
    if key_refresh_interval < Duration::from_secs(1)
        || key_refresh_interval > Duration::from_secs(86_400)
    {
        cx.err(
            format!("{path}.key_refresh_interval"),
            "must be between 1s and 24h",
        );
    }
    let issuer = IssuerConfig {
        name: "portal".into(),
        issuer: o.issuer,
        jwks_uri: None,
        ca_file,
        audiences: vec![o.client_id.clone()],
        algorithms: vec![
            "RS256".into(),
            "ES256".into(),
            "PS256".into(),
            "EdDSA".into(),
        ],
        user_claim,
        user_domain: o.user_domain,
        required_scopes: Vec::new(),
        require_amr: o.require_amr,
        require_acr: o.require_acr,
        accept_id_tokens: true,
        leeway: Duration::from_secs(60),
        key_refresh_interval,
        end_session_at_expiry: false,
        introspection: None,
        domains,
        require_email_verified: true,
    };
    Some(PortalOidc {
        issuer,
        client_id: o.client_id,
        client_secret: client_secret?,
        scopes,
        admin_claim,
        admin_values,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_of_a_public_url() {
        assert_eq!(
            super::url_host("https://mail.example.org"),
            "mail.example.org"
        );
        assert_eq!(super::url_host("https://127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(super::url_host("https://[::1]:8443"), "::1");
    }

    #[test]
    fn the_public_url_is_the_origin_browsers_send() {
        assert_eq!(
            super::normalise_origin("HTTPS://Mail.Example.org:443"),
            "https://mail.example.org"
        );
        assert_eq!(
            super::normalise_origin("https://mail.example.org:8443"),
            "https://mail.example.org:8443"
        );
        assert_eq!(
            super::normalise_origin("http://127.0.0.1:80"),
            "http://127.0.0.1"
        );
    }
}
