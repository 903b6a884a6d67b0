//! POP3's front: the AUTHORIZATION state as a state machine without sockets (bytes in, steps
//! out), behind the [`Front`] every protocol's driver uses.
//!
//! RFC 1939 (POP3) for the AUTHORIZATION state and USER/PASS/QUIT; RFC 2449 for CAPA, the
//! extended response codes and PIPELINING; RFC 2595 §4 for STLS; RFC 5034 for AUTH (SASL,
//! with the initial response); RFC 3206 for `[AUTH]` and `[SYS/TEMP]`; RFC 7628 §3.2.2 (and
//! Google's XOAUTH2) for the error challenge a refused token gets. The policy is the one
//! `match` in [`Pop3Front::command`]: CAPA, STLS, USER, PASS, AUTH and QUIT; APOP, the
//! TRANSACTION commands and anything else are `-ERR`. Security rules enforced here:
//! - before TLS no credential is taken: USER, PASS and AUTH get
//!   `-ERR [AUTH] Plaintext authentication is not allowed without TLS`, never a `+`
//!   continuation, and the pre-TLS CAPA lists `STLS` but neither `USER` nor `SASL`
//!   (invariant 1);
//! - STLS drops every byte buffered behind it, and any USER given before it (invariant 2,
//!   CVE-2011-0411); the post-TLS CAPA is the post-TLS set;
//! - APOP is never offered (the greeting has no timestamp) and refused without a credential
//!   check; AUTH LOGIN is not offered;
//! - a refused login gets one answer whatever failed, `-ERR [AUTH] Authentication failed.`
//!   (a token mechanism: the error challenge first), with the sign-in approval sentence
//!   appended for password logins (invariant 5);
//! - after a login is handed to the driver no input is processed; the bytes pipelined behind
//!   it go to the backend in order (invariant 3);
//! - lines are bounded before more is buffered: a command line by `line_bytes`, an AUTH line
//!   or a SASL response by `sasl_bytes` (tokens are large); a longer one ends the session
//!   without waiting for its end (invariant 7). The buffer holds at most one unfinished line
//!   plus one read;
//! - client input is never echoed; the password and SASL bytes are wiped once used.
//!
//! Ends of a session: `bad_commands_before_bye` protocol errors (unknown or out-of-state
//! commands, APOP, syntax, bad base64) — the last one is answered
//! `-ERR Too many invalid commands` instead; [`MAX_PREAUTH_COMMANDS`] lines of any kind;
//! `auth_failures_per_connection` failed logins — the last failure's `-ERR` line is sent,
//! then the connection closes. Refusals of well-formed commands by policy (plaintext before
//! TLS, an unsupported mechanism, a cancelled AUTH) are not protocol errors; the command cap
//! bounds them.

use base64::Engine as _;
use bytes::BytesMut;
use zeroize::{Zeroize, Zeroizing};

use super::front::{Bye, Front, FrontConfig, Login, OAuthChallenges, Refused, Step, Welcome};
use super::preauth::{PreAuthLimits, MAX_PREAUTH_COMMANDS};
use crate::auth::sasl::{decode_oauthbearer, decode_plain, decode_xoauth2};
use crate::auth::{Credential, Mechanism};
use crate::login::ClientId;
use crate::secret::Secret;

/// RFC 1939 §4: `+OK`, without the `<timestamp>` APOP would need (so APOP is never offered).
const GREETING: &[u8] = b"+OK POP3 ready.\r\n";
/// The longest USER name accepted: what fits RFC 2449 §4's 255-octet command line.
pub(crate) const MAX_USER_BYTES: usize = 255;

const PLAINTEXT: &[u8] = b"-ERR [AUTH] Plaintext authentication is not allowed without TLS\r\n";
const FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.";
const UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Service temporarily unavailable\r\n";
const IN_USE: &[u8] = b"-ERR [IN-USE] Too many sessions for this user\r\n";
const TOO_MANY_BAD: &[u8] = b"-ERR Too many invalid commands\r\n";
const TOO_MANY_COMMANDS: &[u8] = b"-ERR Too many commands\r\n";
const LINE_TOO_LONG: &[u8] = b"-ERR Line too long\r\n";
const SYNTAX: &[u8] = b"-ERR Syntax error\r\n";

