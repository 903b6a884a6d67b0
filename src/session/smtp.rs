//! SMTP submission's front (RFC 6409): the gateway's own greeting, EHLO, STARTTLS and AUTH as a
//! state machine without sockets (bytes in, steps out), behind the [`Front`] every protocol's
//! driver uses. After a successful AUTH the driver relays to the backend's submission session.
//!
//! The dialogue (RFC 5321 §4.1, replies with RFC 2034 enhanced status codes):
//! - greeting `220 <hostname> ESMTP`: the gateway's own name, never a backend banner;
//! - commands are lines ending in CRLF (a bare LF is accepted), verbs case-insensitive
//!   (RFC 5321 §2.4); pipelined commands are answered one after another, in order;
//! - before authentication only EHLO, HELO, STARTTLS, AUTH, NOOP, RSET and QUIT; the mail
//!   transaction and every other verb SMTP knows get `530 5.7.0 Authentication required`
//!   (RFC 4954 §6), or, before TLS on a STARTTLS listener, `530 5.7.0 Must issue a STARTTLS
//!   command first` (RFC 3207 §4); an unknown verb gets `500 5.5.2`;
//! - EHLO answers with the gateway's extensions: before TLS only `ENHANCEDSTATUSCODES` and
//!   `STARTTLS` (nothing that suggests AUTH); after TLS the backend's service extensions
//!   (`FrontConfig::smtp_extensions`, so SIZE, PIPELINING, 8BITMIME, SMTPUTF8, CHUNKING, DSN
//!   hold for the relayed session) without the ones the gateway withholds (see
//!   [`WITHHELD_EXTENSIONS`]), plus `AUTH PLAIN LOGIN` (and `XOAUTH2 OAUTHBEARER` when token
//!   issuers are configured).
//!
//! Security rules enforced here (DESIGN.md's invariants, per protocol):
//! - no credential before TLS: AUTH before TLS is a `530` and never a `334` (invariant 1);
//! - STARTTLS (RFC 3207 §4.2): every byte buffered behind the STARTTLS line is dropped, and
//!   after the handshake the EHLO name is forgotten and the client must EHLO again
//!   (invariant 2, the CVE-2011-0411 family);
//! - a command line is bounded by `limits.line_bytes` and an AUTH line or SASL response
//!   (RFC 4954 §4) by `limits.sasl_bytes`, checked before more bytes are read: a longer line
//!   gets `500 5.5.6` and the connection closes (invariant 7);
//! - base64 that does not decode is `501 5.5.2` and never reaches the credential check; a
//!   PLAIN or token message that decodes but is malformed does reach it, so that it fails like
//!   any other credential, after the floor (invariant 5);
//! - every refused password login gets the same `535 5.7.8`; a refused token first gets the
//!   RFC 7628 §3.2.2 error challenge, then the `535` (invariant 5);
//! - bytes pipelined behind AUTH are not read while the login is checked; on success they are
//!   handed to the driver unchanged, in order (invariant 3);
//! - each 5xx to a command (syntax, unknown, refused, bad base64; not the `535`, not a
//!   cancelled AUTH, not AUTH refused before TLS) counts as an error; at `limits.bad_commands_before_bye` errors,
//!   `limits.auth_failures_per_connection` failed logins or [`MAX_PREAUTH_COMMANDS`] lines the
//!   front answers the last command, then says `421` and closes (RFC 5321 §3.8);
//! - the client's words are never echoed: replies are fixed texts and the operator's
//!   host name; the EHLO name (sanitised) only reaches the audit line and the backend;
//! - SASL payloads go straight into [`Secret`]; the line and decode buffers are zeroized.

use std::sync::Arc;

use base64::Engine as _;
use bytes::BytesMut;
use zeroize::{Zeroize, Zeroizing};

