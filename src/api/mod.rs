//! The admin API: `/api/v1/…` on the admin listener, JSON, behind the admin bearer token (the
//! listener checks it, in constant time, and names the token that passed: the *actor* every
//! change is audited with). The OpenAPI 3.1 document is at `/api/v1/openapi.json`.
//!
//! Every change is a call of [`service::Services`] — the same calls whatever face asks (this
//! API, the CLI through it) — and is idempotent where it can be: disabling a disabled user,
//! revoking a revoked app password or deleting a deleted user answers success and changes
//! nothing. Errors are `{"error": "...", "code": "not_found|conflict|invalid|unavailable"}`.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::observe::admin::Actor;

pub mod openapi;
pub mod service;

use service::{ServiceError, Services};

/// What the API handlers share.
pub struct Api {
    pub services: Services,
    /// The longest page `GET /users` returns.
    pub max_page: u32,
    /// This replica's relayed sessions.
    pub sessions: crate::login::registry::UserSessions,
    /// Last-used records not written yet (with the users file: all there are).
    pub last_used: Arc<crate::store::activity::LastUsed>,
    /// Login-history events not written yet (with the users file: all there are).
    pub login_history: Arc<crate::store::activity::LoginHistory>,
}

impl Api {
    /// Whether the store is a database (sessions and last-used records of every replica are
    /// in it), not the users file (this replica's own only).
    fn database(&self) -> bool {
        self.services.store.backend() != crate::config::StoreBackend::File
    }

    /// The sessions of every replica (the users file: of this one), of `user` only if given.
    pub async fn session_list(
        &self,
        user: Option<&str>,
    ) -> Result<Vec<crate::login::SessionInfo>, ServiceError> {
        // This replica's own at once (the directory mirrors them within a second).
        let mut list = self.sessions.list(user);
        if self.database() {
            for s in self.services.store.sessions(user).await? {
                if !list.iter().any(|x| x.id == s.id) {
                    list.push(s);
                }
            }
        }
        list.sort_by(|a, b| (a.since, &a.id).cmp(&(b.since, &b.id)));
        Ok(list)
    }

    /// Ends `user`'s sessions that `which` names (see `UserSessions::close_matching`): here at
    /// once, on the other replicas through the change log.
    pub async fn end_sessions(&self, user: &str, which: &str) -> Result<usize, ServiceError> {
        if self.database() {
            self.services
                .store
                .log_event(crate::store::ChangeKind::Sessions, user, which)
                .await?;
        }
        Ok(self.sessions.close_matching(user, which))
    }

    /// The last-used records of `user`: the store's, newer ones still buffered here winning.
    pub async fn usage(&self, user: &str) -> Vec<crate::store::Usage> {
        let mut all = if self.database() {
            self.services.store.usage(user).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        for u in self.last_used.usage(user) {
            match all
                .iter_mut()
                .find(|x| x.scope == u.scope && x.credential == u.credential)
            {
                Some(x) if x.last_used >= u.last_used => {}
                Some(x) => *x = u,
                None => all.push(u),
            }
        }
        all
    }

    /// The newest logins of `user` (a normalised name), newest first, at most `limit` (and at
    /// most [`crate::store::LOGIN_HISTORY_PER_USER`]): the store's rows and those still
    /// buffered in this replica, each once. A store that cannot be read leaves the buffered
    /// ones.
    pub async fn recent_logins(&self, user: &str, limit: u32) -> Vec<crate::store::LoginEvent> {
        let cap = crate::store::LOGIN_HISTORY_PER_USER;
        let limit = usize::try_from(limit).unwrap_or(cap).min(cap);
        // The buffer first: an event written meanwhile is then in both (and counted once),
        // never in neither.
        let mut all = self.login_history.recent(user, limit);
        if self.database() {
            match self
                .services
                .store
                .recent_logins(user, u32::try_from(limit).unwrap_or(u32::MAX))
                .await
            {
                Ok(stored) => {
                    // A buffered event the store has too (written meanwhile) is shown once.
                    let mut unmatched = stored.clone();
                    all.retain(|e| match unmatched.iter().position(|x| x == e) {
                        Some(i) => {
                            unmatched.swap_remove(i);
                            false
                        }
                        None => true,
                    });
                    all.extend(stored);
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the login history"),
            }
        }
        // Stable: buffered events (newer) before stored ones of the same second.
        all.sort_by_key(|e| std::cmp::Reverse(e.at));
        all.truncate(limit);
        all
    }
}

type Shared = State<Arc<Api>>;

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ServiceError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ServiceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        (
            status,
            Json(json!({ "error": self.to_string(), "code": code })),
        )
            .into_response()
    }
}

