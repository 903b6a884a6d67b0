//! TLS for both sides: the client-facing server config and the backend-facing client configs.
//!
//! Client side (security invariant 11): rustls with the aws-lc-rs provider, TLS 1.2 minimum
//! (1.3-only by config), the server's cipher order, no 0-RTT, ALPN `imap` only — a client that
//! offers ALPN without `imap` fails the handshake (ALPACA, CVE-2021-3618 family). SNI picks
//! among the configured certificates; the first is the default. The acceptor is built once and
//! the certificate set can be swapped without touching live sessions.
//!
//! Backend side (invariant 9): verification is always on for `implicit`/`starttls` backends,
//! against `ca_file` or the system store, for the configured server name.

mod stream;
pub mod x509;

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{BackendConfig, TlsConfig};
pub use stream::{Conn, Wire};

/// The only ALPN protocol we accept (RFC 7301 registry name for IMAP).
pub const ALPN_IMAP: &[u8] = b"imap";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tls setup: {0}")]
    Setup(String),
}

fn file_err(path: &Path, message: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// One certificate chain with its key.
struct Entry {
    key: Arc<CertifiedKey>,
    /// The certificate file (or `self-signed`), for the expiry metric.
    label: String,
    /// The leaf's notAfter (Unix time).
    not_after: Option<i64>,
}

/// Picks a certificate by SNI; the first entry is the default.
pub struct CertResolver {
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl CertResolver {
    fn pick(entries: &[Entry], sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni.and_then(|n| ServerName::try_from(n.to_owned()).ok()) {
            for e in entries {
                let Some(leaf) = e.key.cert.first() else {
                    continue;
                };
                let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else {
                    continue;
                };
                if ee.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(e.key.clone());
                }
            }
        }
        entries.first().map(|e| e.key.clone())
    }

    /// Each certificate's file and the Unix time its leaf expires.
    pub fn expiries(&self) -> Vec<(String, i64)> {
        let Ok(entries) = self.entries.read() else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|e| Some((e.label.clone(), e.not_after?)))
            .collect()
    }

    /// Replaces the certificate set; handshakes in progress keep the old one.
    pub fn replace(&self, tls: &TlsConfig) -> Result<(), TlsError> {
        let entries = load_entries(tls)?;
        if let Ok(mut e) = self.entries.write() {
            *e = Arc::new(entries);
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.read().ok()?.clone();
        Self::pick(&entries, hello.server_name())
    }
}

/// aws-lc-rs's suites and groups, with AES-128-GCM preferred (as Mozilla's intermediate and
/// modern profiles do): its TLS 1.3 suite hashes with SHA-256, where AES-256-GCM's SHA-384 runs
/// SHA-512's costlier block function over every handshake's transcript and key schedule, and it
/// encrypts each relayed byte with 10 AES rounds instead of 14. Both remain offered.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = aws_lc_rs::default_provider();
    // Stable: TLS 1.3 suites stay ahead of TLS 1.2's within each rank (rustls picks the
    // version first, then the first of the server's suites for it that the client offers).
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

fn load_entries(tls: &TlsConfig) -> Result<Vec<Entry>, TlsError> {
    let provider = provider();
    let mut out = Vec::new();
    if tls.self_signed {
        let (chain, key) = self_signed()?;
        out.push(certified(
            chain,
            key,
            &provider,
            Path::new("(self-signed)"),
            "self-signed".into(),
        )?);
    }
    for c in &tls.certificates {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert_file)
            .map_err(|e| file_err(&c.cert_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&c.cert_file, e))?;
        if chain.is_empty() {
            return Err(file_err(&c.cert_file, "no certificate found"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| file_err(&c.key_file, e))?;
        out.push(certified(
            chain,
            key,
            &provider,
            &c.key_file,
            c.cert_file.display().to_string(),
        )?);
    }
    if out.is_empty() {
        return Err(TlsError::Setup("no certificate configured".into()));
    }
    Ok(out)
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
    path: &Path,
    label: String,
) -> Result<Entry, TlsError> {
    let not_after = chain.first().and_then(|c| x509::not_after(c));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(path, e))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| file_err(path, format!("key does not match the certificate: {e}")))?;
    Ok(Entry {
        key: Arc::new(ck),
        label,
        not_after,
    })
}

/// A throwaway certificate for `localhost`, 127.0.0.1 and ::1 (development only).
fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Setup(e.to_string()))?;
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok((vec![ck.cert.der().clone()], key))
}

/// The client-facing TLS setup, built once.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub resolver: Arc<CertResolver>,
}

impl ServerTls {
    pub fn build(tls: &TlsConfig) -> Result<ServerTls, TlsError> {
        let resolver = Arc::new(CertResolver {
            entries: RwLock::new(Arc::new(load_entries(tls)?)),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = if tls.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_IMAP.to_vec()];
        config.ignore_client_order = true;
        config.max_early_data_size = 0;
        // The implicit-TLS greeting goes out behind the server's Finished (TLS 1.3 half-RTT
        // data): it is public (what any client is told after connecting), and nothing the
        // client sends is read before the handshake completes. No 0-RTT: see above.
        config.send_half_rtt_data = true;
        // Stateless session tickets (RFC 5077 construction, keys random per process, rotated
        // every 6 hours, tickets valid 12 hours): a reconnecting client resumes however many
        // others connected meanwhile, where rustls's default server-side cache (256 sessions)
        // forgets it after a hundred or so handshakes. Resumption still runs an ECDHE exchange
        // (psk_dhe_ke), so a ticket key leak does not open recorded sessions. One ticket per
        // connection: each reconnect brings the next, and a mail client opening several
        // connections gets one with each.
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        config.send_tls13_tickets = 1;
        Ok(ServerTls {
            config: Arc::new(config),
            resolver,
        })
    }
}

impl ServerTls {
    /// The setup for one protocol's listeners: the same certificates, session tickets and
    /// versions, with that protocol's ALPN name (RFC 7301; ALPACA): a client that offers ALPN
    /// without it is refused. SMTP has no registered name; `smtp` is offered so that a client
    /// offering any other protocol (a browser's `h2`, `http/1.1`) is refused all the same,
    /// while mail clients, which offer no ALPN, are not affected.
    pub fn for_protocol(&self, protocol: crate::config::Protocol) -> Arc<ServerConfig> {
        use crate::config::Protocol;
        if protocol == Protocol::Imap {
            return self.config.clone();
        }
        let mut c = (*self.config).clone();
        c.alpn_protocols = vec![protocol.as_str().as_bytes().to_vec()];
        Arc::new(c)
    }
}

/// The backend-facing TLS setup for one backend; `None` for `tls: none`.
pub fn client_config(b: &BackendConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &b.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
                let cert = cert.map_err(|e| file_err(path, e))?;
                roots.add(cert).map_err(|e| file_err(path, e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsError::Setup(format!(
            "backend {}: no CA certificate to verify it with",
            b.name
        )));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to verify a backend's certificate against.
pub fn backend_server_name(b: &BackendConfig) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(b.server_name.clone()).map_err(|_| {
        TlsError::Setup(format!(
            "backend {}: `{}` is not a valid server name",
            b.name, b.server_name
        ))
    })
}
