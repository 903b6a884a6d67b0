//! Mail client setup: Thunderbird's autoconfiguration document (served at
//! `/.well-known/autoconfig/mail/config-v1.1.xml` and `/mail/config-v1.1.xml`, the two places
//! Thunderbird asks on a domain's host) and an Apple configuration profile (`.mobileconfig`,
//! `com.apple.mail.managed`) for a newly created app password.
//!
//! The profile carries the password, so it is built only from a POST of the page that showed
//! the password (never a URL), answered `no-store`, and never logged. It is not signed: the
//! device shows it as unverified (sign it with the organisation's certificate to change that).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::signin::query_value;
use super::{Portal, Posted};

type Shared = State<Arc<Portal>>;

/// Escapes text for XML content and attribute values.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

impl Portal {
    /// The mail domain a document is for: the address's, when it is one this portal serves
    /// (`oidc.domains`; any when none are listed).
    fn domain_of(&self, address: Option<&str>) -> Option<String> {
        let domains = &self.cfg.oidc.issuer.domains;
        let from_address = address
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase())
            .filter(|d| {
                !d.is_empty()
                    && d.len() <= 253
                    && d.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            });
        match from_address {
            Some(d) if domains.is_empty() || domains.contains(&d) => Some(d),
            Some(_) => None,
            None => domains.first().cloned(),
        }
    }
}

pub(crate) async fn autoconfig(State(p): Shared, RawQuery(query): RawQuery) -> Response {
    let address = query_value(query.as_deref(), "emailaddress");
    let Some(domain) = p.domain_of(address.as_deref()) else {
        return (StatusCode::NOT_FOUND, "no configuration for this domain\n").into_response();
    };
    let m = &p.cfg.mail;
    let host = xml(&m.imap_host);
    let mut servers = format!(
        "    <incomingServer type=\"imap\">\n      <hostname>{host}</hostname>\n      <port>{}</port>\n      <socketType>SSL</socketType>\n      <username>%EMAILADDRESS%</username>\n      <authentication>password-cleartext</authentication>\n    </incomingServer>\n",
        m.imap_port
    );
    if let Some(port) = m.imap_starttls_port {
        servers.push_str(&format!(
            "    <incomingServer type=\"imap\">\n      <hostname>{host}</hostname>\n      <port>{port}</port>\n      <socketType>STARTTLS</socketType>\n      <username>%EMAILADDRESS%</username>\n      <authentication>password-cleartext</authentication>\n    </incomingServer>\n"
        ));
    }
    let d = xml(&domain);
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n  <emailProvider id=\"{d}\">\n    <domain>{d}</domain>\n    <displayName>{d}</displayName>\n    <displayShortName>{d}</displayShortName>\n{servers}    <documentation url=\"{}/setup\">\n      <descr lang=\"en\">Create an app password for this program first.</descr>\n    </documentation>\n  </emailProvider>\n</clientConfig>\n",
        xml(&p.cfg.public_url)
    );
    (
        [
            (header::CONTENT_TYPE, "application/xml; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A random UUID (version 4) for a payload.
fn uuid() -> String {
    use rand::RngExt;
    let mut b: [u8; 16] = rand::rng().random();
    if let Some(x) = b.get_mut(6) {
        *x = (*x & 0x0f) | 0x40;
    }
    if let Some(x) = b.get_mut(8) {
        *x = (*x & 0x3f) | 0x80;
    }
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8).unwrap_or(""),
        h.get(8..12).unwrap_or(""),
        h.get(12..16).unwrap_or(""),
        h.get(16..20).unwrap_or(""),
        h.get(20..32).unwrap_or("")
    )
}

/// The `.mobileconfig` of one IMAP account.
pub(crate) fn mobileconfig(p: &Portal, user: &str, password: &str, label: &str) -> String {
    let m = &p.cfg.mail;
    let reverse: Vec<&str> = m.imap_host.split('.').rev().collect();
    let id = format!("{}.imapgate", reverse.join("."));
    let account = uuid();
    let profile = uuid();
    let describe = if label.is_empty() {
        user.to_owned()
    } else {
        format!("{user} ({label})")
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>PayloadContent</key>
  <array>
    <dict>
      <key>EmailAccountDescription</key><string>{desc}</string>
      <key>EmailAccountType</key><string>EmailTypeIMAP</string>
      <key>EmailAddress</key><string>{user}</string>
      <key>IncomingMailServerAuthentication</key><string>EmailAuthPassword</string>
      <key>IncomingMailServerHostName</key><string>{host}</string>
      <key>IncomingMailServerPortNumber</key><integer>{port}</integer>
      <key>IncomingMailServerUseSSL</key><true/>
      <key>IncomingMailServerUsername</key><string>{user}</string>
      <key>IncomingPassword</key><string>{password}</string>
      <key>OutgoingMailServerAuthentication</key><string>EmailAuthPassword</string>
      <key>OutgoingMailServerHostName</key><string>{host}</string>
      <key>OutgoingMailServerPortNumber</key><integer>465</integer>
      <key>OutgoingMailServerUseSSL</key><true/>
      <key>OutgoingMailServerUsername</key><string>{user}</string>
      <key>OutgoingPasswordSameAsIncomingPassword</key><true/>
      <key>PayloadDisplayName</key><string>{desc}</string>
      <key>PayloadIdentifier</key><string>{id}.account.{account}</string>
      <key>PayloadType</key><string>com.apple.mail.managed</string>
      <key>PayloadUUID</key><string>{account}</string>
      <key>PayloadVersion</key><integer>1</integer>
    </dict>
  </array>
  <key>PayloadDisplayName</key><string>{desc}</string>
  <key>PayloadIdentifier</key><string>{id}.{profile}</string>
  <key>PayloadRemovalDisallowed</key><false/>
  <key>PayloadType</key><string>Configuration</string>
  <key>PayloadUUID</key><string>{profile}</string>
  <key>PayloadVersion</key><integer>1</integer>
</dict>
</plist>
"#,
        desc = xml(&describe),
        user = xml(user),
        host = xml(&m.imap_host),
        port = m.imap_port,
        password = xml(password),
        id = xml(&id),
    )
}

pub(crate) async fn profile(State(p): Shared, post: Posted) -> Response {
    let Posted { r, form, session } = post;
    let user = session.user;
    // The password as the created page showed it (groups of four); it is the person's own,
    // so it is not checked here — a wrong one only makes a profile that cannot log in.
    let password: String = form
        .get("password")
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    let label: String = form.get("label").unwrap_or("").chars().take(64).collect();
    if password.is_empty() {
        return p.error(
            &r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "error_title",
            "bad_request",
        );
    }
    let doc = mobileconfig(&p, &user, &password, &label);
    (
        [
            (header::CONTENT_TYPE, "application/x-apple-aspen-config"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"mail.mobileconfig\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        doc,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(super::xml("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }

    #[test]
    fn payload_uuids_are_version_4() {
        let u = super::uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes().get(14), Some(&b'4'));
        assert_ne!(u, super::uuid());
    }
}
