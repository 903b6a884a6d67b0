//! Configuration: one YAML file, loaded in two stages.
//!
//! Stage one (`raw`) is strict serde (`deny_unknown_fields`); each top-level section and each
//! list item is decoded on its own so that one mistake does not hide the next. Stage two
//! (`validate`) turns the raw values into typed ones (`SocketAddr`, `Duration`, secrets read from
//! their files) and reports *every* problem with its YAML path, e.g.
//! `backends[0].connect_timeout: `5` needs a unit`. Secure defaults are the named constants in
//! [`defaults`]. The config is never logged: it holds secrets.

mod auth_section;
mod backends;
mod ctx;
pub mod file_mode;
mod guard;
pub mod portal;
mod raw;
pub mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::Secret;

pub use raw::{
    AuditFormat, BackendTls, ListenerTls, LogFormat, MfaMode, OnError, Protocol, StateBackend,
    SyslogTransport,
};

/// Secure defaults, one place.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_CONNECTIONS: u32 = 20_000;
    pub const MAX_PREAUTH_PER_IP: u32 = 64;
    pub const MAX_SESSIONS_PER_IP: u32 = 2_000;
    pub const MAX_SESSIONS_PER_USER: u32 = 50;
    pub const LINE_BYTES: usize = 8 * 1024;
    pub const LITERAL_BYTES: usize = 8 * 1024;
    pub const SASL_BYTES: usize = 24 * 1024;
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const PREAUTH_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const PREAUTH_TOTAL_TIMEOUT: Duration = Duration::from_secs(60);
    pub const BAD_COMMANDS_BEFORE_BYE: u32 = 5;
    pub const AUTH_FAILURES_PER_CONNECTION: u32 = 3;
    pub const RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(31 * 60);
    pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    pub const SHUTDOWN_DELAY: Duration = Duration::ZERO;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// OWASP's argon2id minimum: 19 MiB, 2 iterations, 1 lane.
    pub const ARGON2_M_KIB: u32 = 19_456;
    pub const ARGON2_T: u32 = 2;
    pub const ARGON2_P: u32 = 1;
    pub const FAILURE_FLOOR: Duration = Duration::from_secs(1);
    pub const UNLOCK_TTL: Duration = Duration::from_secs(12 * 3600);
    pub const VERIFIED_CACHE_TTL: Duration = Duration::from_secs(5 * 60);
    pub const SQLITE_PATH: &str = "/var/lib/imapgate/imapgate.db";
    pub const STORE_POOL_SIZE: u32 = 8;
    pub const STORE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const STORE_CACHE_TTL: Duration = Duration::from_secs(60);
    pub const STORE_POLL_INTERVAL: Duration = Duration::from_secs(1);
    pub const CODE_DIGITS: u8 = 6;
    /// Active app passwords per user (`auth.max_app_passwords_per_user`).
    pub const MAX_APP_PASSWORDS_PER_USER: u32 = 20;
    pub const TOTP_ISSUER: &str = "imapgate";
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MASTER_SEPARATOR: &str = "*";
    pub const ADMIN_ADDRESS: &str = "127.0.0.1:9190";
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
    /// `admin.rate_limit` (requests per minute; docs/operations.md explains each choice).
    pub const ADMIN_PER_IP: u32 = 60;
    pub const ADMIN_BURST: u32 = 20;
    pub const ADMIN_OVERALL: u32 = 600;
    pub const ADMIN_FAILED_AUTH: u32 = 5;
    pub const ADMIN_PROBES_PER_IP: u32 = 1200;
    /// The post-auth idle timeout may not be lower: IDLE clients re-issue every 29 minutes
    /// (RFC 2177), and the issue asks for at least 30 minutes.
    pub const RELAY_IDLE_MINIMUM: Duration = Duration::from_secs(30 * 60);

    // The guard (docs/guard.md explains each choice).
    pub const SUBNET_V4: u8 = 24;
    pub const SUBNET_V6: u8 = 64;
    /// Failures per client address before it is blocked for `BLOCK_FOR`.
    pub const PER_IP_FAILURES: u32 = 10;
    /// Failures per subnet: a NAT or campus shares one; three addresses' worth.
    pub const PER_SUBNET_FAILURES: u32 = 30;
    /// Failures against one account (from anywhere) before it enters attack mode; well under
    /// NIST SP 800-63B's 100.
    pub const PER_ACCOUNT_FAILURES: u32 = 10;
    /// Refused bearer tokens per client address before token attempts from it are refused
    /// unchecked (protects the identity provider's introspection endpoint).
    pub const PER_TOKEN_IP_FAILURES: u32 = 20;
    /// Refused bearer tokens per subnet: a NAT's worth of clients with stale tokens.
    pub const PER_TOKEN_SUBNET_FAILURES: u32 = 60;
    pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
    /// A correct app password with a wrong code, per account, across every network and replica,
    /// before that app password is marked suspect: 5 per hour leaves a 6-digit code (three
    /// valid at a time) a 1-in-67,000 chance per hour, and no owner mistypes more often.
    pub const WRONG_CODES: u32 = 5;
    pub const WRONG_CODES_WINDOW: Duration = Duration::from_secs(3600);
    /// How long a suspect app password stays limited to its unlock windows unless its owner
    /// (or an operator) acts first.
    pub const SUSPECT_FOR: Duration = Duration::from_secs(30 * 86_400);
    pub const SPRAY_ACCOUNTS: u32 = 5;
    pub const SPRAY_WINDOW: Duration = Duration::from_secs(3600);
    pub const KNOWN_GOOD_TTL: Duration = Duration::from_secs(30 * 86_400);
    pub const TARPIT_START: Duration = Duration::from_secs(1);
    pub const TARPIT_MAX: Duration = Duration::from_secs(15);
    pub const MAX_DELAYED_PER_IP: u32 = 16;
    pub const BLOCK_FOR: Duration = Duration::from_secs(15 * 60);
    /// Entries in the in-process state store (measured: about 280 bytes each, so 140 MiB at most).
    pub const STATE_MAX_ENTRIES: u32 = 500_000;
    pub const REDIS_KEY_PREFIX: &str = "imapgate:";
    pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub state: StateConfig,
    pub guard: GuardConfig,
    pub backends: Vec<BackendConfig>,
    /// Routes per protocol that has backends.
    pub routes: BTreeMap<Protocol, Routes>,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    /// The self-service portal (`portal:`), when configured.
    pub portal: Option<portal::PortalConfig>,
    /// Things that are allowed but deserve the operator's attention (logged at start).
    pub warnings: Vec<String>,
    /// The file it was loaded from (reloads read it again), if any.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub tls: ListenerTls,
    pub protocol: Protocol,
    /// SMTP: the gateway's name in its greeting and EHLO reply.
    pub hostname: String,
    /// A PROXY protocol header is required on this listener.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// Entries kept at most by the in-process store (the store itself with `memory`, the
    /// fallback with `redis`).
    pub max_entries: usize,
    /// With `backend: redis`.
    pub redis: Option<RedisConfig>,
}

