#!/usr/bin/env bash
# imapgate's one test command, the same for a developer and for CI (.ci/run calls it).
#
#   scripts/test.sh
#
# Steps: 1 system packages (installed only if missing; also the test IdP's npm packages and the
# browser tests' venv target/venv-browser with a pinned Playwright), 2 cargo fmt + clippy, 3 cargo
# deny (advisory DB: ../shared/advisory-db offline when present, else fetched by cargo-deny, else
# skipped with a warning), 4 the browser self-check (tests/browser/idp_selfcheck.py: headless
# Chromium signs in at the test IdP), then cargo test with IMAPGATE_REQUIRE_REAL=1 (tests whose
# real component is missing fail instead of skipping; IMAPGATE_BROWSER_PYTHON set), 5 the Helm
# chart and deploy/ checks if scripts/check-chart.sh exists (helm, kubernetes-validate, checkov,
# promtool, and imapgate check-config with the binary step 4 built), 6 scripts/demo.sh --check
# --oauth --portal (the demo, TOTP, OAuth and the portal's browser test), 7 scripts/tls_scan.sh
# (sslscan and openssl against both listener kinds of the binary step 4 built), 8 fuzz/run.sh
# --smoke (every fuzz target for 10 s, stable Rust, `-s none`; cargo-fuzz is installed with
# `cargo install --locked` when missing), 9 scripts/sbom.sh
# (the binary's CycloneDX SBOM in target/sbom, checked; cargo-cyclonedx is installed with
# `cargo install --locked` when missing, about 2-3 minutes once, then reused).
#
# Expects a Debian 12 machine with cargo (rustfmt and clippy components), run as root (the test
# harness and the demo start Dovecot, which must start as root). Warm runs skip apt and reuse
# cargo-deny and the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

# Packages the tests and the demo need, as package[:command that proves it is present].
SYSTEM_PACKAGES=(
  dovecot-imapd:dovecot # the real backend the harness and the demo start
  # Dovecot's POP3, LMTP (Postfix delivers into it) and submission services for the harness's
  # Dovecot; the packages only add protocols to the same dovecot binary
  'dovecot-pop3d:/usr/lib/dovecot/pop3'
  'dovecot-lmtpd:/usr/lib/dovecot/lmtp'
  'dovecot-submissiond:/usr/lib/dovecot/submission'
  # A real Postfix: the harness runs a non-system instance from a temporary config directory
  # (debconf preseeded to "No configuration" below: no /etc/postfix/main.cf, nothing started)
  postfix:postfix
  swaks:swaks           # a real SMTP client (tests)
  libnet-ssleay-perl    # swaks's TLS (a Recommends of swaks, so named here)
  libio-socket-ssl-perl # swaks's TLS
  fetchmail:fetchmail   # a real POP3 client (tests); its service is never configured
  curl:curl             # a real IMAP client (tests and demo)
  openssl:openssl       # certificates for the throwaway Dovecot
  ca-certificates
  python3:python3 # imaplib as a second real client; free ports
  git:git         # cargo-deny's advisory DB must be a git repository
  nodejs:node     # the test OpenID provider (npm oidc-provider, tests/idp); npm also fetches helm
  npm:npm
  prometheus:promtool # promtool for the alert rules' checks and unit tests (step 5); the service is not started
  redis-server:redis-server # the shared state store the tests start on free ports; the service is not started
  sslscan:sslscan           # the TLS scan of both listener kinds (step 7)
  rsyslog:rsyslogd          # a real syslog for the audit log's syslog sink; the harness starts its own, never the service
  rsyslog-openssl           # rsyslog's TLS input (the audit syslog over TLS test)
  # The credential store's PostgreSQL backend: the harness (tests/gateway/pg.rs) runs initdb and
  # postgres from /usr/lib/postgresql/VERSION/bin as nobody, in a temporary directory on a free
  # loopback port; the packaged cluster (5432) is never started
  'postgresql:/usr/lib/postgresql/*/bin/postgres'
  # The portal's browser test (tests/browser): Playwright for Python (a venv, below) drives this
  # Chromium headless; a font so pages render (screenshots, axe-core's contrast checks)
  chromium:chromium
  fonts-dejavu-core
)
ADVISORY_SRC=../shared/advisory-db
DENY_DB_ROOT=/tmp/deny-dbs
DENY_DB="$DENY_DB_ROOT/advisory-db-3157b0e258782691" # the name cargo-deny gives the default URL
TOTAL_STEPS=9

STARTED=$SECONDS
STEP_NO=0
STEP_NAME="setup"
STEP_STARTED=$SECONDS

finish() {
  local rc=$?
  trap - EXIT
  step_done
  if [ "$rc" -eq 0 ]; then
    printf '\nPASS: scripts/test.sh: all %d steps passed in %ds\n' "$TOTAL_STEPS" "$((SECONDS - STARTED))"
    # The closing line: test totals of step 4, every test binary summed.
    awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
         END { printf "cargo test: %d passed, %d failed\n", p, f }' target/test-output.log
  else
    printf '\nFAIL: scripts/test.sh: step %d/%d (%s) failed with exit %d after %ds\n' \
      "$STEP_NO" "$TOTAL_STEPS" "$STEP_NAME" "$rc" "$((SECONDS - STARTED))" >&2
  fi
  exit "$rc"
}
trap finish EXIT

step_done() {
  if [ "$STEP_NO" -gt 0 ]; then log "    (step $STEP_NO took $((SECONDS - STEP_STARTED))s)"; fi
}

begin() {
  step_done
  STEP_NO=$((STEP_NO + 1))
  STEP_NAME="$1"
  STEP_STARTED=$SECONDS
  step "[$STEP_NO/$TOTAL_STEPS] $STEP_NAME"
}

# --- 1 ---------------------------------------------------------------------------------------
begin "system packages"
[ "$(id -u)" -eq 0 ] || warn "not running as root: the Dovecot-based tests and the demo check need root"
# Postfix's package asks which mail setup to write; "No configuration" writes no main.cf (so
# nothing could start), and the install stays non-interactive.
debconf_preseed 'postfix postfix/main_mailer_type select No configuration'
ensure_packages "${SYSTEM_PACKAGES[@]}"
# The package must not leave a system Dovecot on 143/993. On CI, or when we just installed it,
# stop one if it runs; a developer's own mail server is left alone.
if [ "${CI:-}" = true ] || [ -n "$ENSURE_PACKAGES_INSTALLED" ]; then
  stop_system_dovecot
fi
# Only promtool is wanted from the prometheus package, and the tests start their own Redis,
# PostgreSQL and Postfix (fetchmail runs as a client only): keep the packages' servers from
# starting at boot (policy-rc.d kept them from starting at install; Debian's postgresql also
# creates a cluster "main" on 5432, which then never runs).
for service in prometheus redis-server postgresql postfix fetchmail; do
  case " $ENSURE_PACKAGES_INSTALLED " in
    *" $service "*) disable_boot_service "$service" ;;
  esac
done
# The test identity provider's packages, exactly as locked.
if [ ! -d tests/idp/node_modules/oidc-provider ] || [ ! -d tests/idp/node_modules/axe-core ] \
  || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
  log "npm ci in tests/idp"
  (cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
fi

# The browser tests' Python: Playwright, pinned, in a venv of its own (never `playwright
# install`: it drives the chromium package above).
ensure_browser_venv target/venv-browser

# --- 2 ---------------------------------------------------------------------------------------
