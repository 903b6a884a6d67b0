//! docs/metrics.md against the code: every metric's labels as the table names them, and every
//! closed label's values as the "Label values" list gives them, equal to the values the code can
//! emit. The values come from the enums that produce them (`as_str`), listed through
//! [`variants!`], which stops compiling when an enum gains a variant this file does not name;
//! the few labels still written as literals at their call site are listed here with that site.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prometheus::core::Collector;

use super::{Limit, Metrics, CATALOGUE};
use crate::auth::oauth::OAuthError;
use crate::auth::{FailureReason, Mechanism};
use crate::guard::{Decision, Scope, Verdict};
use crate::login::Ending;
use crate::observe::limit::{LimitKind, Server};
use crate::server::admission::Refusal;
use crate::server::proxy::ProxyError;
use crate::session::HandshakeFailure;
use crate::upstream::login::LoginError;
use crate::upstream::UpstreamError;

/// `variants!(Enum: A, B, C)`: the unit variants listed, as an array; fails to compile when
/// `Enum` has a variant not listed. `variants!(Enum: A, B; covered: C)` also accepts data
/// variants `C` (matched, not returned: the caller adds their values).
macro_rules! variants {
    ($ty:ident: $($v:ident),+ $(; covered: $($c:ident),+)?) => {{
        #[allow(dead_code)]
        fn exhaustive(x: &$ty) {
            match x {
                $($ty::$v { .. } => {})+
                $($($ty::$c { .. } => {})+)?
            }
        }
        [$($ty::$v),+]
    }};
}

