//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the guard's blocks. It is
//! never an IMAP port and binds 127.0.0.1 by default.
//!
//! `GET /guard/blocks` (active blocks and attack modes, JSON) and `DELETE /guard/blocks`
//! (`?scope=ip&value=192.0.2.7`, `?scope=account&value=…`, or `?all=true`) name addresses and
//! accounts or change state, so both need `Authorization: Bearer <admin.token_file>`; without a
//! configured token they answer 403.
//!
//! Request limits (`admin.rate_limit`, [`super::limit`]): the probes (`/metrics`, `/healthz`,
//! `/readyz`) count against their own generous per-address budget; every other request against
//! a per-address and an overall one; a failed token check against a small per-address budget
//! whose exhaustion answers 429 before the next token is even compared. Excess gets
//! `429 Too Many Requests` with `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::limit::{RequestLimiter, Route};
use super::{Health, Metrics};
use crate::secret::Secret;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub guard: Arc<dyn super::BlockAdmin>,
    /// The bearer tokens for the guard endpoints and the API, by name (none: refused).
    pub tokens: Vec<(String, Secret)>,
    /// `admin.rate_limit`.
    pub limiter: Arc<RequestLimiter>,
}

/// The probes: a budget of their own, so that limits meant for the token-protected routes
/// never starve the kubelet or Prometheus.
const PROBES: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// Binds the admin listener (errors are returned so start-up fails loudly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The name of the admin token a request was let in with: the actor of the API's audit lines.
#[derive(Clone, Debug)]
pub struct Actor(pub String);

/// Serves until `stop` is cancelled; `api` (the admin API's routes) is nested under `/api/v1`
/// behind the token check, with the OpenAPI document beside them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    api: Option<(Router, &'static str)>,
    stop: CancellationToken,
) {
    let mut app: Router = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .route("/guard/blocks", get(blocks_handler).delete(clear_handler))
        .with_state(state.clone());
    if let Some((routes, openapi)) = api {
        let guard = get(blocks_handler)
            .delete(clear_handler)
            .with_state(state.clone());
        let protected = routes
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_token,
            ))
            // The guard's endpoints check the token themselves.
            .route("/guard/blocks", guard)
            .route(
                "/openapi.json",
                get(move || async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }),
            );
        app = app.nest("/api/v1", protected);
    }
    let app = app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limit_requests,
    ));
    let res = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Counts every request (unknown paths included) against its budget before routing.
async fn limit_requests(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    let route = if PROBES.contains(&req.uri().path()) {
        Route::Probe
    } else {
        Route::Api
    };
    match s.limiter.check(peer.ip(), route) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let (ok, detail) = s.health.readiness();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, detail)
}

/// Lets a request through to the API only with a valid token; the token's name goes with it.
async fn require_token(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> axum::response::Response {
    match check_token(&s, req.headers(), peer.ip()) {
        Ok(name) => {
            req.extensions_mut().insert(Actor(name));
            next.run(req).await
        }
        Err(refused) => *refused,
    }
}

/// [`check_token`] for the handlers that only need a yes or no; `Some` is the refusal.
fn refusal(s: &AdminState, headers: &HeaderMap, peer: IpAddr) -> Option<axum::response::Response> {
    check_token(s, headers, peer).err().map(|r| *r)
}

/// Checks `Authorization: Bearer …` against every configured token in constant time (all of
/// them are compared, whichever matches); `Ok` names the token. An address locked out by its
/// failed checks is refused before the comparison.
fn check_token(
    s: &AdminState,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<String, Box<axum::response::Response>> {
    if s.tokens.is_empty() {
        return Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                "admin.token_file is not configured\n",
            )
                .into_response(),
        ));
    }
    if let Err(refused) = s.limiter.auth_allowed(peer) {
        return Err(Box::new(refused.into_response()));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    let mut matched = None;
    for (name, token) in &s.tokens {
        if token.ct_eq(given.as_bytes()) && matched.is_none() {
            matched = Some(name.clone());
        }
    }
    if let Some(name) = matched {
        return Ok(name);
    }
    if let Some(refused) = s.limiter.auth_failed(peer) {
        return Err(Box::new(refused.into_response()));
    }
    Err(Box::new(
        (
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n",
        )
            .into_response(),
    ))
}

async fn blocks_handler(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(refused) = refusal(&s, &headers, peer.ip()) {
        return refused;
    }
    match s.guard.blocks_json().await {
        Ok(list) => ([(header::CONTENT_TYPE, "application/json")], list).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "state store unavailable\n").into_response(),
    }
}

async fn clear_handler(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> axum::response::Response {
    if let Some(refused) = refusal(&s, &headers, peer.ip()) {
        return refused;
    }
    let mut scope = None;
    let mut value = None;
    let mut all = false;
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "scope" => scope = Some(v),
            "value" => value = Some(v),
            "all" => all = v == "true",
            _ => return (StatusCode::BAD_REQUEST, "unknown parameter\n").into_response(),
        }
    }
    if scope.is_none() && value.is_none() && !all {
        return (
            StatusCode::BAD_REQUEST,
            "name a scope and/or value, or all=true\n",
        )
            .into_response();
    }
    match s
        .guard
        .clear_blocks(scope.as_deref(), value.as_deref())
        .await
    {
        Ok(n) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"cleared\":{n}}}"),
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "state store unavailable\n").into_response(),
    }
}

/// `%XX` and `+` in a query value (IPv6 networks carry `:` and `/`, user names `@`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(c);
            }
            b'+' => out.push(b' '),
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            super::percent_decode("2001%3Adb8%3A%3A%2F64"),
            "2001:db8::/64"
        );
        assert_eq!(super::percent_decode("a%40b.org"), "a@b.org");
        assert_eq!(super::percent_decode("%zz%4"), "%zz%4");
    }
}
