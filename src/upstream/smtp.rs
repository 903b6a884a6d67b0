//! Opening a submission session on an SMTP backend for the user, as a state machine without
//! sockets (the same shape as [`UpstreamLogin`](super::login::UpstreamLogin)).
//!
//! Flow: the `220` greeting (RFC 5321 §4.3.1; `421`, `554` or any other refusal ends it) →
//! `EHLO` → for `tls: starttls`, `STARTTLS` (RFC 3207; required, so a stripped keyword fails
//! instead of going on in clear) → TLS → `EHLO` again, since what the server said before TLS
//! no longer counts (RFC 3207 §4.2) → the handover of the identity:
//! - `login: xclient` (Postfix, <http://www.postfix.org/XCLIENT_README.html>): the EHLO reply
//!   must list `XCLIENT` with at least `LOGIN` and `ADDR`; the gateway sends
//!   `XCLIENT ADDR=<client> LOGIN=<user>`, plus `NAME=[UNAVAILABLE]`, `PROTO=ESMTP` and
//!   `HELO=<client's EHLO name>` when the server lists those attributes, every value xtext
//!   (RFC 3461 §4) and an IPv6 address as `IPV6:<addr>`. The server answers with a new `220`
//!   greeting, as if the client had just connected, and the gateway sends `EHLO` once more.
//! - `login: master_user` / `sasl_authzid`: `AUTH PLAIN` with an initial response (RFC 4954
//!   §4, RFC 4616): `\0 user<sep>master \0 password` or `user \0 master \0 password`; the
//!   EHLO reply must list `AUTH` with `PLAIN`. `235` logs in; any `4xx`/`5xx` is a refusal.
//!
//! The result is the extension lines of the last EHLO reply (each line after the first, without
//! `250-`), from which [`client_extensions`] takes what the client may see.
//!
//! Rules: one command at a time and one reply to each (no pipelining during the handover), so
//! bytes the server sends past a reply are refused, and bytes behind the `220` to STARTTLS are
//! never carried into TLS. The EHLO name is the client's own when it is a plain token, else
//! `localhost`. A reply is at most [`MAX_REPLY_LINES`] lines and [`MAX_REPLY_BYTES`] bytes, a
//! line at most 64 KiB: a hostile backend cannot make the gateway keep more. Nothing the backend
//! says reaches the client or a log; failures are [`LoginError`]s.
//!
//! Postfix decides whether XCLIENT is allowed once per connection, from the connecting
//! address: the gateway's. After the handover it is still allowed, so the relay must keep a
//! client from sending XCLIENT (or XFORWARD) of its own.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;

use super::lines::{Line, Lines};
use super::login::{check_user, LoginError, UpStep};
use crate::config::{BackendConfig, BackendLogin, BackendTls};
use crate::secret::Secret;

/// The most lines one reply may have (an EHLO reply has one per extension: a dozen or two).
pub const MAX_REPLY_LINES: usize = 256;

/// The most text one reply may carry, all lines together.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The EHLO name when the client gave none the backend could take.
const FALLBACK_EHLO: &str = "localhost";

