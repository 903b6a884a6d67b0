//! The signed-in person's own pages: app passwords, authenticator, devices, activity, setup.
//! Each change is one call of the shared services, audited with the person as the actor, and
//! answered with `303` back to its page (post/redirect/get), a notice named in the query from
//! a fixed list (nothing a visitor types is ever echoed as a notice).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::signin::query_value;
use super::{Portal, Posted, Req};
use crate::api::service::{self, ServiceError};
use crate::auth::users::User;
use crate::secret::Secret;

type Shared = State<Arc<Portal>>;

/// The notices a page shows when `?notice=` names one.
const NOTICES: &[&str] = &[
    "approved",
    "denied",
    "approval_gone",
    "reauthenticated",
    "revoked",
    "enrolled",
    "totp_reset",
    "session_ended",
    "sessions_ended",
    "disabled",
    "enabled",
    "cleared",
    "signed_out",
];

/// `2026-12-06 22:48 UTC`.
pub(crate) fn fmt_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

pub(crate) fn fmt_unix(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .map(fmt_time)
        .unwrap_or_default()
}

impl Portal {
    /// The notice of `?notice=`, translated, if it is one of [`NOTICES`].
    pub(crate) fn notice(&self, r: &Req, query: Option<&str>) -> Value {
        match query_value(query, "notice") {
            Some(n) if NOTICES.contains(&n.as_str()) => {
                Value::String(self.views.t(r.lang, &format!("notice_{n}")))
            }
            _ => Value::Null,
        }
    }

