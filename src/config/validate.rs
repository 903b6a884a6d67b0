//! Stage two: raw YAML → typed [`Config`], collecting every problem with its YAML path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::units::{parse_duration, parse_size, Scalar};
use super::{
    defaults, raw, AdminConfig, Argon2Params, AuditSink, AuthConfig, BackendConfig, BackendLogin,
    CertificatePaths, Config, ConfigError, FieldError, Limits, ListenerConfig, LogFormat,
    LoggingConfig, Routes, StateConfig, TlsConfig,
};
use crate::secret::Secret;

const SECTIONS: &[&str] = &[
    "listeners",
    "tls",
    "limits",
    "auth",
    "state",
    "guard",
    "backends",
    "routes",
    "admin",
    "logging",
];

pub(super) struct Ctx<'a> {
    base: &'a Path,
    errors: Vec<FieldError>,
    warnings: Vec<String>,
    /// Secret files read, with their YAML paths: their modes are checked at the end, once
    /// `auth.allow_group_readable_secrets` is known.
    secret_files: Vec<(String, PathBuf)>,
}

impl Ctx<'_> {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn decode<T: DeserializeOwned>(&mut self, v: &Value, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let full = match inner.as_str() {
                    "." | "" => path.to_owned(),
                    p if p.starts_with('[') => format!("{path}{p}"),
                    p => format!("{path}.{p}"),
                };
                self.err(full, e.into_inner().to_string());
                None
            }
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn duration(
        &mut self,
        v: Option<&Scalar>,
        path: &str,
        default: Duration,
    ) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(&s.0).unwrap_or_else(|m| {
                self.err(path, m);
                default
            }),
        }
    }

    fn size(
        &mut self,
        v: Option<&Scalar>,
        path: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> usize {
        let Some(s) = v else { return default };
        match parse_size(&s.0) {
            Ok(n) if (min as u64..=max as u64).contains(&n) => {
                usize::try_from(n).unwrap_or(default)
            }
            Ok(_) => {
                self.err(path, format!("must be between {min} and {max} bytes"));
                default
            }
            Err(m) => {
                self.err(path, m);
                default
            }
        }
    }

    pub(super) fn count(&mut self, v: Option<u32>, path: &str, default: u32) -> u32 {
        match v {
            Some(0) => {
                self.err(path, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    /// Reads a secret from a file: one value, a trailing newline ignored, never empty, at most
    /// [`MAX_SECRET_FILE`] bytes (a path such as /dev/zero must not exhaust memory).
    fn secret_file(&mut self, file: &str, path: &str) -> Option<Secret> {
        let full = self.path(file);
        match read_bounded(&full, MAX_SECRET_FILE) {
            Ok(None) => {
                self.err(
                    path,
                    format!("{} is larger than {MAX_SECRET_FILE} bytes", full.display()),
                );
                None
            }
            Ok(Some(mut bytes)) => {
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                let s = Secret::new(bytes);
                if s.is_empty() {
                    self.err(path, format!("{} is empty", full.display()));
                    None
                } else {
                    self.secret_files.push((path.to_owned(), full));
                    Some(s)
                }
            }
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }
}

/// The largest secret file the config accepts (a password, a token or a Redis URL).
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads at most `limit` bytes; `None` when the file holds more.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

pub(super) fn from_yaml(text: &str, base: &Path) -> Result<Config, ConfigError> {
    let mut cx = Ctx {
        base,
        errors: Vec::new(),
        warnings: Vec::new(),
        secret_files: Vec::new(),
    };
    let root: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid YAML").to_owned();
            return Err(ConfigError::Invalid(vec![FieldError {
                path: "(file)".into(),
                message: first,
            }]));
        }
    };
    let Value::Object(map) = root else {
        return Err(ConfigError::Invalid(vec![FieldError {
            path: "(file)".into(),
            message: "the top level must be a mapping of sections".into(),
        }]));
    };
    for key in map.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            cx.err(
                key.clone(),
                format!("unknown section; expected one of {}", SECTIONS.join(", ")),
            );
        }
    }
    let null = Value::Null;
    let section = |k: &str| map.get(k).unwrap_or(&null);

    let listeners = listeners(&mut cx, section("listeners"));
    let tls = tls(&mut cx, section("tls"));
    let limits = limits(&mut cx, section("limits"));
    let auth = auth(&mut cx, section("auth"));
    let state = state(&mut cx, section("state"));
    let guard = super::guard::guard(&mut cx, section("guard"));
    if guard.tarpit_max >= limits.preauth_total_timeout {
        cx.warnings.push(format!(
            "guard.tarpit.max ({:?}) is not shorter than limits.preauth_total_timeout ({:?}): a client held that long is closed with BYE instead of a NO",
            guard.tarpit_max, limits.preauth_total_timeout
        ));
    }
    if !guard.enforce {
        cx.warnings
            .push("guard.enforce is false: the guard only logs and counts (dry run)".into());
    }
    for (i, l) in listeners.iter().enumerate() {
        if l.proxy_protocol && guard.trusted_proxies.is_empty() {
            cx.err(
                format!("listeners[{i}].proxy_protocol"),
                "needs guard.trusted_proxies: a PROXY header is believed only from them",
            );
        }
    }
    let backends = backends(&mut cx, section("backends"));
    let routes = routes(&mut cx, section("routes"), &backends);
    let admin = admin(&mut cx, section("admin"));
    let logging = logging(&mut cx, section("logging"));
    let allow_group = auth
        .as_ref()
        .is_some_and(|a| a.allow_group_readable_secrets);
    for (path, file) in std::mem::take(&mut cx.secret_files) {
        match super::file_mode::check(&file, allow_group) {
            Ok(None) => {}
            Ok(Some(w)) => cx.warnings.push(format!("{path}: {w}")),
            Err(e) => cx.err(path, e),
        }
    }

    if !cx.errors.is_empty() {
        return Err(ConfigError::Invalid(cx.errors));
    }
    match (auth, routes) {
        (Some(auth), Some(routes)) => Ok(Config {
            listeners,
            tls,
            limits,
            auth,
            state,
            guard,
            backends,
            routes,
            admin,
            logging,
            warnings: cx.warnings,
            source: None,
        }),
        // Unreachable in practice: a missing section always records an error above.
        _ => Err(ConfigError::Invalid(vec![FieldError {
            path: "(file)".into(),
            message: "incomplete configuration".into(),
        }])),
    }
}

fn items<'v>(cx: &mut Ctx, v: &'v Value, path: &str, required: bool) -> &'v [Value] {
    match v {
        Value::Array(a) if !a.is_empty() || !required => a,
        Value::Array(_) => {
            cx.err(path, "needs at least one entry");
            &[]
        }
        Value::Null if required => {
            cx.err(path, "is required");
            &[]
        }
        Value::Null => &[],
        _ => {
            cx.err(path, "must be a list");
            &[]
        }
    }
}

