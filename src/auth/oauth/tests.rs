//! Known-answer tables for the claim checks, the introspection answer and the choice of the
//! issuer for an opaque token (no network: the choice is made before any call).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::config::IntrospectionConfig;

const NOW: u64 = 1_800_000_000;

fn issuer(name: &str, domains: &[&str], introspection: bool) -> IssuerConfig {
    IssuerConfig {
        name: name.into(),
        issuer: format!("https://{name}.example"),
        jwks_uri: Some(format!("https://{name}.example/jwks")),
        ca_file: None,
        audiences: vec!["imap".into()],
        algorithms: vec!["RS256".into()],
        user_claim: "email".into(),
        user_domain: None,
        required_scopes: vec!["imap".into()],
        require_amr: vec![],
        require_acr: vec![],
        accept_id_tokens: false,
        leeway: Duration::from_secs(60),
        key_refresh_interval: Duration::from_secs(60),
        end_session_at_expiry: false,
        introspection: introspection.then(|| IntrospectionConfig {
            endpoint: Some(format!("https://{name}.example/introspect")),
            client_id: "gw".into(),
            client_secret: Secret::from("s".to_owned()),
            cache_ttl: Duration::from_secs(60),
        }),
        domains: domains.iter().map(|d| (*d).to_owned()).collect(),
        require_email_verified: true,
    }
}

/// What the test IdP answers for alice's opaque token.
fn answer(cfg: &IssuerConfig) -> Value {
    json!({
        "active": true, "exp": NOW + 600, "iat": NOW, "iss": cfg.issuer, "aud": "imap",
        "client_id": "alice", "scope": "imap", "email": "alice@example.org",
        "email_verified": true, "sub": "alice"
    })
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        if value.is_null() {
            o.remove(key);
        } else {
            o.insert(key.into(), value);
        }
    }
    v
}

#[test]
fn introspection_answers_are_accepted_only_when_strictly_valid() {
    let cfg = issuer("corp", &[], true);
    let good = answer(&cfg);
    assert_eq!(check_introspection(&cfg, &good, NOW), Ok(NOW + 600));
    let cases: Vec<(Value, OAuthError)> = vec![
        (
            with(good.clone(), "active", json!(false)),
            OAuthError::Inactive,
        ),
        // "true" is not true, nor is 1; a missing `active` is not either.
        (
            with(good.clone(), "active", json!("true")),
            OAuthError::Inactive,
        ),
        (with(good.clone(), "active", json!(1)), OAuthError::Inactive),
        (
            with(good.clone(), "active", Value::Null),
            OAuthError::Inactive,
        ),
        // `exp` is required, a number, and in the future (60 s of leeway).
        (
            with(good.clone(), "exp", Value::Null),
            OAuthError::Malformed,
        ),
        (
            with(good.clone(), "exp", json!("1900000000")),
            OAuthError::Malformed,
        ),
        (
            with(good.clone(), "exp", json!(NOW - 61)),
            OAuthError::Expired,
        ),
        (
            with(good.clone(), "nbf", json!(NOW + 61)),
            OAuthError::NotYetValid,
        ),
        // `iss` must be this issuer's, and present.
        (
            with(good.clone(), "iss", json!("https://other.example")),
            OAuthError::WrongIssuer,
        ),
        (
            with(good.clone(), "iss", Value::Null),
            OAuthError::WrongIssuer,
        ),
        // No configured audience in `aud` and `client_id` not one either.
        (
            with(good.clone(), "aud", json!("mail")),
            OAuthError::WrongAudience,
        ),
        (
            with(good.clone(), "aud", json!(["mail", "web"])),
            OAuthError::WrongAudience,
        ),
        (
            with(good.clone(), "aud", Value::Null),
            OAuthError::WrongAudience,
        ),
    ];
    for (v, want) in cases {
        assert_eq!(check_introspection(&cfg, &v, NOW), Err(want), "{v}");
    }
    // Within the leeway; `aud` as a list; no `aud` but `client_id` is a configured audience
    // (RFC 7662 §2.2).
    let late = with(good.clone(), "exp", json!(NOW - 59));
    assert_eq!(check_introspection(&cfg, &late, NOW), Ok(NOW - 59));
    let list = with(good.clone(), "aud", json!(["web", "imap"]));
    assert!(check_introspection(&cfg, &list, NOW).is_ok());
    let by_client = with(with(good, "aud", Value::Null), "client_id", json!("imap"));
    assert!(check_introspection(&cfg, &by_client, NOW).is_ok());
}

#[test]
fn email_claims_need_email_verified_true() {
    let cfg = issuer("corp", &[], false);
    let claims = answer(&cfg);
    let user = |c: &Value, cfg: &IssuerConfig| {
        check_claims(cfg, c, Some("alice@example.org"), NameRules::Ascii).map(|i| i.user)
    };
    assert_eq!(user(&claims, &cfg), Ok("alice@example.org".into()));
    for v in [json!(false), json!("true"), json!(1), Value::Null] {
        let c = with(claims.clone(), "email_verified", v.clone());
        assert_eq!(user(&c, &cfg), Err(OAuthError::EmailNotVerified), "{v}");
    }
    // Switched off: accepted (config warns).
    let mut lax = cfg.clone();
    lax.require_email_verified = false;
    let unverified = with(claims.clone(), "email_verified", Value::Null);
    assert_eq!(user(&unverified, &lax), Ok("alice@example.org".into()));
    // Only the email claim needs it.
    let mut by_name = cfg;
    by_name.user_claim = "preferred_username".into();
    let c = with(unverified, "preferred_username", json!("Alice@Example.org"));
    assert_eq!(user(&c, &by_name), Ok("alice@example.org".into()));
}