/// The shared store for several replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS); it may hold a password.
    pub url: Secret,
    /// Extra CA for `rediss://` (private PKI); otherwise the system's CAs.
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
    pub on_error: OnError,
    /// Each operation's deadline.
    pub timeout: Duration,
    /// Stay ready when Redis's `maxmemory-policy` may evict keys (used TOTP codes could be
    /// evicted and replayed); default false: `/readyz` fails and `doctor` reports it.
    pub allow_eviction: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: StateBackend::Memory,
            max_entries: defaults::STATE_MAX_ENTRIES as usize,
            redis: None,
        }
    }
}

/// One failure budget: `failures` per `per` (GCRA), and whether exceeding it is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub failures: u32,
    pub per: Duration,
    pub enforce: bool,
}

/// The brute-force and spraying defence (`guard` section).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// false = dry run everywhere: decisions are logged and counted, never applied.
    pub enforce: bool,
    pub subnet_v4: u8,
    pub subnet_v6: u8,
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub per_ip: Budget,
    pub per_subnet: Budget,
    pub per_account: Budget,
    pub per_token_ip: Budget,
    /// Refused bearer tokens per subnet.
    pub per_token_subnet: Budget,
    /// Correct app password, wrong code: per account (`failures` per `per`).
    pub wrong_codes: Budget,
    /// How long an app password marked suspect stays limited to its unlock windows.
    pub suspect_for: Duration,
    /// Distinct accounts failed from one address or subnet within `per`.
    pub spray: Budget,
    pub known_good_ttl: Duration,
    pub tarpit_start: Duration,
    pub tarpit_max: Duration,
    pub tarpit_enforce: bool,
    pub max_delayed_per_ip: u32,
    pub block_for: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        use defaults::*;
        let budget = |failures, per| Budget {
            failures,
            per,
            enforce: true,
        };
        Self {
            enforce: true,
            subnet_v4: SUBNET_V4,
            subnet_v6: SUBNET_V6,
            allow: Vec::new(),
            deny: Vec::new(),
            trusted_proxies: Vec::new(),
            per_ip: budget(PER_IP_FAILURES, FAILURE_WINDOW),
            per_subnet: budget(PER_SUBNET_FAILURES, FAILURE_WINDOW),
            per_account: budget(PER_ACCOUNT_FAILURES, FAILURE_WINDOW),
            per_token_ip: budget(PER_TOKEN_IP_FAILURES, FAILURE_WINDOW),
            per_token_subnet: budget(PER_TOKEN_SUBNET_FAILURES, FAILURE_WINDOW),
            wrong_codes: budget(WRONG_CODES, WRONG_CODES_WINDOW),
            suspect_for: SUSPECT_FOR,
            spray: budget(SPRAY_ACCOUNTS, SPRAY_WINDOW),
            known_good_ttl: KNOWN_GOOD_TTL,
            tarpit_start: TARPIT_START,
            tarpit_max: TARPIT_MAX,
            tarpit_enforce: true,
            max_delayed_per_ip: MAX_DELAYED_PER_IP,
            block_for: BLOCK_FOR,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub certificates: Vec<CertificatePaths>,
    pub tls13_only: bool,
    pub self_signed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificatePaths {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_preauth_per_ip: u32,
    pub max_sessions_per_ip: u32,
    pub max_sessions_per_user: u32,
    pub line_bytes: usize,
    pub literal_bytes: usize,
    pub sasl_bytes: usize,
    pub tls_handshake_timeout: Duration,
    pub preauth_idle_timeout: Duration,
    pub preauth_total_timeout: Duration,
    pub bad_commands_before_bye: u32,
    pub auth_failures_per_connection: u32,
    pub relay_idle_timeout: Duration,
    pub max_session_lifetime: Duration,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        use defaults::*;
        Self {
            max_connections: MAX_CONNECTIONS,
            max_preauth_per_ip: MAX_PREAUTH_PER_IP,
            max_sessions_per_ip: MAX_SESSIONS_PER_IP,
            max_sessions_per_user: MAX_SESSIONS_PER_USER,
            line_bytes: LINE_BYTES,
            literal_bytes: LITERAL_BYTES,
            sasl_bytes: SASL_BYTES,
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            preauth_idle_timeout: PREAUTH_IDLE_TIMEOUT,
            preauth_total_timeout: PREAUTH_TOTAL_TIMEOUT,
            bad_commands_before_bye: BAD_COMMANDS_BEFORE_BYE,
            auth_failures_per_connection: AUTH_FAILURES_PER_CONNECTION,
            relay_idle_timeout: RELAY_IDLE_TIMEOUT,
            max_session_lifetime: MAX_SESSION_LIFETIME,
            shutdown_delay: SHUTDOWN_DELAY,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

#[cfg(test)]
impl Argon2Params {
    /// Cheap parameters for unit tests: `m_kib` KiB, one pass, one lane.
    pub(crate) fn light(m_kib: u32) -> Self {
        Self { m_kib, t: 1, p: 1 }
    }
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self {
            m_kib: defaults::ARGON2_M_KIB,
            t: defaults::ARGON2_T,
            p: defaults::ARGON2_P,
        }
    }
}

/// `auth.store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// The YAML users file (`auth.users_file`), for GitOps setups.
    File,
    /// An embedded SQLite database: one node.
    Sqlite,
    /// PostgreSQL: several replicas.
    Postgres,
}

impl StoreBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreBackend::File => "file",
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Postgres => "postgres",
        }
    }
}

