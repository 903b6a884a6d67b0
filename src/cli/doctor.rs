//! `imapgate doctor -c FILE`: everything the gateway depends on, checked the way the gateway
//! uses it, as a pass/fail list. Exit 0 when nothing failed (warnings allowed), 1 otherwise,
//! 64 when the configuration itself is invalid.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};

use super::{fail, EXIT_CONFIG};
use crate::config::{BackendConfig, BackendLogin, BackendTls, Config, Protocol};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The configuration file.
    #[arg(short, long, env = "IMAPGATE_CONFIG")]
    pub config: PathBuf,
    /// Also log into each backend as this user with the master credential (a test account).
    #[arg(long)]
    pub user: Option<String>,
    /// Check that some certificate is valid for this name (what clients connect to).
    #[arg(long)]
    pub server_name: Option<String>,
}

/// RFC 8437: after login, the way back to the backend's own login (see `backends`).
const UNAUTHENTICATE: &str = "UNAUTHENTICATE";

/// Warn when a certificate expires within this long.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

#[derive(Default)]
struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        outln!("[ok]   {what}: {detail}");
    }
    fn warn(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.warned += 1;
        outln!("[warn] {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.failed += 1;
        outln!("[FAIL] {what}: {detail}");
    }
}

pub(super) fn doctor(args: DoctorArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            outln!("[FAIL] config {}: {e}", args.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let user = match args.user.as_deref().map(super::user_name).transpose() {
        Ok(u) => u,
        Err(code) => return code,
    };
    let mut r = Report::default();
    r.ok("config", args.config.display());
    for w in &config.warnings {
        r.warn("config", w);
    }
    certificates(&mut r, &config, args.server_name.as_deref());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    if config.auth.store.backend == crate::config::StoreBackend::File {
        users_file(&mut r, &config);
    } else {
        rt.block_on(database(&mut r, &config));
    }
    rt.block_on(async {
        backends(&mut r, &config, user.as_deref()).await;
        issuers(&mut r, &config).await;
        state(&mut r, &config).await;
    });
    if config.admin.token.is_none() {
        r.warn(
            "admin",
            "no admin.token_file: the guard's blocks cannot be listed or cleared",
        );
    }
    outln!("doctor: {} failed, {} warning(s)", r.failed, r.warned);
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn certificates(r: &mut Report, config: &Config, server_name: Option<&str>) {
    // The gateway's own loader: chains parse, keys parse and match their certificate.
    if let Err(e) = crate::tls::ServerTls::build(&config.tls) {
        r.fail("certificates", e);
        return;
    }
    if config.tls.self_signed {
        r.warn(
            "certificates",
            "tls.self_signed: a throwaway certificate no client trusts (development only)",
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut leaves = Vec::new();
    for c in &config.tls.certificates {
        let what = format!("certificate {}", c.cert_file.display());
        let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&c.cert_file)
            .and_then(|i| i.collect::<Result<_, _>>())
        {
            Ok(ch) => ch,
            Err(e) => {
                r.fail(&what, e);
                continue;
            }
        };
        let Some(leaf) = chain.first().cloned() else {
            r.fail(&what, "no certificate in the file");
            continue;
        };
        if webpki::EndEntityCert::try_from(&leaf).is_err() {
            r.fail(&what, "the leaf certificate does not parse as X.509 v3");
            continue;
        }
        let detail = format!(
            "key matches; chain of {} certificate(s){}",
            chain.len(),
            if chain.len() == 1 {
                " (no intermediates: fine for a private CA, but clients of a public CA need them)"
            } else {
                ""
            }
        );
        match crate::tls::x509::not_after(&leaf) {
            None => r.warn(&what, format!("{detail}; expiry unreadable")),
            Some(t) if t <= now => r.fail(&what, format!("{detail}; EXPIRED")),
            Some(t) => {
                let days = (t - now) / 86_400;
                if (t - now) < i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(0) {
                    r.warn(&what, format!("{detail}; expires in {days} day(s)"));
                } else {
                    r.ok(&what, format!("{detail}; expires in {days} days"));
                }
            }
        }
        leaves.push(leaf);
    }
    if let Some(name) = server_name {
        let Ok(sn) = ServerName::try_from(name.to_owned()) else {
            r.fail(
                "--server-name",
                format!("`{name}` is not a DNS name or address"),
            );
            return;
        };
        let valid = leaves.iter().any(|l| {
            webpki::EndEntityCert::try_from(l)
                .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&sn).is_ok())
        });
        if valid {
            r.ok("certificates", format!("one is valid for {name}"));
        } else {
            r.fail(
                "certificates",
                format!("none is valid for {name}: clients connecting to it will refuse the certificate"),
            );
        }
    }
}

/// A database store: reachable, at the schema this binary writes (a newer one is refused: an
/// older binary must not run against it), how many users, and whether its records load.
async fn database(r: &mut Report, config: &Config) {
    let store_cfg = &config.auth.store;
    let what = match store_cfg.backend {
        crate::config::StoreBackend::Sqlite => {
            format!(
                "credential store sqlite {}",
                store_cfg.sqlite_path.display()
            )
        }
        _ => "credential store postgres".to_owned(),
    };
    let s = match crate::store::sql::SqlStore::connect(store_cfg).await {
        Ok(s) => s,
        Err(e) => return r.fail(&what, e),
    };
    let version = match s.current_version().await {
        Ok(v) => v,
        Err(e) => return r.fail(&what, e),
    };
    let want = crate::store::sql::schema_version();
    if version == 0 {
        s.close().await;
        return r.warn(
            &what,
            "no schema yet: the gateway creates it at start (or run `imapgate migrate`)",
        );
    }
    use crate::store::UserStore as _;
    let users = match s.export().await {
        Ok(f) => f,
        Err(e) => return r.fail(&what, format!("the records do not load: {e}")),
    };
    s.close().await;
    let detail = format!("{} user(s), schema {version}", users.users.len());
    if version < want {
        r.warn(
            &what,
            format!(
                "{detail}: the gateway migrates it to {want} at start (or run `imapgate migrate`)"
            ),
        );
    } else if version > want {
        r.fail(
            &what,
            format!("{detail}: newer than this binary's {want}; run the newer imapgate"),
        );
    } else {
        r.ok(&what, detail);
    }
}

/// The users file as the gateway loads it (mode, content), and app passwords that still lack
/// a usable lookup index or exceed the per-user cap.
fn users_file(r: &mut Report, config: &Config) {
    let a = &config.auth;
    let what = format!("users file {}", a.users_file.display());
    match crate::config::file_mode::check(&a.users_file, a.allow_group_readable_secrets) {
        Ok(None) => {}
        Ok(Some(w)) => r.warn(&what, w),
        Err(e) => {
            r.fail(&what, e);
            return;
        }
    }
    let file = match crate::auth::users::UsersFile::load(&a.users_file) {
        Ok(f) => f,
        Err(e) => {
            r.fail(&what, e);
            return;
        }
    };
    let ring = crate::auth::keyring::KeyRing::new(a.secret_keys.clone(), a.active_key.clone());
    let cap = usize::try_from(a.max_app_passwords_per_user).unwrap_or(usize::MAX);
    let now = time::OffsetDateTime::now_utc();
    let (mut unindexed, mut over) = (0, 0);
    for u in file.users.values() {
        unindexed += super::without_index(u, Some(&ring));
        if u.app_passwords.iter().filter(|p| p.is_active(now)).count() > cap {
            over += 1;
        }
    }
    let mut notes = Vec::new();
    if unindexed > 0 {
        notes.push(format!("{unindexed} active app password(s) have no usable lookup index (made before indexes, or indexed under a key no longer in auth.secret_keys): a wrong guess against their user costs one argon2 run per such app password, at most {cap}; each gains an index at its next successful login if the gateway can write the file (`imapgate users list` names the users)"));
    }
    if over > 0 {
        notes.push(format!(
            "{over} user(s) have more than auth.max_app_passwords_per_user ({cap}) active app passwords"
        ));
    }
    let detail = format!("{} user(s)", file.users.len());
    if notes.is_empty() {
        r.ok(
            &what,
            format!("{detail}; every active app password is indexed"),
        );
    } else {
        r.warn(&what, format!("{detail}; {}", notes.join("; ")));
    }
}

/// Each backend as a session uses it: the greeting, TLS and what it announces (IMAP
/// capabilities, SMTP EHLO extensions, POP3 CAPA); with `--user`, the login as that user.
async fn backends(r: &mut Report, config: &Config, user: Option<&str>) {
    for b in &config.backends {
        // `backend NAME (imap 127.0.0.1:993, tls implicit)`: the config's words.
        let what = format!(
            "backend {} ({} {}:{}, tls {})",
            b.name,
            b.protocol.as_str(),
            b.host,
            b.port,
            match b.tls {
                BackendTls::Implicit => "implicit",
                BackendTls::Starttls => "starttls",
                BackendTls::None => "none",
            }
        );
        let backend = match crate::upstream::Backend::new(b.clone()) {
            Ok(x) => x,
            Err(e) => {
                r.fail(&what, e);
                continue;
            }
        };
        match backend.diagnose().await {
            Ok(announced) => {
                let (detail, mut notes) = match b.protocol {
                    Protocol::Imap => imap_notes(&announced),
                    Protocol::Smtp => smtp_notes(b, &announced),
                    Protocol::Pop3 => pop3_notes(b, &announced),
                };
                if b.tls == BackendTls::None {
                    notes.insert(0, "cleartext (trusted network only)");
                }
                if notes.is_empty() {
                    r.ok(&what, detail);
                } else {
                    r.warn(&what, format!("{detail} — {}", notes.join("; ")));
                }
            }
            Err(e) => {
                r.fail(&what, e);
                continue;
            }
        }
        if let Some(u) = user {
            match backend.diagnose_login(u).await {
                Ok(caps)
                    if b.protocol == Protocol::Imap
                        && caps.iter().any(|c| c.eq_ignore_ascii_case(UNAUTHENTICATE)) =>
                {
                    r.warn(&what, format!("logged in as {u} with the master credential, but the backend offers UNAUTHENTICATE (RFC 8437) after login: the gateway leaves it out of the client's login reply, yet relays every command unchanged, so a client that sends it is back at the backend's own login with no second factor. Turn it off on the backend (docs/backends.md)"));
                }
                Ok(_) if b.login == BackendLogin::Xclient => r.ok(
                    &what,
                    format!("handed over as {u} with XCLIENT, and EHLO answered after it"),
                ),
                Ok(_) => r.ok(
                    &what,
                    format!("logged in as {u} with the master credential"),
                ),
                Err(e) => r.fail(&what, e),
            }
        }
    }
}

/// IMAP: the capability list, and what in it breaks the master login or the second factor.
fn imap_notes(caps: &[String]) -> (String, Vec<&'static str>) {
    let mut notes = Vec::new();
    if caps.iter().any(|c| c.eq_ignore_ascii_case("LOGINDISABLED")) {
        notes.push("LOGINDISABLED offered: master LOGIN will fail");
    }
    if caps.iter().any(|c| c.eq_ignore_ascii_case(UNAUTHENTICATE)) {
        notes.push("UNAUTHENTICATE offered: turn it off on the backend (docs/backends.md)");
    }
    (
        format!("greeting and capabilities: {}", caps.join(" ")),
        notes,
    )
}

/// SMTP: the EHLO extensions (the ones the handover needs were checked by `diagnose`).
fn smtp_notes(b: &BackendConfig, extensions: &[String]) -> (String, Vec<&'static str>) {
    let after = if b.tls == BackendTls::Starttls {
        "greeting, STARTTLS and EHLO"
    } else {
        "greeting and EHLO"
    };
    let handover = match b.login {
        BackendLogin::Xclient => "XCLIENT offered to the gateway",
        _ => "AUTH PLAIN offered",
    };
    let listed = if extensions.is_empty() {
        "none".to_owned()
    } else {
        extensions.join(", ")
    };
    (
        format!("{after}; {handover}; extensions: {listed}"),
        Vec::new(),
    )
}

/// POP3: the CAPA lines (RFC 2449), and whether the login the config asks for is announced.
fn pop3_notes(b: &BackendConfig, capa: &[String]) -> (String, Vec<&'static str>) {
    let greeting = if b.tls == BackendTls::Starttls {
        "greeting and STLS"
    } else {
        "greeting"
    };
    if capa.is_empty() {
        return (
            format!("{greeting}; no CAPA answer (RFC 2449 is optional: nothing to check)"),
            Vec::new(),
        );
    }
    let mut notes = Vec::new();
    let keyword = |k: &str| {
        capa.iter().find(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(k))
        })
    };
    match b.login {
        BackendLogin::MasterUser { .. } if keyword("USER").is_none() => {
            notes.push("CAPA has no USER: the master login (USER/PASS) will likely be refused");
        }
        BackendLogin::SaslAuthzid
            if !keyword("SASL").is_some_and(|l| {
                l.split_whitespace()
                    .skip(1)
                    .any(|m| m.eq_ignore_ascii_case("PLAIN"))
            }) =>
        {
            notes.push(
                "CAPA has no SASL PLAIN: the master login (AUTH PLAIN) will likely be refused",
            );
        }
        _ => {}
    }
    (format!("{greeting} and CAPA: {}", capa.join(", ")), notes)
}

