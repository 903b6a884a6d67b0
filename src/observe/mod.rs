//! Observability: metrics, the audit log, operational logging and the admin HTTP listener.
//!
//! The audit log is the tracing target [`AUDIT_TARGET`]: one JSON line per auth decision,
//! written to its own sink (stdout, stderr or a file) and kept out of the operational log.
//! Neither log ever receives a secret: secrets are [`crate::secret::Secret`]s, which format as
//! `[REDACTED]`, and user names are passed through [`crate::auth::loggable_user`] first.

pub mod admin;
pub mod ecs;
pub mod limit;
pub mod metrics;
pub mod syslog;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{AuditFormat, AuditSink, LogFormat, LoggingConfig};
pub use metrics::Metrics;

/// The tracing target of audit events.
pub const AUDIT_TARGET: &str = "imapgate::audit";

/// Installs the global subscriber: the operational log on stderr, the audit log on its sink.
pub fn init_logging(cfg: &LoggingConfig) -> std::io::Result<()> {
    // rustls warns once per odd handshake (an IP address as SNI, a renegotiation attempt):
    // things any unauthenticated client can send, so they would let anyone fill the log. The
    // gateway's own handshake-failure lines and metrics say what matters. RUST_LOG overrides.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},rustls=error,{AUDIT_TARGET}=off", cfg.level))
    });
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
            let file = Arc::new(AuditFile {
                file: Mutex::new(open_audit_file(p)?),
                path: p.clone(),
            });
            let _ = AUDIT_FILE.set(file.clone());
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(AuditFileWriter(file))
        }
        AuditSink::Syslog(s) => {
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(syslog::SyslogWriter::start(s)?)
        }
    };
    let audit = match cfg.audit_format {
        AuditFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(audit_writer)
            .boxed(),
        AuditFormat::Ecs => ecs::EcsLayer {
            writer: audit_writer,
        }
        .boxed(),
    }
    .with_filter(filter_fn(|m| m.target() == AUDIT_TARGET));

    let _ = tracing_subscriber::registry()
        .with(ops)
        .with(audit)
        .try_init();
    Ok(())
}

/// The audit file, reopened on SIGHUP so that logrotate can move it away.
struct AuditFile {
    path: std::path::PathBuf,
    file: Mutex<std::fs::File>,
}

static AUDIT_FILE: std::sync::OnceLock<Arc<AuditFile>> = std::sync::OnceLock::new();

fn open_audit_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o640);
    }
    o.open(path)
}

/// Reopens the audit file (SIGHUP, after the rotation moved it). Without a file sink, nothing.
pub fn reopen_audit_log() {
    let Some(a) = AUDIT_FILE.get() else {
        return;
    };
    match open_audit_file(&a.path) {
        Ok(f) => {
            if let Ok(mut cur) = a.file.lock() {
                *cur = f;
            }
            tracing::info!(path = %a.path.display(), "audit log reopened");
        }
        Err(e) => {
            tracing::error!(path = %a.path.display(), error = %e, "cannot reopen the audit log; still writing to the old file")
        }
    }
}

struct AuditFileWriter(Arc<AuditFile>);

/// One audit line, written under the file's lock.
struct AuditLine<'a>(Option<std::sync::MutexGuard<'a, std::fs::File>>);

impl std::io::Write for AuditLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.0 {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AuditFileWriter {
    type Writer = AuditLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        AuditLine(self.0.file.lock().ok())
    }
}

/// Where the CLI writes an operator audit line.
pub struct OperatorAudit<'a> {
    /// The configured sink, when a configuration was given.
    pub sink: Option<&'a AuditSink>,
    pub format: AuditFormat,
    /// The users file the command changed: the line also goes to `audit.log` beside it.
    pub users_file: Option<&'a std::path::Path>,
}

/// The file beside the users file that keeps the operator actions done on it.
pub const OPERATOR_AUDIT_FILE: &str = "audit.log";

