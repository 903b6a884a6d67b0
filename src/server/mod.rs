//! The running gateway: binds listeners and the admin port, accepts, admits, spawns sessions,
//! and drains on SIGTERM/SIGINT.
//!
//! Accept loop rules (STYLE.md 9): admission (global and per-IP caps) happens before the TLS
//! handshake; the admission ticket moves into the session task; accept errors back off and
//! never end the loop.
//!
//! Shutdown (DESIGN.md): readiness off → keep accepting for `shutdown_delay` → stop accepting,
//! `* BYE` to pre-auth sessions → relayed sessions get `shutdown_grace` → closed.
//!
//! Under systemd (`Type=notify`, see [`notify`]) the gateway reports `READY=1` when it serves,
//! `RELOADING=1` … `READY=1` around a SIGHUP reload and `STOPPING=1` when draining starts.

pub mod admission;
pub mod notify;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, CredentialStore};
use crate::config::{Config, ListenerTls};
use crate::guard::Guard;
use crate::login::{self, UserSessions};
use crate::observe::metrics::Limit;
use crate::observe::{self, Health, Metrics};
use crate::session::preauth::OAuthChallenges;
use crate::session::{self, ListenerInfo, Shared};
use crate::state::MemoryStore;
use crate::tls::ServerTls;
use crate::upstream::Upstreams;
use admission::Admission;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Users(#[from] crate::auth::users::UsersError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("state store: {0}")]
    State(crate::state::StoreError),
    #[error("credential store: {0}")]
    Credentials(#[from] crate::store::StoreError),
    #[error("{0}")]
    Portal(String),
}

/// A started gateway, for the binary and for tests.
pub struct Gateway {
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    /// The self-service portal's listener, when `portal:` is configured.
    pub portal: Option<SocketAddr>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    done: tokio::sync::oneshot::Receiver<()>,
    reload: Arc<Reloadable>,
    /// systemd's notify socket (disabled unless `start_notifying` got one).
    notify: Arc<notify::Notifier>,
    /// What `STATUS=` says while serving.
    serving: String,
}

/// What SIGHUP (or a change of the configuration file) reloads without touching live sessions.
struct Reloadable {
    /// The configuration in force.
    current: std::sync::Mutex<Arc<Config>>,
    resolver: Arc<crate::tls::CertResolver>,
    users: Arc<CredentialStore>,
    guard: Arc<Guard>,
    upstreams: Arc<Upstreams>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The sections that only a restart applies, and which of them differ.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut diff = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    diff("listeners", old.listeners != new.listeners);
    diff("limits", old.limits != new.limits);
    diff("auth", old.auth != new.auth);
    diff("state", old.state != new.state);
    diff("admin", old.admin != new.admin);
    diff("logging", old.logging != new.logging);
    diff("portal", old.portal != new.portal);
    diff("tls.min_version", old.tls.tls13_only != new.tls.tls13_only);
    changed
}

impl Reloadable {
    fn current(&self) -> Arc<Config> {
        match self.current.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the configuration file (when there is one), then the certificates and the
    /// users file. A broken or restart-only change keeps everything as it was. Returns the
    /// configuration's outcome (`ok`, `error`, `restart_needed`; None without a file).
    fn run(&self) -> Option<&'static str> {
        let current = self.current();
        let mut outcome = None;
        if let Some(path) = &current.source {
            let result = self.config(&current, path);
            self.metrics
                .config_reloads
                .with_label_values(&[result])
                .inc();
            outcome = Some(result);
        }
        let tls = self.current().tls.clone();
        match self.resolver.replace(&tls) {
            Ok(()) => tracing::info!("certificates reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "certificate reload failed; keeping the previous certificates")
            }
        }
        self.export_expiry();
        export_limits(&self.metrics, &self.current());
        self.users.reload();
        observe::reopen_audit_log();
        outcome
    }

    fn config(&self, current: &Config, path: &std::path::Path) -> &'static str {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                self.health.config_stale.store(true, Ordering::Relaxed);
                match &e {
                    crate::config::ConfigError::Invalid(errors) => {
                        for err in errors {
                            tracing::error!(problem = %err, "configuration reload refused");
                        }
                    }
                    other => tracing::error!(error = %other, "configuration reload refused"),
                }
                tracing::error!("keeping the previous configuration");
                return "error";
            }
        };
        let restart = restart_needed(current, &new);
        if !restart.is_empty() {
            tracing::warn!(
                sections = %restart.join(", "),
                "the configuration changed in sections that only a restart applies; nothing was applied (restart to apply all of it)"
            );
            return "restart_needed";
        }
        if new == *current {
            self.health.config_stale.store(false, Ordering::Relaxed);
            return "ok";
        }
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let new = Arc::new(new);
        if new.backends != current.backends || new.routes != current.routes {
            if let Err(e) = self.upstreams.reconfigure(new.clone()) {
                self.health.config_stale.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "backends: reload refused; keeping the previous configuration");
                return "error";
            }
            self.health
                .set_backends(new.backends.iter().map(|b| b.name.clone()));
            for gone in current
                .backends
                .iter()
                .filter(|b| !new.backends.iter().any(|n| n.name == b.name))
            {
                let _ = self.metrics.backend_up.remove_label_values(&[&gone.name]);
            }
        }
        if new.guard != current.guard {
            self.guard.reconfigure(new.guard.clone());
        }
        // tls.certificates: the caller re-reads them from the configuration now in force.
        match self.current.lock() {
            Ok(mut c) => *c = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        self.health.config_stale.store(false, Ordering::Relaxed);
        tracing::info!("configuration reloaded");
        "ok"
    }

    fn export_expiry(&self) {
        self.metrics.certificate_expiry.reset();
        for (label, at) in self.resolver.expiries() {
            self.metrics
                .certificate_expiry
                .with_label_values(&[&label])
                .set(at);
        }
    }

    /// The files whose change triggers a reload: the configuration and the certificates.
    fn watched(&self) -> Vec<std::path::PathBuf> {
        let c = self.current();
        let mut files: Vec<_> = c.source.iter().cloned().collect();
        for cert in &c.tls.certificates {
            files.push(cert.cert_file.clone());
            files.push(cert.key_file.clone());
        }
        files
    }

    /// Polls the watched files every `every` and reloads when one changes (Kubernetes
    /// updates mounted ConfigMaps and Secrets in place; SIGHUP does the same at once).
    async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        fn stamp(files: &[std::path::PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
            files
                .iter()
                .map(|f| {
                    let m = std::fs::metadata(f).ok()?;
                    Some((m.modified().ok()?, m.len()))
                })
                .collect()
        }
        let mut files = self.watched();
        let mut last = stamp(&files);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = stamp(&files);
            if now != last {
                tracing::info!("a configuration or certificate file changed: reloading");
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.run()).await;
                files = self.watched();
                last = stamp(&files);
            }
        }
    }
}

