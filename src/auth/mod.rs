//! Authentication: the `Authenticator` seam and the app-password + TOTP credential store.
//!
//! The session hands an [`Attempt`] to an [`Authenticator`] and gets an [`Outcome`] back; it
//! never learns *how* a credential was checked, and the authenticator never touches a socket.
//! Every failure maps to the same client reply (`NO [AUTHENTICATIONFAILED]`); the
//! [`FailureReason`] exists only for metrics and the audit log.
//!
//! Cost model (security invariant 5): an unknown or disabled user, or a user without an
//! active app password, pays one dummy argon2 verification, so the work done does not reveal
//! whether an account exists. Hash runs are counted (`imapgate_auth_hash_runs_total`) so tests
//! can prove it. argon2 runs on the blocking pool behind a semaphore, so a login flood cannot
//! take more memory than `permits × m_kib`.

pub mod app_password;
pub mod approval;
pub mod cache;
pub mod keyring;
pub mod locked_file;
pub mod oauth;
pub mod sasl;
mod store;
pub mod totp;
pub mod users;
mod write_back;

pub use store::CredentialStore;

use std::net::IpAddr;

use crate::secret::Secret;

/// The SASL mechanism or command used; a closed set for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Login,
    Plain,
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::XOAuth2 => "xoauth2",
            Mechanism::OAuthBearer => "oauthbearer",
        }
    }

    /// Token mechanisms answer a failure with an error challenge first (RFC 7628 §3.2.2).
    pub fn is_oauth(self) -> bool {
        matches!(self, Mechanism::XOAuth2 | Mechanism::OAuthBearer)
    }
}

/// What the client presented.
#[derive(Debug)]
pub enum Credential {
    /// A user name and password (LOGIN, or a well-formed PLAIN message).
    Password { user: String, password: Secret },
    /// A PLAIN message that could not be decoded; fails like a wrong password.
    Malformed(sasl::PlainError),
    /// An OAuth 2.0 bearer token, with the user the client claims.
    Bearer { user: Option<String>, token: Secret },
    /// An XOAUTH2/OAUTHBEARER message that could not be decoded.
    MalformedBearer(sasl::BearerError),
}

/// One login attempt, as the guard and the authenticator see it.
#[derive(Debug)]
pub struct Attempt {
    pub client_ip: IpAddr,
    pub mechanism: Mechanism,
    pub credential: Credential,
    /// Set by the authenticator when an app password matched, also if the attempt then fails
    /// (a wrong TOTP code): the audit log names it, so the leaked one can be revoked.
    pub matched_credential: std::sync::OnceLock<String>,
    /// The account is in attack mode and this network is not known-good for it (the guard's
    /// `RequireCode`): only an app password with a fresh, never-used TOTP code logs in; unlock
    /// windows do not count, code-less logins and accounts without TOTP are refused.
    pub require_code: bool,
    /// The client's IMAP `ID` name and version ("" when not sent), for a pending sign-in.
    pub client: String,
}

/// Why an attempt failed (never shown to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    BadName,
    Malformed,
    UnknownUser,
    Disabled,
    BadPassword,
    /// The user may not log in from this address (`allowed_networks`).
    NetworkNotAllowed,
    /// The user may not use this mechanism.
    MechanismNotAllowed,
    /// MFA is required but the user has not enrolled TOTP.
    MfaNotEnrolled,
    /// Valid app password, no code, and not unlocked.
    CodeMissing,
    /// Valid app password, wrong code: the app password has probably leaked.
    BadCode,
    /// Valid app password and a code that was valid within the unlock window before now: a
    /// client replaying its saved "password + code" after the window ended (not a leak).
    StaleCode,
    /// Valid app password and a code that was already used.
    CodeReplayed,
    /// The shared state could not be consulted (fail closed).
    StateUnavailable,
    /// Attack mode from an unknown network, and no fresh code (or no TOTP enrolled).
    AttackMode,
    /// The app password was marked suspect (too many wrong codes) and is not unlocked here.
    SuspectAppPassword,
    /// The account's owner denied a sign-in from this network in the portal (approvals).
    NetworkDenied,
    /// The bearer token was refused.
    Token(oauth::OAuthError),
    /// A token mechanism was used but no issuer is configured.
    OAuthNotConfigured,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::BadName => "bad_name",
            FailureReason::Malformed => "malformed",
            FailureReason::UnknownUser => "unknown_user",
            FailureReason::Disabled => "disabled",
            FailureReason::BadPassword => "bad_password",
            FailureReason::NetworkNotAllowed => "network_not_allowed",
            FailureReason::MechanismNotAllowed => "mechanism_not_allowed",
            FailureReason::MfaNotEnrolled => "mfa_not_enrolled",
            FailureReason::CodeMissing => "code_missing",
            FailureReason::BadCode => "bad_code",
            FailureReason::StaleCode => "stale_code",
            FailureReason::CodeReplayed => "code_replayed",
            FailureReason::StateUnavailable => "state_unavailable",
            FailureReason::AttackMode => "attack_mode",
            FailureReason::SuspectAppPassword => "suspect_app_password",
            FailureReason::NetworkDenied => "network_denied",
            FailureReason::Token(e) => e.as_str(),
            FailureReason::OAuthNotConfigured => "oauth_not_configured",
        }
    }
}

