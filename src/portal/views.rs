//! Server-rendered pages: minijinja templates compiled into the binary (HTML auto-escaped, an
//! undefined name is an error rather than an empty string) and the string catalogues, one per
//! language, with the same keys (a unit test renders every page in every language).
//!
//! The language is the `?lang=` switch (remembered in a cookie), else the first of the
//! browser's `Accept-Language` ranges that we have, else English.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

/// The languages, in the order the switch shows them.
pub const LANGS: [&str; 2] = ["en", "de"];

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("signin.html", include_str!("templates/signin.html")),
    ("error.html", include_str!("templates/error.html")),
    (
        "app_passwords.html",
        include_str!("templates/app_passwords.html"),
    ),
    ("created.html", include_str!("templates/created.html")),
    ("totp.html", include_str!("templates/totp.html")),
    ("enrol.html", include_str!("templates/enrol.html")),
    ("devices.html", include_str!("templates/devices.html")),
    ("activity.html", include_str!("templates/activity.html")),
    ("setup.html", include_str!("templates/setup.html")),
    ("admin.html", include_str!("templates/admin.html")),
    ("admin_user.html", include_str!("templates/admin_user.html")),
    ("_passwords.html", include_str!("templates/_passwords.html")),
    ("_sessions.html", include_str!("templates/_sessions.html")),
    ("_logins.html", include_str!("templates/_logins.html")),
    ("_approvals.html", include_str!("templates/_approvals.html")),
    ("_settings.html", include_str!("templates/_settings.html")),
];

const CATALOGUES: [(&str, &str); 2] = [
    ("en", include_str!("i18n/en.yaml")),
    ("de", include_str!("i18n/de.yaml")),
];

pub struct Views {
    env: Environment<'static>,
    catalogues: BTreeMap<&'static str, BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("template {0}: {1}")]
    Template(String, String),
    #[error("catalogue {0}: {1}")]
    Catalogue(&'static str, String),
}

impl Views {
    pub fn new() -> Result<Self, ViewError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Every template is HTML (the `_` partials too): escape everything inserted.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        for (name, src) in TEMPLATES {
            env.add_template(name, src)
                .map_err(|e| ViewError::Template((*name).to_owned(), e.to_string()))?;
        }
        let mut catalogues = BTreeMap::new();
        for (lang, text) in CATALOGUES {
            let map: BTreeMap<String, String> = serde_saphyr::from_str(text)
                .map_err(|e| ViewError::Catalogue(lang, e.to_string()))?;
            catalogues.insert(lang, map);
        }
        Ok(Views { env, catalogues })
    }

    /// The strings of `lang` (English for anything else).
    pub fn strings(&self, lang: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.catalogues
            .get(lang)
            .or_else(|| self.catalogues.get("en"))
            .unwrap_or(&EMPTY)
    }

    /// One string (the key itself when missing, which the tests forbid).
    pub fn t(&self, lang: &str, key: &str) -> String {
        self.strings(lang)
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_owned())
    }

    /// Renders `name` with `ctx` and the strings of `lang` as `tr`.
    pub fn render<S: Serialize>(&self, name: &str, lang: &str, ctx: S) -> Result<String, String> {
        let tmpl = self.env.get_template(name).map_err(|e| e.to_string())?;
        let tr = minijinja::Value::from_serialize(self.strings(lang));
        let ctx = minijinja::Value::from_serialize(&ctx);
        tmpl.render(minijinja::context! { tr => tr, lang => lang, ..ctx })
            .map_err(|e| format!("{name}: {e:#}"))
    }
}

