//! OAuth 2.0 bearer tokens (SASL XOAUTH2 / OAUTHBEARER) validated as JWTs against the issuer's
//! published keys.
//!
//! For each token: the issuer is chosen by the token's `iss` (exact match with a configured
//! issuer; the unverified claim only selects, it decides nothing); the key by `kid` from the
//! issuer's key set (from OIDC discovery or a configured `jwks_uri` — never from the token's
//! `jku`, `x5u` or embedded `jwk`); the algorithm must be on the issuer's allow-list (HMAC and
//! `none` are impossible); then signature, `iss`, `aud` (one of the configured), `exp`, `nbf`,
//! `iat` with leeway, `typ`, ID-token markers, required scopes, `amr`/`acr`, and the user claim,
//! which must equal the SASL user after normalisation.
//!
//! Key sets are cached for their HTTP max-age (bounded); an unknown `kid` re-fetches at most
//! once per `key_refresh_interval`, so a flood of tokens with random kids causes no fetch storm.

pub mod device;
mod http;
mod introspect;

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::IssuerConfig;
use crate::secret::Secret;

/// Why a token was refused (closed set: audit reason and metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown issuer")]
    UnknownIssuer,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("unknown key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("not an access token")]
    NotAccessToken,
    #[error("missing scope")]
    MissingScope,
    #[error("no MFA evidence")]
    NoMfaEvidence,
    #[error("no user claim")]
    NoUser,
    #[error("token user differs from the SASL user")]
    UserMismatch,
    #[error("identity provider unavailable")]
    IdpUnavailable,
    #[error("token not active")]
    Inactive,
}

impl OAuthError {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthError::Malformed => "malformed",
            OAuthError::UnknownIssuer => "unknown_issuer",
            OAuthError::Algorithm => "algorithm",
            OAuthError::UnknownKey => "unknown_key",
            OAuthError::BadSignature => "bad_signature",
            OAuthError::Expired => "expired",
            OAuthError::NotYetValid => "not_yet_valid",
            OAuthError::WrongAudience => "wrong_audience",
            OAuthError::WrongIssuer => "wrong_issuer",
            OAuthError::NotAccessToken => "not_access_token",
            OAuthError::MissingScope => "missing_scope",
            OAuthError::NoMfaEvidence => "no_mfa_evidence",
            OAuthError::NoUser => "no_user",
            OAuthError::UserMismatch => "user_mismatch",
            OAuthError::IdpUnavailable => "idp_unavailable",
            OAuthError::Inactive => "inactive",
        }
    }
}

/// A token that validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub user: String,
    pub issuer: String,
    /// `exp`, Unix seconds.
    pub expires: u64,
    /// When the relayed session must end (`end_session_at_expiry`).
    pub end_session_at: Option<u64>,
}

#[derive(Default)]
struct KeyCache {
    jwks_uri: Option<String>,
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// Keys without a `kid` (usable only when the token has none and there is one such key).
    anonymous: Vec<(DecodingKey, Option<Algorithm>)>,
    expires: Option<Instant>,
    last_fetch: Option<Instant>,
}

struct Issuer {
    cfg: IssuerConfig,
    metrics: std::sync::Arc<crate::observe::Metrics>,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
    algorithms: Vec<Algorithm>,
    introspector: Mutex<Option<std::sync::Arc<introspect::Introspector>>>,
}

/// Bounds on how long a key set is trusted without re-fetching.
const MIN_KEYS_TTL: Duration = Duration::from_secs(60);
const MAX_KEYS_TTL: Duration = Duration::from_secs(24 * 3600);

impl Issuer {
    fn from_config(
        cfg: &IssuerConfig,
        metrics: Option<std::sync::Arc<crate::observe::Metrics>>,
    ) -> Result<Self, String> {
        let metrics = match metrics {
            Some(m) => m,
            None => std::sync::Arc::new(crate::observe::Metrics::new().map_err(|e| e.to_string())?),
        };
        Ok(Issuer {
            http: http::client(cfg)?,
            cfg: cfg.clone(),
            metrics,
            cache: Mutex::new(KeyCache::default()),
            algorithms: cfg
                .algorithms
                .iter()
                .filter_map(|a| a.parse::<Algorithm>().ok())
                .collect(),
            introspector: Mutex::new(None),
        })
    }

