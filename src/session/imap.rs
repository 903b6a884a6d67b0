//! IMAP's front: the pre-auth state machine of [`super::preauth`] behind the [`Front`] every
//! protocol's driver uses. It remembers the tag and mechanism of the login being checked, so
//! the answer goes to the right command.

use bytes::BytesMut;
use imap_codec::imap_types::core::Tag;

use super::front::{Bye, Front, FrontConfig, Login, Refused, Step, Welcome};
use super::preauth::{self, PreAuth};
use crate::auth::Mechanism;
use crate::login::ClientId;

pub struct ImapFront {
    sm: PreAuth,
    /// The login being checked.
    pending: Option<(Tag<'static>, Mechanism)>,
}

impl ImapFront {
    /// `tls`: the connection is already TLS (implicit-TLS listener).
    pub fn new(cfg: &FrontConfig, tls: bool) -> Self {
        Self {
            sm: PreAuth::new(cfg.limits, cfg.starttls_listener, tls)
                .with_oauth_challenges(cfg.oauth.clone())
                .with_login_alert(cfg.login_alert_imap.clone()),
            pending: None,
        }
    }
}

impl Front for ImapFront {
    fn greeting(&self) -> Vec<u8> {
        self.sm.greeting().to_vec()
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.sm.feed(bytes);
    }

    fn step(&mut self) -> Step {
        match self.sm.step() {
            preauth::Step::Send(b) => Step::Send(b),
            preauth::Step::NeedInput => Step::NeedInput,
            preauth::Step::StartTls => Step::StartTls,
            preauth::Step::Close => Step::Close,
            preauth::Step::Authenticate(req) => {
                self.pending = Some((req.tag, req.mechanism));
                Step::Authenticate(Login {
                    mechanism: req.mechanism,
                    credential: req.credential,
                })
            }
        }
    }

    fn tls_started(&mut self) {
        self.sm.tls_started();
    }

    fn client_id(&self) -> &ClientId {
        self.sm.client_id()
    }

    fn bye_now(&mut self, why: Bye) -> Vec<u8> {
        self.sm.bye_now(match why {
            Bye::Shutdown => "Server shutting down",
            Bye::Timeout => "Authentication timeout",
            Bye::Idle => "Idle timeout",
        })
    }

    fn refused(&mut self, why: Refused) {
        if let Some((tag, mechanism)) = self.pending.take() {
            self.sm.login_refused(&tag, mechanism, why);
        }
    }

    fn succeeded(self: Box<Self>, welcome: Welcome<'_>) -> (Vec<u8>, BytesMut) {
        let this = *self;
        let Some((tag, _)) = this.pending else {
            return (Vec::new(), BytesMut::new());
        };
        match welcome {
            Welcome::Imap(ok) => this.sm.auth_succeeded(&tag, ok),
            Welcome::Fixed => {
                let ok = crate::imap::LoginOk::new(&[]);
                this.sm.auth_succeeded(&tag, &ok)
            }
        }
    }
}
