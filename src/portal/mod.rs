//! The self-service portal: people sign in through the organisation's OpenID provider and
//! manage their own app passwords, authenticator, devices and activity; the helpdesk does the
//! same for anyone. Every change is a call of the admin API's [`crate::api::service`] layer —
//! the same code the API and the CLI run — audited with the signed-in person as the actor.
//!
//! Its own listener (`portal.address`): HTTPS with the gateway's certificates, or plain HTTP
//! behind a TLS-terminating proxy (`portal.tls: false`, `X-Forwarded-For` believed only from
//! `portal.trusted_proxies`). Server-rendered pages ([`views`]); one stylesheet and one small
//! script, both served from here; no third-party asset.
//!
//! Web security (each checked by a test): the `__Host-` session cookie sealed with the key ring
//! ([`cookie`]), idle and absolute lifetimes; every POST needs the session's CSRF token and a
//! same-origin `Origin`; `Content-Security-Policy` without `unsafe-inline`, `frame-ancestors
//! 'none'`, HSTS, `nosniff`, `Referrer-Policy: no-referrer`, `Cache-Control: no-store` on
//! every page; request limits per address and overall, the guard's deny list, and failed
//! sign-ins counted by the guard like failed logins. A secret (app password, TOTP secret, the
//! client secret) never appears in a URL, a log line or an audit line.

#![allow(clippy::result_large_err)] // handlers answer a Response either way; no hot path

mod approvals;
pub mod cookie;
mod helpdesk;
mod mailconfig;
mod pages;
mod signin;
pub mod views;

pub use mailconfig::{Front, MailFronts};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::auth::keyring::KeyRing;
use crate::auth::oauth::oidc::OidcClient;
use crate::config::portal::PortalConfig;
use crate::guard::Guard;
use crate::observe::limit::{RequestLimiter, Route, Server};
use crate::observe::Metrics;
use cookie::{Jar, Session};
use views::Views;

/// The largest form body read.
const MAX_FORM: usize = 16 * 1024;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at most.
const MAX_HANDSHAKES: usize = 256;

/// What the portal needs from the gateway.
pub struct Parts {
    pub cfg: PortalConfig,
    pub api: Arc<Api>,
    pub guard: Arc<Guard>,
    pub metrics: Arc<Metrics>,
    pub ring: KeyRing,
    pub names: crate::auth::NameRules,
    /// `auth.mfa.issuer`, `auth.mfa.code_digits`.
    pub totp_issuer: String,
    pub totp_digits: u8,
    /// Sign-in approval, when `auth.mfa.approval: portal`.
    pub approvals: Option<Arc<crate::auth::approval::Approvals>>,
    /// `auth.mfa.unlock_ttl`: what an approval opens.
    pub unlock_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("portal: {0}")]
    Setup(String),
}

pub struct Portal {
    cfg: PortalConfig,
    oidc: OidcClient,
    api: Arc<Api>,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    ring: KeyRing,
    jar: Jar,
    limiter: RequestLimiter,
    views: Views,
    /// The `Content-Security-Policy` value (form posts may end at the IdP: `form-action`).
    csp: HeaderValue,
    redirect_uri: String,
    totp_issuer: String,
    totp_digits: u8,
    approvals: Option<Arc<crate::auth::approval::Approvals>>,
    unlock_ttl: Duration,
    /// The SMTP submission and POP3 fronts mail programs are told about
    /// ([`Portal::with_mail_fronts`]); none until set.
    fronts: MailFronts,
    /// Discovery, cached for a few minutes.
    endpoints:
        tokio::sync::Mutex<Option<(crate::auth::oauth::oidc::Endpoints, tokio::time::Instant)>>,
}

/// How long discovered endpoints are used before discovery is asked again.
const ENDPOINTS_TTL: Duration = Duration::from_secs(300);

/// The origin (`scheme://host[:port]`) of a URL.
fn origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{host}")
        }
        None => String::new(),
    }
}

