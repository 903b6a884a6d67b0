//! Mail client setup: Thunderbird's autoconfiguration document (served at
//! `/.well-known/autoconfig/mail/config-v1.1.xml` and `/mail/config-v1.1.xml`, the two places
//! Thunderbird asks on a domain's host) and an Apple configuration profile (`.mobileconfig`,
//! `com.apple.mail.managed`) for a newly created app password.
//!
//! What they name: IMAP from `portal.mail` (host and ports people reach); the outgoing server
//! (SMTP submission, RFC 6409) and POP3 from the gateway's own listeners ([`MailFronts`]), on
//! the same host. Where the gateway fronts no SMTP submission, autoconfig names no outgoing
//! server and the settings page says the organisation sets it up: the gateway never guesses
//! another server. The Apple payload cannot leave the outgoing server out, so the profile then
//! keeps its placeholder (the IMAP host, 465 with SSL) for the person to correct.
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
use crate::config::portal::MailSettings;
use crate::config::{ListenerConfig, ListenerTls, Protocol};

type Shared = State<Arc<Portal>>;

/// How a mail program reaches one of the gateway's fronts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Front {
    /// The port people connect to.
    pub port: u16,
    /// TLS from the first byte (Thunderbird's `SSL`, Apple's `UseSSL`); false: STARTTLS.
    pub implicit_tls: bool,
}

impl Front {
    /// Thunderbird's `socketType`.
    fn socket_type(self) -> &'static str {
        if self.implicit_tls {
            "SSL"
        } else {
            "STARTTLS"
        }
    }

    /// What the settings page shows.
    fn json(self) -> serde_json::Value {
        serde_json::json!({ "port": self.port, "ssl": self.implicit_tls })
    }
}

/// The SMTP submission and POP3 fronts mail programs are told about, beside IMAP (whose host
/// and ports are `portal.mail`'s). All on `portal.mail.imap_host`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailFronts {
    /// Outgoing mail; `None`: the gateway fronts no SMTP submission, and nothing names one.
    pub smtp: Option<Front>,
    /// POP3, offered after IMAP.
    pub pop3: Option<Front>,
}

impl MailFronts {
    /// From the gateway's listeners: for each protocol the first implicit-TLS listener, else
    /// the first STARTTLS one (implicit TLS first, as RFC 8314 §3.3 recommends for submission
    /// and POP3). The port is the one the listener binds; where people reach it through another
    /// (a container's port mapping, a load balancer), set the fronts from those ports instead.
    pub fn from_listeners(listeners: &[ListenerConfig]) -> Self {
        let pick = |protocol: Protocol| {
            let of: Vec<&ListenerConfig> = listeners
                .iter()
                .filter(|l| l.protocol == protocol)
                .collect();
            of.iter()
                .find(|l| l.tls == ListenerTls::Implicit)
                .or_else(|| of.first())
                .map(|l| Front {
                    port: l.address.port(),
                    implicit_tls: l.tls == ListenerTls::Implicit,
                })
        };
        MailFronts {
            smtp: pick(Protocol::Smtp),
            pop3: pick(Protocol::Pop3),
        }
    }

    /// The settings page's view: `{port, ssl}` or null for each.
    pub(crate) fn json(&self) -> (serde_json::Value, serde_json::Value) {
        (
            self.smtp.map_or(serde_json::Value::Null, Front::json),
            self.pop3.map_or(serde_json::Value::Null, Front::json),
        )
    }
}

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

/// One `incomingServer` or `outgoingServer` entry of the autoconfig document.
fn server_entry(element: &str, kind: &str, host: &str, port: u16, socket: &str) -> String {
    format!(
        "    <{element} type=\"{kind}\">\n      <hostname>{host}</hostname>\n      <port>{port}</port>\n      <socketType>{socket}</socketType>\n      <username>%EMAILADDRESS%</username>\n      <authentication>password-cleartext</authentication>\n    </{element}>\n"
    )
}