/// An operator action (the CLI editing the users file), as one audit line in the same shape
/// as the gateway's (`json` or `ecs`). The CLI is another process, so the line goes to the
/// CLI's stderr (never stdout, which may carry a new app password), to `audit.log` in the
/// users file's directory (created 0600), and to the configured audit file when there is one
/// (once, when that is the same file). A syslog sink is not written by the CLI.
pub fn audit_operator(to: &OperatorAudit<'_>, action: &str, user: &str, credential: &str) {
    let actor = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>();
    let now = ecs::now_rfc3339();
    let fields = serde_json::json!({
        "timestamp": now,
        "level": "INFO",
        "event": "operator",
        "action": action,
        "user": user,
        "credential": credential,
        "actor": actor,
        "target": AUDIT_TARGET,
    });
    let line = match (to.format, &fields) {
        (AuditFormat::Ecs, serde_json::Value::Object(m)) => ecs::to_ecs(m, &now).to_string(),
        _ => fields.to_string(),
    };
    use std::io::Write as _;
    let mut files: Vec<(std::path::PathBuf, u32)> = Vec::new();
    if let Some(users) = to.users_file {
        let dir = match users.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        files.push((dir.join(OPERATOR_AUDIT_FILE), 0o600));
    }
    if let Some(AuditSink::File(p)) = to.sink {
        let same = |a: &std::path::Path| {
            std::path::absolute(a).ok() == std::path::absolute(p).ok()
                || (a.canonicalize().is_ok() && a.canonicalize().ok() == p.canonicalize().ok())
        };
        if !files.iter().any(|(f, _)| same(f)) {
            files.push((p.clone(), 0o640));
        }
    }
    let mut stderr = std::io::stderr();
    if let Err(e) = writeln!(stderr, "{line}") {
        let _ = writeln!(stderr, "imapgate: cannot write the audit line: {e}");
    }
    for (path, mode) in files {
        if let Err(e) = open_mode(&path, mode).and_then(|mut f| writeln!(f, "{line}")) {
            let _ = writeln!(
                stderr,
                "imapgate: cannot write the audit line to {}: {e}",
                path.display()
            );
        }
    }
}

fn open_mode(path: &std::path::Path, mode: u32) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    o.open(path)
}

/// One auth decision, for the audit log.
pub struct AuditEvent<'a> {
    pub session: u64,
    pub listener: &'a str,
    /// `imap`, `smtp` or `pop3`.
    pub protocol: &'a str,
    pub client: SocketAddr,
    /// The client's IMAP `ID` name and version, sanitised ("" when not sent).
    pub client_name: &'a str,
    pub client_version: &'a str,
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

/// A relayed session ended from outside: its credential was revoked or an operator ended it.
pub struct SessionEndEvent<'a> {
    /// `<replica>-<n>` (the `n` is the `auth` line's `session`).
    pub session: &'a str,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub user: &'a str,
    pub credential: &'a str,
    pub backend: &'a str,
    /// `revoked`, `operator`, or for SMTP `forbidden_command` / `command_too_long` (the
    /// client sent XCLIENT, XFORWARD, AUTH or STARTTLS after the handover, or an endless line).
    pub reason: &'a str,
    /// How long the session had been relayed.
    pub seconds: u64,
}

/// Writes one `session` audit line. `user` must already be loggable.
pub fn audit_session_end(e: &SessionEndEvent<'_>) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "session",
        action = "ended",
        session = e.session,
        listener = e.listener,
        client_ip = %e.client.ip(),
        client_port = e.client.port(),
        user = e.user,
        credential = e.credential,
        backend = e.backend,
        reason = e.reason,
        seconds = e.seconds,
    );
}

/// Writes one audit line. `user` must already be loggable.
pub fn audit(e: &AuditEvent<'_>) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "auth",
        session = e.session,
        listener = e.listener,
        protocol = e.protocol,
        client_ip = %e.client.ip(),
        client_port = e.client.port(),
        client_name = e.client_name,
        client_version = e.client_version,
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

/// An operator action through the admin API, for the audit log: who (the name of the admin
/// token that was used), what, on which user and credential, and whether it changed anything
/// (a repeated call does not).
pub fn audit_api(actor: &str, action: &str, user: &str, credential: &str, changed: bool) {
    audit_operator_via("api", actor, action, user, credential, changed);
}

/// One operator line (`event: operator`) of an action done through `via` (`api`, `portal`).
fn audit_operator_via(
    via: &str,
    actor: &str,
    action: &str,
    user: &str,
    credential: &str,
    changed: bool,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "operator",
        via = via,
        actor = actor,
        action = action,
        user = user,
        credential = credential,
        changed = changed,
    );
}

/// A self-service or helpdesk action in the portal: `actor` is the signed-in person's address
/// (the administrator's for a helpdesk action), `user` the account acted on.
pub fn audit_portal(actor: &str, action: &str, user: &str, credential: &str, changed: bool) {
    audit_operator_via("portal", actor, action, user, credential, changed);
}

/// A pending sign-in answered in the portal (`signin_approved`, `signin_denied`): by whom,
/// for which account and app password, and the client's address and network.
pub fn audit_signin_answer(
    actor: &str,
    action: &str,
    user: &str,
    credential: &str,
    client: &str,
    network: &str,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "operator",
        via = "portal",
        actor = actor,
        action = action,
        user = user,
        credential = credential,
        client_ip = client,
        network = network,
        changed = true,
    );
}

