//! Logging into a backend as the user, as a state machine without sockets.
//!
//! Flow: greeting (abort on PREAUTH or BYE: a backend that needs no login or refuses us is not
//! one we may relay to) → for `starttls`, CAPABILITY if the greeting had none, then STARTTLS
//! (abort if not offered) → optional `ID ("x-originating-ip" …)` → LOGIN `user<sep>master` or
//! AUTHENTICATE PLAIN with authzid = user → tagged OK → CAPABILITY if the OK carried none.
//! ID and the login go out together in one write (pipelined, RFC 9051 §5.5): the login does
//! not depend on ID's answer, and a round trip to the backend is saved on every login.
//! Commands are encoded with imap-codec; a literal it chooses (e.g. an 8-bit password) is sent
//! only after the backend's `+`. Backend text never reaches the client: errors are typed.

use std::collections::VecDeque;
use std::net::SocketAddr;

use imap_codec::decode::Decoder;
use imap_codec::encode::{Encoder, Fragment};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::{IString, NString, Tag};
use imap_codec::imap_types::response::{
    Capability, Code, Data, GreetingKind, Response, Status, StatusBody, StatusKind, Tagged,
};
use imap_codec::imap_types::secret::Secret as ImapSecret;
use imap_codec::imap_types::IntoStatic;
use imap_codec::{AuthenticateDataCodec, CommandCodec, GreetingCodec, ResponseCodec};

use crate::config::{BackendConfig, BackendLogin, BackendTls};
use crate::imap::framing::{Frame, FrameLimits, Framer, LineMode};
use crate::secret::Secret;

/// Why a backend login failed (a closed set: also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("backend greeted with PREAUTH")]
    Preauth,
    #[error("backend greeted with BYE")]
    Bye,
    #[error("backend does not offer STARTTLS")]
    NoStartTls,
    #[error("backend refused STARTTLS")]
    StartTlsRefused,
    #[error("backend rejected the master login")]
    Rejected,
    #[error("backend sent something unexpected")]
    Protocol,
    #[error("user name cannot be sent to this backend")]
    BadUser,
    /// SMTP `login: xclient`: the backend's EHLO has no XCLIENT with LOGIN and ADDR (Postfix
    /// offers it only to hosts in `smtpd_authorized_xclient_hosts`).
    #[error("backend does not offer XCLIENT to the gateway")]
    NoXclient,
}

impl LoginError {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginError::Preauth => "preauth",
            LoginError::Bye => "bye",
            LoginError::NoStartTls => "no_starttls",
            LoginError::StartTlsRefused => "starttls_refused",
            LoginError::Rejected => "rejected",
            LoginError::Protocol => "protocol",
            LoginError::BadUser => "bad_user",
            LoginError::NoXclient => "no_xclient",
        }
    }
}

#[derive(Debug)]
pub enum UpStep {
    Send(Vec<u8>),
    NeedInput,
    /// Upgrade the connection to TLS now, then call [`UpstreamLogin::tls_started`].
    StartTls,
    /// Logged in; the backend's capabilities (post-login).
    Done(Vec<String>),
    Fail(LoginError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    PreTlsCapability,
    StartTls,
    Id,
    Login,
    PostCapability,
    Finished,
}

pub struct UpstreamLogin {
    phase: Phase,
    framer: Framer,
    out: VecDeque<Vec<u8>>,
    /// Fragments waiting for the backend's `+` (literals, SASL response).
    pending: VecDeque<Vec<u8>>,
    caps: Vec<String>,
    tag_no: u32,
    current: Option<Tag<'static>>,
    /// ID's tag while its answer is awaited (the login is already on its way behind it).
    id_tag: Option<Tag<'static>>,
    starttls: bool,
    send_id: bool,
    login_cmd: Command<'static>,
    sasl_response: Option<Secret>,
    client: SocketAddr,
}

/// Refuses user names that could change the meaning of the login (invariant: a name with the
/// master separator, CR, LF, NUL or any control character never reaches a backend).
pub fn check_user(user: &str, login: &BackendLogin) -> Result<(), LoginError> {
    let control = user.chars().any(|c| c.is_control());
    let sep = match login {
        BackendLogin::MasterUser { separator } => user.contains(separator.as_str()),
        BackendLogin::SaslAuthzid | BackendLogin::Xclient => false,
    };
    if user.is_empty() || control || sep {
        return Err(LoginError::BadUser);
    }
    Ok(())
}

impl UpstreamLogin {
    pub fn new(
        backend: &BackendConfig,
        user: &str,
        client: SocketAddr,
    ) -> Result<Self, LoginError> {
        check_user(user, &backend.login)?;
        let (login_cmd, sasl_response) = match &backend.login {
            BackendLogin::MasterUser { separator } => {
                let name = format!("{user}{separator}{}", backend.master_user);
                let pw = String::from_utf8_lossy(backend.master_password.expose()).into_owned();
                let body = CommandBody::login(name, pw).map_err(|_| LoginError::BadUser)?;
                (
                    Command {
                        tag: tag(0),
                        body: body.into_static(),
                    },
                    None,
                )
            }
            // Config validation allows xclient for SMTP backends only.
            BackendLogin::Xclient => return Err(LoginError::Protocol),
            BackendLogin::SaslAuthzid => {
                let mut msg = Vec::with_capacity(
                    user.len() + backend.master_user.len() + backend.master_password.len() + 2,
                );
                msg.extend_from_slice(user.as_bytes());
                msg.push(0);
                msg.extend_from_slice(backend.master_user.as_bytes());
                msg.push(0);
                msg.extend_from_slice(backend.master_password.expose());
                let body = CommandBody::authenticate(AuthMechanism::Plain);
                (Command { tag: tag(0), body }, Some(Secret::new(msg)))
            }
        };
        Ok(Self {
            phase: Phase::Greeting,
            framer: Framer::new(
                FrameLimits {
                    line: 64 * 1024,
                    sasl_line: 64 * 1024,
                    literal: 64 * 1024,
                    message: 256 * 1024,
                },
                LineMode::Response,
            ),
            out: VecDeque::new(),
            pending: VecDeque::new(),
            caps: Vec::new(),
            tag_no: 0,
            current: None,
            id_tag: None,
            starttls: backend.tls == BackendTls::Starttls,
            send_id: backend.send_id,
            login_cmd,
            sasl_response,
            client,
        })
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// TLS is up after STARTTLS: forget what was said in clear (RFC 9051 §6.2.1).
    pub fn tls_started(&mut self) {
        self.framer.clear();
        self.caps.clear();
        self.after_tls();
    }

    fn next_tag(&mut self) -> Tag<'static> {
        self.tag_no += 1;
        tag(self.tag_no)
    }

