//! What the SMTP front says: its fixed replies (RFC 5321 §4.2 codes with RFC 2034 / RFC 3463
//! enhanced status codes, RFC 4954 §6 for AUTH) and the replies it builds from configuration —
//! the EHLO extension list and the `535` with the operator's sign-in alert.
//!
//! Nothing here contains a byte the client sent. Text from configuration or from the backend
//! (host name, alert, service extensions) is reduced to printable ASCII before it is put on a
//! line, so a reply is always whole CRLF-terminated lines.

/// Backend EHLO keywords never offered to the client (compared case-insensitively):
/// authentication and TLS are the gateway's (`AUTH`, `STARTTLS`, and Exchange's `X-EXPS`
/// authentication and `X-ANONYMOUSTLS`), and the backend trusts the gateway, not the client,
/// to tell it who connected (Postfix `XCLIENT`, `XFORWARD`). The legacy `AUTH=…` form is not a
/// valid keyword and is dropped with the other malformed lines.
pub const WITHHELD_EXTENSIONS: [&str; 6] = [
    "AUTH",
    "STARTTLS",
    "XCLIENT",
    "XFORWARD",
    "X-EXPS",
    "X-ANONYMOUSTLS",
];

/// Reply text is cut into lines of at most this many characters (an SMTP reply line holds
/// 512 octets with code and CRLF, RFC 5321 §4.5.3.1.5).
const TEXT_LINE_CHARS: usize = 400;

pub(super) const OK: &[u8] = b"250 2.0.0 OK\r\n";
pub(super) const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
pub(super) const UNRECOGNIZED: &[u8] = b"500 5.5.2 Syntax error, command unrecognized\r\n";
pub(super) const LINE_TOO_LONG: &[u8] = b"500 5.5.6 Line too long\r\n";
pub(super) const SASL_LINE_TOO_LONG: &[u8] =
    b"500 5.5.6 Authentication Exchange line is too long\r\n";
pub(super) const AUTH_REQUIRED: &[u8] = b"530 5.7.0 Authentication required\r\n";
pub(super) const STARTTLS_FIRST: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
pub(super) const EHLO_SYNTAX: &[u8] = b"501 5.5.4 Syntax: EHLO hostname\r\n";
pub(super) const HELO_SYNTAX: &[u8] = b"501 5.5.4 Syntax: HELO hostname\r\n";
pub(super) const EHLO_FIRST: &[u8] = b"503 5.5.1 EHLO first\r\n";
pub(super) const TLS_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
pub(super) const NO_STARTTLS: &[u8] = b"502 5.5.1 STARTTLS not offered\r\n";
pub(super) const STARTTLS_SYNTAX: &[u8] = b"501 5.5.4 Syntax: STARTTLS\r\n";
pub(super) const READY_FOR_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
pub(super) const AUTH_SYNTAX: &[u8] = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n";
pub(super) const UNKNOWN_MECHANISM: &[u8] = b"504 5.5.4 Unrecognized authentication type\r\n";
pub(super) const BAD_BASE64: &[u8] = b"501 5.5.2 Invalid base64 data\r\n";
pub(super) const CANCELLED: &[u8] = b"501 5.0.0 Authentication cancelled\r\n";
/// The empty server challenge that asks for the client's first SASL response.
pub(super) const EMPTY_CHALLENGE: &[u8] = b"334 \r\n";
/// AUTH LOGIN's prompts: base64 of `Username:` and `Password:`.
pub(super) const LOGIN_USER_PROMPT: &[u8] = b"334 VXNlcm5hbWU6\r\n";
pub(super) const LOGIN_PASSWORD_PROMPT: &[u8] = b"334 UGFzc3dvcmQ6\r\n";
pub(super) const AUTH_OK: &[u8] = b"235 2.7.0 Authentication successful\r\n";
pub(super) const AUTH_FAILED: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";
pub(super) const TEMPORARY_FAILURE: &[u8] = b"454 4.7.0 Temporary authentication failure\r\n";
pub(super) const TOO_MANY_SESSIONS: &[u8] = b"454 4.7.0 Too many sessions for this user\r\n";