/// A label's values: chosen by the configuration (listener, backend, issuer and certificate
/// names, the version), or a closed set from the code.
enum Values {
    Config,
    Closed(Vec<&'static str>),
}
use Values::{Closed, Config};

fn closed(values: impl IntoIterator<Item = &'static str>) -> Values {
    Closed(values.into_iter().collect())
}

fn mechanisms() -> Values {
    closed(variants!(Mechanism: Login, Plain, XOAuth2, OAuthBearer).map(Mechanism::as_str))
}

fn protocols() -> Values {
    use crate::config::Protocol;
    closed(variants!(Protocol: Imap, Smtp, Pop3).map(Protocol::as_str))
}

fn upstream_results() -> Values {
    let login = variants!(LoginError: Preauth, Bye, NoStartTls, StartTlsRefused, Rejected, Protocol, BadUser, NoXclient);
    variants!(UpstreamError: Timeout, Closed; covered: Connect, Tls, Login);
    let mut v = vec!["ok"];
    v.extend(
        [
            UpstreamError::Connect(String::new()),
            UpstreamError::Timeout,
            UpstreamError::Tls(String::new()),
            UpstreamError::Closed,
        ]
        .iter()
        .map(UpstreamError::as_str),
    );
    v.extend(login.map(|e| UpstreamError::Login(e).as_str()));
    Closed(v)
}

fn oauth_errors() -> [OAuthError; 18] {
    variants!(OAuthError: Malformed, UnknownIssuer, Algorithm, UnknownKey, BadSignature, Expired,
        NotYetValid, WrongAudience, WrongIssuer, NotAccessToken, MissingScope, NoMfaEvidence, NoUser,
        UserMismatch, IdpUnavailable, Inactive, EmailNotVerified, WrongDomain)
}

fn scopes() -> [Scope; 12] {
    variants!(Scope: None, AllowList, KnownGood, Ip, Subnet, Account, TokenIp, TokenSubnet,
        AppPassword, InFlight, AccountQueue, AccountNetwork)
}

/// What the code emits, per metric: each label in order with its values.
fn emitted() -> BTreeMap<&'static str, Vec<(&'static str, Values)>> {
    let mut m: BTreeMap<&'static str, Vec<(&'static str, Values)>> = BTreeMap::new();
    let mut add = |name, labels| {
        m.insert(name, labels);
    };
    // server/mod.rs: "accepted", "refused_deny_list" and "refused_untrusted_proxy" literals.
    let mut outcomes = vec!["accepted", "refused_deny_list", "refused_untrusted_proxy"];
    outcomes.extend(variants!(Refusal: Global, PerIp, PreauthPerIp).map(Refusal::as_str));
    outcomes.extend(variants!(ProxyError: Timeout, Closed, Malformed).map(ProxyError::as_str));
    add(
        "imapgate_connections_total",
        vec![
            ("listener", Config),
            ("protocol", protocols()),
            ("outcome", Closed(outcomes)),
        ],
    );
    add(
        "imapgate_tls_handshake_failures_total",
        vec![
            ("listener", Config),
            (
                "reason",
                closed(
                    variants!(HandshakeFailure: Timeout, Alpn, Incompatible, InvalidMessage,
                        AlertReceived, TlsError, Io)
                    .map(HandshakeFailure::as_str),
                ),
            ),
        ],
    );
    add("imapgate_sessions_preauth", vec![]);
    add("imapgate_sessions_relayed", vec![]);
    add(
        "imapgate_auth_attempts_total",
        vec![
            ("mechanism", mechanisms()),
            ("protocol", protocols()),
            (
                "result",
                closed(
                    variants!(Ending: Success, Failure, TooManySessions, Unavailable, Timeout)
                        .map(Ending::metric),
                ),
            ),
        ],
    );
    add("imapgate_auth_seconds", vec![("mechanism", mechanisms())]);
    add("imapgate_auth_hash_runs_total", vec![]);
    add("imapgate_auth_cache_hits_total", vec![]);
    // auth/store.rs `totp_failure`: the second-factor reasons it is called with.
    add(
        "imapgate_totp_failures_total",
        vec![(
            "reason",
            closed(
                [
                    FailureReason::MfaNotEnrolled,
                    FailureReason::CodeMissing,
                    FailureReason::BadCode,
                    FailureReason::StaleCode,
                    FailureReason::CodeReplayed,
                    FailureReason::SuspectAppPassword,
                    FailureReason::NetworkDenied,
                ]
                .map(FailureReason::as_str),
            ),
        )],
    );
    let mut tokens = vec!["valid"];
    tokens.extend(oauth_errors().map(OAuthError::as_str));
    add(
        "imapgate_oauth_tokens_total",
        vec![("result", Closed(tokens))],
    );
    // auth/oauth/mod.rs: `ok` or `error`.
    add(
        "imapgate_oauth_key_fetches_total",
        vec![("issuer", Config), ("result", closed(["ok", "error"]))],
    );
    // guard/mod.rs: Decision::action, and the `queue`/`would_queue` literals.
    let mut actions = BTreeSet::new();
    for verdict in variants!(Verdict: Allow, RequireCode, Reject) {
        for would_refuse in [false, true] {
            for delay in [Duration::ZERO, Duration::from_secs(1)] {
                let d = Decision {
                    verdict,
                    delay,
                    scope: Scope::None,
                    would_refuse,
                    known_good: false,
                    permit: None,
                };
                actions.insert(d.action());
            }
        }
    }
    actions.extend(["queue", "would_queue"]);
    // Decisions name every scope but `app_password` (a block of an app password is checked
    // by the authenticator); the deny list and the tarpit queue are literals in guard/mod.rs.
    let mut decision_scopes: Vec<&str> = scopes()
        .into_iter()
        .filter(|s| *s != Scope::AppPassword && *s != Scope::AccountNetwork)
        .map(Scope::as_str)
        .collect();
    decision_scopes.extend(["deny_list", "tarpit"]);
    add(
        "imapgate_guard_decisions_total",
        vec![
            ("action", Closed(actions.into_iter().collect())),
            ("scope", Closed(decision_scopes)),
        ],
    );
    // guard/record.rs `impose`: the scopes that can be blocked, and why.
    add(
        "imapgate_guard_blocks_total",
        vec![
            (
                "scope",
                closed(
                    [
                        Scope::Ip,
                        Scope::Subnet,
                        Scope::Account,
                        Scope::TokenIp,
                        Scope::TokenSubnet,
                        Scope::AppPassword,
                    ]
                    .map(Scope::as_str),
                ),
            ),
            ("reason", closed(["failures", "spray", "wrong_codes"])),
        ],
    );
    add("imapgate_guard_blocked_sources", vec![]);
    add("imapgate_guard_attack_mode_accounts", vec![]);
    add("imapgate_app_password_suspect_total", vec![]);
    // Lives in observe::syslog (logging starts before the registry); registered by Metrics::new.
    add("imapgate_audit_dropped_total", vec![]);
    // state/shared.rs (the Store operations and `ping`) and guard (`record`, `get_many`, `scan`).
    add(
        "imapgate_state_store_errors_total",
        vec![(
            "op",
            closed([
                "rate_check",
                "incr",
                "set_if_absent",
                "set_add_count",
                "put",
                "get",
                "get_many",
                "scan",
                "delete",
                "ping",
                "record",
            ]),
        )],
    );
    add("imapgate_state_store_up", vec![]);
    add(
        "imapgate_upstream_logins_total",
        vec![("backend", Config), ("result", upstream_results())],
    );
    add("imapgate_upstream_login_seconds", vec![("backend", Config)]);
    add("imapgate_backend_up", vec![("backend", Config)]);
    // session/mod.rs `relay`.
    add(
        "imapgate_relay_bytes_total",
        vec![
            ("direction", closed(["to_backend", "to_client"])),
            ("backend", Config),
        ],
    );
    add("imapgate_session_seconds", vec![]);
    // auth/store.rs and server/mod.rs.
    add(
        "imapgate_users_reloads_total",
        vec![("result", closed(["ok", "error"]))],
    );
    add(
        "imapgate_config_reloads_total",
        vec![("result", closed(["ok", "error", "restart_needed"]))],
    );
    add(
        "imapgate_certificate_expiry_timestamp_seconds",
        vec![("certificate", Config)],
    );
    add("imapgate_build_info", vec![("version", Config)]);
    add("imapgate_runtime_tasks", vec![]);
    add(
        "imapgate_limit",
        vec![("limit", closed(Limit::ALL.map(Limit::as_str)))],
    );
    // observe/limit.rs.
    add(
        "imapgate_http_requests_limited_total",
        vec![
            (
                "server",
                closed(variants!(Server: Admin, Portal).map(Server::as_str)),
            ),
            (
                "limit",
                closed(
                    variants!(LimitKind: PerIp, Overall, FailedAuth, Probes).map(LimitKind::as_str),
                ),
            ),
        ],
    );
    // auth/store.rs (`follow_changes`) and store/activity.rs.
    add("imapgate_store_up", vec![]);
    add("imapgate_store_usage_dropped_total", vec![]);
    // portal/signin.rs.
    add(
        "imapgate_portal_signins_total",
        vec![("result", closed(["ok", "failed"]))],
    );
    add("imapgate_store_logins_dropped_total", vec![]);
    // auth/approval.rs.
    add(
        "imapgate_signin_pending_total",
        vec![("result", closed(["recorded", "dropped"]))],
    );
    add("imapgate_signin_approved_total", vec![]);
    add("imapgate_signin_denied_total", vec![]);
    add(
        "imapgate_signin_webhooks_total",
        vec![("result", closed(["sent", "failed", "dropped"]))],
    );
    m
}