    /// The discovery document (OpenID Connect Discovery / RFC 8414), checked to be this issuer's.
    async fn discovery_doc(&self) -> Result<Value, OAuthError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let (doc, _) = http::get_json(&self.http, &url).await?;
        // The document must be about this issuer (RFC 8414 §3.3).
        if doc.get("issuer").and_then(Value::as_str) != Some(self.cfg.issuer.as_str()) {
            tracing::warn!(issuer = %self.cfg.name, "discovery document names another issuer");
            return Err(OAuthError::IdpUnavailable);
        }
        Ok(doc)
    }

    /// An endpoint URL from discovery, with the issuer's scheme rules.
    fn endpoint(&self, doc: &Value, key: &str) -> Result<String, OAuthError> {
        let url = doc
            .get(key)
            .and_then(Value::as_str)
            .ok_or(OAuthError::IdpUnavailable)?;
        let same_scheme = url.starts_with("https://")
            || (self.cfg.issuer.starts_with("http://") && url.starts_with("http://"));
        if !same_scheme {
            return Err(OAuthError::IdpUnavailable);
        }
        Ok(url.to_owned())
    }

    async fn discover(&self) -> Result<String, OAuthError> {
        if let Some(u) = &self.cfg.jwks_uri {
            return Ok(u.clone());
        }
        let doc = self.discovery_doc().await?;
        self.endpoint(&doc, "jwks_uri")
    }

    /// The introspection client, made on first use (its endpoint may come from discovery).
    async fn introspector(
        &self,
    ) -> Result<Option<std::sync::Arc<introspect::Introspector>>, OAuthError> {
        let Some(icfg) = &self.cfg.introspection else {
            return Ok(None);
        };
        let mut slot = self.introspector.lock().await;
        if let Some(i) = slot.as_ref() {
            return Ok(Some(i.clone()));
        }
        let endpoint = match &icfg.endpoint {
            Some(e) => e.clone(),
            None => {
                let doc = self.discovery_doc().await?;
                self.endpoint(&doc, "introspection_endpoint")?
            }
        };
        let i = introspect::Introspector::new(
            &endpoint,
            &icfg.client_id,
            &icfg.client_secret,
            icfg.cache_ttl,
            self.http.clone(),
        )
        .map_err(|_| OAuthError::IdpUnavailable)?;
        let i = std::sync::Arc::new(i);
        *slot = Some(i.clone());
        Ok(Some(i))
    }

    async fn refresh(&self, cache: &mut KeyCache) -> Result<(), OAuthError> {
        let res = self.fetch_keys(cache).await;
        let label = if res.is_ok() { "ok" } else { "error" };
        self.metrics
            .oauth_key_fetches
            .with_label_values(&[&self.cfg.name, label])
            .inc();
        if res.is_err() {
            tracing::warn!(issuer = %self.cfg.name, "could not fetch the issuer's keys");
        }
        res
    }

    async fn fetch_keys(&self, cache: &mut KeyCache) -> Result<(), OAuthError> {
        cache.last_fetch = Some(Instant::now());
        let uri = match &cache.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let u = self.discover().await?;
                cache.jwks_uri = Some(u.clone());
                u
            }
        };
        let (doc, max_age) = http::get_json(&self.http, &uri).await?;
        let set: JwkSet = serde_json::from_value(doc).map_err(|_| OAuthError::IdpUnavailable)?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in &set.keys {
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.insert(kid.clone(), (key, alg));
                }
                None => anonymous.push((key, alg)),
            }
        }
        let ttl = max_age
            .unwrap_or(Duration::from_secs(300))
            .clamp(MIN_KEYS_TTL, MAX_KEYS_TTL);
        tracing::debug!(issuer = %self.cfg.name, keys = keys.len() + anonymous.len(), "issuer keys fetched");
        cache.keys = keys;
        cache.anonymous = anonymous;
        cache.expires = Some(Instant::now() + ttl);
        Ok(())
    }

    /// The key for `kid`, fetching or refreshing the key set within the rate limit.
    async fn key(&self, kid: Option<&str>) -> Result<(DecodingKey, Option<Algorithm>), OAuthError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let may_fetch = cache
            .last_fetch
            .is_none_or(|t| now.duration_since(t) >= self.cfg.key_refresh_interval);
        let stale = cache.expires.is_none_or(|e| e <= now);
        let lookup = |c: &KeyCache| match kid {
            Some(k) => c.keys.get(k).cloned(),
            None if c.anonymous.len() == 1 && c.keys.is_empty() => c.anonymous.first().cloned(),
            None if c.keys.len() == 1 && c.anonymous.is_empty() => c.keys.values().next().cloned(),
            None => None,
        };
        if stale && may_fetch {
            // Keep serving the old keys if the issuer is down.
            if let Err(e) = self.refresh(&mut cache).await {
                if cache.keys.is_empty() && cache.anonymous.is_empty() {
                    return Err(e);
                }
            }
        }
        if let Some(k) = lookup(&cache) {
            return Ok(k);
        }
        // Unknown kid: one refresh per interval at most (an unknown-kid flood causes no storm).
        let may_fetch = cache
            .last_fetch
            .is_none_or(|t| Instant::now().duration_since(t) >= self.cfg.key_refresh_interval);
        if may_fetch {
            self.refresh(&mut cache).await?;
            if let Some(k) = lookup(&cache) {
                return Ok(k);
            }
        }
        Err(OAuthError::UnknownKey)
    }

    /// Fetches at most on the rate limit; how many fetches happened (for tests/metrics).
    async fn validate(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<Value, OAuthError> {
        if !self.algorithms.contains(&header.alg) {
            return Err(OAuthError::Algorithm);
        }
        let (key, key_alg) = self.key(header.kid.as_deref()).await?;
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(OAuthError::Algorithm);
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&self.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => OAuthError::Expired,
                K::ImmatureSignature => OAuthError::NotYetValid,
                K::InvalidAudience => OAuthError::WrongAudience,
                K::InvalidIssuer => OAuthError::WrongIssuer,
                K::InvalidSignature => OAuthError::BadSignature,
                K::InvalidAlgorithm | K::InvalidAlgorithmName => OAuthError::Algorithm,
                K::MissingRequiredClaim(_) => OAuthError::Malformed,
                _ => OAuthError::BadSignature,
            }
        })?;
        Ok(data.claims)
    }
}

