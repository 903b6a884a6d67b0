//! Stage two for the `auth` section: users file, key ring, argon2, MFA, OAuth issuers.

use std::time::Duration;

use serde_json::Value;

use super::ctx::Ctx;
use super::{defaults, raw, Argon2Params, AuthConfig};
use crate::secret::Secret;

pub(super) fn auth(cx: &mut Ctx, v: &Value) -> Option<AuthConfig> {
    if v.is_null() {
        cx.err(
            "auth",
            "is required (at least auth.secret_keys; users live in auth.store, or in auth.users_file)",
        );
        return None;
    }
    let a: raw::Auth = cx.decode(v, "auth")?;
    let store = store(cx, &a);
    let argon2 = match a.app_password.argon2 {
        None => Argon2Params::default(),
        Some(p) => {
            if p.t == 0
                || p.p == 0
                || p.p > 16
                || p.m_kib < 8 * p.p.max(1)
                || p.m_kib > 4 * 1024 * 1024
            {
                cx.err(
                    "auth.app_password.argon2",
                    "needs t ≥ 1, 1 ≤ p ≤ 16 and 8·p ≤ m_kib ≤ 4194304",
                );
            } else if p.m_kib < defaults::ARGON2_M_KIB || p.t < defaults::ARGON2_T {
                cx.warnings.push(format!(
                    "auth.app_password.argon2 is below the OWASP minimum (m_kib {}, t {})",
                    defaults::ARGON2_M_KIB,
                    defaults::ARGON2_T
                ));
            }
            Argon2Params {
                m_kib: p.m_kib,
                t: p.t,
                p: p.p,
            }
        }
    };
    let failure_floor = cx.duration(
        a.failure_floor.as_ref(),
        "auth.failure_floor",
        defaults::FAILURE_FLOOR,
    );
    if failure_floor > Duration::from_secs(30) || failure_floor < Duration::from_millis(100) {
        cx.err(
            "auth.failure_floor",
            "must be between 100ms and 30s (it hides how much work a failure cost)",
        );
    }
    let mut secret_keys: Vec<(String, Secret)> = Vec::new();
    for (i, k) in a.secret_keys.iter().enumerate() {
        let path = format!("auth.secret_keys[{i}]");
        if k.id.is_empty()
            || k.id.len() > 16
            || !k
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            cx.err(
                format!("{path}.id"),
                "must be 1-16 characters of a-z, A-Z, 0-9, - or _",
            );
        } else if secret_keys.iter().any(|(id, _)| id == &k.id) {
            cx.err(format!("{path}.id"), format!("`{}` is used twice", k.id));
        }
        let raw =
            cx.secret_file_or_env(&path, ["file", "env"], k.file.as_deref(), k.env.as_deref());
        if let Some(raw) = raw {
            match key_bytes(&raw) {
                Some(key) => secret_keys.push((k.id.clone(), key)),
                None => cx.err(
                    path.clone(),
                    "the key must be 32 bytes in base64 (`imapgate keys generate` makes one)",
                ),
            }
        }
    }
    let active_key = match (&a.active_key, secret_keys.len()) {
        (Some(id), _) => {
            if !a.secret_keys.iter().any(|k| &k.id == id) {
                cx.err(
                    "auth.active_key",
                    format!("`{id}` is not in auth.secret_keys"),
                );
            }
            Some(id.clone())
        }
        (None, 0) => None,
        (None, 1) => secret_keys.first().map(|(id, _)| id.clone()),
        (None, _) => {
            cx.err(
                "auth.active_key",
                "is required when there is more than one key",
            );
            None
        }
    };
    let d = super::MfaConfig::default();
    let mfa = super::MfaConfig {
        default: a.mfa.default.unwrap_or(d.default),
        code_digits: a.mfa.code_digits.unwrap_or(d.code_digits),
        unlock_ttl: cx.duration(
            a.mfa.unlock_ttl.as_ref(),
            "auth.mfa.unlock_ttl",
            d.unlock_ttl,
        ),
        unlock_bind_subnet: a.mfa.unlock_bind_subnet.unwrap_or(d.unlock_bind_subnet),
        issuer: a.mfa.issuer.clone().unwrap_or(d.issuer),
        approval: approval(cx, &a.mfa),
    };
    if !(6..=8).contains(&mfa.code_digits) {
        cx.err("auth.mfa.code_digits", "must be 6, 7 or 8");
    }
    if mfa.unlock_ttl > Duration::from_secs(30 * 86_400) {
        cx.err("auth.mfa.unlock_ttl", "must be at most 30d");
    }
    if mfa.issuer.is_empty() || mfa.issuer.contains(':') || mfa.issuer.chars().any(char::is_control)
    {
        cx.err("auth.mfa.issuer", "must be a non-empty name without ':'");
    }
    if mfa.default != super::MfaMode::Off && secret_keys.is_empty() {
        cx.warnings.push(
            "auth.secret_keys is empty: no user can enrol TOTP (and with mfa.default: required nobody can log in)".into(),
        );
    }
    let verified_cache_ttl = cx.duration(
        a.verified_cache_ttl.as_ref(),
        "auth.verified_cache_ttl",
        defaults::VERIFIED_CACHE_TTL,
    );
    if verified_cache_ttl > Duration::from_secs(3600) {
        cx.err("auth.verified_cache_ttl", "must be at most 1h");
    }
    let max_app_passwords_per_user = match a.max_app_passwords_per_user {
        None => defaults::MAX_APP_PASSWORDS_PER_USER,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(_) => {
            cx.err(
                "auth.max_app_passwords_per_user",
                "must be between 1 and 1000",
            );
            defaults::MAX_APP_PASSWORDS_PER_USER
        }
    };
    Some(AuthConfig {
        users_file: a
            .users_file
            .as_deref()
            .map(|f| cx.path(f))
            .unwrap_or_default(),
        store,
        secret_keys,
        active_key,
        argon2,
        mfa,
        verified_cache_ttl,
        failure_floor,
        revoke_closes_sessions: a.revoke_closes_sessions,
        oauth_issuers: issuers(cx, &a.oauth),
        unicode_names: a.unicode_names,
        max_app_passwords_per_user,
        allow_group_readable_secrets: a.allow_group_readable_secrets,
    })
}