impl Gateway {
    /// Binds everything and starts serving. Errors here are start-up errors (exit non-zero).
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        Self::start_notifying(config, notify::Notifier::disabled()).await
    }

    /// [`Gateway::start`], telling a service manager (systemd `Type=notify`) through `notify`
    /// when it serves, reloads and drains.
    pub async fn start_notifying(
        config: Config,
        notify: notify::Notifier,
    ) -> Result<Gateway, StartError> {
        let notify = Arc::new(notify);
        let config = Arc::new(config);
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let metrics = Arc::new(Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?);
        export_limits(&metrics, &config);
        let health = Arc::new(Health::new(config.backends.iter().map(|b| b.name.clone())));
        let server_tls = ServerTls::build(&config.tls)?;
        health.certificates_loaded.store(true, Ordering::Relaxed);
        // One state store for everything shared (guard counters, TOTP replay, unlocks).
        let local = Arc::new(MemoryStore::new(config.state.max_entries));
        let (state, shared_state): (Arc<dyn crate::state::Store>, _) = match &config.state.redis {
            Some(r) if config.state.backend == crate::config::StateBackend::Redis => {
                // The Redis client's TLS uses the process default provider: ours.
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                let remote = crate::state::RedisStore::new(r).map_err(StartError::State)?;
                let shared = Arc::new(
                    crate::state::SharedStore::new(remote, local, r.on_error, metrics.clone())
                        .allow_eviction(r.allow_eviction),
                );
                let _ = health.state.set(shared.clone());
                (shared.clone() as Arc<dyn crate::state::Store>, Some(shared))
            }
            _ => (local as Arc<dyn crate::state::Store>, None),
        };
        // Replicas sharing Redis share the secret that keys the guard's fingerprints.
        let seed = config.state.redis.as_ref().map(|r| r.url.expose().to_vec());
        let fail_closed = config
            .state
            .redis
            .as_ref()
            .is_some_and(|r| r.on_error == crate::config::OnError::FailClosed);
        let guard = Arc::new(
            Guard::new(
                config.guard.clone(),
                state.clone(),
                metrics.clone(),
                seed.as_deref(),
            )
            .fail_closed(fail_closed),
        );
        let user_store = match config.auth.store.backend {
            crate::config::StoreBackend::File => None,
            _ => Some(crate::store::open(&config.auth).await?),
        };
        let store = Arc::new(CredentialStore::open_with(
            &config.auth,
            user_store.clone(),
            state.clone(),
            metrics.clone(),
        )?);
        match &user_store {
            None => tracing::info!(users = store.user_count(), "users file loaded"),
            Some(s) => tracing::info!(backend = s.backend().as_str(), "credential store opened"),
        }
        if let Some(h) = store.store_health() {
            let _ = health.store.set(h);
        }
        let upstreams = Arc::new(Upstreams::new(config.clone())?);
        // Session ids are `<replica>-<n>`: the pod's name where the chart passes it.
        let replica_env = std::env::var("IMAPGATE_REPLICA").ok();
        let replica = crate::login::registry::replica_from(replica_env.as_deref())
            .unwrap_or_else(|| {
                if replica_env.is_some() {
                    tracing::warn!("IMAPGATE_REPLICA is not 1-63 characters of A-Z a-z 0-9 . _ -; using a random replica name");
                }
                crate::login::registry::random_replica()
            });
        tracing::info!(replica = %replica, "replica name (session ids are REPLICA-N)");
        let user_sessions = UserSessions::new(&replica);
        let last_used = Arc::new(crate::store::activity::LastUsed::new(
            metrics.store_usage_dropped.clone(),
        ));
        let login_history = Arc::new(crate::store::activity::LoginHistory::new(
            metrics.store_logins_dropped.clone(),
            match user_store {
                Some(_) => crate::store::activity::Keep::UntilWritten,
                None => crate::store::activity::Keep::InMemory,
            },
        ));

        let mut bound = Vec::new();
        for l in &config.listeners {
            let sock = bind_listener(l.address).map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.address,
                source,
            })?;
            let local = sock.local_addr().unwrap_or(l.address);
            bound.push((l.clone(), sock, local));
        }
        let admin_sock = observe::admin::bind(config.admin.address)
            .await
            .map_err(|source| StartError::Bind {
                name: "admin".into(),
                addr: config.admin.address,
                source,
            })?;
        let admin_addr = admin_sock.local_addr().unwrap_or(config.admin.address);
        let portal_sock =
            match &config.portal {
                Some(pc) => Some(crate::portal::bind(pc.address).await.map_err(|source| {
                    StartError::Bind {
                        name: "portal".into(),
                        addr: pc.address,
                        source,
                    }
                })?),
                None => None,
            };
        let portal_addr = portal_sock.as_ref().and_then(|s| s.local_addr().ok());

        let stopping = CancellationToken::new();
        let background = CancellationToken::new();
        let background_watch = background.clone();
        // Sign-in approval: what every failed password login is told, whatever failed.
        let login_alert: Option<Arc<str>> = match (&config.auth.mfa.approval, &config.portal) {
            (Some(_), Some(pc)) => Some(Arc::from(format!(
                "Login failed. If this is you on a new device or network, approve the sign-in at {}",
                pc.public_url
            ))),
            _ => None,
        };
        let shared = Arc::new(Shared {
            limits: config.limits.clone(),
            login: login::Services {
                authenticator: store.clone() as Arc<dyn Authenticator>,
                guard: guard.clone(),
                upstreams: upstreams.clone(),
                metrics: metrics.clone(),
                failure_floor: config.auth.failure_floor,
                max_sessions_per_user: config.limits.max_sessions_per_user,
                user_sessions: user_sessions.clone(),
                last_used: last_used.clone(),
                login_history: login_history.clone(),
                names: crate::auth::NameRules::from_config(config.auth.unicode_names),
            },
            metrics: metrics.clone(),
            oauth: store.oauth_enabled().then(|| {
                let (discovery, scope) = store.oauth_challenge_hints();
                Arc::new(OAuthChallenges::new(discovery.as_deref(), &scope))
            }),
            login_alert_imap: login_alert
                .as_deref()
                .and_then(crate::imap::untagged_alert)
                .map(Arc::from),
            login_alert,
            next_id: AtomicU64::new(1),
            stopping: stopping.clone(),
        });
        let approvals = match (&config.auth.mfa.approval, &config.portal) {
            (Some(ac), Some(pc)) => {
                let a = Arc::new(crate::auth::approval::Approvals::new(
                    state.clone(),
                    ac.clone(),
                    metrics.clone(),
                    config.guard.block_for,
                    pc.public_url.clone(),
                ));
                store.set_approvals(a.clone());
                Some(a)
            }
            _ => None,
        };
        if config.auth.revoke_closes_sessions {
            let sessions = shared.login.user_sessions.clone();
            store.set_reload_hook(Box::new(move |file| {
                sessions.close_revoked(file);
            }));
        }
        // An operator's `sessions kill` always ends sessions; a record change does with
        // `revoke_closes_sessions`.
        let sessions = shared.login.user_sessions.clone();
        let revoke = config.auth.revoke_closes_sessions;
        store.set_change_hook(Box::new(move |event, record| match event.kind {
            crate::store::ChangeKind::User if revoke => {
                sessions.close_revoked_user(&event.user, record);
            }
            crate::store::ChangeKind::User => {}
            crate::store::ChangeKind::Sessions => {
                sessions.close_matching(&event.user, &event.credential);
            }
        }));
        let admission = Arc::new(Admission::new(
            config.limits.max_connections,
            config.limits.max_sessions_per_ip,
            config.limits.max_preauth_per_ip,
            config.guard.subnet_v6,
        ));

        let tracker = TaskTracker::new();
        let mut addrs = Vec::new();
        let mut accept_tasks = Vec::new();
        for (l, sock, local) in bound {
            tracing::info!(listener = %l.name, address = %local, tls = ?l.tls, "listening");
            addrs.push((l.name.clone(), local));
            let info = ListenerInfo {
                name: Arc::from(l.name.as_str()),
                protocol: l.protocol,
                acceptor: TlsAcceptor::from(server_tls.for_protocol(l.protocol)),
                hostname: Arc::from(l.hostname.as_str()),
                starttls: l.tls == ListenerTls::Starttls,
                proxy_protocol: l.proxy_protocol,
            };
            accept_tasks.push(tokio::spawn(accept_loop(
                sock,
                info,
                shared.clone(),
                admission.clone(),
                tracker.clone(),
                stopping.clone(),
            )));
        }
        health.listeners_bound.store(true, Ordering::Relaxed);

        let api = {
            let store_for_api = store.clone();
            let store: Arc<dyn crate::store::UserStore> = match &user_store {
                Some(s) => s.clone(),
                None => Arc::new(crate::store::file::FileStore::new(
                    config.auth.users_file.clone(),
                    config.auth.allow_group_readable_secrets,
                )),
            };
            let separators = config
                .backends
                .iter()
                .filter_map(|b| match &b.login {
                    crate::config::BackendLogin::MasterUser { separator } => {
                        Some(separator.clone())
                    }
                    crate::config::BackendLogin::SaslAuthzid
                    | crate::config::BackendLogin::Xclient => None,
                })
                .collect();
            Arc::new(crate::api::Api {
                services: crate::api::service::Services::new(
                    store,
                    config.auth.clone(),
                    separators,
                )
                .on_change({
                    let creds = store_for_api.clone();
                    let db = user_store.clone();
                    let sessions = config
                        .auth
                        .revoke_closes_sessions
                        .then(|| shared.login.user_sessions.clone());
                    Box::new(move |user| {
                        creds.invalidate(user);
                        // The users file: re-read now (its reload hook ends revoked sessions).
                        creds.reload();
                        // A database: this replica ends them now; the others within a poll
                        // of the change log.
                        if let (Some(db), Some(sessions)) = (db.clone(), sessions.clone()) {
                            let user = user.to_owned();
                            tokio::spawn(async move {
                                if let Ok(record) = db.user(&user).await {
                                    sessions.close_revoked_user(&user, record.as_ref());
                                }
                            });
                        }
                    })
                }),
                max_page: 1000,
                sessions: shared.login.user_sessions.clone(),
                last_used: last_used.clone(),
                login_history: login_history.clone(),
            })
        };
        if let (Some(pc), Some(sock)) = (&config.portal, portal_sock) {
            let portal = crate::portal::Portal::new(crate::portal::Parts {
                cfg: pc.clone(),
                api: api.clone(),
                guard: guard.clone(),
                metrics: metrics.clone(),
                ring: crate::auth::keyring::KeyRing::new(
                    config.auth.secret_keys.clone(),
                    config.auth.active_key.clone(),
                ),
                names: crate::auth::NameRules::from_config(config.auth.unicode_names),
                totp_issuer: config.auth.mfa.issuer.clone(),
                totp_digits: config.auth.mfa.code_digits,
                approvals: approvals.clone(),
                unlock_ttl: config.auth.mfa.unlock_ttl,
            })
            .map_err(|e| StartError::Portal(e.to_string()))?
            .with_mail_fronts({
                // The listeners' own ports, unless people reach them through others.
                let mut fronts = crate::portal::MailFronts::from_listeners(&config.listeners);
                if let (Some(f), Some(p)) = (fronts.smtp.as_mut(), pc.mail.smtp_port) {
                    f.port = p;
                }
                if let (Some(f), Some(p)) = (fronts.pop3.as_mut(), pc.mail.pop3_port) {
                    f.port = p;
                }
                fronts
            });
            let tls = if pc.tls {
                Some(
                    crate::portal::tls_config(server_tls.resolver.clone(), config.tls.tls13_only)
                        .map_err(|e| StartError::Portal(e.to_string()))?,
                )
            } else {
                None
            };
            tracing::info!(address = ?portal_addr, public_url = %pc.public_url, "portal listening");
            tokio::spawn(crate::portal::serve(
                sock,
                Arc::new(portal),
                tls,
                background.clone(),
            ));
        }
        tokio::spawn(observe::admin::serve(
            admin_sock,
            observe::admin::AdminState {
                metrics: metrics.clone(),
                health: health.clone(),
                guard: guard.clone(),
                tokens: config.admin.tokens.clone(),
                limiter: Arc::new(observe::limit::RequestLimiter::new(
                    observe::limit::Server::Admin,
                    &config.admin.rate_limit,
                    Some(metrics.http_limited.clone()),
                )),
            },
            Some((
                crate::api::router(api.clone()),
                crate::api::openapi::DOCUMENT,
            )),
            background.clone(),
        ));
        tokio::spawn(upstreams.clone().health_loop(
            health.clone(),
            metrics.clone(),
            config.admin.health_interval,
            background.clone(),
        ));
        tokio::spawn(
            store
                .clone()
                .watch(Duration::from_secs(2), background.clone()),
        );
        tokio::spawn(store.clone().follow_changes(background.clone()));
        if let Some(db) = &user_store {
            // Last-used records and the session directory, written in the background.
            tokio::spawn(last_used.run(db.clone(), background.clone()));
            tokio::spawn(login_history.run(db.clone(), background.clone()));
            tokio::spawn(crate::store::activity::mirror_sessions(
                user_sessions,
                db.clone(),
                background.clone(),
            ));
        }
        tokio::spawn(
            guard
                .clone()
                .sweep_loop(Duration::from_secs(5), background.clone()),
        );
        if let Some(shared) = shared_state {
            tokio::spawn(shared.probe_loop(Duration::from_secs(1), background.clone()));
        }

        let shutdown = CancellationToken::new();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let limits = config.limits.clone();
        let h = health.clone();
        let sd = shutdown.clone();
        let drain_notify = notify.clone();
        tokio::spawn(async move {
            sd.cancelled().await;
            h.draining.store(true, Ordering::Relaxed);
            tracing::info!(delay = ?limits.shutdown_delay, grace = ?limits.shutdown_grace, "shutting down: readiness off");
            tokio::time::sleep(limits.shutdown_delay).await;
            stopping.cancel();
            for t in accept_tasks {
                let _ = t.await;
            }
            tracker.close();
            tracing::info!(
                sessions = tracker.len(),
                "stopped accepting; draining sessions"
            );
            drain_notify.status(&format!(
                "draining: stopped accepting, {} sessions left",
                tracker.len()
            ));
            // Relayed sessions end by themselves after the grace; allow a little slack.
            let _ = tokio::time::timeout(
                limits.shutdown_grace + Duration::from_secs(5),
                tracker.wait(),
            )
            .await;
            background.cancel();
            tracing::info!("shutdown complete");
            let _ = done_tx.send(());
        });

        let reload = Arc::new(Reloadable {
            current: std::sync::Mutex::new(config.clone()),
            resolver: server_tls.resolver.clone(),
            users: store,
            guard,
            upstreams,
            health: health.clone(),
            metrics: metrics.clone(),
        });
        reload.export_expiry();
        tokio::spawn(
            reload
                .clone()
                .watch(Duration::from_secs(2), background_watch),
        );
        // Every listener is bound (connections queue from here on), the accept loops and the
        // admin server are spawned: the gateway serves.
        let names: Vec<&str> = addrs.iter().map(|(n, _)| n.as_str()).collect();
        let serving = format!(
            "serving {} listeners ({}), admin on {admin_addr}",
            addrs.len(),
            names.join(", ")
        );
        notify.ready(&serving);
        Ok(Gateway {
            listeners: addrs,
            admin: admin_addr,
            portal: portal_addr,
            health,
            metrics,
            shutdown,
            done,
            reload,
            notify,
            serving,
        })
    }

    /// SIGHUP: re-reads the configuration file (certificates, users file, guard policy and
    /// lists, backends and routes apply at once; other sections need a restart and are only
    /// reported), the certificates and the users file. A failure keeps what was loaded before.
    /// The service manager hears `RELOADING=1` before and `READY=1` after (the gateway serves
    /// on, with the old configuration when the new one was refused).
    pub fn reload(&self) {
        self.notify
            .reloading("reloading configuration, certificates and users");
        let outcome = match self.reload.run() {
            Some("ok") | None => "reloaded",
            Some("restart_needed") => "reloaded; some changes need a restart (see the log)",
            Some(_) => "reload refused, previous configuration in use (see the log)",
        };
        self.notify.ready(&format!("{}; {outcome}", self.serving));
    }

    /// Begins the shutdown sequence.
    pub fn shutdown(&self) {
        if !self.shutdown.is_cancelled() {
            self.notify
                .stopping("draining: readiness off, finishing sessions");
        }
        self.shutdown.cancel();
    }

    /// Waits until the shutdown sequence has finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// The bound address of a listener by name.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }
}