/// The routes, relative to `/api/v1` (the admin listener nests them and checks the token).
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/users", get(list_users).post(add_user))
        .route(
            "/users/{user}",
            get(get_user).patch(update_user).delete(remove_user),
        )
        .route(
            "/users/{user}/app-passwords",
            get(list_app_passwords).post(create_app_password),
        )
        .route(
            "/users/{user}/app-passwords/{id}",
            delete(revoke_app_password),
        )
        .route("/users/{user}/totp", delete(reset_totp))
        .route("/users/{user}/sessions", delete(end_user_sessions))
        .route("/users/{user}/logins", get(list_logins))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", delete(end_session))
        .route("/users/{user}/totp/enrolment", post(begin_totp))
        .route("/users/{user}/totp/confirmation", post(confirm_totp))
        .with_state(api)
}

/// The audit line of an operator action done through the API.
fn audited(actor: &Actor, action: &str, user: &str, credential: &str, changed: bool) {
    crate::observe::audit_api(&actor.0, action, user, credential, changed);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    search: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

async fn list_users(State(api): Shared, Query(p): Query<ListParams>) -> Response {
    let limit = p.limit.unwrap_or(100).clamp(1, api.max_page);
    let q = crate::store::ListQuery {
        search: p.search.filter(|s| !s.is_empty()),
        after: p.after.filter(|s| !s.is_empty()),
        limit: limit + 1,
    };
    match api.services.store.list(&q).await {
        Ok(mut users) => {
            let more = users.len() > limit as usize;
            users.truncate(limit as usize);
            let next = more.then(|| users.last().map(|(n, _)| n.clone())).flatten();
            let views: Vec<_> = users
                .iter()
                .map(|(n, u)| service::user_view(n, u))
                .collect();
            Json(json!({ "users": views, "next": next })).into_response()
        }
        Err(e) => ServiceError::from(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    upstream_user: Option<String>,
    mfa: Option<String>,
}

async fn add_user(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Json(body): Json<NewUser>,
) -> Response {
    let mfa = match body.mfa.as_deref().map(service::parse_mfa).transpose() {
        Ok(m) => m.flatten(),
        Err(e) => return e.into_response(),
    };
    match api
        .services
        .add_user(&body.name, body.upstream_user, mfa)
        .await
    {
        Ok(changed) => {
            let (name, u) = match api.services.user(&body.name).await {
                Ok(x) => x,
                Err(e) => return e.into_response(),
            };
            audited(&actor, "user_added", &name, "", changed);
            let status = if changed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(service::user_view(&name, &u))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn get_user(State(api): Shared, Path(user): Path<String>) -> Response {
    match api.services.user(&user).await {
        Ok((name, u)) => Json(service::user_view(&name, &u)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `PATCH /users/{user}`: `disabled`, `upstream_user` (null: the login name), `mfa`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPatch {
    disabled: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    upstream_user: Option<Option<String>>,
    mfa: Option<String>,
}

/// A present field, null or not, is `Some` (absent stays `None`).
fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn update_user(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
    Json(p): Json<UserPatch>,
) -> Response {
    let mfa = match p.mfa.as_deref().map(service::parse_mfa).transpose() {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match api
        .services
        .update_user(&user, p.disabled, p.upstream_user, mfa)
        .await
    {
        Ok(changed) => match api.services.user(&user).await {
            Ok((name, u)) => {
                let action = match p.disabled {
                    Some(true) => "user_disabled",
                    Some(false) => "user_enabled",
                    None => "user_changed",
                };
                audited(&actor, action, &name, "", changed);
                Json(service::user_view(&name, &u)).into_response()
            }
            Err(e) => e.into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn remove_user(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
) -> Response {
    match api.services.remove_user(&user).await {
        Ok(changed) => {
            let name = api.services.name(&user).unwrap_or_default();
            audited(&actor, "user_removed", &name, "", changed);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn list_app_passwords(State(api): Shared, Path(user): Path<String>) -> Response {
    let (name, u) = match api.services.user(&user).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let usage = api.usage(&name).await;
    let list: Vec<Value> = service::user_view(&name, &u)
        .app_passwords
        .into_iter()
        .map(|a| {
            let used = usage
                .iter()
                .find(|x| x.scope == crate::store::UsageScope::AppPassword && x.credential == a.id);
            let mut v = serde_json::to_value(&a).unwrap_or(Value::Null);
            if let Some(obj) = v.as_object_mut() {
                obj.insert("last_used".into(), used.map_or(Value::Null, last_use));
            }
            v
        })
        .collect();
    Json(json!({ "user": name, "app_passwords": list })).into_response()
}

/// A last-used record as the API shows it.
fn last_use(u: &crate::store::Usage) -> Value {
    let at = time::OffsetDateTime::from_unix_timestamp(u.last_used)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    json!({ "at": at, "address": u.address, "client": u.client })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginsParams {
    limit: Option<u32>,
}

/// `GET /users/{user}/logins?limit=`: the user's recent logins, newest first.
async fn list_logins(
    State(api): Shared,
    Path(user): Path<String>,
    Query(p): Query<LoginsParams>,
) -> Response {
    let (name, _) = match api.services.user(&user).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let cap = u32::try_from(crate::store::LOGIN_HISTORY_PER_USER).unwrap_or(u32::MAX);
    let limit = p.limit.unwrap_or(cap).clamp(1, cap);
    let logins: Vec<Value> = api
        .recent_logins(&name, limit)
        .await
        .iter()
        .map(login_view)
        .collect();
    Json(json!({ "user": name, "logins": logins })).into_response()
}

/// A login-history event as the API shows it (`at` in RFC 3339).
fn login_view(e: &crate::store::LoginEvent) -> Value {
    let at = time::OffsetDateTime::from_unix_timestamp(e.at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    json!({
        "at": at,
        "address": e.address,
        "listener": e.listener,
        "mechanism": e.mechanism,
        "result": e.result,
        "reason": e.reason,
        "client": e.client,
        "credential": e.credential,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionParams {
    user: Option<String>,
}

async fn list_sessions(State(api): Shared, Query(p): Query<SessionParams>) -> Response {
    let user = match p
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|u| api.services.name(u))
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => return e.into_response(),
    };
    match api.session_list(user.as_deref()).await {
        Ok(list) => Json(json!({ "sessions": list })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn end_session(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    let found = match api.session_list(None).await {
        Ok(list) => list.into_iter().find(|s| s.id == id),
        Err(e) => return e.into_response(),
    };
    let Some(session) = found else {
        return ServiceError::NotFound(format!("no session {id}")).into_response();
    };
    let which = format!("session:{id}");
    match api.end_sessions(&session.user, &which).await {
        Ok(_) => {
            audited(&actor, "sessions_killed", &session.user, &which, true);
            (StatusCode::ACCEPTED, Json(json!({ "listed": 1 }))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndParams {
    /// An app password id or `oauth:ISSUER`; absent: every session of the user.
    credential: Option<String>,
}

async fn end_user_sessions(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
    Query(p): Query<EndParams>,
) -> Response {
    let name = match api.services.name(&user) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let which = p.credential.unwrap_or_default();
    if which.chars().any(char::is_control) || which.len() > 300 || which.starts_with("session:") {
        return ServiceError::Invalid(
            "credential is not an app password id or oauth:ISSUER".into(),
        )
        .into_response();
    }
    let listed = match api.session_list(Some(&name)).await {
        Ok(list) => list
            .iter()
            .filter(|s| which.is_empty() || s.credential == which)
            .count(),
        Err(e) => return e.into_response(),
    };
    match api.end_sessions(&name, &which).await {
        Ok(_) => {
            audited(&actor, "sessions_killed", &name, &which, listed > 0);
            (StatusCode::ACCEPTED, Json(json!({ "listed": listed }))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAppPassword {
    #[serde(default)]
    label: String,
    /// A duration such as `90d`.
    expires_in: Option<String>,
}

async fn create_app_password(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
    Json(body): Json<NewAppPassword>,
) -> Response {
    let expires = match body
        .expires_in
        .as_deref()
        .map(crate::config::units::parse_duration)
    {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(_) => {
            return ServiceError::Invalid("expires_in must be a duration such as 90d".into())
                .into_response()
        }
    };
    match api
        .services
        .create_app_password(&user, &body.label, expires)
        .await
    {
        Ok(created) => {
            let name = api.services.name(&user).unwrap_or_default();
            audited(
                &actor,
                "app_password_created",
                &name,
                &created.view.id,
                true,
            );
            let grouped = crate::auth::app_password::grouped(&created.password);
            (
                StatusCode::CREATED,
                [(header::CACHE_CONTROL, "no-store")],
                Json(json!({
                    "app_password": created.view,
                    // Shown once: the store keeps only its hash.
                    "password": grouped.expose_str().unwrap_or_default(),
                })),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn revoke_app_password(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path((user, id)): Path<(String, String)>,
) -> Response {
    match api.services.revoke_app_password(&user, &id).await {
        Ok(changed) => {
            let name = api.services.name(&user).unwrap_or_default();
            audited(&actor, "app_password_revoked", &name, &id, changed);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BeginTotp {
    #[serde(default)]
    force: bool,
}

async fn begin_totp(
    State(api): Shared,
    Path(user): Path<String>,
    body: Option<Json<BeginTotp>>,
) -> Response {
    let force = body.map(|Json(b)| b.force).unwrap_or_default();
    match api.services.totp_begin(&user, force).await {
        Ok(e) => (
            StatusCode::CREATED,
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({
                "otpauth_uri": e.otpauth_uri.expose_str().unwrap_or_default(),
                "enrolment": e.token,
            })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmTotp {
    enrolment: String,
    code: String,
}

async fn confirm_totp(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
    Json(body): Json<ConfirmTotp>,
) -> Response {
    match api
        .services
        .totp_confirm(&user, &body.enrolment, &body.code)
        .await
    {
        Ok(()) => {
            let name = api.services.name(&user).unwrap_or_default();
            audited(&actor, "totp_enrolled", &name, "", true);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn reset_totp(
    State(api): Shared,
    Extension(actor): Extension<Actor>,
    Path(user): Path<String>,
) -> Response {
    match api.services.totp_reset(&user).await {
        Ok(changed) => {
            let name = api.services.name(&user).unwrap_or_default();
            audited(&actor, "totp_reset", &name, "", changed);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}