/// Thunderbird's `clientConfig` for `domain`: IMAP (implicit TLS, then STARTTLS when set),
/// POP3 after it, and the outgoing server when the gateway fronts SMTP submission (none
/// otherwise: Thunderbird then asks the person, rather than being told a server that is not
/// there).
fn autoconfig_document(
    m: &MailSettings,
    fronts: &MailFronts,
    domain: &str,
    public_url: &str,
) -> String {
    let host = xml(&m.imap_host);
    let mut servers = server_entry("incomingServer", "imap", &host, m.imap_port, "SSL");
    if let Some(port) = m.imap_starttls_port {
        servers.push_str(&server_entry(
            "incomingServer",
            "imap",
            &host,
            port,
            "STARTTLS",
        ));
    }
    if let Some(f) = fronts.pop3 {
        servers.push_str(&server_entry(
            "incomingServer",
            "pop3",
            &host,
            f.port,
            f.socket_type(),
        ));
    }
    if let Some(f) = fronts.smtp {
        servers.push_str(&server_entry(
            "outgoingServer",
            "smtp",
            &host,
            f.port,
            f.socket_type(),
        ));
    }
    let d = xml(domain);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n  <emailProvider id=\"{d}\">\n    <domain>{d}</domain>\n    <displayName>{d}</displayName>\n    <displayShortName>{d}</displayShortName>\n{servers}    <documentation url=\"{}/setup\">\n      <descr lang=\"en\">Create an app password for this program first.</descr>\n    </documentation>\n  </emailProvider>\n</clientConfig>\n",
        xml(public_url)
    )
}