/// `auth.store.on_error`: what logins do while the store cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreOnError {
    /// Credentials in the verified cache keep working for its TTL; everything else fails.
    #[default]
    Cache,
    /// Every login that needs the store fails.
    FailClosed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// `postgres://…` (may hold a password: never logged).
    pub url: Secret,
    pub ca_file: Option<PathBuf>,
    pub pool_size: u32,
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub sqlite_path: PathBuf,
    pub postgres: Option<PostgresConfig>,
    pub on_error: StoreOnError,
    /// How long a replica keeps a user's record before reading it again (a change made through
    /// the store reaches every replica sooner, through the change log).
    pub cache_ttl: Duration,
    /// How often each replica reads the store's change log.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// The users file (`store.backend: file`; empty otherwise).
    pub users_file: PathBuf,
    pub store: StoreConfig,
    /// Key ring for TOTP secrets at rest: (id, 32-byte key), and the id new ciphertexts use.
    pub secret_keys: Vec<(String, Secret)>,
    pub active_key: Option<String>,
    pub argon2: Argon2Params,
    pub mfa: MfaConfig,
    pub verified_cache_ttl: Duration,
    pub failure_floor: Duration,
    pub revoke_closes_sessions: bool,
    pub oauth_issuers: Vec<IssuerConfig>,
    /// Non-ASCII user names are accepted (NFKC, lower case, UTS #39 checks); false: ASCII only.
    pub unicode_names: bool,
    /// Active app passwords a user may have (the CLI refuses more; a login verifies at most
    /// this many app passwords that have no lookup index yet).
    pub max_app_passwords_per_user: u32,
    /// Secret files (users file, key ring, master passwords, tokens) readable by their group
    /// are accepted with a warning instead of refused (Kubernetes Secrets with an fsGroup).
    pub allow_group_readable_secrets: bool,
}

