//! The SMTP relay's guard: after the handover the bytes still flow as they are, except that the
//! client may no longer speak for the gateway.
//!
//! Why IMAP's plain copy is not enough here: the backend trusts the gateway's connection. Postfix
//! allows XCLIENT on it; Postfix 3.7 checks a second XCLIENT against the address the first one
//! set, so a client inside `smtpd_authorized_xclient_hosts` (an internal network in a broad
//! list, as in tests/gateway/mail_fronts.rs) that sent `XCLIENT LOGIN=someone-else` through a
//! plain copy would become someone else, and older Postfix versions decided once, from the
//! gateway's own address. `XFORWARD` would forge the logged client, and a second `AUTH` or a
//! `STARTTLS` to the backend is nothing a client of the gateway needs. So the client's command
//! lines are read (bounded) and those verbs end the session with `421`; the message itself is
//! never looked at, only its end is found:
//! - `DATA`: RFC 2920 makes it the last command of a pipelined group: the client waits for the
//!   `354`. The guard holds any later client bytes until the backend has answered every
//!   command sent so far, then knows from that answer whether the message follows (`354`) or
//!   the next bytes are commands again. A client that pipelines text behind a refused `DATA`
//!   therefore cannot smuggle commands through the message, nor a message through the command
//!   reader.
//! - `BDAT n` (RFC 3030): the next n octets are message, whatever the reply.
//!
//! Replies are counted (one per command; a multi-line reply ends at its line with a space after
//! the code). The backend's answer to a later `EHLO` is shown without `AUTH`, `STARTTLS`,
//! `XCLIENT` and `XFORWARD`, as the capabilities after an IMAP login are.
//!
//! Sans-I/O, like the fronts: bytes in, bytes to forward out; `relay.rs` does the I/O.

use std::collections::VecDeque;

/// A command line the guard reads whole before forwarding it (RFC 5321 allows 512 octets,
/// extensions more; 8 KiB is generous). A longer one ends the session.
pub const MAX_COMMAND: usize = 8 * 1024;
/// A reply line from the backend, and a whole EHLO reply, are bounded alike.
pub const MAX_REPLY_LINE: usize = 8 * 1024;
const MAX_EHLO_REPLY: usize = 64 * 1024;
/// Commands forwarded and not yet answered (a pipelined group is a handful; RFC 2920 servers
/// answer them all).
pub const MAX_PENDING: usize = 1000;

/// Why the session ends (the client broke a rule of the relayed session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// XCLIENT, XFORWARD, AUTH or STARTTLS after the handover.
    Forbidden,
    /// A command line longer than [`MAX_COMMAND`], or too many unanswered commands.
    TooLong,
}

impl Violation {
    /// The `reason` of the audit's `session` `ended` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::Forbidden => "forbidden_command",
            Violation::TooLong => "command_too_long",
        }
    }

    /// The client's last line.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Violation::Forbidden => b"421 4.7.0 Command not allowed after authentication\r\n",
            Violation::TooLong => b"421 4.7.0 Line too long or too many commands\r\n",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Data,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading command lines.
    Command,
    /// DATA went out: nothing more until the backend answered everything.
    AwaitData,
    /// Inside a message after `354`: `matched` octets of `\r\n.\r\n` seen.
    Message { matched: u8 },
    /// Inside a BDAT chunk: this many octets still to pass.
    Chunk { left: u64 },
}

/// One relayed SMTP session's guard.
#[derive(Debug)]
pub struct SmtpGuard {
    mode: Mode,
    /// A client command line not yet complete.
    line: Vec<u8>,
    pending: VecDeque<Verb>,
    /// A backend reply line not yet complete.
    reply_line: Vec<u8>,
    /// The lines of an EHLO reply being filtered.
    ehlo: Vec<Vec<u8>>,
    ehlo_len: usize,
    /// The code of the last complete reply (for DATA's answer).
    last_code: [u8; 3],
}

