//! The client's own name and version from its IMAP `ID` command (RFC 2971), for the audit line.
//!
//! Only the `name` and `version` fields are kept (RFC 2971 §3.3: field names are not
//! case-sensitive; the first occurrence wins); every other field (`os`, `support-url`, a
//! client's own extensions, which may carry an address or a device id) is never looked at.
//! The values are the client's words, so before they reach a log line they are reduced to
//! printable ASCII without `"` and `\` and cut to [`MAX_CLIENT_ID_CHARS`] characters; a value
//! that has nothing left, or was `NIL`, is dropped. A CR/LF, a quote or an escape sequence can
//! therefore never forge a field or a line, in the JSON, ECS or syslog form of the audit log.
//! The whole `ID` command is already bounded by the pre-auth line and literal limits.

/// At most this many characters of each value are kept.
pub const MAX_CLIENT_ID_CHARS: usize = 64;

/// What the client said about itself; both empty when it sent no `ID` (or nothing usable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientId {
    pub name: Option<String>,
    pub version: Option<String>,
}

impl ClientId {
    /// From the `ID` parameter list: (field, value or NIL) pairs, as the client sent them.
    pub fn from_params<I, K, V>(params: I) -> ClientId
    where
        I: IntoIterator<Item = (K, Option<V>)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut id = ClientId::default();
        let (mut seen_name, mut seen_version) = (false, false);
        for (key, value) in params {
            let key = key.as_ref();
            let slot = if key.eq_ignore_ascii_case(b"name") && !seen_name {
                seen_name = true;
                &mut id.name
            } else if key.eq_ignore_ascii_case(b"version") && !seen_version {
                seen_version = true;
                &mut id.version
            } else {
                continue;
            };
            *slot = value.and_then(|v| clean(v.as_ref()));
        }
        id
    }

    /// The name, or "" (the audit line's `client_name`).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// The version, or "" (the audit line's `client_version`).
    pub fn version(&self) -> &str {
        self.version.as_deref().unwrap_or("")
    }
}

/// Printable ASCII except `"` and `\`, at most [`MAX_CLIENT_ID_CHARS`]; None when empty.
fn clean(raw: &[u8]) -> Option<String> {
    let s: String = raw
        .iter()
        .filter(|b| (0x20..0x7f).contains(*b) && **b != b'"' && **b != b'\\')
        .take(MAX_CLIENT_ID_CHARS)
        .map(|b| char::from(*b))
        .collect();
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(params: &[(&str, Option<&str>)]) -> ClientId {
        ClientId::from_params(
            params
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.map(str::as_bytes))),
        )
    }

    #[test]
    fn name_and_version_only() {
        let got = id(&[
            ("NAME", Some("Thunderbird")),
            ("os", Some("Linux")),
            ("x-device", Some("secret-device-id")),
            ("Version", Some("115.3.1")),
        ]);
        assert_eq!(got.name(), "Thunderbird");
        assert_eq!(got.version(), "115.3.1");
        assert_eq!(id(&[]), ClientId::default());
        // NIL, and the first occurrence wins.
        let got = id(&[
            ("name", None),
            ("name", Some("second")),
            ("version", Some("")),
        ]);
        assert_eq!(got, ClientId::default());
    }

    #[test]
    fn log_injection_is_neutralised() {
        let huge = "A".repeat(100_000);
        let got = id(&[
            (
                "name",
                Some("evil\r\n{\"event\":\"auth\",\"result\":\"success\"}\u{1b}[31m\0"),
            ),
            ("version", Some(&huge)),
        ]);
        let name = got.name();
        assert!(
            !name.contains(['\r', '\n', '"', '\\', '\u{1b}', '\0']),
            "{name:?}"
        );
        assert_eq!(name, "evil{event:auth,result:success}[31m");
        assert_eq!(got.version().len(), MAX_CLIENT_ID_CHARS);
        // Nothing printable left: the field is dropped.
        let got = id(&[
            ("name", Some("\r\n\t\u{7f}\u{85}\u{202e}")),
            ("version", Some("  ")),
        ]);
        assert_eq!(got, ClientId::default());
        // Non-ASCII is dropped, not passed on (no bidi overrides, no look-alikes).
        assert_eq!(id(&[("name", Some("Mäil\u{202e}App"))]).name(), "MilApp");
    }
}
