//! The audit log in Elastic Common Schema field names (`logging.audit_format: ecs`).
//!
//! Every audit event is first a flat map with the gateway's own field names (the `json`
//! format, docs/audit.md); [`to_ecs`] renames them onto ECS 8 fields, and what ECS has no
//! field for goes under the custom `imapgate.*` namespace. The values are the same ones (closed
//! sets, loggable user names, sanitised client ID), so this form carries nothing more.

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;

use super::AUDIT_TARGET;

/// The ECS version the field names follow.
pub const ECS_VERSION: &str = "8.11.0";

/// Collects an event's fields into a flat JSON map.
#[derive(Default)]
pub(crate) struct Fields(pub Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}

/// Now, as RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> &'a str {
    m.get(k).and_then(Value::as_str).unwrap_or("")
}

/// `source.ip`, `source.port` and `user.name` of an auth or session line.
fn source_and_user(doc: &mut Map<String, Value>, m: &Map<String, Value>) {
    let mut source = Map::new();
    put(
        &mut source,
        "ip",
        m.get("client_ip").cloned().unwrap_or_default(),
    );
    put(
        &mut source,
        "port",
        m.get("client_port").cloned().unwrap_or_default(),
    );
    doc.insert("source".into(), source.into());
    doc.insert("user".into(), json!({ "name": text(m, "user") }));
}

/// Inserts `v` under `k` unless it is an empty string.
fn put(obj: &mut Map<String, Value>, k: &str, v: Value) {
    if v.as_str() != Some("") && !v.is_null() {
        obj.insert(k.into(), v);
    }
}

