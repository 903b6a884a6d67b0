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
//! No lock is held across a network fetch: the key cache is read and swapped under a short
//! lock, and one fetch at a time per issuer runs in its own task (single flight). A token whose
//! key is known never waits for a fetch (a stale set is refreshed in the background); one whose
//! `kid` is unknown waits for the fetch in flight, within [`FETCH_WAIT`].
//!
//! Opaque tokens (RFC 7662) go to at most one issuer, chosen without sending the token anywhere
//! ([`OAuthValidator::opaque_issuer`]): an introspection endpoint sees only tokens that can be
//! its own. Its answer counts only if `active` is `true`, `exp` is in the future, `iss` is the
//! issuer and the audience (`aud`, or `client_id`, RFC 7662 §2.2) is a configured one.
//!
//! The user claim must be a valid name under the configured [`NameRules`], with
//! `email_verified: true` when it is `email` (unless `require_email_verified: false`), and in
//! one of the issuer's `domains` when it lists any.

pub mod device;
mod http;
mod introspect;
pub mod oidc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::time::Instant;

use super::NameRules;
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
    #[error("email address not verified")]
    EmailNotVerified,
    #[error("user's domain not served by this issuer")]
    WrongDomain,
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
            OAuthError::EmailNotVerified => "email_not_verified",
            OAuthError::WrongDomain => "wrong_domain",
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

type Key = (DecodingKey, Option<Algorithm>);

#[derive(Default)]
struct KeyCache {
    jwks_uri: Option<String>,
    keys: HashMap<String, Key>,
    /// Keys without a `kid` (usable only when the token has none and there is one such key).
    anonymous: Vec<Key>,
    expires: Option<Instant>,
    last_fetch: Option<Instant>,
}

impl KeyCache {
    fn lookup(&self, kid: Option<&str>) -> Option<Key> {
        match kid {
            Some(k) => self.keys.get(k).cloned(),
            None if self.anonymous.len() == 1 && self.keys.is_empty() => {
                self.anonymous.first().cloned()
            }
            None if self.keys.len() == 1 && self.anonymous.is_empty() => {
                self.keys.values().next().cloned()
            }
            None => None,
        }
    }
}

/// A key set as fetched, before it replaces the cached one.
struct KeySet {
    jwks_uri: String,
    keys: HashMap<String, Key>,
    anonymous: Vec<Key>,
    ttl: Duration,
}

struct Issuer {
    cfg: IssuerConfig,
    metrics: Arc<crate::observe::Metrics>,
    http: reqwest::Client,
    /// Read and swapped under this short lock; never held across an await.
    cache: Mutex<KeyCache>,
    /// Single flight: held by the one task fetching this issuer's keys.
    key_fetch: Arc<tokio::sync::Mutex<()>>,
    algorithms: Vec<Algorithm>,
    /// The introspection client once made (short lock, never held across an await).
    introspector: Mutex<Option<Arc<introspect::Introspector>>>,
    /// Single flight for making it (its endpoint may come from discovery).
    introspector_make: tokio::sync::Mutex<()>,
}