impl Default for SmtpGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl SmtpGuard {
    pub fn new() -> Self {
        Self {
            mode: Mode::Command,
            line: Vec::new(),
            pending: VecDeque::new(),
            reply_line: Vec::new(),
            ehlo: Vec::new(),
            ehlo_len: 0,
            last_code: *b"000",
        }
    }

    /// The client must wait: DATA's answer is not in yet.
    pub fn waiting(&self) -> bool {
        self.mode == Mode::AwaitData
    }

    /// Client bytes: appends what may go to the backend to `out` and returns how many input
    /// bytes were used; fewer than given while [`Self::waiting`] (call again with the rest once
    /// it is not).
    pub fn from_client(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Violation> {
        let mut at = 0;
        while at < input.len() {
            let rest = input.get(at..).unwrap_or(&[]);
            match self.mode {
                Mode::AwaitData => return Ok(at),
                Mode::Chunk { left } => {
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(rest.get(..n).unwrap_or(&[]));
                    at += n;
                    let left = left - n as u64;
                    self.mode = if left == 0 {
                        Mode::Command
                    } else {
                        Mode::Chunk { left }
                    };
                }
                Mode::Message { matched } => {
                    let (n, done) = end_of_data(rest, matched);
                    out.extend_from_slice(rest.get(..n).unwrap_or(&[]));
                    at += n;
                    match done {
                        Ok(()) => {
                            // The message's own reply.
                            self.expect(Verb::Other)?;
                            self.mode = Mode::Command;
                        }
                        Err(m) => self.mode = Mode::Message { matched: m },
                    }
                }
                Mode::Command => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        if self.line.len() + rest.len() > MAX_COMMAND {
                            return Err(Violation::TooLong);
                        }
                        self.line.extend_from_slice(rest);
                        return Ok(input.len());
                    };
                    let part = rest.get(..=nl).unwrap_or(rest);
                    if self.line.len() + part.len() > MAX_COMMAND {
                        return Err(Violation::TooLong);
                    }
                    self.line.extend_from_slice(part);
                    at += part.len();
                    let line = std::mem::take(&mut self.line);
                    self.command(&line)?;
                    out.extend_from_slice(&line);
                }
            }
        }
        Ok(at)
    }

    /// Decides on one whole command line (with its line end).
    fn command(&mut self, line: &[u8]) -> Result<(), Violation> {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let mut words = text.split(|b| *b == b' ').filter(|w| !w.is_empty());
        let verb = words.next().unwrap_or(&[]);
        let is = |v: &str| verb.eq_ignore_ascii_case(v.as_bytes());
        if is("XCLIENT") || is("XFORWARD") || is("AUTH") || is("STARTTLS") {
            return Err(Violation::Forbidden);
        }
        if is("BDAT") {
            self.expect(Verb::Other)?;
            // An unreadable size: the backend refuses the command and reads no chunk.
            if let Some(n) = words
                .next()
                .and_then(|w| std::str::from_utf8(w).ok())
                .and_then(|w| w.parse::<u64>().ok())
            {
                if n > 0 {
                    self.mode = Mode::Chunk { left: n };
                }
            }
            return Ok(());
        }
        if is("DATA") {
            self.expect(Verb::Data)?;
            self.mode = Mode::AwaitData;
            return Ok(());
        }
        self.expect(if is("EHLO") { Verb::Ehlo } else { Verb::Other })
    }

    fn expect(&mut self, verb: Verb) -> Result<(), Violation> {
        if self.pending.len() >= MAX_PENDING {
            return Err(Violation::TooLong);
        }
        self.pending.push_back(verb);
        Ok(())
    }

    /// Backend bytes: appends what goes to the client to `out`. Replies are passed on as they
    /// are, except an EHLO reply's AUTH, STARTTLS, XCLIENT and XFORWARD lines. Returns true when
    /// the client may go on after a DATA (its answer arrived).
    pub fn from_backend(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        let was_waiting = self.waiting();
        let mut rest = input;
        while !rest.is_empty() {
            let (part, complete) = match memchr::memchr(b'\n', rest) {
                Some(nl) => (rest.get(..=nl).unwrap_or(rest), true),
                None => (rest, false),
            };
            rest = rest.get(part.len()..).unwrap_or(&[]);
            let filtering = self.pending.front() == Some(&Verb::Ehlo);
            if !filtering {
                // Passed on at once; only the line's start is kept to see where replies end.
                out.extend_from_slice(part);
                if self.reply_line.len() < 4 {
                    let take = (4 - self.reply_line.len()).min(part.len());
                    self.reply_line
                        .extend_from_slice(part.get(..take).unwrap_or(&[]));
                }
                if complete {
                    let head = std::mem::take(&mut self.reply_line);
                    self.reply_line_done(&head, out);
                }
                continue;
            }
            // An EHLO reply is gathered whole (bounded), then filtered.
            if self.reply_line.len() + part.len() <= MAX_REPLY_LINE {
                self.reply_line.extend_from_slice(part);
            }
            if complete {
                let line = std::mem::take(&mut self.reply_line);
                self.reply_line_done(&line, out);
            }
        }
        was_waiting && !self.waiting()
    }

    /// One whole reply line (for an EHLO reply the line itself, else its first bytes).
    fn reply_line_done(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let last = line.get(3).is_none_or(|b| *b != b'-');
        let ehlo = self.pending.front() == Some(&Verb::Ehlo);
        if ehlo {
            if self.ehlo_len + line.len() <= MAX_EHLO_REPLY {
                self.ehlo_len += line.len();
                self.ehlo.push(line.to_vec());
            }
            if last {
                write_ehlo(std::mem::take(&mut self.ehlo), out);
                self.ehlo_len = 0;
            }
        }
        if !last {
            return;
        }
        if let Some(code) = line.get(..3) {
            self.last_code.copy_from_slice(code);
        }
        // A reply nobody asked for (a 421 before closing) answers nothing.
        let answered = self.pending.pop_front();
        if answered == Some(Verb::Data) && self.pending.is_empty() {
            self.mode = if &self.last_code == b"354" {
                Mode::Message { matched: 2 }
            } else {
                Mode::Command
            };
        } else if self.mode == Mode::AwaitData && self.pending.is_empty() {
            self.mode = Mode::Command;
        }
    }
}