    /// A GET page for a signed-in person: the session, or the way to sign in.
    pub(crate) fn signed<'a>(
        &self,
        r: &'a Req,
        path: &str,
    ) -> Result<&'a super::Session, Response> {
        match r.session.as_ref() {
            Some(s) => Ok(s),
            None => Err(self.see_other(r, &format!("/login?back={}", super::signin::enc(path)))),
        }
    }

    /// A signed-in person's page: the request, their name and their record (or the way to
    /// sign in, or the refusal).
    pub(crate) async fn person(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        query: Option<&str>,
        path: &str,
    ) -> Result<(Req, String, User), Response> {
        let mut r = self.req(peer, headers, query);
        let user = self.signed(&r, path)?.user.clone();
        let (name, u) = self.record(&mut r, &user).await?;
        Ok((r, name, u))
    }

    /// The person's record; a disabled or removed account ends the portal session too.
    pub(crate) async fn record(&self, r: &mut Req, user: &str) -> Result<(String, User), Response> {
        match self.api.services.user(user).await {
            Ok((name, u)) if !u.disabled => Ok((name, u)),
            Ok(_) => {
                r.cookies.push(self.jar.clear(&self.jar.session_name()));
                r.session = None;
                Err(self.error(r, StatusCode::FORBIDDEN, "error_title", "disabled_account"))
            }
            // No mailbox (a helpdesk member, say): the session stays, for the helpdesk.
            Err(ServiceError::NotFound(_)) => {
                Err(self.error(r, StatusCode::FORBIDDEN, "error_title", "no_account"))
            }
            Err(e) => Err(self.service_error(r, &e)),
        }
    }

    pub(crate) fn service_error(&self, r: &Req, e: &ServiceError) -> Response {
        match e {
            ServiceError::Unavailable(m) => {
                tracing::warn!(error = %m, "portal: the credential store failed");
                self.error(
                    r,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "error_title",
                    "unavailable",
                )
            }
            ServiceError::NotFound(_) => {
                self.error(r, StatusCode::NOT_FOUND, "not_found_title", "not_found")
            }
            _ => self.error(
                r,
                StatusCode::UNPROCESSABLE_ENTITY,
                "error_title",
                "error_invalid",
            ),
        }
    }

    /// The app password rows of a user, with when, where and by what each was last used.
    pub(crate) async fn password_rows(&self, name: &str, u: &User) -> Vec<Value> {
        let usage = self.api.usage(name).await;
        let now = OffsetDateTime::now_utc();
        let mut rows: Vec<Value> = u
            .app_passwords
            .iter()
            .map(|a| {
                let v = service::app_password_view(a, now);
                let used = usage.iter().find(|x| {
                    x.scope == crate::store::UsageScope::AppPassword && x.credential == a.id
                });
                json!({
                    "id": v.id,
                    "label": v.label,
                    "state": v.state,
                    "created": fmt_time(v.created),
                    "expires": v.expires.map(fmt_time),
                    "last_used": used.map(|x| fmt_unix(x.last_used)),
                    "last_address": used.map(|x| x.address.clone()),
                    "last_client": used.map(|x| x.client.clone()).filter(|c| !c.is_empty()),
                    "active": v.state == "active",
                })
            })
            .collect();
        // Active ones first, newest first within each group.
        rows.reverse();
        rows.sort_by_key(|r| !r.get("active").and_then(Value::as_bool).unwrap_or(false));
        rows
    }

    /// The relayed sessions of a user (every replica), with their app password's label.
    pub(crate) async fn session_rows(
        &self,
        name: &str,
        u: &User,
    ) -> Result<Vec<Value>, ServiceError> {
        let list = self.api.session_list(Some(name)).await?;
        Ok(list
            .into_iter()
            .map(|s| {
                let credential = match s.credential.strip_prefix("oauth:") {
                    Some(issuer) => format!("OAuth ({issuer})"),
                    None => u
                        .app_passwords
                        .iter()
                        .find(|a| a.id == s.credential)
                        .map(|a| {
                            if a.label.is_empty() {
                                a.id.clone()
                            } else {
                                a.label.clone()
                            }
                        })
                        .unwrap_or_else(|| s.credential.clone()),
                };
                let client = match (s.client_name, s.client_version) {
                    (Some(n), Some(v)) => Some(format!("{n} {v}")),
                    (Some(n), None) => Some(n),
                    _ => None,
                };
                json!({
                    "id": s.id,
                    "client": client,
                    "address": s.client_address,
                    "since": fmt_unix(s.since),
                    "credential": credential,
                })
            })
            .collect())
    }

    /// Whether `name` is in attack mode (enforced).
    pub(crate) async fn attack_mode(&self, name: &str) -> bool {
        self.guard.status().await.is_ok_and(|list| {
            list.iter()
                .any(|b| b.scope == "account" && b.value == name && b.enforced)
        })
    }

    /// The recent logins of `name`, newest first, as rows.
    pub(crate) async fn login_rows(&self, name: &str) -> Vec<Value> {
        self.api
            .recent_logins(name, 50)
            .await
            .into_iter()
            .map(|l| {
                json!({
                    "at": fmt_unix(l.at),
                    "address": l.address,
                    "mechanism": l.mechanism,
                    "client": l.client,
                    "result": if l.result == "ok" { "ok" } else { "fail" },
                    "reason": l.reason,
                })
            })
            .collect()
    }

    /// What `_settings.html` shows: IMAP from `portal.mail`, and the gateway's SMTP and POP3
    /// fronts (`{port, ssl}`, or null where there is none) on the same host.
    pub(crate) fn mail_settings(&self, user: &str) -> Value {
        let m = &self.cfg.mail;
        let (smtp, pop3) = self.fronts.json();
        json!({
            "imap_host": m.imap_host,
            "imap_port": m.imap_port,
            "imap_starttls_port": m.imap_starttls_port,
            "smtp": smtp,
            "pop3": pop3,
            "user": user,
        })
    }
}

pub(crate) async fn home(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut r = p.req(peer, &headers, query.as_deref());
    let notice = p.notice(&r, query.as_deref());
    let Some(user) = r.session.as_ref().map(|s| s.user.clone()) else {
        return p.page(
            &r,
            "signin.html",
            "signin",
            "signin_title",
            json!({ "notice": notice }),
        );
    };
    app_passwords_page(&p, &mut r, &user, notice, Value::Null).await
}

async fn app_passwords_page(
    p: &Portal,
    r: &mut Req,
    user: &str,
    notice: Value,
    error: Value,
) -> Response {
    let (name, u) = match p.record(r, user).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let rows = p.password_rows(&name, &u).await;
    let approvals = p.approval_rows(&name).await;
    p.page(
        r,
        "app_passwords.html",
        "app_passwords",
        "app_passwords_title",
        json!({
            "passwords": rows,
            "approvals": approvals,
            "approvals_base": p.approvals.is_some().then_some("/approvals"),
            "can_approve": true,
            "revoke_base": "/app-passwords",
            "notice": notice,
            "error": error,
        }),
    )
}

