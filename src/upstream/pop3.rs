//! Logging into a POP3 backend as the user, as a state machine without sockets (the same shape
//! as [`UpstreamLogin`](super::login::UpstreamLogin)).
//!
//! Flow: the `+OK` greeting (RFC 1939 §4; `-ERR` is a refusal) → for `tls: starttls`, `STLS`
//! (RFC 2595 §4) → `+OK` → TLS; POP3 sends no new greeting after it, and nothing said in clear
//! is kept → the login:
//! - `login: master_user`: `USER <user><sep><master>` → `+OK` → `PASS <password>` → `+OK`
//!   (RFC 1939 §7; Dovecot takes `user*master` as a master-user login);
//! - `login: sasl_authzid`: `AUTH PLAIN <base64(user \0 master \0 password)>` (RFC 5034 §4,
//!   RFC 4616) → `+OK`. When the command with its initial response would pass the 255 octets
//!   RFC 2449 §4 allows a command line, `AUTH PLAIN` goes alone and the response follows the
//!   server's `+ ` (RFC 5034 §4).
//!
//! `-ERR` to the login is a refusal. The result is an empty list (POP3 has no capabilities to
//! pass on after login).
//!
//! Rules: one command at a time, so bytes the server sends past a reply are refused, and bytes
//! behind the `+OK` to STLS are never carried into TLS; a `+ ` continuation is taken only
//! while `AUTH PLAIN` waits for it, so the credential goes out once and only where it was
//! asked for. Lines are bounded at 64 KiB. Nothing the backend says reaches the client or a
//! log; failures are [`LoginError`]s.

use std::net::SocketAddr;

use bytes::BytesMut;

use super::lines::{Line, Lines};
use super::login::{check_user, LoginError, UpStep};
use crate::config::{BackendConfig, BackendLogin, BackendTls};
use crate::secret::Secret;

/// The longest command line, CRLF included (RFC 2449 §4).
const MAX_COMMAND: usize = 255;

enum Credential {
    /// Health probe and `doctor`: stop after the greeting (and STLS).
    Probe,
    /// `USER …\r\n` and the `PASS …\r\n` line, which carries the master password.
    UserPass { user: Vec<u8>, pass: Option<Secret> },
    /// The base64 PLAIN response; `inline`: it fits on the AUTH line.
    Plain {
        response: Option<Secret>,
        inline: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Stls,
    /// The driver is doing the TLS handshake.
    AwaitTls,
    User,
    Pass,
    /// `AUTH PLAIN` went alone: waiting for the server's `+ `.
    AuthContinue,
    Auth,
    /// Logged in (or probed): Done at the next step.
    Ready,
    /// Done was returned.
    Finished,
    Failed(LoginError),
}

/// A POP3 status line (RFC 1939 §3, RFC 5034 §4 for the continuation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Err,
    Continue,
}

/// The login of one POP3 session to the backend.
pub struct Pop3Login {
    phase: Phase,
    lines: Lines,
    out: Option<Vec<u8>>,
    /// STLS is still to be done.
    starttls: bool,
    credential: Credential,
}

impl Pop3Login {
    /// The login of `user` (normalised, as the backend knows it). `client` is not sent: POP3
    /// has no standard way to pass it, and Dovecot's `XCLIENT` for POP3 needs a trusted
    /// network the gateway cannot assume.
    pub fn new(
        backend: &BackendConfig,
        user: &str,
        client: SocketAddr,
    ) -> Result<Self, LoginError> {
        let _ = client;
        check_user(user, &backend.login)?;
        let password = backend.master_password.expose();
        // Config validation refuses such a password; a second lock, since it goes on a line.
        if password.iter().any(|b| matches!(b, b'\r' | b'\n')) {
            return Err(LoginError::Protocol);
        }
        let credential = match &backend.login {
            BackendLogin::MasterUser { separator } => {
                let user = format!("USER {user}{separator}{}\r\n", backend.master_user);
                let mut pass = Vec::with_capacity(password.len() + 7);
                pass.extend_from_slice(b"PASS ");
                pass.extend_from_slice(password);
                pass.extend_from_slice(b"\r\n");
                Credential::UserPass {
                    user: user.into_bytes(),
                    pass: Some(Secret::new(pass)),
                }
            }
            BackendLogin::SaslAuthzid => {
                let response = super::plain_response(
                    user.as_bytes(),
                    backend.master_user.as_bytes(),
                    password,
                );
                let inline = b"AUTH PLAIN ".len() + response.len() + 2 <= MAX_COMMAND;
                Credential::Plain {
                    response: Some(response),
                    inline,
                }
            }
            // Config validation allows xclient for SMTP backends only.
            BackendLogin::Xclient => return Err(LoginError::Protocol),
        };
        Ok(Self::with(backend, credential))
    }

    /// The greeting and STLS only, then done: for health probes and `doctor`.
    pub(crate) fn probe(backend: &BackendConfig) -> Self {
        Self::with(backend, Credential::Probe)
    }

