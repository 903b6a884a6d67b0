//! Pending sign-ins in the portal (`auth.mfa.approval: portal`, [`crate::auth::approval`]):
//! listed at the top of the person's page and of the helpdesk's view of them, refreshed by the
//! page's script from a fragment; the person approves (after a sign-in fresh enough, like any
//! sensitive action) or denies. The helpdesk may deny, never approve: a caller who talks the
//! helpdesk into letting "their" phone in is exactly the attack this guards against.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::helpdesk::user_base;
use super::pages::fmt_unix;
use super::{Portal, Posted, Req};

type Shared = State<Arc<Portal>>;

impl Portal {
    /// The pending sign-ins of `name` as rows (none without approvals).
    pub(crate) async fn approval_rows(&self, name: &str) -> Vec<Value> {
        let Some(a) = &self.approvals else {
            return Vec::new();
        };
        a.list(name)
            .await
            .into_iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "label": p.label,
                    "address": p.address,
                    "network": p.network,
                    "client": p.client,
                    "at": fmt_unix(p.at),
                })
            })
            .collect()
    }

    /// The list alone, for the page's script (empty without a session).
    async fn fragment_for(&self, r: &Req, name: &str, base: &str, can_approve: bool) -> Response {
        let rows = self.approval_rows(name).await;
        let ctx = json!({
            "approvals": rows,
            "approvals_base": base,
            "can_approve": can_approve,
            "csrf": r.session.as_ref().map(|s| s.csrf.clone()).unwrap_or_default(),
        });
        match self.views.render("_approvals.html", r.lang, &ctx) {
            Ok(html) => {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "portal: the approvals fragment failed to render");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

pub(crate) async fn fragment(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let r = p.req(peer, &headers, None);
    let Some(user) = r.session.as_ref().map(|s| s.user.clone()) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    p.fragment_for(&r, &user, "/approvals", true).await
}

pub(crate) async fn admin_fragment(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    let r = p.req(peer, &headers, None);
    let admin = match &r.session {
        Some(s) => p.active_admin(s).await,
        None => false,
    };
    if !admin {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Ok(name) = p.api.services.name(&user) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let base = format!("{}/approvals", user_base(&name));
    p.fragment_for(&r, &name, &base, false).await
}

pub(crate) async fn approve(State(p): Shared, Path(id): Path<String>, post: Posted) -> Response {
    let Posted {
        mut r,
        form: _,
        session,
    } = post;
    if !p.fresh(&session) {
        return p.reauth(&r, "/");
    }
    let user = session.user;
    let Some(approvals) = p.approvals.clone() else {
        return p.error(&r, StatusCode::NOT_FOUND, "not_found_title", "not_found");
    };
    let (name, u) = match p.record(&mut r, &user).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let enrolment = crate::auth::enrolment_tag(u.totp.as_deref());
    match approvals
        .approve(&name, &id, &enrolment, p.unlock_ttl)
        .await
    {
        Some(a) => {
            crate::observe::audit_signin_answer(
                &name,
                "signin_approved",
                &name,
                &a.credential,
                &a.address,
                &a.network,
            );
            p.see_other(&r, "/?notice=approved")
        }
        None => p.see_other(&r, "/?notice=approval_gone"),
    }
}

pub(crate) async fn deny(State(p): Shared, Path(id): Path<String>, post: Posted) -> Response {
    let Posted {
        r,
        form: _,
        session,
    } = post;
    let user = session.user;
    answer_deny(&p, &r, &user, &user, &id, "/").await
}

pub(crate) async fn admin_deny(
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
    let Ok(name) = p.api.services.name(&user) else {
        return p.error(&r, StatusCode::NOT_FOUND, "not_found_title", "not_found");
    };
    let back = user_base(&name);
    answer_deny(&p, &r, &admin, &name, &id, &back).await
}

async fn answer_deny(
    p: &Portal,
    r: &Req,
    actor: &str,
    user: &str,
    id: &str,
    back: &str,
) -> Response {
    let Some(approvals) = p.approvals.clone() else {
        return p.error(r, StatusCode::NOT_FOUND, "not_found_title", "not_found");
    };
    match approvals.deny(user, id).await {
        Some(a) => {
            crate::observe::audit_signin_answer(
                actor,
                "signin_denied",
                user,
                &a.credential,
                &a.address,
                &a.network,
            );
            p.see_other(r, &format!("{back}?notice=denied"))
        }
        None => p.see_other(r, &format!("{back}?notice=approval_gone")),
    }
}
