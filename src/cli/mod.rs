//! Operator commands: `run`, `check-config`, `users …`, `app-password …`.
//!
//! Exit codes: 0 success, 64 configuration or usage error (one line per problem, as linkerd
//! does), 1 anything else. Nothing here prints a secret except `app-password create`, which
//! prints the new password once, alone on stdout, so scripts can capture it.

use std::path::{Path, PathBuf};

/// `println!` that does not panic when stdout is a closed pipe (`imapgate users list | head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that does not panic when stderr is closed.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `eprint!` likewise.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}
/// Runs `$remote` with the API named by `--admin` and returns its exit code, if one was given.
macro_rules! via_api {
    ($cfg:expr, |$r:ident| $remote:expr) => {
        match $cfg.remote() {
            Ok(Some($r)) => return $remote,
            Ok(None) => {}
            Err(code) => return code,
        }
    };
}
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;

use crate::auth::users::{AppPassword, User, UsersFile};
use crate::auth::{app_password, normalize_user};
use crate::config::Config;

mod doctor;
mod guard;
mod logins;
mod mfa;
mod oauth;
mod remote;
mod sessions;
mod transfer;

pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "imapgate",
    version,
    about = "TLS, MFA and OAuth2 in front of legacy IMAP servers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(short, long, env = "IMAPGATE_CONFIG")]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Run(ConfigArg),
    /// Validate a configuration file and print every problem.
    CheckConfig(ConfigArg),
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage app passwords.
    #[command(subcommand)]
    AppPassword(AppPasswordCmd),
    /// Enrol or reset a user's TOTP second factor.
    #[command(subcommand)]
    Totp(mfa::TotpCmd),
    /// Keys that encrypt TOTP secrets at rest.
    #[command(subcommand)]
    Keys(mfa::KeysCmd),
    /// OAuth helpers (get a token to test a login).
    #[command(subcommand)]
    Oauth(oauth::OAuthCmd),
    /// Check the configuration, certificates, backends, OAuth issuers and state store.
    Doctor(doctor::DoctorArgs),
    /// The running gateway's blocks and attack modes (via the admin listener).
    #[command(subcommand)]
    Guard(guard::GuardCmd),
    /// Bring the credential database (auth.store: sqlite or postgres) to the current schema.
    Migrate(ConfigArg),
    /// Relayed sessions of every replica: list them, end them (database stores).
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
}

/// Where the users file is: named by the config, or given directly (e.g. a local copy of a
/// Kubernetes Secret, edited without the gateway's other secrets at hand).
#[derive(clap::Args, Debug)]
pub struct UsersTarget {
    /// The configuration file (its `auth.users_file`, key ring and argon2 parameters are used).
    #[arg(
        short,
        long,
        env = "IMAPGATE_CONFIG",
        required_unless_present_any = ["users_file", "admin"]
    )]
    pub config: Option<PathBuf>,
    /// The users file itself; wins over `-c` (and over IMAPGATE_CONFIG, which the container
    /// image sets) for the file. `app-password create` still needs a configuration too, for
    /// its key ring.
    #[arg(long, conflicts_with = "admin")]
    pub users_file: Option<PathBuf>,
    /// Work through a running gateway's admin API instead (e.g. `http://127.0.0.1:9190`
    /// through a `kubectl port-forward`); wins over `-c` and IMAPGATE_CONFIG.
    #[arg(long, requires = "token_file")]
    pub admin: Option<String>,
    /// The admin bearer token (a file holding `admin.token_file`'s token or one of
    /// `admin.tokens`).
    #[arg(long, requires = "admin")]
    pub token_file: Option<PathBuf>,
}