/// Algorithms an issuer may use; HMAC and `none` are never possible.
const JWS_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// `http://` is accepted only for loopback hosts (tests, a local IdP); everything else is HTTPS.
pub(super) fn url_ok(u: &str) -> bool {
    if u.starts_with("https://") {
        return u.len() > "https://".len();
    }
    let Some(rest) = u.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `auth.mfa.approval` and its settings (the portal and the unlock rules it needs are checked
/// once every section is read).
fn approval(cx: &mut Ctx, m: &raw::Mfa) -> Option<super::ApprovalConfig> {
    let named = match &m.approval {
        None | Some(raw::Approval::Flag(false)) => None,
        Some(raw::Approval::Flag(true)) => Some("true"),
        Some(raw::Approval::Name(n)) => Some(n.as_str()),
    };
    match named {
        None | Some("off") => {
            if m.approval_webhook_url.is_some() {
                cx.err(
                    "auth.mfa.approval_webhook_url",
                    "is used only with approval: portal",
                );
            }
            return None;
        }
        Some("portal") => {}
        Some(other) => {
            cx.err(
                "auth.mfa.approval",
                format!("`{other}` is not off or portal"),
            );
            return None;
        }
    }
    let ttl = cx.duration(
        m.approval_ttl.as_ref(),
        "auth.mfa.approval_ttl",
        Duration::from_secs(600),
    );
    if ttl < Duration::from_secs(30) || ttl > Duration::from_secs(3600) {
        cx.err("auth.mfa.approval_ttl", "must be between 30s and 1h");
    }
    let max_pending = m.approval_max_pending.unwrap_or(3);
    if !(1..=20).contains(&max_pending) {
        cx.err("auth.mfa.approval_max_pending", "must be between 1 and 20");
    }
    let per_source = m.approval_per_source.unwrap_or(10);
    if !(1..=1000).contains(&per_source) {
        cx.err("auth.mfa.approval_per_source", "must be between 1 and 1000");
    }
    let webhook_url = m.approval_webhook_url.clone();
    if let Some(u) = &webhook_url {
        if !url_ok(u) {
            cx.err(
                "auth.mfa.approval_webhook_url",
                "must be an https:// URL (http:// only for loopback)",
            );
        }
    }
    let webhook_secret = match (
        &webhook_url,
        &m.approval_webhook_secret_file,
        &m.approval_webhook_secret_env,
    ) {
        (None, None, None) => None,
        (None, _, _) => {
            cx.err(
                "auth.mfa.approval_webhook_secret_file",
                "is used only with approval_webhook_url",
            );
            None
        }
        (Some(_), f, e) => cx.secret_file_or_env(
            "auth.mfa",
            [
                "approval_webhook_secret_file",
                "approval_webhook_secret_env",
            ],
            f.as_deref(),
            e.as_deref(),
        ),
    };
    Some(super::ApprovalConfig {
        ttl,
        max_pending,
        per_source,
        webhook_url,
        webhook_secret,
    })
}

fn issuers(cx: &mut Ctx, o: &raw::OAuth) -> Vec<super::IssuerConfig> {
    let mut out: Vec<super::IssuerConfig> = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in o.issuers.iter().enumerate() {
        let path = format!("auth.oauth.issuers[{i}]");
        cx.unique_name(&path, &r.name, &mut names);
        if !url_ok(&r.issuer) {
            cx.err(
                format!("{path}.issuer"),
                "must be an https:// URL (http:// only for loopback)",
            );
        }
        let discovery = r.discovery.unwrap_or(r.jwks_uri.is_none());
        match (&r.jwks_uri, discovery) {
            (Some(u), false) if !url_ok(u) => cx.err(
                format!("{path}.jwks_uri"),
                "must be an https:// URL (http:// only for loopback)",
            ),
            (Some(_), true) => cx.err(
                format!("{path}.jwks_uri"),
                "give either discovery: true or jwks_uri",
            ),
            (None, false) => cx.err(
                format!("{path}.discovery"),
                "without discovery, jwks_uri is required",
            ),
            _ => {}
        }
        let ca_file = r.ca_file.as_deref().map(|f| cx.path(f));
        if let Some(p) = &ca_file {
            if let Err(e) = std::fs::metadata(p) {
                cx.err(
                    format!("{path}.ca_file"),
                    format!("cannot read {}: {e}", p.display()),
                );
            }
        }
        if r.audiences.is_empty() {
            cx.err(
                format!("{path}.audiences"),
                "needs at least one audience (the token's aud must be one of them)",
            );
        }
        let algorithms = r.algorithms.clone().unwrap_or_else(|| {
            vec![
                "RS256".into(),
                "ES256".into(),
                "PS256".into(),
                "EdDSA".into(),
            ]
        });
        for a in &algorithms {
            if !JWS_ALGORITHMS.contains(&a.as_str()) {
                cx.err(
                    format!("{path}.algorithms"),
                    format!("`{a}` is not one of {}", JWS_ALGORITHMS.join(", ")),
                );
            }
        }
        let user_claim = r.user_claim.clone().unwrap_or_else(|| "email".into());
        if !["email", "preferred_username", "upn", "sub", "unique_name"]
            .contains(&user_claim.as_str())
        {
            cx.err(
                format!("{path}.user_claim"),
                "must be email, preferred_username, upn, unique_name or sub",
            );
        }
        let domains = issuer_domains(cx, r, &path, &out);
        let require_email_verified = r.require_email_verified.unwrap_or(true);
        if !require_email_verified && user_claim == "email" {
            cx.warnings.push(format!(
                "{path}.require_email_verified is false: a token whose email address the provider has not verified can open that mailbox"
            ));
        }
        let leeway = cx.duration(
            r.leeway.as_ref(),
            &format!("{path}.leeway"),
            Duration::from_secs(60),
        );
        if leeway > Duration::from_secs(300) {
            cx.err(format!("{path}.leeway"), "must be at most 5m");
        }
        let key_refresh_interval = cx.duration(
            r.key_refresh_interval.as_ref(),
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
        out.push(super::IssuerConfig {
            name: r.name.clone(),
            issuer: r.issuer.clone(),
            jwks_uri: if discovery { None } else { r.jwks_uri.clone() },
            ca_file,
            audiences: r.audiences.clone(),
            algorithms,
            user_claim,
            user_domain: r.user_domain.as_ref().map(|d| d.to_ascii_lowercase()),
            required_scopes: r.required_scopes.clone(),
            require_amr: r.require_amr.clone(),
            require_acr: r.require_acr.clone(),
            accept_id_tokens: r.accept_id_tokens.unwrap_or(false),
            leeway,
            key_refresh_interval,
            end_session_at_expiry: r.end_session_at_expiry,
            introspection: r.introspection.as_ref().and_then(|x| {
                let ipath = format!("{path}.introspection");
                if let Some(e) = &x.endpoint {
                    if !url_ok(e) {
                        cx.err(
                            format!("{ipath}.endpoint"),
                            "must be an https:// URL (http:// only for loopback)",
                        );
                    }
                } else if !discovery {
                    cx.err(format!("{ipath}.endpoint"), "is required without discovery");
                }
                let secret = cx.secret_file_or_env(
                    &ipath,
                    ["client_secret_file", "client_secret_env"],
                    x.client_secret_file.as_deref(),
                    x.client_secret_env.as_deref(),
                );
                let cache_ttl = cx.duration(
                    x.cache_ttl.as_ref(),
                    &format!("{ipath}.cache_ttl"),
                    Duration::from_secs(60),
                );
                if cache_ttl > Duration::from_secs(3600) {
                    cx.err(format!("{ipath}.cache_ttl"), "must be at most 1h");
                }
                Some(super::IntrospectionConfig {
                    endpoint: x.endpoint.clone(),
                    client_id: x.client_id.clone(),
                    client_secret: secret?,
                    cache_ttl,
                })
            }),
            domains,
            require_email_verified,
        });
    }
    let introspecting = out.iter().filter(|i| i.introspection.is_some());
    let open = introspecting
        .clone()
        .filter(|i| i.domains.is_empty())
        .count();
    if open >= 2 {
        cx.warnings.push(format!(
            "auth.oauth.issuers: {open} issuers introspect opaque tokens without listing `domains`; an opaque token for a domain no issuer lists is refused (it is sent to one issuer only, and none can be chosen)"
        ));
    }
    out
}

/// An issuer's `domains`: lower-case ASCII domain names, each once. Two issuers with
/// introspection that list the same domain make opaque tokens for it ambiguous (refused).
fn issuer_domains(
    cx: &mut Ctx,
    r: &raw::Issuer,
    path: &str,
    earlier: &[super::IssuerConfig],
) -> Vec<String> {
    let mut domains: Vec<String> = Vec::new();
    for (j, d) in r.domains.iter().enumerate() {
        let d = d.to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if d.len() > 253 || !d.split('.').all(label_ok) {
            cx.err(
                format!("{path}.domains[{j}]"),
                "must be a domain name in ASCII (an internationalised one in its xn-- form)",
            );
        } else if domains.contains(&d) {
            cx.err(
                format!("{path}.domains[{j}]"),
                format!("`{d}` is listed twice"),
            );
        } else {
            if r.introspection.is_some() {
                if let Some(other) = earlier
                    .iter()
                    .find(|o| o.introspection.is_some() && o.domains.contains(&d))
                {
                    cx.warnings.push(format!(
                        "{path}.domains: `{d}` is also listed by issuer `{}`; both introspect opaque tokens, so an opaque token for {d} is refused (no issuer can be chosen)",
                        other.name
                    ));
                }
            }
            domains.push(d);
        }
    }
    domains
}

/// A 32-byte key written as base64 text (one line).
pub(super) fn key_bytes(raw: &Secret) -> Option<Secret> {
    use base64::Engine;
    let text = raw.expose_str()?.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    (bytes.len() == 32).then(|| Secret::new(bytes))
}

/// `auth.store`: the backend (a users file alone means `file`; nothing at all means the
/// embedded SQLite database), its connection, and the per-replica cache.
fn store(cx: &mut Ctx, a: &raw::Auth) -> super::StoreConfig {
    use super::StoreBackend;
    let s = &a.store;
    let backend = s.backend.unwrap_or(if a.users_file.is_some() {
        StoreBackend::File
    } else {
        StoreBackend::Sqlite
    });
    match (backend, a.users_file.is_some()) {
        (StoreBackend::File, false) => {
            cx.err("auth.users_file", "is required with auth.store.backend: file");
        }
        (StoreBackend::Sqlite | StoreBackend::Postgres, true) => cx.err(
            "auth.users_file",
            format!(
                "is only for auth.store.backend: file; move its users into the {} store with `imapgate users import FILE`",
                backend.as_str()
            ),
        ),
        _ => {}
    }
    let postgres = match (&s.postgres, backend) {
        (Some(p), StoreBackend::Postgres) => postgres(cx, p),
        (None, StoreBackend::Postgres) => {
            cx.err(
                "auth.store.postgres",
                "is required with backend: postgres (url_file or url_env)",
            );
            None
        }
        (Some(_), _) => {
            cx.err("auth.store.postgres", "is only read with backend: postgres");
            None
        }
        (None, _) => None,
    };
    let cache_ttl = cx.duration(
        s.cache_ttl.as_ref(),
        "auth.store.cache_ttl",
        defaults::STORE_CACHE_TTL,
    );
    if cache_ttl > Duration::from_secs(3600) {
        cx.err("auth.store.cache_ttl", "must be at most 1h");
    }
    let poll_interval = cx.duration(
        s.poll_interval.as_ref(),
        "auth.store.poll_interval",
        defaults::STORE_POLL_INTERVAL,
    );
    if poll_interval < Duration::from_millis(100) || poll_interval > Duration::from_secs(60) {
        cx.err("auth.store.poll_interval", "must be between 100ms and 60s");
    }
    super::StoreConfig {
        backend,
        sqlite_path: cx.path(s.sqlite.path.as_deref().unwrap_or(defaults::SQLITE_PATH)),
        postgres,
        on_error: s.on_error.unwrap_or_default(),
        cache_ttl,
        poll_interval,
    }
}

fn postgres(cx: &mut Ctx, p: &raw::Postgres) -> Option<super::PostgresConfig> {
    let url = cx.secret_file_or_env(
        "auth.store.postgres",
        ["url_file", "url_env"],
        p.url_file.as_deref(),
        p.url_env.as_deref(),
    );
    if let Some(u) = &url {
        let text = u.expose_str().unwrap_or("");
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            // Never echo the URL: it may hold a password.
            cx.err(
                "auth.store.postgres.url_file",
                "the URL must start with postgres:// or postgresql://",
            );
        }
    }
    let ca_file = p.ca_file.as_deref().map(|f| cx.path(f));
    if let Some(f) = &ca_file {
        if !f.is_file() {
            cx.err(
                "auth.store.postgres.ca_file",
                format!("cannot read {}", f.display()),
            );
        }
    }
    let pool_size = cx.count(
        p.pool_size,
        "auth.store.postgres.pool_size",
        defaults::STORE_POOL_SIZE,
    );
    if !(1..=256).contains(&pool_size) {
        cx.err("auth.store.postgres.pool_size", "must be between 1 and 256");
    }
    let statement_timeout = cx.duration(
        p.statement_timeout.as_ref(),
        "auth.store.postgres.statement_timeout",
        defaults::STORE_STATEMENT_TIMEOUT,
    );
    if statement_timeout < Duration::from_millis(100) || statement_timeout > Duration::from_secs(60)
    {
        cx.err(
            "auth.store.postgres.statement_timeout",
            "must be between 100ms and 60s",
        );
    }
    Some(super::PostgresConfig {
        url: url?,
        ca_file,
        pool_size,
        statement_timeout,
    })
}
