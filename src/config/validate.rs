//! Stage two: raw YAML → typed [`Config`], collecting every problem with its YAML path. The
//! sections live beside it: [`super::ctx`] (the context), [`super::auth_section`],
//! [`super::backends`], [`super::guard`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::auth_section::auth;
use super::backends::{backends, routes, state};
use super::ctx::{items, Ctx};
use super::{
    defaults, raw, AdminConfig, AuditSink, CertificatePaths, Config, ConfigError, FieldError,
    Limits, ListenerConfig, LogFormat, LoggingConfig, SyslogConfig, SyslogTransport, TlsConfig,
};

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
    "portal",
];

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
    for (i, l) in listeners.iter().enumerate() {
        if !backends.iter().any(|b| b.protocol == l.protocol) {
            cx.err(
                format!("listeners[{i}].protocol"),
                format!(
                    "no backend speaks {}: add one with protocol: {}",
                    l.protocol.as_str(),
                    l.protocol.as_str()
                ),
            );
        }
    }
    for b in &backends {
        if !listeners.iter().any(|l| l.protocol == b.protocol) {
            cx.warnings.push(format!(
                "backend {}: no listener speaks {}, so it is never used",
                b.name,
                b.protocol.as_str()
            ));
        }
    }
    let admin = admin(&mut cx, section("admin"));
    let logging = logging(&mut cx, section("logging"));
    let portal = super::portal::portal(&mut cx, section("portal"));
    if let Some(m) = auth
        .as_ref()
        .map(|a| &a.mfa)
        .filter(|m| m.approval.is_some())
    {
        if portal.is_none() {
            cx.err(
                "auth.mfa.approval",
                "portal needs the portal section: people approve sign-ins there",
            );
        }
        if !m.unlock_bind_subnet || m.unlock_ttl.is_zero() {
            cx.err(
                "auth.mfa.approval",
                "needs unlock_bind_subnet: true and a non-zero unlock_ttl: an approval opens the app password's unlock window for the network it came from",
            );
        }
    }
    if portal.is_some() && auth.as_ref().is_some_and(|a| a.active_key.is_none()) {
        cx.err(
            "portal",
            "needs auth.secret_keys: its session cookies are encrypted with the key ring",
        );
    }
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
            portal,
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