/// Every field's metric name → its label names, as registered.
fn registered_labels(m: &Metrics) -> BTreeMap<String, Vec<String>> {
    // Destructured in full: a new field does not compile until it is listed here.
    let Metrics {
        registry: _,
        connections,
        tls_handshake_failures,
        sessions_preauth,
        sessions_relayed,
        auth_attempts,
        auth_seconds,
        hash_runs,
        auth_cache_hits,
        totp_failures,
        oauth_tokens,
        oauth_key_fetches,
        guard_decisions,
        guard_blocks,
        guard_blocked_sources,
        guard_attack_mode_accounts,
        app_password_suspect,
        state_store_errors,
        state_store_up,
        upstream_logins,
        upstream_login_seconds,
        backend_up,
        relay_bytes,
        session_seconds,
        users_reloads,
        config_reloads,
        certificate_expiry,
        build_info,
        runtime_tasks,
        limits,
        http_limited,
        store_up,
        store_usage_dropped,
        portal_signins,
        signin_pending,
        signin_approved,
        signin_denied,
        signin_webhooks,
        store_logins_dropped,
    } = m;
    let collectors: [&dyn Collector; 38] = [
        connections,
        tls_handshake_failures,
        sessions_preauth,
        sessions_relayed,
        auth_attempts,
        auth_seconds,
        hash_runs,
        auth_cache_hits,
        totp_failures,
        oauth_tokens,
        oauth_key_fetches,
        guard_decisions,
        guard_blocks,
        guard_blocked_sources,
        guard_attack_mode_accounts,
        app_password_suspect,
        state_store_errors,
        state_store_up,
        upstream_logins,
        upstream_login_seconds,
        backend_up,
        relay_bytes,
        session_seconds,
        users_reloads,
        config_reloads,
        certificate_expiry,
        build_info,
        runtime_tasks,
        limits,
        http_limited,
        store_up,
        store_usage_dropped,
        portal_signins,
        signin_pending,
        signin_approved,
        signin_denied,
        signin_webhooks,
        store_logins_dropped,
    ];
    // The syslog drop counter is registered beside the struct's fields (see Metrics::new).
    let syslog = crate::observe::syslog::dropped_counter();
    collectors
        .iter()
        .flat_map(|c| c.desc())
        .chain(syslog.iter().flat_map(|c| c.desc()))
        .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
        .collect()
}

