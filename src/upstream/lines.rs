//! Lines from a backend during the SMTP and POP3 logins, bounded before they are kept.
//!
//! Both protocols end a line with CRLF (RFC 5321 §2.3.8, RFC 1939 §3); a bare LF is taken as
//! the end of a line too, since nothing the gateway reads during a login depends on the
//! difference. Limits: a line of at most [`MAX_LINE`] bytes (RFC 5321 §4.5.3.1.5 allows 512
//! octets for a reply line, RFC 2449 §4 512 for a POP3 response; the slack is for servers that
//! ignore that), and at most twice that buffered at once, so a hostile backend cannot grow the
//! gateway's memory by talking without end.

use bytes::BytesMut;

/// The longest line taken from a backend, without its line ending.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// The most bytes held at once. The drivers feed at most one read (a few KiB) between steps,
/// and every step takes the complete lines out, so only a hostile backend reaches this.
const MAX_BUFFERED: usize = 2 * MAX_LINE;

/// One result of [`Lines::next`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// No complete line yet: read more.
    Incomplete,
    /// A line without its CRLF (or LF).
    Complete(BytesMut),
    /// A line over [`MAX_LINE`], or more than the buffer may hold: the backend is not to be
    /// trusted any further.
    TooLong,
}

/// A bounded buffer of the bytes a backend sent, cut into lines.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: BytesMut,
    /// Set once too much arrived; sticky, the buffer is dropped.
    overflow: bool,
}

impl Lines {
    /// Appends what the backend sent (dropped, and the buffer poisoned, past the bound).
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len().saturating_add(bytes.len()) > MAX_BUFFERED {
            self.overflow = true;
            self.buf = BytesMut::new();
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, if there is one.
    pub(crate) fn next(&mut self) -> Line {
        if self.overflow {
            return Line::TooLong;
        }
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) if end <= MAX_LINE + 1 => {
                let mut line = self.buf.split_to(end.saturating_add(1));
                line.truncate(end);
                if line.ends_with(b"\r") {
                    line.truncate(end.saturating_sub(1));
                }
                if line.len() > MAX_LINE {
                    return self.poison();
                }
                Line::Complete(line)
            }
            Some(_) => self.poison(),
            None if self.buf.len() > MAX_LINE + 1 => self.poison(),
            None => Line::Incomplete,
        }
    }

    fn poison(&mut self) -> Line {
        self.overflow = true;
        self.buf = BytesMut::new();
        Line::TooLong
    }

    /// How many bytes wait behind the last complete line.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything received (after STARTTLS / STLS: what came in clear is not kept).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }

    /// What is left in the buffer, for the relay.
    pub(crate) fn take_remaining(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_with_crlf_or_lf_and_partial_lines_wait() {
        let mut l = Lines::default();
        l.push(b"220 a\r\n250 b\n25");
        assert_eq!(l.next(), Line::Complete(BytesMut::from(&b"220 a"[..])));
        assert_eq!(l.next(), Line::Complete(BytesMut::from(&b"250 b"[..])));
        assert_eq!(l.next(), Line::Incomplete);
        assert_eq!(l.buffered(), 2);
        l.push(b"0 c\r\n");
        assert_eq!(l.next(), Line::Complete(BytesMut::from(&b"250 c"[..])));
    }

    #[test]
    fn an_endless_line_is_refused_without_being_kept() {
        let mut l = Lines::default();
        let chunk = [b'a'; 4096];
        let mut refused = false;
        for _ in 0..1000 {
            l.push(&chunk);
            assert!(l.buffered() <= MAX_BUFFERED);
            match l.next() {
                Line::Incomplete => {}
                Line::TooLong => {
                    refused = true;
                    break;
                }
                Line::Complete(_) => panic!("no line ended"),
            }
        }
        assert!(refused);
        assert!(l.buffered() == 0);
        // Sticky: a line ending later does not bring the stream back.
        l.push(b"\r\n220 ok\r\n");
        assert_eq!(l.next(), Line::TooLong);
    }

    #[test]
    fn a_line_of_exactly_the_limit_passes_and_one_more_byte_does_not() {
        let mut ok = vec![b'x'; MAX_LINE];
        ok.extend_from_slice(b"\r\n");
        let mut l = Lines::default();
        l.push(&ok);
        assert!(matches!(l.next(), Line::Complete(b) if b.len() == MAX_LINE));
        let mut long = vec![b'x'; MAX_LINE + 1];
        long.extend_from_slice(b"\r\n");
        let mut l = Lines::default();
        l.push(&long);
        assert_eq!(l.next(), Line::TooLong);
    }

    #[test]
    fn one_huge_chunk_poisons_the_buffer() {
        let mut l = Lines::default();
        l.push(&vec![b'\n'; MAX_BUFFERED + 1]);
        assert_eq!(l.buffered(), 0);
        assert_eq!(l.next(), Line::TooLong);
    }
}
