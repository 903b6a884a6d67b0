//! The helpdesk: administrators (by the configured claim of their ID token) find a person, see
//! what the person sees, and disable or enable the account, reset the authenticator, revoke app
//! passwords, end sessions, and clear guard blocks. Every action is audited with the
//! administrator as the actor. Re-enabling an account and resetting an authenticator need a
//! fresh sign-in, like the person's own sensitive actions.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::signin::{enc, query_value};
use super::{Portal, Posted, Req};
use crate::store::ListQuery;

type Shared = State<Arc<Portal>>;

impl Portal {
    /// Whether `s` may use the helpdesk: the administrator claim at sign-in, and their own
    /// account (if they have one here) not disabled since — a disabled administrator loses
    /// the helpdesk at their next request, not at the end of their portal session.
    pub(crate) async fn active_admin(&self, s: &super::Session) -> bool {
        s.admin
            && match self.api.services.store.user(&s.user).await {
                Ok(Some(u)) => !u.disabled,
                Ok(None) => true,
                Err(_) => false,
            }
    }

    /// The signed-in administrator, or the answer for anyone else.
    pub(crate) async fn admin<'a>(
        &self,
        r: &'a Req,
        path: &str,
    ) -> Result<&'a super::Session, Response> {
        let s = self.signed(r, path)?;
        if self.active_admin(s).await {
            Ok(s)
        } else {
            Err(self.forbidden(r))
        }
    }

    async fn block_rows(&self, only: Option<&str>) -> Vec<Value> {
        match self.guard.status().await {
            Ok(list) => list
                .into_iter()
                // The account's own blocks: attack mode, suspect app passwords, denied networks.
                .filter(|b| {
                    only.is_none_or(|v| {
                        b.value == v || b.value.strip_prefix(v).is_some_and(|r| r.starts_with('/'))
                    })
                })
                .map(|b| json!(b))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

pub(crate) fn user_base(name: &str) -> String {
    format!("/admin/users/{}", enc(name))
}

pub(crate) async fn search(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let r = p.req(peer, &headers, query.as_deref());
    if let Err(resp) = p.admin(&r, "/admin").await {
        return resp;
    }
    let q = query_value(query.as_deref(), "q")
        .unwrap_or_default()
        .trim()
        .chars()
        .take(200)
        .collect::<String>();
    let searched = !q.is_empty();
    let users: Vec<Value> = if searched {
        let list = p
            .api
            .services
            .store
            .list(&ListQuery {
                search: Some(q.to_lowercase()),
                after: None,
                limit: 50,
            })
            .await;
        match list {
            Ok(list) => list
                .into_iter()
                .map(|(name, u)| json!({ "name": name, "disabled": u.disabled }))
                .collect(),
            Err(e) => return p.service_error(&r, &e.into()),
        }
    } else {
        Vec::new()
    };
    let blocks = p.block_rows(None).await;
    let notice = p.notice(&r, query.as_deref());
    p.page(
        &r,
        "admin.html",
        "admin",
        "admin_title",
        json!({ "q": q, "searched": searched, "users": users, "blocks": blocks, "notice": notice }),
    )
}

pub(crate) async fn user(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(user): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let r = p.req(peer, &headers, query.as_deref());
    if let Err(resp) = p.admin(&r, &user_base(&user)).await {
        return resp;
    }
    let (name, u) = match p.api.services.user(&user).await {
        Ok(x) => x,
        Err(e) => return p.service_error(&r, &e),
    };
    let base = user_base(&name);
    let passwords = p.password_rows(&name, &u).await;
    let sessions = match p.session_rows(&name, &u).await {
        Ok(s) => s,
        Err(e) => return p.service_error(&r, &e),
    };
    let logins = p.login_rows(&name).await;
    let blocks = p.block_rows(Some(&name)).await;
    let attack = p.attack_mode(&name).await;
    let notice = p.notice(&r, query.as_deref());
    let approvals = p.approval_rows(&name).await;
    p.page(
        &r,
        "admin_user.html",
        "admin",
        "admin_title",
        json!({
            "title": name,
            "subject": name,
            "approvals": approvals,
            "approvals_base": p.approvals.is_some().then(|| format!("{base}/approvals")),
            "can_approve": false,
            "base": base,
            "disabled": u.disabled,
            "enrolled": u.totp.is_some(),
            "attack": attack,
            "passwords": passwords,
            "revoke_base": format!("{base}/app-passwords"),
            "sessions": sessions,
            "end_base": format!("{base}/devices"),
            "blocks": blocks,
            "logins": logins,
            "notice": notice,
        }),
    )
}

pub(crate) async fn action(
    State(p): Shared,
    Path((user, action)): Path<(String, String)>,
    post: Posted,
) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    if !p.active_admin(&session).await {
        return p.forbidden(&r);
    }
    let admin = session;
    let name = match p.api.services.name(&user) {
        Ok(n) => n,
        Err(e) => return p.service_error(&r, &e),
    };
    let base = user_base(&name);
    let sensitive = matches!(action.as_str(), "enable" | "totp-reset");
    if sensitive && !p.fresh(&admin) {
        return p.reauth(&r, &base);
    }
    let services = &p.api.services;
    let (audit, notice, result) = match action.as_str() {
        "disable" => (
            "user_disabled",
            "disabled",
            services.update_user(&name, Some(true), None, None).await,
        ),
        "enable" => (
            "user_enabled",
            "enabled",
            services.update_user(&name, Some(false), None, None).await,
        ),
        "totp-reset" => ("totp_reset", "totp_reset", services.totp_reset(&name).await),
        "sessions-end" => (
            "sessions_killed",
            "sessions_ended",
            p.api.end_sessions(&name, "").await.map(|n| n > 0),
        ),
        _ => return p.error(&r, StatusCode::NOT_FOUND, "not_found_title", "not_found"),
    };
    match result {
        Ok(changed) => {
            crate::observe::audit_portal(&admin.user, audit, &name, "", changed);
            p.see_other(&r, &format!("{base}?notice={notice}"))
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn revoke(
    State(p): Shared,
    Path((user, id)): Path<(String, String)>,
    post: Posted,
) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    if !p.active_admin(&session).await {
        return p.forbidden(&r);
    }
    let admin = session.user;
    match p.api.services.revoke_app_password(&user, &id).await {
        Ok(changed) => {
            let name = p.api.services.name(&user).unwrap_or_default();
            crate::observe::audit_portal(&admin, "app_password_revoked", &name, &id, changed);
            p.see_other(&r, &format!("{}?notice=revoked", user_base(&name)))
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn end_device(
    State(p): Shared,
    Path((user, id)): Path<(String, String)>,
    post: Posted,
) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    if !p.active_admin(&session).await {
        return p.forbidden(&r);
    }
    let admin = session.user;
    let name = match p.api.services.name(&user) {
        Ok(n) => n,
        Err(e) => return p.service_error(&r, &e),
    };
    match super::pages::end_one(&p, &name, &id).await {
        Ok(()) => {
            crate::observe::audit_portal(
                &admin,
                "sessions_killed",
                &name,
                &format!("session:{id}"),
                true,
            );
            p.see_other(&r, &format!("{}?notice=session_ended", user_base(&name)))
        }
        Err(e) => p.service_error(&r, &e),
    }
}

pub(crate) async fn guard_clear(State(p): Shared, post: Posted) -> Response {
    let Posted { r, form, session } = post;
    if !p.active_admin(&session).await {
        return p.forbidden(&r);
    }
    let admin = session.user;
    let scope = form.get("scope").filter(|s| !s.is_empty());
    let value = form.get("value").filter(|s| !s.is_empty());
    if value.is_none() {
        return p.error(
            &r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "error_title",
            "bad_request",
        );
    }
    let back = super::cookie::safe_back(form.get("back").unwrap_or("/admin"));
    match p.guard.clear(scope, value).await {
        Ok(n) => {
            crate::observe::audit_portal(
                &admin,
                "guard_cleared",
                value.unwrap_or_default(),
                scope.unwrap_or_default(),
                n > 0,
            );
            p.see_other(&r, &format!("{back}?notice=cleared"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "portal: the guard's state cannot be changed");
            p.error(
                &r,
                StatusCode::SERVICE_UNAVAILABLE,
                "error_title",
                "unavailable",
            )
        }
    }
}