async fn accept_loop(
    sock: TcpListener,
    info: ListenerInfo,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    tracker: TaskTracker,
    stopping: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = stopping.cancelled() => return,
            r = sock.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // EMFILE and friends: wait and retry, never end the loop.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let peer = normalize_peer(peer);
        let refuse = |reason: &str| {
            count_connection(&shared, &info, reason);
            tracing::debug!(peer = %peer, reason, "connection refused");
        };
        if info.proxy_protocol {
            // The header is read in the connection's own task (bounded by the handshake
            // timeout); only trusted proxies get that far.
            if !shared.login.guard.trusted_proxy(peer.ip()) {
                refuse("refused_untrusted_proxy");
                drop(tcp);
                continue;
            }
            let place = match admission.reserve() {
                Ok(p) => p,
                Err(refusal) => {
                    refuse(refusal.as_str());
                    drop(tcp);
                    continue;
                }
            };
            let (shared, info, admission) = (shared.clone(), info.clone(), admission.clone());
            tracker.spawn(async move {
                let mut tcp = tcp;
                let timeout = shared.limits.tls_handshake_timeout;
                match proxy::read_header(&mut tcp, peer, timeout).await {
                    Ok(client) => {
                        let client = normalize_peer(client);
                        admit(tcp, client, place, &info, &shared, &admission).await
                    }
                    Err(e) => {
                        count_connection(&shared, &info, e.as_str());
                        tracing::debug!(peer = %peer, reason = e.as_str(), "PROXY header refused");
                    }
                }
            });
            continue;
        }
        if shared.login.guard.denied(peer.ip()) {
            refuse("refused_deny_list");
            drop(tcp);
            continue;
        }
        match admission.admit(peer.ip()) {
            Ok(ticket) => {
                count_connection(&shared, &info, "accepted");
                tracker.spawn(session::run(
                    shared.clone(),
                    info.clone(),
                    tcp,
                    peer,
                    Box::new(ticket),
                ));
            }
            Err(refusal) => {
                refuse(refusal.as_str());
                drop(tcp);
            }
        }
    }
}