fn listeners(cx: &mut Ctx, v: &Value) -> Vec<ListenerConfig> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for (i, item) in items(cx, v, "listeners", true).iter().enumerate() {
        let path = format!("listeners[{i}]");
        let Some(l) = cx.decode::<raw::Listener>(item, &path) else {
            continue;
        };
        if !valid_name(&l.name) {
            cx.err(
                format!("{path}.name"),
                "must be 1-32 characters of a-z, 0-9, - or _",
            );
        } else if !names.insert(l.name.clone()) {
            cx.err(
                format!("{path}.name"),
                format!("`{}` is used twice", l.name),
            );
        }
        match l.address.parse::<SocketAddr>() {
            Ok(a) => {
                if a.port() != 0 && !addrs.insert(a) {
                    cx.err(format!("{path}.address"), format!("{a} is used twice"));
                }
                out.push(ListenerConfig {
                    name: l.name,
                    address: a,
                    tls: l.tls,
                    proxy_protocol: l.proxy_protocol,
                });
            }
            Err(_) => cx.err(
                format!("{path}.address"),
                format!("`{}` is not an IP:port such as [::]:993", l.address),
            ),
        }
    }
    out
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn tls(cx: &mut Ctx, v: &Value) -> TlsConfig {
    let t: raw::Tls = if v.is_null() {
        raw::Tls::default()
    } else {
        cx.decode(v, "tls").unwrap_or_default()
    };
    let mut certificates = Vec::new();
    for (i, c) in t.certificates.iter().enumerate() {
        for (key, file) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
            let p = cx.path(file);
            if let Err(e) = std::fs::metadata(&p) {
                cx.err(
                    format!("tls.certificates[{i}].{key}"),
                    format!("cannot read {}: {e}", p.display()),
                );
            }
        }
        certificates.push(CertificatePaths {
            cert_file: cx.path(&c.cert_file),
            key_file: cx.path(&c.key_file),
        });
    }
    if t.self_signed && !t.certificates.is_empty() {
        cx.err(
            "tls.self_signed",
            "cannot be combined with tls.certificates",
        );
    } else if !t.self_signed && t.certificates.is_empty() {
        cx.err(
            "tls.certificates",
            "needs at least one certificate (or tls.self_signed: true, for development only)",
        );
    }
    if t.self_signed {
        cx.warnings.push(
            "tls.self_signed is on: clients will see an untrusted certificate (development only)"
                .into(),
        );
    }
    let tls13_only = match t.min_version.as_deref() {
        None | Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            cx.err(
                "tls.min_version",
                format!("`{other}` is not \"1.2\" or \"1.3\""),
            );
            false
        }
    };
    TlsConfig {
        certificates,
        tls13_only,
        self_signed: t.self_signed,
    }
}