/// The state store: memory needs nothing; Redis must answer and must not evict keys before
/// their TTL (a used TOTP code evicted early could be replayed).
async fn state(r: &mut Report, config: &Config) {
    let Some(cfg) = config
        .state
        .redis
        .as_ref()
        .filter(|_| config.state.backend == crate::config::StateBackend::Redis)
    else {
        r.ok(
            "state",
            format!(
                "in-process memory, at most {} entries (nothing to reach)",
                config.state.max_entries
            ),
        );
        return;
    };
    // The Redis client's TLS uses the process default provider: ours.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let redis = match crate::state::RedisStore::new(cfg) {
        Ok(x) => x,
        Err(e) => return r.fail("state (redis)", e),
    };
    if let Err(e) = redis.ping().await {
        return r.fail("state (redis)", e);
    }
    use crate::state::Eviction;
    const FIX: &str = "set `maxmemory-policy noeviction` for the gateway's Redis (CONFIG SET maxmemory-policy noeviction, and in redis.conf), or `maxmemory 0`";
    match redis.eviction().await {
        Ok(Eviction::Never) => r.ok(
            "state (redis)",
            "answers; keys are never evicted before their TTL (noeviction or no maxmemory)",
        ),
        Ok(Eviction::Possible(policy)) if cfg.allow_eviction => r.warn(
            "state (redis)",
            format!("maxmemory-policy {policy} may evict used TOTP codes before they expire (accepted by state.redis.allow_eviction); to close this, {FIX}"),
        ),
        Ok(Eviction::Possible(policy)) => r.fail(
            "state (redis)",
            format!("maxmemory-policy {policy} with a maxmemory may evict used TOTP codes before they expire, so a code could be replayed, and /readyz stays false: {FIX} (or accept the risk with state.redis.allow_eviction: true)"),
        ),
        Ok(Eviction::Unknown) if cfg.allow_eviction => r.warn(
            "state (redis)",
            "cannot read maxmemory-policy (CONFIG GET and INFO refused); accepted by state.redis.allow_eviction",
        ),
        Ok(Eviction::Unknown) => r.fail(
            "state (redis)",
            format!("cannot read maxmemory-policy (CONFIG GET and INFO refused), and /readyz stays false: allow INFO for the gateway's ACL user and {FIX} (or accept the risk with state.redis.allow_eviction: true)"),
        ),
        Err(e) => r.fail("state (redis)", e),
    }
}

async fn issuers(r: &mut Report, config: &Config) {
    for i in &config.auth.oauth_issuers {
        let what = format!("oauth issuer {} ({})", i.name, i.issuer);
        match crate::auth::oauth::diagnose_issuer(i).await {
            Ok(s) => r.ok(&what, s),
            Err(e) => r.fail(&what, e),
        }
    }
}
