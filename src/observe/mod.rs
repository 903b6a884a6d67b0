//! Observability: metrics, the audit log, operational logging and the admin HTTP listener.
//!
//! The audit log is the tracing target [`AUDIT_TARGET`]: one JSON line per auth decision,
//! written to its own sink (stdout, stderr or a file) and kept out of the operational log.
//! Neither log ever receives a secret: secrets are [`crate::secret::Secret`]s, which format as
//! `[REDACTED]`, and user names are passed through [`crate::auth::loggable_user`] first.

pub mod admin;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{AuditSink, LogFormat, LoggingConfig};
pub use metrics::Metrics;

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "imapgate::audit";

/// Installs the global subscriber: the operational log on stderr, the audit log on its sink.
pub fn init_logging(cfg: &LoggingConfig) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},{AUDIT_TARGET}=off", cfg.level)));
    let ops = match cfg.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter_fn(|m| m.target() != AUDIT_TARGET))
    .with_filter(filter);

    let audit_writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match &cfg.audit {
        AuditSink::Stdout => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
        AuditSink::Stderr => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
        AuditSink::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(Mutex::new(f))
        }
    };
    let audit = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(audit_writer)
        .with_filter(filter_fn(|m| m.target() == AUDIT_TARGET));

    let _ = tracing_subscriber::registry()
        .with(ops)
        .with(audit)
        .try_init();
    Ok(())
}

/// One auth decision, for the audit log.
pub struct AuditEvent<'a> {
    pub session: u64,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub user: &'a str,
    pub mechanism: &'a str,
    pub result: &'a str,
    pub reason: &'a str,
    pub guard: &'a str,
    pub backend: &'a str,
    /// The app password id that logged in (successes only).
    pub credential: &'a str,
    /// How the second factor was met: `totp`, `unlocked`, `none` (successes only).
    pub mfa: &'a str,
}

/// Writes one audit line. `user` must already be loggable.
pub fn audit(e: &AuditEvent<'_>) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "auth",
        session = e.session,
        listener = e.listener,
        client_ip = %e.client.ip(),
        client_port = e.client.port(),
        user = e.user,
        mechanism = e.mechanism,
        result = e.result,
        reason = e.reason,
        guard = e.guard,
        backend = e.backend,
        credential = e.credential,
        mfa = e.mfa,
    );
}

/// One guard action, for the audit log: a block or attack mode imposed, ended or cleared.
pub struct GuardAuditEvent<'a> {
    /// `block`, `attack_mode`, `block_ended`, `attack_mode_ended`, `cleared`.
    pub event: &'a str,
    /// `ip`, `subnet`, `token_ip`, `account`.
    pub scope: &'a str,
    /// The address, network or account name.
    pub value: &'a str,
    /// `failures`, `spray`, `manual`.
    pub reason: &'a str,
    /// The count that crossed the budget (0 when not applicable).
    pub count: u64,
    /// false in dry run: recorded, not applied.
    pub enforced: bool,
}

/// Writes one guard audit line. `value` must already be loggable.
pub fn audit_guard(e: &GuardAuditEvent<'_>) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "guard",
        action = e.event,
        scope = e.scope,
        key = e.value,
        reason = e.reason,
        count = e.count,
        enforced = e.enforced,
    );
}

/// What `/readyz` reports.
#[derive(Default)]
pub struct Health {
    pub listeners_bound: AtomicBool,
    pub certificates_loaded: AtomicBool,
    pub draining: AtomicBool,
    /// One flag per backend, in config order.
    pub backends: Vec<(String, AtomicBool)>,
}

impl Health {
    pub fn new(backends: impl IntoIterator<Item = String>) -> Self {
        Self {
            backends: backends
                .into_iter()
                .map(|b| (b, AtomicBool::new(false)))
                .collect(),
            ..Default::default()
        }
    }

    /// Ready, and why not.
    pub fn readiness(&self) -> (bool, String) {
        let mut lines = Vec::new();
        let mut ok = true;
        let mut check = |name: &str, good: bool| {
            ok &= good;
            lines.push(format!("{name}: {}", if good { "ok" } else { "not ok" }));
        };
        check("listeners", self.listeners_bound.load(Ordering::Relaxed));
        check(
            "certificates",
            self.certificates_loaded.load(Ordering::Relaxed),
        );
        check("draining", !self.draining.load(Ordering::Relaxed));
        let any_backend = self
            .backends
            .iter()
            .any(|(_, up)| up.load(Ordering::Relaxed));
        check("backends", any_backend);
        for (name, up) in &self.backends {
            lines.push(format!(
                "  backend {name}: {}",
                if up.load(Ordering::Relaxed) {
                    "up"
                } else {
                    "down"
                }
            ));
        }
        (ok, lines.join("\n") + "\n")
    }
}