/// The state of the AUTHORIZATION dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading commands.
    Ready,
    /// AUTH sent `+ `; the next line is the client's response (RFC 5034 §4).
    Sasl(Mechanism),
    /// A token was refused and the error challenge sent (RFC 7628 §3.2.2); the next line is
    /// the client's dummy response, then comes the `-ERR`.
    OAuthError,
    /// A login is being checked; no input is processed.
    Authenticating(Mechanism),
    /// STLS was accepted; the handshake is due.
    StartingTls,
    /// The last line is queued; then the connection closes.
    Closing,
}

/// The commands of the AUTHORIZATION state, and those that are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Capa,
    Stls,
    User,
    Pass,
    Auth,
    Apop,
    Quit,
    /// RFC 1939 §5 (and RFC 2449's TOP, UIDL): only after logging in.
    Transaction,
    Unknown,
}

impl Command {
    /// The keyword, case-insensitive (RFC 1939 §3).
    fn of(keyword: &[u8]) -> Command {
        const TABLE: &[(&[u8], Command)] = &[
            (b"CAPA", Command::Capa),
            (b"STLS", Command::Stls),
            (b"USER", Command::User),
            (b"PASS", Command::Pass),
            (b"AUTH", Command::Auth),
            (b"APOP", Command::Apop),
            (b"QUIT", Command::Quit),
            (b"STAT", Command::Transaction),
            (b"LIST", Command::Transaction),
            (b"RETR", Command::Transaction),
            (b"DELE", Command::Transaction),
            (b"NOOP", Command::Transaction),
            (b"RSET", Command::Transaction),
            (b"TOP", Command::Transaction),
            (b"UIDL", Command::Transaction),
            (b"LAST", Command::Transaction),
        ];
        TABLE
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(keyword))
            .map_or(Command::Unknown, |(_, c)| *c)
    }
}

/// One line out of the buffer.
enum Line {
    Incomplete,
    TooLong,
    Complete(BytesMut),
}

/// The POP3 pre-auth dialogue of one connection.
pub struct Pop3Front {
    limits: PreAuthLimits,
    /// This listener offers STLS (port 110).
    starttls_listener: bool,
    tls: bool,
    /// Token mechanisms are offered (after TLS): their error challenges.
    oauth: Option<std::sync::Arc<OAuthChallenges>>,
    /// The answer to a failed password login, with the sign-in approval sentence if any.
    failed_password: Vec<u8>,
    state: State,
    /// Received and not yet processed (at most one unfinished line plus one read).
    buf: BytesMut,
    /// Replies not yet handed to the driver.
    out: Vec<u8>,
    /// The name of the last USER (over TLS), waiting for its PASS.
    user: Option<String>,
    bad: u32,
    failures: u32,
    commands: u32,
    /// POP3 has no ID: always the default.
    id: ClientId,
}

impl Pop3Front {
    /// `tls`: the connection is already TLS (implicit-TLS listener, port 995).
    pub fn new(cfg: &FrontConfig, tls: bool) -> Self {
        let mut failed_password = FAILED.to_vec();
        if let Some(alert) = cfg.login_alert.as_deref() {
            // Operator-given; a control character could end the line early, so none passes.
            let text: String = alert.chars().filter(|c| !c.is_control()).collect();
            if !text.trim().is_empty() {
                failed_password.push(b' ');
                failed_password.extend_from_slice(text.as_bytes());
            }
        }
        failed_password.extend_from_slice(b"\r\n");
        Self {
            limits: cfg.limits,
            starttls_listener: cfg.starttls_listener,
            tls,
            oauth: cfg.oauth.clone(),
            failed_password,
            state: State::Ready,
            buf: BytesMut::new(),
            out: Vec::new(),
            user: None,
            bad: 0,
            failures: 0,
            commands: 0,
            id: ClientId::default(),
        }
    }

