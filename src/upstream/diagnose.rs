//! `imapgate doctor`'s look at a backend: the steps a session takes, each checked, in words
//! for an operator. The backend's own text is not repeated, only which step failed and what
//! it announced (capabilities, EHLO extensions, CAPA).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::login::LoginError;
use super::pop3::Pop3Login;
use super::smtp::{self, SmtpLogin};
use super::{describe, Backend, Opened, UpstreamError};
use crate::config::{BackendLogin, BackendTls, Protocol};
use crate::tls::Conn;

/// The most lines taken from a CAPA reply.
const MAX_CAPA_LINES: usize = 256;

/// The client address the doctor's logins claim (XCLIENT's ADDR, IMAP's ID).
fn doctor_client() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Backend {
    /// For `imapgate doctor`: connect, TLS (implicit or STARTTLS) verified as in production,
    /// then per protocol — IMAP: the greeting and CAPABILITY; SMTP: the greeting and EHLO,
    /// and for `login: xclient` that XCLIENT is offered, else that AUTH PLAIN is; POP3: the
    /// greeting and CAPA — and a polite goodbye. Returns what the backend announced (IMAP
    /// capabilities, SMTP extension lines, POP3 CAPA lines; empty when a POP3 server has no
    /// CAPA), or what went wrong.
    pub async fn diagnose(&self) -> Result<Vec<String>, String> {
        match self.config.protocol {
            Protocol::Imap => self.diagnose_imap().await,
            Protocol::Smtp => self.diagnose_smtp().await,
            Protocol::Pop3 => self.diagnose_pop3().await,
        }
    }

    /// For `imapgate doctor --user`: the login as `user`, as a session makes it, then a
    /// goodbye. Returns what the backend announced after it (IMAP: the capabilities; SMTP: the
    /// EHLO extensions after the handover; POP3: CAPA), or what went wrong.
    pub async fn diagnose_login(&self, user: &str) -> Result<Vec<String>, String> {
        match self.config.protocol {
            Protocol::Imap => self.diagnose_login_imap(user).await,
            Protocol::Smtp => self.diagnose_login_smtp(user).await,
            Protocol::Pop3 => self.diagnose_login_pop3(user).await,
        }
    }

    /// SMTP: greeting, EHLO, STARTTLS and EHLO again when configured, QUIT; then whether the
    /// handover the config asks for is on offer.
    async fn diagnose_smtp(&self) -> Result<Vec<String>, String> {
        let mut machine = SmtpLogin::probe(&self.config);
        let (conn, extensions) = self
            .converse(&mut machine)
            .await
            .map_err(|e| self.step_failed(&e))?;
        self.remember_extensions(&extensions);
        self.goodbye(conn, b"QUIT\r\n").await;
        let offered = || {
            if extensions.is_empty() {
                "none".to_owned()
            } else {
                extensions.join(", ")
            }
        };
        match &self.config.login {
            BackendLogin::Xclient if smtp::xclient_attributes(&extensions).is_none() => Err(format!(
                "login: xclient, but EHLO offers no XCLIENT with LOGIN and ADDR to this host (extensions: {}): Postfix offers it only to hosts listed in smtpd_authorized_xclient_hosts; add the gateway's address there",
                offered()
            )),
            BackendLogin::MasterUser { .. } | BackendLogin::SaslAuthzid
                if !smtp::offers_auth_plain(&extensions) =>
            {
                Err(format!(
                    "the master login needs AUTH PLAIN, but EHLO{} does not offer it (extensions: {})",
                    if self.config.tls == BackendTls::Starttls {
                        " after STARTTLS"
                    } else {
                        ""
                    },
                    offered()
                ))
            }
            _ => Ok(extensions),
        }
    }

    /// SMTP: the whole handover as `user` (XCLIENT or AUTH PLAIN), then QUIT.
    async fn diagnose_login_smtp(&self, user: &str) -> Result<Vec<String>, String> {
        let how = self.login_words(user);
        let mut machine = SmtpLogin::new(&self.config, user, doctor_client(), None)
            .map_err(|e| format!("{how}: {}", describe(&e.into())))?;
        let (conn, extensions) = self
            .converse(&mut machine)
            .await
            .map_err(|e| format!("{how}: {}", describe(&e)))?;
        self.remember_extensions(&extensions);
        self.goodbye(conn, b"QUIT\r\n").await;
        Ok(extensions)
    }

    /// POP3: the greeting, STLS when configured, CAPA, QUIT.
    async fn diagnose_pop3(&self) -> Result<Vec<String>, String> {
        let mut machine = Pop3Login::probe(&self.config);
        let (conn, _) = self
            .converse(&mut machine)
            .await
            .map_err(|e| self.step_failed(&e))?;
        self.capa_then_quit(conn, machine.take_remaining().to_vec())
            .await
            .map_err(|e| format!("CAPA: {e}"))
    }

    /// POP3: the master login as `user`, then CAPA, then QUIT.
    async fn diagnose_login_pop3(&self, user: &str) -> Result<Vec<String>, String> {
        let how = self.login_words(user);
        let mut machine = Pop3Login::new(&self.config, user, doctor_client())
            .map_err(|e| format!("{how}: {}", describe(&e.into())))?;
        let (conn, _) = self
            .converse(&mut machine)
            .await
            .map_err(|e| format!("{how}: {}", describe(&e)))?;
        self.capa_then_quit(conn, machine.take_remaining().to_vec())
            .await
            .map_err(|e| format!("after login as {user}: CAPA: {e}"))
    }

    /// `CAPA` (RFC 2449 §5), its lines un-stuffed; empty when the server answers `-ERR`
    /// (CAPA is optional). Then QUIT.
    async fn capa_then_quit(&self, mut conn: Conn, rest: Vec<u8>) -> Result<Vec<String>, String> {
        let ask = async {
            conn.write_all(b"CAPA\r\n")
                .await
                .map_err(|_| "the backend closed the connection".to_owned())?;
            let mut lines = LineReader { buf: rest };
            if !lines.next(&mut conn).await?.starts_with("+OK") {
                return Ok(Vec::new());
            }
            let mut capa = Vec::new();
            loop {
                let line = lines.next(&mut conn).await?;
                let line = line.trim_end();
                if line == "." {
                    return Ok(capa);
                }
                if capa.len() >= MAX_CAPA_LINES {
                    return Err(format!("more than {MAX_CAPA_LINES} lines"));
                }
                capa.push(line.strip_prefix('.').unwrap_or(line).to_owned());
            }
        };
        let capa = tokio::time::timeout(self.config.login_timeout, ask)
            .await
            .map_err(|_| "no answer within login_timeout".to_owned())?;
        self.goodbye(conn, b"QUIT\r\n").await;
        capa
    }

    /// How the login is made, for an error message.
    fn login_words(&self, user: &str) -> String {
        match self.config.login {
            BackendLogin::Xclient => format!("XCLIENT handover as {user}"),
            _ => format!("master login as {user}"),
        }
    }

    /// A failed probe dialogue (SMTP, POP3) in words: which step failed.
    fn step_failed(&self, e: &UpstreamError) -> String {
        let smtp = self.config.protocol == Protocol::Smtp;
        let words = match e {
            UpstreamError::Connect(_) => return format!("connect: {}", describe(e)),
            UpstreamError::Tls(_) => return format!("TLS: {}", describe(e)),
            UpstreamError::Login(LoginError::Bye) if smtp => {
                "the greeting is not 220 (421 or 554: the backend refuses this host, or is shutting down)"
            }
            UpstreamError::Login(LoginError::Bye) => "the greeting is -ERR",
            UpstreamError::Login(LoginError::NoStartTls) => {
                "tls: starttls, but STARTTLS is not offered after EHLO"
            }
            UpstreamError::Login(LoginError::StartTlsRefused) if smtp => "STARTTLS refused",
            UpstreamError::Login(LoginError::StartTlsRefused) => "tls: starttls, but STLS refused",
            UpstreamError::Login(LoginError::Protocol) if smtp => {
                "an unexpected reply to the greeting, EHLO or STARTTLS (not an SMTP server?)"
            }
            UpstreamError::Login(LoginError::Protocol) => {
                "an unexpected reply to the greeting or STLS (not a POP3 server?)"
            }
            _ => return describe(e),
        };
        words.to_owned()
    }

    /// IMAP: the greeting, STARTTLS when configured, CAPABILITY, LOGOUT.
    async fn diagnose_imap(&self) -> Result<Vec<String>, String> {
        let tcp = self
            .connect_tcp()
            .await
            .map_err(|e| format!("connect: {}", describe(&e)))?;
        let check = async {
            let mut conn = match self.config.tls {
                BackendTls::Implicit => self
                    .tls_upgrade(tcp)
                    .await
                    .map_err(|e| format!("TLS: {}", describe(&e)))?,
                _ => Conn::Plain(tcp),
            };
            let mut lines = LineReader::default();
            let greeting = lines.next(&mut conn).await?;
            if !greeting.starts_with("* OK") {
                return Err("the greeting is not `* OK` (PREAUTH or BYE?)".into());
            }
            if self.config.tls == BackendTls::Starttls {
                conn.write_all(b"d0 STARTTLS\r\n")
                    .await
                    .map_err(|_| "closed".to_owned())?;
                let reply = lines.tagged(&mut conn, "d0").await?;
                if !reply.starts_with("d0 OK") {
                    return Err("STARTTLS refused".into());
                }
                let Conn::Plain(tcp) = conn else {
                    return Err("unexpected TLS".into());
                };
                conn = self
                    .tls_upgrade(tcp)
                    .await
                    .map_err(|e| format!("TLS after STARTTLS: {}", describe(&e)))?;
                lines = LineReader::default();
            }
            conn.write_all(b"d1 CAPABILITY\r\n")
                .await
                .map_err(|_| "closed".to_owned())?;
            let mut caps = String::new();
            loop {
                let l = lines.next(&mut conn).await?;
                if let Some(c) = l.strip_prefix("* CAPABILITY ") {
                    caps = c.trim_end().to_owned();
                } else if l.starts_with("d1 ") {
                    break;
                }
            }
            let _ = conn.write_all(b"d2 LOGOUT\r\n").await;
            let _ = conn.shutdown().await;
            Ok(caps.split_whitespace().map(str::to_owned).collect())
        };
        tokio::time::timeout(self.config.login_timeout, check)
            .await
            .map_err(|_| "no answer within login_timeout".to_owned())?
    }

    /// IMAP: the master login, then CAPABILITY, then LOGOUT; every capability announced after
    /// the login (in its OK and in the CAPABILITY reply).
    async fn diagnose_login_imap(&self, user: &str) -> Result<Vec<String>, String> {
        let client = doctor_client();
        let Opened {
            mut conn,
            extra: rest,
            ..
        } = self
            .open(user, client, None)
            .await
            .map_err(|e| format!("master login as {user}: {}", describe(&e)))?;
        let mut caps = self
            .login_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(c, _)| c.clone())
            .unwrap_or_default();
        let check = async {
            conn.write_all(b"d3 CAPABILITY\r\n")
                .await
                .map_err(|_| "closed".to_owned())?;
            let mut lines = LineReader { buf: rest.to_vec() };
            loop {
                let l = lines.next(&mut conn).await?;
                if let Some(c) = l.strip_prefix("* CAPABILITY ") {
                    caps.extend(c.split_whitespace().map(str::to_owned));
                } else if l.starts_with("d3 ") {
                    break;
                }
            }
            let _ = conn.write_all(b"d4 LOGOUT\r\n").await;
            let _ = conn.shutdown().await;
            Ok::<_, String>(())
        };
        tokio::time::timeout(self.config.login_timeout, check)
            .await
            .map_err(|_| "no answer to CAPABILITY after login within login_timeout".to_owned())?
            .map_err(|e| format!("after login as {user}: {e}"))?;
        Ok(caps)
    }
}

/// Reads CRLF lines for the doctor's short dialogue (bounded: 64 KiB per line).
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    async fn next(&mut self, conn: &mut Conn) -> Result<String, String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > 64 * 1024 {
                return Err("a line longer than 64 KiB".into());
            }
            let mut chunk = [0u8; 4096];
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(|_| "the backend closed the connection".to_owned())?;
            if n == 0 {
                return Err("the backend closed the connection".into());
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }

    async fn tagged(&mut self, conn: &mut Conn, tag: &str) -> Result<String, String> {
        loop {
            let l = self.next(conn).await?;
            if l.starts_with(&format!("{tag} ")) {
                return Ok(l);
            }
        }
    }
}
