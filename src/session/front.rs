//! What every protocol's pre-auth state machine offers its driver (DESIGN.md, "Second stage":
//! each front is sans-I/O: bytes in, steps out).
//!
//! The driver in `session/mod.rs` is the same for IMAP, SMTP submission and POP3: it writes the
//! greeting, reads within the deadlines, runs the TLS handshake when the front says so, hands a
//! credential to `login` and tells the front how it went. Every reply is the front's.
//!
//! The rules each front enforces (the invariants, per protocol): no credential before TLS; every
//! byte buffered before the TLS handshake is dropped (`tls_started`); lines and SASL responses
//! are bounded before they are buffered; after too many bad commands or failed logins the front
//! says goodbye and closes; a refused login gets one generic answer whatever failed.

use std::sync::Arc;

use bytes::BytesMut;

use crate::auth::{Credential, Mechanism};
use crate::imap::LoginOk;
use crate::login::ClientId;

pub use super::preauth::{OAuthChallenges, PreAuthLimits, Refused};

/// A login to check.
#[derive(Debug)]
pub struct Login {
    pub mechanism: Mechanism,
    pub credential: Credential,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Read more bytes and call [`Front::feed`].
    NeedInput,
    /// Start the TLS handshake now (the go-ahead was already sent), then call
    /// [`Front::tls_started`].
    StartTls,
    /// Check this login; then call [`Front::refused`] or [`Front::succeeded`].
    Authenticate(Login),
    /// Close the connection (after writing everything sent so far).
    Close,
}

/// Why the driver ends a session from its side (the front words the last line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bye {
    /// The gateway stops accepting.
    Shutdown,
    /// The total pre-auth time (or the login's deadline) passed.
    Timeout,
    /// The client sent nothing for the pre-auth idle time.
    Idle,
}

/// What the client is told after a successful login.
#[derive(Debug, Clone, Copy)]
pub enum Welcome<'a> {
    /// IMAP: the tagged OK with the backend's capabilities.
    Imap(&'a LoginOk),
    /// SMTP and POP3: the front's own fixed reply.
    Fixed,
}

/// The settings every front shares (built once per listener).
#[derive(Debug, Clone)]
pub struct FrontConfig {
    pub limits: PreAuthLimits,
    /// The listener is a STARTTLS one (`tls: starttls`).
    pub starttls_listener: bool,
    /// Token mechanisms are offered (after TLS): their error challenges.
    pub oauth: Option<Arc<OAuthChallenges>>,
    /// Sign-in approval: a sentence pointing at the portal, added to every failed password
    /// login's answer, whatever failed.
    pub login_alert: Option<Arc<str>>,
    /// The same sentence as IMAP's `* NO [ALERT]` line, encoded once per process.
    pub login_alert_imap: Option<Arc<[u8]>>,
    /// The gateway's own host name (SMTP greeting and EHLO).
    pub hostname: Arc<str>,
    /// SMTP: the service extensions the backend offers (EHLO keywords with their parameters,
    /// upper-case keyword first), from which the front builds its EHLO reply (AUTH, STARTTLS
    /// and XCLIENT are never taken from here).
    pub smtp_extensions: Arc<[String]>,
}

/// One protocol's pre-auth dialogue.
pub trait Front: Send {
    /// The first thing the client is sent (for implicit TLS, queued as half-RTT data).
    fn greeting(&self) -> Vec<u8>;
    /// Bytes received from the client.
    fn feed(&mut self, bytes: &[u8]);
    /// What to do next.
    fn step(&mut self) -> Step;
    /// The TLS handshake completed: drop everything buffered before it.
    fn tls_started(&mut self);
    /// What the client said about itself (IMAP `ID`; SMTP's EHLO name), for the audit line.
    fn client_id(&self) -> &ClientId;
    /// The client's EHLO/HELO name (SMTP), passed on to the backend.
    fn helo(&self) -> Option<&str> {
        None
    }
    /// The last line before the driver closes the session.
    fn bye_now(&mut self, why: Bye) -> Vec<u8>;
    /// The login of the last [`Step::Authenticate`] did not succeed.
    fn refused(&mut self, why: Refused);
    /// The login of the last [`Step::Authenticate`] succeeded: the reply to write, and the
    /// bytes the client pipelined behind its login, to forward to the backend in order.
    fn succeeded(self: Box<Self>, welcome: Welcome<'_>) -> (Vec<u8>, BytesMut);
}
