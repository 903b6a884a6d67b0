//! The CLI through a running gateway's admin API (`--admin URL --token-file FILE`): the same
//! user, app-password and TOTP commands, for a store the operator cannot reach directly (a
//! Kubernetes Secret or a database behind a port-forward). The token is sent as a bearer token
//! and never printed; a new app password is printed once, alone on stdout, as locally.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use super::{block_on, fail, EXIT_CONFIG};
use crate::secret::Secret;

/// A gateway's admin API.
pub(crate) struct Remote {
    base: String,
    token: Secret,
    http: reqwest::Client,
}

/// `http://host:port` (or `https://…`, or just `host:port`) → the API's base URL.
fn base_url(admin: &str) -> Result<String, String> {
    let admin = admin.trim();
    let with_scheme = if admin.starts_with("http://") || admin.starts_with("https://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("--admin: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("--admin: no host".into());
    }
    if url.scheme() == "http" {
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            errln!("warning: --admin {with_scheme} is plain HTTP to another host: the token crosses the network in the clear (use a port-forward to 127.0.0.1, or https)");
        }
    }
    Ok(format!("{}/api/v1", url.as_str().trim_end_matches('/')))
}

impl Remote {
    pub(crate) fn new(admin: &str, token_file: &Path) -> Result<Remote, ExitCode> {
        let base = base_url(admin).map_err(|e| fail(EXIT_CONFIG, e))?;
        let text = std::fs::read_to_string(token_file).map_err(|e| {
            fail(
                EXIT_CONFIG,
                format!("--token-file {}: {e}", token_file.display()),
            )
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(fail(
                EXIT_CONFIG,
                format!("--token-file {} is empty", token_file.display()),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| fail(1, format!("HTTP client: {e}")))?;
        Ok(Remote {
            base,
            token: Secret::from(token.to_owned()),
            http,
        })
    }

    /// One call; the JSON answer of a success, or the API's error message.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ExitCode> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| fail(1, format!("method: {e}")))?;
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose_str().unwrap_or_default());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let outcome = block_on(async move {
            let resp = req.send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            Ok::<_, reqwest::Error>((status, text))
        })?;
        let (status, text) = outcome.map_err(|e| {
            fail(
                1,
                format!(
                    "cannot reach the admin API at {}: {}",
                    self.base,
                    e.without_url()
                ),
            )
        })?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_owned()))
        };
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| value.as_str().unwrap_or_default().to_owned());
        Err(fail(1, format!("the gateway answered {status}: {message}")))
    }
}