fn limits(cx: &mut Ctx, v: &Value) -> Limits {
    let d = Limits::default();
    let r: raw::Limits = if v.is_null() {
        raw::Limits::default()
    } else {
        cx.decode(v, "limits").unwrap_or_default()
    };
    let l = Limits {
        max_connections: cx.count(
            r.max_connections,
            "limits.max_connections",
            d.max_connections,
        ),
        max_preauth_per_ip: cx.count(
            r.max_preauth_per_ip,
            "limits.max_preauth_per_ip",
            d.max_preauth_per_ip,
        ),
        max_sessions_per_ip: cx.count(
            r.max_sessions_per_ip,
            "limits.max_sessions_per_ip",
            d.max_sessions_per_ip,
        ),
        max_sessions_per_user: cx.count(
            r.max_sessions_per_user,
            "limits.max_sessions_per_user",
            d.max_sessions_per_user,
        ),
        line_bytes: cx.size(
            r.line_bytes.as_ref(),
            "limits.line_bytes",
            d.line_bytes,
            1024,
            64 * 1024,
        ),
        literal_bytes: cx.size(
            r.literal_bytes.as_ref(),
            "limits.literal_bytes",
            d.literal_bytes,
            256,
            64 * 1024,
        ),
        sasl_bytes: cx.size(
            r.sasl_bytes.as_ref(),
            "limits.sasl_bytes",
            d.sasl_bytes,
            1024,
            128 * 1024,
        ),
        tls_handshake_timeout: cx.duration(
            r.tls_handshake_timeout.as_ref(),
            "limits.tls_handshake_timeout",
            d.tls_handshake_timeout,
        ),
        preauth_idle_timeout: cx.duration(
            r.preauth_idle_timeout.as_ref(),
            "limits.preauth_idle_timeout",
            d.preauth_idle_timeout,
        ),
        preauth_total_timeout: cx.duration(
            r.preauth_total_timeout.as_ref(),
            "limits.preauth_total_timeout",
            d.preauth_total_timeout,
        ),
        bad_commands_before_bye: cx.count(
            r.bad_commands_before_bye,
            "limits.bad_commands_before_bye",
            d.bad_commands_before_bye,
        ),
        auth_failures_per_connection: cx.count(
            r.auth_failures_per_connection,
            "limits.auth_failures_per_connection",
            d.auth_failures_per_connection,
        ),
        relay_idle_timeout: cx.duration(
            r.relay_idle_timeout.as_ref(),
            "limits.relay_idle_timeout",
            d.relay_idle_timeout,
        ),
        max_session_lifetime: cx.duration(
            r.max_session_lifetime.as_ref(),
            "limits.max_session_lifetime",
            d.max_session_lifetime,
        ),
        shutdown_delay: cx.duration(
            r.shutdown_delay.as_ref(),
            "limits.shutdown_delay",
            d.shutdown_delay,
        ),
        shutdown_grace: cx.duration(
            r.shutdown_grace.as_ref(),
            "limits.shutdown_grace",
            d.shutdown_grace,
        ),
    };
    for (name, value) in [
        ("tls_handshake_timeout", l.tls_handshake_timeout),
        ("preauth_idle_timeout", l.preauth_idle_timeout),
        ("preauth_total_timeout", l.preauth_total_timeout),
        ("max_session_lifetime", l.max_session_lifetime),
    ] {
        if value.is_zero() {
            cx.err(format!("limits.{name}"), "must be more than 0");
        }
    }
    // Upper bounds keep every deadline computable (and sane).
    for (name, value, max, shown) in [
        ("tls_handshake_timeout", l.tls_handshake_timeout, 300, "5m"),
        ("preauth_idle_timeout", l.preauth_idle_timeout, 3600, "1h"),
        ("preauth_total_timeout", l.preauth_total_timeout, 3600, "1h"),
        ("relay_idle_timeout", l.relay_idle_timeout, 86_400, "24h"),
        (
            "max_session_lifetime",
            l.max_session_lifetime,
            30 * 86_400,
            "30d",
        ),
        ("shutdown_delay", l.shutdown_delay, 3600, "1h"),
        ("shutdown_grace", l.shutdown_grace, 3600, "1h"),
    ] {
        if value > Duration::from_secs(max) {
            cx.err(format!("limits.{name}"), format!("must be at most {shown}"));
        }
    }
    if l.relay_idle_timeout < defaults::RELAY_IDLE_MINIMUM {
        cx.err(
            "limits.relay_idle_timeout",
            "must be at least 30m (IDLE clients re-issue IDLE every 29 minutes, RFC 2177)",
        );
    }
    if l.sasl_bytes < l.line_bytes {
        cx.err("limits.sasl_bytes", "must be at least limits.line_bytes");
    }
    l
}

