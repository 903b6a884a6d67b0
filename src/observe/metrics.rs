//! Prometheus metrics: typed fields registered once at start, all prefixed `imapgate_`.
//!
//! Labels come only from closed sets (security invariant 12): listener and backend names from
//! the config, and fixed reason strings from enums. Never a user name, an IP or a token.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub connections: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub sessions_preauth: IntGauge,
    pub sessions_relayed: IntGauge,
    pub auth_attempts: IntCounterVec,
    pub auth_seconds: HistogramVec,
    pub hash_runs: IntCounter,
    pub auth_cache_hits: IntCounter,
    pub totp_failures: IntCounterVec,
    pub oauth_tokens: IntCounterVec,
    pub oauth_key_fetches: IntCounterVec,
    pub guard_decisions: IntCounterVec,
    pub guard_blocks: IntCounterVec,
    pub guard_blocked_sources: IntGauge,
    pub guard_attack_mode_accounts: IntGauge,
    pub app_password_suspect: IntCounter,
    pub state_store_errors: IntCounterVec,
    pub state_store_up: IntGauge,
    pub upstream_logins: IntCounterVec,
    pub upstream_login_seconds: HistogramVec,
    pub backend_up: IntGaugeVec,
    pub relay_bytes: IntCounterVec,
    pub session_seconds: Histogram,
    pub users_reloads: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub certificate_expiry: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub runtime_tasks: IntGauge,
    pub limits: IntGaugeVec,
    pub http_limited: IntCounterVec,
    pub store_up: IntGauge,
    pub store_usage_dropped: IntCounter,
    /// `imapgate_portal_signins_total{result}`: `ok` or `failed`.
    pub portal_signins: IntCounterVec,
    /// `imapgate_signin_pending_total{result}`: `recorded` or `dropped`.
    pub signin_pending: IntCounterVec,
    pub signin_approved: IntCounter,
    pub signin_denied: IntCounter,
    /// `imapgate_signin_webhooks_total{result}`: `sent`, `failed` or `dropped`.
    pub signin_webhooks: IntCounterVec,
    pub store_logins_dropped: IntCounter,
}

