//! `imapgate oauth token`: get an access token with the device flow, to test a login by hand.
//! The token goes alone to stdout; the instructions to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{fail, load, EXIT_CONFIG};

#[derive(Subcommand, Debug)]
pub enum OAuthCmd {
    /// Get an access token from an issuer with the device authorization grant (RFC 8628).
    Token {
        /// The issuer's `name` in auth.oauth.issuers.
        #[arg(long)]
        issuer: String,
        /// A public client registered at the issuer for the device flow.
        #[arg(long)]
        client_id: String,
        /// Scopes to ask for (default: the issuer's required_scopes).
        #[arg(long)]
        scope: Vec<String>,
        /// An RFC 8707 resource indicator, if the issuer needs one.
        #[arg(long)]
        resource: Option<String>,
        /// Give up after this long (e.g. 5m).
        #[arg(long, default_value = "5m")]
        timeout: String,
        /// The configuration file.
        #[arg(short, long, env = "IMAPGATE_CONFIG")]
        config: PathBuf,
    },
}

pub(super) fn oauth(cmd: OAuthCmd) -> ExitCode {
    let OAuthCmd::Token {
        issuer,
        client_id,
        scope,
        resource,
        timeout,
        config,
    } = cmd;
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(icfg) = cfg.auth.oauth_issuers.iter().find(|i| i.name == issuer) else {
        return fail(
            EXIT_CONFIG,
            format!("no issuer named {issuer} in auth.oauth.issuers"),
        );
    };
    let timeout = match crate::config::units::parse_duration(&timeout) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(3600) => d,
        _ => {
            return fail(
                EXIT_CONFIG,
                "--timeout must be a duration up to 1h, such as 5m",
            )
        }
    };
    let scopes = if scope.is_empty() {
        icfg.required_scopes.clone()
    } else {
        scope
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(crate::auth::oauth::device::token(
        icfg,
        &client_id,
        &scopes,
        resource.as_deref(),
        timeout,
        |p| {
            match &p.complete {
                Some(c) => errln!("Open {c}\n(or {} and enter the code {})", p.uri, p.code),
                None => errln!("Open {} and enter the code {}", p.uri, p.code),
            }
            errln!("Waiting for the sign-in to complete…");
        },
    ));
    match result {
        Ok(token) => {
            // The one place a token is printed: the operator asked for it.
            outln!("{}", token.expose_str().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}