/// `expires`: the choices the form offers, nothing else.
fn expiry(choice: &str) -> Result<Option<Duration>, ()> {
    let day = 86_400;
    match choice {
        "" => Ok(None),
        "30d" => Ok(Some(Duration::from_secs(30 * day))),
        "90d" => Ok(Some(Duration::from_secs(90 * day))),
        "365d" => Ok(Some(Duration::from_secs(365 * day))),
        _ => Err(()),
    }
}

pub(crate) async fn create_app_password(State(p): Shared, post: Posted) -> Response {
    let Posted {
        mut r,
        form,
        session,
    } = post;
    if !p.fresh(&session) {
        return p.reauth(&r, "/");
    }
    let user = session.user;
    let label = form.get("label").unwrap_or("").trim().to_owned();
    let Ok(expires) = expiry(form.get("expires").unwrap_or("")) else {
        return p.error(
            &r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "error_title",
            "bad_request",
        );
    };
    if let Err(resp) = p.record(&mut r, &user).await {
        return resp;
    }
    match p
        .api
        .services
        .create_app_password(&user, &label, expires)
        .await
    {
        Ok(created) => {
            crate::observe::audit_portal(
                &user,
                "app_password_created",
                &user,
                &created.view.id,
                true,
            );
            let grouped = crate::auth::app_password::grouped(&created.password);
            p.page(
                &r,
                "created.html",
                "app_passwords",
                "created_title",
                json!({
                    "password": grouped.expose_str().unwrap_or_default(),
                    "label": created.view.label,
                    "mail": p.mail_settings(&user),
                }),
            )
        }
        Err(e @ (ServiceError::Invalid(_) | ServiceError::Conflict(_))) => {
            let error = Value::String(e.to_string());
            let mut resp = app_passwords_page(&p, &mut r, &user, Value::Null, error).await;
            *resp.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            resp
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn revoke_app_password(
    State(p): Shared,
    Path(id): Path<String>,
    post: Posted,
) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    let user = session.user;
    match p.api.services.revoke_app_password(&user, &id).await {
        Ok(changed) => {
            crate::observe::audit_portal(&user, "app_password_revoked", &user, &id, changed);
            p.see_other(&r, "/?notice=revoked")
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn totp(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (r, _, u) = match p.person(peer, &headers, query.as_deref(), "/totp").await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let notice = p.notice(&r, query.as_deref());
    p.page(
        &r,
        "totp.html",
        "totp",
        "totp_title",
        json!({ "enrolled": u.totp.is_some(), "notice": notice }),
    )
}

/// The base32 secret of an `otpauth://` URI, in groups of four for reading.
fn secret_of(uri: &Secret) -> String {
    let text = uri.expose_str().unwrap_or_default();
    let raw = text
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("secret="))
        .unwrap_or("");
    raw.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The QR code of `uri` as inline SVG (no prolog; hidden from assistive technology, which
/// reads the figure's caption instead).
fn qr_svg(uri: &Secret) -> String {
    let Ok(code) = qrcode::QrCode::new(uri.expose()) else {
        return String::new();
    };
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(220, 220)
        .quiet_zone(true)
        .build();
    let start = svg.find("<svg").unwrap_or(0);
    svg.get(start..).unwrap_or_default().replacen(
        "<svg ",
        "<svg aria-hidden=\"true\" focusable=\"false\" ",
        1,
    )
}

fn enrol_page(p: &Portal, r: &Req, uri: &Secret, token: &str, error: Value) -> Response {
    p.page(
        r,
        "enrol.html",
        "totp",
        "enrol_title",
        json!({
            "qr": qr_svg(uri),
            "secret": secret_of(uri),
            "enrolment": token,
            "error": error,
        }),
    )
}

pub(crate) async fn totp_enrol(State(p): Shared, post: Posted) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    if !p.fresh(&session) {
        return p.reauth(&r, "/totp");
    }
    let user = session.user;
    match p.api.services.totp_begin(&user, false).await {
        Ok(e) => enrol_page(&p, &r, &e.otpauth_uri, &e.token, Value::Null),
        // Enrolled meanwhile (another tab): the page says so.
        Err(ServiceError::Conflict(_)) => p.see_other(&r, "/totp"),
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn totp_confirm(State(p): Shared, post: Posted) -> Response {
    let Posted { r, form, session } = post;
    if !p.fresh(&session) {
        return p.reauth(&r, "/totp");
    }
    let user = session.user;
    let token = form.get("enrolment").unwrap_or("");
    let code: String = form
        .get("code")
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(16)
        .collect();
    match p.api.services.totp_confirm(&user, token, &code).await {
        Ok(()) => {
            crate::observe::audit_portal(&user, "totp_enrolled", &user, "", true);
            p.see_other(&r, "/totp?notice=enrolled")
        }
        Err(ServiceError::Invalid(_)) => {
            // The token is ours (sealed to this user) or nothing: show the same enrolment again.
            match p.ring.decrypt(&user, token) {
                Ok(secret) => {
                    let uri = crate::auth::totp::otpauth_uri(
                        &p.totp_issuer,
                        &user,
                        &secret,
                        p.totp_digits,
                    );
                    let error = Value::String(p.views.t(r.lang, "error_wrong_code"));
                    let mut resp = enrol_page(&p, &r, &uri, token, error);
                    *resp.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                    resp
                }
                Err(_) => p.error(
                    &r,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "error_title",
                    "bad_request",
                ),
            }
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn totp_reset(State(p): Shared, post: Posted) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    if !p.fresh(&session) {
        return p.reauth(&r, "/totp");
    }
    let user = session.user;
    match p.api.services.totp_reset(&user).await {
        Ok(changed) => {
            crate::observe::audit_portal(&user, "totp_reset", &user, "", changed);
            p.see_other(&r, "/totp?notice=totp_reset")
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn devices(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (r, name, u) = match p.person(peer, &headers, query.as_deref(), "/devices").await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let sessions = match p.session_rows(&name, &u).await {
        Ok(s) => s,
        Err(e) => return p.service_error(&r, &e),
    };
    let notice = p.notice(&r, query.as_deref());
    p.page(
        &r,
        "devices.html",
        "devices",
        "devices_title",
        json!({ "sessions": sessions, "end_base": "/devices", "notice": notice }),
    )
}

/// Ends one session of `user` (only one of theirs: an id of someone else's is not found).
pub(crate) async fn end_one(p: &Portal, user: &str, id: &str) -> Result<(), ServiceError> {
    let mine = p
        .api
        .session_list(Some(user))
        .await?
        .into_iter()
        .any(|s| s.id == id);
    if !mine {
        return Err(ServiceError::NotFound(format!("no session {id}")));
    }
    p.api.end_sessions(user, &format!("session:{id}")).await?;
    Ok(())
}

pub(crate) async fn end_device(State(p): Shared, Path(id): Path<String>, post: Posted) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    let user = session.user;
    match end_one(&p, &user, &id).await {
        Ok(()) => {
            crate::observe::audit_portal(
                &user,
                "sessions_killed",
                &user,
                &format!("session:{id}"),
                true,
            );
            p.see_other(&r, "/devices?notice=session_ended")
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn activity(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (r, name, _) = match p
        .person(peer, &headers, query.as_deref(), "/activity")
        .await
    {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let logins = p.login_rows(&name).await;
    let attack = p.attack_mode(&name).await;
    p.page(
        &r,
        "activity.html",
        "activity",
        "activity_title",
        json!({ "logins": logins, "attack": attack }),
    )
}

pub(crate) async fn setup(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let r = p.req(peer, &headers, query.as_deref());
    let user = match p.signed(&r, "/setup") {
        Ok(s) => s.user.clone(),
        Err(resp) => return resp,
    };
    p.page(
        &r,
        "setup.html",
        "setup",
        "setup_title",
        json!({ "mail": p.mail_settings(&user) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_offered_expiries_are_taken() {
        assert_eq!(expiry(""), Ok(None));
        assert_eq!(expiry("90d"), Ok(Some(Duration::from_secs(90 * 86_400))));
        assert!(expiry("1s").is_err());
        assert!(expiry("9999999d").is_err());
    }

    #[test]
    fn the_enrolment_shows_the_secret_in_fours_and_a_bare_svg() {
        let uri = Secret::from("otpauth://totp/x:y?secret=ABCDEFGHIJKLMNOPQR&issuer=x".to_owned());
        assert_eq!(secret_of(&uri), "ABCD EFGH IJKL MNOP QR");
        let svg = qr_svg(&uri);
        assert!(svg.starts_with("<svg aria-hidden=\"true\""), "{svg:.80}");
        assert!(!svg.contains("<?xml") && !svg.contains("style="));
    }
}