/// The metric names and help texts, in the order they are registered (docs and tests use it).
pub const CATALOGUE: &[(&str, &str)] = &[
    (
        "imapgate_connections_total",
        "Connections by listener and outcome (accepted or why refused).",
    ),
    (
        "imapgate_tls_handshake_failures_total",
        "Failed client TLS handshakes by listener and reason.",
    ),
    (
        "imapgate_sessions_preauth",
        "Connections that have not authenticated yet.",
    ),
    (
        "imapgate_sessions_relayed",
        "Authenticated sessions being relayed to a backend.",
    ),
    (
        "imapgate_auth_attempts_total",
        "Login attempts by mechanism and result.",
    ),
    (
        "imapgate_auth_seconds",
        "Time from a login command to its reply, by mechanism (failures include the floor).",
    ),
    (
        "imapgate_auth_hash_runs_total",
        "argon2 verifications run, dummy ones for unknown users included.",
    ),
    (
        "imapgate_auth_cache_hits_total",
        "Logins whose app password was confirmed by the verified-credential cache (no argon2).",
    ),
    (
        "imapgate_totp_failures_total",
        "Second-factor failures by reason; bad_code means a valid app password with a wrong code.",
    ),
    (
        "imapgate_oauth_tokens_total",
        "Bearer tokens checked, by result (valid, or why refused).",
    ),
    (
        "imapgate_oauth_key_fetches_total",
        "Fetches of an issuer's signing keys (discovery and JWKS), by issuer and result.",
    ),
    (
        "imapgate_guard_decisions_total",
        "Guard verdicts before a credential check, by action (allow, delay, require_code, reject, queue, or would_* in dry run) and scope (the key that decided).",
    ),
    (
        "imapgate_guard_blocks_total",
        "Blocks imposed by the guard, by scope (ip, subnet, token_ip, token_subnet; account = attack mode; app_password = suspect) and reason.",
    ),
    (
        "imapgate_guard_blocked_sources",
        "Addresses and subnets blocked now (refresh every few seconds).",
    ),
    (
        "imapgate_guard_attack_mode_accounts",
        "Accounts in attack mode now: password logins only from their known-good networks.",
    ),
    (
        "imapgate_app_password_suspect_total",
        "App passwords marked suspect: correct, but given more wrong TOTP codes than guard.wrong_codes allows (probably leaked).",
    ),
    (
        "imapgate_state_store_errors_total",
        "Shared-state operations that failed, by operation.",
    ),
    (
        "imapgate_state_store_up",
        "1 while the state store answers (always 1 for the in-process store; 0 while Redis is unreachable).",
    ),
    (
        "imapgate_upstream_logins_total",
        "Backend logins by backend and result.",
    ),
    (
        "imapgate_upstream_login_seconds",
        "Time to connect and log into a backend.",
    ),
    (
        "imapgate_backend_up",
        "1 if the last health probe of a backend succeeded.",
    ),
    (
        "imapgate_relay_bytes_total",
        "Bytes relayed after login, by direction and backend.",
    ),
    ("imapgate_session_seconds", "Duration of relayed sessions."),
    (
        "imapgate_users_reloads_total",
        "Reloads of the users file by result.",
    ),
    (
        "imapgate_config_reloads_total",
        "Reloads of the configuration file (SIGHUP or file change) by result: ok, error (the old configuration stays), restart_needed (a change that only a restart applies; nothing was applied).",
    ),
    (
        "imapgate_certificate_expiry_timestamp_seconds",
        "When each served certificate expires (Unix time of the leaf's notAfter), by certificate file.",
    ),
    ("imapgate_build_info", "Build information; always 1."),
    (
        "imapgate_runtime_tasks",
        "Tasks alive in the async runtime at the scrape (grows with sessions; growth without sessions is a leak).",
    ),
    (
        "imapgate_limit",
        "Configured caps in force, by limit (saturation: current use over the cap).",
    ),
    (
        "imapgate_audit_dropped_total",
        "Audit lines dropped because the syslog queue was full (the syslog slow or unreachable).",
    ),
    (
        "imapgate_http_requests_limited_total",
        "HTTP requests answered 429 by the request limits, by server and limit.",
    ),
    (
        "imapgate_store_up",
        "1 while the credential store answers (always 1 for the users file; 0 while the database cannot be read).",
    ),
    (
        "imapgate_store_usage_dropped_total",
        "Last-used records dropped because the buffer waiting to be written was full.",
    ),
    (
        "imapgate_portal_signins_total",
        "Sign-ins to the self-service portal through the identity provider, by result.",
    ),
    (
        "imapgate_signin_pending_total",
        "Code-less sign-ins recorded to wait for the person's approval in the portal, or dropped by the per-account and per-source caps.",
    ),
    (
        "imapgate_signin_approved_total",
        "Pending sign-ins approved in the portal (each opened its app password's unlock window for its network).",
    ),
    (
        "imapgate_signin_denied_total",
        "Pending sign-ins denied in the portal (each blocked its network for the account).",
    ),
    (
        "imapgate_signin_webhooks_total",
        "Webhook calls about new pending sign-ins, by result.",
    ),
    (
        "imapgate_store_logins_dropped_total",
        "Login-history events dropped because the buffer waiting to be written (or, with the users file, the history kept in memory) was full.",
    ),
];

/// The process metrics (`process_*`, the Prometheus client convention) exported beside the
/// catalogue on Linux: the prometheus crate's process collector reads them from `/proc`.
pub const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// A configured cap, exported as `imapgate_limit{limit}` (a closed set of label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_connections`: compare with the sum of the sessions gauges.
    MaxConnections,
    /// `limits.max_preauth_per_ip`.
    MaxPreauthPerIp,
    /// `limits.max_sessions_per_ip`.
    MaxSessionsPerIp,
    /// `limits.max_sessions_per_user`.
    MaxSessionsPerUser,
    /// `guard.max_delayed_per_ip` (applied on reload).
    MaxDelayedPerIp,
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::MaxConnections,
        Limit::MaxPreauthPerIp,
        Limit::MaxSessionsPerIp,
        Limit::MaxSessionsPerUser,
        Limit::MaxDelayedPerIp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::MaxPreauthPerIp => "max_preauth_per_ip",
            Limit::MaxSessionsPerIp => "max_sessions_per_ip",
            Limit::MaxSessionsPerUser => "max_sessions_per_user",
            Limit::MaxDelayedPerIp => "max_delayed_per_ip",
        }
    }
}

