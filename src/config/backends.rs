//! Stage two for `state`, `backends` and `routes`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::ctx::{items, Ctx};
use super::{defaults, raw, BackendConfig, BackendLogin, Routes, StateConfig};

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
        let master_password = cx.secret_file_or_env(
            &path,
            ["master_password_file", "master_password_env"],
            b.master_password_file.as_deref(),
            b.master_password_env.as_deref(),
        );
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

pub(super) fn routes(cx: &mut Ctx, v: &Value, backends: &[BackendConfig]) -> Option<Routes> {
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
