//! The IMAP wire: bounded framing, decoding with imap-codec, and replies encoded from
//! imap-codec's types (we never format IMAP grammar by hand).
//!
//! Limits live in [`framing`]; the policy that decides *which* reply to send lives in
//! `session`. Reply texts are fixed strings: no client input, backend text, product name or
//! version ever appears in what the gateway says itself.

pub mod framing;

use std::borrow::Cow;

use imap_codec::encode::Encoder;
use imap_codec::imap_types::core::{Atom, Tag, Vec1};
use imap_codec::imap_types::response::{
    Capability, Code, CodeOther, CommandContinuationRequest, Data, Greeting, GreetingKind,
    Response, Status, StatusKind,
};
use imap_codec::{GreetingCodec, ResponseCodec};

/// Response codes we send that imap-types has no variant for (RFC 5530).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    AuthenticationFailed,
    PrivacyRequired,
    Unavailable,
    Limit,
    TooBig,
    ClientBug,
    CannotBeLogin,
}

impl RespCode {
    fn atom(self) -> &'static str {
        match self {
            RespCode::AuthenticationFailed => "AUTHENTICATIONFAILED",
            RespCode::PrivacyRequired => "PRIVACYREQUIRED",
            RespCode::Unavailable => "UNAVAILABLE",
            RespCode::Limit => "LIMIT",
            RespCode::TooBig => "TOOBIG",
            RespCode::ClientBug => "CLIENTBUG",
            RespCode::CannotBeLogin => "CANNOT",
        }
    }

    fn code(self) -> Code<'static> {
        match self {
            RespCode::TooBig => Code::TooBig,
            other => Code::Other(CodeOther::unvalidated(other.atom().as_bytes())),
        }
    }
}

/// Turns capability names into imap-types values; names that are not atoms are skipped.
pub fn capabilities<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Capability<'static>> {
    names
        .into_iter()
        .filter_map(|n| Atom::try_from(n.to_owned()).ok())
        .map(Capability::from)
        .collect()
}

fn encode_response(resp: &Response<'_>, fallback: &'static [u8]) -> Vec<u8> {
    let bytes = ResponseCodec::default().encode(resp).dump();
    if bytes.is_empty() {
        fallback.to_vec()
    } else {
        bytes
    }
}

/// imap-codec writes the first capability as `IMAP4REV1`; RFC 3501 spells it `IMAP4rev1`, as
/// Dovecot, Cyrus and every server clients were tested against do. Matching is
/// case-insensitive per the RFC, but some tools are not (testssl.sh's STARTTLS probe), so the
/// gateway writes the usual spelling. Only the word right after `CAPABILITY ` is touched (a
/// tag cannot hold a space, so client text can never match).
fn usual_spelling(mut bytes: Vec<u8>) -> Vec<u8> {
    const ENCODED: &[u8] = b"CAPABILITY IMAP4REV1";
    if let Some(i) = bytes.windows(ENCODED.len()).position(|w| w == ENCODED) {
        let start = i + b"CAPABILITY IMAP4".len();
        if let Some(rev) = bytes.get_mut(start..start + 3) {
            rev.copy_from_slice(b"rev");
        }
    }
    bytes
}