fn auth(cx: &mut Ctx, v: &Value) -> Option<AuthConfig> {
    if v.is_null() {
        cx.err("auth", "is required (at least auth.users_file)");
        return None;
    }
    let a: raw::Auth = cx.decode(v, "auth")?;
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
        let raw = match (&k.file, &k.env) {
            (Some(f), None) => cx.secret_file(f, &format!("{path}.file")),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::from(v)),
                _ => {
                    cx.err(
                        format!("{path}.env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            _ => {
                cx.err(path.clone(), "needs exactly one of file or env");
                None
            }
        };
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
        users_file: cx.path(&a.users_file),
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
fn url_ok(u: &str) -> bool {
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

fn issuers(cx: &mut Ctx, o: &raw::OAuth) -> Vec<super::IssuerConfig> {
    let mut out: Vec<super::IssuerConfig> = Vec::new();
    for (i, r) in o.issuers.iter().enumerate() {
        let path = format!("auth.oauth.issuers[{i}]");
        if !valid_name(&r.name) {
            cx.err(
                format!("{path}.name"),
                "must be 1-32 characters of a-z, 0-9, - or _",
            );
        } else if out.iter().any(|x| x.name == r.name) {
            cx.err(
                format!("{path}.name"),
                format!("`{}` is used twice", r.name),
            );
        }
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
                let secret = match (&x.client_secret_file, &x.client_secret_env) {
                    (Some(f), None) => cx.secret_file(f, &format!("{ipath}.client_secret_file")),
                    (None, Some(var)) => match std::env::var(var) {
                        Ok(v) if !v.is_empty() => Some(Secret::from(v)),
                        _ => {
                            cx.err(
                                format!("{ipath}.client_secret_env"),
                                format!("environment variable {var} is not set"),
                            );
                            None
                        }
                    },
                    _ => {
                        cx.err(
                            ipath.clone(),
                            "needs exactly one of client_secret_file or client_secret_env",
                        );
                        None
                    }
                };
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
fn key_bytes(raw: &Secret) -> Option<Secret> {
    use base64::Engine;
    let text = raw.expose_str()?.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    (bytes.len() == 32).then(|| Secret::new(bytes))
}

fn state(cx: &mut Ctx, v: &Value) -> StateConfig {
    let d = StateConfig::default();
    if v.is_null() {
        return d;
    }
    let Some(s) = cx.decode::<raw::State>(v, "state") else {
        return d;
    };
    let max_entries = match s.max_entries {
        None => d.max_entries,
        Some(n) if n >= 1000 => n as usize,
        Some(_) => {
            cx.err("state.max_entries", "must be at least 1000");
            d.max_entries
        }
    };
    let backend = s.backend.unwrap_or(d.backend);
    let redis = match (backend, s.redis) {
        (raw::StateBackend::Redis, None) => {
            cx.err("state.redis", "is required with backend: redis");
            None
        }
        (raw::StateBackend::Redis, Some(r)) => redis(cx, r),
        (raw::StateBackend::Memory, Some(_)) => {
            cx.warnings
                .push("state.redis is set but state.backend is memory: Redis is not used".into());
            None
        }
        (raw::StateBackend::Memory, None) => None,
    };
    StateConfig {
        backend,
        max_entries,
        redis,
    }
}

fn redis(cx: &mut Ctx, r: raw::Redis) -> Option<super::RedisConfig> {
    let url = match (&r.url_file, &r.url_env) {
        (Some(f), None) => cx.secret_file(f, "state.redis.url_file"),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::from(v)),
            _ => {
                cx.err(
                    "state.redis.url_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        _ => {
            cx.err(
                "state.redis",
                "needs exactly one of url_file or url_env (the URL may hold a password)",
            );
            None
        }
    };
    if let Some(u) = &url {
        let text = u.expose_str().unwrap_or("");
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            // Never echo the URL: it may hold a password.
            cx.err(
                "state.redis.url_file",
                "the URL must start with redis:// or rediss:// (TLS)",
            );
        } else if text.starts_with("redis://") && !redis_host_is_loopback(text) {
            cx.warnings.push(
                "state.redis: redis:// sends the password and the state in cleartext; use rediss:// unless Redis is on a trusted network".into(),
            );
        }
    }
    let key_prefix = r
        .key_prefix
        .unwrap_or_else(|| defaults::REDIS_KEY_PREFIX.to_owned());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || key_prefix
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        cx.err(
            "state.redis.key_prefix",
            "must be 1-64 characters without spaces or control characters",
        );
    }
    let timeout = cx.duration(
        r.timeout.as_ref(),
        "state.redis.timeout",
        defaults::REDIS_TIMEOUT,
    );
    if timeout < Duration::from_millis(10) || timeout > Duration::from_secs(10) {
        cx.err("state.redis.timeout", "must be between 10ms and 10s");
    }
    let ca_file = r.ca_file.as_deref().map(|f| cx.path(f));
    if let Some(f) = &ca_file {
        if !f.is_file() {
            cx.err(
                "state.redis.ca_file",
                format!("cannot read {}", f.display()),
            );
        }
    }
    Some(super::RedisConfig {
        url: url?,
        ca_file,
        key_prefix,
        on_error: r.on_error.unwrap_or(raw::OnError::Local),
        timeout,
        allow_eviction: r.allow_eviction.unwrap_or(false),
    })
}

/// `redis://[user:pass@]127.0.0.1…` or `localhost`/`[::1]`.
fn redis_host_is_loopback(url: &str) -> bool {
    let rest = url.trim_start_matches("redis://");
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

/// Splits `host:port` / `[v6]:port`.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ok = !host.is_empty()
        && !host.contains(':') | s.starts_with('[')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
    ok.then(|| (host.to_ascii_lowercase(), port))
}

fn backends(cx: &mut Ctx, v: &Value) -> Vec<BackendConfig> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, item) in items(cx, v, "backends", true).iter().enumerate() {
        let path = format!("backends[{i}]");
        let Some(b) = cx.decode::<raw::Backend>(item, &path) else {
            continue;
        };
        if !valid_name(&b.name) {
            cx.err(
                format!("{path}.name"),
                "must be 1-32 characters of a-z, 0-9, - or _",
            );
        } else if !names.insert(b.name.clone()) {
            cx.err(
                format!("{path}.name"),
                format!("`{}` is used twice", b.name),
            );
        }
        let Some((host, port)) = host_port(&b.address) else {
            cx.err(
                format!("{path}.address"),
                format!("`{}` is not host:port", b.address),
            );
            continue;
        };
        if b.tls == raw::BackendTls::None {
            cx.warnings.push(format!(
                "backend {}: tls is none, the master password crosses the network in clear (trusted networks only)",
                b.name
            ));
            if b.ca_file.is_some() {
                cx.err(format!("{path}.ca_file"), "makes no sense with tls: none");
            }
        }
        let ca_file = b.ca_file.as_deref().map(|f| cx.path(f));
        if let Some(p) = &ca_file {
            if let Err(e) = std::fs::metadata(p) {
                cx.err(
                    format!("{path}.ca_file"),
                    format!("cannot read {}: {e}", p.display()),
                );
            }
        }
        if b.master_user.is_empty()
            || b.master_user
                .bytes()
                .any(|c| c.is_ascii_control() || c == b' ' || c == b'"')
        {
            cx.err(
                format!("{path}.master_user"),
                "must be a non-empty name without spaces, quotes or control characters",
            );
        }
        let login = match b.login {
            raw::LoginMode::MasterUser => {
                let sep = b
                    .master_separator
                    .clone()
                    .unwrap_or_else(|| defaults::MASTER_SEPARATOR.into());
                if sep.len() != 1
                    || sep.bytes().any(|c| {
                        c.is_ascii_control()
                            || c.is_ascii_alphanumeric()
                            || c == b' '
                            || c == b'"'
                            || c == b'\\'
                    })
                {
                    cx.err(
                        format!("{path}.master_separator"),
                        "must be one punctuation character other than quote and backslash",
                    );
                }
                BackendLogin::MasterUser { separator: sep }
            }
            raw::LoginMode::SaslAuthzid => {
                if b.master_separator.is_some() {
                    cx.err(
                        format!("{path}.master_separator"),
                        "only applies to login: master_user",
                    );
                }
                BackendLogin::SaslAuthzid
            }
        };
        let master_password = match (&b.master_password_file, &b.master_password_env) {
            (Some(f), None) => cx.secret_file(f, &format!("{path}.master_password_file")),
            (None, Some(var)) => match std::env::var(var) {
                Ok(val) if !val.is_empty() => Some(Secret::from(val)),
                _ => {
                    cx.err(
                        format!("{path}.master_password_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            _ => {
                cx.err(
                    path.clone(),
                    "needs exactly one of master_password_file or master_password_env",
                );
                None
            }
        };
        let connect_timeout = cx.duration(
            b.connect_timeout.as_ref(),
            &format!("{path}.connect_timeout"),
            defaults::CONNECT_TIMEOUT,
        );
        let login_timeout = cx.duration(
            b.login_timeout.as_ref(),
            &format!("{path}.login_timeout"),
            defaults::LOGIN_TIMEOUT,
        );
        for (k, d) in [
            ("connect_timeout", connect_timeout),
            ("login_timeout", login_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(300) {
                cx.err(format!("{path}.{k}"), "must be more than 0 and at most 5m");
            }
        }
        if let Some(pw) = &master_password {
            if pw.expose_str().is_none()
                || pw.expose().iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
            {
                cx.err(
                    format!("{path}.master_password_file"),
                    "the master password must be UTF-8 without CR, LF or NUL",
                );
            }
        }
        out.push(BackendConfig {
            name: b.name,
            server_name: b
                .server_name
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_else(|| host.clone()),
            host,
            port,
            tls: b.tls,
            ca_file,
            login,
            master_user: b.master_user,
            master_password: master_password.unwrap_or_default(),
            send_id: b.send_id,
            connect_timeout,
            login_timeout,
        });
    }
    out
}

fn routes(cx: &mut Ctx, v: &Value, backends: &[BackendConfig]) -> Option<Routes> {
    if v.is_null() {
        // One backend needs no routing table.
        if backends.len() == 1 {
            return Some(Routes {
                default: 0,
                domains: BTreeMap::new(),
            });
        }
        cx.err("routes", "is required when there is more than one backend");
        return None;
    }
    let r: raw::Routes = cx.decode(v, "routes")?;
    let find = |name: &str| backends.iter().position(|b| b.name == name);
    let default = find(&r.default);
    if default.is_none() {
        cx.err(
            "routes.default",
            format!("`{}` is not a backend name", r.default),
        );
    }
    let mut domains = BTreeMap::new();
    for (domain, name) in &r.domains {
        match find(name) {
            Some(i) => {
                domains.insert(domain.to_ascii_lowercase(), i);
            }
            None => cx.err(
                format!("routes.domains.{domain}"),
                format!("`{name}` is not a backend name"),
            ),
        }
    }
    Some(Routes {
        default: default.unwrap_or(0),
        domains,
    })
}

fn admin(cx: &mut Ctx, v: &Value) -> AdminConfig {
    let a: raw::Admin = if v.is_null() {
        raw::Admin::default()
    } else {
        cx.decode(v, "admin").unwrap_or_default()
    };
    let text = a.address.as_deref().unwrap_or(defaults::ADMIN_ADDRESS);
    let address = text.parse::<SocketAddr>().unwrap_or_else(|_| {
        cx.err("admin.address", format!("`{text}` is not an IP:port"));
        SocketAddr::from(([127, 0, 0, 1], 9190))
    });
    let token = a
        .token_file
        .as_deref()
        .and_then(|f| cx.secret_file(f, "admin.token_file"));
    let health_interval = cx.duration(
        a.health_interval.as_ref(),
        "admin.health_interval",
        defaults::HEALTH_INTERVAL,
    );
    if health_interval < Duration::from_secs(1) {
        cx.err("admin.health_interval", "must be at least 1s");
    }
    AdminConfig {
        address,
        token,
        health_interval,
    }
}

fn logging(cx: &mut Ctx, v: &Value) -> LoggingConfig {
    let l: raw::Logging = if v.is_null() {
        raw::Logging::default()
    } else {
        cx.decode(v, "logging").unwrap_or_default()
    };
    let level = l.level.unwrap_or_else(|| "info".into());
    if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
        cx.err(
            "logging.level",
            format!("`{level}` is not one of error, warn, info, debug, trace"),
        );
    }
    let audit = match l.audit.as_deref() {
        None | Some("stdout") => AuditSink::Stdout,
        Some("stderr") => AuditSink::Stderr,
        Some("") => {
            cx.err("logging.audit", "must be stdout, stderr or a file path");
            AuditSink::Stdout
        }
        Some(p) => AuditSink::File(cx.path(p)),
    };
    LoggingConfig {
        format: l.format.unwrap_or(LogFormat::Text),
        level,
        audit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            host_port("mail.internal:993"),
            Some(("mail.internal".into(), 993))
        );
        assert_eq!(host_port("[::1]:143"), Some(("::1".into(), 143)));
        assert_eq!(host_port("127.0.0.1:143"), Some(("127.0.0.1".into(), 143)));
        for bad in ["mail", "mail:0", "mail:99999", ":143", "::1:143", "a b:1"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn secret_files_are_read_with_a_bound() {
        let dir = std::env::temp_dir().join(format!("imapgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"hunter2\n").unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; MAX_SECRET_FILE as usize + 1]).unwrap();
        let mut cx = Ctx {
            base: &dir,
            errors: Vec::new(),
            warnings: Vec::new(),
            secret_files: Vec::new(),
        };
        let s = cx.secret_file("small", "a").expect("small secret");
        assert_eq!(s.expose(), b"hunter2");
        assert!(cx.secret_file("big", "b").is_none());
        // A device that never ends is refused, not read until memory runs out.
        assert!(cx.secret_file("/dev/zero", "c").is_none());
        let msgs: Vec<String> = cx.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs.iter().all(|m| m.contains("larger than 65536 bytes")),
            "{msgs:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oauth_name_options_and_their_warnings() {
        let yaml = |extra: &str| {
            format!(
                "listeners: [{{ name: imaps, address: \"127.0.0.1:993\", tls: implicit }}]\n\
                 tls: {{ self_signed: true }}\n\
                 auth:\n  users_file: users.yaml\n{extra}\n\
                 backends: [{{ name: b, address: \"mail:993\", tls: implicit, login: master_user, master_user: g, master_password_env: PATH }}]\n\
                 routes: {{ default: b }}\n"
            )
        };
        let issuer = |name: &str, more: &str| {
            format!("      - {{ name: {name}, issuer: \"https://{name}.example\", audiences: [imap]{more} }}\n")
        };
        // Defaults: ASCII names, email_verified required, any domain; no warning.
        let plain = format!("  oauth:\n    issuers:\n{}", issuer("a", ""));
        let c = Config::from_yaml(&yaml(&plain), Path::new(".")).unwrap();
        let i = &c.auth.oauth_issuers[0];
        assert!(!c.auth.unicode_names && i.require_email_verified && i.domains.is_empty());
        assert!(
            !c.warnings.iter().any(|w| w.contains("auth.oauth")),
            "{:?}",
            c.warnings
        );
        // Off, domains lower-cased, a domain two introspecting issuers claim: two warnings.
        let intro = ", introspection: { endpoint: \"https://x.example/i\", client_id: c, client_secret_env: PATH }";
        let text = format!(
            "  unicode_names: true\n  oauth:\n    issuers:\n{}{}",
            issuer(
                "a",
                &format!(", require_email_verified: false, domains: [Example.ORG]{intro}")
            ),
            issuer("b", &format!(", domains: [example.org]{intro}")),
        );
        let c = Config::from_yaml(&yaml(&text), Path::new(".")).unwrap();
        assert!(c.auth.unicode_names);
        let i = &c.auth.oauth_issuers[0];
        assert!(!i.require_email_verified);
        assert_eq!(i.domains, vec!["example.org".to_owned()]);
        let w: Vec<&String> = c
            .warnings
            .iter()
            .filter(|w| w.contains("auth.oauth"))
            .collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("issuers[0].require_email_verified is false"),
            "{w:?}"
        );
        assert!(
            w[1].contains("issuers[1].domains: `example.org` is also listed by issuer `a`"),
            "{w:?}"
        );
        // With another user claim the option does nothing, and says nothing.
        let other = format!(
            "  oauth:\n    issuers:\n{}",
            issuer("a", ", user_claim: upn, require_email_verified: false")
        );
        let c = Config::from_yaml(&yaml(&other), Path::new(".")).unwrap();
        assert!(
            !c.warnings.iter().any(|w| w.contains("auth.oauth")),
            "{:?}",
            c.warnings
        );
    }
}