use super::front::{Bye, Front, FrontConfig, Login, OAuthChallenges, PreAuthLimits};
use super::front::{Refused, Step, Welcome};
use crate::auth::sasl::{decode_oauthbearer, decode_plain, decode_xoauth2, PlainError};
use crate::auth::{Credential, Mechanism};
use crate::login::ClientId;
use crate::secret::Secret;
use replies::{
    failed_reply, AUTH_FAILED, AUTH_OK, AUTH_REQUIRED, AUTH_SYNTAX, BAD_BASE64, BYE, CANCELLED,
    EHLO_FIRST, EHLO_SYNTAX, EMPTY_CHALLENGE, HELO_SYNTAX, LINE_TOO_LONG, LOGIN_PASSWORD_PROMPT,
    LOGIN_USER_PROMPT, NO_STARTTLS, OK, READY_FOR_TLS, SASL_LINE_TOO_LONG, STARTTLS_FIRST,
    STARTTLS_SYNTAX, TEMPORARY_FAILURE, TLS_ACTIVE, TOO_MANY_SESSIONS, UNKNOWN_MECHANISM,
    UNRECOGNIZED,
};

mod replies;
pub use replies::WITHHELD_EXTENSIONS;

/// Lines (commands and SASL responses) one connection may send before authenticating.
pub const MAX_PREAUTH_COMMANDS: u32 = super::preauth::MAX_PREAUTH_COMMANDS;

/// The longest EHLO/HELO argument accepted (a domain is at most 255 octets, RFC 5321 §4.5.3.1.2).
pub const MAX_HELO_CHARS: usize = 255;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug)]
enum State {
    /// Waiting for a command.
    Command,
    /// `334 ` was sent: the next line is the client's response for PLAIN, XOAUTH2 or
    /// OAUTHBEARER.
    Response(Mechanism),
    /// AUTH LOGIN asked for the user name.
    LoginUser,
    /// AUTH LOGIN asked for the password; the user name as decoded (or why it is unusable).
    LoginPassword(Result<String, PlainError>),
    /// A token was refused and the error challenge sent (RFC 7628 §3.2.2): the client's next
    /// line, whatever it is, ends the exchange with the `535`.
    OAuthError,
    /// A login is being checked: no input is processed until the driver answers.
    Authenticating(Mechanism),
    /// STARTTLS was accepted: the handshake is due.
    StartingTls,
    /// The last reply is written, then the connection closes.
    Done,
}

/// One step of line framing.
enum Line {
    Incomplete,
    TooLong,
    /// A whole line without its CRLF (or LF); wiped when dropped.
    Complete(Zeroizing<Vec<u8>>),
}

/// The verbs the pre-auth policy tells apart (RFC 5321 §4.1, RFC 3207, RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Noop,
    Rset,
    Quit,
    /// An SMTP command that needs a logged-in session (the mail transaction and the rest).
    AfterAuth,
    Unknown,
}

impl Verb {
    fn parse(word: &[u8]) -> Verb {
        const AFTER_AUTH: [&str; 16] = [
            "MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "ETRN", "BURL", "XCLIENT", "XFORWARD",
            "HELP", "TURN", "ATRN", "SEND", "SOML", "SAML",
        ];
        let is = |v: &str| word.eq_ignore_ascii_case(v.as_bytes());
        if is("EHLO") {
            Verb::Ehlo
        } else if is("HELO") {
            Verb::Helo
        } else if is("STARTTLS") {
            Verb::StartTls
        } else if is("AUTH") {
            Verb::Auth
        } else if is("NOOP") {
            Verb::Noop
        } else if is("RSET") {
            Verb::Rset
        } else if is("QUIT") {
            Verb::Quit
        } else if AFTER_AUTH.iter().any(|v| is(v)) {
            Verb::AfterAuth
        } else {
            Verb::Unknown
        }
    }
}

/// The SMTP submission pre-auth dialogue of one connection.
pub struct SmtpFront {
    limits: PreAuthLimits,
    /// This listener offers STARTTLS (587-style).
    starttls_listener: bool,
    tls: bool,
    /// Token mechanisms are offered: their error challenges.
    oauth: Option<Arc<OAuthChallenges>>,
    /// The answer to a failed password login (the `535`, with the operator's alert if any).
    failed_reply: Vec<u8>,
    /// The gateway's host name, reduced to printable ASCII without spaces.
    hostname: String,
    /// The backend's service extensions (filtered when the EHLO reply is built).
    extensions: Arc<[String]>,
    /// Received bytes not yet processed; always starts at a line's beginning.
    buf: BytesMut,
    /// How much of `buf` is known to hold no LF.
    scanned: usize,
    state: State,
    out: Vec<u8>,
    bad: u32,
    failures: u32,
    commands: u32,
    /// The client's EHLO/HELO name, sanitised.
    helo: Option<String>,
    /// The same name as the audit line's client name.
    client_id: ClientId,
}

