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
    #[arg(short, long, env = "IMAPGATE_CONFIG")]
    pub config: PathBuf,
    /// The admin listener to talk to, if not `admin.address` (e.g. a port-forward).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
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
                q.push(format!("scope={}", encode(s)));
            }
            if let Some(v) = value {
                q.push(format!("value={}", encode(v)));
            }
            if *all {
                q.push("all=true".into());
            }
            (target, Request::Clear(q.join("&")))
        }
    };
    let config = match load(&target.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(token) = config.admin.token.as_ref().and_then(|t| t.expose_str()) else {
        return fail(
            EXIT_CONFIG,
            "admin.token_file must be set to list or clear blocks",
        );
    };
    let mut addr = target.admin.unwrap_or(config.admin.address);
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
    let body = match result {
        Ok(b) => b,
        Err(e) => return fail(1, e),
    };
    match (&cmd, request) {
        (GuardCmd::Status { json: true, .. }, _) => outln!("{}", body.trim_end()),
        (GuardCmd::Status { .. }, _) => {
            let list: Vec<BlockInfo> = match serde_json::from_str(&body) {
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
        (GuardCmd::Clear { .. }, _) => outln!("{}", body.trim_end()),
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

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
