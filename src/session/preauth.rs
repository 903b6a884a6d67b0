//! The pre-authentication dialogue as a state machine without sockets: bytes in, steps out.
//!
//! RFC 9051 §6.1–6.2 (and RFC 3501) for the not-authenticated state. The policy is the one
//! `match` in [`PreAuth::command`]: CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN and
//! AUTHENTICATE PLAIN; everything else is `BAD`. Security rules enforced here:
//! - before TLS, no credential is accepted: LOGIN → `NO [PRIVACYREQUIRED]`, AUTHENTICATE → `NO`
//!   without a `+`, and no literal gets a `+` (invariant 1);
//! - STARTTLS drops every byte buffered before the handshake (invariant 2); a second one is BAD;
//! - a non-synchronising literal closes the connection; an oversized literal is refused without
//!   a `+`; lines and literals are bounded before buffering (invariant 7);
//! - a tag that is not valid is never echoed: the reply is an untagged `* BAD`;
//! - after `bad_commands_before_bye` BADs or `auth_failures_per_connection` failures: `* BYE`.

use std::borrow::Cow;

use bytes::BytesMut;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::Tag;
use imap_codec::imap_types::response::{Capability, StatusKind};
use imap_codec::imap_types::IntoStatic;
use imap_codec::{AuthenticateDataCodec, CommandCodec};

use crate::auth::sasl::decode_plain;
use crate::auth::{Credential, Mechanism};
use crate::imap::framing::{Frame, FrameLimits, Framer, LineMode, Literal};
use crate::imap::{self, RespCode};
use crate::login::ClientId;
use crate::secret::Secret;

/// Limits the state machine enforces itself (timeouts belong to the driver).
#[derive(Debug, Clone, Copy)]
pub struct PreAuthLimits {
    pub line_bytes: usize,
    pub literal_bytes: usize,
    pub sasl_bytes: usize,
    pub bad_commands_before_bye: u32,
    pub auth_failures_per_connection: u32,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Read more bytes and call [`PreAuth::feed`].
    NeedInput,
    /// Start the TLS handshake now (the OK was already sent), then call
    /// [`PreAuth::tls_started`].
    StartTls,
    /// Check this login; then call [`PreAuth::auth_failed`], [`PreAuth::auth_unavailable`],
    /// [`PreAuth::too_many_sessions`] or [`PreAuth::auth_succeeded`].
    Authenticate(LoginRequest),
    /// Close the connection (after writing everything sent so far).
    Close,
}

/// The RFC 7628 §3.2.2 error challenges (and XOAUTH2's equivalent), encoded once per process
/// from the issuers' discovery URL and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthChallenges {
    xoauth2: Vec<u8>,
    oauthbearer: Vec<u8>,
}

impl OAuthChallenges {
    /// `discovery`: the OpenID configuration URL for OAUTHBEARER clients; `scope`: the scopes
    /// a token needs.
    pub fn new(discovery: Option<&str>, scope: &str) -> Self {
        let challenge = |status: &str, discovery: Option<&str>| {
            let mut v = serde_json::Map::new();
            v.insert("status".into(), status.into());
            v.insert("schemes".into(), "bearer".into());
            v.insert("scope".into(), scope.into());
            if let Some(c) = discovery {
                v.insert("openid-configuration".into(), c.into());
            }
            serde_json::Value::Object(v).to_string().into_bytes()
        };
        Self {
            xoauth2: challenge("401", None),
            oauthbearer: challenge("invalid_token", discovery),
        }
    }

    /// The challenge (JSON, before base64) a refused token of `mechanism` is answered with.
    pub(crate) fn for_mechanism(&self, mechanism: Mechanism) -> &[u8] {
        if mechanism == Mechanism::OAuthBearer {
            &self.oauthbearer
        } else {
            &self.xoauth2
        }
    }
}

/// Why a login did not succeed, as the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Any refused or unchecked credential: one generic answer (invariant 5).
    Failed,
    /// The credential was good but no backend session could be made.
    Unavailable,
    /// The user has too many sessions.
    TooManySessions,
}