/// Validates bearer tokens against the configured issuers.
pub struct OAuthValidator {
    issuers: Vec<Issuer>,
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// For `imapgate doctor`: discovery (unless `jwks_uri` is set) and the key set, fetched as
/// the gateway would. Returns a summary or what failed.
pub async fn diagnose_issuer(cfg: &IssuerConfig) -> Result<String, String> {
    let issuer = Issuer::from_config(cfg, None)?;
    let mut cache = KeyCache::default();
    issuer.fetch_keys(&mut cache).await.map_err(|e| {
        format!(
            "cannot fetch the signing keys ({}); check the issuer URL, its discovery document and the network",
            e.as_str()
        )
    })?;
    let n = cache.keys.len() + cache.anonymous.len();
    if n == 0 {
        return Err("the key set has no usable signing key".into());
    }
    let mut summary = format!(
        "{n} signing key(s) from {}",
        cache.jwks_uri.as_deref().unwrap_or("?")
    );
    if cfg.introspection.is_some() {
        match issuer.introspector().await {
            Ok(Some(_)) => summary.push_str("; introspection endpoint found"),
            _ => return Err("no introspection endpoint (configure introspection.endpoint)".into()),
        }
    }
    Ok(summary)
}

impl OAuthValidator {
    pub fn new(
        issuers: &[IssuerConfig],
        metrics: std::sync::Arc<crate::observe::Metrics>,
    ) -> Result<Self, String> {
        let issuers = issuers
            .iter()
            .map(|cfg| Issuer::from_config(cfg, Some(metrics.clone())))
            .collect::<Result<_, String>>()?;
        Ok(Self { issuers })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The first issuer's discovery URL and required scopes, for the RFC 7628 error challenge.
    pub fn challenge_hints(&self) -> (Option<String>, String) {
        let first = self.issuers.first();
        let conf = first.map(|i| {
            format!(
                "{}/.well-known/openid-configuration",
                i.cfg.issuer.trim_end_matches('/')
            )
        });
        let scope = first
            .map(|i| i.cfg.required_scopes.join(" "))
            .unwrap_or_default();
        (conf, scope)
    }

    /// Validates `token`; `sasl_user` is the name from `user=` / `a=`, already normalised.
    pub async fn validate(
        &self,
        token: &Secret,
        sasl_user: Option<&str>,
    ) -> Result<TokenIdentity, OAuthError> {
        let token = token.expose_str().ok_or(OAuthError::Malformed)?;
        if token.split('.').count() != 3 {
            return self.validate_opaque(token, sasl_user).await;
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| OAuthError::Malformed)?;
        // Only selects the issuer; the signature check below decides.
        let unverified: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
            .map_err(|_| OAuthError::Malformed)?
            .claims;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(OAuthError::Malformed)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.cfg.issuer == iss)
            .ok_or(OAuthError::UnknownIssuer)?;
        let claims = issuer.validate(token, &header).await?;
        // RFC 9068 access tokens say `at+jwt`; many IdPs still say `JWT` (or nothing).
        match header
            .typ
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("jwt") | Some("at+jwt") | Some("application/at+jwt") => {}
            Some(_) => return Err(OAuthError::NotAccessToken),
        }
        let now = jsonwebtoken::get_current_timestamp();
        if claims
            .get("iat")
            .and_then(Value::as_u64)
            .is_some_and(|iat| iat > now + issuer.cfg.leeway.as_secs())
        {
            return Err(OAuthError::NotYetValid);
        }
        check_claims(&issuer.cfg, &claims, sasl_user)
    }