/// The language for a request: the switch (`?lang=`), then the cookie, then the first
/// `Accept-Language` range we have (quality order), else English.
pub fn negotiate(switch: Option<&str>, cookie: Option<&str>, accept: Option<&str>) -> &'static str {
    let known = |l: &str| {
        let primary = l
            .split(['-', '_'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        LANGS.iter().copied().find(|x| *x == primary)
    };
    if let Some(l) = switch.and_then(known).or_else(|| cookie.and_then(known)) {
        return l;
    }
    let mut ranges: Vec<(u32, usize, &str)> = accept
        .unwrap_or("")
        .split(',')
        .take(20)
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let tag = it.next()?.trim();
            let q = it
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            // Thousandths, so the order is total.
            let q = (q.clamp(0.0, 1.0) * 1000.0) as u32;
            (q > 0).then_some((q, i, tag))
        })
        .collect();
    ranges.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranges
        .iter()
        .find_map(|(_, _, tag)| known(tag))
        .unwrap_or("en")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_language_is_chosen_by_quality_and_the_switch_wins() {
        assert_eq!(negotiate(None, None, Some("de-DE,de;q=0.9,en;q=0.8")), "de");
        assert_eq!(negotiate(None, None, Some("fr,en;q=0.5,de;q=0.7")), "de");
        assert_eq!(negotiate(None, None, Some("fr")), "en");
        assert_eq!(negotiate(None, None, None), "en");
        assert_eq!(negotiate(None, Some("de"), Some("en")), "de");
        assert_eq!(negotiate(Some("en"), Some("de"), Some("de")), "en");
        assert_eq!(negotiate(Some("xx"), None, Some("de;q=0")), "en");
    }

    #[test]
    fn both_catalogues_have_the_same_keys_and_no_empty_string() {
        let v = Views::new().unwrap_or_else(|e| panic!("{e}"));
        let en: Vec<_> = v.strings("en").keys().collect();
        let de: Vec<_> = v.strings("de").keys().collect();
        assert_eq!(en, de, "en and de must translate the same keys");
        for lang in LANGS {
            for (k, s) in v.strings(lang) {
                assert!(!s.trim().is_empty(), "{lang}.{k} is empty");
            }
        }
    }

    #[test]
    fn every_key_a_template_uses_is_in_the_catalogue() {
        let v = Views::new().unwrap_or_else(|e| panic!("{e}"));
        for (name, src) in TEMPLATES {
            let mut rest = *src;
            while let Some(i) = rest.find("tr.") {
                let after = rest.get(i + 3..).unwrap_or("");
                let key: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    v.strings("en").contains_key(&key),
                    "{name} uses tr.{key}, which the catalogue lacks"
                );
                rest = after;
            }
        }
    }

    #[test]
    fn every_page_renders_in_every_language() {
        let v = Views::new().unwrap_or_else(|e| panic!("{e}"));
        let mail = serde_json::json!({"imap_host": "mail.example.org", "imap_port": 993, "imap_starttls_port": 143,
            "smtp": {"port": 465, "ssl": true}, "pop3": {"port": 995, "ssl": true}, "user": "a@example.org"});
        let ctx = serde_json::json!({
            "title": "T", "page": "app_passwords", "csrf": "c<srf", "notice": "n", "error": "e",
            "me": {"user": "a@example.org", "admin": true},
            "message": "m", "passwords": [{"id": "ab12", "label": "<b>x</b>", "state": "active", "created": "2026-01-01 00:00 UTC",
                "expires": null, "last_used": "2026-01-02 00:00 UTC", "last_address": "192.0.2.1", "last_client": "Thunderbird", "active": true}],
            "revoke_base": "/app-passwords", "password": "abcd efgh", "label": "Laptop", "mail": mail,
            "enrolled": false, "qr": "<svg></svg>", "secret": "ABCD EFGH", "enrolment": "k:x",
            "sessions": [{"id": "r-1", "client": null, "address": "192.0.2.1", "since": "2026", "credential": "Laptop"}],
            "end_base": "/devices", "logins": [{"at": "2026", "address": "192.0.2.1", "mechanism": "PLAIN", "client": "", "result": "fail", "reason": "bad_password"}],
            "attack": true, "q": "a", "searched": true, "users": [{"name": "a@example.org", "disabled": true}],
            "blocks": [{"scope": "ip", "value": "192.0.2.1", "reason": "failures", "expires_in_secs": 60, "enforced": true}],
            "subject": "a@example.org", "base": "/admin/users/a%40example.org", "disabled": false,
            "approvals_base": "/approvals", "can_approve": true,
            "approvals": [{"id": "0123456789abcdef", "label": "Phone", "address": "192.0.2.9", "network": "192.0.2.0/24", "client": "", "at": "2026"}],
        });
        for (name, _) in TEMPLATES {
            if name.starts_with('_') || *name == "base.html" {
                continue;
            }
            for lang in LANGS {
                let html = v.render(name, lang, &ctx).unwrap_or_else(|e| panic!("{e}"));
                assert!(html.contains(&format!("<html lang=\"{lang}\">")), "{name}");
                assert!(
                    !html.contains("<b>x</b>"),
                    "{name}: a label was not escaped"
                );
            }
        }
    }

    /// The settings a person reads on the setup page: the outgoing server where the gateway
    /// fronts SMTP, its port and security; where it does not, the page says the organisation
    /// sets it up and names no server. In both languages.
    #[test]
    fn the_settings_name_the_outgoing_server_only_where_there_is_one() {
        let v = Views::new().unwrap_or_else(|e| panic!("{e}"));
        let page = |smtp: serde_json::Value, pop3: serde_json::Value, lang: &str| {
            let ctx = serde_json::json!({
                "title": "T", "page": "setup", "csrf": "c", "notice": null, "error": null,
                "me": {"user": "a@example.org", "admin": false},
                "mail": {"imap_host": "mail.example.org", "imap_port": 993, "imap_starttls_port": null,
                    "smtp": smtp, "pop3": pop3, "user": "a@example.org"},
            });
            v.render("setup.html", lang, &ctx)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        for lang in LANGS {
            let org = v.t(lang, "set_outgoing_org");
            let html = page(serde_json::Value::Null, serde_json::Value::Null, lang);
            assert!(html.contains(&org), "{lang}: {html}");
            assert!(html.contains(&v.t(lang, "set_outgoing")));
            assert!(
                !html.contains("SMTP</dd>") && !html.contains("POP3"),
                "{lang}"
            );

            let html = page(
                serde_json::json!({"port": 587, "ssl": false}),
                serde_json::json!({"port": 995, "ssl": true}),
                lang,
            );
            assert!(!html.contains(&org), "{lang}");
            assert!(html.contains("<dd>SMTP</dd>"), "{lang}");
            assert!(html.contains("<code>587</code></dd>"), "{lang}");
            assert!(html.contains("<dd>STARTTLS</dd>"), "{lang}");
            assert!(html.contains(&v.t(lang, "set_same_login")), "{lang}");
            assert!(html.contains(&v.t(lang, "set_or_pop3")), "{lang}");
            assert!(html.contains("<code>995</code>"), "{lang}");
        }
    }
}