/// A user who proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The normalised login name (full address, lower case).
    pub user: String,
    /// The name to log into the backend as.
    pub upstream_user: String,
    /// Which app password was used (for the audit log).
    pub credential_id: String,
    /// How the second factor was satisfied: `totp`, `unlocked` or `none`.
    pub mfa: &'static str,
    /// The TOTP enrolment the second factor was met with (`totp`, `unlocked`), as
    /// [`enrolment_tag`] names it: a session that relied on it ends when it is reset.
    pub enrolment: Option<String>,
    /// End the relayed session at this Unix time (the token's expiry, when the issuer has
    /// `end_session_at_expiry`).
    pub session_until: Option<u64>,
}

/// A short name of a TOTP enrolment (of its stored ciphertext): part of the unlock windows'
/// keys, so a reset or a new enrolment ends every window, and kept with each session whose
/// second factor it met.
/// The state key of an app password's unlock window for one network under one TOTP
/// enrolment (written by a valid code or an approval, read by every login).
pub fn unlock_key(user: &str, credential: &str, network: &str, enrolment: &str) -> String {
    format!("unlock:{user}:{credential}:{network}:{enrolment}")
}

pub fn enrolment_tag(stored_totp: Option<&str>) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(stored_totp.unwrap_or_default().as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug)]
pub enum Outcome {
    Success(Identity),
    Failure(FailureReason),
}

/// Checks credentials. Implementations never write to sockets.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    async fn authenticate(&self, attempt: &Attempt) -> Outcome;
}

/// How user names are compared (`auth.unicode_names`).
///
/// The rule travels as a value, not as a process-wide setting: one process may run several
/// gateways (the integration tests do, in parallel), a failed reload must not change it half
/// way, and a caller that does not know the option gets the strict rule, so forgetting it
/// refuses a Unicode name instead of folding it into someone else's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NameRules {
    /// ASCII only, compared after ASCII lower-casing (the default).
    #[default]
    Ascii,
    /// Unicode names too: NFKC-stable, lower-cased, single script per label, and not a
    /// look-alike of an ASCII name (UTS #39).
    Unicode,
}

impl NameRules {
    /// The rule the configuration asks for.
    pub fn from_config(unicode_names: bool) -> Self {
        if unicode_names {
            NameRules::Unicode
        } else {
            NameRules::Ascii
        }
    }
}

/// Normalises a login name with the strict default ([`NameRules::Ascii`]): the full address,
/// ASCII only, folded to lower case. Refuses names that are empty, longer than 255 bytes,
/// contain whitespace, control characters (CR, LF, NUL, DEL …), quote or backslash, or any
/// non-ASCII character, before any lookup or upstream contact.
///
/// Only ASCII is folded: Rust's `to_lowercase` maps U+212A KELVIN SIGN to `k`, so a full
/// Unicode fold would let a name (or a token claim) with a Kelvin sign open `kate@…`.
pub fn normalize_user(name: &str) -> Result<String, FailureReason> {
    normalize_user_with(name, NameRules::Ascii)
}