    /// Queues a command: its first line now, literal fragments after each `+`.
    fn send(&mut self, mut cmd: Command<'static>) {
        let t = self.next_tag();
        cmd.tag = t.clone();
        self.current = Some(t);
        let mut first = Vec::new();
        let mut waiting = false;
        for frag in CommandCodec::default().encode(&cmd) {
            match frag {
                // A line after a literal is sent together with that literal.
                Fragment::Line { data } => match self.pending.back_mut() {
                    Some(last) if waiting => last.extend_from_slice(&data),
                    _ => first.extend_from_slice(&data),
                },
                Fragment::Literal { data, .. } => {
                    waiting = true;
                    self.pending.push_back(data);
                }
            }
        }
        self.out.push_back(first);
    }

    fn after_greeting(&mut self) {
        if self.starttls {
            if self.caps.is_empty() {
                self.phase = Phase::PreTlsCapability;
                self.send(Command {
                    tag: tag(0),
                    body: CommandBody::Capability,
                });
            } else {
                self.begin_starttls();
            }
        } else {
            self.after_tls();
        }
    }

    fn begin_starttls(&mut self) {
        if !self.caps.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS")) {
            self.phase = Phase::Finished;
            self.out.clear();
            return;
        }
        self.phase = Phase::StartTls;
        self.send(Command {
            tag: tag(0),
            body: CommandBody::StartTLS,
        });
    }

    fn after_tls(&mut self) {
        if self.send_id {
            let ip = self.client.ip().to_string();
            let port = self.client.port().to_string();
            let params = [("x-originating-ip", ip), ("x-originating-port", port)]
                .into_iter()
                .filter_map(|(k, v)| {
                    Some((
                        IString::try_from(k.to_owned()).ok()?,
                        NString(Some(IString::try_from(v).ok()?)),
                    ))
                })
                .collect();
            self.send(Command {
                tag: tag(0),
                body: CommandBody::Id {
                    parameters: Some(params),
                },
            });
            self.id_tag = self.current.clone();
            self.login();
            // Answers come in order: ID's first, then the login's.
            self.phase = Phase::Id;
        } else {
            self.login();
        }
    }

    fn login(&mut self) {
        self.phase = Phase::Login;
        self.caps.clear();
        let cmd = self.login_cmd.clone();
        self.send(cmd);
    }

    /// The next thing to do. Everything queued goes out as one write.
    pub fn step(&mut self) -> UpStep {
        loop {
            if let Some(mut bytes) = self.out.pop_front() {
                while let Some(more) = self.out.pop_front() {
                    bytes.extend_from_slice(&more);
                }
                return UpStep::Send(bytes);
            }
            if self.phase == Phase::Finished {
                return UpStep::Fail(LoginError::NoStartTls);
            }
            let msg = match self.framer.next_frame() {
                Frame::Incomplete => return UpStep::NeedInput,
                Frame::Message(m) => m,
                _ => return UpStep::Fail(LoginError::Protocol),
            };
            if let Some(step) = self.response(&msg) {
                return step;
            }
        }
    }