/// One audit event (the `json` format's flat fields) as an ECS document.
pub fn to_ecs(m: &Map<String, Value>, timestamp: &str) -> Value {
    let kind = text(m, "event");
    let mut event = Map::new();
    let mut custom = Map::new();
    custom.insert("event".into(), kind.into());
    let mut doc = Map::new();
    doc.insert("@timestamp".into(), timestamp.into());
    doc.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    doc.insert(
        "log".into(),
        json!({ "level": "info", "logger": AUDIT_TARGET }),
    );
    doc.insert(
        "service".into(),
        json!({ "name": "imapgate", "type": "imap" }),
    );
    event.insert("kind".into(), "event".into());
    event.insert("module".into(), "imapgate".into());
    event.insert("dataset".into(), "imapgate.audit".into());
    match kind {
        "auth" => {
            let result = text(m, "result");
            event.insert("category".into(), json!(["authentication"]));
            event.insert("type".into(), json!(["start"]));
            event.insert("action".into(), "login".into());
            let outcome = if result == "success" {
                "success"
            } else {
                "failure"
            };
            event.insert("outcome".into(), outcome.into());
            put(
                &mut event,
                "reason",
                m.get("reason").cloned().unwrap_or_default(),
            );
            source_and_user(&mut doc, m);
            let protocol = match text(m, "protocol") {
                "" => "imap",
                p => p,
            };
            doc.insert("network".into(), json!({ "protocol": protocol }));
            let (name, version) = (text(m, "client_name"), text(m, "client_version"));
            if !name.is_empty() || !version.is_empty() {
                let mut ua = Map::new();
                put(&mut ua, "name", name.into());
                put(&mut ua, "version", version.into());
                let original = [name, version]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("/");
                ua.insert("original".into(), original.into());
                doc.insert("user_agent".into(), ua.into());
            }
            for k in [
                "session",
                "listener",
                "mechanism",
                "result",
                "guard",
                "backend",
                "credential",
                "mfa",
            ] {
                put(&mut custom, k, m.get(k).cloned().unwrap_or_default());
            }
        }
        "guard" => {
            let action = text(m, "action");
            let enforced = m.get("enforced").and_then(Value::as_bool).unwrap_or(false);
            let imposed = matches!(action, "block" | "attack_mode");
            if imposed {
                event.insert("kind".into(), "alert".into());
            }
            event.insert("category".into(), json!(["intrusion_detection"]));
            let ty = if imposed && enforced {
                "denied"
            } else {
                "info"
            };
            event.insert("type".into(), json!([ty]));
            event.insert("action".into(), action.into());
            put(
                &mut event,
                "reason",
                m.get("reason").cloned().unwrap_or_default(),
            );
            let key = text(m, "key");
            match text(m, "scope") {
                "ip" | "token_ip" => {
                    doc.insert("source".into(), json!({ "ip": key }));
                }
                "account" => {
                    doc.insert("user".into(), json!({ "name": key }));
                }
                _ => {}
            }
            for k in ["scope", "key", "count", "enforced"] {
                put(&mut custom, k, m.get(k).cloned().unwrap_or_default());
            }
        }
        "session" => {
            event.insert("category".into(), json!(["session"]));
            event.insert("type".into(), json!(["end"]));
            event.insert("action".into(), "session_ended".into());
            put(
                &mut event,
                "reason",
                m.get("reason").cloned().unwrap_or_default(),
            );
            source_and_user(&mut doc, m);
            for k in ["session", "listener", "credential", "backend", "seconds"] {
                put(&mut custom, k, m.get(k).cloned().unwrap_or_default());
            }
        }
        "operator" => {
            let action = text(m, "action");
            event.insert("category".into(), json!(["iam"]));
            let ty = if action.ends_with("_created") || action.ends_with("_added") {
                "creation"
            } else if action.ends_with("_revoked") || action.ends_with("_removed") {
                "deletion"
            } else {
                "change"
            };
            event.insert("type".into(), json!(["user", ty]));
            event.insert("action".into(), action.into());
            event.insert("outcome".into(), "success".into());
            let mut user = Map::new();
            put(
                &mut user,
                "name",
                m.get("actor").cloned().unwrap_or_default(),
            );
            let target = text(m, "user");
            if !target.is_empty() {
                user.insert("target".into(), json!({ "name": target }));
            }
            doc.insert("user".into(), user.into());
            // An approval's answer names the client it was about.
            let client = text(m, "client_ip");
            if !client.is_empty() {
                doc.insert("source".into(), json!({ "ip": client }));
            }
            for k in ["credential", "via", "changed", "network"] {
                put(&mut custom, k, m.get(k).cloned().unwrap_or_default());
            }
        }
        "portal" => {
            let action = text(m, "action");
            event.insert("category".into(), json!(["authentication"]));
            let (ty, outcome) = match action {
                "signed_in" => ("start", "success"),
                "signed_out" => ("end", "success"),
                _ => ("start", "failure"),
            };
            event.insert("type".into(), json!([ty]));
            event.insert("action".into(), action.into());
            event.insert("outcome".into(), outcome.into());
            put(
                &mut event,
                "reason",
                m.get("reason").cloned().unwrap_or_default(),
            );
            source_and_user(&mut doc, m);
            doc.insert("network".into(), json!({ "protocol": "https" }));
        }
        _ => {}
    }
    doc.insert("event".into(), event.into());
    doc.insert("imapgate".into(), custom.into());
    doc.into()
}

/// The audit layer for `audit_format: ecs`: one ECS JSON line per audit event.
pub(crate) struct EcsLayer<W> {
    pub writer: W,
}