/// How the identity is handed to the backend after EHLO.
enum Handover {
    /// Health probe and `doctor`: stop after the (post-TLS) EHLO.
    Probe,
    /// Postfix's XCLIENT; the command is built from the attributes the server lists.
    Xclient {
        user: String,
        client: IpAddr,
        helo: Option<String>,
        done: bool,
    },
    /// The whole `AUTH PLAIN <base64>\r\n` line: it carries the master password.
    AuthPlain(Option<Secret>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Ehlo,
    StartTls,
    /// The driver is doing the TLS handshake.
    AwaitTls,
    Xclient,
    Auth,
    /// Done was returned.
    Finished,
    Failed(LoginError),
}

/// A reply being read: its code and its lines' text so far.
#[derive(Debug, Default)]
struct Reply {
    code: Option<u16>,
    lines: Vec<String>,
    bytes: usize,
}

/// The handover of one SMTP session to the backend.
pub struct SmtpLogin {
    phase: Phase,
    lines: Lines,
    reply: Reply,
    out: Option<Vec<u8>>,
    ehlo: Vec<u8>,
    /// STARTTLS is still to be done.
    starttls: bool,
    handover: Handover,
    /// The extensions of the EHLO the handover followed.
    extensions: Vec<String>,
}

impl SmtpLogin {
    /// The handover of `user` (normalised, as the backend knows it) coming from `client`;
    /// `helo`: the name the client gave in its EHLO.
    pub fn new(
        backend: &BackendConfig,
        user: &str,
        client: SocketAddr,
        helo: Option<&str>,
    ) -> Result<Self, LoginError> {
        check_user(user, &backend.login)?;
        let handover = match &backend.login {
            BackendLogin::Xclient => Handover::Xclient {
                user: user.to_owned(),
                client: client.ip().to_canonical(),
                helo: helo.map(str::to_owned),
                done: false,
            },
            BackendLogin::MasterUser { separator } => {
                let authcid = format!("{user}{separator}{}", backend.master_user);
                Handover::AuthPlain(Some(auth_plain(
                    b"",
                    authcid.as_bytes(),
                    backend.master_password.expose(),
                )))
            }
            BackendLogin::SaslAuthzid => Handover::AuthPlain(Some(auth_plain(
                user.as_bytes(),
                backend.master_user.as_bytes(),
                backend.master_password.expose(),
            ))),
        };
        Ok(Self::with(backend, helo, handover))
    }

    /// Greeting, EHLO and STARTTLS only, then done: for health probes and `doctor`.
    pub(crate) fn probe(backend: &BackendConfig) -> Self {
        Self::with(backend, None, Handover::Probe)
    }

    fn with(backend: &BackendConfig, helo: Option<&str>, handover: Handover) -> Self {
        Self {
            phase: Phase::Greeting,
            lines: Lines::default(),
            reply: Reply::default(),
            out: None,
            ehlo: ehlo_command(helo),
            starttls: backend.tls == BackendTls::Starttls,
            handover,
            extensions: Vec::new(),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.lines.push(bytes);
    }

    /// TLS is up after STARTTLS: forget what was said in clear and greet again (RFC 3207
    /// §4.2).
    pub fn tls_started(&mut self) {
        if self.phase != Phase::AwaitTls {
            self.phase = Phase::Failed(LoginError::Protocol);
            return;
        }
        self.lines.clear();
        self.reply = Reply::default();
        self.extensions.clear();
        self.starttls = false;
        self.send_ehlo();
    }

    /// The next thing to do.
    pub fn step(&mut self) -> UpStep {
        loop {
            if let Some(bytes) = self.out.take() {
                return UpStep::Send(bytes);
            }
            match self.phase {
                Phase::Failed(e) => return UpStep::Fail(e),
                Phase::Finished | Phase::AwaitTls => {
                    return self.fail(LoginError::Protocol);
                }
                _ => {}
            }
            let line = match self.lines.next() {
                Line::Incomplete => return UpStep::NeedInput,
                Line::TooLong => return self.fail(LoginError::Protocol),
                Line::Complete(line) => line,
            };
            match self.reply_line(&line) {
                Err(e) => return self.fail(e),
                Ok(None) => {}
                Ok(Some((code, lines))) => {
                    // One reply per command: anything behind it was not asked for.
                    if self.lines.buffered() > 0 {
                        return self.fail(LoginError::Protocol);
                    }
                    if let Some(step) = self.on_reply(code, lines) {
                        return step;
                    }
                }
            }
        }
    }

    /// Bytes the backend sent after its last reply (always none: they are refused).
    pub fn take_remaining(&mut self) -> BytesMut {
        self.lines.take_remaining()
    }

    fn fail(&mut self, e: LoginError) -> UpStep {
        self.phase = Phase::Failed(e);
        self.out = None;
        UpStep::Fail(e)
    }

    fn send_ehlo(&mut self) {
        self.phase = Phase::Ehlo;
        self.out = Some(self.ehlo.clone());
    }

    /// Adds one line to the reply being read (RFC 5321 §4.2: `code-text` continues,
    /// `code text` or a bare code ends it); returns the reply once it is complete.
    fn reply_line(&mut self, line: &[u8]) -> Result<Option<(u16, Vec<String>)>, LoginError> {
        let (Some(digits), sep) = (line.get(..3), line.get(3)) else {
            return Err(LoginError::Protocol);
        };
        let code = std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or(LoginError::Protocol)?;
        if self.reply.code.is_some_and(|c| c != code) {
            return Err(LoginError::Protocol);
        }
        let last = match sep {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(LoginError::Protocol),
        };
        let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default())
            .trim()
            .to_owned();
        self.reply.bytes = self.reply.bytes.saturating_add(line.len());
        if self.reply.lines.len() >= MAX_REPLY_LINES || self.reply.bytes > MAX_REPLY_BYTES {
            return Err(LoginError::Protocol);
        }
        self.reply.code = Some(code);
        self.reply.lines.push(text);
        if !last {
            return Ok(None);
        }
        let reply = std::mem::take(&mut self.reply);
        Ok(Some((code, reply.lines)))
    }

