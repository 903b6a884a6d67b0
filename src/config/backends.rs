//! Stage two for `state`, `backends` and `routes`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::ctx::{items, Ctx};
use super::{defaults, raw, BackendConfig, BackendLogin, Protocol, Routes, StateConfig};

pub(super) fn state(cx: &mut Ctx, v: &Value) -> StateConfig {
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
    let url = if r.url_file.is_some() == r.url_env.is_some() {
        // Said apart from the usual message: the URL may hold a password, so never inline.
        cx.err(
            "state.redis",
            "needs exactly one of url_file or url_env (the URL may hold a password)",
        );
        None
    } else {
        cx.secret_file_or_env(
            "state.redis",
            ["url_file", "url_env"],
            r.url_file.as_deref(),
            r.url_env.as_deref(),
        )
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
pub(super) fn redis_host_is_loopback(url: &str) -> bool {
    let rest = url.trim_start_matches("redis://");
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

/// Splits `host:port` / `[v6]:port`.
pub(super) fn host_port(s: &str) -> Option<(String, u16)> {
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

pub(super) fn backends(cx: &mut Ctx, v: &Value) -> Vec<BackendConfig> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, item) in items(cx, v, "backends", true).iter().enumerate() {
        let path = format!("backends[{i}]");
        let Some(b) = cx.decode::<raw::Backend>(item, &path) else {
            continue;
        };
        cx.unique_name(&path, &b.name, &mut names);
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
        let xclient = b.login == raw::LoginMode::Xclient;
        if xclient && b.protocol != raw::Protocol::Smtp {
            cx.err(format!("{path}.login"), "xclient is for SMTP backends only");
        }
        if b.send_id && b.protocol != raw::Protocol::Imap {
            cx.err(format!("{path}.send_id"), "is for IMAP backends only");
        }
        let master_user = match (&b.master_user, xclient) {
            (Some(_), true) => {
                cx.err(
                    format!("{path}.master_user"),
                    "makes no sense with login: xclient (Postfix trusts the gateway's address)",
                );
                String::new()
            }
            (None, true) => String::new(),
            (None, false) => {
                cx.err(format!("{path}.master_user"), "is required");
                String::new()
            }
            (Some(m), false) => {
                if m.is_empty()
                    || m.bytes()
                        .any(|c| c.is_ascii_control() || c == b' ' || c == b'"')
                {
                    cx.err(
                        format!("{path}.master_user"),
                        "must be a non-empty name without spaces, quotes or control characters",
                    );
                }
                m.clone()
            }
        };
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
            raw::LoginMode::SaslAuthzid | raw::LoginMode::Xclient => {
                if b.master_separator.is_some() {
                    cx.err(
                        format!("{path}.master_separator"),
                        "only applies to login: master_user",
                    );
                }
                if xclient {
                    BackendLogin::Xclient
                } else {
                    BackendLogin::SaslAuthzid
                }
            }
        };
        let master_password = if xclient {
            for (k, set) in [
                ("master_password_file", b.master_password_file.is_some()),
                ("master_password_env", b.master_password_env.is_some()),
            ] {
                if set {
                    cx.err(format!("{path}.{k}"), "makes no sense with login: xclient");
                }
            }
            Some(crate::secret::Secret::default())
        } else {
            cx.secret_file_or_env(
                &path,
                ["master_password_file", "master_password_env"],
                b.master_password_file.as_deref(),
                b.master_password_env.as_deref(),
            )
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
        if let Some(pw) = master_password.as_ref().filter(|_| !xclient) {
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
            protocol: b.protocol,
            server_name: b
                .server_name
                .map(|s| s.to_ascii_lowercase())
                .unwrap_or_else(|| host.clone()),
            host,
            port,
            tls: b.tls,
            ca_file,
            login,
            master_user,
            master_password: master_password.unwrap_or_default(),
            send_id: b.send_id,
            connect_timeout,
            login_timeout,
        });
    }
    out
}

/// Routes per protocol: IMAP's at the top of `routes:`, SMTP's and POP3's under `routes.smtp`
/// and `routes.pop3`. A protocol with one backend needs none; every route names a backend of its
/// own protocol.
pub(super) fn routes(
    cx: &mut Ctx,
    v: &Value,
    backends: &[BackendConfig],
) -> Option<BTreeMap<Protocol, Routes>> {
    let r: raw::Routes = if v.is_null() {
        raw::Routes {
            default: None,
            domains: BTreeMap::new(),
            smtp: None,
            pop3: None,
        }
    } else {
        cx.decode(v, "routes")?
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for protocol in Protocol::ALL {
        let (path, given) = match protocol {
            Protocol::Imap => (
                "routes".to_owned(),
                r.default.clone().map(|d| (d, r.domains.clone())),
            ),
            Protocol::Smtp => (
                "routes.smtp".to_owned(),
                r.smtp
                    .as_ref()
                    .map(|x| (x.default.clone(), x.domains.clone())),
            ),
            Protocol::Pop3 => (
                "routes.pop3".to_owned(),
                r.pop3
                    .as_ref()
                    .map(|x| (x.default.clone(), x.domains.clone())),
            ),
        };
        if protocol == Protocol::Imap && r.default.is_none() && !r.domains.is_empty() {
            cx.err("routes.default", "is required with routes.domains");
            ok = false;
        }
        let of_protocol: Vec<usize> = (0..backends.len())
            .filter(|&i| backends.get(i).is_some_and(|b| b.protocol == protocol))
            .collect();
        let Some((default, domains)) = given else {
            match of_protocol.as_slice() {
                [] => {}
                [only] => {
                    out.insert(
                        protocol,
                        Routes {
                            default: *only,
                            domains: BTreeMap::new(),
                        },
                    );
                }
                _ => {
                    let at = if protocol == Protocol::Imap {
                        "routes.default".to_owned()
                    } else {
                        path.clone()
                    };
                    cx.err(
                        at,
                        format!(
                            "is required when there is more than one {} backend",
                            protocol.as_str()
                        ),
                    );
                    ok = false;
                }
            }
            continue;
        };
        let find = |name: &str| {
            of_protocol
                .iter()
                .copied()
                .find(|&i| backends.get(i).is_some_and(|b| b.name == name))
        };
        let what = format!("is not the name of a {} backend", protocol.as_str());
        let d = find(&default);
        if d.is_none() {
            cx.err(format!("{path}.default"), format!("`{default}` {what}"));
            ok = false;
        }
        let mut table = BTreeMap::new();
        for (domain, name) in &domains {
            match find(name) {
                Some(i) => {
                    table.insert(domain.to_ascii_lowercase(), i);
                }
                None => {
                    cx.err(
                        format!("{path}.domains.{domain}"),
                        format!("`{name}` {what}"),
                    );
                    ok = false;
                }
            }
        }
        out.insert(
            protocol,
            Routes {
                default: d.unwrap_or(0),
                domains: table,
            },
        );
    }
    ok.then_some(out)
}