    fn response(&mut self, msg: &[u8]) -> Option<UpStep> {
        if self.phase == Phase::Greeting {
            let Ok((_, greeting)) = GreetingCodec::default().decode(msg) else {
                return Some(UpStep::Fail(LoginError::Protocol));
            };
            match greeting.kind {
                GreetingKind::PreAuth => return Some(UpStep::Fail(LoginError::Preauth)),
                GreetingKind::Bye => return Some(UpStep::Fail(LoginError::Bye)),
                GreetingKind::Ok => {}
            }
            // Only STARTTLS looks at the capabilities before login (the login's OK brings the
            // ones that count).
            if let (true, Some(Code::Capability(caps))) = (self.starttls, &greeting.code) {
                self.caps = names(caps.as_ref());
            }
            self.after_greeting();
            return None;
        }
        let Ok((_, resp)) = ResponseCodec::default().decode(msg) else {
            return Some(UpStep::Fail(LoginError::Protocol));
        };
        match resp {
            Response::CommandContinuationRequest(_) => {
                // Only our LOGIN literal or AUTHENTICATE may be continued: a `+` in any other
                // phase (e.g. to a cleartext CAPABILITY before STARTTLS, or before ID has been
                // answered) must never release the master credential.
                if self.phase != Phase::Login {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                if let Some(next) = self.pending.pop_front() {
                    self.out.push_back(next);
                } else if let Some(sasl) = self.sasl_response.take() {
                    let data = AuthenticateData::r#continue(sasl.expose().to_vec());
                    self.out
                        .push_back(AuthenticateDataCodec::default().encode(&data).dump());
                } else {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                None
            }
            Response::Data(Data::Capability(caps)) => {
                self.caps = names(caps.as_ref());
                None
            }
            Response::Status(Status::Bye(_)) => Some(UpStep::Fail(match self.phase {
                Phase::Login => LoginError::Rejected,
                _ => LoginError::Bye,
            })),
            Response::Status(Status::Tagged(Tagged { tag, body })) => {
                let expected = match self.phase {
                    Phase::Id => self.id_tag.as_ref(),
                    _ => self.current.as_ref(),
                };
                if Some(&tag) != expected {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                self.tagged(body)
            }
            // Other untagged data (e.g. `* ID`, `* OK`) is of no interest during login.
            _ => None,
        }
    }

    fn tagged(&mut self, body: StatusBody<'_>) -> Option<UpStep> {
        let ok = body.kind == StatusKind::Ok;
        match self.phase {
            Phase::PreTlsCapability => {
                if !ok {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                self.begin_starttls();
                None
            }
            Phase::StartTls => {
                if !ok {
                    return Some(UpStep::Fail(LoginError::StartTlsRefused));
                }
                // Bytes after the OK would be a STARTTLS injection from the backend side.
                if self.framer.buffered() > 0 {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                Some(UpStep::StartTls)
            }
            Phase::Id => {
                // Whatever the backend thinks of ID, the login sent behind it comes next.
                self.id_tag = None;
                self.phase = Phase::Login;
                None
            }
            Phase::Login => {
                if !ok {
                    return Some(UpStep::Fail(LoginError::Rejected));
                }
                self.sasl_response = None;
                if let Some(Code::Capability(caps)) = &body.code {
                    self.caps = names(caps.as_ref());
                }
                if self.caps.is_empty() {
                    self.phase = Phase::PostCapability;
                    self.send(Command {
                        tag: tag(0),
                        body: CommandBody::Capability,
                    });
                    return None;
                }
                self.phase = Phase::Finished;
                Some(UpStep::Done(std::mem::take(&mut self.caps)))
            }
            Phase::PostCapability => {
                if !ok || self.caps.is_empty() {
                    return Some(UpStep::Fail(LoginError::Protocol));
                }
                self.phase = Phase::Finished;
                Some(UpStep::Done(std::mem::take(&mut self.caps)))
            }
            Phase::Greeting | Phase::Finished => Some(UpStep::Fail(LoginError::Protocol)),
        }
    }

    /// Bytes the backend sent after its final OK (none expected; kept for the relay).
    pub fn take_remaining(&mut self) -> bytes::BytesMut {
        self.framer.take_remaining()
    }
}

fn tag(n: u32) -> Tag<'static> {
    Tag::try_from(format!("g{n}")).unwrap_or_else(|_| Tag::unvalidated("g"))
}

fn names(caps: &[Capability<'_>]) -> Vec<String> {
    caps.iter().map(|c| c.to_string()).collect()
}

/// The backend's capabilities as the client may see them: without STARTTLS, LOGINDISABLED and
/// AUTH=… (they describe the gateway↔backend link, not the client's session), and without
/// UNAUTHENTICATE (RFC 8437 §2: it returns the session to the not-authenticated state, where
/// the backend's own LOGIN would work with no second factor). The relay passes the command
/// itself unchanged, so `doctor` warns about a backend that offers it.
pub fn client_capabilities(backend_caps: &[String]) -> Vec<String> {
    backend_caps
        .iter()
        .filter(|c| {
            let u = c.to_ascii_uppercase();
            u != "STARTTLS"
                && u != "LOGINDISABLED"
                && u != "UNAUTHENTICATE"
                && !u.starts_with("AUTH=")
        })
        .cloned()
        .collect()
}

// Keep the unused-import lint quiet for the secret wrapper imap-types uses in LOGIN.
#[allow(dead_code)]
fn _uses(_: ImapSecret<()>) {}

#[cfg(test)]
mod tests;
