//! `imapgate guard status|clear`: the running gateway's blocks and attack modes, through its
//! admin listener (they live in the gateway's state store, not in a file). Needs
//! `admin.token_file` in the config; the token is sent as a bearer token and never printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{fail, load, EXIT_CONFIG};
use crate::guard::BlockInfo;

#[derive(clap::Args, Debug)]
pub struct AdminTarget {
    /// The configuration file (its `admin.address` and `admin.token_file` are used).
    #[arg(
        short,
        long,
        env = "IMAPGATE_CONFIG",
        required_unless_present = "token_file"
    )]
    pub config: Option<PathBuf>,
    /// The admin listener to talk to, if not `admin.address` (e.g. `127.0.0.1:9190` or
    /// `http://127.0.0.1:9190` through a port-forward).
    #[arg(long)]
    pub admin: Option<String>,
    /// The admin bearer token, if not the configuration's `admin.token_file` (with `--admin`,
    /// no configuration is needed).
    #[arg(long, requires = "admin")]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum GuardCmd {
    /// List the blocked addresses and subnets and the accounts in attack mode.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Clear blocks: by scope and/or value, or all of them.
    Clear {
        #[command(flatten)]
        target: AdminTarget,
        /// ip, subnet, token_ip, token_subnet, account (attack mode) or app_password (suspect).
        #[arg(long)]
        scope: Option<String>,
        /// The address, network (192.0.2.0/24), account name, or user/app-password-id.
        #[arg(long)]
        value: Option<String>,
        /// Clear every block and attack mode.
        #[arg(long, conflicts_with_all = ["scope", "value"])]
        all: bool,
    },
}

pub(super) fn guard(cmd: GuardCmd) -> ExitCode {
    let (target, request) = match &cmd {
        GuardCmd::Status { target, .. } => (target, Request::Status),
        GuardCmd::Clear {
            target,
            scope,
            value,
            all,
        } => {
            if scope.is_none() && value.is_none() && !all {
                return fail(EXIT_CONFIG, "name --scope and/or --value, or --all");
            }
            let mut q = Vec::new();
            if let Some(s) = scope {
                q.push(format!("scope={}", super::remote::seg(s)));
            }
            if let Some(v) = value {
                q.push(format!("value={}", super::remote::seg(v)));
            }
            if *all {
                q.push("all=true".into());
            }
            (target, Request::Clear(q.join("&")))
        }
    };
    if let (Some(admin), Some(token_file)) = (&target.admin, &target.token_file) {
        let remote = match super::remote::Remote::new(admin, token_file) {
            Ok(r) => r,
            Err(code) => return code,
        };
        let (method, path) = match &request {
            Request::Status => ("GET", "/guard/blocks".to_owned()),
            Request::Clear(q) => ("DELETE", format!("/guard/blocks?{q}")),
        };
        return match remote.call(method, &path, None) {
            Ok(v) => show(&cmd, &v.to_string()),
            Err(code) => code,
        };
    }
    let Some(config_path) = &target.config else {
        return fail(
            EXIT_CONFIG,
            "give -c CONFIG, or --admin URL --token-file FILE",
        );
    };
    let config = match load(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(token) = config.admin.token.as_ref().and_then(|t| t.expose_str()) else {
        return fail(
            EXIT_CONFIG,
            "admin.token_file must be set to list or clear blocks",
        );
    };
    let mut addr = match target.admin.as_deref().map(str::parse::<SocketAddr>) {
        None => config.admin.address,
        Some(Ok(a)) => a,
        Some(Err(_)) => return fail(
            EXIT_CONFIG,
            "--admin without --token-file must be IP:port (the token comes from the configuration)",
        ),
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(send(addr, token, &request));
    match result {
        Ok(b) => show(&cmd, &b),
        Err(e) => fail(1, e),
    }
}

/// Prints the gateway's answer: a table of blocks, or its JSON.
fn show(cmd: &GuardCmd, body: &str) -> ExitCode {
    match cmd {
        GuardCmd::Status { json: true, .. } => outln!("{}", body.trim_end()),
        GuardCmd::Status { .. } => {
            let list: Vec<BlockInfo> = match serde_json::from_str(body) {
                Ok(l) => l,
                Err(e) => return fail(1, format!("unexpected answer from the gateway: {e}")),
            };
            if list.is_empty() {
                outln!("no active blocks");
            }
            for b in list {
                outln!(
                    "{:<9} {:<40} {:<9} {:>6}s{}",
                    b.scope,
                    b.value,
                    b.reason,
                    b.expires_in_secs,
                    if b.enforced { "" } else { "  (dry run)" }
                );
            }
        }
        GuardCmd::Clear { .. } => outln!("{}", body.trim_end()),
    }
    ExitCode::SUCCESS
}

enum Request {
    Status,
    Clear(String),
}

async fn send(addr: SocketAddr, token: &str, req: &Request) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let url = format!("http://{addr}/guard/blocks");
    let builder = match req {
        Request::Status => client.get(&url),
        Request::Clear(q) => client.delete(format!("{url}?{q}")),
    };
    let resp = builder
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("cannot reach the admin listener at {addr}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("the gateway answered {status}: {}", body.trim()))
    }
}