/// One trusted OAuth 2.0 / OpenID issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerConfig {
    pub name: String,
    /// The exact `iss` value.
    pub issuer: String,
    /// Where the signing keys are: from discovery, or this URL.
    pub jwks_uri: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub audiences: Vec<String>,
    /// Allowed JWS algorithms (never `none`, never HMAC).
    pub algorithms: Vec<String>,
    pub user_claim: String,
    /// Appended as `@domain` to a claim value without one.
    pub user_domain: Option<String>,
    pub required_scopes: Vec<String>,
    pub require_amr: Vec<String>,
    pub require_acr: Vec<String>,
    pub accept_id_tokens: bool,
    pub leeway: Duration,
    /// Unknown `kid`: the key set is re-fetched at most once per this interval.
    pub key_refresh_interval: Duration,
    /// Close relayed sessions when their token expires.
    pub end_session_at_expiry: bool,
    /// RFC 7662 introspection for opaque tokens.
    pub introspection: Option<IntrospectionConfig>,
    /// Lower-cased mail domains its tokens may log into; empty: any domain.
    pub domains: Vec<String>,
    /// With `user_claim: email`, the token must say `email_verified: true`.
    pub require_email_verified: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IntrospectionConfig {
    /// The endpoint; `None`: from discovery (`introspection_endpoint`).
    pub endpoint: Option<String>,
    pub client_id: String,
    pub client_secret: Secret,
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MfaConfig {
    pub default: MfaMode,
    pub code_digits: u8,
    /// Zero: every login needs a fresh code.
    pub unlock_ttl: Duration,
    pub unlock_bind_subnet: bool,
    pub issuer: String,
    /// `approval: portal`: a code-less login from a network where the app password is not
    /// unlocked waits for the person's approval in the portal (None: off).
    pub approval: Option<ApprovalConfig>,
}

/// Sign-in approval from the portal (`auth.mfa.approval: portal`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalConfig {
    /// How long a pending sign-in waits for an answer.
    pub ttl: Duration,
    /// Pending sign-ins recorded per account within `ttl` at most (more are dropped).
    pub max_pending: u32,
    /// Pending sign-ins recorded per source network within `ttl` at most.
    pub per_source: u32,
    /// Told of each new pending sign-in (JSON POST, HMAC-SHA256 signed).
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<Secret>,
}

