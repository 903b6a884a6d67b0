//! Placeholder, replaced by the real front.

use bytes::BytesMut;

use super::front::{Bye, Front, FrontConfig, Refused, Step, Welcome};
use crate::login::ClientId;

pub struct Pop3Front {
    id: ClientId,
    done: bool,
}

impl Pop3Front {
    pub fn new(_cfg: &FrontConfig, _tls: bool) -> Self {
        Self {
            id: ClientId::default(),
            done: false,
        }
    }
}

impl Front for Pop3Front {
    fn greeting(&self) -> Vec<u8> {
        b"421 not yet\r\n".to_vec()
    }
    fn feed(&mut self, _bytes: &[u8]) {}
    fn step(&mut self) -> Step {
        if self.done {
            Step::Close
        } else {
            self.done = true;
            Step::Close
        }
    }
    fn tls_started(&mut self) {}
    fn client_id(&self) -> &ClientId {
        &self.id
    }
    fn bye_now(&mut self, _why: Bye) -> Vec<u8> {
        Vec::new()
    }
    fn refused(&mut self, _why: Refused) {}
    fn succeeded(self: Box<Self>, _welcome: Welcome<'_>) -> (Vec<u8>, BytesMut) {
        (Vec::new(), BytesMut::new())
    }
}