    /// Opaque tokens: each issuer with introspection, in order; the first that says active
    /// decides. All inactive → `Inactive`; an endpoint that fails → `IdpUnavailable`.
    async fn validate_opaque(
        &self,
        token: &str,
        sasl_user: Option<&str>,
    ) -> Result<TokenIdentity, OAuthError> {
        if token.is_empty() {
            return Err(OAuthError::Malformed);
        }
        let mut outcome = Err(OAuthError::Malformed);
        for issuer in &self.issuers {
            let intro = match issuer.introspector().await {
                Ok(Some(i)) => i,
                Ok(None) => continue,
                Err(e) => {
                    outcome = Err(e);
                    continue;
                }
            };
            match intro.introspect(token).await {
                Ok(Some(claims)) => {
                    let cfg = &issuer.cfg;
                    if claims
                        .get("iss")
                        .and_then(Value::as_str)
                        .is_some_and(|i| i != cfg.issuer)
                    {
                        return Err(OAuthError::WrongIssuer);
                    }
                    let aud = str_list(claims.get("aud"));
                    if !aud.iter().any(|a| cfg.audiences.contains(a)) {
                        return Err(OAuthError::WrongAudience);
                    }
                    let now = jsonwebtoken::get_current_timestamp();
                    if claims
                        .get("exp")
                        .and_then(Value::as_u64)
                        .is_some_and(|e| e + cfg.leeway.as_secs() < now)
                    {
                        return Err(OAuthError::Expired);
                    }
                    return check_claims(cfg, &claims, sasl_user);
                }
                Ok(None) => outcome = Err(OAuthError::Inactive),
                Err(e) => {
                    if outcome != Err(OAuthError::Inactive) {
                        outcome = Err(e);
                    }
                }
            }
        }
        outcome
    }
}

/// The checks common to JWTs and introspected tokens.
fn check_claims(
    cfg: &IssuerConfig,
    claims: &Value,
    sasl_user: Option<&str>,
) -> Result<TokenIdentity, OAuthError> {
    if !cfg.accept_id_tokens && (claims.get("nonce").is_some() || claims.get("at_hash").is_some()) {
        return Err(OAuthError::NotAccessToken);
    }
    let mut scopes = str_list(claims.get("scope"));
    scopes.extend(str_list(claims.get("scp")));
    if !cfg.required_scopes.iter().all(|s| scopes.contains(s)) {
        return Err(OAuthError::MissingScope);
    }
    let amr = str_list(claims.get("amr"));
    if !cfg.require_amr.iter().all(|a| amr.contains(a)) {
        return Err(OAuthError::NoMfaEvidence);
    }
    if !cfg.require_acr.is_empty() {
        let acr = claims.get("acr").and_then(Value::as_str).unwrap_or("");
        if !cfg.require_acr.iter().any(|a| a == acr) {
            return Err(OAuthError::NoMfaEvidence);
        }
    }
    let raw = claims
        .get(&cfg.user_claim)
        .and_then(Value::as_str)
        .ok_or(OAuthError::NoUser)?;
    let mut user = super::normalize_user(raw).map_err(|_| OAuthError::NoUser)?;
    if !user.contains('@') {
        if let Some(d) = &cfg.user_domain {
            user = format!("{user}@{d}");
        }
    }
    if let Some(claimed) = sasl_user {
        if claimed != user {
            return Err(OAuthError::UserMismatch);
        }
    }
    let expires = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    Ok(TokenIdentity {
        user,
        issuer: cfg.name.clone(),
        expires,
        end_session_at: cfg.end_session_at_expiry.then_some(expires),
    })
}