impl Portal {
    pub fn new(p: Parts) -> Result<Self, PortalError> {
        let oidc = OidcClient::new(&p.cfg.oidc.issuer, p.metrics.clone(), p.names)
            .map_err(PortalError::Setup)?;
        let views = Views::new().map_err(|e| PortalError::Setup(e.to_string()))?;
        let idp = origin(&p.cfg.oidc.issuer.issuer);
        let csp = format!(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self' {idp}; frame-ancestors 'none'; \
             base-uri 'none'; object-src 'none'"
        );
        let csp = HeaderValue::from_str(&csp)
            .map_err(|_| PortalError::Setup("the issuer URL cannot go in a header".into()))?;
        Ok(Portal {
            jar: Jar::new(p.cfg.public_url.starts_with("https://")),
            limiter: RequestLimiter::new(
                Server::Portal,
                &p.cfg.rate_limit,
                Some(p.metrics.http_limited.clone()),
            ),
            redirect_uri: format!("{}/auth/callback", p.cfg.public_url),
            cfg: p.cfg,
            oidc,
            api: p.api,
            guard: p.guard,
            metrics: p.metrics,
            ring: p.ring,
            views,
            csp,
            totp_issuer: p.totp_issuer,
            totp_digits: p.totp_digits,
            approvals: p.approvals,
            unlock_ttl: p.unlock_ttl,
            fronts: MailFronts::default(),
            endpoints: tokio::sync::Mutex::new(None),
        })
    }

    /// The gateway's SMTP submission and POP3 fronts for the mail settings (setup page,
    /// autoconfig, Apple profile), e.g. `MailFronts::from_listeners(&config.listeners)`.
    /// Without them the portal names no outgoing server and no POP3.
    pub fn with_mail_fronts(mut self, fronts: MailFronts) -> Self {
        self.fronts = fronts;
        self
    }

    async fn endpoints(
        &self,
    ) -> Result<crate::auth::oauth::oidc::Endpoints, crate::auth::oauth::OAuthError> {
        let mut slot = self.endpoints.lock().await;
        if let Some((e, at)) = slot.as_ref() {
            if at.elapsed() < ENDPOINTS_TTL {
                return Ok(e.clone());
            }
        }
        let e = self.oidc.endpoints().await?;
        *slot = Some((e.clone(), tokio::time::Instant::now()));
        Ok(e)
    }

    /// The client's address: the peer, or with a trusted proxy the nearest untrusted address
    /// of `X-Forwarded-For` (read from the right, so a client cannot choose it).
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.cfg.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let mut last = peer;
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev().take(20) {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if trusted(&ip) => last = ip,
                Ok(ip) => return ip,
                Err(_) => return last,
            }
        }
        last
    }
}

/// What every handler starts from: the language, the session (if any), the client address.
pub(crate) struct Req {
    pub lang: &'static str,
    pub session: Option<Session>,
    pub ip: IpAddr,
    /// Cookies to set on the answer (a refreshed session, the language).
    pub cookies: Vec<HeaderValue>,
}