    /// Bytes received but not processed (bounded by one line limit plus one read).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The CAPA answer for the current state (RFC 2449 §5–6, RFC 2595 §4, RFC 3206 §6).
    fn capabilities(&self) -> Vec<u8> {
        let mut v = b"+OK Capability list follows\r\n\
            TOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
            .to_vec();
        if self.tls {
            v.extend_from_slice(b"USER\r\n");
            v.extend_from_slice(if self.oauth.is_some() {
                b"SASL PLAIN XOAUTH2 OAUTHBEARER\r\n".as_slice()
            } else {
                b"SASL PLAIN\r\n".as_slice()
            });
        } else if self.starttls_listener {
            v.extend_from_slice(b"STLS\r\n");
        }
        v.extend_from_slice(b".\r\n");
        v
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The last line; the connection closes after it.
    fn close_with(&mut self, bytes: &[u8]) {
        self.reply(bytes);
        self.state = State::Closing;
        self.wipe();
    }

    /// A protocol error; the last allowed one ends the session.
    fn bad(&mut self, bytes: &[u8]) {
        self.bad += 1;
        if self.bad >= self.limits.bad_commands_before_bye {
            self.close_with(TOO_MANY_BAD);
        } else {
            self.reply(bytes);
        }
    }

    /// Drops everything buffered, wiping it first (it may hold a password).
    fn wipe(&mut self) {
        self.buf.as_mut().zeroize();
        self.buf.clear();
    }

    /// The next complete line, if one is there within its limit.
    fn next_line(&mut self) -> Line {
        let limit = match self.state {
            State::Sasl(_) | State::OAuthError => self.limits.sasl_bytes,
            _ if starts_with_auth(&self.buf) => self.limits.sasl_bytes.max(self.limits.line_bytes),
            _ => self.limits.line_bytes,
        };
        let window = self.buf.get(..self.buf.len().min(limit)).unwrap_or(&[]);
        match window.iter().position(|b| *b == b'\n') {
            Some(i) => Line::Complete(self.buf.split_to(i + 1)),
            None if !self.buf.is_empty() && self.buf.len() >= limit => Line::TooLong,
            None => Line::Incomplete,
        }
    }

    /// Handles one line (CRLF or bare LF included); returns a step when the driver must act.
    fn line(&mut self, raw: &[u8]) -> Option<Step> {
        self.commands += 1;
        if self.commands > MAX_PREAUTH_COMMANDS {
            self.close_with(TOO_MANY_COMMANDS);
            return None;
        }
        let line = strip_eol(raw);
        match self.state {
            State::Sasl(mechanism) => {
                self.state = State::Ready;
                return self.sasl_response(mechanism, line);
            }
            State::OAuthError => {
                // Whatever the client answers (`AQ==`, an empty line, `*`), the exchange
                // ends with the failure (RFC 7628 §3.2.2); it was counted when refused.
                self.state = State::Ready;
                self.failed(false);
                return None;
            }
            State::Ready | State::Authenticating(_) | State::StartingTls | State::Closing => {}
        }
        // RFC 1939 §3: keyword, then arguments after single spaces.
        let (keyword, arg) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (
                line.get(..i).unwrap_or_default(),
                Some(line.get(i + 1..).unwrap_or_default()),
            ),
            None => (line, None),
        };
        self.command(Command::of(keyword), arg)
    }

    /// The pre-auth policy: one decision per command.
    fn command(&mut self, command: Command, arg: Option<&[u8]>) -> Option<Step> {
        let no_arg = arg.is_none_or(|a| a.iter().all(|b| *b == b' '));
        match command {
            Command::Capa | Command::Quit | Command::Stls if !no_arg => self.bad(SYNTAX),
            Command::Capa => {
                let capa = self.capabilities();
                self.reply(&capa);
            }
            Command::Quit => self.close_with(b"+OK Bye\r\n"),
            Command::Stls if self.starttls_listener && !self.tls => {
                self.reply(b"+OK Begin TLS negotiation\r\n");
                // Nothing buffered so far may be read after the handshake (CVE-2011-0411).
                self.wipe();
                self.user = None;
                self.state = State::StartingTls;
            }
            Command::Stls if self.tls => self.bad(b"-ERR TLS already active\r\n"),
            Command::Stls => self.bad(b"-ERR Unknown command\r\n"),
            Command::User | Command::Pass | Command::Auth if !self.tls => self.reply(PLAINTEXT),
            Command::User => match arg.and_then(user_name) {
                Some(name) => {
                    self.user = Some(name);
                    self.reply(b"+OK Send password\r\n");
                }
                None => self.bad(b"-ERR Invalid user name\r\n"),
            },
            Command::Pass => {
                match self.user.take() {
                    // RFC 1939 §7: the password is the rest of the line, spaces and all.
                    Some(user) => {
                        let password = Secret::from_slice(arg.unwrap_or_default());
                        return Some(self.authenticate(
                            Mechanism::Login,
                            Credential::Password { user, password },
                        ));
                    }
                    None => self.bad(b"-ERR No user name given\r\n"),
                }
            }
            Command::Auth => return self.auth(arg),
            Command::Apop => self.bad(b"-ERR [AUTH] APOP is not supported\r\n"),
            Command::Transaction => self.bad(b"-ERR Not logged in\r\n"),
            Command::Unknown => self.bad(b"-ERR Unknown command\r\n"),
        }
        None
    }

