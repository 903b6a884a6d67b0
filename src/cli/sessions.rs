//! `imapgate sessions list [USER]` and `imapgate sessions kill USER [--credential ID]
//! [--session ID]`, on the database store named by `-c`: the session directory every replica
//! mirrors its relayed sessions into, and the change log every replica follows (a kill is one
//! entry; each replica ends its matching sessions with `* BYE` within a poll interval).
//!
//! The users file has neither: there, sessions are reached through the running gateway's admin
//! API. Each command is argument parsing around a function that takes a store
//! ([`list_on`], [`kill_on`]), so a remote variant can call the same shape.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::{audited, block_on, fail, target, user_name, UsersTarget};
use crate::store::{ChangeKind, SessionInfo, StoreError, UserStore};

/// How long `sessions kill` waits for the sessions it ended to leave the directory.
const KILL_WAIT: Duration = Duration::from_secs(3);

#[derive(clap::Subcommand, Debug)]
pub enum SessionsCmd {
    /// List relayed sessions of every replica (of USER only, if given).
    List {
        user: Option<String>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
    /// End USER's sessions on every replica: all of them, one credential's, or one session.
    Kill {
        user: String,
        /// Only the sessions of this app password id (or `oauth:ISSUER`).
        #[arg(long, conflicts_with = "session")]
        credential: Option<String>,
        /// Only this session (an id as `sessions list` shows it).
        #[arg(long)]
        session: Option<String>,
        #[command(flatten)]
        cfg: UsersTarget,
    },
}

/// What the database stores can do and the users file cannot.
const FILE_STORE: &str = "the users file (auth.store.backend: file) has no session directory: reach the running gateway with --admin URL --token-file FILE";

pub(super) fn sessions(cmd: SessionsCmd) -> ExitCode {
    match cmd {
        SessionsCmd::List { user, cfg } => {
            via_api!(cfg, |r| super::remote::list_sessions(&r, user.as_deref()));
            let name = match user.as_deref().map(user_name).transpose() {
                Ok(n) => n,
                Err(code) => return code,
            };
            let store = match database(&cfg) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match block_on(list_on(store.as_ref(), name.as_deref())) {
                Ok(Ok(list)) => {
                    print(&list);
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(1, e),
                Err(code) => code,
            }
        }
        SessionsCmd::Kill {
            user,
            credential,
            session,
            cfg,
        } => {
            via_api!(cfg, |r| super::remote::kill_sessions(
                &r,
                &user,
                credential.as_deref(),
                session.as_deref()
            ));
            let name = match user_name(&user) {
                Ok(n) => n,
                Err(code) => return code,
            };
            let which = match (credential, session) {
                (Some(c), _) => c,
                (None, Some(s)) => format!("session:{s}"),
                (None, None) => String::new(),
            };
            if which.chars().any(char::is_control) || which.len() > 300 {
                return fail(super::EXIT_CONFIG, "--credential or --session is not an id");
            }
            let store = match database(&cfg) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let code = match block_on(kill_on(store.as_ref(), &name, &which, KILL_WAIT)) {
                Ok(Ok(r)) => {
                    errln!(
                        "asked every replica to end {}; {} of the {} listed session(s) ended{}",
                        describe(&name, &which),
                        r.ended,
                        r.listed,
                        if r.ended < r.listed {
                            " so far (the others end within seconds, or belong to a replica that is down)"
                        } else {
                            ""
                        }
                    );
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(1, e),
                Err(code) => code,
            };
            audited(code, &cfg, "sessions_killed", &name, &which)
        }
    }
}

/// The database store `-c` names; the users file is refused with a pointer to `--admin`.
fn database(cfg: &UsersTarget) -> Result<Arc<dyn UserStore>, ExitCode> {
    let tgt = target(cfg)?;
    if tgt.database().is_none() {
        return Err(fail(1, FILE_STORE));
    }
    tgt.open()
}

fn describe(user: &str, which: &str) -> String {
    match which.strip_prefix("session:") {
        Some(id) => format!("session {id} of {user}"),
        None if which.is_empty() => format!("every session of {user}"),
        None => format!("the sessions of {user} with {which}"),
    }
}

/// The sessions of every replica (of `user` only).
pub(crate) async fn list_on(
    store: &dyn UserStore,
    user: Option<&str>,
) -> Result<Vec<SessionInfo>, StoreError> {
    store.sessions(user).await
}

/// What a kill found and achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KillReport {
    /// Sessions the directory listed as matching before the kill.
    pub(crate) listed: usize,
    /// How many of them had left it when the wait ended.
    pub(crate) ended: usize,
}

/// Whether `s` is one of the sessions `which` names (see `UserSessions::close_matching`).
fn matches(s: &SessionInfo, which: &str) -> bool {
    match which.strip_prefix("session:") {
        Some(id) => s.id == id,
        None => which.is_empty() || s.credential == which,
    }
}

/// Logs the kill for every replica, then waits up to `wait` for the sessions that matched
/// before to leave the session directory.
pub(crate) async fn kill_on(
    store: &dyn UserStore,
    user: &str,
    which: &str,
    wait: Duration,
) -> Result<KillReport, StoreError> {
    let before: Vec<String> = store
        .sessions(Some(user))
        .await?
        .into_iter()
        .filter(|s| matches(s, which))
        .map(|s| s.id)
        .collect();
    store.log_event(ChangeKind::Sessions, user, which).await?;
    let until = tokio::time::Instant::now() + wait;
    loop {
        let now: Vec<String> = store
            .sessions(Some(user))
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let left = before.iter().filter(|id| now.contains(id)).count();
        if left == 0 || tokio::time::Instant::now() >= until {
            return Ok(KillReport {
                listed: before.len(),
                ended: before.len() - left,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) fn print(list: &[SessionInfo]) {
    if list.is_empty() {
        errln!("no sessions");
        return;
    }
    outln!("ID\tUSER\tCREDENTIAL\tCLIENT\tCLIENT-ID\tLISTENER\tSINCE");
    for s in list {
        let since = OffsetDateTime::from_unix_timestamp(s.since)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| s.since.to_string());
        let client_id = match (&s.client_name, &s.client_version) {
            (Some(n), Some(v)) => format!("{n}/{v}"),
            (Some(n), None) => n.clone(),
            (None, Some(v)) => format!("?/{v}"),
            (None, None) => "-".to_owned(),
        };
        outln!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            s.id,
            s.user,
            s.credential,
            s.client_address,
            client_id,
            s.listener,
            since
        );
    }
}
