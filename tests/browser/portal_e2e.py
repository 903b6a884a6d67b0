#!/usr/bin/env python3
"""The portal's end-to-end browser test (issue 19), written against /work/w/portal-spec.md's
stable element ids: headless Chromium, the real test IdP's login form, the real gateway and
Dovecot behind it.

    python tests/browser/portal_e2e.py --portal https://127.0.0.1:PORT --idp http://127.0.0.1:PORT \
        --imap-port P --ca CA.pem [--user-account alice] [--admin-account hanna] \
        [--screenshots DIR] [--metrics http://127.0.0.1:PORT/metrics]

What a person would do, in order (one `ok:` line per step; one `FAIL:` line and exit 1 at the
first thing that does not hold):
  1. sign in through the IdP; the App passwords page; a non-administrator gets 403 on /admin
  2. switch the language to German and back (<html lang>)
  3. create an app password "Laptop"; read it from #new-password; copy button; .mobileconfig
  4. enrol TOTP: read #totp-secret, compute the code, confirm; /totp says enrolled
  5. curl logs in over IMAPS with app password + code
  6. imaplib logs in with the app password alone (unlock window) and IDLEs
  7. the session is listed on /devices; /activity and /setup render
  8. revoke the app password on /: the IDLE session is closed within 5 s, a new login fails
  9. sign out
 10. the administrator finds the user on /admin and resets the TOTP
 11. the user signs in again: /totp says not enrolled
 12. (--metrics) sign-ins counted; no secret in the metrics text
axe-core runs on every page visited (any serious or critical violation fails the test).
Screenshots (1280x800 viewport, full page) portal-<page>.png go to --screenshots.
"""

from __future__ import annotations

import argparse
import imaplib
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402
from lib import Failure, begin, check, ok  # noqa: E402

# How long the gateway may take to close a revoked app password's IMAP session.
REVOKE_CLOSE_SECONDS = 5.0
APP_PASSWORD = re.compile(r"^[a-z]{16}$")


