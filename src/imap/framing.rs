//! Bounded framing: splits a byte stream into complete IMAP messages (lines plus literals)
//! without understanding them, so that imap-codec can decode each whole message.
//!
//! Why our own framer and not imap-codec's `Fragmentizer`: the gateway must hand the bytes a
//! client pipelined behind its login to the backend unchanged (security invariant 3), and must
//! drop everything buffered before a STARTTLS handshake (invariant 2). Both need the unparsed
//! remainder, which `Fragmentizer` keeps private. The framer knows only CRLF and the literal
//! announcement at a line's end (RFC 9051 §4.3, RFC 7888 `{n+}`); all grammar is imap-codec's.
//!
//! Limits are enforced *before* buffering: a line longer than its limit is reported as soon as
//! the limit is crossed, without waiting for its end; literal sizes are checked when announced.

use bytes::{Buf, BytesMut};

/// What a complete line ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Literal {
    /// `{n}`: the peer waits for a `+` continuation before sending the bytes.
    Sync(u64),
    /// `{n+}` (LITERAL+): the bytes follow immediately.
    NonSync(u64),
}

impl Literal {
    pub fn size(self) -> u64 {
        match self {
            Literal::Sync(n) | Literal::NonSync(n) => n,
        }
    }
}

/// One step of framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// A whole message (every line and literal, CRLF included).
    Message(Vec<u8>),
    /// The message so far ends with a literal announcement. The caller must either call
    /// [`Framer::accept_literal`] (after sending `+` for a synchronising literal) or
    /// [`Framer::reject_message`].
    LiteralAnnounced { literal: Literal, partial: Vec<u8> },
    /// The current line crossed its length limit before its end.
    LineTooLong,
    /// The message crossed the total size limit.
    MessageTooLong,
}

/// Which line limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineMode {
    /// Commands: `line_bytes`, or `sasl_bytes` for an `AUTHENTICATE` command line.
    Command,
    /// SASL continuation responses: `sasl_bytes`.
    Sasl,
    /// Server responses during the upstream login: announced literals are read at once.
    Response,
}

#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    pub line: usize,
    pub sasl_line: usize,
    pub literal: usize,
    pub message: usize,
}

/// The framer. Bytes go in with [`Framer::push`], frames come out of [`Framer::next_frame`].
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    limits: FrameLimits,
    mode: LineMode,
    /// The message assembled so far (lines and literals).
    message: Vec<u8>,
    /// Where the current line starts inside `message`-to-be (bytes of buf already scanned).
    scanned: usize,
    /// Literal bytes still to move from `buf` to `message`.
    literal_left: u64,
    /// A literal announcement awaits the caller's decision.
    awaiting_decision: bool,
}