/// Writes an EHLO reply without the extensions that are the gateway's business, keeping the
/// continuation marks right (the last line kept gets `250 `).
fn write_ehlo(lines: Vec<Vec<u8>>, out: &mut Vec<u8>) {
    let hidden = |l: &[u8]| {
        let keyword = l
            .get(4..)
            .unwrap_or(&[])
            .split(|b| matches!(b, b' ' | b'=' | b'\r' | b'\n'))
            .next()
            .unwrap_or(&[]);
        ["AUTH", "STARTTLS", "XCLIENT", "XFORWARD"]
            .iter()
            .any(|k| keyword.eq_ignore_ascii_case(k.as_bytes()))
    };
    let ok = lines.first().is_some_and(|l| l.starts_with(b"250"));
    let kept: Vec<&Vec<u8>> = lines
        .iter()
        .enumerate()
        .filter(|(i, l)| !ok || *i == 0 || !hidden(l))
        .map(|(_, l)| l)
        .collect();
    let n = kept.len();
    for (i, l) in kept.into_iter().enumerate() {
        match l.get(..4) {
            Some(head) if ok && head.get(..3) == Some(b"250") => {
                out.extend_from_slice(b"250");
                out.push(if i + 1 == n { b' ' } else { b'-' });
                out.extend_from_slice(l.get(4..).unwrap_or(&[]));
            }
            _ => out.extend_from_slice(l),
        }
    }
}