    fn on_reply(&mut self, code: u16, lines: Vec<String>) -> Option<UpStep> {
        let refused = (400..600).contains(&code);
        match self.phase {
            Phase::Greeting => {
                if code == 220 {
                    self.send_ehlo();
                    return None;
                }
                Some(self.fail(if refused {
                    LoginError::Bye
                } else {
                    LoginError::Protocol
                }))
            }
            Phase::Ehlo => {
                if code != 250 {
                    return Some(self.fail(LoginError::Protocol));
                }
                // The first line names the server; the extensions follow (RFC 5321 §4.1.1.1).
                self.after_ehlo(lines.into_iter().skip(1).collect())
            }
            Phase::StartTls => {
                if code != 220 {
                    return Some(self.fail(LoginError::StartTlsRefused));
                }
                self.phase = Phase::AwaitTls;
                Some(UpStep::StartTls)
            }
            Phase::Xclient => {
                if code == 220 {
                    if let Handover::Xclient { done, .. } = &mut self.handover {
                        *done = true;
                    }
                    self.send_ehlo();
                    return None;
                }
                Some(self.fail(if refused {
                    LoginError::Rejected
                } else {
                    LoginError::Protocol
                }))
            }
            Phase::Auth => {
                if code == 235 {
                    self.phase = Phase::Finished;
                    return Some(UpStep::Done(std::mem::take(&mut self.extensions)));
                }
                // A 334 would ask for more: the credential never goes out twice.
                Some(self.fail(if refused {
                    LoginError::Rejected
                } else {
                    LoginError::Protocol
                }))
            }
            Phase::AwaitTls | Phase::Finished | Phase::Failed(_) => {
                Some(self.fail(LoginError::Protocol))
            }
        }
    }

    fn after_ehlo(&mut self, extensions: Vec<String>) -> Option<UpStep> {
        if self.starttls {
            if !extensions.iter().any(|e| keyword_is(e, "STARTTLS")) {
                return Some(self.fail(LoginError::NoStartTls));
            }
            self.phase = Phase::StartTls;
            self.out = Some(b"STARTTLS\r\n".to_vec());
            return None;
        }
        match &mut self.handover {
            Handover::Probe => {
                self.phase = Phase::Finished;
                Some(UpStep::Done(extensions))
            }
            Handover::Xclient { done: true, .. } => {
                self.phase = Phase::Finished;
                Some(UpStep::Done(extensions))
            }
            Handover::Xclient {
                user, client, helo, ..
            } => {
                let Some(attributes) = xclient_attributes(&extensions) else {
                    return Some(self.fail(LoginError::NoXclient));
                };
                let cmd = xclient_command(&attributes, user, *client, helo.as_deref());
                self.phase = Phase::Xclient;
                self.out = Some(cmd);
                None
            }
            Handover::AuthPlain(line) => {
                if !offers_auth_plain(&extensions) {
                    return Some(self.fail(LoginError::Protocol));
                }
                let Some(line) = line.take() else {
                    return Some(self.fail(LoginError::Protocol));
                };
                self.extensions = extensions;
                self.phase = Phase::Auth;
                self.out = Some(line.expose().to_vec());
                None
            }
        }
    }
}

/// `AUTH PLAIN <base64(authzid \0 authcid \0 password)>\r\n` (RFC 4954 §4, RFC 4616 §2),
/// built in a [`Secret`].
fn auth_plain(authzid: &[u8], authcid: &[u8], password: &[u8]) -> Secret {
    let response = super::plain_response(authzid, authcid, password);
    let mut line = Vec::with_capacity(response.len() + 13);
    line.extend_from_slice(b"AUTH PLAIN ");
    line.extend_from_slice(response.expose());
    line.extend_from_slice(b"\r\n");
    Secret::new(line)
}

/// `EHLO <name>\r\n`: the client's name when it is one token of visible ASCII (RFC 5321
/// §4.1.1.1), else [`FALLBACK_EHLO`].
fn ehlo_command(helo: Option<&str>) -> Vec<u8> {
    let name = helo
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or(FALLBACK_EHLO);
    format!("EHLO {name}\r\n").into_bytes()
}

/// The first word of an extension line, compared without case.
fn keyword_is(line: &str, keyword: &str) -> bool {
    line.split_ascii_whitespace()
        .next()
        .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
}

/// The parameters of the extension `keyword`, if the server lists it.
fn parameters<'a>(extensions: &'a [String], keyword: &str) -> Option<Vec<&'a str>> {
    extensions
        .iter()
        .find(|e| keyword_is(e, keyword))
        .map(|e| e.split_ascii_whitespace().skip(1).collect())
}

