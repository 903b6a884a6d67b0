//! Opaque tokens: RFC 7662 introspection with the `oauth2` crate, over the project's own
//! bounded reqwest client (a small adapter, so no second HTTP stack is pulled in).
//!
//! Only accepted answers are cached (by SHA-256 of the token), for at most
//! min(time to `exp`, `cache_ttl`): an answer the caller's check refuses (inactive, expired,
//! another issuer or audience) is not kept, so every attempt with such a token asks again (the
//! guard's `per_token_ip` budget bounds how often). A slow, failing, unparsable or oversized
//! endpoint fails closed within the request deadline; there are no retries.

use std::collections::HashMap;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenResponse, BasicTokenType,
};
use oauth2::{
    AccessToken, ClientId, ClientSecret, EndpointNotSet, EndpointSet, ExtraTokenFields,
    IntrospectionUrl, StandardRevocableToken, StandardTokenIntrospectionResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::http::MAX_BODY;
use super::OAuthError;
use crate::secret::Secret;

/// Every claim the endpoint returns beyond the standard ones (email, amr, acr, …).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Extra {
    #[serde(flatten)]
    pub rest: HashMap<String, Value>,
}

impl ExtraTokenFields for Extra {}

type Response = StandardTokenIntrospectionResponse<Extra, BasicTokenType>;

type IntrospectionClient = oauth2::Client<
    BasicErrorResponse,
    BasicTokenResponse,
    Response,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
>;

/// Until when, and the accepted claims.
type Cached = (Instant, Value);

const MAX_CACHE: usize = 10_000;

pub(super) struct Introspector {
    client: IntrospectionClient,
    http: reqwest::Client,
    cache_ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

/// Sends one oauth2 request with reqwest; the response body is capped.
pub(super) async fn send(
    http: reqwest::Client,
    req: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, std::io::Error> {
    let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let (parts, body) = req.into_parts();
    let mut resp = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| err(&e))?;
    let mut builder = http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        builder = builder.header(k, v);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| err(&e))? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(std::io::Error::other("introspection response too large"));
        }
        out.extend_from_slice(&chunk);
    }
    builder.body(out).map_err(|e| err(&e))
}

impl Introspector {
    pub(super) fn new(
        endpoint: &str,
        client_id: &str,
        secret: &Secret,
        cache_ttl: Duration,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let url = IntrospectionUrl::new(endpoint.to_owned()).map_err(|e| e.to_string())?;
        let client = oauth2::Client::new(ClientId::new(client_id.to_owned()))
            .set_client_secret(ClientSecret::new(
                secret.expose_str().unwrap_or_default().to_owned(),
            ))
            .set_introspection_url(url);
        Ok(Self {
            client,
            http,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The token's claims, if the endpoint's answer passes `accept`, which checks it and
    /// returns its `exp` (Unix seconds). Accepted answers are cached until that `exp` at the
    /// latest; refused ones are not cached.
    pub(super) async fn introspect(
        &self,
        token: &str,
        accept: impl FnOnce(&Value) -> Result<u64, OAuthError>,
    ) -> Result<Value, OAuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        {
            let cache = self.cache.lock().await;
            if let Some((until, v)) = cache.get(&key) {
                if *until > now {
                    return Ok(v.clone());
                }
            }
        }
        let http = self.http.clone();
        let call = move |req: oauth2::HttpRequest| send(http.clone(), req);
        let access = AccessToken::new(token.to_owned());
        // The typed answer refuses a non-boolean `active` or a non-numeric `exp` (a parse
        // error, so `idp_unavailable`); `accept` then sees the answer as JSON.
        let resp = self
            .client
            .introspect(&access)
            .request_async(&call)
            .await
            .map_err(|e| {
                // Only the kind of failure: a server's error text is not ours to log.
                let kind = match e {
                    oauth2::RequestTokenError::Request(_) => "request",
                    oauth2::RequestTokenError::ServerResponse(_) => "server_error",
                    oauth2::RequestTokenError::Parse(..) => "unparsable_response",
                    oauth2::RequestTokenError::Other(_) => "other",
                };
                tracing::warn!(kind, "token introspection failed");
                OAuthError::IdpUnavailable
            })?;
        let value = serde_json::to_value(&resp).map_err(|_| OAuthError::IdpUnavailable)?;
        let exp = accept(&value)?;
        let left = Duration::from_secs(exp.saturating_sub(unix_now()));
        let ttl = self.cache_ttl.min(left);
        if ttl.is_zero() {
            return Ok(value);
        }
        let mut cache = self.cache.lock().await;
        if cache.len() >= MAX_CACHE {
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
        }
        cache.insert(key, (now + ttl, value.clone()));
        Ok(value)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
