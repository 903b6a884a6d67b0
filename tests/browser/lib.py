"""Shared helpers for imapgate's browser tests (Playwright for Python, Debian's Chromium).

The browser is the system one (``/usr/bin/chromium``, or ``IMAPGATE_CHROMIUM``); Playwright
never downloads one here. Scripts that use this module print one line per step and exit
non-zero with one clear ``FAIL:`` line (see :func:`run_main`).

Helpers:
  launch(pw)                     headless Chromium with the flags below
  new_context(browser)           a fresh profile: 1280x800, English, test CA errors ignored
  idp_sign_in(page, account)     fills the test IdP's login form (tests/idp/server.js)
  axe_check(page, label)         axe-core on the current page; raises on serious/critical
  totp_now(secret_b32)           RFC 6238 code (SHA-1, 30 s steps)
  screenshot(page, dir, name)    full-page PNG
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import sys
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("IMAPGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# axe-core comes with the IdP's packages (one `npm ci` in tests/idp installs both).
AXE_JS = Path(os.environ.get("IMAPGATE_AXE_JS", HERE.parent / "idp/node_modules/axe-core/axe.min.js"))
VIEWPORT = {"width": 1280, "height": 800}
# Default wait for any one page or element, in milliseconds.
TIMEOUT_MS = 15_000
# Impacts that fail a page (axe-core's four levels: minor, moderate, serious, critical).
FAILING_IMPACTS = ("serious", "critical")


class Failure(Exception):
    """A check failed; the message says what a person would have seen."""


class AxeViolations(Failure):
    """axe-core found serious or critical accessibility problems on a page."""

    def __init__(self, label: str, violations: list[dict]):
        self.label = label
        self.violations = violations
        super().__init__(f"axe-core: {len(violations)} serious/critical violation(s) on {label}:\n"
                         + format_violations(violations))


_current_step = "start"


def log(message: str) -> None:
    """One progress line, flushed at once (the Rust harness reads it as it comes)."""
    print(message, flush=True)


def begin(name: str) -> None:
    """Names the step under way (a failure message says which one it was)."""
    global _current_step
    _current_step = name


def ok(message: str) -> None:
    """The one line of a step that passed."""
    log(f"ok: {message}")


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failure(message)


# --- browser ---------------------------------------------------------------------------------


def launch(pw, headless: bool = True):
    """Headless Debian Chromium through Playwright (``pw`` = the sync_playwright() object)."""
    if not os.access(CHROMIUM, os.X_OK):
        raise Failure(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set IMAPGATE_CHROMIUM)")
    return pw.chromium.launch(executable_path=CHROMIUM, headless=headless, args=CHROMIUM_ARGS)


def new_context(browser, **kwargs):
    """A fresh browser profile (own cookies). HTTPS errors are ignored: the portal runs with a
    test CA the browser does not know; the tests check TLS elsewhere."""
    options = {
        "ignore_https_errors": True,
        "viewport": VIEWPORT,
        "locale": "en-US",
        "extra_http_headers": {"Accept-Language": "en"},
    }
    options.update(kwargs)
    context = browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    return context


# --- the test IdP's login form (tests/idp/server.js) ----------------------------------------

IDP_FORM = "form#login-form"


def origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def body_text(page, limit: int = 300) -> str:
    """The start of what the page says (for failure messages)."""
    try:
        return " ".join(page.locator("body").inner_text(timeout=2000).split())[:limit]
    except Exception:  # noqa: BLE001 - only for a message
        return "(no text)"


def on_idp_form(page) -> bool:
    """True when the page shows the test IdP's login form."""
    return "/interaction/" in page.url and page.locator(IDP_FORM).count() == 1


def idp_sign_in(page, account: str, password: str | None = None, expect_failure: bool = False) -> None:
    """Signs in as ``account`` on the IdP's login form shown in ``page`` (password
    ``pw-<account>`` unless given). Finds the fields by their labels and the button by its
    role and name, so their accessible names are checked too. Returns once the browser has left
    the form (on its way back to the relying party), or, with ``expect_failure``, once the form
    is shown again with its error; raises Failure otherwise."""
    page.locator(IDP_FORM).wait_for(state="visible")
    idp_origin = origin_of(page.url)
    page.get_by_label("User name", exact=True).fill(account)
    page.get_by_label("Password", exact=True).fill(password if password is not None else f"pw-{account}")
    with page.expect_navigation(wait_until="load"):
        page.get_by_role("button", name="Sign in", exact=True).click()
    if expect_failure:
        check(on_idp_form(page), f"the IdP did not show its form again after a wrong password (now at {page.url})")
        alert = page.get_by_role("alert")
        check(alert.count() == 1 and "wrong" in alert.inner_text().lower(),
              "the IdP's form came back without a 'wrong user name or password' alert")
        return
    # The form answers with a 303 chain back to the relying party (one navigation), or, when
    # another person was signed in at the IdP in this browser, with an auto-submitting page that
    # ends that session first (more navigations); a wrong password renders the form again.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_url(lambda url: origin_of(url) != idp_origin or "/interaction/" in url, wait_until="load")
    except PlaywrightTimeout as err:
        raise Failure(f"the IdP did not send the browser back after {account} signed in; at {page.url}: "
                      f"{body_text(page)}") from err
    if on_idp_form(page):
        alert = page.get_by_role("alert")
        text = alert.inner_text() if alert.count() else "(no message)"
        raise Failure(f"the IdP refused the sign-in as {account}: {text}")