impl<S, W> tracing_subscriber::Layer<S> for EcsLayer<W>
where
    S: tracing::Subscriber,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = to_ecs(&fields.0, &now_rfc3339()).to_string() + "\n";
        use std::io::Write as _;
        let _ = self.writer.make_writer().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn auth_line() {
        let m = map(json!({
            "event": "auth", "session": 7, "listener": "imaps", "client_ip": "192.0.2.7",
            "client_port": 50123, "client_name": "Thunderbird", "client_version": "115.3",
            "user": "alice@example.org", "mechanism": "login", "result": "failure",
            "reason": "bad_code", "guard": "allow", "backend": "", "credential": "ap1", "mfa": ""
        }));
        let v = to_ecs(&m, "2025-01-02T03:04:05Z");
        assert_eq!(v["@timestamp"], "2025-01-02T03:04:05Z");
        assert_eq!(v["event"]["category"], json!(["authentication"]));
        assert_eq!(v["event"]["outcome"], "failure");
        assert_eq!(v["event"]["reason"], "bad_code");
        assert_eq!(v["source"]["ip"], "192.0.2.7");
        assert_eq!(v["source"]["port"], 50123);
        assert_eq!(v["user"]["name"], "alice@example.org");
        assert_eq!(v["user_agent"]["original"], "Thunderbird/115.3");
        assert_eq!(v["imapgate"]["mechanism"], "login");
        assert_eq!(v["imapgate"]["session"], 7);
        assert!(v["imapgate"].get("backend").is_none());
        assert_eq!(v["service"]["name"], "imapgate");
    }

    #[test]
    fn portal_sign_ins_and_approvals_keep_their_fields() {
        let m = |v: Value| v.as_object().cloned().unwrap_or_default();
        let v = to_ecs(
            &m(
                json!({"event": "portal", "action": "sign_in_failed", "user": "",
                "reason": "state", "client_ip": "192.0.2.7"}),
            ),
            "t",
        );
        assert_eq!(v["event"]["action"], "sign_in_failed");
        assert_eq!(v["event"]["outcome"], "failure");
        assert_eq!(v["event"]["reason"], "state");
        assert_eq!(v["source"]["ip"], "192.0.2.7");
        let v = to_ecs(
            &m(
                json!({"event": "operator", "via": "portal", "actor": "a@example.org",
                "action": "signin_denied", "user": "a@example.org", "credential": "ap_1",
                "client_ip": "192.0.2.9", "network": "192.0.2.0/24", "changed": true}),
            ),
            "t",
        );
        assert_eq!(v["imapgate"]["via"], "portal");
        assert_eq!(v["imapgate"]["network"], "192.0.2.0/24");
        assert_eq!(v["imapgate"]["changed"], true);
        assert_eq!(v["source"]["ip"], "192.0.2.9");
    }

    #[test]
    fn guard_and_operator_lines() {
        let g = to_ecs(
            &map(
                json!({"event": "guard", "action": "block", "scope": "ip", "key": "192.0.2.9",
                "reason": "failures", "count": 10, "enforced": true}),
            ),
            "t",
        );
        assert_eq!(g["event"]["kind"], "alert");
        assert_eq!(g["event"]["type"], json!(["denied"]));
        assert_eq!(g["source"]["ip"], "192.0.2.9");
        let o = to_ecs(
            &map(
                json!({"event": "operator", "action": "app_password_revoked",
                "user": "bob@example.org", "credential": "ap2", "actor": "root"}),
            ),
            "t",
        );
        assert_eq!(o["event"]["type"], json!(["user", "deletion"]));
        assert_eq!(o["user"]["name"], "root");
        assert_eq!(o["user"]["target"]["name"], "bob@example.org");
        let s = to_ecs(
            &map(
                json!({"event": "session", "action": "ended", "session": "pod-a-7",
                "listener": "imaps", "client_ip": "192.0.2.7", "client_port": 993,
                "user": "bob@example.org", "credential": "ap2", "backend": "b",
                "reason": "operator", "seconds": 12}),
            ),
            "t",
        );
        assert_eq!(s["event"]["category"], json!(["session"]));
        assert_eq!(s["event"]["type"], json!(["end"]));
        assert_eq!(s["event"]["reason"], "operator");
        assert_eq!(s["user"]["name"], "bob@example.org");
        assert_eq!(s["source"]["ip"], "192.0.2.7");
        assert_eq!(s["imapgate"]["session"], "pod-a-7");
    }
}