/// A DNS name as SMTP's greeting and EHLO reply carry it (RFC 5321 §4.1.2 `Domain`).
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The kernel's host name (`/proc/sys/kernel/hostname`), or `localhost`.
fn machine_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| is_host_name(h))
        .unwrap_or_else(|| "localhost".to_owned())
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
        cx.unique_name(&path, &l.name, &mut names);
        match l.address.parse::<SocketAddr>() {
            Ok(a) => {
                if a.port() != 0 && !addrs.insert(a) {
                    cx.err(format!("{path}.address"), format!("{a} is used twice"));
                }
                let hostname = match (&l.hostname, l.protocol) {
                    (Some(_), p) if p != super::Protocol::Smtp => {
                        cx.err(format!("{path}.hostname"), "is for SMTP listeners only");
                        String::new()
                    }
                    (Some(h), _) if !is_host_name(h) => {
                        cx.err(
                            format!("{path}.hostname"),
                            "must be a DNS name (letters, digits, '-' and '.')",
                        );
                        String::new()
                    }
                    (Some(h), _) => h.to_ascii_lowercase(),
                    (None, super::Protocol::Smtp) => machine_host_name(),
                    (None, _) => String::new(),
                };
                out.push(ListenerConfig {
                    name: l.name,
                    address: a,
                    tls: l.tls,
                    protocol: l.protocol,
                    hostname,
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
    // Each field is read from its own name under `limits`, its default taking the place of a
    // missing or invalid value.
    macro_rules! count {
        ($f:ident) => {
            cx.count(r.$f, concat!("limits.", stringify!($f)), d.$f)
        };
    }
    macro_rules! duration {
        ($f:ident) => {
            cx.duration(r.$f.as_ref(), concat!("limits.", stringify!($f)), d.$f)
        };
    }
    macro_rules! size {
        ($f:ident, $min:expr, $max:expr) => {
            cx.size(
                r.$f.as_ref(),
                concat!("limits.", stringify!($f)),
                d.$f,
                $min,
                $max,
            )
        };
    }
    let l = Limits {
        max_connections: count!(max_connections),
        max_preauth_per_ip: count!(max_preauth_per_ip),
        max_sessions_per_ip: count!(max_sessions_per_ip),
        max_sessions_per_user: count!(max_sessions_per_user),
        line_bytes: size!(line_bytes, 1024, 64 * 1024),
        literal_bytes: size!(literal_bytes, 256, 64 * 1024),
        sasl_bytes: size!(sasl_bytes, 1024, 128 * 1024),
        tls_handshake_timeout: duration!(tls_handshake_timeout),
        preauth_idle_timeout: duration!(preauth_idle_timeout),
        preauth_total_timeout: duration!(preauth_total_timeout),
        bad_commands_before_bye: count!(bad_commands_before_bye),
        auth_failures_per_connection: count!(auth_failures_per_connection),
        relay_idle_timeout: duration!(relay_idle_timeout),
        max_session_lifetime: duration!(max_session_lifetime),
        shutdown_delay: duration!(shutdown_delay),
        shutdown_grace: duration!(shutdown_grace),
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
    let mut tokens: Vec<(String, crate::secret::Secret)> = token
        .iter()
        .map(|t| ("admin".to_owned(), t.clone()))
        .collect();
    let mut seen: BTreeSet<String> = tokens.iter().map(|(n, _)| n.clone()).collect();
    for (i, t) in a.tokens.iter().enumerate() {
        let path = format!("admin.tokens[{i}]");
        cx.unique_name(&path, &t.name, &mut seen);
        if let Some(secret) = cx.secret_file(&t.file, &format!("{path}.file")) {
            if secret.expose().len() < 16 {
                cx.err(
                    format!("{path}.file"),
                    "the token must be at least 16 characters",
                );
            }
            tokens.push((t.name.clone(), secret));
        }
    }
    let health_interval = cx.duration(
        a.health_interval.as_ref(),
        "admin.health_interval",
        defaults::HEALTH_INTERVAL,
    );
    if health_interval < Duration::from_secs(1) {
        cx.err("admin.health_interval", "must be at least 1s");
    }
    let r = a.rate_limit.unwrap_or_default();
    let mut limit = |v: Option<u32>, key: &str, default: u32| {
        cx.count(v, &format!("admin.rate_limit.{key}"), default)
    };
    let rate_limit = super::HttpRateLimits {
        per_ip: limit(r.per_ip, "per_ip", defaults::ADMIN_PER_IP),
        burst: limit(r.burst, "burst", defaults::ADMIN_BURST),
        overall: limit(r.overall, "overall", defaults::ADMIN_OVERALL),
        failed_auth: limit(r.failed_auth, "failed_auth", defaults::ADMIN_FAILED_AUTH),
        probes_per_ip: limit(
            r.probes_per_ip,
            "probes_per_ip",
            defaults::ADMIN_PROBES_PER_IP,
        ),
    };
    AdminConfig {
        address,
        token,
        tokens,
        health_interval,
        rate_limit,
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
            cx.err(
                "logging.audit",
                "must be stdout, stderr, syslog or a file path",
            );
            AuditSink::Stdout
        }
        Some("syslog") => AuditSink::Syslog(syslog(cx, l.syslog.unwrap_or_default())),
        Some(p) => AuditSink::File(cx.path(p)),
    };
    if l.audit.as_deref() != Some("syslog") && v.get("syslog").is_some() {
        cx.err("logging.syslog", "is only read with `audit: syslog`");
    }
    LoggingConfig {
        format: l.format.unwrap_or(LogFormat::Text),
        level,
        audit,
        audit_format: l.audit_format.unwrap_or_default(),
    }
}

/// RFC 5424 §6.2.1's facilities, by the names syslog.conf uses.
const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

fn syslog(cx: &mut Ctx, s: raw::Syslog) -> SyslogConfig {
    let address = s.address.unwrap_or_default();
    let host = match address.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
        _ => {
            cx.err(
                "logging.syslog.address",
                "must be host:port (e.g. 127.0.0.1:6514 or syslog.example.org:514)",
            );
            String::new()
        }
    };
    let transport = s.transport.unwrap_or(SyslogTransport::Tcp);
    if transport == SyslogTransport::Tcp && s.ca_file.is_some() {
        cx.err(
            "logging.syslog.ca_file",
            "is only read with `transport: tls`",
        );
    }
    let facility_name = s.facility.unwrap_or_else(|| "authpriv".into());
    let facility = match FACILITIES.iter().find(|(n, _)| *n == facility_name) {
        Some((_, f)) => *f,
        None => {
            cx.err(
                "logging.syslog.facility",
                "must be a facility name: kern, user, mail, daemon, auth, syslog, lpr, news, uucp, cron, authpriv, ftp, local0 … local7",
            );
            10
        }
    };
    let app_name = s.app_name.unwrap_or_else(|| "imapgate".into());
    if app_name.is_empty() || app_name.len() > 48 || !app_name.bytes().all(|b| b.is_ascii_graphic())
    {
        cx.err(
            "logging.syslog.app_name",
            "must be 1 to 48 printable ASCII characters without spaces (RFC 5424 APP-NAME)",
        );
    }
    SyslogConfig {
        server_name: s.server_name.unwrap_or(host),
        address,
        transport,
        ca_file: s.ca_file.map(|p| cx.path(&p)),
        facility,
        app_name,
    }
}

#[cfg(test)]
mod tests {
    use super::super::backends::host_port;
    use super::super::ctx::MAX_SECRET_FILE;
    use super::super::{BackendLogin, Protocol};
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

    /// A config with `listeners` and `backends` (YAML flow sequences' items) and `routes`.
    fn mail_yaml(listeners: &str, backends: &str, routes: &str) -> String {
        format!(
            "listeners: [{listeners}]\n\
             tls: {{ self_signed: true }}\n\
             auth: {{ users_file: users.yaml }}\n\
             backends: [{backends}]\n{routes}"
        )
    }

    const IMAPS: &str = "{ name: imaps, address: \"127.0.0.1:993\", tls: implicit }";
    const DOVECOT: &str = "{ name: dovecot, address: \"mail:993\", tls: implicit, login: master_user, master_user: g, master_password_env: PATH }";
    const POSTFIX: &str =
        "{ name: postfix, protocol: smtp, address: \"mx:10587\", tls: starttls, login: xclient }";

    fn errors(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(e)) => e.iter().map(|e| e.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn listeners_and_backends_by_protocol_with_routes_per_protocol() {
        let smtp = "{ name: sub, protocol: smtp, address: \"127.0.0.1:465\", tls: implicit, hostname: Mail.Example.org }";
        let pop3 = "{ name: pop3s, protocol: pop3, address: \"127.0.0.1:995\", tls: implicit }";
        let pop3_backend = "{ name: d-pop3, protocol: pop3, address: \"mail:995\", tls: implicit, login: master_user, master_user: g, master_password_env: PATH }";
        let sub2 = "{ name: dsub, protocol: smtp, address: \"mail:465\", tls: implicit, login: sasl_authzid, master_user: g, master_password_env: PATH }";
        let c = Config::from_yaml(
            &mail_yaml(
                &format!("{IMAPS}, {smtp}, {pop3}"),
                &format!("{DOVECOT}, {POSTFIX}, {sub2}, {pop3_backend}"),
                "routes: { default: dovecot, smtp: { default: postfix, domains: { Example.NET: dsub } } }\n",
            ),
            Path::new("."),
        )
        .unwrap();
        let l = &c.listeners[1];
        assert_eq!(
            (l.protocol, l.hostname.as_str()),
            (Protocol::Smtp, "mail.example.org")
        );
        assert_eq!(c.listeners[0].protocol, Protocol::Imap);
        assert_eq!(c.backends[1].login, BackendLogin::Xclient);
        assert!(c.backends[1].master_user.is_empty());
        let route = |p, u| c.route(p, u).map(|b| b.name.as_str());
        assert_eq!(route(Protocol::Imap, "a@example.org"), Some("dovecot"));
        assert_eq!(route(Protocol::Smtp, "a@example.org"), Some("postfix"));
        assert_eq!(route(Protocol::Smtp, "a@example.net"), Some("dsub"));
        // One POP3 backend needs no routes.
        assert_eq!(route(Protocol::Pop3, "a@example.net"), Some("d-pop3"));
        // An SMTP listener without a hostname gets the machine's.
        let c = Config::from_yaml(
            &mail_yaml(
                "{ name: s, protocol: smtp, address: \"127.0.0.1:587\", tls: starttls }",
                POSTFIX,
                "",
            ),
            Path::new("."),
        )
        .unwrap();
        assert!(
            is_host_name(&c.listeners[0].hostname),
            "{}",
            c.listeners[0].hostname
        );
        assert!(!c.routes.contains_key(&Protocol::Imap));
    }

    #[test]
    fn protocol_mistakes_are_named() {
        let smtp = "{ name: sub, protocol: smtp, address: \"127.0.0.1:465\", tls: implicit }";
        // An SMTP listener with no SMTP backend.
        let e = errors(&mail_yaml(&format!("{IMAPS}, {smtp}"), DOVECOT, ""));
        assert!(
            e.iter().any(
                |m| m.contains("listeners[1].protocol") && m.contains("no backend speaks smtp")
            ),
            "{e:?}"
        );
        // xclient on an IMAP backend; master credentials with xclient; send_id on SMTP.
        let bad = "{ name: x, address: \"mail:993\", tls: implicit, login: xclient }";
        let e = errors(&mail_yaml(IMAPS, bad, ""));
        assert!(
            e.iter()
                .any(|m| m.contains("backends[0].login") && m.contains("SMTP backends only")),
            "{e:?}"
        );
        let bad = "{ name: p, protocol: smtp, address: \"mx:25\", tls: none, login: xclient, master_user: g, master_password_env: PATH, send_id: true }";
        let e = errors(&mail_yaml(smtp, bad, ""));
        for key in ["master_user", "master_password_env", "send_id"] {
            assert!(
                e.iter().any(|m| m.contains(&format!("backends[0].{key}"))),
                "{key}: {e:?}"
            );
        }
        // A master login still needs its master user.
        let bad = "{ name: d, protocol: pop3, address: \"mail:995\", tls: implicit, login: master_user, master_password_env: PATH }";
        let pop3 = "{ name: pop3s, protocol: pop3, address: \"127.0.0.1:995\", tls: implicit }";
        let e = errors(&mail_yaml(pop3, bad, ""));
        assert!(
            e.iter()
                .any(|m| m.contains("backends[0].master_user") && m.contains("required")),
            "{e:?}"
        );
        // A route to a backend of another protocol, and two SMTP backends without routes.smtp.
        let sub2 = "{ name: dsub, protocol: smtp, address: \"mail:465\", tls: implicit, login: sasl_authzid, master_user: g, master_password_env: PATH }";
        let e = errors(&mail_yaml(
            &format!("{IMAPS}, {smtp}"),
            &format!("{DOVECOT}, {POSTFIX}"),
            "routes: { default: dovecot, smtp: { default: dovecot } }\n",
        ));
        assert!(
            e.iter().any(|m| m.contains("routes.smtp.default")
                && m.contains("not the name of a smtp backend")),
            "{e:?}"
        );
        let e = errors(&mail_yaml(
            &format!("{IMAPS}, {smtp}"),
            &format!("{DOVECOT}, {POSTFIX}, {sub2}"),
            "",
        ));
        assert!(
            e.iter()
                .any(|m| m.contains("routes.smtp") && m.contains("more than one smtp backend")),
            "{e:?}"
        );
        // hostname is SMTP's, and must be a DNS name.
        let e = errors(&mail_yaml(
            "{ name: imaps, address: \"127.0.0.1:993\", tls: implicit, hostname: mail.example.org }",
            DOVECOT,
            "",
        ));
        assert!(
            e.iter().any(|m| m.contains("listeners[0].hostname")),
            "{e:?}"
        );
        let e = errors(&mail_yaml(
            "{ name: s, protocol: smtp, address: \"127.0.0.1:465\", tls: implicit, hostname: \"bad name\\r\" }",
            POSTFIX,
            "",
        ));
        assert!(
            e.iter()
                .any(|m| m.contains("listeners[0].hostname") && m.contains("DNS name")),
            "{e:?}"
        );
        // A backend no listener uses: a warning, not an error.
        let c = Config::from_yaml(
            &mail_yaml(IMAPS, &format!("{DOVECOT}, {POSTFIX}"), ""),
            Path::new("."),
        )
        .unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("backend postfix: no listener speaks smtp")),
            "{:?}",
            c.warnings
        );
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