pub(crate) async fn autoconfig(State(p): Shared, RawQuery(query): RawQuery) -> Response {
    let address = query_value(query.as_deref(), "emailaddress");
    let Some(domain) = p.domain_of(address.as_deref()) else {
        return (StatusCode::NOT_FOUND, "no configuration for this domain\n").into_response();
    };
    let body = autoconfig_document(&p.cfg.mail, &p.fronts, &domain, &p.cfg.public_url);
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

/// The `.mobileconfig` of one IMAP account, its outgoing server the gateway's SMTP front
/// (implicit TLS, else STARTTLS: `OutgoingMailServerUseSSL` false), or, without one, the
/// placeholder the payload requires (the IMAP host, 465, SSL).
fn mobileconfig(
    m: &MailSettings,
    smtp: Option<Front>,
    user: &str,
    password: &str,
    label: &str,
) -> String {
    let outgoing = smtp.unwrap_or(Front {
        port: 465,
        implicit_tls: true,
    });
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
      <key>OutgoingMailServerPortNumber</key><integer>{out_port}</integer>
      <key>OutgoingMailServerUseSSL</key><{out_ssl}/>
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
        out_port = outgoing.port,
        out_ssl = outgoing.implicit_tls,
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
    let doc = mobileconfig(&p.cfg.mail, p.fronts.smtp, &user, &password, &label);
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
    use super::*;

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

    fn listener(name: &str, protocol: Protocol, address: &str, tls: ListenerTls) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            address: address.parse().unwrap_or_else(|e| panic!("{address}: {e}")),
            tls,
            protocol,
            hostname: "mail.example.org".into(),
            proxy_protocol: false,
        }
    }

    fn mail() -> MailSettings {
        MailSettings {
            imap_host: "mail.example.org".into(),
            imap_port: 993,
            imap_starttls_port: Some(143),
            smtp_port: None,
            pop3_port: None,
        }
    }

    /// The `<outgoingServer>` … `</outgoingServer>` blocks of a document.
    fn blocks<'a>(doc: &'a str, element: &str) -> Vec<&'a str> {
        let open = format!("<{element} ");
        let close = format!("</{element}>");
        doc.match_indices(&open)
            .filter_map(|(i, _)| {
                let rest = doc.get(i..)?;
                rest.find(&close).and_then(|end| rest.get(..end))
            })
            .collect()
    }

    const ALL: [(&str, Protocol, &str, ListenerTls); 6] = [
        ("imaps", Protocol::Imap, "[::]:993", ListenerTls::Implicit),
        (
            "submission",
            Protocol::Smtp,
            "[::]:587",
            ListenerTls::Starttls,
        ),
        (
            "submissions",
            Protocol::Smtp,
            "[::]:465",
            ListenerTls::Implicit,
        ),
        ("pop3", Protocol::Pop3, "[::]:110", ListenerTls::Starttls),
        ("pop3s", Protocol::Pop3, "[::]:995", ListenerTls::Implicit),
        ("imap", Protocol::Imap, "[::]:143", ListenerTls::Starttls),
    ];

    fn fronts(which: &[usize]) -> MailFronts {
        let ls: Vec<ListenerConfig> = which
            .iter()
            .filter_map(|&i| ALL.get(i))
            .map(|(n, p, a, t)| listener(n, *p, a, *t))
            .collect();
        MailFronts::from_listeners(&ls)
    }

    #[test]
    fn implicit_tls_fronts_are_preferred_whatever_their_order() {
        let f = fronts(&[0, 1, 2, 3, 4, 5]);
        let ssl = |port| {
            Some(Front {
                port,
                implicit_tls: true,
            })
        };
        assert_eq!(f.smtp, ssl(465));
        assert_eq!(f.pop3, ssl(995));
        // Only STARTTLS: that one, marked as such.
        let f = fronts(&[0, 1, 3]);
        let starttls = |port| {
            Some(Front {
                port,
                implicit_tls: false,
            })
        };
        assert_eq!(f.smtp, starttls(587));
        assert_eq!(f.pop3, starttls(110));
        // IMAP alone: neither.
        assert_eq!(fronts(&[0, 5]), MailFronts::default());
    }

    #[test]
    fn autoconfig_names_the_outgoing_server_the_gateway_fronts() {
        let doc = autoconfig_document(
            &mail(),
            &fronts(&[0, 1, 2]),
            "example.org",
            "https://mail.example.org",
        );
        let out = blocks(&doc, "outgoingServer");
        assert_eq!(out.len(), 1, "{doc}");
        let smtp = out.first().copied().unwrap_or_default();
        for part in [
            "<outgoingServer type=\"smtp\">",
            "<hostname>mail.example.org</hostname>",
            "<port>465</port>",
            "<socketType>SSL</socketType>",
            "<username>%EMAILADDRESS%</username>",
            "<authentication>password-cleartext</authentication>",
        ] {
            assert!(smtp.contains(part), "{part} missing: {smtp}");
        }
        // Incoming first (Thunderbird takes the first as the default), then outgoing.
        let (inc, outg) = (doc.find("<incomingServer"), doc.find("<outgoingServer"));
        assert!(inc.is_some() && inc < outg, "{doc}");

        let doc = autoconfig_document(
            &mail(),
            &fronts(&[0, 1]),
            "example.org",
            "https://mail.example.org",
        );
        let out = blocks(&doc, "outgoingServer");
        assert_eq!(out.len(), 1, "{doc}");
        let smtp = out.first().copied().unwrap_or_default();
        assert!(
            smtp.contains("<port>587</port>") && smtp.contains("<socketType>STARTTLS</socketType>"),
            "{smtp}"
        );
    }

    #[test]
    fn without_an_smtp_listener_autoconfig_invents_no_outgoing_server() {
        let doc = autoconfig_document(
            &mail(),
            &MailFronts::default(),
            "example.org",
            "https://mail.example.org",
        );
        assert!(
            !doc.contains("outgoingServer") && !doc.contains("smtp"),
            "{doc}"
        );
        assert!(!doc.contains("type=\"pop3\""), "{doc}");
        // IMAP as before: implicit TLS first, then STARTTLS.
        let imap = blocks(&doc, "incomingServer");
        assert_eq!(imap.len(), 2, "{doc}");
        assert!(imap
            .first()
            .is_some_and(|b| b.contains("<port>993</port>") && b.contains("SSL")));
        assert!(imap
            .get(1)
            .is_some_and(|b| b.contains("<port>143</port>") && b.contains("STARTTLS")));
    }

    #[test]
    fn autoconfig_offers_pop3_after_imap_when_a_pop3_listener_exists() {
        let doc = autoconfig_document(
            &mail(),
            &fronts(&[0, 3, 4]),
            "example.org",
            "https://mail.example.org",
        );
        let incoming = blocks(&doc, "incomingServer");
        assert_eq!(incoming.len(), 3, "{doc}");
        let pop3 = incoming.get(2).copied().unwrap_or_default();
        assert!(pop3.contains("<incomingServer type=\"pop3\">"), "{doc}");
        assert!(
            pop3.contains("<port>995</port>") && pop3.contains("<socketType>SSL</socketType>"),
            "{pop3}"
        );
        assert!(
            pop3.contains("<username>%EMAILADDRESS%</username>"),
            "{pop3}"
        );
        let doc = autoconfig_document(
            &mail(),
            &fronts(&[0, 3]),
            "example.org",
            "https://mail.example.org",
        );
        let pop3 = blocks(&doc, "incomingServer")
            .get(2)
            .copied()
            .unwrap_or_default();
        assert!(
            pop3.contains("<port>110</port>") && pop3.contains("<socketType>STARTTLS</socketType>"),
            "{doc}"
        );
    }

    #[test]
    fn the_autoconfig_domain_and_host_are_escaped() {
        let mut m = mail();
        m.imap_host = "mail.example.org\"><x".into();
        let doc = autoconfig_document(&m, &fronts(&[2]), "a<b>", "https://mail.example.org");
        assert!(!doc.contains("<x") && !doc.contains("<b>"), "{doc}");
        assert!(doc.contains("a&lt;b&gt;"), "{doc}");
    }

    /// The value after `<key>NAME</key>` in a profile.
    fn value_of<'a>(doc: &'a str, key: &str) -> &'a str {
        let k = format!("<key>{key}</key>");
        doc.find(&k)
            .and_then(|i| doc.get(i + k.len()..))
            .and_then(|rest| rest.split('\n').next())
            .unwrap_or("")
    }

    #[test]
    fn the_apple_profile_uses_the_real_outgoing_port_and_security() {
        let m = mail();
        let doc = mobileconfig(
            &m,
            fronts(&[1, 2]).smtp,
            "a@example.org",
            "abcdefghijklmnop",
            "Phone",
        );
        assert_eq!(
            value_of(&doc, "OutgoingMailServerPortNumber"),
            "<integer>465</integer>"
        );
        assert_eq!(value_of(&doc, "OutgoingMailServerUseSSL"), "<true/>");
        assert_eq!(
            value_of(&doc, "OutgoingMailServerHostName"),
            "<string>mail.example.org</string>"
        );
        assert_eq!(
            value_of(&doc, "OutgoingPasswordSameAsIncomingPassword"),
            "<true/>"
        );
        assert_eq!(
            value_of(&doc, "IncomingMailServerPortNumber"),
            "<integer>993</integer>"
        );

        // STARTTLS only: its port, and UseSSL false (the client upgrades with STARTTLS).
        let doc = mobileconfig(
            &m,
            fronts(&[1]).smtp,
            "a@example.org",
            "abcdefghijklmnop",
            "",
        );
        assert_eq!(
            value_of(&doc, "OutgoingMailServerPortNumber"),
            "<integer>587</integer>"
        );
        assert_eq!(value_of(&doc, "OutgoingMailServerUseSSL"), "<false/>");

        // No SMTP front: the payload still needs one, so the documented placeholder.
        let doc = mobileconfig(&m, None, "a@example.org", "abcdefghijklmnop", "");
        assert_eq!(
            value_of(&doc, "OutgoingMailServerPortNumber"),
            "<integer>465</integer>"
        );
        assert_eq!(value_of(&doc, "OutgoingMailServerUseSSL"), "<true/>");
        assert!(doc.contains("<string>abcdefghijklmnop</string>"));
    }
}