/// Finds the end of a message (`\r\n.\r\n`, RFC 5321 §4.1.1.4) in `input`, `matched` octets of
/// it already seen. Returns how many octets belong to the message (all of `input`, or up to
/// and including the end) and whether the end was found (else the new `matched`).
fn end_of_data(input: &[u8], mut matched: u8) -> (usize, Result<(), u8>) {
    const END: &[u8; 5] = b"\r\n.\r\n";
    let mut i = 0;
    while i < input.len() {
        if matched == 0 {
            // Skip to the next CR: the common case moves at memchr's speed.
            match memchr::memchr(b'\r', input.get(i..).unwrap_or(&[])) {
                Some(p) => i += p,
                None => return (input.len(), Err(0)),
            }
        }
        let b = input.get(i).copied().unwrap_or(0);
        if END.get(usize::from(matched)) == Some(&b) {
            matched += 1;
            i += 1;
            if usize::from(matched) == END.len() {
                return (i, Ok(()));
            }
        } else {
            matched = u8::from(b == b'\r');
            i += 1;
        }
    }
    (input.len(), Err(matched))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(g: &mut SmtpGuard, s: &str) -> Result<(String, usize), Violation> {
        let mut out = Vec::new();
        let n = g.from_client(s.as_bytes(), &mut out)?;
        Ok((String::from_utf8(out).unwrap(), n))
    }

    fn backend(g: &mut SmtpGuard, s: &str) -> String {
        let mut out = Vec::new();
        g.from_backend(s.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn commands_and_a_message_pass_unchanged() {
        let mut g = SmtpGuard::new();
        let group = "MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n";
        assert_eq!(client(&mut g, group).unwrap(), (group.into(), group.len()));
        assert!(g.waiting());
        // The message typed ahead of the 354 is held.
        let msg = "Subject: hi\r\n\r\n..dot-stuffed\r\n.\r\nQUIT\r\n";
        assert_eq!(client(&mut g, msg).unwrap(), (String::new(), 0));
        assert_eq!(
            backend(&mut g, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"),
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        );
        assert!(g.waiting());
        let mut out = Vec::new();
        assert!(g.from_backend(b"354 End data with <CR><LF>.<CR><LF>\r\n", &mut out));
        assert_eq!(client(&mut g, msg).unwrap(), (msg.into(), msg.len()));
        // The message's reply and QUIT's are both expected.
        assert_eq!(g.pending.len(), 2);
    }

    #[test]
    fn commands_behind_a_refused_data_are_read_as_commands() {
        let mut g = SmtpGuard::new();
        client(&mut g, "DATA\r\n").unwrap();
        let smuggled = "XCLIENT LOGIN=ceo@example.org\r\n";
        assert_eq!(client(&mut g, smuggled).unwrap().1, 0, "held");
        backend(&mut g, "554 5.5.1 Error: no valid recipients\r\n");
        assert!(!g.waiting());
        assert_eq!(client(&mut g, smuggled), Err(Violation::Forbidden));
        // …and behind an accepted one they are message text.
        let mut g = SmtpGuard::new();
        client(&mut g, "DATA\r\n").unwrap();
        backend(&mut g, "354 go\r\n");
        let text = "XCLIENT LOGIN=ceo@example.org\r\n.\r\n";
        assert_eq!(client(&mut g, text).unwrap().0, text);
    }

    #[test]
    fn the_backend_trusting_the_gateway_is_not_the_clients_to_use() {
        for line in [
            "XCLIENT LOGIN=ceo@example.org ADDR=10.0.0.1\r\n",
            "xforward ADDR=10.0.0.1\r\n",
            "AUTH PLAIN AGNlbwBwdw==\r\n",
            "STARTTLS\r\n",
            "  Xclient LOGIN=x\n",
        ] {
            let mut g = SmtpGuard::new();
            let mut out = Vec::new();
            assert_eq!(
                g.from_client(line.as_bytes(), &mut out),
                Err(Violation::Forbidden),
                "{line}"
            );
            assert!(out.is_empty(), "{line} forwarded");
        }
        // Split across reads: nothing of it goes out before the line is whole.
        let mut g = SmtpGuard::new();
        assert_eq!(
            client(&mut g, "NOOP\r\nXCLI").unwrap(),
            ("NOOP\r\n".into(), 10)
        );
        assert_eq!(client(&mut g, "ENT LOGIN=x\r\n"), Err(Violation::Forbidden));
    }

    #[test]
    fn bdat_chunks_are_message_whatever_they_hold() {
        let mut g = SmtpGuard::new();
        let s = "BDAT 19 LAST\r\nXCLIENT LOGIN=x\r\n\r\nNOOP\r\n";
        let (out, n) = client(&mut g, s).unwrap();
        assert_eq!((out.as_str(), n), (s, s.len()));
        assert_eq!(g.mode, Mode::Command);
        assert_eq!(g.pending.len(), 2);
        // A chunk split over reads.
        let mut g = SmtpGuard::new();
        client(&mut g, "BDAT 10\r\nAUTH").unwrap();
        assert_eq!(g.mode, Mode::Chunk { left: 6 });
        // The chunk's last 6 octets, then an (empty) command line.
        assert_eq!(client(&mut g, " PLAIN\r\n").unwrap().0, " PLAIN\r\n");
        assert_eq!(g.mode, Mode::Command);
        assert_eq!(client(&mut g, "AUTH x\r\n"), Err(Violation::Forbidden));
    }

    #[test]
    fn a_later_ehlo_shows_the_backend_without_the_gateways_business() {
        let mut g = SmtpGuard::new();
        client(&mut g, "EHLO me\r\n").unwrap();
        let reply = "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR LOGIN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN\r\n250-8BITMIME\r\n250 XFORWARD NAME ADDR\r\n";
        // In two reads, split inside a line.
        let (a, b) = reply.split_at(50);
        let out = backend(&mut g, a) + &backend(&mut g, b);
        assert_eq!(
            out,
            "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
        );
        assert!(g.pending.is_empty());
        // A refused EHLO passes as it is.
        client(&mut g, "EHLO\r\n").unwrap();
        assert_eq!(
            backend(&mut g, "501 5.5.4 Syntax\r\n"),
            "501 5.5.4 Syntax\r\n"
        );
    }

    #[test]
    fn bounds_hold() {
        let mut g = SmtpGuard::new();
        let long = "A".repeat(MAX_COMMAND + 1);
        assert_eq!(client(&mut g, &long), Err(Violation::TooLong));
        let mut g = SmtpGuard::new();
        let many = "NOOP\r\n".repeat(MAX_PENDING + 1);
        assert_eq!(client(&mut g, &many), Err(Violation::TooLong));
        // An unsolicited reply (a 421 on its way out) answers nothing and does no harm.
        let mut g = SmtpGuard::new();
        assert_eq!(backend(&mut g, "421 4.4.2 bye\r\n"), "421 4.4.2 bye\r\n");
    }

    #[test]
    fn the_end_of_a_message_is_found_across_reads() {
        // The CRLF ending DATA's line counts: an empty message is ".\r\n" right away.
        assert_eq!(end_of_data(b".\r\nNOOP", 2), (3, Ok(())));
        assert_eq!(end_of_data(b"abc\r\n.\r", 0), (7, Err(4)));
        assert_eq!(end_of_data(b"\n", 4), (1, Ok(())));
        assert_eq!(end_of_data(b"a\r\n..\r\n", 0), (7, Err(2)));
        assert_eq!(end_of_data(b"\r\r\n.\r\nX", 0), (6, Ok(())));
        assert_eq!(end_of_data(b"no end here", 2), (11, Err(0)));
    }
}
