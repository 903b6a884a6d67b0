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
pub struct Listener {
    pub name: String,
    pub address: String,
    pub tls: ListenerTls,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTls {
    Implicit,
    Starttls,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    pub min_version: Option<String>,
    #[serde(default)]
    pub self_signed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
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
pub struct Auth {
    pub users_file: String,
    #[serde(default)]
    pub app_password: AppPassword,
    pub failure_floor: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AppPassword {
    pub argon2: Option<Argon2>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2 {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub backend: Option<StateBackend>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    Memory,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub address: String,
    pub tls: BackendTls,
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub login: LoginMode,
    pub master_user: String,
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
pub enum LoginMode {
    MasterUser,
    SaslAuthzid,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    pub default: String,
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<String>,
    pub token_file: Option<String>,
    pub health_interval: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
    pub audit: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}
