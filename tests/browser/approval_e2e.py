#!/usr/bin/env python3
"""Sign-in approval (issue 20) end to end: curl as a password-only mail client from loopback
addresses in different /24 networks, headless Chromium as the person in the portal.

    python tests/browser/approval_e2e.py --portal https://localhost:PORT --imap-port P --ca CA.pem \
        [--account alice] [--screenshots DIR]

The app password comes in the environment variable IMAPGATE_TEST_APP_PASSWORD (never on a
command line). Steps (one `ok:` line each; one `FAIL:` line and exit 1 at the first that does
not hold):
  1. sign in through the IdP; the page lists no pending sign-in from the test's networks
  2. curl without a code from 127.0.21.1 is refused, and curl -v shows the [ALERT] text
  3. the page shows that sign-in without a reload (its script refreshes the list)
  4. approve it: the same curl login, still without a code, now succeeds
  5. curl from 127.0.22.1 is refused; deny it; the same login stays refused
  6. a wrong app password from 127.0.23.1 gets the same ALERT but no pending sign-in
axe-core runs on the page with pending sign-ins (serious or critical violations fail).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib  # noqa: E402
from lib import Failure, begin, check, ok  # noqa: E402

NET_A, NET_B, NET_C = "127.0.21.1", "127.0.22.1", "127.0.23.1"


def curl(args, user: str, password: str, source: str) -> tuple[int, str]:
    """curl -v as a mail client from `source`: EXAMINE INBOX over implicit TLS. The
    credentials go on stdin; the verbose output (server lines) comes back for the ALERT."""
    cmd = [
        "curl", "--verbose", "--silent", "--show-error", "--max-time", "20", "--cacert", args.ca,
        "--interface", source, "--config", "-", "--request", "EXAMINE INBOX",
        f"imaps://127.0.0.1:{args.imap_port}/INBOX",
    ]
    try:
        r = subprocess.run(cmd, input=f'user = "{user}:{password}"\n', capture_output=True, text=True,
                           timeout=40, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Failure(f"curl did not run: {err}") from err
    return r.returncode, (r.stdout + r.stderr).replace(password, "[REDACTED]")


def pending(page, address: str):
    return page.locator(f'li.approval[data-address="{address}"]')


def wait_for_pending(page, address: str, seconds: float = 15.0) -> None:
    """Waits for the list to show `address` without reloading the page."""
    url = page.url
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pending(page, address).count() == 1:
            check(page.url == url, "the page was reloaded or left while waiting")
            return
        page.wait_for_timeout(250)
    raise Failure(f"the pending sign-in from {address} did not appear on the page within {seconds:g} s "
                  "(the list is not refreshed without a reload?)")


def answer(page, account: str, address: str, button: str) -> None:
    with page.expect_navigation(wait_until="load"):
        pending(page, address).locator(f"button.{button}").click()
    if lib.on_idp_form(page):
        # A sign-in older than reauth_after: the IdP again, then the answer again.
        lib.idp_sign_in(page, account)
        wait_for_pending(page, address)
        with page.expect_navigation(wait_until="load"):
            pending(page, address).locator(f"button.{button}").click()
    notice = page.locator("#notice")
    check(notice.count() == 1, f"no notice after {button} (at {page.url}): {lib.body_text(page)}")
    check(pending(page, address).count() == 0, f"the sign-in from {address} is still listed after {button}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portal", required=True)
    parser.add_argument("--imap-port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--account", default="alice")
    parser.add_argument("--screenshots")
    args = parser.parse_args()
    password = os.environ.get("IMAPGATE_TEST_APP_PASSWORD", "").replace(" ", "")
    check(len(password) == 16, "IMAPGATE_TEST_APP_PASSWORD is not an app password")
    portal = args.portal.rstrip("/")
    user = f"{args.account}@example.org"

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = lib.launch(pw)
        try:
            ctx = lib.new_context(browser)
            page = ctx.new_page()
            begin(f"sign in as {args.account}")
            page.goto(f"{portal}/login")
            if lib.on_idp_form(page):
                lib.idp_sign_in(page, args.account)
            check(page.url.startswith(portal), f"not back at the portal: {page.url}")
            page.goto(f"{portal}/")
            for net in (NET_A, NET_B, NET_C):
                check(pending(page, net).count() == 0, f"a pending sign-in from {net} is listed before any login from it")
            ok(f"{args.account} signed in; no pending sign-in from the test's networks yet")

            begin("a password-only login from a new network")
            code, out = curl(args, user, password, NET_A)
            check(code != 0, f"curl from {NET_A} without a code logged in (exit {code})")
            check("[ALERT]" in out and portal in out, f"curl -v shows no [ALERT] naming the portal:\n{out[-800:]}")
            ok(f"curl from {NET_A} without a code is refused (exit {code}) and shows the [ALERT] text")

            begin("the page refreshes the list by itself")
            wait_for_pending(page, NET_A)
            lib.axe_check(page, "pending sign-ins")
            lib.screenshot(page, args.screenshots, "portal-approval")
            ok(f"the sign-in from {NET_A} appeared without a reload; axe-core finds nothing serious")

            begin("approve")
            answer(page, args.account, NET_A, "approve")
            code, out = curl(args, user, password, NET_A)
            check(code == 0 and "EXISTS" in out, f"after the approval curl from {NET_A} still fails (exit {code}):\n{out[-800:]}")
            ok(f"approved in the browser: curl from {NET_A} now logs in without a code")

            begin("deny")
            code, _ = curl(args, user, password, NET_B)
            check(code != 0, f"curl from {NET_B} without a code logged in")
            wait_for_pending(page, NET_B)
            answer(page, args.account, NET_B, "deny")
            code, _ = curl(args, user, password, NET_B)
            check(code != 0, f"after the denial curl from {NET_B} logged in")
            ok(f"denied in the browser: {NET_B} stays refused")

            begin("a wrong app password")
            wrong = "zzzzyyyyxxxxwwww"
            code, out = curl(args, user, wrong, NET_C)
            check(code != 0 and "[ALERT]" in out, "a wrong app password did not get the same ALERT")
            page.wait_for_timeout(7000)
            check(pending(page, NET_C).count() == 0, "a wrong app password made a pending sign-in")
            ok(f"a wrong app password from {NET_C}: the same ALERT, no pending sign-in")
        finally:
            browser.close()
    print("approval e2e: all steps passed", flush=True)


if __name__ == "__main__":
    lib.run_main(main)