/// A login to check.
#[derive(Debug)]
pub struct LoginRequest {
    pub tag: Tag<'static>,
    pub mechanism: Mechanism,
    pub credential: Credential,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Ready,
    /// AUTHENTICATE sent `+`; the next line is the client's initial response.
    Sasl(Tag<'static>, Mechanism),
    /// A token was refused and the error challenge sent (RFC 7628 §3.2.2); the next line must
    /// be the client's dummy response, then comes the NO.
    OAuthError(Tag<'static>),
    /// A login is being checked; no input is processed.
    Authenticating,
    /// STARTTLS was accepted; the handshake is due.
    StartingTls,
    Done,
}

pub struct PreAuth {
    limits: PreAuthLimits,
    /// This listener offers STARTTLS (143-style).
    starttls_listener: bool,
    tls: bool,
    /// Token mechanisms (XOAUTH2, OAUTHBEARER) are offered.
    oauth: bool,
    /// Their error challenges (a default one when only `with_oauth` was called).
    challenges: Option<std::sync::Arc<OAuthChallenges>>,
    /// Sent before every failed password login's answer (sign-in approval).
    login_alert: Option<std::sync::Arc<[u8]>>,
    state: State,
    framer: Framer,
    out: Vec<Vec<u8>>,
    close_after_out: bool,
    bad: u32,
    failures: u32,
    commands: u32,
    /// The `name` and `version` of the client's `ID`, for the audit line.
    client_id: ClientId,
}

/// Commands one connection may send before authenticating (a client needs a handful).
pub const MAX_PREAUTH_COMMANDS: u32 = 100;

impl PreAuth {
    pub fn new(limits: PreAuthLimits, starttls_listener: bool, tls: bool) -> Self {
        let framer = Framer::new(
            FrameLimits {
                line: limits.line_bytes,
                sasl_line: limits.sasl_bytes,
                literal: limits.literal_bytes,
                message: limits.sasl_bytes + limits.literal_bytes,
            },
            LineMode::Command,
        );
        Self {
            limits,
            starttls_listener,
            tls,
            state: State::Ready,
            framer,
            out: Vec::new(),
            close_after_out: false,
            bad: 0,
            failures: 0,
            commands: 0,
            client_id: ClientId::default(),
            oauth: false,
            challenges: None,
            login_alert: None,
        }
    }

    /// Offers XOAUTH2 and OAUTHBEARER after TLS.
    pub fn with_oauth(mut self, on: bool) -> Self {
        self.oauth = on;
        self
    }

    /// Sends `alert` (a `* NO [ALERT]` line) before the answer to every failed password
    /// login, whatever failed (sign-in approval: it points at the portal, and says nothing
    /// about whether the user or the password was right).
    pub fn with_login_alert(mut self, alert: Option<std::sync::Arc<[u8]>>) -> Self {
        self.login_alert = alert;
        self
    }

    /// Offers XOAUTH2 and OAUTHBEARER after TLS when `challenges` is given, and answers a
    /// refused token with them.
    pub fn with_oauth_challenges(
        mut self,
        challenges: Option<std::sync::Arc<OAuthChallenges>>,
    ) -> Self {
        self.oauth = challenges.is_some();
        self.challenges = challenges;
        self
    }

    /// The answer to a login that did not succeed: `NO [AUTHENTICATIONFAILED]` (a token
    /// mechanism gets the error challenge first), `NO [UNAVAILABLE]` or `NO [LIMIT]`.
    pub fn login_refused(&mut self, tag: &Tag<'static>, mechanism: Mechanism, why: Refused) {
        match why {
            Refused::Failed if mechanism.is_oauth() => {
                let challenge = self
                    .challenges
                    .as_ref()
                    .map(|c| c.for_mechanism(mechanism).to_vec())
                    .unwrap_or_else(|| {
                        OAuthChallenges::new(None, "")
                            .for_mechanism(mechanism)
                            .to_vec()
                    });
                self.oauth_failed(tag, &challenge);
            }
            Refused::Failed => {
                if let Some(alert) = &self.login_alert {
                    self.out.push(alert.to_vec());
                }
                self.auth_failed(tag)
            }
            Refused::Unavailable => self.auth_unavailable(tag),
            Refused::TooManySessions => self.too_many_sessions(tag),
        }
    }

    /// The capabilities for the current state (RFC 9051 §6.2.1, RFC 4959, RFC 2971).
    pub fn capabilities(&self) -> Vec<Capability<'static>> {
        if self.tls && self.oauth {
            imap::capabilities([
                "IMAP4rev1",
                "SASL-IR",
                "ID",
                "AUTH=PLAIN",
                "AUTH=XOAUTH2",
                "AUTH=OAUTHBEARER",
            ])
        } else if self.tls {
            imap::capabilities(["IMAP4rev1", "SASL-IR", "ID", "AUTH=PLAIN"])
        } else {
            imap::capabilities(["IMAP4rev1", "STARTTLS", "LOGINDISABLED"])
        }
    }

    /// `* OK [CAPABILITY …] ready`: one of three fixed lines, encoded once per process.
    pub fn greeting(&self) -> &'static [u8] {
        use std::sync::OnceLock;
        static WITH_OAUTH: OnceLock<Vec<u8>> = OnceLock::new();
        static TLS: OnceLock<Vec<u8>> = OnceLock::new();
        static BEFORE_TLS: OnceLock<Vec<u8>> = OnceLock::new();
        let line = match (self.tls, self.oauth) {
            (true, true) => &WITH_OAUTH,
            (true, false) => &TLS,
            (false, _) => &BEFORE_TLS,
        };
        line.get_or_init(|| imap::greeting(&self.capabilities()))
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Bytes received from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// Bytes received but not processed (bounded by one read).
    pub fn buffered(&self) -> usize {
        self.framer.buffered()
    }

    /// The TLS handshake completed: drop anything buffered before it (CVE-2011-0411).
    pub fn tls_started(&mut self) {
        self.framer.clear();
        // An ID sent in the clear could have been injected by anyone on the path.
        self.client_id = ClientId::default();
        self.tls = true;
        self.state = State::Ready;
    }

    /// What the client's `ID` (sent over TLS, before logging in) said about it.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// Login refused: one generic reply, and BYE after too many.
    pub fn auth_failed(&mut self, tag: &Tag<'_>) {
        self.failures += 1;
        self.refuse_login(tag, RespCode::AuthenticationFailed, "Authentication failed");
        if self.failures >= self.limits.auth_failures_per_connection {
            self.bye(imap::bye(None, "Too many authentication failures"));
        }
    }

    /// The credential was fine but no backend session could be made.
    pub fn auth_unavailable(&mut self, tag: &Tag<'_>) {
        self.refuse_login(
            tag,
            RespCode::Unavailable,
            "Service temporarily unavailable",
        );
    }

    /// The user has too many relayed sessions.
    pub fn too_many_sessions(&mut self, tag: &Tag<'_>) {
        self.refuse_login(tag, RespCode::Limit, "Too many sessions for this user");
    }

    /// Login done: the tagged OK with the backend's capabilities, and the bytes the client
    /// pipelined behind its login, to forward in order (invariant 3).
    pub fn auth_succeeded(mut self, tag: &Tag<'_>, ok: &imap::LoginOk) -> (Vec<u8>, BytesMut) {
        (ok.for_tag(tag), self.framer.take_remaining())
    }

    /// A `* BYE` for shutdown or timeouts; the session ends.
    pub fn bye_now(&mut self, text: &'static str) -> Vec<u8> {
        self.state = State::Done;
        imap::bye(None, text)
    }

    /// A tagged `NO`: the command is refused, the session goes on.
    fn no(&mut self, tag: &Tag<'_>, code: Option<RespCode>, text: &'static str) {
        self.reply(imap::tagged(tag, StatusKind::No, code, text));
    }

    /// A refused login's `NO [code]`; the session is ready for another command.
    fn refuse_login(&mut self, tag: &Tag<'_>, code: RespCode, text: &'static str) {
        self.no(tag, Some(code), text);
        self.state = State::Ready;
    }

    fn reply(&mut self, bytes: Vec<u8>) {
        self.out.push(bytes);
    }

    fn bye(&mut self, bytes: Vec<u8>) {
        self.out.push(bytes);
        self.close_after_out = true;
        self.state = State::Done;
    }

    fn bad(&mut self, tag: Option<&Tag<'_>>, code: Option<RespCode>, text: &'static str) {
        self.bad += 1;
        let line = match tag {
            Some(t) => imap::tagged(t, StatusKind::Bad, code, text),
            None => imap::untagged_bad(code, text),
        };
        self.reply(line);
        if self.bad >= self.limits.bad_commands_before_bye {
            self.bye(imap::bye(None, "Too many invalid commands"));
        }
    }

    /// The next thing to do.
    pub fn step(&mut self) -> Step {
        loop {
            if !self.out.is_empty() {
                return Step::Send(self.out.drain(..).flatten().collect());
            }
            match self.state {
                State::Done => return Step::Close,
                State::Authenticating => return Step::NeedInput,
                State::StartingTls => return Step::StartTls,
                State::Ready | State::Sasl(..) | State::OAuthError(_) => {}
            }
            if self.close_after_out {
                return Step::Close;
            }
            match self.framer.next_frame() {
                Frame::Incomplete => return Step::NeedInput,
                Frame::LineTooLong => self.bye(imap::bye(Some(RespCode::TooBig), "Line too long")),
                Frame::MessageTooLong => {
                    self.bye(imap::bye(Some(RespCode::TooBig), "Command too long"))
                }
                Frame::LiteralAnnounced { literal, partial } => self.literal(literal, &partial),
                Frame::Message(mut msg) => {
                    let step = self.message(&msg);
                    zeroize::Zeroize::zeroize(&mut msg);
                    if let Some(step) = step {
                        return step;
                    }
                }
            }
        }
    }

    fn literal(&mut self, literal: Literal, partial: &[u8]) {
        let tag = leading_tag(partial);
        if let State::Sasl(auth_tag, _) | State::OAuthError(auth_tag) = self.state.clone() {
            // A SASL response is one base64 line; a literal there answers the AUTHENTICATE
            // (by its own tag) and never lets the literal's bytes through as commands.
            self.framer.reject_message();
            self.framer.set_mode(LineMode::Command);
            self.state = State::Ready;
            if matches!(literal, Literal::NonSync(_)) {
                self.bye(imap::bye(
                    None,
                    "Non-synchronizing literals are not allowed before authentication",
                ));
                return;
            }
            self.bad(Some(&auth_tag), None, "Invalid SASL response");
            return;
        }
        match literal {
            Literal::NonSync(_) => {
                self.bye(imap::bye(
                    None,
                    "Non-synchronizing literals are not allowed before authentication",
                ));
            }
            Literal::Sync(_) if !self.tls => {
                self.framer.reject_message();
                self.bad += 1;
                let reply = match &tag {
                    Some(t) => imap::tagged(
                        t,
                        StatusKind::No,
                        Some(RespCode::PrivacyRequired),
                        "TLS required",
                    ),
                    None => imap::untagged_bad(Some(RespCode::PrivacyRequired), "TLS required"),
                };
                self.reply(reply);
                if self.bad >= self.limits.bad_commands_before_bye {
                    self.bye(imap::bye(None, "Too many invalid commands"));
                }
            }
            Literal::Sync(n) if n > self.limits.literal_bytes as u64 => {
                self.framer.reject_message();
                self.bad(tag.as_ref(), Some(RespCode::TooBig), "Literal too large");
            }
            Literal::Sync(_) => {
                self.framer.accept_literal(literal);
                self.reply(imap::continuation("Ready"));
            }
        }
    }

    /// Handles one complete message; returns a step when the driver must act.
    fn message(&mut self, msg: &[u8]) -> Option<Step> {
        self.commands += 1;
        if self.commands > MAX_PREAUTH_COMMANDS {
            self.bye(imap::bye(None, "Too many commands"));
            return None;
        }
        if let State::Sasl(tag, mechanism) = self.state.clone() {
            self.framer.set_mode(LineMode::Command);
            return self.sasl_response(tag, mechanism, msg);
        }
        if let State::OAuthError(tag) = self.state.clone() {
            self.framer.set_mode(LineMode::Command);
            self.oauth_dummy_response(&tag, msg);
            return None;
        }
        let decoded = CommandCodec::default().decode(msg);
        match decoded {
            Ok((b"", cmd)) => self.command(cmd),
            _ => {
                let tag = leading_tag(msg);
                self.bad(tag.as_ref(), None, "Invalid command");
                None
            }
        }
    }

    /// The pre-auth policy: one exhaustive decision per command.
    fn command(&mut self, cmd: Command<'_>) -> Option<Step> {
        let tag = cmd.tag.into_static();
        match cmd.body {
            CommandBody::Capability => {
                self.reply(imap::capability_data(&self.capabilities()));
                self.reply(imap::tagged(
                    &tag,
                    StatusKind::Ok,
                    None,
                    "CAPABILITY completed",
                ));
            }
            CommandBody::Noop => {
                self.reply(imap::tagged(&tag, StatusKind::Ok, None, "NOOP completed"))
            }
            CommandBody::Logout => {
                self.reply(imap::bye(None, "Logging out"));
                self.reply(imap::tagged(&tag, StatusKind::Ok, None, "LOGOUT completed"));
                self.close_after_out = true;
                self.state = State::Done;
            }
            CommandBody::Id { parameters } => {
                // Only name and version, sanitised, are kept (for the audit line).
                self.client_id = ClientId::from_params(
                    parameters
                        .iter()
                        .flatten()
                        .map(|(k, v)| (k.as_ref(), v.0.as_ref().map(|v| v.as_ref()))),
                );
                // RFC 2971: answering NIL reveals no product or version.
                self.reply(b"* ID NIL\r\n".to_vec());
                self.reply(imap::tagged(&tag, StatusKind::Ok, None, "ID completed"));
            }
            CommandBody::StartTLS => {
                if self.starttls_listener && !self.tls {
                    self.reply(imap::tagged(
                        &tag,
                        StatusKind::Ok,
                        None,
                        "Begin TLS negotiation now",
                    ));
                    // Nothing buffered so far may be read after the handshake.
                    self.framer.clear();
                    self.state = State::StartingTls;
                } else {
                    self.bad(Some(&tag), None, "TLS is already active");
                }
            }
            CommandBody::Login { username, password } => {
                if !self.tls {
                    self.no(&tag, Some(RespCode::PrivacyRequired), "TLS required");
                    return None;
                }
                let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                let password = Secret::from_slice(password.declassify().as_ref());
                return Some(self.authenticate(
                    tag,
                    Mechanism::Login,
                    Credential::Password { user, password },
                ));
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.tls {
                    self.no(&tag, Some(RespCode::PrivacyRequired), "TLS required");
                    return None;
                }
                let mech = match mechanism {
                    AuthMechanism::Plain => Some(Mechanism::Plain),
                    AuthMechanism::XOAuth2 if self.oauth => Some(Mechanism::XOAuth2),
                    AuthMechanism::OAuthBearer if self.oauth => Some(Mechanism::OAuthBearer),
                    _ => None,
                };
                let Some(mech) = mech else {
                    self.no(&tag, None, "Unsupported mechanism");
                    return None;
                };
                match initial_response {
                    Some(ir) => {
                        let data: Cow<'_, [u8]> = ir.declassify().clone();
                        return Some(self.sasl_credential(tag, mech, &data));
                    }
                    None => {
                        self.reply(imap::sasl_challenge(b""));
                        self.framer.set_mode(LineMode::Sasl);
                        self.state = State::Sasl(tag, mech);
                    }
                }
            }
            _ => self.bad(
                Some(&tag),
                None,
                "Command not allowed before authentication",
            ),
        }
        None
    }

    fn sasl_response(
        &mut self,
        tag: Tag<'static>,
        mechanism: Mechanism,
        msg: &[u8],
    ) -> Option<Step> {
        self.state = State::Ready;
        match AuthenticateDataCodec::default().decode(msg) {
            Ok((b"", AuthenticateData::Continue(data))) => {
                let bytes = zeroize::Zeroizing::new(data.declassify().to_vec());
                Some(self.sasl_credential(tag, mechanism, &bytes))
            }
            Ok((b"", AuthenticateData::Cancel)) => {
                self.reply(imap::tagged(
                    &tag,
                    StatusKind::Bad,
                    None,
                    "Authentication cancelled",
                ));
                None
            }
            _ => {
                self.bad(Some(&tag), None, "Invalid SASL response");
                None
            }
        }
    }

    /// The client's answer to the RFC 7628 error challenge: `AQ==` (OAUTHBEARER) or an empty
    /// line (XOAUTH2) ends the exchange with the NO; anything else is a protocol error.
    fn oauth_dummy_response(&mut self, tag: &Tag<'static>, msg: &[u8]) {
        self.state = State::Ready;
        match AuthenticateDataCodec::default().decode(msg) {
            Ok((b"", AuthenticateData::Continue(data)))
                if matches!(data.declassify().as_ref(), b"" | b"\x01") =>
            {
                self.auth_failed(tag);
            }
            _ => self.bad(Some(tag), None, "Invalid SASL response"),
        }
    }

    /// A token was refused: send the error challenge (floor already served by the driver).
    pub fn oauth_failed(&mut self, tag: &Tag<'static>, challenge: &[u8]) {
        self.reply(imap::sasl_challenge(challenge));
        self.framer.set_mode(LineMode::Sasl);
        self.state = State::OAuthError(tag.clone());
    }

    fn sasl_credential(&mut self, tag: Tag<'static>, mechanism: Mechanism, data: &[u8]) -> Step {
        let credential = match mechanism {
            Mechanism::Plain | Mechanism::Login => return self.plain(tag, data),
            Mechanism::XOAuth2 => crate::auth::sasl::decode_xoauth2(data),
            Mechanism::OAuthBearer => crate::auth::sasl::decode_oauthbearer(data),
        };
        let credential = match credential {
            Ok(b) => Credential::Bearer {
                user: b.user,
                token: b.token,
            },
            Err(e) => Credential::MalformedBearer(e),
        };
        self.authenticate(tag, mechanism, credential)
    }

    fn plain(&mut self, tag: Tag<'static>, data: &[u8]) -> Step {
        let credential = match decode_plain(data) {
            Ok(p) => Credential::Password {
                user: p.user,
                password: p.password,
            },
            Err(e) => Credential::Malformed(e),
        };
        self.authenticate(tag, Mechanism::Plain, credential)
    }

    fn authenticate(
        &mut self,
        tag: Tag<'static>,
        mechanism: Mechanism,
        credential: Credential,
    ) -> Step {
        self.state = State::Authenticating;
        Step::Authenticate(LoginRequest {
            tag,
            mechanism,
            credential,
        })
    }
}

/// The tag at the start of a message, if it is a valid one (never echo anything else).
fn leading_tag(msg: &[u8]) -> Option<Tag<'static>> {
    let first = msg
        .split(|b| *b == b' ' || *b == b'\r' || *b == b'\n')
        .next()?;
    Tag::try_from(first.to_vec()).ok()
}

#[cfg(test)]
mod tests;