    /// `AUTH` (after TLS): the mechanism list, or a SASL exchange (RFC 5034 §4).
    fn auth(&mut self, arg: Option<&[u8]>) -> Option<Step> {
        let Some(arg) = arg.filter(|a| !a.is_empty()) else {
            // No argument: the mechanisms, one a line, as many clients expect.
            self.reply(b"+OK Mechanisms follow\r\nPLAIN\r\n");
            if self.oauth.is_some() {
                self.reply(b"XOAUTH2\r\nOAUTHBEARER\r\n");
            }
            self.reply(b".\r\n");
            return None;
        };
        let mut parts = arg.split(|b| *b == b' ');
        let (Some(name), initial, None) = (parts.next(), parts.next(), parts.next()) else {
            self.bad(SYNTAX);
            return None;
        };
        let oauth = self.oauth.is_some();
        let mechanism = if name.eq_ignore_ascii_case(b"PLAIN") {
            Mechanism::Plain
        } else if oauth && name.eq_ignore_ascii_case(b"XOAUTH2") {
            Mechanism::XOAuth2
        } else if oauth && name.eq_ignore_ascii_case(b"OAUTHBEARER") {
            Mechanism::OAuthBearer
        } else {
            self.reply(b"-ERR Unsupported mechanism\r\n");
            return None;
        };
        match initial {
            Some(ir) => self.sasl_data(mechanism, ir),
            None => {
                self.reply(b"+ \r\n");
                self.state = State::Sasl(mechanism);
                None
            }
        }
    }

    /// The line after `+ `: `*` cancels, anything else is base64 (RFC 5034 §4).
    fn sasl_response(&mut self, mechanism: Mechanism, line: &[u8]) -> Option<Step> {
        if line == b"*" {
            self.reply(b"-ERR Authentication cancelled\r\n");
            return None;
        }
        self.sasl_data(mechanism, line)
    }

