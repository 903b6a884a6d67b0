//! `imapgate users logins USER [--limit N]`: a user's recent logins (the login history, see
//! `store::activity::LoginHistory`), newest first, one tab-separated line each: time, result,
//! reason, mechanism, address, listener, client, credential (`-` where empty).
//!
//! On a database store `-c` names, the rows the gateways have written (up to one flush
//! interval, 2 s, behind); through the admin API (`--admin`), also what the answering replica
//! has not written yet. The users file keeps no history: the running gateway holds it in
//! memory, so there the command needs `--admin`.

use std::process::ExitCode;

use serde_json::Value;

use super::remote::{seg, Remote};
use super::{block_on, fail, target, user_name, UsersTarget};
use crate::store::LOGIN_HISTORY_PER_USER;

pub(super) fn show(user: &str, limit: u32, cfg: &UsersTarget) -> ExitCode {
    let cap = u32::try_from(LOGIN_HISTORY_PER_USER).unwrap_or(u32::MAX);
    if limit == 0 || limit > cap {
        return fail(super::EXIT_CONFIG, format!("--limit must be 1-{cap}"));
    }
    via_api!(cfg, |r| remote(&r, user, limit));
    let name = match user_name(user) {
        Ok(n) => n,
        Err(code) => return code,
    };
    let tgt = match target(cfg) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if tgt
        .auth
        .as_ref()
        .is_none_or(|a| a.store.backend == crate::config::StoreBackend::File)
    {
        return fail(
            1,
            "the users file keeps no login history: the running gateway keeps it in memory; ask it with --admin URL --token-file FILE",
        );
    }
    let store = match tgt.open() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let found = match block_on(store.user(&name)) {
        Ok(Ok(u)) => u.is_some(),
        Ok(Err(e)) => return fail(1, e),
        Err(code) => return code,
    };
    if !found {
        return fail(1, format!("no user {name}"));
    }
    match block_on(store.recent_logins(&name, limit)) {
        Ok(Ok(list)) => {
            for e in &list {
                print(&[
                    &rfc3339(e.at),
                    &e.result,
                    &e.reason,
                    &e.mechanism,
                    &e.address,
                    &e.listener,
                    &e.client,
                    &e.credential,
                ]);
            }
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => fail(1, e),
        Err(code) => code,
    }
}

/// Through the admin API: the store's rows and the answering replica's buffer.
fn remote(r: &Remote, user: &str, limit: u32) -> ExitCode {
    let v = match r.call(
        "GET",
        &format!("/users/{}/logins?limit={limit}", seg(user)),
        None,
    ) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let list = v.get("logins").and_then(Value::as_array);
    for e in list.into_iter().flatten() {
        let f = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        print(&[
            &f("at"),
            &f("result"),
            &f("reason"),
            &f("mechanism"),
            &f("address"),
            &f("listener"),
            &f("client"),
            &f("credential"),
        ]);
    }
    ExitCode::SUCCESS
}

/// One line: the fields tab-separated, `-` for an empty one.
fn print(fields: &[&str]) {
    let cols: Vec<&str> = fields
        .iter()
        .map(|f| if f.is_empty() { "-" } else { f })
        .collect();
    outln!("{}", cols.join("\t"));
}

fn rfc3339(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at.to_string())
}