impl SmtpFront {
    /// `tls`: the connection is already TLS (implicit-TLS listener, 465-style).
    pub fn new(cfg: &FrontConfig, tls: bool) -> Self {
        let hostname: String = cfg
            .hostname
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .collect();
        let hostname = if hostname.is_empty() {
            "localhost".to_owned()
        } else {
            hostname
        };
        Self {
            limits: cfg.limits,
            starttls_listener: cfg.starttls_listener,
            tls,
            oauth: cfg.oauth.clone(),
            failed_reply: failed_reply(cfg.login_alert.as_deref()),
            hostname,
            extensions: cfg.smtp_extensions.clone(),
            buf: BytesMut::new(),
            scanned: 0,
            state: State::Command,
            out: Vec::new(),
            bad: 0,
            failures: 0,
            commands: 0,
            helo: None,
            client_id: ClientId::default(),
        }
    }

    /// Bytes received but not processed: at most one unfinished line (bounded by the line or
    /// SASL limit) plus the last read, or what was pipelined behind an AUTH being checked.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The last reply; the connection closes after it.
    fn bye(&mut self, text: &str) {
        let line = format!("421 4.7.0 {} {text}\r\n", self.hostname);
        self.out.extend_from_slice(line.as_bytes());
        self.state = State::Done;
        self.clear_input();
    }

    /// A 5xx to a command: counts as an error; too many end the session.
    fn reject(&mut self, bytes: &[u8]) {
        self.reply(bytes);
        self.bad += 1;
        if self.bad >= self.limits.bad_commands_before_bye {
            self.bye("Too many errors");
        }
    }

    /// A refused login: the uniform `535` (with the alert for password mechanisms).
    fn auth_failed(&mut self, with_alert: bool) {
        self.failures += 1;
        if with_alert {
            self.out.extend_from_slice(&self.failed_reply);
        } else {
            self.reply(AUTH_FAILED);
        }
        if self.failures >= self.limits.auth_failures_per_connection {
            self.bye("Too many authentication failures");
        }
    }

    /// Wipes and drops every buffered byte.
    fn clear_input(&mut self) {
        self.buf.as_mut().zeroize();
        self.buf.clear();
        self.scanned = 0;
    }

    /// The longest line the current state accepts: SASL responses and AUTH command lines
    /// (which may carry an initial response) get `sasl_bytes` (RFC 4954 §4), others
    /// `line_bytes`.
    fn line_limit(&self) -> usize {
        let sasl = match self.state {
            State::Command => self
                .buf
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH ")),
            _ => true,
        };
        if sasl {
            self.limits.sasl_bytes
        } else {
            self.limits.line_bytes
        }
    }

    /// Splits the next line off the buffer; a line over the limit is reported as soon as the
    /// limit is crossed, without waiting for its end.
    fn next_line(&mut self) -> Line {
        let limit = self.line_limit();
        let found = self
            .buf
            .get(self.scanned..)
            .and_then(|rest| rest.iter().position(|b| *b == b'\n'));
        let Some(pos) = found else {
            self.scanned = self.buf.len();
            // Room for the CR of a CRLF still to come.
            return if self.buf.len() > limit + 1 {
                Line::TooLong
            } else {
                Line::Incomplete
            };
        };
        let end = self.scanned + pos + 1;
        self.scanned = 0;
        let mut raw = self.buf.split_to(end);
        let mut line = Zeroizing::new(raw.to_vec());
        raw.as_mut().zeroize();
        line.pop(); // the LF
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > limit {
            return Line::TooLong;
        }
        Line::Complete(line)
    }

