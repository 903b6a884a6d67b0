//! `imapgate oauth token`: the OAuth 2.0 device authorization grant (RFC 8628) with the
//! `oauth2` crate, so an administrator can get a token to test a login without a mail client.

use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    ClientId, DeviceAuthorizationUrl, Scope, StandardDeviceAuthorizationResponse, TokenResponse,
    TokenUrl,
};
use serde_json::Value;

use super::{http, introspect, Issuer};
use crate::config::IssuerConfig;
use crate::secret::Secret;

/// What the person must do: open `uri` (or `complete`) and enter `code`.
pub struct Prompt {
    pub uri: String,
    pub complete: Option<String>,
    pub code: String,
}

/// Runs the device flow against `cfg`'s endpoints (from discovery) and returns the access token.
pub async fn token(
    cfg: &IssuerConfig,
    client_id: &str,
    scopes: &[String],
    resource: Option<&str>,
    timeout: Duration,
    prompt: impl Fn(&Prompt),
) -> Result<Secret, String> {
    let issuer = Issuer::from_config(cfg, None)?;
    let doc: Value = issuer
        .discovery_doc()
        .await
        .map_err(|e| format!("discovery: {e}"))?;
    let device_url = issuer
        .endpoint(&doc, "device_authorization_endpoint")
        .map_err(|_| "the issuer offers no device authorization endpoint".to_owned())?;
    let token_url = issuer
        .endpoint(&doc, "token_endpoint")
        .map_err(|_| "the issuer has no token endpoint".to_owned())?;
    let client = BasicClient::new(ClientId::new(client_id.to_owned()))
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(device_url).map_err(|e| e.to_string())?,
        )
        .set_token_uri(TokenUrl::new(token_url).map_err(|e| e.to_string())?);
    let http = http::client(cfg)?;
    let call = move |req: oauth2::HttpRequest| introspect::send(http.clone(), req);
    let mut request = client
        .exchange_device_code()
        .add_scopes(scopes.iter().cloned().map(Scope::new));
    if let Some(r) = resource {
        request = request.add_extra_param("resource", r.to_owned());
    }
    let details: StandardDeviceAuthorizationResponse = request
        .request_async(&call)
        .await
        .map_err(|e| format!("device authorization: {e}"))?;
    prompt(&Prompt {
        uri: details.verification_uri().to_string(),
        complete: details
            .verification_uri_complete()
            .map(|c| c.secret().to_owned()),
        code: details.user_code().secret().to_owned(),
    });
    let mut exchange = client.exchange_device_access_token(&details);
    if let Some(r) = resource {
        exchange = exchange.add_extra_param("resource", r.to_owned());
    }
    let token = exchange
        .request_async(&call, tokio::time::sleep, Some(timeout))
        .await
        .map_err(|e| format!("token: {e}"))?;
    Ok(Secret::from(token.access_token().secret().to_owned()))
}