/// A string field of a JSON answer ("" when absent).
fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The elements of an array field (none when absent).
fn list<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// A path segment or query value, percent-encoded (`@` kept: user names read better).
pub(crate) fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn done(r: Result<Value, ExitCode>) -> ExitCode {
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

pub(crate) fn add_user(
    r: &Remote,
    user: &str,
    upstream: Option<String>,
    mfa: Option<&str>,
) -> ExitCode {
    let body = json!({ "name": user, "upstream_user": upstream, "mfa": mfa });
    match r.call("POST", "/users", Some(body)) {
        Ok(v) => {
            errln!("added {}", text(&v, "name"));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn show_user(r: &Remote, user: &str) -> ExitCode {
    let v = match r.call("GET", &format!("/users/{}", seg(user)), None) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let s = |k: &str| text(&v, k).to_owned();
    let yes = |k: &str| v.get(k).and_then(Value::as_bool) == Some(true);
    outln!("user: {}", s("name"));
    outln!(
        "state: {}",
        if yes("disabled") {
            "disabled"
        } else {
            "enabled"
        }
    );
    outln!("upstream user: {}", s("upstream_user"));
    outln!("mfa: {}", s("mfa"));
    outln!(
        "totp: {}",
        if yes("totp_enrolled") {
            "enrolled"
        } else {
            "not enrolled"
        }
    );
    for a in list(&v, "app_passwords") {
        outln!(
            "app password {}\t{}\t{}\t{}",
            text(a, "id"),
            text(a, "state"),
            text(a, "created"),
            text(a, "label")
        );
    }
    ExitCode::SUCCESS
}

pub(crate) fn list_users(r: &Remote) -> ExitCode {
    let mut after = String::new();
    loop {
        let v = match r.call(
            "GET",
            &format!("/users?limit=1000&after={}", seg(&after)),
            None,
        ) {
            Ok(v) => v,
            Err(code) => return code,
        };
        for u in list(&v, "users") {
            let active = list(u, "app_passwords")
                .filter(|x| text(x, "state") == "active")
                .count();
            outln!(
                "{}\t{}\tapp-passwords={active}",
                text(u, "name"),
                if u.get("disabled").and_then(Value::as_bool) == Some(true) {
                    "disabled"
                } else {
                    "enabled"
                }
            );
        }
        match v.get("next").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n != after => after = n.to_owned(),
            _ => return ExitCode::SUCCESS,
        }
    }
}

pub(crate) fn set_disabled(r: &Remote, user: &str, disabled: bool) -> ExitCode {
    let res = r.call(
        "PATCH",
        &format!("/users/{}", seg(user)),
        Some(json!({ "disabled": disabled })),
    );
    if res.is_ok() {
        errln!("{user} {}", if disabled { "disabled" } else { "enabled" });
    }
    done(res)
}

pub(crate) fn remove_user(r: &Remote, user: &str) -> ExitCode {
    let res = r.call("DELETE", &format!("/users/{}", seg(user)), None);
    if res.is_ok() {
        errln!("removed {user}");
    }
    done(res)
}

pub(crate) fn create_app_password(
    r: &Remote,
    user: &str,
    label: &str,
    expires_in: Option<&str>,
) -> ExitCode {
    let body = json!({ "label": label, "expires_in": expires_in });
    match r.call(
        "POST",
        &format!("/users/{}/app-passwords", seg(user)),
        Some(body),
    ) {
        Ok(v) => {
            let id = v.get("app_password").map_or("", |a| text(a, "id"));
            errln!("app password {id} for {user}; it is shown only this once:");
            outln!("{}", text(&v, "password"));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn list_app_passwords(r: &Remote, user: &str) -> ExitCode {
    match r.call("GET", &format!("/users/{}/app-passwords", seg(user)), None) {
        Ok(v) => {
            for a in list(&v, "app_passwords") {
                outln!(
                    "{}\t{}\t{}\t{}",
                    text(a, "id"),
                    text(a, "state"),
                    text(a, "created"),
                    text(a, "label")
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn revoke_app_password(r: &Remote, user: &str, id: &str) -> ExitCode {
    let res = r.call(
        "DELETE",
        &format!("/users/{}/app-passwords/{}", seg(user), seg(id)),
        None,
    );
    if res.is_ok() {
        errln!("revoked {id} of {user}");
    }
    done(res)
}

/// `totp enroll` through the API: the URI (and QR code) from the gateway, the first code from
/// the operator's prompt, the confirmation back; nothing is stored before a valid code.
pub(crate) fn enroll_totp(r: &Remote, user: &str, force: bool) -> ExitCode {
    let v = match r.call(
        "POST",
        &format!("/users/{}/totp/enrolment", seg(user)),
        Some(json!({ "force": force })),
    ) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let uri = Secret::from(text(&v, "otpauth_uri").to_owned());
    let token = text(&v, "enrolment").to_owned();
    errln!("Scan this with an authenticator app (or enter the URI):\n");
    if let Some(qr) = crate::auth::totp::qr_terminal(&uri) {
        errln!("{qr}");
    }
    outln!("{}", uri.expose_str().unwrap_or_default());
    let _ = std::io::stdout().flush();
    err!("\nEnter the code the app shows: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() || line.trim().is_empty() {
        return fail(1, "no code entered; nothing saved");
    }
    let res = r.call(
        "POST",
        &format!("/users/{}/totp/confirmation", seg(user)),
        Some(json!({ "enrolment": token, "code": line.trim() })),
    );
    if res.is_ok() {
        errln!("TOTP enrolled for {user}. At login the password is the app password followed by the current code.");
    }
    done(res)
}

pub(crate) fn reset_totp(r: &Remote, user: &str) -> ExitCode {
    let res = r.call("DELETE", &format!("/users/{}/totp", seg(user)), None);
    if res.is_ok() {
        errln!("TOTP removed for {user}; they must enrol again");
    }
    done(res)
}

/// `sessions list` through the API: every replica's sessions (of `user` only).
pub(crate) fn list_sessions(r: &Remote, user: Option<&str>) -> ExitCode {
    let path = match user {
        Some(u) => format!("/sessions?user={}", seg(u)),
        None => "/sessions".to_owned(),
    };
    match r.call("GET", &path, None) {
        Ok(v) => {
            let list: Vec<crate::login::SessionInfo> = v
                .get("sessions")
                .cloned()
                .and_then(|s| serde_json::from_value(s).ok())
                .unwrap_or_default();
            super::sessions::print(&list);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `sessions kill` through the API: one session by id, or a user's (of one credential).
pub(crate) fn kill_sessions(
    r: &Remote,
    user: &str,
    credential: Option<&str>,
    session: Option<&str>,
) -> ExitCode {
    let path = match (session, credential) {
        (Some(id), _) => format!("/sessions/{}", seg(id)),
        (None, Some(c)) => format!("/users/{}/sessions?credential={}", seg(user), seg(c)),
        (None, None) => format!("/users/{}/sessions", seg(user)),
    };
    match r.call("DELETE", &path, None) {
        Ok(v) => {
            let listed = v.get("listed").and_then(Value::as_u64).unwrap_or(0);
            errln!("asked every replica to end them; {listed} session(s) matched");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_urls() {
        assert_eq!(
            super::base_url("127.0.0.1:9190").unwrap(),
            "http://127.0.0.1:9190/api/v1"
        );
        assert_eq!(
            super::base_url("https://gw.example.org/").unwrap(),
            "https://gw.example.org/api/v1"
        );
        assert_eq!(
            super::base_url("http://[::1]:9190").unwrap(),
            "http://[::1]:9190/api/v1"
        );
        assert!(super::base_url("http://").is_err());
        assert_eq!(super::seg("a b/c@d"), "a%20b%2Fc@d");
    }
}