    /// Handles one line; returns a step when the driver must act.
    fn line(&mut self, line: &[u8]) -> Option<Step> {
        self.commands += 1;
        if self.commands > MAX_PREAUTH_COMMANDS {
            self.bye("Too many commands");
            return None;
        }
        match self.state {
            State::Command => self.command(line),
            State::Response(_) | State::LoginUser | State::LoginPassword(_) | State::OAuthError => {
                self.response(line)
            }
            State::Authenticating(_) | State::StartingTls | State::Done => None,
        }
    }

    /// The pre-auth policy: one decision per verb.
    fn command(&mut self, line: &[u8]) -> Option<Step> {
        let (verb, arg) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (
                line.get(..i).unwrap_or_default(),
                line.get(i + 1..).unwrap_or_default().trim_ascii(),
            ),
            None => (line, &[][..]),
        };
        match Verb::parse(verb) {
            Verb::Ehlo => self.hello(true, arg),
            Verb::Helo => self.hello(false, arg),
            Verb::StartTls => self.starttls(arg),
            Verb::Auth => return self.auth(arg),
            // RFC 5321 §4.1.1.9: NOOP's argument is ignored. There is no transaction to reset
            // before authentication (§4.1.1.5).
            Verb::Noop | Verb::Rset => self.reply(OK),
            Verb::Quit => {
                self.reply(BYE);
                self.state = State::Done;
                self.clear_input();
            }
            Verb::AfterAuth if self.starttls_listener && !self.tls => self.reject(STARTTLS_FIRST),
            Verb::AfterAuth => self.reject(AUTH_REQUIRED),
            Verb::Unknown => self.reject(UNRECOGNIZED),
        }
        None
    }

    /// EHLO/HELO (RFC 5321 §4.1.1.1). The argument is checked loosely: one word of printable
    /// ASCII, at most [`MAX_HELO_CHARS`]; kept without `"` and `\` for the backend and the
    /// audit line, never echoed.
    fn hello(&mut self, extended: bool, arg: &[u8]) {
        let name: String = arg
            .iter()
            .filter(|b| **b != b'"' && **b != b'\\')
            .map(|b| char::from(*b))
            .collect();
        let valid =
            arg.len() <= MAX_HELO_CHARS && arg.iter().all(u8::is_ascii_graphic) && !name.is_empty();
        if !valid {
            self.reject(if extended { EHLO_SYNTAX } else { HELO_SYNTAX });
            return;
        }
        self.client_id = ClientId::from_params([("name", Some(name.as_bytes()))]);
        self.helo = Some(name);
        if extended {
            let reply = replies::ehlo(&replies::Offer {
                hostname: &self.hostname,
                tls: self.tls,
                starttls: self.starttls_listener,
                oauth: self.oauth.is_some(),
                backend: &self.extensions,
            });
            self.reply(&reply);
        } else {
            let line = format!("250 {}\r\n", self.hostname);
            self.reply(line.as_bytes());
        }
    }

    /// STARTTLS (RFC 3207 §4): nothing buffered behind it is ever read.
    fn starttls(&mut self, arg: &[u8]) {
        if self.tls {
            self.reject(TLS_ACTIVE);
        } else if !self.starttls_listener {
            self.reject(NO_STARTTLS);
        } else if !arg.is_empty() {
            self.reject(STARTTLS_SYNTAX);
        } else {
            self.reply(READY_FOR_TLS);
            self.clear_input();
            self.state = State::StartingTls;
        }
    }

    /// AUTH (RFC 4954 §4): only over TLS, after EHLO; an initial response is taken at once.
    fn auth(&mut self, arg: &[u8]) -> Option<Step> {
        if !self.tls {
            // Not counted, as IMAP's `NO [PRIVACYREQUIRED]` and POP3's plaintext refusal are
            // not: a client that tries before TLS is misconfigured, not probing (the command
            // cap still bounds it).
            self.reply(STARTTLS_FIRST);
            return None;
        }
        if self.helo.is_none() {
            self.reject(EHLO_FIRST);
            return None;
        }
        let mut words = arg.split(|b| *b == b' ').filter(|w| !w.is_empty());
        let (Some(name), initial, None) = (words.next(), words.next(), words.next()) else {
            self.reject(AUTH_SYNTAX);
            return None;
        };
        let is = |m: &str| name.eq_ignore_ascii_case(m.as_bytes());
        let oauth = self.oauth.is_some();
        let mechanism = if is("PLAIN") {
            Mechanism::Plain
        } else if is("LOGIN") {
            Mechanism::Login
        } else if is("XOAUTH2") && oauth {
            Mechanism::XOAuth2
        } else if is("OAUTHBEARER") && oauth {
            Mechanism::OAuthBearer
        } else {
            self.reject(UNKNOWN_MECHANISM);
            return None;
        };
        let Some(initial) = initial else {
            if mechanism == Mechanism::Login {
                self.reply(LOGIN_USER_PROMPT);
                self.state = State::LoginUser;
            } else {
                self.reply(EMPTY_CHALLENGE);
                self.state = State::Response(mechanism);
            }
            return None;
        };
        // RFC 4954 §4: `=` is an empty initial response.
        let data = if initial == b"=" {
            Some(Zeroizing::new(Vec::new()))
        } else {
            decode_base64(initial)
        };
        let Some(data) = data else {
            self.reject(BAD_BASE64);
            return None;
        };
        if mechanism == Mechanism::Login {
            // The initial response of LOGIN is the user name.
            self.reply(LOGIN_PASSWORD_PROMPT);
            self.state = State::LoginPassword(login_user(&data));
            return None;
        }
        Some(self.sasl_credential(mechanism, &data))
    }

    /// A line after a `334`: the client's SASL response (RFC 4954 §4).
    fn response(&mut self, line: &[u8]) -> Option<Step> {
        let state = std::mem::replace(&mut self.state, State::Command);
        if let State::OAuthError = state {
            // Whatever the client says (XOAUTH2: an empty line; OAUTHBEARER: `AQ==`).
            self.auth_failed(false);
            return None;
        }
        if line == b"*" {
            self.reply(CANCELLED);
            return None;
        }
        let Some(mut data) = decode_base64(line) else {
            self.reject(BAD_BASE64);
            return None;
        };
        match state {
            State::Response(mechanism) => Some(self.sasl_credential(mechanism, &data)),
            State::LoginUser => {
                self.reply(LOGIN_PASSWORD_PROMPT);
                self.state = State::LoginPassword(login_user(&data));
                None
            }
            State::LoginPassword(user) => {
                let credential = match user {
                    Ok(_) if data.is_empty() => Credential::Malformed(PlainError::Empty),
                    Ok(user) => Credential::Password {
                        user,
                        // Moved, not copied: the decoded bytes live on only in the secret.
                        password: Secret::new(std::mem::take(&mut *data)),
                    },
                    Err(e) => Credential::Malformed(e),
                };
                Some(self.authenticate(Mechanism::Login, credential))
            }
            _ => None,
        }
    }

    /// A PLAIN, XOAUTH2 or OAUTHBEARER message, decoded into the credential to check; a
    /// malformed one is checked too, so that it fails like any other.
    fn sasl_credential(&mut self, mechanism: Mechanism, data: &[u8]) -> Step {
        let credential = match mechanism {
            Mechanism::Plain | Mechanism::Login => match decode_plain(data) {
                Ok(p) => Credential::Password {
                    user: p.user,
                    password: p.password,
                },
                Err(e) => Credential::Malformed(e),
            },
            Mechanism::XOAuth2 | Mechanism::OAuthBearer => {
                let decoded = if mechanism == Mechanism::XOAuth2 {
                    decode_xoauth2(data)
                } else {
                    decode_oauthbearer(data)
                };
                match decoded {
                    Ok(b) => Credential::Bearer {
                        user: b.user,
                        token: b.token,
                    },
                    Err(e) => Credential::MalformedBearer(e),
                }
            }
        };
        self.authenticate(mechanism, credential)
    }

    fn authenticate(&mut self, mechanism: Mechanism, credential: Credential) -> Step {
        self.state = State::Authenticating(mechanism);
        Step::Authenticate(Login {
            mechanism,
            credential,
        })
    }
}

