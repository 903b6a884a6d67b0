//! `imapgate totp …` and `imapgate keys …`: the second factor and its keys at rest.
//!
//! `totp enroll` prints the `otpauth://` URI (alone on stdout, so scripts can take it) and a
//! QR code with instructions on stderr, then asks for the first code and saves only if it
//! verifies (`--no-verify` skips that for scripted use). The secret is stored only encrypted.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::Subcommand;

use super::{edit, fail, target, user_mut, user_name, UsersTarget, EXIT_CONFIG};
use crate::auth::keyring::{self, KeyRing};
use crate::auth::totp;
use crate::config::AuthConfig;

#[derive(Subcommand, Debug)]
pub enum TotpCmd {
    /// Enrol a user: show the otpauth URI and QR code, check a first code, save.
    Enroll {
        user: String,
        /// Save without asking for a first code (scripts; the person must still scan it).
        #[arg(long)]
        no_verify: bool,
        /// Replace an existing enrolment.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// Remove a user's TOTP secret (they must enrol again).
    Reset {
        user: String,
        #[command(flatten)]
        cfg: UsersTarget,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Print a new random 256-bit key (base64) for auth.secret_keys.
    Generate,
    /// Re-encrypt every TOTP secret under auth.active_key.
    Rotate {
        #[command(flatten)]
        cfg: UsersTarget,
    },
}

fn ring(auth: &Option<AuthConfig>) -> Result<(KeyRing, &AuthConfig), ExitCode> {
    let Some(auth) = auth.as_ref() else {
        return Err(fail(
            EXIT_CONFIG,
            "TOTP commands need -c CONFIG (for the key ring in auth.secret_keys)",
        ));
    };
    if auth.active_key.is_none() {
        return Err(fail(
            EXIT_CONFIG,
            "auth.secret_keys is empty: add a key (`imapgate keys generate`)",
        ));
    }
    Ok((
        KeyRing::new(auth.secret_keys.clone(), auth.active_key.clone()),
        auth,
    ))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn totp(cmd: TotpCmd) -> ExitCode {
    match cmd {
        TotpCmd::Enroll {
            user,
            no_verify,
            force,
            cfg,
        } => {
            if cfg.admin.is_some() && no_verify {
                return fail(
                    EXIT_CONFIG,
                    "--no-verify cannot be used with --admin: the API stores an enrolment only with a first valid code",
                );
            }
            via_api!(cfg, |r| super::remote::enroll_totp(&r, &user, force));
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            let tgt = match target(&cfg) {
                Ok(t) => t,
                Err(c) => return c,
            };
            let (ring, auth) = match ring(&tgt.auth) {
                Ok(x) => x,
                Err(c) => return c,
            };
            match super::read_one(&tgt, &name) {
                Ok(found) => match found {
                    None => {
                        return fail(
                            1,
                            format!("no user {name} (add it with `imapgate users add`)"),
                        )
                    }
                    Some(u) if u.totp.is_some() && !force => {
                        return fail(
                            1,
                            format!(
                                "{name} is already enrolled; use --force or `imapgate totp reset`"
                            ),
                        )
                    }
                    Some(_) => {}
                },
                Err(code) => return code,
            }
            let secret = totp::new_secret();
            let digits = auth.mfa.code_digits;
            let uri = totp::otpauth_uri(&auth.mfa.issuer, &name, &secret, digits);
            errln!("Scan this with an authenticator app (or enter the URI):\n");
            if let Some(qr) = totp::qr_terminal(&uri) {
                errln!("{qr}");
            }
            // The one-time display: the URI carries the secret.
            outln!("{}", uri.expose_str().unwrap_or_default());
            let _ = std::io::stdout().flush();
            if !no_verify {
                err!("\nEnter the {digits}-digit code the app shows: ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line).is_err() {
                    return fail(1, "no code entered; nothing saved");
                }
                let code: String = line.chars().filter(|c| !c.is_whitespace()).collect();
                if totp::verify(&secret, &code, unix_now(), digits).is_none() {
                    return fail(
                        1,
                        "that code does not match; nothing saved (check the phone's clock)",
                    );
                }
            }
            let stored = match ring.encrypt(&name, &secret) {
                Ok(s) => s,
                Err(e) => return fail(1, e),
            };
            let code = edit(&cfg, &name, |f, _| {
                let u = user_mut(f, &name)?;
                u.totp = Some(stored);
                Ok(())
            });
            if code == ExitCode::SUCCESS {
                errln!("TOTP enrolled for {name}. At login the password is the app password followed by the current code.");
            }
            super::audited(code, &cfg, "totp_enrolled", &name, "")
        }
        TotpCmd::Reset { user, cfg } => {
            via_api!(cfg, |r| super::remote::reset_totp(&r, &user));
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(c) => return c,
            };
            let code = edit(&cfg, &name, |f, _| {
                let u = user_mut(f, &name)?;
                if u.totp.take().is_none() {
                    return Err(format!("{name} has no TOTP enrolment"));
                }
                errln!("TOTP removed for {name}; they must enrol again");
                Ok(())
            });
            super::audited(code, &cfg, "totp_reset", &name, "")
        }
    }
}

pub(super) fn keys(cmd: KeysCmd) -> ExitCode {
    match cmd {
        KeysCmd::Generate => {
            outln!(
                "{}",
                keyring::generate_key().expose_str().unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        KeysCmd::Rotate { cfg } => {
            let tgt = match target(&cfg) {
                Ok(t) => t,
                Err(c) => return c,
            };
            let (ring, _) = match ring(&tgt.auth) {
                Ok(x) => x,
                Err(c) => return c,
            };
            let active = ring.active_id().unwrap_or_default().to_owned();
            let rotated = std::sync::atomic::AtomicUsize::new(0);
            let older = std::sync::atomic::AtomicUsize::new(0);
            let code = super::edit_all(&tgt, |f| {
                for (name, u) in f.users.iter_mut() {
                    let Some(stored) = u.totp.as_deref() else {
                        continue;
                    };
                    if KeyRing::key_of(stored) == Some(active.as_str()) {
                        continue;
                    }
                    let secret = ring
                        .decrypt(name, stored)
                        .map_err(|e| format!("users.{name}.totp: {e}"))?;
                    u.totp = Some(ring.encrypt(name, &secret).map_err(|e| e.to_string())?);
                    rotated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // App-password lookup indexes cannot be recomputed without the passwords: they
                // keep working while their key stays in the ring and move to the active key at
                // their next login.
                let n = f
                    .users
                    .values()
                    .flat_map(|u| &u.app_passwords)
                    .filter(|a| !a.revoked)
                    .filter_map(|a| a.lookup.as_deref().and_then(KeyRing::key_of))
                    .filter(|k| *k != active)
                    .count();
                older.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            });
            if code == ExitCode::SUCCESS {
                errln!(
                    "re-encrypted {} TOTP secret(s) under key {active}",
                    rotated.into_inner()
                );
                let older = older.into_inner();
                if older > 0 {
                    errln!("{older} app password lookup index(es) stay under older keys until their next login; keep those keys in auth.secret_keys meanwhile (`imapgate users list` shows app passwords without a usable index)");
                }
            }
            super::audited(code, &cfg, "keys_rotated", "", &active)
        }
    }
}