fn help(name: &str) -> &'static str {
    CATALOGUE
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, h)| h)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help(name)), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help(name))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let seconds = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
        ];
        let long = [
            1.0,
            10.0,
            60.0,
            300.0,
            1800.0,
            3600.0,
            4.0 * 3600.0,
            12.0 * 3600.0,
            24.0 * 3600.0,
        ];

        let connections = counter_vec(
            "imapgate_connections_total",
            &["listener", "protocol", "outcome"],
        )?;
        let tls_handshake_failures = counter_vec(
            "imapgate_tls_handshake_failures_total",
            &["listener", "reason"],
        )?;
        let sessions_preauth = gauge("imapgate_sessions_preauth")?;
        let sessions_relayed = gauge("imapgate_sessions_relayed")?;
        let auth_attempts = counter_vec(
            "imapgate_auth_attempts_total",
            &["mechanism", "protocol", "result"],
        )?;
        let auth_seconds = HistogramVec::new(
            HistogramOpts::new("imapgate_auth_seconds", help("imapgate_auth_seconds"))
                .buckets(seconds.to_vec()),
            &["mechanism"],
        )?;
        registry.register(Box::new(auth_seconds.clone()))?;
        let hash_runs = IntCounter::new(
            "imapgate_auth_hash_runs_total",
            help("imapgate_auth_hash_runs_total"),
        )?;
        registry.register(Box::new(hash_runs.clone()))?;
        let auth_cache_hits = IntCounter::new(
            "imapgate_auth_cache_hits_total",
            help("imapgate_auth_cache_hits_total"),
        )?;
        registry.register(Box::new(auth_cache_hits.clone()))?;
        let totp_failures = counter_vec("imapgate_totp_failures_total", &["reason"])?;
        let oauth_tokens = counter_vec("imapgate_oauth_tokens_total", &["result"])?;
        let oauth_key_fetches =
            counter_vec("imapgate_oauth_key_fetches_total", &["issuer", "result"])?;
        let guard_decisions = counter_vec("imapgate_guard_decisions_total", &["action", "scope"])?;
        let guard_blocks = counter_vec("imapgate_guard_blocks_total", &["scope", "reason"])?;
        let guard_blocked_sources = gauge("imapgate_guard_blocked_sources")?;
        let guard_attack_mode_accounts = gauge("imapgate_guard_attack_mode_accounts")?;
        let app_password_suspect = IntCounter::new(
            "imapgate_app_password_suspect_total",
            help("imapgate_app_password_suspect_total"),
        )?;
        registry.register(Box::new(app_password_suspect.clone()))?;
        let state_store_errors = counter_vec("imapgate_state_store_errors_total", &["op"])?;
        let state_store_up = gauge("imapgate_state_store_up")?;
        state_store_up.set(1);
        let upstream_logins =
            counter_vec("imapgate_upstream_logins_total", &["backend", "result"])?;
        let upstream_login_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imapgate_upstream_login_seconds",
                help("imapgate_upstream_login_seconds"),
            )
            .buckets(seconds.to_vec()),
            &["backend"],
        )?;
        registry.register(Box::new(upstream_login_seconds.clone()))?;
        let backend_up = IntGaugeVec::new(
            Opts::new("imapgate_backend_up", help("imapgate_backend_up")),
            &["backend"],
        )?;
        registry.register(Box::new(backend_up.clone()))?;
        let relay_bytes = counter_vec("imapgate_relay_bytes_total", &["direction", "backend"])?;
        let session_seconds = Histogram::with_opts(
            HistogramOpts::new("imapgate_session_seconds", help("imapgate_session_seconds"))
                .buckets(long.to_vec()),
        )?;
        registry.register(Box::new(session_seconds.clone()))?;
        let users_reloads = counter_vec("imapgate_users_reloads_total", &["result"])?;
        let config_reloads = counter_vec("imapgate_config_reloads_total", &["result"])?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "imapgate_certificate_expiry_timestamp_seconds",
                help("imapgate_certificate_expiry_timestamp_seconds"),
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("imapgate_build_info", help("imapgate_build_info")),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let runtime_tasks = gauge("imapgate_runtime_tasks")?;
        let limits = IntGaugeVec::new(
            Opts::new("imapgate_limit", help("imapgate_limit")),
            &["limit"],
        )?;
        registry.register(Box::new(limits.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        // Series that alerts watch start at 0, so that `increase()` sees their first event.
        for (scope, reason) in [
            ("ip", "failures"),
            ("ip", "spray"),
            ("subnet", "failures"),
            ("subnet", "spray"),
            ("account", "failures"),
            ("token_ip", "failures"),
            ("token_subnet", "failures"),
            ("app_password", "wrong_codes"),
        ] {
            guard_blocks.with_label_values(&[scope, reason]);
        }
        for reason in ["bad_code", "code_replayed", "stale_code", "code_missing"] {
            totp_failures.with_label_values(&[reason]);
        }
        for result in ["ok", "error", "restart_needed"] {
            config_reloads.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            users_reloads.with_label_values(&[result]);
        }
        // Lives in observe::syslog (logging starts before the registry); one counter shared.
        if let Some(c) = super::syslog::dropped_counter() {
            registry.register(Box::new(c.clone()))?;
        }
        let http_limited =
            counter_vec("imapgate_http_requests_limited_total", &["server", "limit"])?;
        for server in super::limit::Server::ALL {
            for limit in super::limit::LimitKind::ALL {
                http_limited.with_label_values(&[server.as_str(), limit.as_str()]);
            }
        }
        let store_up = gauge("imapgate_store_up")?;
        store_up.set(1);
        let store_usage_dropped = IntCounter::new(
            "imapgate_store_usage_dropped_total",
            help("imapgate_store_usage_dropped_total"),
        )?;
        registry.register(Box::new(store_usage_dropped.clone()))?;
        let portal_signins = counter_vec("imapgate_portal_signins_total", &["result"])?;
        for result in ["ok", "failed"] {
            portal_signins.with_label_values(&[result]);
        }
        let signin_pending = counter_vec("imapgate_signin_pending_total", &["result"])?;
        for result in ["recorded", "dropped"] {
            signin_pending.with_label_values(&[result]);
        }
        let signin_approved = IntCounter::new(
            "imapgate_signin_approved_total",
            help("imapgate_signin_approved_total"),
        )?;
        registry.register(Box::new(signin_approved.clone()))?;
        let signin_denied = IntCounter::new(
            "imapgate_signin_denied_total",
            help("imapgate_signin_denied_total"),
        )?;
        registry.register(Box::new(signin_denied.clone()))?;
        let signin_webhooks = counter_vec("imapgate_signin_webhooks_total", &["result"])?;
        for result in ["sent", "failed", "dropped"] {
            signin_webhooks.with_label_values(&[result]);
        }
        let store_logins_dropped = IntCounter::new(
            "imapgate_store_logins_dropped_total",
            help("imapgate_store_logins_dropped_total"),
        )?;
        registry.register(Box::new(store_logins_dropped.clone()))?;
        Ok(Self {
            registry,
            connections,
            tls_handshake_failures,
            sessions_preauth,
            sessions_relayed,
            auth_attempts,
            auth_seconds,
            hash_runs,
            auth_cache_hits,
            totp_failures,
            oauth_tokens,
            oauth_key_fetches,
            guard_decisions,
            guard_blocks,
            guard_blocked_sources,
            guard_attack_mode_accounts,
            app_password_suspect,
            state_store_errors,
            state_store_up,
            upstream_logins,
            upstream_login_seconds,
            backend_up,
            relay_bytes,
            session_seconds,
            users_reloads,
            config_reloads,
            certificate_expiry,
            build_info,
            runtime_tasks,
            limits,
            http_limited,
            store_up,
            store_usage_dropped,
            portal_signins,
            signin_pending,
            signin_approved,
            signin_denied,
            signin_webhooks,
            store_logins_dropped,
        })
    }

    /// Sets `imapgate_limit{limit}` to the cap in force.
    pub fn set_limit(&self, limit: Limit, value: u32) {
        self.limits
            .with_label_values(&[limit.as_str()])
            .set(i64::from(value));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let tasks = rt.metrics().num_alive_tasks();
            self.runtime_tasks
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod label_docs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_list_every_metric() {
        let doc = include_str!("../../docs/metrics.md");
        for (name, _) in CATALOGUE {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} missing from docs/metrics.md"
            );
        }
        for name in PROCESS_METRICS {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} missing from docs/metrics.md"
            );
        }
    }

    #[test]
    fn every_catalogued_metric_is_exported() {
        let m = Metrics::new().unwrap();
        // Touch the vectors so that they appear in the output.
        m.connections
            .with_label_values(&["l", "imap", "accepted"])
            .inc();
        m.tls_handshake_failures
            .with_label_values(&["l", "timeout"])
            .inc();
        m.auth_attempts
            .with_label_values(&["login", "imap", "success"])
            .inc();
        m.guard_decisions
            .with_label_values(&["allow", "none"])
            .inc();
        m.totp_failures.with_label_values(&["bad_code"]).inc();
        m.oauth_tokens.with_label_values(&["valid"]).inc();
        m.oauth_key_fetches.with_label_values(&["i", "ok"]).inc();
        m.upstream_logins.with_label_values(&["b", "ok"]).inc();
        m.upstream_login_seconds
            .with_label_values(&["b"])
            .observe(0.1);
        m.backend_up.with_label_values(&["b"]).set(1);
        m.relay_bytes.with_label_values(&["to_backend", "b"]).inc();
        m.auth_seconds.with_label_values(&["login"]).observe(0.1);
        m.set_limit(Limit::MaxConnections, 1);
        m.users_reloads.with_label_values(&["ok"]).inc();
        m.guard_blocks.with_label_values(&["ip", "failures"]).inc();
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.certificate_expiry.with_label_values(&["c"]).set(1);
        m.state_store_errors.with_label_values(&["get"]).inc();
        let text = m.render();
        for (name, _) in CATALOGUE {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        #[cfg(target_os = "linux")]
        for name in PROCESS_METRICS {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
    }
}
