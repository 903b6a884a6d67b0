//! A small, bounded HTTP client for an issuer: discovery and key-set fetches.
//!
//! No redirects, a 5 s deadline per request, bodies capped at 1 MiB, HTTPS verified with the
//! issuer's `ca_file` or the system store (plain http only for loopback, as config enforces).

use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::OAuthError;
use crate::config::IssuerConfig;

pub(super) const MAX_BODY: usize = 1024 * 1024;
pub(super) const TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn client(cfg: &IssuerConfig) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for c in certs {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", path.display()))?)
                    .map_err(|e| e.to_string())?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())
}

/// GETs a JSON document: the body (bounded) and its `Cache-Control: max-age`, if any.
pub(super) async fn get_json(
    client: &reqwest::Client,
    url: &str,
) -> Result<(serde_json::Value, Option<Duration>), OAuthError> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|_| OAuthError::IdpUnavailable)?;
    if !resp.status().is_success() {
        return Err(OAuthError::IdpUnavailable);
    }
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(OAuthError::IdpUnavailable);
    }
    let max_age = resp
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .find_map(|d| d.trim().strip_prefix("max-age=")?.parse::<u64>().ok())
        })
        .map(Duration::from_secs);
    let body = read_bounded(resp).await?;
    let value = serde_json::from_slice(&body).map_err(|_| OAuthError::IdpUnavailable)?;
    Ok((value, max_age))
}

/// A response body of at most [`MAX_BODY`] bytes.
pub(super) async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, OAuthError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(OAuthError::IdpUnavailable);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|_| OAuthError::IdpUnavailable)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(OAuthError::IdpUnavailable);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