# --- accessibility ---------------------------------------------------------------------------

_axe_source: str | None = None


def _axe() -> str:
    global _axe_source
    if _axe_source is None:
        try:
            _axe_source = AXE_JS.read_text(encoding="utf-8")
        except OSError as err:
            raise Failure(f"axe-core not found at {AXE_JS} ({err}); run `npm ci` in tests/idp") from err
    return _axe_source


def format_violations(violations: list[dict], max_nodes: int = 5) -> str:
    lines = []
    for v in violations:
        lines.append(f"  - {v['id']} ({v.get('impact')}): {v.get('help')} [{v.get('helpUrl', '')}]")
        for node in v.get("nodes", [])[:max_nodes]:
            target = " ".join(str(t) for t in node.get("target", []))
            lines.append(f"      at {target}: {node.get('html', '')[:160]}")
            summary = (node.get("failureSummary") or "").replace("\n", " ")
            if summary:
                lines.append(f"      {summary[:300]}")
        if len(v.get("nodes", [])) > max_nodes:
            lines.append(f"      ... and {len(v['nodes']) - max_nodes} more")
    return "\n".join(lines)


def axe_check(page, label: str, fail: bool = True) -> list[dict]:
    """Runs axe-core (WCAG 2.x A/AA and best practices) on the page as it is now.

    axe is injected with ``page.evaluate`` (DevTools evaluation, which a page's Content
    Security Policy does not govern), never with a <script> tag and never with bypass_csp, so
    the page is checked under its real CSP. Prints one line per violation of any impact; raises
    AxeViolations on a serious or critical one when ``fail`` is true. Returns every violation.
    """
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(_axe())
        check(page.evaluate("() => typeof window.axe === 'object'"), f"axe-core did not load on {label}")
    violations = page.evaluate(
        """async () => {
            const results = await window.axe.run(document, { resultTypes: ['violations'] });
            return results.violations.map((v) => ({
                id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
                nodes: v.nodes.map((n) => ({ target: n.target, html: n.html, failureSummary: n.failureSummary })),
            }));
        }"""
    )
    serious = [v for v in violations if v.get("impact") in FAILING_IMPACTS]
    for v in violations:
        log(f"    axe {label}: {v['id']} ({v.get('impact')}), {len(v.get('nodes', []))} node(s)")
    if serious and fail:
        raise AxeViolations(label, serious)
    if serious:
        log(f"    axe {label}: serious/critical (reported, not failing):\n{format_violations(serious)}")
    return violations


# --- TOTP (RFC 6238) -------------------------------------------------------------------------


def totp_now(secret_b32: str, digits: int = 6, at: float | None = None, step: int = 30) -> str:
    """The RFC 6238 code (HMAC-SHA-1, ``step``-second steps, RFC 4226 dynamic truncation) for
    a base32 secret as shown to people (spaces, lower case and missing padding are fine)."""
    secret = "".join(secret_b32.split()).upper().rstrip("=")
    try:
        key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    except (ValueError, binascii.Error) as err:
        raise Failure(f"not a base32 TOTP secret: {len(secret)} characters") from err
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


def seconds_left_in_step(step: int = 30) -> float:
    return step - (time.time() % step)


# --- screenshots -----------------------------------------------------------------------------


def screenshot(page, directory: str | os.PathLike | None, name: str) -> Path | None:
    """A full-page PNG ``<directory>/<name>.png`` (nothing when directory is None)."""
    if directory is None:
        return None
    path = Path(directory) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    log(f"    screenshot {path}")
    return path


# --- script frame ----------------------------------------------------------------------------


def run_main(main) -> None:
    """Runs ``main()`` and exits: 0 on success, 1 with ``FAIL: <message>`` on a Failure, 2 on
    anything unexpected (with the traceback)."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        main()
    except Failure as err:
        print(f"FAIL: {_current_step}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except PlaywrightError as err:
        # Timeouts and navigation errors: the browser's own words say enough.
        print(f"FAIL: {_current_step}: browser: {err.message.splitlines()[0] if err.message else err}",
              file=sys.stderr, flush=True)
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("FAIL: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place that turns surprises into exit 2
        import traceback

        traceback.print_exc()
        print(f"FAIL: {_current_step}: unexpected error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
