//! Sign-in and sign-out: `/login` sends the browser to the IdP (code flow, PKCE S256, `state`,
//! `nonce`, and `max_age` when a sensitive action needs a fresh sign-in), `/auth/callback`
//! checks `state` against the sealed sign-in cookie, exchanges the code, verifies the ID token
//! and opens the session. A failed callback counts against the client's address in the guard
//! (as a failed token login would) and in the portal's failed-sign-in budget.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::cookie::{self, Session, SignIn};
use super::{Portal, Posted, Req};
use crate::auth::oauth::oidc::Pending;
use crate::guard::{AttemptKey, Kind, Outcome, Verdict};

type Shared = State<Arc<Portal>>;

/// Percent-encodes a query value.
pub(crate) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The first value of `name` in a query string.
pub(crate) fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .take(32)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub(crate) async fn login(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let r = p.req(peer, &headers, query.as_deref());
    let back = cookie::safe_back(&query_value(query.as_deref(), "back").unwrap_or_default());
    let reauth = query_value(query.as_deref(), "reauth").as_deref() == Some("1");
    let endpoints = match p.endpoints().await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(
                reason = e.as_str(),
                "portal: the identity provider's discovery failed"
            );
            return p.error(
                &r,
                StatusCode::SERVICE_UNAVAILABLE,
                "error_title",
                "unavailable",
            );
        }
    };
    let pending = Pending::new();
    let signin = SignIn {
        state: pending.state.clone(),
        nonce: pending.nonce.clone(),
        verifier: pending.verifier.clone(),
        back,
        reauth,
        started: cookie::now(),
    };
    let Some(sealed) = signin.seal(&p.ring) else {
        return p.error(
            &r,
            StatusCode::INTERNAL_SERVER_ERROR,
            "error_title",
            "unavailable",
        );
    };
    let Ok(mut url) = reqwest::Url::parse(&endpoints.authorization) else {
        return p.error(
            &r,
            StatusCode::SERVICE_UNAVAILABLE,
            "error_title",
            "unavailable",
        );
    };
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &p.cfg.oidc.client_id)
            .append_pair("redirect_uri", &p.redirect_uri)
            .append_pair("scope", &p.cfg.oidc.scopes.join(" "))
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &pending.challenge())
            .append_pair("code_challenge_method", "S256")
            .append_pair("ui_locales", r.lang);
        if reauth {
            q.append_pair("max_age", &p.cfg.reauth_after.as_secs().to_string());
        }
    }
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, url.to_string())]).into_response();
    let jar = &p.jar;
    resp.headers_mut().append(
        header::SET_COOKIE,
        jar.set(&jar.signin_name(), &sealed, cookie::SIGNIN_TTL, true),
    );
    for c in &r.cookies {
        resp.headers_mut().append(header::SET_COOKIE, c.clone());
    }
    resp
}

/// Why a callback failed (the audit line's `reason`; closed set).
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// No sign-in cookie (expired, another browser, or never started here).
    NoSignIn,
    /// `state` differs: a forged or crossed callback.
    State,
    /// The IdP answered with an error (the person cancelled, or was refused there).
    IdpError,
    /// The code could not be exchanged.
    Exchange,
    /// The ID token did not verify.
    Token(crate::auth::oauth::OAuthError),
    /// A re-authentication came back without a fresh `auth_time`.
    NotFresh,
    /// The guard refused the attempt before it was checked.
    Throttled,
}

impl Failure {
    fn reason(self) -> &'static str {
        match self {
            Failure::NoSignIn => "no_signin",
            Failure::State => "state",
            Failure::IdpError => "idp_error",
            Failure::Exchange => "exchange",
            Failure::Token(e) => e.as_str(),
            Failure::NotFresh => "not_fresh",
            Failure::Throttled => "throttled",
        }
    }

    /// The message a person sees.
    fn message(self) -> &'static str {
        use crate::auth::oauth::OAuthError as E;
        match self {
            Failure::Token(E::WrongDomain | E::NoMfaEvidence | E::EmailNotVerified | E::NoUser) => {
                "signin_refused"
            }
            Failure::NotFresh => "reauth_failed",
            Failure::Throttled => "too_many",
            _ => "signin_failed",
        }
    }
}