    fn with(backend: &BackendConfig, credential: Credential) -> Self {
        Self {
            phase: Phase::Greeting,
            lines: Lines::default(),
            out: None,
            starttls: backend.tls == BackendTls::Starttls,
            credential,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.lines.push(bytes);
    }

    /// TLS is up after STLS: forget what was said in clear (RFC 2595 §4), then log in.
    pub fn tls_started(&mut self) {
        if self.phase != Phase::AwaitTls {
            self.phase = Phase::Failed(LoginError::Protocol);
            return;
        }
        self.lines.clear();
        self.starttls = false;
        // POP3 has no greeting after STLS: the login goes out now.
        if let Some(UpStep::Fail(e)) = self.login() {
            self.phase = Phase::Failed(e);
        }
    }

    /// The next thing to do.
    pub fn step(&mut self) -> UpStep {
        loop {
            if let Some(bytes) = self.out.take() {
                return UpStep::Send(bytes);
            }
            match self.phase {
                Phase::Failed(e) => return UpStep::Fail(e),
                Phase::Finished | Phase::AwaitTls => return self.fail(LoginError::Protocol),
                Phase::Ready => {
                    self.phase = Phase::Finished;
                    return UpStep::Done(Vec::new());
                }
                _ => {}
            }
            let status = match self.lines.next() {
                Line::Incomplete => return UpStep::NeedInput,
                Line::TooLong => return self.fail(LoginError::Protocol),
                Line::Complete(line) => status(&line),
            };
            let Some(status) = status else {
                return self.fail(LoginError::Protocol);
            };
            // One reply per command: anything behind it was not asked for.
            if self.lines.buffered() > 0 {
                return self.fail(LoginError::Protocol);
            }
            if let Some(step) = self.on_status(status) {
                return step;
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

    fn on_status(&mut self, status: Status) -> Option<UpStep> {
        match (self.phase, status) {
            (Phase::Greeting, Status::Ok) => {
                if self.starttls {
                    self.phase = Phase::Stls;
                    self.out = Some(b"STLS\r\n".to_vec());
                    return None;
                }
                self.login()
            }
            (Phase::Greeting, Status::Err) => Some(self.fail(LoginError::Bye)),
            (Phase::Stls, Status::Ok) => {
                self.phase = Phase::AwaitTls;
                Some(UpStep::StartTls)
            }
            (Phase::Stls, Status::Err) => Some(self.fail(LoginError::StartTlsRefused)),
            (Phase::User, Status::Ok) => {
                let Credential::UserPass { pass, .. } = &mut self.credential else {
                    return Some(self.fail(LoginError::Protocol));
                };
                let Some(pass) = pass.take() else {
                    return Some(self.fail(LoginError::Protocol));
                };
                self.phase = Phase::Pass;
                self.out = Some(pass.expose().to_vec());
                None
            }
            (Phase::AuthContinue, Status::Continue) => {
                let Credential::Plain { response, .. } = &mut self.credential else {
                    return Some(self.fail(LoginError::Protocol));
                };
                let Some(response) = response.take() else {
                    return Some(self.fail(LoginError::Protocol));
                };
                let mut line = Vec::with_capacity(response.len() + 2);
                line.extend_from_slice(response.expose());
                line.extend_from_slice(b"\r\n");
                self.phase = Phase::Auth;
                self.out = Some(line);
                None
            }
            (Phase::Pass | Phase::Auth, Status::Ok) => {
                self.phase = Phase::Ready;
                None
            }
            (Phase::User | Phase::Pass | Phase::AuthContinue | Phase::Auth, Status::Err) => {
                Some(self.fail(LoginError::Rejected))
            }
            // A `+ ` anywhere else (before TLS, to USER, after the response went out) and a
            // `+OK` where the response was awaited are not what was asked for.
            _ => Some(self.fail(LoginError::Protocol)),
        }
    }

    /// Sends the first login command (or, for a probe, finishes).
    fn login(&mut self) -> Option<UpStep> {
        match &mut self.credential {
            Credential::Probe => {
                self.phase = Phase::Ready;
                None
            }
            Credential::UserPass { user, .. } => {
                self.phase = Phase::User;
                self.out = Some(user.clone());
                None
            }
            Credential::Plain {
                response,
                inline: true,
            } => {
                let Some(response) = response.take() else {
                    return Some(self.fail(LoginError::Protocol));
                };
                let mut line = Vec::with_capacity(response.len() + 13);
                line.extend_from_slice(b"AUTH PLAIN ");
                line.extend_from_slice(response.expose());
                line.extend_from_slice(b"\r\n");
                self.phase = Phase::Auth;
                self.out = Some(line);
                None
            }
            Credential::Plain { inline: false, .. } => {
                self.phase = Phase::AuthContinue;
                self.out = Some(b"AUTH PLAIN\r\n".to_vec());
                None
            }
        }
    }
}

/// `+OK…`, `-ERR…` or the continuation `+ …` / `+` (RFC 1939 §3, RFC 5034 §4); `None` for
/// anything else.
fn status(line: &[u8]) -> Option<Status> {
    let word_ends = |rest: &[u8]| rest.is_empty() || rest.starts_with(b" ");
    if let Some(rest) = line.strip_prefix(b"+OK") {
        return word_ends(rest).then_some(Status::Ok);
    }
    if let Some(rest) = line.strip_prefix(b"-ERR") {
        return word_ends(rest).then_some(Status::Err);
    }
    if let Some(rest) = line.strip_prefix(b"+") {
        return word_ends(rest).then_some(Status::Continue);
    }
    None
}

#[cfg(test)]
mod tests;