/// [`normalize_user`] under the configured rule.
///
/// With [`NameRules::Unicode`] a non-ASCII name is accepted only if:
/// 1. it has no compatibility characters: its NFKC form equals its NFC form (so U+212A KELVIN
///    SIGN, fullwidth letters, ligatures and superscripts are refused, not mapped; canonical
///    variants such as a decomposed `ö` are composed);
/// 2. after Unicode lower-casing (and NFC again) it is still not ASCII: no non-ASCII name may
///    fold into an ASCII one;
/// 3. every non-ASCII character is allowed in identifiers (UTS #39 §3.1, Identifier_Status);
/// 4. the local part and each domain label are single-script (UTS #39 §5.1), so a Latin name
///    with a Cyrillic `а` is refused;
/// 5. its confusable skeleton (UTS #39 §4) is not all ASCII: a name that looks like an ASCII
///    name (all-Cyrillic `аре`, dotless `ı`) is refused;
/// 6. no mark hides in its letter (UTS #39 §5.4): no dot above on a soft-dotted letter (`i̇`,
///    what `İ` lower-cases to), no combining mark repeated.
pub fn normalize_user_with(name: &str, rules: NameRules) -> Result<String, FailureReason> {
    let bad_char = |c: char| c.is_control() || c.is_whitespace() || c == '"' || c == '\\';
    if name.is_empty() || name.len() > 255 || name.chars().any(bad_char) {
        return Err(FailureReason::BadName);
    }
    if name.is_ascii() {
        return Ok(name.to_ascii_lowercase());
    }
    if rules == NameRules::Ascii {
        return Err(FailureReason::BadName);
    }
    use unicode_normalization::UnicodeNormalization;
    use unicode_security::{GeneralSecurityProfile, MixedScript};
    let nfc: String = name.nfc().collect();
    if name.nfkc().ne(nfc.chars()) {
        return Err(FailureReason::BadName);
    }
    let folded: String = nfc.to_lowercase().nfc().collect();
    let allowed = |c: char| c.is_ascii() || c.identifier_allowed();
    let single_script = || {
        let (local, domain) = folded.rsplit_once('@').unwrap_or((folded.as_str(), ""));
        std::iter::once(local)
            .chain(domain.split('.'))
            .all(MixedScript::is_single_script)
    };
    let ascii_skeleton = || unicode_security::skeleton(&folded).all(|c| c.is_ascii());
    let hidden_mark = || {
        let mut prev = ' ';
        folded.nfd().any(|c| {
            let dotted = matches!(
                prev,
                'i' | 'j'
                    | '\u{12F}'
                    | '\u{249}'
                    | '\u{268}'
                    | '\u{456}'
                    | '\u{458}'
                    | '\u{1E2D}'
                    | '\u{1ECB}'
            );
            let hidden = (c == '\u{307}' && dotted)
                || (c == prev && unicode_normalization::char::is_combining_mark(c));
            prev = c;
            hidden
        })
    };
    if folded.is_ascii()
        || folded.len() > 255
        || folded.chars().any(|c| bad_char(c) || !allowed(c))
        || !single_script()
        || ascii_skeleton()
        || hidden_mark()
    {
        return Err(FailureReason::BadName);
    }
    Ok(folded)
}