impl Default for MfaConfig {
    fn default() -> Self {
        Self {
            default: MfaMode::Required,
            code_digits: defaults::CODE_DIGITS,
            unlock_ttl: defaults::UNLOCK_TTL,
            unlock_bind_subnet: true,
            issuer: defaults::TOTP_ISSUER.into(),
            approval: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackendLogin {
    /// Dovecot-style `LOGIN "user<sep>master" password`.
    MasterUser { separator: String },
    /// `AUTHENTICATE PLAIN` (SMTP and POP3: `AUTH PLAIN`) with authzid = user, authcid =
    /// master.
    SaslAuthzid,
    /// SMTP only: `XCLIENT LOGIN=user ADDR=client` (Postfix), no master credential.
    Xclient,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: BackendTls,
    pub ca_file: Option<PathBuf>,
    pub server_name: String,
    pub login: BackendLogin,
    /// Empty with `login: xclient`.
    pub master_user: String,
    /// Empty with `login: xclient`.
    pub master_password: Secret,
    pub send_id: bool,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    /// Index into `Config::backends`.
    pub default: usize,
    /// Lower-cased domain → index into `Config::backends`.
    pub domains: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token: Option<Secret>,
    /// Every accepted bearer token with its name (`token_file` is named `admin`).
    pub tokens: Vec<(String, Secret)>,
    pub health_interval: Duration,
    pub rate_limit: HttpRateLimits,
}

/// Request limits of an HTTP listener (`admin.rate_limit`), each in requests per minute and at
/// least 1; `observe::limit` applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRateLimits {
    /// Requests other than the probes from one client address.
    pub per_ip: u32,
    /// Of which this many at once.
    pub burst: u32,
    /// Requests other than the probes from all addresses together.
    pub overall: u32,
    /// Failed credential checks from one client address.
    pub failed_auth: u32,
    /// Probe requests (`/metrics`, `/healthz`, `/readyz`) from one client address.
    pub probes_per_ip: u32,
}

impl Default for HttpRateLimits {
    fn default() -> Self {
        Self {
            per_ip: defaults::ADMIN_PER_IP,
            burst: defaults::ADMIN_BURST,
            overall: defaults::ADMIN_OVERALL,
            failed_auth: defaults::ADMIN_FAILED_AUTH,
            probes_per_ip: defaults::ADMIN_PROBES_PER_IP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    Stderr,
    File(PathBuf),
    /// RFC 5424 lines over TCP or TLS (`audit: syslog`).
    Syslog(SyslogConfig),
}

/// `logging.syslog`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    /// `host:port`, resolved at each connect.
    pub address: String,
    pub transport: SyslogTransport,
    /// The CA to verify a TLS syslog with (the system's roots when absent).
    pub ca_file: Option<PathBuf>,
    /// The name its certificate must carry (default: the address's host).
    pub server_name: String,
    /// The facility's number (RFC 5424 §6.2.1).
    pub facility: u8,
    /// The APP-NAME field: printable ASCII, at most 48 characters.
    pub app_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
    pub audit: AuditSink,
    pub audit_format: AuditFormat,
}

/// One problem in the file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), list(.0))]
    Invalid(Vec<FieldError>),
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The field errors, if the file was read.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid(e) => e,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are taken relative to the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::from_yaml(&text, base)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Validates YAML text; `base` resolves relative paths.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        validate::from_yaml(text, base)
    }

    /// The backend for a user, by the domain after the last '@'.
    pub fn route(&self, protocol: Protocol, user: &str) -> Option<&BackendConfig> {
        let routes = self.routes.get(&protocol)?;
        let idx = user
            .rsplit_once('@')
            .and_then(|(_, d)| routes.domains.get(&d.to_ascii_lowercase()))
            .copied()
            .unwrap_or(routes.default);
        self.backends.get(idx)
    }
}