class Run:
    """The state of one run: arguments, the secrets it learnt (never printed), pages seen."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.portal = args.portal.rstrip("/")
        self.idp = args.idp.rstrip("/")
        self.user = args.user_address or f"{args.user_account}@example.org"
        self.admin = args.admin_account
        self.tls = ssl.create_default_context(cafile=args.ca)
        self.secrets: list[str] = []
        self.screenshots_taken: set[str] = set()
        self.used_totp_counters: set[int] = set()

    # --- output ------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = text.replace(s, "[REDACTED]")
        return text

    # --- pages -------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.portal}{path}"

    def visit(self, page, name: str) -> None:
        """Every portal page: the spec's skeleton, axe-core, and its screenshot (once a name)."""
        check(page.url.startswith(self.portal), f"expected a portal page ({name}), the browser is at {page.url}")
        lang = page.locator("html").get_attribute("lang")
        check(lang in ("en", "de"), f"{name}: <html lang> is {lang!r}, not en or de")
        check(page.locator("main#main").count() == 1, f"{name}: no <main id=main>")
        check(page.locator("h1").count() >= 1 and page.locator("h1").first.inner_text().strip(), f"{name}: no <h1>")
        skip = page.locator("a.skip")
        check(skip.count() == 1 and skip.get_attribute("href") == "#main", f"{name}: no skip link a.skip to #main")
        lib.axe_check(page, f"portal {name} ({page.url})")
        if name not in self.screenshots_taken:
            lib.screenshot(page, self.args.screenshots, f"portal-{name}")
            self.screenshots_taken.add(name)

    def goto(self, page, path: str, name: str, status: int = 200):
        resp = page.goto(self.url(path))
        check(resp is not None and resp.status == status,
              f"GET {path} answered {resp.status if resp else 'nothing'}, expected {status}")
        if status == 200:
            self.visit(page, name)
        return resp

    def sign_in(self, page, account: str) -> None:
        """From the signed-out page through the IdP (its form, or its session) back to /."""
        page.goto(self.url("/"))
        sign_in = page.locator("a#sign-in")
        check(sign_in.count() == 1, f"the signed-out page has no a#sign-in (at {page.url})")
        self.visit(page, "sign-in")
        with page.expect_navigation(wait_until="load"):
            sign_in.click()
        if lib.on_idp_form(page):
            lib.idp_sign_in(page, account)
        check(page.url.startswith(self.portal),
              f"signing in as {account} did not come back to the portal; at {page.url}: {lib.body_text(page)}")
        error = page.locator("#error")
        check(error.count() == 0, f"the portal shows an error after sign-in: {error.first.inner_text() if error.count() else ''}")
        check(page.locator("form#create-app-password").count() == 1,
              f"signed in as {account}, but / is not the App passwords page (at {page.url})")
        check(page.locator("form#logout button#logout-button").count() == 1, "no sign-out button form#logout")

    def submit(self, page, account: str, action) -> None:
        """Runs ``action`` (fills a form, clicks its button) and waits for the next page. When
        the portal sends the person to the IdP first (sign-in older than reauth_after), signs
        in again and repeats the action once, as a person would."""
        for _ in range(2):
            with page.expect_navigation(wait_until="load"):
                action()
            if not lib.on_idp_form(page):
                return
            lib.log(f"    the portal asked {account} to sign in again (re-authentication)")
            lib.idp_sign_in(page, account)
        raise Failure("the portal asked for a fresh sign-in twice in a row")

    def state(self, page, selector: str, attribute: str) -> str | None:
        loc = page.locator(selector)
        check(loc.count() == 1, f"no {selector} on {page.url}")
        return loc.get_attribute(attribute)

    # --- TOTP --------------------------------------------------------------------------------

    def code(self, secret: str) -> str:
        """A TOTP code the gateway has not seen yet: this 30 s step's, or else the next one's
        (the gateway accepts one step of skew). Never the same step twice."""
        now = int(time.time() // 30)
        for counter in (now, now + 1):
            if counter not in self.used_totp_counters:
                self.used_totp_counters.add(counter)
                return lib.totp_now(secret, at=counter * 30)
        time.sleep(lib.seconds_left_in_step() + 0.2)
        return self.code(secret)

    # --- IMAP --------------------------------------------------------------------------------

    def curl_login(self, password: str) -> tuple[int, str]:
        """curl over implicit TLS (verifying the gateway's certificate with --ca): EXAMINE INBOX.
        The credentials go to curl on stdin (--config -), never on its command line."""
        cmd = [
            "curl", "--silent", "--show-error", "--max-time", "20", "--cacert", self.args.ca,
            "--config", "-", "--request", "EXAMINE INBOX",
            f"imaps://{self.args.imap_host}:{self.args.imap_port}/INBOX",
        ]
        config = f'user = "{self.user}:{password}"\n'
        try:
            r = subprocess.run(cmd, input=config, capture_output=True, text=True, timeout=40, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise Failure(f"curl did not run: {err}") from err
        return r.returncode, self.redact((r.stdout + r.stderr).strip())


class IdleSession:
    """An imaplib IMAP4_SSL session that logged in, selected INBOX and sits in IDLE; a thread
    notices when the gateway closes it (EOF, BYE or a reset)."""

    def __init__(self, run: Run, password: str):
        self.closed = threading.Event()
        self.closed_at: float | None = None
        self.bye = False
        try:
            self.imap = imaplib.IMAP4_SSL(run.args.imap_host, run.args.imap_port, ssl_context=run.tls, timeout=20)
            self.imap.login(run.user, password)
            typ, _ = self.imap.select("INBOX")
            check(typ == "OK", f"imaplib SELECT INBOX answered {typ}")
            # imaplib before Python 3.14 has no idle(): send it by hand (RFC 2177).
            self.imap.send(b"IDLE1 IDLE\r\n")
            line = self.imap.readline()
        except imaplib.IMAP4.error as err:
            raise Failure(f"imaplib could not log in with the app password alone: {run.redact(str(err))}") from err
        except OSError as err:
            raise Failure(f"imaplib: {err}") from err
        check(line.startswith(b"+"), f"IDLE was not accepted: {line[:100]!r}")
        self.imap.sock.settimeout(120)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        try:
            while True:
                line = self.imap.readline()
                if not line:
                    break
                if line.startswith(b"* BYE"):
                    self.bye = True
        except (OSError, imaplib.IMAP4.error):
            pass
        self.closed_at = time.monotonic()
        self.closed.set()

    def close(self) -> None:
        try:
            self.imap.shutdown()
        except (OSError, imaplib.IMAP4.error):
            pass


def http_text(run: Run, url: str) -> tuple[int, str]:
    ctx = run.tls if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=15, context=ctx) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as err:
        raise Failure(f"{url}: {err}") from err


def metric_sum(text: str, name: str, label: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portal", required=True, help="the portal's origin, https://127.0.0.1:PORT")
    parser.add_argument("--idp", required=True, help="the test IdP's issuer, http://127.0.0.1:PORT")
    parser.add_argument("--imap-port", type=int, required=True, help="the gateway's implicit-TLS IMAP port")
    parser.add_argument("--imap-host", default="127.0.0.1")
    parser.add_argument("--ca", required=True, help="PEM of the CA that signed the gateway's (and portal's) certificate")
    parser.add_argument("--user-account", default="alice")
    parser.add_argument("--user-address", help="the user's mail address (default <account>@example.org)")
    parser.add_argument("--admin-account", default="hanna")
    parser.add_argument("--screenshots", help="directory for portal-<page>.png")
    parser.add_argument("--metrics", help="the gateway's /metrics URL (checked when given)")
    args = parser.parse_args()
    run = Run(args)
    account = args.user_account

    from playwright.sync_api import sync_playwright

    begin("portal health")
    status, body = http_text(run, run.url("/healthz"))
    check(status == 200 and body.strip() == "ok", f"GET /healthz answered {status} {body[:80]!r}")
    ok(f"portal at {run.portal} is up (TLS verified with {args.ca})")

    idle: IdleSession | None = None
    with sync_playwright() as pw:
        browser = lib.launch(pw)
        try:
            idle = scenario(run, browser, account)
        finally:
            if idle is not None:
                idle.close()
            browser.close()

    if args.metrics:
        begin("metrics")
        status, text = http_text(run, args.metrics)
        check(status == 200, f"GET {args.metrics} answered {status}")
        signins = metric_sum(text, "imapgate_portal_signins_total", 'result="ok"')
        check(signins >= 3, f"imapgate_portal_signins_total{{result=\"ok\"}} is {signins}, expected at least 3")
        for s in run.secrets:
            check(s not in text, "a secret (app password or TOTP secret) appears in the metrics text")
        ok(f"metrics: {signins:g} portal sign-ins counted; no secret in the metrics text")

    print("portal e2e: all steps passed", flush=True)


def scenario(run: Run, browser, account: str) -> IdleSession | None:
    idle: IdleSession | None = None
    args = run.args
    # ---------------------------------------------------------------------------------------
    begin(f"sign in as {account}")
    user_ctx = lib.new_context(browser)
    user_ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=run.portal)
    page = user_ctx.new_page()
    page.on("dialog", lambda d: d.accept())  # a "really revoke?" confirm, if the portal asks
    run.sign_in(page, account)
    run.visit(page, "app-passwords")
    check(page.locator("#nav-admin").count() == 0, f"{account} (no admin group) sees the Helpdesk link")
    for nav in ("#nav-app-passwords", "#nav-totp", "#nav-devices", "#nav-activity", "#nav-setup"):
        check(page.locator(nav).count() == 1, f"the navigation has no {nav}")
    resp = page.goto(run.url("/admin"))
    check(resp is not None and resp.status == 403, f"/admin for {account} answered {resp.status if resp else None}, not 403")
    page.goto(run.url("/"))
    ok(f"{account} signed in through the IdP; App passwords page; /admin is 403 for a non-administrator")

    # ---------------------------------------------------------------------------------------
    begin("language switch")
    with page.expect_navigation(wait_until="load"):
        page.locator("a#lang-de").click()
    check(page.locator("html").get_attribute("lang") == "de", "after #lang-de the page is not <html lang=de>")
    run.visit(page, "app-passwords-de")
    # The choice is a cookie: the next page (no ?lang=) is German too, whatever Accept-Language says.
    page.goto(run.url("/totp"))
    check(page.locator("html").get_attribute("lang") == "de", "the language choice did not stick (cookie)")
    with page.expect_navigation(wait_until="load"):
        page.locator("a#lang-en").click()
    check(page.locator("html").get_attribute("lang") == "en", "after #lang-en the page is not <html lang=en>")
    page.goto(run.url("/"))
    ok("#lang-de gives <html lang=de> and sticks; #lang-en switches back")

    # ---------------------------------------------------------------------------------------
    begin("create an app password")

    def create():
        page.locator("input#label").fill("Laptop")
        page.locator("button#create").click()

    run.submit(page, account, create)
    shown = page.locator("#new-password")
    check(shown.count() == 1, f"no #new-password after creating an app password (at {page.url}): {page.locator('main').inner_text()[:400]!r}")
    grouped = shown.inner_text().strip()
    app_password = "".join(grouped.split())
    run.secrets.append(app_password)
    check(APP_PASSWORD.match(app_password), "#new-password is not 16 lower-case letters")
    check(re.fullmatch(r"[a-z]{4}( [a-z]{4}){3}", " ".join(grouped.split())), "#new-password is not grouped in fours")
    settings = page.locator("#client-settings")
    check(settings.count() == 1 and run.user in settings.inner_text(), f"#client-settings does not name {run.user}")
    check(page.locator("form#mobileconfig button#download-profile").count() == 1, "no .mobileconfig download button")
    run.visit(page, "app-password-created")
    page.locator("button#copy").click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    check("".join(str(copied).split()) == app_password, "button#copy did not put the app password on the clipboard")
    with page.expect_download() as download_info:
        page.locator("button#download-profile").click()
    download = download_info.value
    profile_path = download.path()
    profile = Path(profile_path).read_text(encoding="utf-8", errors="replace") if profile_path else ""
    check(download.suggested_filename.endswith(".mobileconfig"),
          f"the profile download is named {download.suggested_filename!r}, not *.mobileconfig")
    check(run.user in profile and "com.apple.mail.managed" in profile,
          "the .mobileconfig does not describe an IMAP account for the user")
    with page.expect_navigation(wait_until="load"):
        page.locator("a#done").click()
    row = page.locator("#app-passwords tr[data-id]", has_text="Laptop")
    check(row.count() == 1, "the new app password 'Laptop' is not listed on /")
    app_password_id = row.get_attribute("data-id")
    html = page.content()
    check(app_password not in html and " ".join(grouped.split()) not in html,
          "the app password is shown again on / (it must be shown once)")
    ok(f"app password 'Laptop' (id {app_password_id}) created, shown once in fours, copied, .mobileconfig downloaded")

    # ---------------------------------------------------------------------------------------
    begin("enrol TOTP")
    with page.expect_navigation(wait_until="load"):
        page.locator("#nav-totp").click()
    run.visit(page, "totp")
    check(run.state(page, "#totp-state", "data-enrolled") == "false", f"{account} is already enrolled")
    run.submit(page, account, lambda: page.locator("form#totp-enrol button#enrol").click())
    check(page.locator("#totp-qr svg").count() >= 1, "the enrolment page has no QR code (#totp-qr svg)")
    secret = "".join(page.locator("#totp-secret").inner_text().split())
    run.secrets.append(secret)
    check(len(secret) >= 16, "#totp-secret is too short to be a TOTP secret")
    run.visit(page, "totp-enrol")

    def confirm():
        page.locator("form#totp-confirm input#code").fill(run.code(secret))
        page.locator("button#confirm").click()

    run.submit(page, account, confirm)
    if page.locator("#totp-state").count() == 0:
        page.goto(run.url("/totp"))
    check(run.state(page, "#totp-state", "data-enrolled") == "true",
          f"/totp does not say enrolled after confirming the code ({page.locator('#error').all_inner_texts()})")
    ok("TOTP enrolled: QR code and secret shown, the computed code confirmed it")

    # ---------------------------------------------------------------------------------------
    begin("IMAP login with curl (app password + code)")
    rc, out = run.curl_login(app_password + run.code(secret))
    check(rc == 0 and "EXISTS" in out, f"curl could not log in with app password + code (exit {rc}): {out[:300]}")
    ok(f"curl logged in over IMAPS as {run.user} with app password + TOTP code")

    # ---------------------------------------------------------------------------------------
    begin("imaplib session in IDLE (unlock window)")
    idle = IdleSession(run, app_password)
    ok("imaplib logged in with the app password alone (unlocked) and is IDLE")

    # ---------------------------------------------------------------------------------------
    begin("devices")
    deadline = time.monotonic() + 10
    while True:
        run.goto(page, "/devices", "devices")
        rows = page.locator("#sessions tr[data-session]", has_text="Laptop")
        if rows.count() >= 1:
            break
        check(time.monotonic() < deadline, "/devices does not list the open IMAP session of 'Laptop'")
        time.sleep(1)
    check(page.locator("#sessions tr[data-session] button.end").count() >= 1, "no 'sign out this device' button")
    ok(f"/devices lists {rows.count()} open session(s) of 'Laptop'")

    begin("activity and mail setup")
    run.goto(page, "/activity", "activity")
    check(run.state(page, "#attack-mode", "data-active") == "false", "/activity says the account is in attack mode")
    check(page.locator("#logins tr:has(td)").count() >= 1, "/activity lists no login")
    run.goto(page, "/setup", "setup")
    check(page.locator("#client-settings").count() == 1, "/setup has no #client-settings")
    ok("/activity (not in attack mode, logins listed) and /setup render")

    # ---------------------------------------------------------------------------------------
    begin("revoke the app password")
    run.goto(page, "/", "app-passwords")
    revoke = page.locator(f'#app-passwords tr[data-id="{app_password_id}"] button.revoke')
    check(revoke.count() == 1, "the active app password has no revoke button")
    clicked = time.monotonic()
    run.submit(page, account, revoke.click)
    check(page.locator(f'#app-passwords tr[data-id="{app_password_id}"] button.revoke').count() == 0,
          "the revoked app password still has a revoke button")
    remaining = REVOKE_CLOSE_SECONDS - (time.monotonic() - clicked)
    closed = idle.closed.wait(timeout=max(remaining, 0.1))
    check(closed, f"the IDLE session was still open {REVOKE_CLOSE_SECONDS:g} s after the revocation")
    took = (idle.closed_at or time.monotonic()) - clicked
    rc, out = run.curl_login(app_password + run.code(secret))
    check(rc != 0, "curl still logs in with the revoked app password")
    check(rc == 67, f"curl with the revoked app password failed with exit {rc}, not 67 (login denied): {out[:200]}")
    ok(f"revoked: the IDLE session was closed after {took:.1f} s{' (BYE)' if idle.bye else ''}; "
       f"a new login is refused")

    # ---------------------------------------------------------------------------------------
    begin("sign out")
    with page.expect_navigation(wait_until="load"):
        page.locator("form#logout button#logout-button").click()
    if page.url.startswith(run.idp) and page.locator("#logout-yes").count() == 1:
        # The portal ended the IdP session too (RP-initiated logout): confirm there.
        with page.expect_navigation(wait_until="load"):
            page.locator("#logout-yes").click()
    page.goto(run.url("/"))
    check(page.locator("a#sign-in").count() == 1, "after signing out, / does not show the sign-in page")
    check(page.locator("form#create-app-password").count() == 0, "after signing out, / still shows app passwords")
    ok("signed out: / shows the sign-in page again")

    # ---------------------------------------------------------------------------------------
    begin(f"helpdesk: {run.admin} resets {account}'s TOTP")
    admin_ctx = lib.new_context(browser)
    admin_page = admin_ctx.new_page()
    admin_page.on("dialog", lambda d: d.accept())
    run.sign_in(admin_page, run.admin)
    check(admin_page.locator("#nav-admin").count() == 1, f"{run.admin} (group mail-admins) has no Helpdesk link")
    with admin_page.expect_navigation(wait_until="load"):
        admin_page.locator("#nav-admin").click()
    run.visit(admin_page, "admin")
    admin_page.locator("form#find-user input#q").fill(run.user)
    with admin_page.expect_navigation(wait_until="load"):
        admin_page.locator("button#find").click()
    found = admin_page.locator("a.user", has_text=run.user)
    check(found.count() >= 1, f"the helpdesk search for {run.user} found nothing")
    with admin_page.expect_navigation(wait_until="load"):
        found.first.click()
    run.visit(admin_page, "admin-user")
    user_page = admin_page.url
    check(run.state(admin_page, "#totp-state", "data-enrolled") == "true", f"the helpdesk page says {account} is not enrolled")
    run.submit(admin_page, run.admin, lambda: admin_page.locator("button#admin-totp-reset").click())
    if admin_page.locator("#totp-state").count() == 0:
        admin_page.goto(user_page)
    check(run.state(admin_page, "#totp-state", "data-enrolled") == "false",
          "after the helpdesk reset the user page still says enrolled")
    admin_ctx.close()
    ok(f"{run.admin} found {run.user} on /admin and reset the TOTP")

    # ---------------------------------------------------------------------------------------
    begin(f"{account} signs in again")
    run.sign_in(page, account)
    run.goto(page, "/totp", "totp")
    check(run.state(page, "#totp-state", "data-enrolled") == "false", f"/totp for {account} still says enrolled after the reset")
    ok(f"{account} signed in again: /totp says not enrolled")
    user_ctx.close()
    return idle


if __name__ == "__main__":
    lib.run_main(main)