fn caps_code(caps: &[Capability<'static>]) -> Option<Code<'static>> {
    Vec1::try_from(caps.to_vec()).ok().map(Code::Capability)
}

/// `* OK [CAPABILITY …] ready`, no product name.
pub fn greeting(caps: &[Capability<'static>]) -> Vec<u8> {
    match Greeting::new(GreetingKind::Ok, caps_code(caps), "ready") {
        Ok(g) => usual_spelling(GreetingCodec::default().encode(&g).dump()),
        Err(_) => b"* OK ready\r\n".to_vec(),
    }
}

/// `* CAPABILITY …`.
pub fn capability_data(caps: &[Capability<'static>]) -> Vec<u8> {
    match Vec1::try_from(caps.to_vec()) {
        Ok(v) => usual_spelling(encode_response(
            &Response::Data(Data::Capability(v)),
            b"* CAPABILITY IMAP4rev1\r\n",
        )),
        Err(_) => b"* CAPABILITY IMAP4rev1\r\n".to_vec(),
    }
}

/// A tagged status reply with a fixed text.
pub fn tagged(
    tag: &Tag<'_>,
    kind: StatusKind,
    code: Option<RespCode>,
    text: &'static str,
) -> Vec<u8> {
    tagged_code(tag, kind, code.map(RespCode::code), text)
}

/// A tagged OK carrying capabilities (after login, or after STARTTLS it is not used).
pub fn tagged_ok_caps(tag: &Tag<'_>, caps: &[Capability<'static>], text: &'static str) -> Vec<u8> {
    usual_spelling(tagged_code(tag, StatusKind::Ok, caps_code(caps), text))
}

/// The login's `tag OK [CAPABILITY …] Logged in`, encoded once per capability list: a backend
/// answers every login with the same list, so only the tag changes from one login to the next.
#[derive(Debug)]
pub struct LoginOk {
    /// Everything after the tag (` OK [CAPABILITY …] Logged in\r\n`), or `None` when the
    /// reply could not be encoded and `fallback` (an untagged BAD) is all there is to say.
    after_tag: Option<Vec<u8>>,
    fallback: Vec<u8>,
}

impl LoginOk {
    pub fn new(caps: &[Capability<'static>]) -> LoginOk {
        const TAG: &[u8] = b"x";
        let line = tagged_ok_caps(&Tag::unvalidated("x"), caps, "Logged in");
        LoginOk {
            after_tag: line.strip_prefix(TAG).map(<[u8]>::to_vec),
            fallback: line,
        }
    }

    /// The reply to the login tagged `tag` (a valid tag is its own encoding).
    pub fn for_tag(&self, tag: &Tag<'_>) -> Vec<u8> {
        let Some(after_tag) = &self.after_tag else {
            return self.fallback.clone();
        };
        let tag = AsRef::<str>::as_ref(tag).as_bytes();
        let mut line = Vec::with_capacity(tag.len() + after_tag.len());
        line.extend_from_slice(tag);
        line.extend_from_slice(after_tag);
        line
    }
}

fn tagged_code(
    tag: &Tag<'_>,
    kind: StatusKind,
    code: Option<Code<'static>>,
    text: &'static str,
) -> Vec<u8> {
    match Status::new(Some(tag.clone()), kind, code, text) {
        Ok(s) => encode_response(&Response::Status(s), b"* BAD internal error\r\n"),
        Err(_) => b"* BAD internal error\r\n".to_vec(),
    }
}

/// An untagged `* BAD` (for input whose tag is not valid: never echoed).
pub fn untagged_bad(code: Option<RespCode>, text: &'static str) -> Vec<u8> {
    match Status::bad(None, code.map(RespCode::code), text) {
        Ok(s) => encode_response(&Response::Status(s), b"* BAD\r\n"),
        Err(_) => b"* BAD\r\n".to_vec(),
    }
}

/// `* NO [ALERT] text` (RFC 9051 §7.1: the client must show the text to the person). The
/// text is configuration, made once; `None` when it is not valid IMAP text.
pub fn untagged_alert(text: &str) -> Option<Vec<u8>> {
    let s = Status::no(None, Some(Code::Alert), text.to_owned()).ok()?;
    Some(encode_response(&Response::Status(s), b""))
}

/// `* BYE …`.
pub fn bye(code: Option<RespCode>, text: &'static str) -> Vec<u8> {
    match Status::bye(code.map(RespCode::code), text) {
        Ok(s) => encode_response(&Response::Status(s), b"* BYE\r\n"),
        Err(_) => b"* BYE\r\n".to_vec(),
    }
}

/// `+ text` (literal continuation) .
pub fn continuation(text: &'static str) -> Vec<u8> {
    match CommandContinuationRequest::basic(None, text) {
        Ok(c) => encode_response(&Response::CommandContinuationRequest(c), b"+ \r\n"),
        Err(_) => b"+ \r\n".to_vec(),
    }
}

/// `+ base64` (SASL challenge); empty data gives `+ ` as RFC 9051 §6.2.2 allows.
pub fn sasl_challenge(data: &[u8]) -> Vec<u8> {
    let c = CommandContinuationRequest::base64(Cow::Owned(data.to_vec()));
    encode_response(&Response::CommandContinuationRequest(c), b"+ \r\n")
}

/// A capability's name as text, for filtering.
pub fn capability_name(c: &Capability<'_>) -> String {
    c.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_well_formed() {
        let tag = Tag::try_from("a1").unwrap();
        let caps = capabilities(["IMAP4rev1", "STARTTLS", "LOGINDISABLED"]);
        assert_eq!(
            greeting(&caps),
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"
        );
        assert_eq!(
            tagged(
                &tag,
                StatusKind::No,
                Some(RespCode::PrivacyRequired),
                "TLS required"
            ),
            b"a1 NO [PRIVACYREQUIRED] TLS required\r\n"
        );
        assert_eq!(untagged_bad(None, "invalid tag"), b"* BAD invalid tag\r\n");
        assert_eq!(bye(None, "bye"), b"* BYE bye\r\n");
        assert_eq!(
            capability_data(&caps),
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n"
        );
        assert_eq!(sasl_challenge(b""), b"+ \r\n");
        assert_eq!(continuation("go ahead"), b"+ go ahead\r\n");
    }

    #[test]
    fn login_ok_made_once_is_the_reply_encoded_for_each_tag() {
        let caps = capabilities(["IMAP4rev1", "IDLE", "X-A+B"]);
        let ok = LoginOk::new(&caps);
        for t in ["a", "A0001", "x", "t.a-g]", "9"] {
            let tag = Tag::try_from(t).unwrap();
            assert_eq!(
                ok.for_tag(&tag),
                tagged_ok_caps(&tag, &caps, "Logged in"),
                "{t}"
            );
        }
        assert_eq!(
            ok.for_tag(&Tag::try_from("a1").unwrap()),
            b"a1 OK [CAPABILITY IMAP4rev1 IDLE X-A+B] Logged in\r\n"
        );
    }
}