/// A sign-in to the portal (`signed_in`, `sign_in_failed`, `signed_out`); `reason` is a closed
/// name, `user` empty when the identity provider's answer named nobody valid.
pub fn audit_portal_signin(action: &str, user: &str, reason: &str, client: std::net::IpAddr) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "portal",
        action = action,
        user = user,
        reason = reason,
        client_ip = %client,
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

/// What `/readyz` asks of a shared state store (implemented by `state`; observe depends on
/// neither it nor the guard).
pub trait StateReadiness: Send + Sync {
    /// Whether the gateway may be ready as far as the state is concerned, and one line saying
    /// why.
    fn readiness(&self) -> (bool, String);
}

/// What the admin endpoints do with the guard's blocks (implemented by `guard`).
#[async_trait::async_trait]
pub trait BlockAdmin: Send + Sync {
    /// The active blocks, attack modes and suspect app passwords, as the JSON array the admin
    /// endpoint returns; `Err` when the state store cannot be read.
    async fn blocks_json(&self) -> Result<String, ()>;
    /// Clears the matching entries; how many.
    async fn clear_blocks(&self, scope: Option<&str>, value: Option<&str>) -> Result<usize, ()>;
}

/// What `/readyz` reports.
#[derive(Default)]
pub struct Health {
    pub listeners_bound: AtomicBool,
    pub certificates_loaded: AtomicBool,
    pub draining: AtomicBool,
    /// The last reload of the configuration failed (the previous one is in use).
    pub config_stale: AtomicBool,
    /// The shared state store, when there is one (Redis).
    pub state: std::sync::OnceLock<Arc<dyn StateReadiness>>,
    /// The credential store, when it is a database (sqlite, postgres).
    pub store: std::sync::OnceLock<Arc<dyn StateReadiness>>,
    /// One flag per backend, in config order (replaced when a reload changes the backends).
    backends: std::sync::RwLock<Vec<(String, bool)>>,
}

impl Health {
    pub fn new(backends: impl IntoIterator<Item = String>) -> Self {
        let h = Self::default();
        h.set_backends(backends);
        h
    }

    /// The backends after a reload; those that stay keep their last state.
    pub fn set_backends(&self, names: impl IntoIterator<Item = String>) {
        let Ok(mut list) = self.backends.write() else {
            return;
        };
        let old = std::mem::take(&mut *list);
        *list = names
            .into_iter()
            .map(|n| {
                let up = old.iter().any(|(o, up)| *o == n && *up);
                (n, up)
            })
            .collect();
    }

    /// Records a probe; returns the previous state (None if the backend is gone).
    pub fn set_backend(&self, name: &str, up: bool) -> Option<bool> {
        let mut list = self.backends.write().ok()?;
        let entry = list.iter_mut().find(|(n, _)| n == name)?;
        Some(std::mem::replace(&mut entry.1, up))
    }

    /// Ready, and why not.
    pub fn readiness(&self) -> (bool, String) {
        let mut lines: Vec<String> = Vec::new();
        let mut ok = true;
        let mut check = |lines: &mut Vec<String>, name: &str, good: bool| {
            ok &= good;
            lines.push(format!("{name}: {}", if good { "ok" } else { "not ok" }));
        };
        check(
            &mut lines,
            "listeners",
            self.listeners_bound.load(Ordering::Relaxed),
        );
        check(
            &mut lines,
            "certificates",
            self.certificates_loaded.load(Ordering::Relaxed),
        );
        check(
            &mut lines,
            "draining",
            !self.draining.load(Ordering::Relaxed),
        );
        let backends = self.backends.read().map(|b| b.clone()).unwrap_or_default();
        check(&mut lines, "backends", backends.iter().any(|(_, up)| *up));
        for (name, up) in &backends {
            lines.push(format!(
                "  backend {name}: {}",
                if *up { "up" } else { "down" }
            ));
        }
        match self.state.get() {
            None => lines.push("state: memory".into()),
            Some(s) => {
                let (good, line) = s.readiness();
                ok &= good;
                lines.push(line);
            }
        }
        if let Some(s) = self.store.get() {
            let (good, line) = s.readiness();
            ok &= good;
            lines.push(line);
        }
        if self.config_stale.load(Ordering::Relaxed) {
            // Still ready: the previous configuration is serving.
            lines.push(
                "config: the last reload failed; the previous configuration is in use".into(),
            );
        }
        (ok, lines.join("\n") + "\n")
    }
}