/// After a PROXY header: the deny list and admission for the client it names, then the
/// session (in this task).
async fn admit(
    tcp: tokio::net::TcpStream,
    client: SocketAddr,
    place: tokio::sync::OwnedSemaphorePermit,
    info: &ListenerInfo,
    shared: &Arc<Shared>,
    admission: &Admission,
) {
    let count = |outcome: &str| count_connection(shared, info, outcome);
    if shared.login.guard.denied(client.ip()) {
        count("refused_deny_list");
        return;
    }
    match admission.admit_reserved(place, client.ip()) {
        Ok(ticket) => {
            count("accepted");
            session::run(shared.clone(), info.clone(), tcp, client, Box::new(ticket)).await;
        }
        Err(refusal) => count(refusal.as_str()),
    }
}

/// `imapgate_limit`: the caps in force, so that saturation can be computed. Called at start and
/// after every reload (the `limits` section needs a restart, so its values change only with
/// one; `guard.max_delayed_per_ip` applies on reload).
fn export_limits(metrics: &Metrics, c: &Config) {
    for limit in Limit::ALL {
        let value = match limit {
            Limit::MaxConnections => c.limits.max_connections,
            Limit::MaxPreauthPerIp => c.limits.max_preauth_per_ip,
            Limit::MaxSessionsPerIp => c.limits.max_sessions_per_ip,
            Limit::MaxSessionsPerUser => c.limits.max_sessions_per_user,
            Limit::MaxDelayedPerIp => c.guard.max_delayed_per_ip,
        };
        metrics.set_limit(limit, value);
    }
}