/// The table's labels column: metric → label names ("—" for none).
fn documented_labels(doc: &str) -> BTreeMap<String, Vec<String>> {
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let name = cells.first()?.strip_prefix("| `")?.strip_suffix('`')?;
            if !name.starts_with("imapgate_") {
                return None;
            }
            let labels = cells.get(2)?.trim();
            let labels = if labels == "—" {
                Vec::new()
            } else {
                labels.split(", ").map(str::to_owned).collect()
            };
            Some((name.to_owned(), labels))
        })
        .collect()
}

/// Text without its parenthesised remarks (nested ones included).
fn without_remarks(s: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The "Label values" list: (metric, label) → values, from lines of the form
/// ``- `label` (`metric`): `a` (remark), `b`, `c`.``
fn documented_values(doc: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut found = BTreeMap::new();
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix("- `") else {
            continue;
        };
        let Some((label, rest)) = rest.split_once("` (`") else {
            continue;
        };
        let (metric, list) = rest
            .split_once("`): ")
            .unwrap_or_else(|| panic!("a label-values line without `): `: {line}"));
        let list = without_remarks(list);
        let values = list
            .trim()
            .trim_end_matches('.')
            .split(',')
            .map(|v| {
                let v = v.trim();
                v.strip_prefix('`')
                    .and_then(|v| v.strip_suffix('`'))
                    .unwrap_or_else(|| panic!("{metric} {label}: {v:?} is not a `value`"))
                    .to_owned()
            })
            .collect();
        let before = found.insert((metric.to_owned(), label.to_owned()), values);
        assert!(before.is_none(), "{metric} {label} listed twice");
    }
    found
}

#[test]
fn the_docs_label_values_are_those_the_code_emits() {
    let doc = include_str!("../../../docs/metrics.md");
    let code = emitted();
    let catalogued: BTreeSet<&str> = CATALOGUE.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        catalogued,
        code.keys().copied().collect(),
        "this test's table of emitted labels must cover the catalogue"
    );

    // The registered label names are those this file gives, and those the docs table gives.
    let m = Metrics::new().unwrap();
    let registered = registered_labels(&m);
    let table = documented_labels(doc);
    for (name, labels) in &code {
        let names: Vec<String> = labels.iter().map(|(l, _)| (*l).to_owned()).collect();
        assert_eq!(
            registered.get(*name),
            Some(&names),
            "{name}: registered labels"
        );
        assert_eq!(
            table.get(*name),
            Some(&names),
            "{name}: the labels column of docs/metrics.md"
        );
    }

    // Every closed label's values, exactly.
    let listed = documented_values(doc);
    let mut wanted = BTreeSet::new();
    for (name, labels) in &code {
        for (label, values) in labels {
            let Closed(values) = values else { continue };
            let key = ((*name).to_owned(), (*label).to_owned());
            let code_values: BTreeSet<String> = values.iter().map(|v| (*v).to_owned()).collect();
            assert_eq!(
                code_values.len(),
                values.len(),
                "{name} {label}: a value twice"
            );
            assert_eq!(
                listed.get(&key),
                Some(&code_values),
                "{name} {label}: docs/metrics.md's label values differ from the code's"
            );
            wanted.insert(key);
        }
    }
    for key in listed.keys() {
        assert!(
            wanted.contains(key),
            "docs/metrics.md lists {key:?}, which is not a closed label"
        );
    }
}