#[test]
fn issuer_domains_bound_the_mailboxes_its_tokens_open() {
    let cfg = issuer("corp", &["example.org", "example.net"], false);
    let claims = answer(&cfg);
    let check = |email: &str, cfg: &IssuerConfig| {
        let c = with(claims.clone(), "email", json!(email));
        check_claims(cfg, &c, None, NameRules::Ascii).map(|i| i.user)
    };
    assert_eq!(
        check("alice@example.org", &cfg),
        Ok("alice@example.org".into())
    );
    assert_eq!(check("Bob@EXAMPLE.net", &cfg), Ok("bob@example.net".into()));
    for other in [
        "kate@other.test",
        "kate@sub.example.org",
        "kate@example.org.evil",
        "kate",
    ] {
        assert_eq!(check(other, &cfg), Err(OAuthError::WrongDomain), "{other}");
    }
    // user_domain is appended first, then checked.
    let mut short = cfg.clone();
    short.user_domain = Some("example.org".into());
    assert_eq!(check("kate", &short), Ok("kate@example.org".into()));
    // No domains: any.
    let open = issuer("corp", &[], false);
    assert_eq!(
        check("kate@other.test", &open),
        Ok("kate@other.test".into())
    );
}

#[test]
fn claims_with_look_alike_names_name_nobody() {
    let cfg = issuer("corp", &[], false);
    let claims = answer(&cfg);
    for email in [
        "\u{212A}ate@example.org",
        "\u{FF4B}ate@example.org",
        "k\u{0430}te@example.org",
        "k\u{0131}te@example.org",
    ] {
        let c = with(claims.clone(), "email", json!(email));
        for rules in [NameRules::Ascii, NameRules::Unicode] {
            assert_eq!(
                check_claims(&cfg, &c, None, rules).map(|i| i.user),
                Err(OAuthError::NoUser),
                "{email:?} {rules:?}"
            );
        }
    }
    let c = with(claims, "email", json!("J\u{00F6}rg@example.org"));
    assert_eq!(
        check_claims(&cfg, &c, None, NameRules::Ascii).map(|i| i.user),
        Err(OAuthError::NoUser)
    );
    assert_eq!(
        check_claims(
            &cfg,
            &c,
            Some("j\u{00F6}rg@example.org"),
            NameRules::Unicode
        )
        .map(|i| i.user),
        Ok("j\u{00F6}rg@example.org".into())
    );
}

fn validator(issuers: &[IssuerConfig]) -> OAuthValidator {
    let metrics = Arc::new(crate::observe::Metrics::new().unwrap_or_else(|e| panic!("{e}")));
    OAuthValidator::new(issuers, metrics, NameRules::Ascii).unwrap_or_else(|e| panic!("{e}"))
}

fn chosen(v: &OAuthValidator, user: Option<&str>) -> Result<String, OAuthError> {
    v.opaque_issuer(user).map(|i| i.cfg.name.clone())
}

#[test]
fn an_opaque_token_goes_to_one_issuer_or_none() {
    use OAuthError::{Malformed, UnknownIssuer, WrongDomain};
    // No issuer introspects: an opaque token cannot be checked.
    let v = validator(&[issuer("a", &[], false)]);
    assert_eq!(chosen(&v, Some("x@a.test")), Err(Malformed));
    // Exactly one introspects: that one, whatever the user (its domains still apply later).
    let v = validator(&[issuer("a", &[], false), issuer("b", &[], true)]);
    assert_eq!(chosen(&v, Some("x@a.test")).as_deref(), Ok("b"));
    assert_eq!(chosen(&v, None).as_deref(), Ok("b"));
    // Two introspect, no domains: never both, never a guess.
    let v = validator(&[issuer("a", &[], true), issuer("b", &[], true)]);
    assert_eq!(chosen(&v, Some("x@a.test")), Err(UnknownIssuer));
    assert_eq!(chosen(&v, None), Err(UnknownIssuer));
    // By the SASL user's domain.
    let v = validator(&[
        issuer("a", &["a.test"], true),
        issuer("b", &["b.test", "b2.test"], true),
        issuer("c", &[], false),
    ]);
    assert_eq!(chosen(&v, Some("x@a.test")).as_deref(), Ok("a"));
    assert_eq!(chosen(&v, Some("x@b2.test")).as_deref(), Ok("b"));
    assert_eq!(chosen(&v, Some("x@c.test")), Err(WrongDomain));
    assert_eq!(chosen(&v, Some("x")), Err(UnknownIssuer));
    assert_eq!(chosen(&v, None), Err(UnknownIssuer));
    // A listed domain wins over an issuer without domains; an unlisted one goes to the only
    // issuer without domains.
    let v = validator(&[issuer("a", &["a.test"], true), issuer("any", &[], true)]);
    assert_eq!(chosen(&v, Some("x@a.test")).as_deref(), Ok("a"));
    assert_eq!(chosen(&v, Some("x@z.test")).as_deref(), Ok("any"));
    // A domain listed twice is ambiguous.
    let v = validator(&[
        issuer("a", &["d.test"], true),
        issuer("b", &["d.test"], true),
    ]);
    assert_eq!(chosen(&v, Some("x@d.test")), Err(UnknownIssuer));
}

#[test]
fn new_reasons_have_their_own_labels() {
    assert_eq!(OAuthError::EmailNotVerified.as_str(), "email_not_verified");
    assert_eq!(OAuthError::WrongDomain.as_str(), "wrong_domain");
}