impl Framer {
    pub fn new(limits: FrameLimits, mode: LineMode) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            mode,
            message: Vec::new(),
            scanned: 0,
            literal_left: 0,
            awaiting_decision: false,
        }
    }

    pub fn set_mode(&mut self, mode: LineMode) {
        self.mode = mode;
    }

    /// Adds received bytes. The caller reads more only when [`Frame::Incomplete`] was returned,
    /// so the buffer never holds more than one read beyond the current message.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a returned message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops everything: buffered bytes and the message in progress (STARTTLS).
    pub fn clear(&mut self) {
        use zeroize::Zeroize;
        self.buf.as_mut().zeroize();
        self.buf.clear();
        self.message.zeroize();
        self.scanned = 0;
        self.literal_left = 0;
        self.awaiting_decision = false;
    }

    /// Takes the bytes not yet framed (what a client pipelined behind its login).
    pub fn take_remaining(&mut self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.message.len() + self.buf.len());
        out.extend_from_slice(&self.message);
        out.extend_from_slice(&self.buf);
        self.clear();
        out
    }

    /// The announced literal will be sent: read it as part of the message.
    pub fn accept_literal(&mut self, literal: Literal) {
        self.awaiting_decision = false;
        self.literal_left = literal.size();
    }

    /// The announced literal was refused: drop the message. For a synchronising literal the
    /// peer sends nothing more for it (RFC 9051 §7.5), so framing resumes at the next line.
    pub fn reject_message(&mut self) {
        self.awaiting_decision = false;
        self.message.clear();
        self.scanned = 0;
        self.literal_left = 0;
    }

    fn line_limit(&self) -> usize {
        match self.mode {
            // Only a message's first line can be `tag AUTHENTICATE …` with a long SASL-IR; a
            // line after a literal never gets the larger limit.
            LineMode::Command => {
                let line = self
                    .buf
                    .get(..self.scanned.min(self.buf.len()))
                    .unwrap_or(&[]);
                if self.message.is_empty() && is_authenticate_line(line) {
                    self.limits.sasl_line
                } else {
                    self.limits.line
                }
            }
            LineMode::Sasl => self.limits.sasl_line,
            LineMode::Response => self.limits.line,
        }
    }

    /// Advances framing as far as the buffered bytes allow.
    pub fn next_frame(&mut self) -> Frame {
        if self.awaiting_decision {
            return Frame::Incomplete;
        }
        loop {
            if self.literal_left > 0 {
                let take = usize::try_from(self.literal_left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                if self.message.len() + take > self.limits.message {
                    return Frame::MessageTooLong;
                }
                self.message
                    .extend_from_slice(self.buf.get(..take).unwrap_or(&[]));
                self.buf.advance(take);
                self.literal_left -= take as u64;
                if self.literal_left > 0 {
                    return Frame::Incomplete;
                }
                continue;
            }
            let start = self.scanned;
            let found = self
                .buf
                .get(start..)
                .and_then(|rest| rest.iter().position(|b| *b == b'\n'));
            let Some(pos) = found else {
                self.scanned = self.buf.len();
                if self.scanned > self.line_limit() {
                    return Frame::LineTooLong;
                }
                return Frame::Incomplete;
            };
            let end = start + pos + 1;
            self.scanned = end;
            if end > self.line_limit() + 2 {
                return Frame::LineTooLong;
            }
            if self.message.len() + end > self.limits.message {
                return Frame::MessageTooLong;
            }
            let line = self.buf.split_to(end);
            self.scanned = 0;
            self.message.extend_from_slice(&line);
            match literal_announcement(&line) {
                None => return Frame::Message(std::mem::take(&mut self.message)),
                Some(literal) => {
                    if self.mode == LineMode::Response {
                        if literal.size() > self.limits.literal as u64 {
                            return Frame::MessageTooLong;
                        }
                        self.literal_left = literal.size();
                        continue;
                    }
                    self.awaiting_decision = true;
                    return Frame::LiteralAnnounced {
                        literal,
                        partial: self.message.clone(),
                    };
                }
            }
        }
    }
}

impl Drop for Framer {
    /// Buffered bytes may hold a password: wipe them.
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.buf.as_mut().zeroize();
        self.message.zeroize();
    }
}

/// `{digits}` or `{digits+}` right before the line ending. Sizes that overflow `u64` are
/// reported as `u64::MAX` so that the caller refuses them as too large.
pub fn literal_announcement(line: &[u8]) -> Option<Literal> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let body = inner.get(open + 1..)?;
    let (digits, non_sync) = match body.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (body, false),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(u64::MAX);
    Some(if non_sync {
        Literal::NonSync(n)
    } else {
        Literal::Sync(n)
    })
}

