//! The self-service portal over real HTTPS, against a real store, Dovecot and the test OpenID
//! provider: what a person's browser and an attacker's scripts would notice — the security
//! headers and cookie attributes, CSRF and origin checks, re-authentication for sensitive
//! actions, the helpdesk's role check, and that what the pages do is real (an app password
//! made on the page logs in over IMAP; revoking it on the page ends the live session).
//!
//! Sessions here are minted with the gateway's own key ring (what a completed sign-in would
//! set), so each test is about one thing; the sign-in itself is tested through the IdP below
//! and end to end in a real browser (tests/browser, run by `portal_browser`).

use std::collections::BTreeMap;
use std::time::Duration;

use imapgate::portal::cookie::Session;
use imapgate::secret::Secret;

use crate::harness::{last, Client, Options, TestGateway, TestStore};

pub(crate) struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub(crate) fn location(&self) -> String {
        self.header("location")
    }
}

/// A minimal browser: keeps cookies, never follows redirects, trusts the test CA.
pub(crate) struct Browser {
    http: reqwest::Client,
    pub base: String,
    pub cookies: BTreeMap<String, String>,
    pub lang: Option<&'static str>,
    /// `Sec-Fetch-Site` to send.
    pub fetch_site: Option<&'static str>,
}

impl Browser {
    pub(crate) fn new(t: &TestGateway) -> Browser {
        Self::at(t, t.portal_url.clone().expect("portal started"))
    }