/// Counts one connection to `info`'s listener by its outcome: `accepted`, or why it was refused.
fn count_connection(shared: &Shared, info: &ListenerInfo, outcome: &str) {
    shared
        .metrics
        .connections
        .with_label_values(&[&info.name, info.protocol.as_str(), outcome])
        .inc();
}

/// IPv4-mapped IPv6 peers (from a `[::]` listener) are treated as the IPv4 address they are.
fn normalize_peer(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        v4 => v4,
    }
}

/// Binds a client listener like `TcpListener::bind` (SO_REUSEADDR, backlog 1024), with
/// TCP_NODELAY set on the listening socket: Linux copies it to every accepted socket, which
/// saves a system call per connection (see `session::run`).
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    sock.set_reuseaddr(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::bind_listener;

    #[tokio::test]
    async fn accepted_client_sockets_have_nodelay_without_a_call_of_their_own() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = bind_listener(addr.parse().unwrap()) else {
                continue; // no IPv6 on this machine
            };
            let peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (accepted, _) = l.accept().await.unwrap();
            // Small replies must not wait for delayed ACKs (Nagle): the session relies on the
            // listener's setting reaching every accepted socket.
            if cfg!(target_os = "linux") {
                assert!(accepted.nodelay().unwrap(), "{addr}");
            }
            drop(peer);
        }
    }
}