/// Whether a (partial) line is `tag AUTHENTICATE …`, whose SASL-IR may be long.
fn is_authenticate_line(line: &[u8]) -> bool {
    let mut words = line.splitn(3, |b| *b == b' ');
    let _tag = words.next();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"AUTHENTICATE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framer() -> Framer {
        Framer::new(
            FrameLimits {
                line: 64,
                sasl_line: 128,
                literal: 16,
                message: 256,
            },
            LineMode::Command,
        )
    }

    #[test]
    fn lines_and_pipelining() {
        let mut f = framer();
        f.push(b"a NOOP\r\nb CAPA");
        assert_eq!(f.next_frame(), Frame::Message(b"a NOOP\r\n".to_vec()));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.push(b"BILITY\r\nc LOGOUT\r\n");
        assert_eq!(f.next_frame(), Frame::Message(b"b CAPABILITY\r\n".to_vec()));
        assert_eq!(&f.take_remaining()[..], b"c LOGOUT\r\n");
    }

    #[test]
    fn literal_flow() {
        let mut f = framer();
        f.push(b"a LOGIN {5}\r\n");
        let Frame::LiteralAnnounced { literal, .. } = f.next_frame() else {
            panic!()
        };
        assert_eq!(literal, Literal::Sync(5));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.accept_literal(literal);
        f.push(b"alice pw\r\nb NOOP\r\n");
        assert_eq!(
            f.next_frame(),
            Frame::Message(b"a LOGIN {5}\r\nalice pw\r\n".to_vec())
        );
        assert_eq!(f.next_frame(), Frame::Message(b"b NOOP\r\n".to_vec()));
    }

    #[test]
    fn rejected_literal_resyncs() {
        let mut f = framer();
        f.push(b"a LOGIN {999}\r\nb NOOP\r\n");
        let Frame::LiteralAnnounced { literal, .. } = f.next_frame() else {
            panic!()
        };
        assert_eq!(literal, Literal::Sync(999));
        f.reject_message();
        assert_eq!(f.next_frame(), Frame::Message(b"b NOOP\r\n".to_vec()));
    }

    #[test]
    fn announcements() {
        assert_eq!(literal_announcement(b"a {5}\r\n"), Some(Literal::Sync(5)));
        assert_eq!(
            literal_announcement(b"a {5+}\r\n"),
            Some(Literal::NonSync(5))
        );
        assert_eq!(
            literal_announcement(b"a {4294967296}\r\n"),
            Some(Literal::Sync(4_294_967_296))
        );
        assert_eq!(
            literal_announcement(b"a {18446744073709551616}\r\n"),
            Some(Literal::Sync(u64::MAX))
        );
        assert_eq!(literal_announcement(b"a {-1}\r\n"), None);
        assert_eq!(literal_announcement(b"a {}\r\n"), None);
        assert_eq!(literal_announcement(b"a {5} x\r\n"), None);
    }

    #[test]
    fn long_line_detected_before_its_end() {
        let mut f = framer();
        f.push(&[b'x'; 65]);
        assert_eq!(f.next_frame(), Frame::LineTooLong);
    }

    #[test]
    fn authenticate_lines_get_the_sasl_limit() {
        let mut f = framer();
        let mut line = b"a AUTHENTICATE PLAIN ".to_vec();
        line.extend(std::iter::repeat_n(b'A', 90));
        f.push(&line);
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.push(b"\r\n");
        assert!(matches!(f.next_frame(), Frame::Message(_)));
        let mut g = framer();
        let mut line = b"a LOGIN ".to_vec();
        line.extend(std::iter::repeat_n(b'A', 90));
        g.push(&line);
        assert_eq!(g.next_frame(), Frame::LineTooLong);
    }

    #[test]
    fn response_mode_reads_literals_at_once() {
        let mut f = Framer::new(
            FrameLimits {
                line: 64,
                sasl_line: 64,
                literal: 16,
                message: 256,
            },
            LineMode::Response,
        );
        f.push(b"* ID (\"name\" {3}\r\nabc)\r\n");
        assert_eq!(
            f.next_frame(),
            Frame::Message(b"* ID (\"name\" {3}\r\nabc)\r\n".to_vec())
        );
    }
}