/// Printable ASCII only: what is left of configuration text once nothing could break a line.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect()
}

/// A reply of several lines: `code-text` for all but the last, `code text` for the last
/// (RFC 5321 §4.2.1).
pub(super) fn multiline(code: &str, lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        let sep = if i == last { ' ' } else { '-' };
        out.extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
    }
    out
}

/// The `535` to every failed password login, whatever failed (DESIGN.md invariant 5). With a
/// sign-in alert (pointing at the portal), the operator's text comes first as `535-5.7.8`
/// lines, cut to fit, so a client shows it with the failure.
pub(super) fn failed_reply(alert: Option<&str>) -> Vec<u8> {
    let text = printable(alert.unwrap_or_default());
    let mut lines: Vec<String> = text
        .trim()
        .as_bytes()
        .chunks(TEXT_LINE_CHARS)
        .map(|chunk| format!("5.7.8 {}", String::from_utf8_lossy(chunk).trim()))
        .collect();
    if lines.is_empty() {
        return AUTH_FAILED.to_vec();
    }
    lines.push("5.7.8 Authentication credentials invalid".to_owned());
    multiline("535", &lines)
}

/// What the EHLO reply offers.
pub(super) struct Offer<'a> {
    pub(super) hostname: &'a str,
    /// The connection is TLS: AUTH is offered and STARTTLS is not.
    pub(super) tls: bool,
    /// STARTTLS is offered before TLS.
    pub(super) starttls: bool,
    /// Token mechanisms are offered after TLS.
    pub(super) oauth: bool,
    /// The backend's service extensions, passed on after TLS (filtered).
    pub(super) backend: &'a [String],
}

/// The EHLO reply (RFC 5321 §4.1.1.1): `250-<hostname>`, one line per extension, the last
/// one `250 `. Before TLS: `ENHANCEDSTATUSCODES` and `STARTTLS` only, nothing that suggests
/// AUTH (RFC 3207 §4.2, RFC 4954 §4). After TLS: the backend's extensions without
/// [`WITHHELD_EXTENSIONS`], `ENHANCEDSTATUSCODES` (RFC 2034) if the backend lacks it, and the
/// gateway's `AUTH` mechanisms.
pub(super) fn ehlo(offer: &Offer<'_>) -> Vec<u8> {
    let mut lines: Vec<String> = vec![offer.hostname.to_owned()];
    if offer.tls {
        let mut enhanced = false;
        for ext in offer.backend {
            let Some((keyword, ext)) = clean_extension(ext) else {
                continue;
            };
            if WITHHELD_EXTENSIONS
                .iter()
                .any(|w| keyword.eq_ignore_ascii_case(w))
            {
                continue;
            }
            enhanced |= keyword.eq_ignore_ascii_case("ENHANCEDSTATUSCODES");
            lines.push(ext.to_owned());
        }
        if !enhanced {
            lines.push("ENHANCEDSTATUSCODES".to_owned());
        }
        lines.push(if offer.oauth {
            "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER".to_owned()
        } else {
            "AUTH PLAIN LOGIN".to_owned()
        });
    } else {
        lines.push("ENHANCEDSTATUSCODES".to_owned());
        if offer.starttls {
            lines.push("STARTTLS".to_owned());
        }
    }
    multiline("250", &lines)
}

/// A backend EHLO line if it is well-formed: printable ASCII, a keyword of letters, digits
/// and `-` (RFC 5321 §4.1.1.1 `ehlo-keyword`), at most a reply line long. Returns the
/// keyword and the trimmed line.
fn clean_extension(ext: &str) -> Option<(&str, &str)> {
    let ext = ext.trim();
    let printable = ext.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    let keyword = ext.split(' ').next().unwrap_or_default();
    let keyword_ok = keyword
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && keyword
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (printable && keyword_ok && ext.len() <= TEXT_LINE_CHARS).then_some((keyword, ext))
}