impl UsersTarget {
    /// The admin API to use, when `--admin` was given.
    fn remote(&self) -> Result<Option<remote::Remote>, ExitCode> {
        match (&self.admin, &self.token_file) {
            (Some(url), Some(token)) => remote::Remote::new(url, token).map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum UsersCmd {
    /// Add a user (the full address).
    Add {
        user: String,
        /// The name the backend knows, if not the address.
        #[arg(long)]
        upstream_user: Option<String>,
        /// Overrides auth.mfa.default for this user.
        #[arg(long, value_enum)]
        mfa: Option<MfaArg>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Show one user (never a secret).
    Show {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// List users.
    List {
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Show a user's recent logins, newest first: time, result, reason, mechanism, address,
    /// listener, client, credential.
    Logins {
        user: String,
        /// At most this many (1-50).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Disable a user (logins refused, entries kept).
    Disable {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Enable a disabled user.
    Enable {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Remove a user and all their app passwords.
    Remove {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Add the users of a users file (or of a CSV of `address,upstream_user,mfa` lines, each
    /// given a new app password) to the store; users already there are left alone unless
    /// `--replace`.
    Import {
        /// A users file (YAML, as `users export` writes), or a CSV with `--csv`.
        file: PathBuf,
        /// FILE is a CSV: `address,upstream_user,mfa` (header optional; the last two may be
        /// empty). Each new user gets one app password, printed once as `address,password`
        /// (or written to `--passwords-out`).
        #[arg(long)]
        csv: bool,
        /// Replace users who exist already (YAML only).
        #[arg(long, conflicts_with = "csv")]
        replace: bool,
        /// With `--csv`: write the new app passwords to this file (created 0600) instead of
        /// stdout.
        #[arg(long, requires = "csv")]
        passwords_out: Option<PathBuf>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Write every user in the users file format (to stdout, or to `-o FILE`, created 0600).
    Export {
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppPasswordCmd {
    /// Create an app password and print it once.
    Create {
        user: String,
        #[arg(long, default_value = "")]
        label: String,
        /// Expire it after this long (e.g. 90d); default: never.
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// List a user's app passwords (never the passwords).
    List {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Revoke an app password by id.
    Revoke {
        user: String,
        id: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
}

/// `--mfa` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MfaArg {
    Required,
    Optional,
    Off,
}

impl MfaArg {
    fn name(self) -> &'static str {
        match self {
            MfaArg::Required => "required",
            MfaArg::Optional => "optional",
            MfaArg::Off => "off",
        }
    }

    fn mode(self) -> crate::config::MfaMode {
        match self {
            MfaArg::Required => crate::config::MfaMode::Required,
            MfaArg::Optional => crate::config::MfaMode::Optional,
            MfaArg::Off => crate::config::MfaMode::Off,
        }
    }
}

pub(crate) fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    errln!("imapgate: {msg}");
    ExitCode::from(code)
}

pub(crate) fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| fail(EXIT_CONFIG, e))
}

/// Runs a parsed command.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(c) => run(&c.config),
        Command::CheckConfig(c) => check_config(&c.config),
        Command::Users(u) => users(u),
        Command::AppPassword(a) => app_passwords(a),
        Command::Totp(t) => mfa::totp(t),
        Command::Keys(k) => mfa::keys(k),
        Command::Oauth(o) => oauth::oauth(o),
        Command::Guard(g) => guard::guard(g),
        Command::Doctor(d) => doctor::doctor(d),
        Command::Migrate(c) => transfer::migrate(&c.config),
        Command::Sessions(s) => sessions::sessions(s),
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = crate::observe::init_logging(&config.logging) {
        return fail(EXIT_CONFIG, format!("logging.audit: {e}"));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let code = rt.block_on(async move {
        // systemd Type=notify: READY/RELOADING/STOPPING go to $NOTIFY_SOCKET when it is set.
        let notify = crate::server::notify::Notifier::from_env();
        let gw = match crate::server::Gateway::start_notifying(config, notify).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return fail(1, e);
            }
        };
        wait_for_signal(&gw).await;
        gw.shutdown();
        gw.wait().await;
        ExitCode::SUCCESS
    });
    // The last audit lines still queued for a syslog.
    crate::observe::syslog::flush(std::time::Duration::from_secs(3));
    code
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads certificates and users meanwhile.
async fn wait_for_signal(gw: &crate::server::Gateway) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading certificates and users");
                    gw.reload();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = gw;
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            match &e {
                crate::config::ConfigError::Invalid(errors) => {
                    for err in errors {
                        errln!("{}: {err}", path.display());
                    }
                }
                other => errln!("imapgate: {other}"),
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Certificates and backend CAs are parsed as the gateway would at start.
    if let Err(e) = crate::tls::ServerTls::build(&config.tls) {
        return fail(
            EXIT_CONFIG,
            format!("{}: tls.certificates: {e}", path.display()),
        );
    }
    for (i, b) in config.backends.iter().enumerate() {
        if let Err(e) = crate::upstream::Backend::new(b.clone()) {
            return fail(
                EXIT_CONFIG,
                format!("{}: backends[{i}]: {e}", path.display()),
            );
        }
    }
    for w in &config.warnings {
        errln!("warning: {w}");
    }
    outln!("{}: ok", path.display());
    ExitCode::SUCCESS
}

/// Writes the operator audit line for a successful change (see [`crate::observe::audit_operator`]).
pub(crate) fn audited(
    code: ExitCode,
    cfg: &UsersTarget,
    action: &str,
    user: &str,
    credential: &str,
) -> ExitCode {
    if code == ExitCode::SUCCESS {
        let config = cfg.config.as_deref().and_then(|p| Config::load(p).ok());
        let users_file = cfg.users_file.clone().or_else(|| {
            config.as_ref().and_then(|c| match c.auth.store.backend {
                crate::config::StoreBackend::File => Some(c.auth.users_file.clone()),
                crate::config::StoreBackend::Sqlite => Some(c.auth.store.sqlite_path.clone()),
                // A shared database: the configured audit sink (and stderr) only.
                crate::config::StoreBackend::Postgres => None,
            })
        });
        let to = crate::observe::OperatorAudit {
            sink: config.as_ref().map(|c| &c.logging.audit),
            format: config
                .as_ref()
                .map(|c| c.logging.audit_format)
                .unwrap_or_default(),
            users_file: users_file.as_deref(),
        };
        crate::observe::audit_operator(&to, action, user, credential);
    }
    code
}

/// A user name for the users file: the wider (Unicode) rule, as the file itself accepts; a
/// non-ASCII name can log in only with `auth.unicode_names: true`.
pub(crate) fn user_name(user: &str) -> Result<String, ExitCode> {
    crate::auth::normalize_user_with(user, crate::auth::NameRules::Unicode).map_err(|_| {
        fail(
            EXIT_CONFIG,
            format!("`{}` is not a valid user name", user.escape_debug()),
        )
    })
}

/// The users file to work on, and the backends' master separators (a user name containing one
/// could never be logged into the backend).
pub(crate) struct Target {
    pub(crate) path: PathBuf,
    separators: Vec<String>,
    /// The auth section, when a config was given (TOTP needs its key ring).
    pub(crate) auth: Option<crate::config::AuthConfig>,
}

impl Target {
    /// A database store (`auth.store.backend: sqlite | postgres`), or `None` for the users file.
    fn database(&self) -> Option<&crate::config::AuthConfig> {
        self.auth
            .as_ref()
            .filter(|a| a.store.backend != crate::config::StoreBackend::File)
    }

    /// Opens the store this target names (migrating a database to the current schema).
    pub(crate) fn open(&self) -> Result<std::sync::Arc<dyn crate::store::UserStore>, ExitCode> {
        match self.database() {
            Some(auth) => block_on(crate::store::open(auth))?.map_err(|e| fail(1, e)),
            None => Ok(std::sync::Arc::new(crate::store::file::FileStore::new(
                self.path.clone(),
                self.auth
                    .as_ref()
                    .is_some_and(|a| a.allow_group_readable_secrets),
            ))),
        }
    }
}

/// Runs a future to completion on a small runtime of its own (the CLI is synchronous).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(f))
        .map_err(|e| fail(1, format!("cannot start the runtime: {e}")))
}

pub(crate) fn target(t: &UsersTarget) -> Result<Target, ExitCode> {
    if let Some(path) = &t.users_file {
        return Ok(Target {
            path: path.clone(),
            separators: Vec::new(),
            auth: None,
        });
    }
    let Some(cfg) = &t.config else {
        return Err(fail(EXIT_CONFIG, "give -c CONFIG or --users-file FILE"));
    };
    let config = load(cfg)?;
    let separators = config
        .backends
        .iter()
        .filter_map(|b| match &b.login {
            crate::config::BackendLogin::MasterUser { separator } => Some(separator.clone()),
            crate::config::BackendLogin::SaslAuthzid | crate::config::BackendLogin::Xclient => None,
        })
        .collect();
    Ok(Target {
        path: config.auth.users_file.clone(),
        separators,
        auth: Some(config.auth.clone()),
    })
}

/// Every user of the target's store.
pub(crate) fn read_all(tgt: &Target) -> Result<UsersFile, ExitCode> {
    if tgt.database().is_none() {
        return UsersFile::load_or_empty(&tgt.path).map_err(|e| fail(1, e));
    }
    let store = tgt.open()?;
    block_on(store.export())?.map_err(|e| fail(1, e))
}

/// The user named `user` as the store has it now, with its normalised name.
fn read_user(t: &UsersTarget, user: &str) -> Result<(String, User), ExitCode> {
    let name = user_name(user)?;
    let tgt = target(t)?;
    match read_one(&tgt, &name)? {
        Some(u) => Ok((name, u)),
        None => Err(fail(1, format!("no user {name}"))),
    }
}

/// One user of the target's store (`name` already normalised).
pub(crate) fn read_one(tgt: &Target, name: &str) -> Result<Option<User>, ExitCode> {
    if tgt.database().is_none() {
        return UsersFile::load_or_empty(&tgt.path)
            .map(|mut f| f.users.remove(name))
            .map_err(|e| fail(1, e));
    }
    let store = tgt.open()?;
    block_on(store.user(name))?.map_err(|e| fail(1, e))
}

/// The last-used records of `name` (`None`: this store keeps none, said once on stderr).
fn last_used(cfg: &UsersTarget, name: &str) -> Option<Vec<crate::store::Usage>> {
    let store = target(cfg).and_then(|t| t.open()).ok()?;
    match block_on(store.usage(name)).ok()? {
        Ok(list) => Some(list),
        Err(e) => {
            errln!("note: {e}");
            None
        }
    }
}

/// `last used 2025-06-01T09:30:12Z from 192.0.2.7 (Thunderbird)`.
fn describe_use(u: &crate::store::Usage) -> String {
    let when = OffsetDateTime::from_unix_timestamp(u.last_used)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| u.last_used.to_string());
    let client = if u.client.is_empty() {
        String::new()
    } else {
        format!(" ({})", u.client)
    };
    format!("last used {when} from {}{client}", u.address)
}

/// The user `name` of a file being edited, or the message that there is none.
pub(crate) fn user_mut<'f>(f: &'f mut UsersFile, name: &str) -> Result<&'f mut User, String> {
    f.users
        .get_mut(name)
        .ok_or_else(|| format!("no user {name}"))
}

/// `revoked`, `active` or `expired`, as `users show` and `app-password list` print it.
fn app_password_state(a: &AppPassword, now: OffsetDateTime) -> &'static str {
    if a.revoked {
        "revoked"
    } else if a.is_active(now) {
        "active"
    } else {
        "expired"
    }
}

/// Changes the users file: takes its lock, reads it, applies `f`, writes it back (see
/// [`UsersFile::update`]). Keep `f` quick: other writers wait for it.
pub(crate) fn edit(
    t: &UsersTarget,
    user: &str,
    f: impl FnOnce(&mut UsersFile, &Target) -> Result<(), String> + Send,
) -> ExitCode {
    match target(t) {
        Ok(tgt) => edit_at(&tgt, user, f),
        Err(code) => code,
    }
}

/// Applies `f` to every user: on the users file in one go under its lock; on a database one
/// user at a time, each under its own lock (`f` then sees a file holding that one user).
pub(crate) fn edit_all(
    tgt: &Target,
    f: impl Fn(&mut UsersFile) -> Result<(), String> + Sync,
) -> ExitCode {
    if tgt.database().is_none() {
        return edit_at(tgt, "", |file, _| f(file));
    }
    let names: Vec<String> = match read_all(tgt) {
        Ok(all) => all.users.into_keys().collect(),
        Err(code) => return code,
    };
    for name in names {
        let code = edit_at(tgt, &name, |file, _| f(file));
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    ExitCode::SUCCESS
}

/// [`edit`] for a target already resolved. On a database store `f` sees a users file that
/// holds only `user` (if it exists), read and written back under that user's lock; what `f`
/// leaves under that name is stored (nothing: the user is deleted).
pub(crate) fn edit_at(
    tgt: &Target,
    user: &str,
    f: impl FnOnce(&mut UsersFile, &Target) -> Result<(), String> + Send,
) -> ExitCode {
    if tgt.database().is_none() {
        let updated = UsersFile::update(&tgt.path, crate::auth::users::CLI_LOCK_WAIT, |file| {
            f(file, tgt).map(|()| true)
        });
        return match updated {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        };
    }
    let store = match tgt.open() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let name = user.to_owned();
    let change: crate::store::Change<'_> = Box::new(move |record| {
        let mut one = UsersFile {
            version: crate::auth::users::VERSION,
            users: Default::default(),
        };
        if let Some(r) = record.take() {
            one.users.insert(name.clone(), r);
        }
        f(&mut one, tgt)?;
        *record = one.users.remove(&name);
        Ok(true)
    });
    match block_on(store.modify(user, change)) {
        Ok(Ok(_)) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail(1, e),
        Err(code) => code,
    }
}

/// What `app-password create` needs from the configuration: the key ring (for the lookup
/// index), the argon2 parameters and the per-user cap. With `--users-file`, from the
/// configuration given as well (`-c` or IMAPGATE_CONFIG).
pub(super) fn index_settings(
    t: &UsersTarget,
    tgt: &Target,
) -> Result<crate::config::AuthConfig, ExitCode> {
    let auth = match (&tgt.auth, &t.config) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => load(c)?.auth,
        (None, None) => {
            return Err(fail(
                EXIT_CONFIG,
                "app-password create needs the key ring (auth.secret_keys) for the new app password's lookup index: give -c CONFIG too (--users-file still names the file)",
            ))
        }
    };
    if auth.active_key.is_none() {
        return Err(fail(
            EXIT_CONFIG,
            "auth.secret_keys is empty: app passwords need a key for their lookup index; add one (`imapgate keys generate`)",
        ));
    }
    Ok(auth)
}

/// Active app passwords whose lookup index cannot be used: none yet, or under a key that is
/// not in `ring` (when the ring is known).
fn without_index(u: &User, ring: Option<&crate::auth::keyring::KeyRing>) -> usize {
    let now = OffsetDateTime::now_utc();
    u.app_passwords
        .iter()
        .filter(|a| a.is_active(now))
        .filter(|a| match (a.lookup.as_deref(), ring) {
            (None, _) => true,
            (Some(l), Some(r)) => {
                !crate::auth::keyring::KeyRing::key_of(l).is_some_and(|k| r.has_key(k))
            }
            (Some(_), None) => false,
        })
        .count()
}

fn users(cmd: UsersCmd) -> ExitCode {
    match cmd {
        UsersCmd::Add {
            user,
            upstream_user,
            mfa,
            cfg,
        } => {
            via_api!(cfg, |r| remote::add_user(
                &r,
                &user,
                upstream_user,
                mfa.map(MfaArg::name)
            ));
            let mfa_mode = mfa.map(MfaArg::mode);
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            if let Some(u) = &upstream_user {
                if normalize_user(u).is_err() {
                    return fail(EXIT_CONFIG, "--upstream-user is not a valid name");
                }
            }
            let code = edit(&cfg, &name, |f, tgt| {
                if let Some(sep) = tgt.separators.iter().find(|s| {
                    name.contains(s.as_str())
                        || upstream_user
                            .as_deref()
                            .is_some_and(|u| u.contains(s.as_str()))
                }) {
                    return Err(format!("the name contains the backend's master separator `{sep}`; use --upstream-user"));
                }
                if f.users.contains_key(&name) {
                    return Err(format!("user {name} already exists"));
                }
                f.users.insert(
                    name.clone(),
                    User {
                        upstream_user,
                        mfa: mfa_mode,
                        ..Default::default()
                    },
                );
                errln!("added {name}");
                Ok(())
            });
            audited(code, &cfg, "user_added", &name, "")
        }
        UsersCmd::Show { user, cfg } => {
            via_api!(cfg, |r| remote::show_user(&r, &user));
            let (name, u) = match read_user(&cfg, &user) {
                Ok(found) => found,
                Err(c) => return c,
            };
            let now = OffsetDateTime::now_utc();
            outln!("user: {name}");
            outln!("state: {}", if u.disabled { "disabled" } else { "enabled" });
            outln!(
                "upstream user: {}",
                u.upstream_user.as_deref().unwrap_or(&name)
            );
            let mfa = u
                .mfa
                .map_or("default".to_owned(), |m| format!("{m:?}").to_lowercase());
            outln!("mfa: {mfa}");
            let totp = u
                .totp
                .as_deref()
                .and_then(crate::auth::keyring::KeyRing::key_of);
            outln!(
                "totp: {}",
                totp.map_or("not enrolled".to_owned(), |k| format!("enrolled (key {k})"))
            );
            if !u.mechanisms.is_empty() {
                outln!("mechanisms: {}", u.mechanisms.join(", "));
            }
            if !u.allowed_networks.is_empty() {
                let nets: Vec<String> =
                    u.allowed_networks.iter().map(ToString::to_string).collect();
                outln!("allowed networks: {}", nets.join(", "));
            }
            for a in &u.app_passwords {
                let state = app_password_state(a, now);
                outln!("app password {}\t{state}\t{}\t{}", a.id, a.created, a.label);
            }
            ExitCode::SUCCESS
        }
        UsersCmd::List { cfg } => {
            via_api!(cfg, |r| remote::list_users(&r));
            let tgt = match target(&cfg) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let ring = tgt.auth.as_ref().map(|a| {
                crate::auth::keyring::KeyRing::new(a.secret_keys.clone(), a.active_key.clone())
            });
            match read_all(&tgt) {
                Ok(f) => {
                    let mut unindexed = 0;
                    for (name, u) in &f.users {
                        let active = u
                            .app_passwords
                            .iter()
                            .filter(|a| a.is_active(OffsetDateTime::now_utc()))
                            .count();
                        let missing = without_index(u, ring.as_ref());
                        unindexed += missing;
                        let note = if missing > 0 {
                            format!("\twithout-index={missing}")
                        } else {
                            String::new()
                        };
                        outln!(
                            "{name}\t{}\tapp-passwords={active}{note}",
                            if u.disabled { "disabled" } else { "enabled" }
                        );
                    }
                    if unindexed > 0 {
                        errln!("{unindexed} active app password(s) have no usable lookup index: each is verified the old way (one argon2 run per such app password and wrong guess) until its next successful login writes one");
                    }
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        UsersCmd::Import {
            file,
            csv,
            replace,
            passwords_out,
            cfg,
        } => transfer::import(&file, csv, replace, passwords_out.as_deref(), &cfg),
        UsersCmd::Export { output, cfg } => transfer::export(output.as_deref(), &cfg),
        UsersCmd::Logins { user, limit, cfg } => logins::show(&user, limit, &cfg),
        UsersCmd::Disable { user, cfg } => set_disabled(&user, &cfg, true),
        UsersCmd::Enable { user, cfg } => set_disabled(&user, &cfg, false),
        UsersCmd::Remove { user, cfg } => {
            via_api!(cfg, |r| remote::remove_user(&r, &user));
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            let code = edit(&cfg, &name, |f, _| {
                f.users
                    .remove(&name)
                    .map(|_| errln!("removed {name}"))
                    .ok_or_else(|| format!("no user {name}"))
            });
            audited(code, &cfg, "user_removed", &name, "")
        }
    }
}

fn set_disabled(user: &str, cfg: &UsersTarget, disabled: bool) -> ExitCode {
    via_api!(cfg, |r| remote::set_disabled(&r, user, disabled));
    let name = match user_name(user) {
        Ok(n) => n,
        Err(c) => return c,
    };
    let code = edit(cfg, &name, |f, _| {
        let u = user_mut(f, &name)?;
        u.disabled = disabled;
        errln!("{name} {}", if disabled { "disabled" } else { "enabled" });
        Ok(())
    });
    let action = if disabled {
        "user_disabled"
    } else {
        "user_enabled"
    };
    audited(code, cfg, action, &name, "")
}

fn app_passwords(cmd: AppPasswordCmd) -> ExitCode {
    match cmd {
        AppPasswordCmd::Create {
            user,
            label,
            expires_in,
            cfg,
        } => {
            via_api!(cfg, |r| remote::create_app_password(
                &r,
                &user,
                &label,
                expires_in.as_deref()
            ));
            let expires = match expires_in
                .as_deref()
                .map(crate::config::units::parse_duration)
            {
                None => None,
                Some(Ok(d)) if !d.is_zero() => Some(OffsetDateTime::now_utc() + d),
                Some(_) => return fail(EXIT_CONFIG, "--expires-in must be a duration such as 90d"),
            };
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            if label.chars().any(char::is_control) || label.len() > 64 {
                return fail(
                    EXIT_CONFIG,
                    "--label must be at most 64 printable characters",
                );
            }
            let tgt = match target(&cfg) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let auth = match index_settings(&cfg, &tgt) {
                Ok(a) => a,
                Err(code) => return code,
            };
            let ring =
                crate::auth::keyring::KeyRing::new(auth.secret_keys.clone(), auth.active_key);
            let password = app_password::generate();
            // The slow part before the lock, so other writers do not wait for argon2.
            let hash = match app_password::hash(&password, auth.argon2) {
                Ok(h) => h,
                Err(e) => return fail(1, e),
            };
            let lookup = match ring.lookup_index(&password) {
                Ok(l) => l,
                Err(e) => return fail(1, e),
            };
            let cap = auth.max_app_passwords_per_user;
            let mut shown = None;
            let code = edit_at(&tgt, &name, |f, _| {
                let u = f
                    .users
                    .get_mut(&name)
                    .ok_or_else(|| format!("no user {name} (add it with `imapgate users add`)"))?;
                let now = OffsetDateTime::now_utc();
                let active = u.app_passwords.iter().filter(|a| a.is_active(now)).count();
                if active >= usize::try_from(cap).unwrap_or(usize::MAX) {
                    return Err(format!(
                        "{name} already has {active} active app passwords, the most auth.max_app_passwords_per_user ({cap}) allows: revoke one first (`imapgate app-password list {name}`)"
                    ));
                }
                let id = app_password::new_id();
                u.app_passwords.push(AppPassword {
                    id: id.clone(),
                    label: label.clone(),
                    hash,
                    lookup: Some(lookup),
                    created: now.replace_nanosecond(0).unwrap_or(now),
                    expires,
                    revoked: false,
                });
                shown = Some(id);
                Ok(())
            });
            if let Some(id) = shown.filter(|_| code == ExitCode::SUCCESS) {
                errln!("app password {id} for {name}; it is shown only this once:");
                let grouped = app_password::grouped(&password);
                outln!("{}", grouped.expose_str().unwrap_or_default());
                return audited(code, &cfg, "app_password_created", &name, &id);
            }
            code
        }
        AppPasswordCmd::List { user, cfg } => {
            via_api!(cfg, |r| remote::list_app_passwords(&r, &user));
            let (name, u) = match read_user(&cfg, &user) {
                Ok(found) => found,
                Err(c) => return c,
            };
            let usage = last_used(&cfg, &name);
            let now = OffsetDateTime::now_utc();
            for a in &u.app_passwords {
                let state = app_password_state(a, now);
                let used = match &usage {
                    None => "last used: unknown".to_owned(),
                    Some(list) => list
                        .iter()
                        .find(|x| {
                            x.scope == crate::store::UsageScope::AppPassword && x.credential == a.id
                        })
                        .map_or_else(|| "last used: never".to_owned(), describe_use),
                };
                outln!("{}\t{}\t{}\t{}\t{used}", a.id, state, a.created, a.label);
            }
            ExitCode::SUCCESS
        }
        AppPasswordCmd::Revoke { user, id, cfg } => {
            via_api!(cfg, |r| remote::revoke_app_password(&r, &user, &id));
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            let code = edit(&cfg, &name, |f, _| {
                let u = user_mut(f, &name)?;
                let a = u
                    .app_passwords
                    .iter_mut()
                    .find(|a| a.id == id)
                    .ok_or_else(|| format!("no app password {id}"))?;
                a.revoked = true;
                errln!("revoked {id} of {name}");
                Ok(())
            });
            audited(code, &cfg, "app_password_revoked", &name, &id)
        }
    }
}