/// Bounds on how long a key set is trusted without re-fetching.
const MIN_KEYS_TTL: Duration = Duration::from_secs(60);
const MAX_KEYS_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a login waits for a fetch another login started (discovery and key set, each
/// bounded by the HTTP deadline); then it fails as `idp_unavailable`.
const FETCH_WAIT: Duration = Duration::from_secs(2 * http::TIMEOUT.as_secs() + 1);

/// A short lock that survives a panic elsewhere (the data is replaced whole, never torn).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Issuer {
    fn from_config(
        cfg: &IssuerConfig,
        metrics: Option<Arc<crate::observe::Metrics>>,
    ) -> Result<Self, String> {
        let metrics = match metrics {
            Some(m) => m,
            None => Arc::new(crate::observe::Metrics::new().map_err(|e| e.to_string())?),
        };
        Ok(Issuer {
            http: http::client(cfg)?,
            cfg: cfg.clone(),
            metrics,
            cache: Mutex::new(KeyCache::default()),
            key_fetch: Arc::new(tokio::sync::Mutex::new(())),
            algorithms: cfg
                .algorithms
                .iter()
                .filter_map(|a| a.parse::<Algorithm>().ok())
                .collect(),
            introspector: Mutex::new(None),
            introspector_make: tokio::sync::Mutex::new(()),
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

    /// The introspection client, made on first use (its endpoint may come from discovery). The
    /// slot is read under a short lock; making it is single-flight, outside that lock.
    async fn introspector(&self) -> Result<Option<Arc<introspect::Introspector>>, OAuthError> {
        let Some(icfg) = &self.cfg.introspection else {
            return Ok(None);
        };
        if let Some(i) = lock(&self.introspector).as_ref() {
            return Ok(Some(i.clone()));
        }
        let _one = tokio::time::timeout(FETCH_WAIT, self.introspector_make.lock())
            .await
            .map_err(|_| OAuthError::IdpUnavailable)?;
        if let Some(i) = lock(&self.introspector).as_ref() {
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
        let i = Arc::new(i);
        *lock(&self.introspector) = Some(i.clone());
        Ok(Some(i))
    }

    /// Fetches the key set (after discovery, when its URL is not known yet). Touches no lock.
    async fn fetch_key_set(&self, jwks_uri: Option<String>) -> Result<KeySet, OAuthError> {
        let uri = match jwks_uri {
            Some(u) => u,
            None => self.discover().await?,
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
        Ok(KeySet {
            jwks_uri: uri,
            keys,
            anonymous,
            ttl,
        })
    }

    /// One fetch, counted, then the new set replaces the cached one (a failed fetch keeps the
    /// old keys). The caller holds `key_fetch`.
    async fn refresh(&self) -> Result<(), OAuthError> {
        let jwks_uri = {
            let mut c = lock(&self.cache);
            c.last_fetch = Some(Instant::now());
            c.jwks_uri.clone()
        };
        let res = self.fetch_key_set(jwks_uri).await;
        // The interval counts from the end too: a slow issuer gets no back-to-back fetches.
        lock(&self.cache).last_fetch = Some(Instant::now());
        let label = if res.is_ok() { "ok" } else { "error" };
        self.metrics
            .oauth_key_fetches
            .with_label_values(&[&self.cfg.name, label])
            .inc();
        let set = res.inspect_err(|_| {
            tracing::warn!(issuer = %self.cfg.name, "could not fetch the issuer's keys");
        })?;
        let mut c = lock(&self.cache);
        c.jwks_uri = Some(set.jwks_uri);
        c.keys = set.keys;
        c.anonymous = set.anonymous;
        c.expires = Some(Instant::now() + set.ttl);
        Ok(())
    }

    /// Runs a refresh in its own task, holding the single-flight gate until it ends, so a
    /// login that gives up (its client went away) does not cancel a fetch others wait for.
    fn spawn_refresh(
        self: &Arc<Self>,
        gate: tokio::sync::OwnedMutexGuard<()>,
    ) -> tokio::task::JoinHandle<Result<(), OAuthError>> {
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.refresh().await;
            drop(gate);
            res
        })
    }

    /// Under the short lock: the key for `kid` if known, whether the set is stale, and whether
    /// the refresh interval allows a fetch now.
    fn peek(&self, kid: Option<&str>) -> (Option<Key>, bool, bool) {
        let c = lock(&self.cache);
        let now = Instant::now();
        let stale = c.expires.is_none_or(|e| e <= now);
        let may_fetch = c
            .last_fetch
            .is_none_or(|t| now.duration_since(t) >= self.cfg.key_refresh_interval);
        (c.lookup(kid), stale, may_fetch)
    }

    /// The key for `kid`. A known key is returned at once (a stale set is refreshed in the
    /// background, within the rate limit; the old keys serve until it succeeds, also while the
    /// issuer is down). An unknown `kid` waits for the one fetch in flight or starts it, at
    /// most once per `key_refresh_interval` (an unknown-kid flood causes no storm).
    async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Key, OAuthError> {
        let (found, stale, may_fetch) = self.peek(kid);
        if let Some(k) = found {
            if stale && may_fetch {
                // One fetch at a time: if one is running, it brings the new set.
                if let Ok(gate) = self.key_fetch.clone().try_lock_owned() {
                    if matches!(self.peek(kid), (_, true, true)) {
                        drop(self.spawn_refresh(gate));
                    }
                }
            }
            return Ok(k);
        }
        let gate = tokio::time::timeout(FETCH_WAIT, self.key_fetch.clone().lock_owned())
            .await
            .map_err(|_| OAuthError::IdpUnavailable)?;
        // A fetch may have ended while this one waited.
        let (found, _, may_fetch) = self.peek(kid);
        if let Some(k) = found {
            return Ok(k);
        }
        if !may_fetch {
            return Err(OAuthError::UnknownKey);
        }
        self.spawn_refresh(gate)
            .await
            .unwrap_or(Err(OAuthError::IdpUnavailable))?;
        self.peek(kid).0.ok_or(OAuthError::UnknownKey)
    }

    /// Signature and registered claims; the key fetched within the rate limit.
    async fn validate(
        self: &Arc<Self>,
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
    issuers: Vec<Arc<Issuer>>,
    names: NameRules,
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
    let set = issuer.fetch_key_set(None).await.map_err(|e| {
        format!(
            "cannot fetch the signing keys ({}); check the issuer URL, its discovery document and the network",
            e.as_str()
        )
    })?;
    let n = set.keys.len() + set.anonymous.len();
    if n == 0 {
        return Err("the key set has no usable signing key".into());
    }
    let mut summary = format!("{n} signing key(s) from {}", set.jwks_uri);
    if cfg.introspection.is_some() {
        match issuer.introspector().await {
            Ok(Some(_)) => summary.push_str("; introspection endpoint found"),
            _ => return Err("no introspection endpoint (configure introspection.endpoint)".into()),
        }
    }
    Ok(summary)
}

impl OAuthValidator {
    /// `names`: how user names and claims are compared (`auth.unicode_names`).
    pub fn new(
        issuers: &[IssuerConfig],
        metrics: Arc<crate::observe::Metrics>,
        names: NameRules,
    ) -> Result<Self, String> {
        let issuers = issuers
            .iter()
            .map(|cfg| Issuer::from_config(cfg, Some(metrics.clone())).map(Arc::new))
            .collect::<Result<_, String>>()?;
        Ok(Self { issuers, names })
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
        check_claims(&issuer.cfg, &claims, sasl_user, self.names)
    }

    /// The one issuer an opaque token may be introspected at, chosen from the configuration
    /// and the SASL user alone (the token is sent nowhere to find out), never several:
    /// 1. the SASL user's domain is in exactly one introspecting issuer's `domains`: that one;
    ///    listed by several: none (`unknown_issuer`);
    /// 2. listed by none: the one introspecting issuer without `domains`, if there is exactly
    ///    one; none without `domains`: `wrong_domain`; several: `unknown_issuer`;
    /// 3. no SASL user, or one without a domain: the only introspecting issuer, if there is
    ///    exactly one; else `unknown_issuer`.
    ///
    /// No issuer with introspection at all: `malformed` (an opaque token cannot be checked).
    fn opaque_issuer<'a>(&'a self, sasl_user: Option<&str>) -> Result<&'a Arc<Issuer>, OAuthError> {
        let introspecting: Vec<&'a Arc<Issuer>> = self
            .issuers
            .iter()
            .filter(|i| i.cfg.introspection.is_some())
            .collect();
        if introspecting.is_empty() {
            return Err(OAuthError::Malformed);
        }
        let only = |list: &[&'a Arc<Issuer>]| match list {
            [one] => Ok(*one),
            _ => Err(OAuthError::UnknownIssuer),
        };
        match sasl_user.and_then(|u| u.rsplit_once('@')) {
            Some((_, domain)) => {
                let listing: Vec<&'a Arc<Issuer>> = introspecting
                    .iter()
                    .copied()
                    .filter(|i| i.cfg.domains.iter().any(|d| d == domain))
                    .collect();
                let open: Vec<&'a Arc<Issuer>> = introspecting
                    .iter()
                    .copied()
                    .filter(|i| i.cfg.domains.is_empty())
                    .collect();
                if !listing.is_empty() {
                    only(&listing)
                } else if open.is_empty() {
                    Err(OAuthError::WrongDomain)
                } else {
                    only(&open)
                }
            }
            None => only(&introspecting),
        }
    }

    /// Opaque tokens: introspected at the one issuer they can belong to; only an answer that
    /// passes [`check_introspection`] and [`check_claims`] is accepted (and cached, never past
    /// its `exp`).
    async fn validate_opaque(
        &self,
        token: &str,
        sasl_user: Option<&str>,
    ) -> Result<TokenIdentity, OAuthError> {
        if token.is_empty() {
            return Err(OAuthError::Malformed);
        }
        let issuer = self.opaque_issuer(sasl_user)?;
        let intro = issuer.introspector().await?.ok_or(OAuthError::Malformed)?;
        let cfg = &issuer.cfg;
        // Cached only if the answer and its claims pass (the SASL user differs per attempt,
        // so it is compared after, also on a cache hit).
        let claims = intro
            .introspect(token, |answer| {
                let exp = check_introspection(cfg, answer, jsonwebtoken::get_current_timestamp())?;
                check_claims(cfg, answer, None, self.names).map(|_| exp)
            })
            .await?;
        check_claims(cfg, &claims, sasl_user, self.names)
    }
}

/// An RFC 7662 answer (§2.2) is accepted only if `active` is the boolean `true`, `exp` is
/// present and not passed (with `leeway`), `nbf` (if any) is reached, `iss` is the issuer's,
/// and `aud` (a string or a list) contains a configured audience or `client_id` is one.
/// Returns `exp` (Unix seconds).
fn check_introspection(cfg: &IssuerConfig, answer: &Value, now: u64) -> Result<u64, OAuthError> {
    if answer.get("active") != Some(&Value::Bool(true)) {
        return Err(OAuthError::Inactive);
    }
    let leeway = cfg.leeway.as_secs();
    let exp = answer
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(OAuthError::Malformed)?;
    if exp.saturating_add(leeway) < now {
        return Err(OAuthError::Expired);
    }
    if answer
        .get("nbf")
        .and_then(Value::as_u64)
        .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(OAuthError::NotYetValid);
    }
    if answer.get("iss").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
        return Err(OAuthError::WrongIssuer);
    }
    let configured = |v: &Value| {
        v.as_str()
            .is_some_and(|a| cfg.audiences.iter().any(|c| c == a))
    };
    let aud_ok = match answer.get("aud") {
        Some(Value::Array(list)) => list.iter().any(configured),
        Some(one) => configured(one),
        None => false,
    };
    if !aud_ok && !answer.get("client_id").is_some_and(configured) {
        return Err(OAuthError::WrongAudience);
    }
    Ok(exp)
}

/// The checks common to JWTs and introspected tokens.
fn check_claims(
    cfg: &IssuerConfig,
    claims: &Value,
    sasl_user: Option<&str>,
    names: NameRules,
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
    let mut user = super::normalize_user_with(raw, names).map_err(|_| OAuthError::NoUser)?;
    // An address the provider has not verified names nobody (OpenID Connect Core §5.1).
    if cfg.user_claim == "email"
        && cfg.require_email_verified
        && claims.get("email_verified") != Some(&Value::Bool(true))
    {
        return Err(OAuthError::EmailNotVerified);
    }
    if !user.contains('@') {
        if let Some(d) = &cfg.user_domain {
            user = format!("{user}@{d}");
        }
    }
    if !cfg.domains.is_empty() {
        let domain = user.rsplit_once('@').map(|(_, d)| d);
        if !domain.is_some_and(|d| cfg.domains.iter().any(|x| x == d)) {
            return Err(OAuthError::WrongDomain);
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
#[cfg(test)]
mod tests;
