//! `imapgate users import`, `users export` and `migrate`: moving users between stores, bulk
//! creation from a CSV, and bringing a database to the current schema.

use std::path::Path;
use std::process::ExitCode;

use time::OffsetDateTime;

use super::{block_on, fail, target, UsersTarget, EXIT_CONFIG};
use crate::auth::app_password;
use crate::auth::users::{AppPassword, User, UsersFile, VERSION};
use crate::config::MfaMode;

/// At most this many lines in an import CSV (bigger rollouts: several files).
const MAX_CSV_LINES: usize = 100_000;

pub(super) fn migrate(config: &Path) -> ExitCode {
    let config = match super::load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.auth.store.backend == crate::config::StoreBackend::File {
        errln!("auth.store.backend is file: there is no database schema to migrate");
        return ExitCode::SUCCESS;
    }
    let result = block_on(async {
        let s = crate::store::sql::SqlStore::connect(&config.auth.store).await?;
        let before = s.current_version().await?;
        s.migrate().await?;
        let after = s.current_version().await?;
        s.close().await;
        Ok::<_, crate::store::StoreError>((before, after))
    });
    match result {
        Ok(Ok((before, after))) if before == after => {
            errln!("the credential store is at schema {after}: nothing to do");
            ExitCode::SUCCESS
        }
        Ok(Ok((before, after))) => {
            errln!("the credential store moved from schema {before} to {after}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => fail(1, e),
        Err(code) => code,
    }
}

pub(super) fn export(output: Option<&Path>, cfg: &UsersTarget) -> ExitCode {
    let tgt = match target(cfg) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let file = match super::read_all(&tgt) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let n = file.users.len();
    match output {
        // Written like any users file: locked, 0600, renamed into place.
        Some(path) => {
            if let Err(e) = file.save(path) {
                return fail(1, e);
            }
            errln!("exported {n} user(s) to {}", path.display());
        }
        None => match serde_saphyr::to_string(&file) {
            Ok(text) => outln!("{text}"),
            Err(e) => return fail(1, e),
        },
    }
    ExitCode::SUCCESS
}

pub(super) fn import(
    file: &Path,
    csv: bool,
    replace: bool,
    passwords_out: Option<&Path>,
    cfg: &UsersTarget,
) -> ExitCode {
    let tgt = match target(cfg) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let (incoming, passwords) = if csv {
        let auth = match super::index_settings(cfg, &tgt) {
            Ok(a) => a,
            Err(code) => return code,
        };
        match from_csv(file, &auth) {
            Ok(x) => x,
            Err(code) => return code,
        }
    } else {
        match UsersFile::load(file) {
            Ok(f) => (f, Vec::new()),
            Err(e) => return fail(EXIT_CONFIG, e),
        }
    };
    let store = match tgt.open() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report = match block_on(store.import(&incoming, replace)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(1, e),
        Err(code) => return code,
    };
    errln!(
        "imported into the {} store: {} added, {} replaced, {} already there (left alone)",
        store.backend().as_str(),
        report.added,
        report.replaced,
        report.skipped
    );
    if !passwords.is_empty() {
        // Only users that were added got their new app password stored; a skipped one keeps
        // what it had, so its line is not printed.
        let added: Vec<&(String, String)> = passwords
            .iter()
            .filter(|(name, _)| !report.skipped_users.contains(name))
            .collect();
        let text: String = added.iter().map(|(n, p)| format!("{n},{p}\n")).collect();
        match passwords_out {
            Some(path) => {
                if let Err(e) = write_private(path, &text) {
                    return fail(1, format!("cannot write {}: {e}", path.display()));
                }
                errln!(
                    "{} new app password(s) written to {} (mode 0600); hand them out and delete the file",
                    added.len(),
                    path.display()
                );
            }
            None => {
                use std::io::Write as _;
                let _ = std::io::stdout().write_all(text.as_bytes());
            }
        }
    }
    super::audited(
        ExitCode::SUCCESS,
        cfg,
        "users_imported",
        &format!("{} user(s)", report.added + report.replaced),
        "",
    )
}

/// Writes `text` to a new file of mode 0600 (refusing to overwrite one).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Users from a CSV of `address,upstream_user,mfa`, each with one new app password; and the
/// passwords as (address, grouped password).
fn from_csv(
    path: &Path,
    auth: &crate::config::AuthConfig,
) -> Result<(UsersFile, Vec<(String, String)>), ExitCode> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(EXIT_CONFIG, format!("cannot read {}: {e}", path.display())))?;
    let ring =
        crate::auth::keyring::KeyRing::new(auth.secret_keys.clone(), auth.active_key.clone());
    let mut file = UsersFile {
        version: VERSION,
        users: Default::default(),
    };
    let mut passwords = Vec::new();
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    for (i, line) in text.lines().enumerate().take(MAX_CSV_LINES + 1) {
        let at = i + 1;
        if at > MAX_CSV_LINES {
            return Err(fail(
                EXIT_CONFIG,
                format!(
                    "{}: more than {MAX_CSV_LINES} lines; split it",
                    path.display()
                ),
            ));
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if at == 1
            && cols
                .first()
                .is_some_and(|c| c.eq_ignore_ascii_case("address"))
        {
            continue;
        }
        let bad = |m: String| fail(EXIT_CONFIG, format!("{}:{at}: {m}", path.display()));
        if cols.is_empty() || cols.len() > 3 {
            return Err(bad("expected address,upstream_user,mfa".into()));
        }
        let name = crate::auth::normalize_user_with(
            cols.first().copied().unwrap_or_default(),
            crate::auth::NameRules::Unicode,
        )
        .map_err(|_| bad("not a valid address".into()))?;
        let upstream_user = match cols.get(1).copied().filter(|u| !u.is_empty()) {
            Some(u) if crate::auth::normalize_user(u).is_err() => {
                return Err(bad("upstream_user is not a valid name".into()))
            }
            other => other.map(str::to_owned),
        };
        let mfa = match cols.get(2).copied().unwrap_or_default() {
            "" => None,
            "required" => Some(MfaMode::Required),
            "optional" => Some(MfaMode::Optional),
            "off" => Some(MfaMode::Off),
            other => {
                return Err(bad(format!(
                    "mfa `{}` is not required, optional or off",
                    other.escape_debug()
                )))
            }
        };
        if file.users.contains_key(&name) {
            return Err(bad(format!("{name} is listed twice")));
        }
        let password = app_password::generate();
        let hash = app_password::hash(&password, auth.argon2).map_err(|e| fail(1, e))?;
        let lookup = ring.lookup_index(&password).map_err(|e| fail(1, e))?;
        file.users.insert(
            name.clone(),
            User {
                upstream_user,
                mfa,
                app_passwords: vec![AppPassword {
                    id: app_password::new_id(),
                    label: "imported".into(),
                    hash,
                    lookup: Some(lookup),
                    created: now,
                    expires: None,
                    revoked: false,
                }],
                ..Default::default()
            },
        );
        passwords.push((
            name,
            app_password::grouped(&password)
                .expose_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    Ok((file, passwords))
}
