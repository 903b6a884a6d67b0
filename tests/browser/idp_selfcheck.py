#!/usr/bin/env python3
"""Self-check of the browser setup and of the test IdP's sign-in flow (tests/idp/server.js).

    python tests/browser/idp_selfcheck.py --idp http://127.0.0.1:PORT [--screenshots DIR]

Plays a relying party: a small plain-HTTP server on 127.0.0.1:0 is the redirect URI, registered
at the IdP through POST /__clients; authorization code flow with PKCE (S256), state and nonce.
Headless Chromium signs in as alice through the IdP's own login form (a wrong password first,
which must show the form again with an error), the code is exchanged at the token endpoint
(client_secret_basic) and the ID token's claims are checked (payload only; the signature is the
portal's business). Then: a second request signs in silently (IdP session), `max_age=0` and
`prompt=login` show the form again, and the second person (hanna) gets her groups. axe-core runs
on the IdP's login page (violations are reported, not fatal: it is not the product). A code
used twice, a request without PKCE and malformed client registrations are refused.

Exits 0 when everything holds, 1 with one FAIL line otherwise.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import json
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402
from lib import Failure, begin, check, ok  # noqa: E402

SCOPE = "openid email profile groups"
HTTP_TIMEOUT = 15


# --- a tiny relying party --------------------------------------------------------------------


class Callback(http.server.BaseHTTPRequestHandler):
    """GET /cb?...: remembers the query and shows a small page."""

    seen: list[dict[str, list[str]]] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/cb":
            self.send_error(404)
            return
        Callback.seen.append(urllib.parse.parse_qs(url.query))
        body = (b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>relying party'
                b'</title></head><body><main><h1>Back at the relying party</h1></main></body></html>')
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


class CallbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # The browser hanging up (favicon, a navigation away) is no error of ours.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def start_callback_server() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = CallbackServer(("127.0.0.1", 0), Callback)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/cb"


# --- HTTP helpers ----------------------------------------------------------------------------


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http_json(url: str, data: bytes | None = None, headers: dict | None = None,
              method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body or b"{}")
        except json.JSONDecodeError:
            return err.code, {"raw": body.decode("utf-8", "replace")[:300]}
    except (urllib.error.URLError, OSError) as err:
        raise Failure(f"{url}: {err}") from err


def register(idp: str, fields: dict) -> tuple[int, dict]:
    return http_json(f"{idp}/__clients", json.dumps(fields).encode(), {"Content-Type": "application/json"})


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_payload(token: str) -> dict:
    try:
        part = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError) as err:
        raise Failure(f"the ID token is not a compact JWT: {err}") from err


class Request:
    """One authorization request: its state, nonce and PKCE verifier."""

    def __init__(self, disco: dict, client_id: str, redirect_uri: str, **extra: str):
        self.state = b64url(secrets.token_bytes(16))
        self.nonce = b64url(secrets.token_bytes(16))
        self.verifier = b64url(secrets.token_bytes(32))
        challenge = b64url(hashlib.sha256(self.verifier.encode()).digest())
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": SCOPE,
            "state": self.state,
            "nonce": self.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        self.url = f"{disco['authorization_endpoint']}?{urllib.parse.urlencode(query)}"


def callback_query(page, redirect_uri: str, request: Request) -> dict[str, str]:
    """Waits for the browser to land on the redirect URI and checks state (and iss)."""
    page.wait_for_url(f"{redirect_uri}?*")
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query).items()}
    check("error" not in query, f"the IdP answered with error={query.get('error')}: {query.get('error_description')}")
    check(query.get("state") == request.state, "the callback's state is not the request's")
    check("code" in query, f"no code in the callback ({sorted(query)})")
    return query


def exchange(disco: dict, client_id: str, secret: str, redirect_uri: str, code: str,
             verifier: str) -> tuple[int, dict]:
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    form = urllib.parse.urlencode({
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }).encode()
    return http_json(disco["token_endpoint"], form, {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    })


def id_token_claims(disco: dict, client_id: str, secret: str, redirect_uri: str, request: Request,
                    query: dict[str, str]) -> dict:
    status, tokens = exchange(disco, client_id, secret, redirect_uri, query["code"], request.verifier)
    check(status == 200, f"token endpoint answered {status}: {tokens}")
    check("id_token" in tokens, f"no id_token from the token endpoint (got {sorted(tokens)})")
    claims = jwt_payload(tokens["id_token"])
    check(claims.get("nonce") == request.nonce, "the ID token's nonce is not the request's")
    return claims


# --- the check -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idp", required=True, help="the IdP's issuer URL, http://127.0.0.1:PORT")
    parser.add_argument("--screenshots", help="directory for screenshots of the IdP's pages")
    args = parser.parse_args()
    idp = args.idp.rstrip("/")

    from playwright.sync_api import sync_playwright

    begin("discovery")
    status, disco = http_json(f"{idp}/.well-known/openid-configuration")
    check(status == 200, f"discovery answered {status}")
    check(disco.get("issuer") == idp, f"discovery issuer {disco.get('issuer')!r} is not {idp!r}")
    for scope in SCOPE.split():
        check(scope in disco.get("scopes_supported", []), f"discovery does not list scope {scope}")
    check("S256" in disco.get("code_challenge_methods_supported", []), "discovery does not offer PKCE S256")
    ok(f"discovery at {idp}")

    begin("client registration")
    server, redirect_uri = start_callback_server()
    client_id = f"selfcheck-{secrets.token_hex(4)}"
    secret = secrets.token_urlsafe(24)
    status, body = register(idp, {"client_id": client_id, "client_secret": secret, "redirect_uris": [redirect_uri],
                                  "post_logout_redirect_uris": [redirect_uri]})
    check(status == 200 and body.get("client_id") == client_id, f"POST /__clients answered {status}: {body}")
    check(secret not in json.dumps(body), "POST /__clients echoed the client secret")
    for bad, why in [({"client_id": client_id, "client_secret": secret}, "no redirect_uris"),
                     ({"client_id": client_id, "client_secret": secret, "redirect_uris": ["not a url"]}, "bad redirect URI"),
                     ({"client_id": "alice", "client_secret": "x", "redirect_uris": [redirect_uri]}, "a built-in client id")]:
        status, body = register(idp, bad)
        check(status in (400, 409), f"POST /__clients with {why} answered {status}, not 400/409: {body}")
    # Re-registration replaces the client (the secret that counts is the new one).
    old_secret, secret = secret, secrets.token_urlsafe(24)
    status, body = register(idp, {"client_id": client_id, "client_secret": secret, "redirect_uris": [redirect_uri]})
    check(status == 200, f"re-registering {client_id} answered {status}: {body}")
    ok(f"client {client_id} registered (redirect URI {redirect_uri}); malformed registrations refused")

    begin("PKCE required")
    no_pkce = Request(disco, client_id, redirect_uri)
    url = no_pkce.url.replace("code_challenge=", "x_challenge=").replace("code_challenge_method=", "x_method=")
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(url, timeout=HTTP_TIMEOUT)
        raise Failure("an authorization request without PKCE was not redirected with an error")
    except urllib.error.HTTPError as err:
        location = err.headers.get("Location", "")
        check(err.code in (302, 303) and location.startswith(redirect_uri) and "error=invalid_request" in location,
              f"an authorization request without PKCE got {err.code} {location[:200]!r}")
    ok("an authorization request without PKCE is refused (invalid_request)")

    with sync_playwright() as pw:
        begin("launch Chromium")
        browser = lib.launch(pw)
        ok(f"Chromium {browser.version} ({lib.CHROMIUM})")
        context = lib.new_context(browser)
        page = context.new_page()

        begin("login form")
        first = Request(disco, client_id, redirect_uri)
        page.goto(first.url)
        check(lib.on_idp_form(page), f"the IdP did not show its login form (at {page.url})")
        check(page.locator("html").get_attribute("lang") == "en", "the login page has no <html lang=en>")
        lib.screenshot(page, args.screenshots, "idp-login")
        violations = lib.axe_check(page, "the IdP's login page", fail=False)
        ok(f"the IdP shows its login form; axe-core: {len(violations)} violation(s) (reported only)")

        begin("wrong password")
        lib.idp_sign_in(page, "alice", password="pw-not-alice", expect_failure=True)
        lib.screenshot(page, args.screenshots, "idp-login-error")
        ok("a wrong password shows the form again with an alert")

        begin("sign in as alice")
        started = int(time.time())
        lib.idp_sign_in(page, "alice")
        query = callback_query(page, redirect_uri, first)
        check(query.get("iss") == idp, f"the callback's iss {query.get('iss')!r} is not the issuer")
        claims = id_token_claims(disco, client_id, secret, redirect_uri, first, query)
        now = int(time.time())
        expected = {"iss": idp, "aud": client_id, "sub": "alice", "email": "alice@example.org",
                    "email_verified": True, "groups": [], "amr": ["pwd", "mfa"]}
        for name, want in expected.items():
            check(claims.get(name) == want, f"ID token {name} = {claims.get(name)!r}, expected {want!r}")
        check(isinstance(claims.get("auth_time"), int) and started - 5 <= claims["auth_time"] <= now + 5,
              f"ID token auth_time {claims.get('auth_time')!r} is not the sign-in just made ({started}..{now})")
        check(isinstance(claims.get("exp"), int) and claims["exp"] > now, "ID token exp is not in the future")
        check(isinstance(claims.get("sid"), str) and claims["sid"], "ID token has no sid")
        check(Callback.seen, "the relying party's server saw no callback")
        ok(f"alice signed in; ID token: sub=alice email=alice@example.org groups=[] amr=pwd,mfa "
           f"auth_time={claims['auth_time']} sid, nonce, aud, iss as expected")

        begin("code replay")
        status, body = exchange(disco, client_id, secret, redirect_uri, query["code"], first.verifier)
        check(status == 400 and body.get("error") == "invalid_grant", f"a used code answered {status}: {body}")
        status, body = exchange(disco, client_id, old_secret, redirect_uri, "x", first.verifier)
        check(status == 401 and body.get("error") == "invalid_client",
              f"the replaced client secret answered {status}: {body}")
        ok("a code used twice and the replaced client secret are refused")

        begin("silent sign-in (IdP session)")
        second = Request(disco, client_id, redirect_uri)
        page.goto(second.url)
        query = callback_query(page, redirect_uri, second)
        silent = id_token_claims(disco, client_id, secret, redirect_uri, second, query)
        check(silent.get("sub") == "alice" and silent.get("auth_time") == claims["auth_time"],
              f"the silent sign-in is not alice's first one (auth_time {silent.get('auth_time')})")
        ok("a second request comes back without the form (same auth_time)")

        begin("max_age=0")
        time.sleep(1.1)  # auth_time has a one-second resolution
        third = Request(disco, client_id, redirect_uri, max_age="0")
        page.goto(third.url)
        check(lib.on_idp_form(page), f"max_age=0 did not show the login form again (at {page.url})")
        lib.idp_sign_in(page, "alice")
        query = callback_query(page, redirect_uri, third)
        again = id_token_claims(disco, client_id, secret, redirect_uri, third, query)
        check(again.get("auth_time", 0) > claims["auth_time"],
              f"after max_age=0 auth_time {again.get('auth_time')} is not newer than {claims['auth_time']}")
        ok("max_age=0 shows the login form again; the new ID token has a newer auth_time")

        begin("prompt=login as hanna")
        fourth = Request(disco, client_id, redirect_uri, prompt="login")
        page.goto(fourth.url)
        check(lib.on_idp_form(page), f"prompt=login did not show the login form (at {page.url})")
        lib.idp_sign_in(page, "hanna")
        query = callback_query(page, redirect_uri, fourth)
        hanna = id_token_claims(disco, client_id, secret, redirect_uri, fourth, query)
        check(hanna.get("sub") == "hanna" and hanna.get("email") == "hanna@example.org"
              and hanna.get("groups") == ["mail-admins"],
              f"hanna's ID token: sub={hanna.get('sub')!r} email={hanna.get('email')!r} groups={hanna.get('groups')!r}")
        ok("prompt=login shows the form; hanna (another person, same browser) gets groups [mail-admins]")

        begin("bob's amr")
        context.close()
        context = lib.new_context(browser)
        page = context.new_page()
        fifth = Request(disco, client_id, redirect_uri)
        page.goto(fifth.url)
        lib.idp_sign_in(page, "bob")
        query = callback_query(page, redirect_uri, fifth)
        bob = id_token_claims(disco, client_id, secret, redirect_uri, fifth, query)
        check(bob.get("amr") == ["pwd"], f"bob's amr is {bob.get('amr')!r}, expected ['pwd']")
        ok("bob (a fresh browser) signs in with amr [pwd] only")

        begin("cancel")
        sixth = Request(disco, client_id, redirect_uri, prompt="login")
        page.goto(sixth.url)
        page.get_by_role("button", name="Cancel", exact=True).click()
        page.wait_for_url(f"{redirect_uri}?*")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query).items()}
        check(query.get("error") == "access_denied" and query.get("state") == sixth.state,
              f"Cancel brought the relying party {query}")
        ok("Cancel on the form sends the relying party error=access_denied")

        context.close()
        browser.close()
    server.shutdown()
    print("idp self-check: all checks passed", flush=True)


if __name__ == "__main__":
    lib.run_main(main)