impl Front for SmtpFront {
    fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP\r\n", self.hostname).into_bytes()
    }

    fn feed(&mut self, bytes: &[u8]) {
        // Nothing sent behind STARTTLS or after the last reply is ever read.
        if !matches!(self.state, State::StartingTls | State::Done) {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn step(&mut self) -> Step {
        loop {
            if !self.out.is_empty() {
                return Step::Send(std::mem::take(&mut self.out));
            }
            match self.state {
                State::Done => return Step::Close,
                State::StartingTls => return Step::StartTls,
                State::Authenticating(_) => return Step::NeedInput,
                State::Command
                | State::Response(_)
                | State::LoginUser
                | State::LoginPassword(_)
                | State::OAuthError => {}
            }
            match self.next_line() {
                Line::Incomplete => return Step::NeedInput,
                Line::TooLong => {
                    let sasl = !matches!(self.state, State::Command);
                    self.reply(if sasl {
                        SASL_LINE_TOO_LONG
                    } else {
                        LINE_TOO_LONG
                    });
                    self.state = State::Done;
                    self.clear_input();
                }
                Line::Complete(line) => {
                    if let Some(step) = self.line(&line) {
                        return step;
                    }
                }
            }
        }
    }

    fn tls_started(&mut self) {
        // RFC 3207 §4.2: the client must start over; a name sent in the clear could have been
        // injected by anyone on the path.
        self.clear_input();
        self.helo = None;
        self.client_id = ClientId::default();
        self.tls = true;
        self.state = State::Command;
    }

    fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    fn bye_now(&mut self, why: Bye) -> Vec<u8> {
        self.state = State::Done;
        self.clear_input();
        let (code, text) = match why {
            Bye::Shutdown => ("4.3.2", "Service shutting down"),
            Bye::Timeout | Bye::Idle => ("4.4.2", "Error: timeout exceeded"),
        };
        format!("421 {code} {} {text}\r\n", self.hostname).into_bytes()
    }

    fn refused(&mut self, why: Refused) {
        let State::Authenticating(mechanism) = self.state else {
            return;
        };
        self.state = State::Command;
        match why {
            Refused::Failed if mechanism.is_oauth() => {
                let challenge = match &self.oauth {
                    Some(c) => B64.encode(c.for_mechanism(mechanism)),
                    None => B64.encode(OAuthChallenges::new(None, "").for_mechanism(mechanism)),
                };
                self.out
                    .extend_from_slice(format!("334 {challenge}\r\n").as_bytes());
                self.state = State::OAuthError;
            }
            Refused::Failed => self.auth_failed(true),
            Refused::Unavailable => self.reply(TEMPORARY_FAILURE),
            // A 4xx that leaves the session open, like IMAP's `NO [LIMIT]`: the client may try
            // again later or QUIT.
            Refused::TooManySessions => self.reply(TOO_MANY_SESSIONS),
        }
    }

    fn succeeded(mut self: Box<Self>, _welcome: Welcome<'_>) -> (Vec<u8>, BytesMut) {
        if !matches!(self.state, State::Authenticating(_)) {
            return (Vec::new(), BytesMut::new());
        }
        self.state = State::Done;
        // Invariant 3: what the client pipelined behind AUTH, unread and in order.
        (AUTH_OK.to_vec(), std::mem::take(&mut self.buf))
    }
}

impl Drop for SmtpFront {
    /// Buffered bytes may hold a SASL response: wipe them.
    fn drop(&mut self) {
        self.buf.as_mut().zeroize();
    }
}

/// Strict base64 (RFC 4648 §4, padded) into a buffer that is wiped when dropped; `None` when
/// it does not decode.
fn decode_base64(text: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(text.len())]);
    let n = B64.decode_slice(text, out.as_mut_slice()).ok()?;
    out.truncate(n);
    Some(out)
}

/// AUTH LOGIN's user name: UTF-8 and not empty, like a PLAIN authcid (RFC 4616 §2).
fn login_user(data: &[u8]) -> Result<String, PlainError> {
    match std::str::from_utf8(data) {
        Ok("") => Err(PlainError::Empty),
        Ok(user) => Ok(user.to_owned()),
        Err(_) => Err(PlainError::NotUtf8),
    }
}

#[cfg(test)]
mod tests;
