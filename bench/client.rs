//! The IMAP-over-TLS client the benchmark tools share (bench/loadgen.rs, bench/soak.rs):
//! line reads that read literals whole, commands to a tagged reply, and the TLS connector.

#![allow(dead_code)] // each tool uses a part of it
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An IMAP client connection: line reads that swallow literals.
pub(crate) struct Conn {
    pub io: Box<dyn Io>,
    pub buf: Vec<u8>,
    /// Literal and line bytes received, for throughput.
    pub received: u64,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr, tls: &TlsConnector) -> std::io::Result<Conn> {
        Self::handshake(TcpStream::connect(addr).await?, tls).await
    }

    /// From a given local address (e.g. 127.0.0.2, to be another client network).
    pub(crate) async fn open_from(
        local: std::net::IpAddr,
        addr: SocketAddr,
        tls: &TlsConnector,
    ) -> std::io::Result<Conn> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(local, 0))?;
        Self::handshake(sock.connect(addr).await?, tls).await
    }

    async fn handshake(tcp: TcpStream, tls: &TlsConnector) -> std::io::Result<Conn> {
        tcp.set_nodelay(true)?;
        let s = tls
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let mut c = Conn {
            io: Box::new(s),
            buf: Vec::with_capacity(64 * 1024),
            received: 0,
        };
        let greeting = c.line().await?;
        if !greeting.starts_with(b"* OK") {
            return Err(std::io::Error::other("no OK greeting"));
        }
        Ok(c)
    }

    pub(crate) async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.received += n as u64;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One response line; a `{n}` literal at its end is read and dropped with the rest.
    pub(crate) async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        self.line_keeping(None).await
    }

    /// One response line; the contents of its literals are appended to `keep` when given.
    pub(crate) async fn line_keeping(
        &mut self,
        mut keep: Option<&mut Vec<Vec<u8>>>,
    ) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                self.fill().await?;
                continue;
            };
            let part: Vec<u8> = self.buf.drain(..pos + 2).collect();
            line.extend_from_slice(&part);
            // A literal: `{123}\r\n` then 123 bytes, then the line continues.
            let body = &part[..part.len() - 2];
            if body.ends_with(b"}") {
                if let Some(open) = body.iter().rposition(|&b| b == b'{') {
                    let digits = &body[open + 1..body.len() - 1];
                    if let Ok(n) = std::str::from_utf8(digits).unwrap_or("x").parse::<usize>() {
                        while self.buf.len() < n {
                            self.fill().await?;
                        }
                        let literal = self.buf.drain(..n);
                        if let Some(k) = keep.as_deref_mut() {
                            k.push(literal.collect());
                        }
                        continue;
                    }
                }
            }
            return Ok(line);
        }
    }

    pub(crate) async fn send(&mut self, cmd: &str) -> std::io::Result<()> {
        self.io.write_all(cmd.as_bytes()).await?;
        self.io.flush().await
    }

    /// Sends `tag cmd` and reads to the tagged reply; Err unless it is OK.
    pub(crate) async fn cmd(&mut self, tag: &str, cmd: &str) -> std::io::Result<()> {
        self.send(&format!("{tag} {cmd}\r\n")).await?;
        let t = format!("{tag} ").into_bytes();
        loop {
            let l = self.line().await?;
            if l.starts_with(&t) {
                return if l[t.len()..].starts_with(b"OK") {
                    Ok(())
                } else {
                    Err(std::io::Error::other(
                        String::from_utf8_lossy(&l).trim_end().to_owned(),
                    ))
                };
            }
        }
    }

    /// `AUTHENTICATE XOAUTH2` with an initial response (SASL-IR): `user` and a bearer token.
    pub(crate) async fn login_xoauth2(&mut self, user: &str, token: &str) -> std::io::Result<()> {
        use base64::Engine;
        let msg = format!("user={user}\x01auth=Bearer {token}\x01\x01");
        let b64 = base64::engine::general_purpose::STANDARD.encode(msg);
        self.cmd("l", &format!("AUTHENTICATE XOAUTH2 {b64}")).await
    }

    /// LOGIN, or XOAUTH2 when `xoauth2` (then `secret` is the token).
    pub(crate) async fn auth(
        &mut self,
        xoauth2: bool,
        user: &str,
        secret: &str,
    ) -> std::io::Result<()> {
        if xoauth2 {
            self.login_xoauth2(user, secret).await
        } else {
            self.login(user, secret).await
        }
    }

    pub(crate) async fn login(&mut self, user: &str, password: &str) -> std::io::Result<()> {
        self.cmd("l", &format!("LOGIN \"{user}\" \"{password}\""))
            .await
    }
}

/// A users file: `user secret` lines (the secret is everything after the first space: an app
/// password in groups, a password or a token).
pub(crate) fn read_users(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .expect("--users file")
        .lines()
        .filter_map(|l| {
            let (u, p) = l.split_once(' ')?;
            Some((u.to_owned(), p.to_owned()))
        })
        .collect()
}

pub(crate) fn connector(ca: &str) -> TlsConnector {
    connector_alpn(ca, b"imap")
}

/// A connector offering one ALPN protocol (`imap`, `smtp`, `pop3`): the gateway refuses a
/// client whose ALPN list lacks its listener's protocol (ALPACA).
pub(crate) fn connector_alpn(ca: &str, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("--ca PEM") {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}