/// Whether the server takes `AUTH PLAIN` (RFC 4954 §3; also the older `AUTH=PLAIN` form).
pub(crate) fn offers_auth_plain(extensions: &[String]) -> bool {
    extensions.iter().any(|e| {
        let mut words = e.split_ascii_whitespace();
        let Some(first) = words.next() else {
            return false;
        };
        let first = first.to_ascii_uppercase();
        let mechanisms: Vec<&str> = match first.strip_prefix("AUTH=") {
            Some(m) => std::iter::once(m).chain(words).collect(),
            None if first == "AUTH" => words.collect(),
            None => return false,
        };
        mechanisms.iter().any(|m| m.eq_ignore_ascii_case("PLAIN"))
    })
}

/// The XCLIENT attributes the server takes, upper-cased, if it offers XCLIENT with the two the
/// handover needs (LOGIN and ADDR).
pub(crate) fn xclient_attributes(extensions: &[String]) -> Option<Vec<String>> {
    let attributes: Vec<String> = parameters(extensions, "XCLIENT")?
        .into_iter()
        .map(str::to_ascii_uppercase)
        .collect();
    let has = |a: &str| attributes.iter().any(|x| x == a);
    (has("LOGIN") && has("ADDR")).then_some(attributes)
}

/// `XCLIENT ADDR=… LOGIN=… [NAME=[UNAVAILABLE]] [PROTO=ESMTP] [HELO=…]\r\n`, the optional
/// attributes only when the server lists them (an attribute it does not know is a 501).
fn xclient_command(
    attributes: &[String],
    user: &str,
    client: IpAddr,
    helo: Option<&str>,
) -> Vec<u8> {
    let has = |a: &str| attributes.iter().any(|x| x == a);
    let addr = match client {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("IPV6:{a}"),
    };
    let mut cmd = format!("XCLIENT ADDR={} LOGIN={}", xtext(&addr), xtext(user));
    if has("NAME") {
        // The gateway does not look the client's name up: Postfix's "no name" value.
        cmd.push_str(" NAME=[UNAVAILABLE]");
    }
    if has("PROTO") {
        cmd.push_str(" PROTO=ESMTP");
    }
    if let Some(h) = helo.filter(|h| !h.is_empty() && has("HELO")) {
        cmd.push_str(" HELO=");
        cmd.push_str(&xtext(h));
    }
    cmd.push_str("\r\n");
    cmd.into_bytes()
}

/// RFC 3461 §4 xtext: `!`..`~` as themselves except `+` and `=`, every other byte as `+HH`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The backend's EHLO extensions as the client may see them: without AUTH (the client
/// authenticates to the gateway, not to the backend), STARTTLS (it describes the
/// gateway↔backend link), and XCLIENT / XFORWARD (they let a trusted host rewrite who the
/// client is).
pub fn client_extensions(extensions: &[String]) -> Vec<String> {
    extensions
        .iter()
        .filter(|e| {
            let Some(k) = e.split_ascii_whitespace().next() else {
                return false;
            };
            let k = k.to_ascii_uppercase();
            !(k == "AUTH"
                || k.starts_with("AUTH=")
                || k == "STARTTLS"
                || k == "XCLIENT"
                || k == "XFORWARD")
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
