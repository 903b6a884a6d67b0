//! Stage one of the config: strict serde structs that mirror the YAML file.
//!
//! Every struct denies unknown fields. Fields are optional where the file may leave them out;
//! the defaults are applied in stage two (`validate.rs`), where they are named constants.
//! Durations and sizes are kept as text here and parsed with their YAML path in stage two.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::units::Scalar;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Listener {
    pub name: String,
    pub address: String,
    pub tls: ListenerTls,
    /// Which mail protocol this listener speaks (default imap).
    #[serde(default)]
    pub protocol: Protocol,
    /// SMTP: the name in the greeting and the EHLO reply (default: the machine's host name).
    pub hostname: Option<String>,
    /// Expect a PROXY protocol v1/v2 header (from `guard.trusted_proxies` only).
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// A mail protocol the gateway fronts (listeners) or logs into (backends).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Imap,
    Smtp,
    Pop3,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Smtp, Protocol::Pop3];

    /// The config word, also the `protocol` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTls {
    Implicit,
    Starttls,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    pub min_version: Option<String>,
    #[serde(default)]
    pub self_signed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Certificate {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub max_connections: Option<u32>,
    pub max_preauth_per_ip: Option<u32>,
    pub max_sessions_per_ip: Option<u32>,
    pub max_sessions_per_user: Option<u32>,
    pub line_bytes: Option<Scalar>,
    pub literal_bytes: Option<Scalar>,
    pub sasl_bytes: Option<Scalar>,
    pub tls_handshake_timeout: Option<Scalar>,
    pub preauth_idle_timeout: Option<Scalar>,
    pub preauth_total_timeout: Option<Scalar>,
    pub bad_commands_before_bye: Option<u32>,
    pub auth_failures_per_connection: Option<u32>,
    pub relay_idle_timeout: Option<Scalar>,
    pub max_session_lifetime: Option<Scalar>,
    pub shutdown_delay: Option<Scalar>,
    pub shutdown_grace: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Auth {
    /// The users file: `store.backend: file` (implied when given without a store section).
    pub users_file: Option<String>,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub secret_keys: Vec<SecretKey>,
    pub active_key: Option<String>,
    #[serde(default)]
    pub app_password: AppPassword,
    #[serde(default)]
    pub mfa: Mfa,
    pub verified_cache_ttl: Option<Scalar>,
    pub failure_floor: Option<Scalar>,
    /// Default true: revocations end live sessions.
    #[serde(default = "yes")]
    pub revoke_closes_sessions: bool,
    #[serde(default)]
    pub oauth: OAuth,
    /// Accept non-ASCII user names (NFKC + confusable checks); default ASCII only.
    #[serde(default)]
    pub unicode_names: bool,
    pub max_app_passwords_per_user: Option<u32>,
    #[serde(default)]
    pub allow_group_readable_secrets: bool,
}

/// `auth.store`: where users, app passwords and TOTP enrolments live.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Store {
    pub backend: Option<super::StoreBackend>,
    #[serde(default)]
    pub sqlite: Sqlite,
    pub postgres: Option<Postgres>,
    pub on_error: Option<super::StoreOnError>,
    pub cache_ttl: Option<Scalar>,
    pub poll_interval: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Sqlite {
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Postgres {
    pub url_file: Option<String>,
    pub url_env: Option<String>,
    pub ca_file: Option<String>,
    pub pool_size: Option<u32>,
    pub statement_timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct OAuth {
    #[serde(default)]
    pub issuers: Vec<Issuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Issuer {
    pub name: String,
    pub issuer: String,
    pub discovery: Option<bool>,
    pub jwks_uri: Option<String>,
    pub ca_file: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Option<Vec<String>>,
    pub user_claim: Option<String>,
    pub user_domain: Option<String>,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    #[serde(default)]
    pub require_amr: Vec<String>,
    #[serde(default)]
    pub require_acr: Vec<String>,
    pub accept_id_tokens: Option<bool>,
    pub leeway: Option<Scalar>,
    pub key_refresh_interval: Option<Scalar>,
    #[serde(default)]
    pub end_session_at_expiry: bool,
    pub introspection: Option<Introspection>,
    /// Mail domains this issuer's tokens may log into (empty: any).
    #[serde(default)]
    pub domains: Vec<String>,
    /// With `user_claim: email`, require `email_verified: true` (default true).
    pub require_email_verified: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Introspection {
    pub endpoint: Option<String>,
    pub client_id: String,
    pub client_secret_file: Option<String>,
    pub client_secret_env: Option<String>,
    pub cache_ttl: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretKey {
    pub id: String,
    pub file: Option<String>,
    pub env: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Mfa {
    pub default: Option<MfaMode>,
    pub code_digits: Option<u8>,
    pub unlock_ttl: Option<Scalar>,
    pub unlock_bind_subnet: Option<bool>,
    pub issuer: Option<String>,
    /// `off` (the default; YAML's `off` is also read as `false`) or `portal`.
    pub approval: Option<Approval>,
    pub approval_ttl: Option<Scalar>,
    pub approval_max_pending: Option<u32>,
    pub approval_per_source: Option<u32>,
    pub approval_webhook_url: Option<String>,
    pub approval_webhook_secret_file: Option<String>,
    pub approval_webhook_secret_env: Option<String>,
}

/// `auth.mfa.approval`: `portal`, or off (`off`, which plain YAML reads as `false`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum Approval {
    Flag(bool),
    Name(String),
}

/// When a TOTP code is required.
#[derive(Debug, serde::Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MfaMode {
    /// Always: a user without TOTP cannot log in.
    Required,
    /// Only from users who enrolled TOTP.
    Optional,
    /// Never.
    Off,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct AppPassword {
    pub argon2: Option<Argon2>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Argon2 {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct State {
    pub backend: Option<StateBackend>,
    pub max_entries: Option<u32>,
    pub redis: Option<Redis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Redis {
    pub url_file: Option<String>,
    pub url_env: Option<String>,
    pub ca_file: Option<String>,
    pub key_prefix: Option<String>,
    pub on_error: Option<OnError>,
    pub timeout: Option<Scalar>,
    pub allow_eviction: Option<bool>,
}

/// What the gateway does while Redis cannot be reached.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Keep serving with this replica's own state.
    Local,
    /// Refuse what needs the shared state.
    FailClosed,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    Memory,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Backend {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub address: String,
    pub tls: BackendTls,
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub login: LoginMode,
    pub master_user: Option<String>,
    pub master_password_file: Option<String>,
    pub master_password_env: Option<String>,
    pub master_separator: Option<String>,
    #[serde(default)]
    pub send_id: bool,
    pub connect_timeout: Option<Scalar>,
    pub login_timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendTls {
    Implicit,
    Starttls,
    None,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum LoginMode {
    MasterUser,
    SaslAuthzid,
    /// SMTP only: Postfix's `XCLIENT LOGIN=…` (the gateway in `smtpd_authorized_xclient_hosts`).
    Xclient,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Routes {
    /// IMAP's routes (the keys this section always had).
    pub default: Option<String>,
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
    /// SMTP submission's and POP3's routes, each like IMAP's.
    pub smtp: Option<ProtocolRoutes>,
    pub pop3: Option<ProtocolRoutes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProtocolRoutes {
    pub default: String,
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    pub address: Option<String>,
    pub token_file: Option<String>,
    /// More bearer tokens, each with the name the audit log gives its actions.
    #[serde(default)]
    pub tokens: Vec<NamedToken>,
    pub health_interval: Option<Scalar>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NamedToken {
    pub name: String,
    pub file: String,
}

/// `admin.rate_limit`: requests per minute (see `observe::limit`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimit {
    pub per_ip: Option<u32>,
    pub burst: Option<u32>,
    pub overall: Option<u32>,
    pub failed_auth: Option<u32>,
    pub probes_per_ip: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Logging {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
    pub audit: Option<String>,
    pub audit_format: Option<AuditFormat>,
    pub syslog: Option<Syslog>,
}

/// The audit line's field names: today's (`json`) or Elastic Common Schema (`ecs`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuditFormat {
    #[default]
    Json,
    Ecs,
}

/// `logging.syslog`: where `audit: syslog` sends its RFC 5424 lines.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Syslog {
    pub address: Option<String>,
    pub transport: Option<SyslogTransport>,
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub facility: Option<String>,
    pub app_name: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyslogTransport {
    Tcp,
    Tls,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// `required`, `optional` or `off`; YAML 1.1 readers turn a bare `off` into `false`, which is
/// accepted as `off` too.
impl<'de> Deserialize<'de> for MfaMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MfaMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("required, optional or off")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MfaMode, E> {
                match v {
                    "required" => Ok(MfaMode::Required),
                    "optional" => Ok(MfaMode::Optional),
                    "off" => Ok(MfaMode::Off),
                    other => Err(E::custom(format!(
                        "`{other}` is not required, optional or off"
                    ))),
                }
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<MfaMode, E> {
                if v {
                    Err(E::custom("use required, optional or off"))
                } else {
                    Ok(MfaMode::Off)
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Guard {
    pub enforce: Option<bool>,
    pub subnet_v4: Option<u8>,
    pub subnet_v6: Option<u8>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub per_ip: Option<Budget>,
    pub per_subnet: Option<Budget>,
    pub per_account: Option<Budget>,
    pub per_token_ip: Option<Budget>,
    pub per_token_subnet: Option<Budget>,
    pub wrong_codes: Option<Budget>,
    pub suspect_for: Option<Scalar>,
    pub spray: Option<Spray>,
    pub known_good_ttl: Option<Scalar>,
    pub tarpit: Option<Tarpit>,
    pub max_delayed_per_ip: Option<u32>,
    pub block_for: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Budget {
    pub failures: Option<u32>,
    pub per: Option<Scalar>,
    pub enforce: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Spray {
    pub distinct_accounts: Option<u32>,
    pub per: Option<Scalar>,
    pub enforce: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Tarpit {
    pub start: Option<Scalar>,
    pub max: Option<Scalar>,
    pub enforce: Option<bool>,
}

fn yes() -> bool {
    true
}