impl Portal {
    pub(crate) fn req(&self, peer: SocketAddr, headers: &HeaderMap, query: Option<&str>) -> Req {
        let switch = query.and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("lang="))
                .filter(|l| views::LANGS.contains(l))
        });
        let lang_cookie = cookie::get(headers, &self.jar.lang_name());
        let accept = headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok());
        let lang = views::negotiate(switch, lang_cookie, accept);
        let mut cookies = Vec::new();
        if let Some(l) = switch {
            cookies.push(self.jar.set(
                &self.jar.lang_name(),
                l,
                Duration::from_secs(365 * 86_400),
                true,
            ));
        }
        let session = cookie::get(headers, &self.jar.session_name()).and_then(|v| {
            Session::open(&self.ring, v, self.cfg.session_idle, self.cfg.session_max)
        });
        let session = session.map(|mut s| {
            // Sliding idle lifetime: renewed at most once a minute.
            let now = cookie::now();
            if now.saturating_sub(s.seen) >= 60 {
                s.seen = now;
                if let Some(v) = s.seal(&self.ring) {
                    cookies.push(self.session_cookie(&v));
                }
            }
            s
        });
        Req {
            lang,
            session,
            ip: self.client_ip(peer.ip(), headers),
            cookies,
        }
    }

    fn session_cookie(&self, sealed: &str) -> HeaderValue {
        self.jar
            .set(&self.jar.session_name(), sealed, self.cfg.session_max, true)
    }

    /// Renders a page with the common context (`me`, `csrf`, `page`, `title`, notices).
    pub(crate) fn page(
        &self,
        r: &Req,
        template: &str,
        page: &str,
        title_key: &str,
        extra: Value,
    ) -> Response {
        let mut ctx = json!({
            "title": self.views.t(r.lang, title_key),
            "page": page,
            "me": r.session.as_ref().map(|s| json!({"user": s.user, "admin": s.admin})),
            "csrf": r.session.as_ref().map(|s| s.csrf.clone()).unwrap_or_default(),
            "notice": Value::Null,
            "error": Value::Null,
        });
        if let (Some(base), Value::Object(more)) = (ctx.as_object_mut(), extra) {
            for (k, v) in more {
                base.insert(k, v);
            }
        }
        match self.views.render(template, r.lang, &ctx) {
            Ok(html) => self.html(r, StatusCode::OK, html),
            Err(e) => {
                tracing::error!(error = %e, "portal: a page failed to render");
                self.html(
                    r,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "<!doctype html><title>Error</title><p>Internal error.</p>".into(),
                )
            }
        }
    }

    /// An error page with `status`; `message_key` from the catalogue.
    pub(crate) fn error(
        &self,
        r: &Req,
        status: StatusCode,
        title_key: &str,
        message_key: &str,
    ) -> Response {
        let mut resp = self.page(
            r,
            "error.html",
            "error",
            title_key,
            json!({ "message": self.views.t(r.lang, message_key) }),
        );
        *resp.status_mut() = status;
        resp
    }

    fn html(&self, r: &Req, status: StatusCode, html: String) -> Response {
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response();
        for c in &r.cookies {
            resp.headers_mut().append(header::SET_COOKIE, c.clone());
        }
        resp
    }

    /// `303 See Other` to a local path (after a POST: the page is then reloaded with GET).
    pub(crate) fn see_other(&self, r: &Req, to: &str) -> Response {
        let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response();
        for c in &r.cookies {
            resp.headers_mut().append(header::SET_COOKIE, c.clone());
        }
        resp
    }

    /// Checks a state-changing request: a session, its CSRF token in the form, and a
    /// same-origin `Origin` (or, when it is absent or `null`, `Sec-Fetch-Site: same-origin`).
    pub(crate) fn check_post<'a>(
        &self,
        r: &'a Req,
        headers: &HeaderMap,
        form: &Form,
    ) -> Result<&'a Session, Response> {
        let Some(s) = r.session.as_ref() else {
            return Err(self.see_other(r, "/"));
        };
        // Browsers send `Origin: null` on form posts from a page whose referrer policy is
        // `no-referrer` (ours): then the Fetch metadata must say same-origin.
        let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        let same_origin = match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            Some("null") | None => fetch_site == Some("same-origin"),
            Some(o) => o == self.cfg.public_url && fetch_site.is_none_or(|f| f == "same-origin"),
        };
        let token_ok = form.get("csrf").is_some_and(|t| {
            !s.csrf.is_empty()
                && bool::from(subtle::ConstantTimeEq::ct_eq(
                    t.as_bytes(),
                    s.csrf.as_bytes(),
                ))
        });
        if !same_origin || !token_ok {
            tracing::info!(client = %r.ip, origin_ok = same_origin, token_ok, "portal: a form post was refused (CSRF)");
            return Err(self.error(r, StatusCode::FORBIDDEN, "error_title", "bad_request"));
        }
        Ok(s)
    }

    /// The answer to someone who is not an administrator.
    pub(crate) fn forbidden(&self, r: &Req) -> Response {
        self.error(r, StatusCode::FORBIDDEN, "forbidden_title", "forbidden")
    }

    /// Whether the session's sign-in is fresh enough for a sensitive action.
    pub(crate) fn fresh(&self, s: &Session) -> bool {
        cookie::now().saturating_sub(s.auth_time) <= self.cfg.reauth_after.as_secs()
    }

    /// Sends the person through the IdP again (`max_age`), back to `back` afterwards.
    pub(crate) fn reauth(&self, r: &Req, back: &str) -> Response {
        self.see_other(r, &format!("/login?reauth=1&back={}", signin::enc(back)))
    }
}

/// A form POST from a signed-in person, its CSRF token and origin already checked
/// ([`Portal::check_post`]): what every state-changing handler starts from.
pub(crate) struct Posted {
    pub r: Req,
    pub form: Form,
    pub session: Session,
}

impl axum::extract::FromRequest<Arc<Portal>> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, p: &Arc<Portal>) -> Result<Self, Response> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
        let headers = req.headers().clone();
        let body = axum::body::Bytes::from_request(req, p)
            .await
            .map_err(IntoResponse::into_response)?;
        let r = p.req(peer, &headers, None);
        let form = Form::parse(&body);
        let session = p.check_post(&r, &headers, &form)?.clone();
        Ok(Posted { r, form, session })
    }
}