    /// Base64 SASL data (`=`: empty) → the login to check. Bad base64 is a protocol error,
    /// never a login; a malformed message is a login that fails like any other.
    fn sasl_data(&mut self, mechanism: Mechanism, b64: &[u8]) -> Option<Step> {
        let data = if b64.is_empty() || b64 == b"=" {
            Zeroizing::new(Vec::new())
        } else {
            match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(d) => Zeroizing::new(d),
                Err(_) => {
                    self.bad(b"-ERR Invalid base64 data\r\n");
                    return None;
                }
            }
        };
        let credential = match mechanism {
            Mechanism::Plain | Mechanism::Login => match decode_plain(&data) {
                Ok(p) => Credential::Password {
                    user: p.user,
                    password: p.password,
                },
                Err(e) => Credential::Malformed(e),
            },
            Mechanism::XOAuth2 | Mechanism::OAuthBearer => {
                let decoded = if mechanism == Mechanism::XOAuth2 {
                    decode_xoauth2(&data)
                } else {
                    decode_oauthbearer(&data)
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
        Some(self.authenticate(mechanism, credential))
    }

    fn authenticate(&mut self, mechanism: Mechanism, credential: Credential) -> Step {
        self.state = State::Authenticating(mechanism);
        Step::Authenticate(Login {
            mechanism,
            credential,
        })
    }

    /// The failure's `-ERR` (counted already); the last allowed one ends the session.
    fn failed(&mut self, password: bool) {
        if password {
            self.out.extend_from_slice(&self.failed_password);
        } else {
            self.out.extend_from_slice(FAILED);
            self.out.extend_from_slice(b"\r\n");
        }
        if self.failures >= self.limits.auth_failures_per_connection {
            self.state = State::Closing;
            self.wipe();
        }
    }
}

impl Drop for Pop3Front {
    fn drop(&mut self) {
        // Unprocessed input may hold a password.
        self.wipe();
    }
}

impl Front for Pop3Front {
    fn greeting(&self) -> Vec<u8> {
        GREETING.to_vec()
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.state != State::Closing {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn step(&mut self) -> Step {
        loop {
            if !self.out.is_empty() {
                return Step::Send(std::mem::take(&mut self.out));
            }
            match self.state {
                State::Closing => return Step::Close,
                State::Authenticating(_) => return Step::NeedInput,
                State::StartingTls => return Step::StartTls,
                State::Ready | State::Sasl(_) | State::OAuthError => {}
            }
            match self.next_line() {
                Line::Incomplete => return Step::NeedInput,
                Line::TooLong => self.close_with(LINE_TOO_LONG),
                Line::Complete(mut raw) => {
                    let step = self.line(&raw);
                    raw.as_mut().zeroize();
                    if let Some(step) = step {
                        return step;
                    }
                }
            }
        }
    }

    fn tls_started(&mut self) {
        self.wipe();
        // A USER sent in the clear could have been injected by anyone on the path.
        self.user = None;
        self.tls = true;
        if self.state != State::Closing {
            self.state = State::Ready;
        }
    }

    fn client_id(&self) -> &ClientId {
        &self.id
    }

    fn bye_now(&mut self, why: Bye) -> Vec<u8> {
        self.state = State::Closing;
        self.wipe();
        match why {
            Bye::Shutdown => b"-ERR [SYS/TEMP] Server shutting down\r\n".to_vec(),
            Bye::Timeout => b"-ERR Authentication timeout\r\n".to_vec(),
            Bye::Idle => b"-ERR Idle timeout\r\n".to_vec(),
        }
    }

    fn refused(&mut self, why: Refused) {
        let mechanism = match self.state {
            State::Authenticating(m) => m,
            _ => Mechanism::Login,
        };
        self.state = State::Ready;
        match why {
            Refused::Failed => {
                self.failures += 1;
                self.user = None;
                if mechanism.is_oauth() {
                    let fallback;
                    let challenge = match &self.oauth {
                        Some(c) => c.for_mechanism(mechanism),
                        None => {
                            fallback = OAuthChallenges::new(None, "");
                            fallback.for_mechanism(mechanism)
                        }
                    };
                    let mut line = b"+ ".to_vec();
                    line.extend_from_slice(
                        base64::engine::general_purpose::STANDARD
                            .encode(challenge)
                            .as_bytes(),
                    );
                    line.extend_from_slice(b"\r\n");
                    self.reply(&line);
                    self.state = State::OAuthError;
                } else {
                    self.failed(true);
                }
            }
            Refused::Unavailable => self.reply(UNAVAILABLE),
            Refused::TooManySessions => self.reply(IN_USE),
        }
    }

    fn succeeded(mut self: Box<Self>, _welcome: Welcome<'_>) -> (Vec<u8>, BytesMut) {
        // Invariant 3: what the client pipelined behind its login, untouched and in order.
        let pipelined = std::mem::take(&mut self.buf);
        (b"+OK Logged in.\r\n".to_vec(), pipelined)
    }
}

/// The buffer starts with `AUTH ` (case-insensitive): the line may carry a token.
fn starts_with_auth(buf: &[u8]) -> bool {
    buf.get(..5)
        .is_some_and(|k| k.eq_ignore_ascii_case(b"AUTH "))
}

/// The line without its CRLF (or bare LF, which is accepted).
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A USER argument: UTF-8, 1 to [`MAX_USER_BYTES`] octets, no control characters.
fn user_name(arg: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(arg).ok()?;
    (!name.is_empty() && name.len() <= MAX_USER_BYTES && !name.chars().any(char::is_control))
        .then(|| name.to_owned())
}

#[cfg(test)]
mod tests;