    /// A browser for the portal at `base` (`https://localhost:PORT`), trusting `t`'s CA.
    pub(crate) fn at(t: &TestGateway, base: String) -> Browser {
        let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
        let ca = std::fs::read(&t.pki.ca_pem).unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .resolve("localhost", ([127, 0, 0, 1], port).into())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Browser {
            http,
            base,
            cookies: BTreeMap::new(),
            lang: None,
            fetch_site: None,
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn absorb(&mut self, headers: &reqwest::header::HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Resp {
        let mut req = req.header("cookie", self.cookie_header());
        if let Some(l) = self.lang {
            req = req.header("accept-language", l);
        }
        if let Some(f) = self.fetch_site {
            req = req.header("sec-fetch-site", f);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.absorb(&headers);
        Resp {
            status,
            headers,
            body: resp.text().await.unwrap(),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Resp {
        let url = format!("{}{path}", self.base);
        let req = self.http.get(url);
        self.send(req).await
    }

    /// A form POST from the portal's own pages (its `Origin`), with `csrf` added when the
    /// session has one and `fields` does not name it.
    pub(crate) async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Resp {
        let origin = self.base.clone();
        self.post_from(path, fields, Some(&origin)).await
    }

    pub(crate) async fn post_from(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Resp {
        let mut form: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !fields.iter().any(|(k, _)| *k == "csrf") {
            form.push(("csrf".into(), CSRF.into()));
        }
        let mut req = self.http.post(format!("{}{path}", self.base)).form(&form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        self.send(req).await
    }

    /// Sets a session as a completed sign-in would (sealed with the gateway's key ring).
    pub(crate) fn sign_in_as(&mut self, t: &TestGateway, user: &str, admin: bool, age: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let s = Session {
            user: user.to_owned(),
            admin,
            auth_time: now - age,
            issued: now - age,
            seen: now,
            csrf: CSRF.to_owned(),
        };
        let sealed = s.seal(&ring(t)).unwrap();
        self.cookies
            .insert("__Host-imapgate-session".into(), sealed);
    }
}

/// The CSRF token of minted sessions.
const CSRF: &str = "csrf-token-of-this-test-session-0123456789a";

/// The test gateway's key ring (its `k1.key`).
pub(crate) fn ring(t: &TestGateway) -> imapgate::auth::keyring::KeyRing {
    use base64::Engine;
    let b64 = std::fs::read(t.dir.path().join("k1.key")).unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8(b64).unwrap().trim())
        .unwrap();
    imapgate::auth::keyring::KeyRing::new(vec![("k1".into(), Secret::new(raw))], Some("k1".into()))
}

/// The text of the element with `id` (tags stripped, whitespace collapsed).
pub(crate) fn text_of(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let open_end = at + html.get(at..)?.find('>')? + 1;
    let tag_start = html.get(..at)?.rfind('<')?;
    let tag: String = html
        .get(tag_start + 1..)?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let close = html.get(open_end..)?.find(&format!("</{tag}>"))? + open_end;
    let inner = html.get(open_end..close)?;
    let mut out = String::new();
    let mut in_tag = false;
    for c in inner.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    Some(out.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The value of a hidden input named `name`.
pub(crate) fn hidden(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = html.get(at + name.len() + 15..)?;
    Some(
        rest.get(..rest.find('"')?)?
            .replace("&#x3a;", ":")
            .replace("&#x2b;", "+")
            .replace("&#x2f;", "/")
            .replace("&#x3d;", "=")
            .replace("&#43;", "+")
            .replace("&#47;", "/")
            .replace("&#61;", "="),
    )
}

pub(crate) async fn portal_gateway(extra: &'static str) -> Option<TestGateway> {
    TestGateway::start_with(Options {
        store: TestStore::Sqlite,
        portal: Some(extra),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn every_page_carries_the_security_headers_and_the_sign_in_uses_pkce_state_and_nonce() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut b = Browser::new(&t);
    let home = b.get("/").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("id=\"sign-in\""), "{}", home.body);
    let csp = home.header("content-security-policy");
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(home
        .header("strict-transport-security")
        .contains("max-age="));
    assert_eq!(home.header("x-content-type-options"), "nosniff");
    assert_eq!(home.header("referrer-policy"), "no-referrer");
    assert_eq!(home.header("cache-control"), "no-store");
    // Not found pages and assets too; no inline script or style anywhere on a page.
    let missing = b.get("/nothing-here").await;
    assert_eq!(missing.status, 404);
    assert!(missing
        .header("content-security-policy")
        .contains("default-src 'self'"));
    for page in [&home.body, &missing.body] {
        assert!(!page.contains("<script>") && !page.contains("style=") && !page.contains("<style"));
    }

    let login = b.get("/login").await;
    assert_eq!(login.status, 303);
    let to = reqwest::Url::parse(&login.location()).unwrap();
    let idp = crate::harness::idp().unwrap();
    assert!(to.as_str().starts_with(&idp.url), "{to}");
    let q: BTreeMap<String, String> = to.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert_eq!(q["state"].len(), 43);
    assert_eq!(q["nonce"].len(), 43);
    assert_ne!(q["state"], q["nonce"]);
    assert_eq!(q["redirect_uri"], format!("{}/auth/callback", b.base));
    assert!(q["scope"].split(' ').any(|s| s == "openid"));
    assert!(!q.contains_key("max_age"));
    // The sign-in in flight is a sealed, host-only, secure cookie: nothing of it in the URL.
    let set = login.header("set-cookie");
    assert!(set.starts_with("__Host-imapgate-signin="), "{set}");
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Domain"));
    let sealed = b.cookies["__Host-imapgate-signin"].clone();
    for v in q.values() {
        assert!(
            !sealed.contains(v.as_str()),
            "the sign-in cookie is not sealed"
        );
    }
    // A second sign-in gets fresh values.
    let again = reqwest::Url::parse(&b.get("/login").await.location()).unwrap();
    let q2: BTreeMap<String, String> = again.query_pairs().into_owned().collect();
    assert_ne!(q["state"], q2["state"]);
    assert_ne!(q["code_challenge"], q2["code_challenge"]);
}

#[tokio::test]
async fn forged_and_crossed_callbacks_are_refused_and_counted() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut b = Browser::new(&t);
    // No sign-in in flight here.
    let r = b.get("/auth/callback?code=abc&state=xyz").await;
    assert_eq!(r.status, 403);
    assert!(!b.cookies.contains_key("__Host-imapgate-session"));
    // One in flight, but the state is another's (a login CSRF).
    b.get("/login").await;
    let r = b.get("/auth/callback?code=abc&state=not-the-state").await;
    assert_eq!(r.status, 403);
    assert!(!b.cookies.contains_key("__Host-imapgate-session"));
    // The sign-in cookie is spent.
    assert!(!b.cookies.contains_key("__Host-imapgate-signin"));
    assert_eq!(
        t.metric("imapgate_portal_signins_total", &["result=\"failed\""])
            .await,
        2.0
    );
    // A session cookie not sealed by the ring is nobody.
    b.cookies.insert(
        "__Host-imapgate-session".into(),
        "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
    );
    let r = b.get("/totp").await;
    assert_eq!(r.status, 303);
    assert!(r.location().starts_with("/login?back="), "{}", r.location());
}

#[tokio::test]
async fn an_app_password_made_on_the_page_logs_in_and_revoking_it_there_ends_the_session() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut b = Browser::new(&t);
    b.sign_in_as(&t, "alice@example.org", false, 0);
    let before = b.get("/").await;
    assert_eq!(before.status, 200);
    let rows_before = before.body.matches("data-id=").count();

    // Without the form token, or from another origin: refused, nothing made.
    let r = b
        .post("/app-passwords", &[("label", "Laptop"), ("csrf", "wrong")])
        .await;
    assert_eq!(r.status, 403);
    let r = b
        .post_from(
            "/app-passwords",
            &[("label", "Laptop")],
            Some("https://evil.example"),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = b
        .post_from("/app-passwords", &[("label", "Laptop")], None)
        .await;
    assert_eq!(r.status, 403);
    let r = b
        .post_from("/app-passwords", &[("label", "Laptop")], Some("null"))
        .await;
    assert_eq!(r.status, 403);
    b.fetch_site = Some("cross-site");
    let origin = b.base.clone();
    let r = b
        .post_from("/app-passwords", &[("label", "Laptop")], Some(&origin))
        .await;
    assert_eq!(r.status, 403);
    b.fetch_site = None;
    assert_eq!(
        b.get("/").await.body.matches("data-id=").count(),
        rows_before
    );

    let created = b
        .post(
            "/app-passwords",
            &[("label", "Zed laptop"), ("expires", "90d")],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(created.header("cache-control"), "no-store");
    let password = text_of(&created.body, "new-password").unwrap();
    assert_eq!(password.len(), 19, "{password}");
    assert!(text_of(&created.body, "client-settings")
        .unwrap()
        .contains("alice@example.org"));

    // The mail client logs in with it.
    let mut c = t.client().await;
    let r = c
        .cmd("a1", &format!("LOGIN alice@example.org \"{password}\""))
        .await;
    assert!(last(&r).starts_with("a1 OK"), "{r:?}");
    c.cmd("a2", "SELECT INBOX").await;

    // It is listed with when and from where it was used, and the session under Devices.
    let list = b.get("/").await;
    assert_eq!(list.body.matches("data-id=").count(), rows_before + 1);
    let id = {
        let at = list.body.find("Zed laptop").unwrap();
        let row = list.body.get(..at).unwrap().rfind("data-id=\"").unwrap();
        let rest = list.body.get(row + 9..).unwrap();
        rest.get(..rest.find('"').unwrap()).unwrap().to_owned()
    };
    let mut seen = false;
    for _ in 0..40 {
        let devices = b.get("/devices").await;
        if devices.body.contains("data-session=") && devices.body.contains("Zed laptop") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the session is not under Devices");

    // Revoked on the page: the open session ends, the next login fails.
    let r = b.post(&format!("/app-passwords/{id}/revoke"), &[]).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), "/?notice=revoked");
    assert!(
        c.closed_within(Duration::from_secs(3)).await,
        "the session outlived its revocation"
    );
    let r = t
        .login_from("127.0.0.1", "alice@example.org", &password)
        .await;
    assert!(r.contains("NO"), "{r}");
    let page = b.get("/?notice=revoked").await;
    assert!(page.body.contains("id=\"notice\""));
}

#[tokio::test]
async fn sensitive_actions_need_a_fresh_sign_in_and_the_authenticator_is_saved_only_after_a_valid_code(
) {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut b = Browser::new(&t);
    // Signed in 20 minutes ago (reauth_after is 10 min): sent through the IdP again.
    b.sign_in_as(&t, "bob@example.org", false, 20 * 60);
    for path in ["/app-passwords", "/totp/enrol"] {
        let r = b.post(path, &[("label", "x")]).await;
        assert_eq!(r.status, 303, "{path}");
        assert!(
            r.location().starts_with("/login?reauth=1&back="),
            "{}",
            r.location()
        );
        let to = b.get(&r.location()).await.location();
        assert!(to.contains("max_age=600"), "{to}");
    }

    b.sign_in_as(&t, "bob@example.org", false, 0);
    let page = b.get("/totp").await;
    assert!(page.body.contains("data-enrolled=\"false\""));
    let enrol = b.post("/totp/enrol", &[]).await;
    assert_eq!(enrol.status, 200);
    assert!(text_of(&enrol.body, "totp-qr").is_some() && enrol.body.contains("<svg"));
    let secret = text_of(&enrol.body, "totp-secret")
        .unwrap()
        .replace(' ', "");
    let token = hidden(&enrol.body, "enrolment").unwrap();
    // A wrong code saves nothing.
    let r = b
        .post(
            "/totp/confirm",
            &[("enrolment", &token), ("code", "000000")],
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("id=\"error\""));
    assert!(b
        .get("/totp")
        .await
        .body
        .contains("data-enrolled=\"false\""));
    let raw = base32_decode(&secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = imapgate::auth::totp::code_at(&Secret::new(raw), now, 6).unwrap();
    let r = b
        .post("/totp/confirm", &[("enrolment", &token), ("code", &code)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(b.get("/totp").await.body.contains("data-enrolled=\"true\""));
    // Someone else's enrolment token is not bob's.
    let mut other = Browser::new(&t);
    other.sign_in_as(&t, "carol@example.org", false, 0);
    let r = other
        .post("/totp/confirm", &[("enrolment", &token), ("code", &code)])
        .await;
    assert_eq!(r.status, 422);
    assert!(other
        .get("/totp")
        .await
        .body
        .contains("data-enrolled=\"false\""));
}

pub(crate) fn base32_decode(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits = 0u64;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = alphabet.iter().position(|a| *a == c).unwrap() as u64;
        bits = (bits << 5) | v;
        n += 5;
        if n >= 8 {
            out.push((bits >> (n - 8)) as u8);
            n -= 8;
        }
    }
    out
}

#[tokio::test]
async fn only_administrators_reach_the_helpdesk_and_what_they_do_takes_effect() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut person = Browser::new(&t);
    person.sign_in_as(&t, "alice@example.org", false, 0);
    assert_eq!(person.get("/admin").await.status, 403);
    assert_eq!(
        person.get("/admin/users/mia%40example.org").await.status,
        403
    );
    let r = person
        .post("/admin/users/mia%40example.org/totp-reset", &[])
        .await;
    assert_eq!(r.status, 403);
    assert!(!person.get("/").await.body.contains("nav-admin"));

    let mut desk = Browser::new(&t);
    desk.sign_in_as(&t, "hanna@example.org", true, 0);
    // The helpdesk's own mailbox need not exist here.
    let own = desk.get("/").await;
    assert_eq!(own.status, 403);
    assert!(own.body.contains("nav-admin"));
    let found = desk.get("/admin?q=mia").await;
    assert_eq!(found.status, 200);
    assert!(
        found
            .body
            .contains("href=\"/admin/users/mia%40example.org\""),
        "{}",
        found.body
    );
    let page = desk.get("/admin/users/mia%40example.org").await;
    assert!(page.body.contains("data-enrolled=\"true\""));
    let r = desk
        .post("/admin/users/mia%40example.org/totp-reset", &[])
        .await;
    assert_eq!(r.status, 303);
    let page = desk.get("/admin/users/mia%40example.org").await;
    assert!(page.body.contains("data-enrolled=\"false\""));

    // Disabling carol refuses her next login; enabling lets it in again.
    let pw = t.password("carol@example.org");
    let r = desk
        .post("/admin/users/carol%40example.org/disable", &[])
        .await;
    assert_eq!(r.status, 303);
    // An administrator whose own account is disabled loses the helpdesk at once.
    let mut carol_desk = Browser::new(&t);
    carol_desk.sign_in_as(&t, "carol@example.org", true, 0);
    assert_eq!(carol_desk.get("/admin").await.status, 403);
    let r = carol_desk
        .post("/admin/users/mia%40example.org/sessions-end", &[])
        .await;
    assert_eq!(r.status, 403);
    let refused = t.login_from("127.0.0.1", "carol@example.org", &pw).await;
    assert!(refused.contains("NO"), "{refused}");
    let r = desk
        .post("/admin/users/carol%40example.org/enable", &[])
        .await;
    assert_eq!(r.status, 303);
    let ok = t.login_from("127.0.0.1", "carol@example.org", &pw).await;
    assert!(ok.contains("OK"), "{ok}");
}

#[tokio::test]
async fn the_portal_speaks_the_browsers_language_and_tells_mail_clients_the_settings() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let mut b = Browser::new(&t);
    b.lang = Some("de-DE,de;q=0.9,en;q=0.5");
    let r = b.get("/").await;
    assert!(
        r.body.contains("<html lang=\"de\">") && r.body.contains("Anmelden"),
        "{}",
        r.body
    );
    let r = b.get("/?lang=en").await;
    assert!(r.body.contains("<html lang=\"en\">"));
    let r = b.get("/").await;
    assert!(
        r.body.contains("<html lang=\"en\">"),
        "the switch is not remembered"
    );

    let xml = b
        .get("/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40example.org")
        .await;
    assert_eq!(xml.status, 200);
    assert!(xml.header("content-type").starts_with("application/xml"));
    assert!(xml.body.contains("<incomingServer type=\"imap\">"));
    assert!(
        xml.body.contains("<hostname>localhost</hostname>")
            && xml.body.contains("<port>993</port>")
    );
    assert!(xml.body.contains("<socketType>SSL</socketType>"));
    let other = b
        .get("/mail/config-v1.1.xml?emailaddress=x%40elsewhere.test")
        .await;
    assert_eq!(other.status, 404);

    b.sign_in_as(&t, "alice@example.org", false, 0);
    let profile = b
        .post(
            "/app-passwords/profile",
            &[("password", "abcd efgh ijkl mnop"), ("label", "iPhone")],
        )
        .await;
    assert_eq!(profile.status, 200);
    assert_eq!(
        profile.header("content-type"),
        "application/x-apple-aspen-config"
    );
    assert!(profile.header("content-disposition").contains("attachment"));
    assert!(profile.body.contains("<string>abcdefghijklmnop</string>"));
    assert!(profile
        .body
        .contains("<string>com.apple.mail.managed</string>"));
    let setup = b.get("/setup").await;
    assert!(text_of(&setup.body, "client-settings")
        .unwrap()
        .contains("993"));
}

#[tokio::test]
async fn portal_requests_are_limited_per_address() {
    let Some(t) = portal_gateway("  rate_limit: { per_ip: 5, burst: 3 }").await else {
        return;
    };
    let mut b = Browser::new(&t);
    let mut limited = None;
    for _ in 0..20 {
        let r = b.get("/").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("never limited");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert!(
        t.metric(
            "imapgate_http_requests_limited_total",
            &["server=\"portal\"", "limit=\"per_ip\""]
        )
        .await
            >= 1.0
    );
    // The gateway itself is not affected.
    let mut c: Client = t.client().await;
    let r = c.cmd("a", "CAPABILITY").await;
    assert!(last(&r).starts_with("a OK"));
}

/// The person's whole path in a real browser (tests/browser/portal_e2e.py driving Debian's
/// Chromium through Playwright, axe-core on every page): sign in at the IdP's own form, make an
/// app password and enrol TOTP on the pages, log in over IMAP with curl and imaplib, see the
/// session, revoke it in the browser and watch the IMAP session close, and the helpdesk reset
/// the TOTP. `IMAPGATE_PORTAL_SCREENSHOTS=DIR` keeps a screenshot of each page.
#[tokio::test]
async fn a_person_sets_up_mail_in_a_real_browser() {
    let python = match std::env::var("IMAPGATE_BROWSER_PYTHON") {
        Ok(p) if std::path::Path::new(&p).exists() => p,
        _ => {
            assert!(
                !crate::harness::require_real(),
                "IMAPGATE_BROWSER_PYTHON (the Playwright venv scripts/test.sh makes) is required"
            );
            eprintln!("skipping: IMAPGATE_BROWSER_PYTHON is not set");
            return;
        }
    };
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let idp = crate::harness::idp().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/portal_e2e.py");
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script)
        .args(["--portal", t.portal_url.as_deref().unwrap()])
        .args(["--idp", &idp.url])
        .args(["--imap-port", &t.imaps().port().to_string()])
        .args(["--ca", &t.pki.ca_pem.display().to_string()])
        .args(["--metrics", &format!("http://{}/metrics", t.gw.admin)])
        .kill_on_drop(true);
    if let Ok(dir) = std::env::var("IMAPGATE_PORTAL_SCREENSHOTS") {
        cmd.args(["--screenshots", &dir]);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the browser test took longer than 4 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    // The steps the issue names all ran.
    for step in [
        "signed in",
        "app password",
        "TOTP",
        "curl",
        "revoked",
        "reset the TOTP",
    ] {
        assert!(
            stdout.to_lowercase().contains(&step.to_lowercase()),
            "step `{step}` missing from:\n{stdout}"
        );
    }
}

/// No secret reaches a log line (debug level), the audit log or a URL: the real binary with
/// the portal, an app password made and a TOTP enrolled on the pages, the Apple profile, a
/// login with both over IMAP, and a forged callback.
#[tokio::test]
async fn no_secret_reaches_a_log_line_or_the_audit_log() {
    let Some(t) = portal_gateway("").await else {
        return;
    };
    let bin = crate::harness::start_binary(&t);
    let old: u16 = t
        .portal_url
        .as_deref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let port = bin.portal.unwrap();
    let base = format!("https://localhost:{port}");
    let client_secret = std::fs::read_to_string(t.dir.path().join("portal-oidc.secret")).unwrap();
    let client_secret = client_secret.trim().to_owned();
    let idp = crate::harness::idp().unwrap();
    idp.register_client(
        &format!("portal-{old}"),
        &client_secret,
        &format!("{base}/auth/callback"),
    )
    .await;
    let mut b = Browser::at(&t, base);
    for _ in 0..100 {
        if b.http
            .get(format!("{}/healthz", b.base))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.sign_in_as(&t, "bob@example.org", false, 0);
    let created = b.post("/app-passwords", &[("label", "Phone")]).await;
    let grouped = text_of(&created.body, "new-password").unwrap();
    let password = grouped.replace(' ', "");
    let profile = b
        .post(
            "/app-passwords/profile",
            &[("password", &grouped), ("label", "Phone")],
        )
        .await;
    assert_eq!(profile.status, 200);
    let enrol = b.post("/totp/enrol", &[]).await;
    let secret_b32 = text_of(&enrol.body, "totp-secret")
        .unwrap()
        .replace(' ', "");
    let token = hidden(&enrol.body, "enrolment").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let secret = Secret::new(base32_decode(&secret_b32));
    let code = imapgate::auth::totp::code_at(&secret, now, 6).unwrap();
    let r = b
        .post("/totp/confirm", &[("enrolment", &token), ("code", &code)])
        .await;
    assert_eq!(r.status, 303);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], bin.imaps));
    let mut c = Client::tls(addr, &t.pki.ca_der).await;
    c.line().await.unwrap();
    let r = c
        .cmd("a", &format!("LOGIN bob@example.org \"{password}{code}\""))
        .await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    c.cmd("b", "LOGOUT").await;
    // A forged callback carrying made-up code and state values.
    b.get("/auth/callback?code=forged-code-value-123&state=forged-state-456")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let logs = std::fs::read_to_string(bin.dir.path().join("stderr.log")).unwrap();
    let audit = std::fs::read_to_string(bin.dir.path().join("audit.log")).unwrap();
    // Not vacuous: the actions and the login are there.
    for action in ["app_password_created", "totp_enrolled", "sign_in_failed"] {
        assert!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
    assert!(
        logs.contains("portal"),
        "the debug log says nothing of the portal"
    );
    for (what, secret) in [
        ("the app password", password.as_str()),
        ("the grouped app password", grouped.as_str()),
        ("the TOTP secret", secret_b32.as_str()),
        ("the enrolment token", token.as_str()),
        ("the code", code.as_str()),
        ("the client secret", client_secret.as_str()),
        (
            "the session cookie",
            b.cookies["__Host-imapgate-session"].as_str(),
        ),
        ("a callback's code", "forged-code-value-123"),
    ] {
        assert!(!logs.contains(secret), "{what} is in the log");
        assert!(!audit.contains(secret), "{what} is in the audit log");
    }
}