/// A parsed form body: the first value of each name.
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn parse(body: &[u8]) -> Self {
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(body).take(64) {
            if !out.iter().any(|(x, _)| *x == k) {
                out.push((k.into_owned(), v.into_owned()));
            }
        }
        Form(out)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Shared = State<Arc<Portal>>;

pub fn router(portal: Arc<Portal>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/login", get(signin::login))
        .route("/auth/callback", get(signin::callback))
        .route("/logout", post(signin::logout))
        .route("/app-passwords", post(pages::create_app_password))
        .route("/app-passwords/profile", post(mailconfig::profile))
        .route(
            "/app-passwords/{id}/revoke",
            post(pages::revoke_app_password),
        )
        .route("/approvals/fragment", get(approvals::fragment))
        .route("/approvals/{id}/approve", post(approvals::approve))
        .route("/approvals/{id}/deny", post(approvals::deny))
        .route("/totp", get(pages::totp))
        .route("/totp/enrol", post(pages::totp_enrol))
        .route("/totp/confirm", post(pages::totp_confirm))
        .route("/totp/reset", post(pages::totp_reset))
        .route("/devices", get(pages::devices))
        .route("/devices/{id}/end", post(pages::end_device))
        .route("/activity", get(pages::activity))
        .route("/setup", get(pages::setup))
        .route("/admin", get(helpdesk::search))
        .route("/admin/users/{user}", get(helpdesk::user))
        .route("/admin/users/{user}/{action}", post(helpdesk::action))
        .route(
            "/admin/users/{user}/app-passwords/{id}/revoke",
            post(helpdesk::revoke),
        )
        .route(
            "/admin/users/{user}/devices/{id}/end",
            post(helpdesk::end_device),
        )
        .route("/admin/guard/clear", post(helpdesk::guard_clear))
        .route(
            "/admin/users/{user}/approvals/fragment",
            get(approvals::admin_fragment),
        )
        .route(
            "/admin/users/{user}/approvals/{id}/deny",
            post(approvals::admin_deny),
        )
        .route(
            "/.well-known/autoconfig/mail/config-v1.1.xml",
            get(mailconfig::autoconfig),
        )
        .route("/mail/config-v1.1.xml", get(mailconfig::autoconfig))
        .route("/static/portal.css", get(css))
        .route("/static/portal.js", get(js))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::from_fn_with_state(
            portal.clone(),
            protect,
        ))
        .with_state(portal)
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("static/portal.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("static/portal.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

async fn not_found(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let r = p.req(peer, &headers, None);
    p.error(&r, StatusCode::NOT_FOUND, "not_found_title", "not_found")
}

/// Before routing: the deny list and the request limits; after: the security headers.
async fn protect(
    State(p): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = p.client_ip(peer.ip(), req.headers());
    let route = if req.uri().path() == "/healthz" {
        Route::Probe
    } else {
        Route::Api
    };
    let mut resp = if p.guard.denied(ip) {
        (StatusCode::FORBIDDEN, "forbidden\n").into_response()
    } else {
        match p.limiter.check(ip, route) {
            Ok(()) => next.run(req).await,
            Err(refused) => refused.into_response(),
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, p.csp.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), interest-cohort=()"),
    );
    if p.cfg.public_url.starts_with("https://") {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Binds the portal's listener (errors are returned so start-up fails loudly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until `stop`; with `tls`, every connection's handshake runs in its own task
/// (bounded in time and number) before it reaches the HTTP server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    portal: Arc<Portal>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    let app = router(portal).into_make_service_with_connect_info::<SocketAddr>();
    let res = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
        Some(config) => {
            use axum::serve::ListenerExt as _;
            let local = listener.local_addr();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(handshakes(listener, config, tx, stop.clone()));
            let tls_listener = TlsListener { rx, local };
            axum::serve(tls_listener.tap_io(|_| {}), app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "portal listener failed");
    }
}

type TlsConn = (
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    SocketAddr,
);

async fn handshakes(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    tx: tokio::sync::mpsc::Sender<TlsConn>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "portal: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap: this connection is dropped rather than queued.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                let _ = tx.send((stream, peer)).await;
            }
        });
    }
}

struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<TlsConn>,
    local: std::io::Result<SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The handshake task ended (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// The HTTPS configuration: the gateway's certificates (the same resolver, so a reload
/// swaps them here too), ALPN `http/1.1`.
pub fn tls_config(
    resolver: Arc<crate::tls::CertResolver>,
    tls13_only: bool,
) -> Result<Arc<rustls::ServerConfig>, PortalError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .map_err(|e| PortalError::Setup(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_origin_of_a_url() {
        assert_eq!(
            super::origin("https://idp.example.org/realms/x"),
            "https://idp.example.org"
        );
        assert_eq!(
            super::origin("http://127.0.0.1:5556"),
            "http://127.0.0.1:5556"
        );
    }
}