/// A name safe to put in a log line: the normalised name, or a placeholder.
pub fn loggable_user(name: &str) -> String {
    normalize_user(name).unwrap_or_else(|_| "<invalid>".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert_eq!(
            normalize_user("Alice@Example.ORG"),
            Ok("alice@example.org".into())
        );
        for bad in [
            "", "a\rb", "a\nb", "a\0b", "a b", "a\tb", "a\u{7f}", "a\"b", "a\\b",
        ] {
            assert_eq!(normalize_user(bad), Err(FailureReason::BadName), "{bad:?}");
        }
        assert_eq!(
            normalize_user(&"a".repeat(256)),
            Err(FailureReason::BadName)
        );
        assert_eq!(loggable_user("x\r\ny"), "<invalid>");
    }

    /// Look-alikes of ASCII names: refused under both rules (never folded into `kate@…`).
    #[test]
    fn look_alikes_never_become_ascii_names() {
        use NameRules::{Ascii, Unicode};
        let cases = [
            // U+212A KELVIN SIGN: `to_lowercase` would make it `k`.
            "\u{212A}ate@example.org",
            "\u{212A}ATE@EXAMPLE.ORG",
            // Fullwidth letters (NFKC would make them ASCII).
            "\u{FF4B}ate@example.org",
            "kate@\u{FF45}xample.org",
            // Cyrillic а (U+0430) inside a Latin name: mixed script.
            "k\u{0430}te@example.org",
            // All-Cyrillic, looks like `ape`: a whole-script confusable.
            "\u{0430}\u{0440}\u{0435}@example.org",
            // Dotless ı (U+0131) looks like i.
            "k\u{0131}t@example.org",
            // Capital I with dot above lower-cases to i + combining dot.
            "\u{0130}da@example.org",
            // Ligature ﬁ (NFKC: fi).
            "\u{FB01}ona@example.org",
            // Mathematical bold k.
            "\u{1D424}ate@example.org",
            // A zero-width joiner (default-ignorable, not an identifier character).
            "ka\u{200D}te@example.org",
        ];
        for name in cases {
            for rules in [Ascii, Unicode] {
                assert_eq!(
                    normalize_user_with(name, rules),
                    Err(FailureReason::BadName),
                    "{name:?} {rules:?}"
                );
            }
            assert_eq!(
                normalize_user(name),
                Err(FailureReason::BadName),
                "{name:?}"
            );
        }
    }

    #[test]
    fn plain_ascii_is_folded_the_same_under_both_rules() {
        for rules in [NameRules::Ascii, NameRules::Unicode] {
            assert_eq!(
                normalize_user_with("Kate@Example.ORG", rules),
                Ok("kate@example.org".into())
            );
            assert_eq!(
                normalize_user_with("a.b+c_d-e@x-1.example", rules),
                Ok("a.b+c_d-e@x-1.example".into())
            );
        }
    }

    /// Real non-ASCII names: refused by default, accepted (NFC, lower case) with Unicode on.
    #[test]
    fn unicode_names_only_when_enabled() {
        let cases = [
            ("J\u{00F6}rg@example.org", "j\u{00F6}rg@example.org"),
            // Decomposed ö (as some clients send it) composes to the same name.
            ("Jo\u{0308}rg@example.org", "j\u{00F6}rg@example.org"),
            ("Jos\u{00E9}@example.org", "jos\u{00E9}@example.org"),
            // All-Cyrillic name (single script, not an ASCII look-alike).
            (
                "\u{0418}\u{0432}\u{0430}\u{043D}@example.org",
                "\u{0438}\u{0432}\u{0430}\u{043D}@example.org",
            ),
            // Greek.
            (
                "\u{0394}\u{03B7}\u{03BC}\u{03AE}\u{03C4}\u{03C1}\u{03B7}\u{03C2}@example.org",
                "\u{03B4}\u{03B7}\u{03BC}\u{03AE}\u{03C4}\u{03C1}\u{03B7}\u{03C2}@example.org",
            ),
            // An internationalised domain in Unicode form.
            ("anna@b\u{00FC}cher.example", "anna@b\u{00FC}cher.example"),
        ];
        for (name, want) in cases {
            assert_eq!(
                normalize_user(name),
                Err(FailureReason::BadName),
                "{name:?}"
            );
            assert_eq!(
                normalize_user_with(name, NameRules::Unicode),
                Ok(want.to_owned()),
                "{name:?}"
            );
        }
        // The usual refusals hold with Unicode too.
        for bad in [
            "j\u{00F6}rg\r@example.org",
            "j\u{00F6} rg@example.org",
            "j\u{00F6}\u{2028}@x",
        ] {
            assert_eq!(
                normalize_user_with(bad, NameRules::Unicode),
                Err(FailureReason::BadName),
                "{bad:?}"
            );
        }
        // 255 bytes at most, after folding too.
        assert_eq!(
            normalize_user_with(&"\u{00F6}".repeat(128), NameRules::Unicode),
            Err(FailureReason::BadName)
        );
    }
}
