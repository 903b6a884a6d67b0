//! OpenID Connect sign-in for the portal (Core 1.0 §3.1, authorization code flow): the
//! authorization request with PKCE S256 (RFC 7636), `state` and `nonce`; the code exchanged at
//! the token endpoint with the client's secret; the ID token verified as the gateway verifies
//! access tokens — the issuer's published keys, the algorithm allow-list, `iss`, `aud` (the
//! client id), `exp`/`nbf`/`iat` with leeway — plus `nonce` (§3.1.3.7 step 11), `azp` when
//! several audiences are named, and then the same claim rules as OAuth logins (user claim,
//! `email_verified`, `user_domain`, `domains`, `amr`, `acr`).
//!
//! Endpoints come from discovery, whose `issuer` must be the configured one and whose URLs must
//! keep the issuer's scheme; responses are bounded and never followed through redirects.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::Value;

use super::{check_claims, http, Issuer, OAuthError};
use crate::auth::NameRules;
use crate::config::IssuerConfig;
use crate::secret::Secret;

/// The endpoints the sign-in uses.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub authorization: String,
    pub token: String,
}

/// One sign-in in progress: what the browser carries (sealed) between the redirect to the IdP
/// and the callback. Every value is random per sign-in.
pub struct Pending {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
}

/// A verified ID token.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The mail address, normalised, after the domain rules.
    pub user: String,
    /// `auth_time` (when the person last authenticated at the IdP); 0 when the token does
    /// not say.
    pub auth_time: u64,
    pub claims: Value,
}

pub struct OidcClient {
    issuer: Arc<Issuer>,
    names: NameRules,
}

/// 32 random bytes, base64url without padding (43 characters).
fn random_token() -> String {
    use rand::RngExt;
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Pending {
    pub fn new() -> Self {
        Pending {
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
        }
    }

    /// `BASE64URL(SHA256(verifier))` (RFC 7636 §4.2).
    pub fn challenge(&self) -> String {
        use sha2::Digest as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(self.verifier.as_bytes()))
    }
}

impl Default for Pending {
    fn default() -> Self {
        Self::new()
    }
}

impl OidcClient {
    pub fn new(
        cfg: &IssuerConfig,
        metrics: Arc<crate::observe::Metrics>,
        names: NameRules,
    ) -> Result<Self, String> {
        Ok(OidcClient {
            issuer: Arc::new(Issuer::from_config(cfg, Some(metrics))?),
            names,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer.cfg.issuer
    }

    /// The authorization and token endpoints, from discovery.
    pub async fn endpoints(&self) -> Result<Endpoints, OAuthError> {
        let doc = self.issuer.discovery_doc().await?;
        Ok(Endpoints {
            authorization: self.issuer.endpoint(&doc, "authorization_endpoint")?,
            token: self.issuer.endpoint(&doc, "token_endpoint")?,
        })
    }

    /// Exchanges an authorization code for the ID token (client_secret_basic, RFC 6749 §2.3.1:
    /// id and secret form-encoded before the Basic encoding).
    pub async fn exchange(
        &self,
        token_endpoint: &str,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
        client_id: &str,
        client_secret: &Secret,
    ) -> Result<Secret, OAuthError> {
        let enc = |s: &str| -> String {
            reqwest::Url::parse_with_params("x:", [("v", s)])
                .ok()
                .and_then(|u| u.query().map(|q| q.trim_start_matches("v=").to_owned()))
                .unwrap_or_default()
        };
        let secret = client_secret.expose_str().ok_or(OAuthError::Malformed)?;
        let resp = self
            .issuer
            .http
            .post(token_endpoint)
            .basic_auth(enc(client_id), Some(enc(secret)))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .map_err(|_| OAuthError::IdpUnavailable)?;
        let ok = resp.status().is_success();
        let body = http::read_bounded(resp).await?;
        if !ok {
            // invalid_grant and the like: a replayed or forged code, or a wrong secret.
            return Err(OAuthError::Inactive);
        }
        let doc: Value = serde_json::from_slice(&body).map_err(|_| OAuthError::Malformed)?;
        doc.get("id_token")
            .and_then(Value::as_str)
            .map(|t| Secret::from(t.to_owned()))
            .ok_or(OAuthError::Malformed)
    }

    /// Verifies an ID token for the sign-in that sent `nonce`.
    pub async fn verify_id_token(
        &self,
        token: &Secret,
        nonce: &str,
    ) -> Result<SignedIn, OAuthError> {
        let token = token.expose_str().ok_or(OAuthError::Malformed)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| OAuthError::Malformed)?;
        let claims = self.issuer.validate(token, &header).await?;
        let cfg = &self.issuer.cfg;
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = cfg.leeway.as_secs();
        let iat = claims
            .get("iat")
            .and_then(Value::as_u64)
            .ok_or(OAuthError::Malformed)?;
        if iat > now + leeway {
            return Err(OAuthError::NotYetValid);
        }
        let given = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            nonce.as_bytes(),
        )) || nonce.is_empty()
        {
            return Err(OAuthError::Malformed);
        }
        // Several audiences: the token must have been issued to us (Core §3.1.3.7 steps 4-5).
        if let Some(Value::Array(aud)) = claims.get("aud") {
            if aud.len() > 1
                && claims.get("azp").and_then(Value::as_str)
                    != cfg.audiences.first().map(String::as_str)
            {
                return Err(OAuthError::WrongAudience);
            }
        }
        let id = check_claims(cfg, &claims, None, self.names)?;
        // Without `auth_time` nothing says when the person last proved who they are (a
        // silent single sign-on re-issues tokens): such a sign-in is never fresh, so the
        // first sensitive action goes through the IdP with `max_age`, which obliges it to
        // send `auth_time`.
        let auth_time = claims
            .get("auth_time")
            .and_then(Value::as_u64)
            .map_or(0, |t| t.min(now + leeway));
        Ok(SignedIn {
            user: id.user,
            auth_time,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pkce_challenge_is_the_rfc_7636_example() {
        let p = super::Pending {
            state: String::new(),
            nonce: String::new(),
            verifier: "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into(),
        };
        assert_eq!(p.challenge(), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn each_sign_in_gets_fresh_random_values() {
        let a = super::Pending::new();
        let b = super::Pending::new();
        assert_eq!(a.state.len(), 43);
        assert_ne!(a.state, b.state);
        assert_ne!(a.nonce, a.state);
        assert_ne!(a.verifier, b.verifier);
    }
}