pub(crate) async fn callback(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut r = p.req(peer, &headers, None);
    // The sign-in cookie is used once, whatever happens.
    r.cookies.push(p.jar.clear(&p.jar.signin_name()));
    if let Err(refused) = p.limiter.auth_allowed(r.ip) {
        p.metrics
            .portal_signins
            .with_label_values(&["failed"])
            .inc();
        crate::observe::audit_portal_signin("sign_in_failed", "", "throttled", r.ip);
        let mut resp = p.error(
            &r,
            StatusCode::TOO_MANY_REQUESTS,
            "signin_failed_title",
            "too_many",
        );
        if let Ok(v) = refused.retry_after_secs().to_string().parse() {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    let key = AttemptKey {
        client_ip: r.ip,
        user: None,
        kind: Kind::Token,
    };
    let decision = p.guard.check(key).await;
    let result = if decision.verdict == Verdict::Reject {
        Err(Failure::Throttled)
    } else {
        verify(&p, &headers, query.as_deref()).await
    };
    drop(decision);
    match result {
        Ok((signin, identity)) => signed_in(&p, r, signin, identity).await,
        Err(f) => {
            if !matches!(f, Failure::Throttled) {
                p.guard
                    .record(
                        key,
                        Outcome::Failure {
                            fingerprint: None,
                            wrong_code: None,
                        },
                    )
                    .await;
                let _ = p.limiter.auth_failed(r.ip);
            }
            p.metrics
                .portal_signins
                .with_label_values(&["failed"])
                .inc();
            crate::observe::audit_portal_signin("sign_in_failed", "", f.reason(), r.ip);
            let status = match f {
                Failure::Throttled => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::FORBIDDEN,
            };
            p.error(&r, status, "signin_failed_title", f.message())
        }
    }
}

async fn verify(
    p: &Portal,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(SignIn, crate::auth::oauth::oidc::SignedIn), Failure> {
    let signin = cookie::get(headers, &p.jar.signin_name())
        .and_then(|v| SignIn::open(&p.ring, v))
        .ok_or(Failure::NoSignIn)?;
    let state = query_value(query, "state").unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        state.as_bytes(),
        signin.state.as_bytes(),
    )) {
        return Err(Failure::State);
    }
    if query_value(query, "error").is_some() {
        return Err(Failure::IdpError);
    }
    let code = query_value(query, "code")
        .filter(|c| !c.is_empty() && c.len() <= 2048)
        .ok_or(Failure::IdpError)?;
    let endpoints = p.endpoints().await.map_err(|_| Failure::Exchange)?;
    let id_token = p
        .oidc
        .exchange(
            &endpoints.token,
            &code,
            &signin.verifier,
            &p.redirect_uri,
            &p.cfg.oidc.client_id,
            &p.cfg.oidc.client_secret,
        )
        .await
        .map_err(|_| Failure::Exchange)?;
    let identity = p
        .oidc
        .verify_id_token(&id_token, &signin.nonce)
        .await
        .map_err(Failure::Token)?;
    // A re-authentication must say when the person authenticated (`auth_time`, which
    // `max_age` obliges the IdP to send); a token without it proves nothing fresh.
    let claimed = identity.claims.get("auth_time").and_then(Value::as_u64);
    if signin.reauth && !claimed.is_some_and(|t| p.fresh_time(t)) {
        return Err(Failure::NotFresh);
    }
    Ok((signin, identity))
}

impl Portal {
    fn fresh_time(&self, auth_time: u64) -> bool {
        cookie::now().saturating_sub(auth_time) <= self.cfg.reauth_after.as_secs()
    }

    /// Whether the ID token's claims make the person a helpdesk administrator.
    fn is_admin(&self, claims: &Value) -> bool {
        let o = &self.cfg.oidc;
        if o.admin_claim.is_empty() {
            return false;
        }
        let has = |v: &str| o.admin_values.iter().any(|a| a == v);
        match claims.get(&o.admin_claim) {
            Some(Value::String(s)) => has(s),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(has),
            _ => false,
        }
    }
}

async fn signed_in(
    p: &Portal,
    mut r: Req,
    signin: SignIn,
    identity: crate::auth::oauth::oidc::SignedIn,
) -> Response {
    let user = identity.user.clone();
    let existing = match p.api.services.store.user(&user).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "portal: the credential store cannot be read");
            return p.error(
                &r,
                StatusCode::SERVICE_UNAVAILABLE,
                "error_title",
                "unavailable",
            );
        }
    };
    let refuse = |r: &Req, reason: &str, message: &str| {
        p.metrics
            .portal_signins
            .with_label_values(&["failed"])
            .inc();
        crate::observe::audit_portal_signin("sign_in_failed", &user, reason, r.ip);
        p.error(r, StatusCode::FORBIDDEN, "signin_failed_title", message)
    };
    match existing {
        Some(u) if u.disabled => return refuse(&r, "disabled", "disabled_account"),
        Some(_) => {}
        None if p.cfg.autoprovision => match p.api.services.add_user(&user, None, None).await {
            Ok(changed) => {
                crate::observe::audit_portal(&user, "user_added", &user, "", changed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "portal: automatic provisioning failed");
                return refuse(&r, "provisioning", "no_account");
            }
        },
        None => return refuse(&r, "no_account", "no_account"),
    }
    let now = cookie::now();
    let session = Session {
        user: user.clone(),
        admin: p.is_admin(&identity.claims),
        auth_time: identity.auth_time,
        issued: now,
        seen: now,
        csrf: Pending::new().state,
    };
    let Some(sealed) = session.seal(&p.ring) else {
        return p.error(
            &r,
            StatusCode::INTERNAL_SERVER_ERROR,
            "error_title",
            "unavailable",
        );
    };
    p.metrics.portal_signins.with_label_values(&["ok"]).inc();
    crate::observe::audit_portal_signin(
        "signed_in",
        &user,
        if session.admin { "admin" } else { "" },
        r.ip,
    );
    r.cookies.push(p.session_cookie(&sealed));
    let to = if signin.reauth {
        format!("{}?notice=reauthenticated", signin.back)
    } else {
        signin.back
    };
    p.see_other(&r, &to)
}

pub(crate) async fn logout(State(p): Shared, post: Posted) -> Response {
    let Posted {
        mut r,
        form: _,
        session,
    } = post;
    let user = session.user;
    crate::observe::audit_portal_signin("signed_out", &user, "", r.ip);
    r.session = None;
    r.cookies.push(p.jar.clear(&p.jar.session_name()));
    p.see_other(&r, "/?notice=signed_out")
}
