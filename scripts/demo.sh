#!/usr/bin/env bash
# imapgate demo: a real Dovecot and Postfix behind imapgate, on loopback, in one command.
#
#   scripts/demo.sh              build, start Dovecot (IMAP, POP3, LMTP), Postfix (submission via
#                                XCLIENT, delivering to Dovecot) and imapgate in front of them (IMAP,
#                                SMTP submission, POP3), enrol a demo user with an app password and
#                                TOTP, show a login, stay up until Ctrl-C
#   scripts/demo.sh --check      the same on free ports, non-interactively; exit 0 only if it all
#                                works (app password + code, unlock window, replay refused, mail
#                                sent through the gateway's SMTP and read back over POP3 and IMAP, ...)
#   scripts/demo.sh --code [F]   print the demo user's current 6-digit TOTP code, from
#                                $IMAPGATE_DEMO_TOTP_SECRET or the demo.env file F (default ./demo.env)
#   scripts/demo.sh [--check] --oauth
#                                also start the test OpenID provider (tests/idp, Node.js), trust it
#                                for OAuth 2.0 bearer tokens (auth.oauth.issuers), get a token and
#                                log in with it over AUTHENTICATE XOAUTH2 (Python imaplib, curl);
#                                with --check also check OAUTHBEARER, the device flow, and that
#                                forged tokens and other users' tokens are refused
#   scripts/demo.sh [--check] --portal
#                                also start the self-service portal (HTTPS on 127.0.0.1, public URL
#                                https://localhost:PORT) with the test OpenID provider as its single
#                                sign-on; sign in there as demo / pw-demo (the demo user) or as the
#                                helpdesk hanna / pw-hanna. With --check, headless Chromium runs the
#                                portal's browser test (tests/browser/portal_e2e.py) against it
#
# The demo user logs in with the app password immediately followed by the current TOTP code
# (scan the QR code the demo prints with an authenticator app, or use --code). After one login
# with a code, that app password works without a code from the same /24 for 12 hours.
#
# Needs a Debian-like machine with cargo. Installs dovecot-imapd, dovecot-pop3d, dovecot-lmtpd,
# postfix (debconf preseeded to "No configuration"; refused if another MTA is installed, which
# it would replace), openssl, curl and python3 if missing (with sudo when not root; no system
# service is started, and postfix's is kept from starting at boot), and for --oauth nodejs and npm
# (Node.js 20 or later) and the identity provider's npm packages (npm ci in tests/idp), the same
# for --portal, and for --portal --check also chromium and a font, and Playwright for Python
# (pinned, pip into target/venv-browser, shared with scripts/test.sh; no browser is downloaded).
# Dovecot and Postfix must run as root, so when you are not root the script builds as you and then
# re-runs itself under sudo.
#
# Ports (interactive mode): IMAPGATE_DEMO_TLS_PORT (1993, IMAP, implicit TLS),
# IMAPGATE_DEMO_STARTTLS_PORT (1143, IMAP, STARTTLS), IMAPGATE_DEMO_SMTP_TLS_PORT (1465, SMTP
# submission, implicit TLS), IMAPGATE_DEMO_SMTP_STARTTLS_PORT (1587, SMTP submission, STARTTLS),
# IMAPGATE_DEMO_POP3_TLS_PORT (1995, POP3, implicit TLS), IMAPGATE_DEMO_ADMIN_PORT (9190),
# IMAPGATE_DEMO_PORTAL_PORT (8443, with --portal), all on 127.0.0.1.
# The backends (Dovecot's IMAP, POP3 and LMTP, Postfix's submission port) get free ports.
# --check picks free ports for everything.
# IMAPGATE_DEMO_BIN=path uses that imapgate binary instead of running `cargo build --locked`.
set -euo pipefail

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

MODE=interactive
OAUTH=0
PORTAL=0
CODE_ENV_FILE=""
ARGS=("$@") # for the re-run under sudo
set_mode() {
  if [ "$MODE" != interactive ] && [ "$MODE" != "$1" ]; then
    usage >&2
    exit 64
  fi
  MODE="$1"
}
while [ "$#" -gt 0 ]; do
  case "$1" in
    --check) set_mode check ;;
    --oauth) OAUTH=1 ;;
    --portal) PORTAL=1 ;;
    --code)
      set_mode code
      if [ "$#" -gt 1 ] && [ "${2#-}" = "$2" ]; then
        CODE_ENV_FILE="$2"
        shift
      fi
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      exit 64
      ;;
  esac
  shift
done

START_DIR="$PWD" # demo.env goes here
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

# --code: the current TOTP code for a running demo (no build, no root, no packages).
if [ "$MODE" = code ]; then
  secret="${IMAPGATE_DEMO_TOTP_SECRET:-}"
  if [ -z "$secret" ]; then
    env_file="${CODE_ENV_FILE:-$START_DIR/demo.env}"
    [ -r "$env_file" ] || die "no IMAPGATE_DEMO_TOTP_SECRET and no readable $env_file (is the demo running?)"
    secret="$(grep -E '^IMAPGATE_DEMO_TOTP_SECRET=' "$env_file" | head -n 1 | cut -d= -f2- | tr -d "'\"")"
    [ -n "$secret" ] || die "$env_file has no IMAPGATE_DEMO_TOTP_SECRET"
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to compute the code"
  totp_code "$secret"
  exit 0
fi
cd "$REPO"

DEMO_USER=demo@example.org
HOST=127.0.0.1
CURL_MAX_TIME=30
# --oauth: the test identity provider (tests/idp/server.js). Its client `demo` gets tokens
# (client credentials grant) whose `email` is DEMO_USER; `imapgate-cli` is its device-flow client.
IDP_CLIENT=demo
IDP_SECRET="secret-demo"
IDP_RESOURCE=urn:imapgate:rs256
IDP_ISSUER_NAME=demo-idp
# --portal: the portal's client at the test identity provider (registered with --client when the
# IdP starts; its secret is random, made at run time), and the IdP's people who sign in there
# (password pw-<account>): demo is DEMO_USER, hanna is in the group mail-admins (the helpdesk).
PORTAL_CLIENT=imapgate-portal
PORTAL_ACCOUNT=demo
PORTAL_ADMIN_ACCOUNT=hanna
# The browser test's Python (Playwright), the same venv scripts/test.sh makes.
BROWSER_VENV="$REPO/target/venv-browser"

# --- 1. system packages ----------------------------------------------------------------------
if [ -z "${IMAPGATE_DEMO_REEXEC:-}" ]; then
  step "checking system packages"
  # Postfix conflicts with every other MTA package: apt would remove the machine's own (exim4 on
  # a default Debian) to install it. Refuse instead of replacing someone's mail system.
  if ! pkg_installed postfix; then
    OTHER_MTA="$(dpkg-query -W -f='${Package} ${Status} ${Provides}\n' 2>/dev/null |
      awk '/ install ok installed/ && /mail-transport-agent/ { print $1; exit }')" || true
    [ -z "$OTHER_MTA" ] ||
      die "the demo needs Postfix, which would replace the installed mail server package $OTHER_MTA; run the demo on another machine or in a container"
  fi
  # "No configuration": the package writes no main.cf, so no system Postfix could start; the
  # demo runs its own instance from its directory.
  debconf_preseed 'postfix postfix/main_mailer_type select No configuration'
  ensure_packages dovecot-imapd:dovecot 'dovecot-pop3d:/usr/lib/dovecot/pop3' 'dovecot-lmtpd:/usr/lib/dovecot/lmtp' \
    postfix:postfix openssl:openssl curl:curl python3:python3 ca-certificates
  case " $ENSURE_PACKAGES_INSTALLED " in
    # We just installed Dovecot; if its service started anyway, it is ours to stop.
    *" dovecot-imapd "*) stop_system_dovecot ;;
  esac
  case " $ENSURE_PACKAGES_INSTALLED " in
    # policy-rc.d kept it from starting; nor should it at the next boot.
    *" postfix "*) disable_boot_service postfix ;;
  esac
  if [ "$OAUTH" -eq 1 ] || [ "$PORTAL" -eq 1 ]; then
    step "checking Node.js and the test identity provider's packages (tests/idp)"
    ensure_packages nodejs:node npm:npm
    NODE_MAJOR="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
    [ "$NODE_MAJOR" -ge 20 ] 2>/dev/null ||
      die "the test identity provider needs Node.js 20 or later; $(command -v node) is $(node --version 2>/dev/null || echo 'not working')"
    # Exactly as locked; as the invoking user (before any sudo), like scripts/test.sh. The
    # same npm ci brings axe-core, which the portal's browser test injects into every page.
    if [ ! -d tests/idp/node_modules/oidc-provider ] || [ ! -d tests/idp/node_modules/axe-core ] ||
      [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
      log "npm ci in tests/idp"
      (cd tests/idp && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in tests/idp failed"
    fi
  fi
  if [ "$PORTAL" -eq 1 ] && [ "$MODE" = check ]; then
    step "checking Chromium and Playwright for the portal's browser test (tests/browser)"
    ensure_packages chromium:chromium fonts-dejavu-core
    # As the invoking user, like npm ci; pip from PyPI only the first time.
    ensure_browser_venv "$BROWSER_VENV"
  fi
fi
if [ "$OAUTH" -eq 1 ] || [ "$PORTAL" -eq 1 ]; then
  [ -d tests/idp/node_modules/oidc-provider ] || die "tests/idp/node_modules is missing (npm ci in tests/idp)"
fi
BROWSER_PYTHON="$BROWSER_VENV/bin/python"
if [ "$PORTAL" -eq 1 ] && [ "$MODE" = check ]; then
  [ -x "$BROWSER_PYTHON" ] || die "no Playwright venv at $BROWSER_VENV (scripts/demo.sh --portal --check makes it)"
fi

# --- 2. the binary ---------------------------------------------------------------------------
BIN="${IMAPGATE_DEMO_BIN:-}"
if [ -z "$BIN" ]; then
  step "building imapgate (cargo build --locked, dev profile)"
  command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
  cargo build --locked
  BIN="${CARGO_TARGET_DIR:-target}/debug/imapgate"
fi
case "$BIN" in /*) ;; *) BIN="$REPO/$BIN" ;; esac
[ -x "$BIN" ] || die "no imapgate binary at $BIN"

# Dovecot and Postfix need root; re-run the rest under sudo with the binary we just built.
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "Dovecot and Postfix must be started as root; run this as root or install sudo"
  step "re-running as root with sudo (Dovecot and Postfix must start as root)"
  cd "$START_DIR"
  exec sudo env IMAPGATE_DEMO_REEXEC=1 IMAPGATE_DEMO_BIN="$BIN" \
    IMAPGATE_DEMO_TLS_PORT="${IMAPGATE_DEMO_TLS_PORT:-}" \
    IMAPGATE_DEMO_STARTTLS_PORT="${IMAPGATE_DEMO_STARTTLS_PORT:-}" \
    IMAPGATE_DEMO_SMTP_TLS_PORT="${IMAPGATE_DEMO_SMTP_TLS_PORT:-}" \
    IMAPGATE_DEMO_SMTP_STARTTLS_PORT="${IMAPGATE_DEMO_SMTP_STARTTLS_PORT:-}" \
    IMAPGATE_DEMO_POP3_TLS_PORT="${IMAPGATE_DEMO_POP3_TLS_PORT:-}" \
    IMAPGATE_DEMO_ADMIN_PORT="${IMAPGATE_DEMO_ADMIN_PORT:-}" \
    IMAPGATE_DEMO_PORTAL_PORT="${IMAPGATE_DEMO_PORTAL_PORT:-}" \
    PATH="$PATH:/usr/sbin:/sbin" bash "$REPO/scripts/demo.sh" "${ARGS[@]}"
fi

# --- 3. ports and scratch space --------------------------------------------------------------
# The backends' ports: Dovecot's IMAP (implicit TLS), POP3 (implicit TLS) and LMTP (plain),
# and Postfix's submission port for the gateway (XCLIENT, STARTTLS).
if [ "$MODE" = check ]; then
  mapfile -t PORTS < <(free_ports 11)
  [ "${#PORTS[@]}" -eq 11 ] || die "could not pick free ports"
  TLS_PORT="${PORTS[0]}" STARTTLS_PORT="${PORTS[1]}" ADMIN_PORT="${PORTS[2]}" PORTAL_PORT="${PORTS[3]}"
  SMTP_TLS_PORT="${PORTS[4]}" SMTP_STARTTLS_PORT="${PORTS[5]}" POP3_TLS_PORT="${PORTS[6]}"
  BACKEND_PORT="${PORTS[7]}" BACKEND_POP3S_PORT="${PORTS[8]}" BACKEND_LMTP_PORT="${PORTS[9]}"
  POSTFIX_PORT="${PORTS[10]}"
else
  TLS_PORT="${IMAPGATE_DEMO_TLS_PORT:-1993}"
  STARTTLS_PORT="${IMAPGATE_DEMO_STARTTLS_PORT:-1143}"
  SMTP_TLS_PORT="${IMAPGATE_DEMO_SMTP_TLS_PORT:-1465}"
  SMTP_STARTTLS_PORT="${IMAPGATE_DEMO_SMTP_STARTTLS_PORT:-1587}"
  POP3_TLS_PORT="${IMAPGATE_DEMO_POP3_TLS_PORT:-1995}"
  ADMIN_PORT="${IMAPGATE_DEMO_ADMIN_PORT:-9190}"
  PORTAL_PORT="${IMAPGATE_DEMO_PORTAL_PORT:-8443}"
  PORT_SPECS=("TLS_PORT:$TLS_PORT" "STARTTLS_PORT:$STARTTLS_PORT" "SMTP_TLS_PORT:$SMTP_TLS_PORT"
    "SMTP_STARTTLS_PORT:$SMTP_STARTTLS_PORT" "POP3_TLS_PORT:$POP3_TLS_PORT" "ADMIN_PORT:$ADMIN_PORT")
  [ "$PORTAL" -eq 0 ] || PORT_SPECS+=("PORTAL_PORT:$PORTAL_PORT")
  SEEN_PORTS=" "
  for spec in "${PORT_SPECS[@]}"; do
    port="${spec#*:}"
    case "$port" in '' | *[!0-9]*) die "IMAPGATE_DEMO_${spec%%:*} must be a port number, not '$port'" ;; esac
    case "$SEEN_PORTS" in *" $port "*) die "IMAPGATE_DEMO_${spec%%:*}=$port is already given to another of the demo's ports" ;; esac
    SEEN_PORTS="$SEEN_PORTS$port "
    if port_open "$HOST" "$port"; then
      die "$HOST:$port is already in use; set IMAPGATE_DEMO_${spec%%:*} to another port"
    fi
  done
  mapfile -t PORTS < <(free_ports 4)
  [ "${#PORTS[@]}" -eq 4 ] || die "could not pick free ports"
  BACKEND_PORT="${PORTS[0]}" BACKEND_POP3S_PORT="${PORTS[1]}" BACKEND_LMTP_PORT="${PORTS[2]}"
  POSTFIX_PORT="${PORTS[3]}"
fi

WORK=""
GATEWAY_PID=""
TAIL_PID=""
SUCCESS=0

# shellcheck disable=SC2317 # called from the EXIT trap
dump_logs() {
  local f
  for f in "$WORK/gateway/cli.log" "$WORK/gateway/totp-enroll.txt" "$WORK/gateway/gateway.log" "$WORK/gateway/audit.log" \
    "$WORK/dovecot/dovecot.stderr" "$WORK/dovecot/dovecot.log" "$WORK/postfix/postfix.out" "$WORK/postfix/maillog" \
    "$WORK/idp/idp.out" "$WORK/idp/idp.log" "$WORK/idp/oauth-token.log"; do
    [ -s "$f" ] || continue
    printf '\n----- %s (last 200 lines) -----\n' "${f#"$WORK"/}" >&2
    tail -n 200 "$f" >&2 || true
  done
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$GATEWAY_PID" ]; then
    log "stopping imapgate (pid $GATEWAY_PID)"
    stop_pid "$GATEWAY_PID" imapgate
  fi
  if [ -n "${OAUTH_TOKEN_PID:-}" ]; then
    stop_pid "$OAUTH_TOKEN_PID" "imapgate oauth token"
  fi
  if [ -n "$TAIL_PID" ]; then
    sleep 0.3 # let tail print the gateway's last lines
    stop_pid "$TAIL_PID" tail
  fi
  if [ -n "$POSTFIX_CONF_DIR" ]; then
    log "stopping Postfix (postfix -c $POSTFIX_CONF_DIR stop)"
    postfix_sandbox_stop
  fi
  if [ -n "$DOVECOT_PID" ]; then
    log "stopping Dovecot (pid $DOVECOT_PID)"
    dovecot_sandbox_stop
  fi
  if [ -n "$IDP_PID" ]; then
    log "stopping the identity provider (pid $IDP_PID)"
    idp_stop
  fi
  if [ "$SUCCESS" -ne 1 ] && [ "$rc" -ne 0 ] && [ -n "$WORK" ]; then
    dump_logs
  fi
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
if [ "$MODE" = interactive ]; then
  trap 'SUCCESS=1; exit 0' INT # Ctrl-C is how the demo is meant to end
else
  trap 'exit 130' INT
fi
trap 'exit 143' TERM

fail() {
  printf '\nFAILED: %s\n' "$*" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/imapgate-demo.XXXXXX")"
chmod 755 "$WORK"
DV="$WORK/dovecot"
PF="$WORK/postfix"
GW="$WORK/gateway"
mkdir -p "$DV" "$PF" "$GW"
chmod 700 "$GW"

# --- 4. the backends -------------------------------------------------------------------------
step "starting a throwaway Dovecot: IMAP $HOST:$BACKEND_PORT and POP3 $HOST:$BACKEND_POP3S_PORT (implicit TLS, master user), LMTP $HOST:$BACKEND_LMTP_PORT, demo mailbox"
DOVECOT_SANDBOX_POP3S_PORT="$BACKEND_POP3S_PORT" DOVECOT_SANDBOX_LMTP_PORT="$BACKEND_LMTP_PORT" \
  dovecot_sandbox_start "$DV" "$BACKEND_PORT" implicit "$DEMO_USER"
DEMO_DOMAIN="${DEMO_USER#*@}"
step "starting a throwaway Postfix: submission for the gateway on $HOST:$POSTFIX_PORT (XCLIENT from 127.0.0.1, STARTTLS), delivering $DEMO_DOMAIN to Dovecot's LMTP"
postfix_sandbox_start "$PF" "$POSTFIX_PORT" "$BACKEND_LMTP_PORT" "$DEMO_DOMAIN"

# --- 4b. the gateway's certificate -------------------------------------------------------------
# From a throwaway CA, for localhost and 127.0.0.1 (the portal's public URL is
# https://localhost:PORT): clients can verify it against TLS_DIR/ca.pem, as the portal's
# browser test does, where an in-memory tls.self_signed certificate could only be accepted blindly.
TLS_DIR="$WORK/tls"
step "making the gateway's certificate (a throwaway CA signs one for localhost and 127.0.0.1)"
make_test_pki "$TLS_DIR"
if [ ! -s "$TLS_DIR/server.pem" ] || [ ! -s "$TLS_DIR/ca.pem" ]; then
  fail "openssl could not make the demo's certificate"
fi

# --- 4c. --oauth, --portal: the identity provider ---------------------------------------------
OAUTH_CONFIG=""
PORTAL_CONFIG=""
IDP_ARGS=()
if [ "$PORTAL" -eq 1 ]; then
  PORTAL_URL="https://localhost:$PORTAL_PORT"
  # The portal's client secret: random, in a file only root reads, and registered at the IdP
  # as it starts (the IdP has its clients in memory only).
  PORTAL_SECRET_FILE="$GW/portal-oidc.secret"
  (umask 077 && random_secret >"$PORTAL_SECRET_FILE") || fail "could not write $PORTAL_SECRET_FILE"
  IDP_ARGS+=(--client "$PORTAL_CLIENT:$(cat "$PORTAL_SECRET_FILE"):$PORTAL_URL/auth/callback")
fi
if [ "$OAUTH" -eq 1 ] || [ "$PORTAL" -eq 1 ]; then
  IDP_DIR="$WORK/idp"
  step "starting the test identity provider (node tests/idp/server.js: npm oidc-provider, in memory)"
  idp_start "$IDP_DIR" "${IDP_ARGS[@]}" || fail "the identity provider did not start"
  log "issuer $IDP_URL (pid $IDP_PID; discovery $IDP_URL/.well-known/openid-configuration)"
fi
if [ "$PORTAL" -eq 1 ]; then
  PORTAL_CONFIG="portal:                            # the self-service portal (docs/portal.md)
  address: \"$HOST:$PORTAL_PORT\"
  public_url: \"$PORTAL_URL\"
  mail:                            # what the portal tells mail clients
    imap_host: $HOST
    imap_port: $TLS_PORT
    imap_starttls_port: $STARTTLS_PORT
  oidc:                            # the test identity provider, its client registered above
    issuer: \"$IDP_URL\"
    client_id: $PORTAL_CLIENT
    client_secret_file: \"$PORTAL_SECRET_FILE\"
    scopes: [openid, email, profile, groups]
    domains: [example.org]
    admin: { claim: groups, values: [mail-admins] }   # the helpdesk"
fi
APPROVAL_CONFIG=""
if [ "$PORTAL" -eq 1 ]; then
  # A code-less login from a new network waits for the person's approval in the portal.
  APPROVAL_CONFIG="    approval: portal               # sign-in approval (docs/portal.md#sign-in-approval)"
fi
if [ "$OAUTH" -eq 1 ]; then
  OAUTH_CONFIG="  oauth:                           # OAuth 2.0 bearer tokens (AUTHENTICATE XOAUTH2 / OAUTHBEARER)
    issuers:
      - name: $IDP_ISSUER_NAME             # the test identity provider (tests/idp), loopback only
        issuer: \"$IDP_URL\"
        audiences: [imap]
        required_scopes: [imap]"
fi

# --- 5. the gateway --------------------------------------------------------------------------
# The key ring that encrypts TOTP secrets at rest: one key, made once, kept out of the config.
KEY_FILE="$GW/k1.key"
step "generating the TOTP key ring (imapgate keys generate > k1.key)"
(umask 077 && "$BIN" keys generate >"$KEY_FILE" 2>>"$GW/cli.log") || fail "imapgate keys generate failed"

# The admin token for the guard's endpoints (imapgate guard status|clear), random, kept out of
# the config like every secret.
ADMIN_TOKEN_FILE="$GW/admin.token"
(umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ADMIN_TOKEN_FILE") ||
  fail "could not write $ADMIN_TOKEN_FILE"

CONFIG="$GW/imapgate.yaml"
cat >"$CONFIG" <<EOF
# imapgate demo configuration, written by scripts/demo.sh (throwaway).
listeners:
  - { name: imaps, address: "$HOST:$TLS_PORT", tls: implicit }
  - { name: imap, address: "$HOST:$STARTTLS_PORT", tls: starttls }
  # SMTP submission (RFC 8314 implicit TLS, RFC 6409 with STARTTLS) and POP3: the gateway's own
  # greeting and EHLO name; the same users, app passwords, TOTP, unlock windows and guard.
  - { name: smtps, protocol: smtp, address: "$HOST:$SMTP_TLS_PORT", tls: implicit, hostname: localhost }
  - { name: submission, protocol: smtp, address: "$HOST:$SMTP_STARTTLS_PORT", tls: starttls, hostname: localhost }
  - { name: pop3s, protocol: pop3, address: "$HOST:$POP3_TLS_PORT", tls: implicit }
tls:
  certificates:                    # signed by the demo's throwaway CA ($TLS_DIR/ca.pem)
    - cert_file: "$TLS_DIR/server.pem"
      key_file: "$TLS_DIR/server.key"
auth:
  store:                           # users, app passwords and TOTP enrolments (docs/store.md)
    backend: sqlite
    sqlite: { path: "$GW/imapgate.db" }
  secret_keys:                     # encrypts TOTP secrets in the store
    - id: k1
      file: "$KEY_FILE"
  active_key: k1
  mfa:
    default: required              # the secure default: no login without a second factor
    unlock_ttl: 12h                # after app password + code, no code needed from that /24 for 12h
    unlock_bind_subnet: true
    issuer: imapgate-demo          # the name authenticator apps show
$APPROVAL_CONFIG
$OAUTH_CONFIG
guard:                             # brute force and spraying (docs/guard.md); defaults otherwise
  per_ip: { failures: 5, per: 15m }     # the default is 10; 5 shows a block sooner in the demo
  tarpit: { start: 1s, max: 4s }        # the default max is 15s
backends:
  - name: dovecot
    address: "127.0.0.1:$BACKEND_PORT"
    tls: implicit
    ca_file: "$DV/tls/ca.pem"
    server_name: localhost
    login: master_user
    master_user: $DOVECOT_MASTER_USER
    master_password_file: "$DV/master.secret"
  - name: postfix                  # hands the login over with XCLIENT LOGIN=… ADDR=… (no password)
    protocol: smtp
    address: "127.0.0.1:$POSTFIX_PORT"
    tls: starttls
    ca_file: "$PF/tls/ca.pem"
    server_name: localhost
    login: xclient
  - name: dovecot-pop3             # USER demo@example.org*$DOVECOT_MASTER_USER, then the master password
    protocol: pop3
    address: "127.0.0.1:$BACKEND_POP3S_PORT"
    tls: implicit
    ca_file: "$DV/tls/ca.pem"
    server_name: localhost
    login: master_user
    master_user: $DOVECOT_MASTER_USER
    master_password_file: "$DV/master.secret"
routes:
  default: dovecot
  smtp: { default: postfix }
  pop3: { default: dovecot-pop3 }
admin:
  address: "$HOST:$ADMIN_PORT"
  token_file: "$ADMIN_TOKEN_FILE"
logging:
  format: text
  level: info
  audit: "$GW/audit.log"
$PORTAL_CONFIG
EOF

step "checking the configuration (imapgate check-config)"
"$BIN" check-config -c "$CONFIG" >>"$GW/cli.log" 2>&1 || fail "imapgate check-config rejected $CONFIG"

step "creating user $DEMO_USER and an app password (imapgate users add / app-password create)"
"$BIN" users add "$DEMO_USER" -c "$CONFIG" >>"$GW/cli.log" 2>&1 || fail "imapgate users add failed"
APP_PASSWORD="$("$BIN" app-password create "$DEMO_USER" -c "$CONFIG" --label demo 2>>"$GW/cli.log")" ||
  fail "imapgate app-password create failed"
if ! [[ "$APP_PASSWORD" =~ ^[a-z]{4}( [a-z]{4}){3}$ ]]; then
  fail "app-password create printed '$APP_PASSWORD', expected four groups of four lowercase letters"
fi

# The URI (it carries the secret) is alone on stdout; the QR code and the instructions go to
# stderr, kept for the banner below. --no-verify: nobody is here to type a first code.
step "enrolling $DEMO_USER for TOTP (imapgate totp enroll --no-verify)"
TOTP_URI="$("$BIN" totp enroll "$DEMO_USER" --no-verify -c "$CONFIG" 2>"$GW/totp-enroll.txt")" ||
  fail "imapgate totp enroll failed: $(tail -n 3 "$GW/totp-enroll.txt")"
if ! [[ "$TOTP_URI" =~ ^otpauth://totp/[^?]+\?(.*\&)?secret=([A-Z2-7]+)(\&|$) ]]; then
  fail "totp enroll printed '$TOTP_URI', expected an otpauth://totp/ URI with a base32 secret"
fi
TOTP_SECRET="${BASH_REMATCH[2]}"
if [ "$MODE" = check ]; then
  cat "$GW/totp-enroll.txt" >>"$GW/cli.log"
fi
# Captured first: `| grep -q` would close the pipe early, and under pipefail the writer's EPIPE
# would fail the check at random.
USER_SHOW="$("$BIN" users show "$DEMO_USER" -c "$CONFIG" 2>>"$GW/cli.log")" ||
  fail "imapgate users show $DEMO_USER failed"
grep -q '^totp: enrolled' <<<"$USER_SHOW" || fail "imapgate users show does not list $DEMO_USER as enrolled: $USER_SHOW"

GATEWAY_PORTS=("$TLS_PORT" "$STARTTLS_PORT" "$SMTP_TLS_PORT" "$SMTP_STARTTLS_PORT" "$POP3_TLS_PORT" "$ADMIN_PORT")
PORTAL_NOTE=""
if [ "$PORTAL" -eq 1 ]; then
  GATEWAY_PORTS+=("$PORTAL_PORT")
  PORTAL_NOTE=", portal $HOST:$PORTAL_PORT"
fi
step "starting imapgate (imaps $HOST:$TLS_PORT, imap+starttls $HOST:$STARTTLS_PORT, smtps $HOST:$SMTP_TLS_PORT, submission+starttls $HOST:$SMTP_STARTTLS_PORT, pop3s $HOST:$POP3_TLS_PORT, admin $HOST:$ADMIN_PORT$PORTAL_NOTE)"
"$BIN" run -c "$CONFIG" >"$GW/gateway.log" 2>&1 &
GATEWAY_PID=$!
for port in "${GATEWAY_PORTS[@]}"; do
  wait_for_port "$HOST" "$port" 60 "$GATEWAY_PID" ||
    fail "imapgate is not listening on $HOST:$port after 60 s (or it exited)"
done

# --- 6. show it working ----------------------------------------------------------------------
# The first login needs the app password immediately followed by the current code; it unlocks
# that app password for the client's /24, from where the bare app password then works as well.
# curl sends the password as typed; the gateway ignores the spaces.
TOTP_CODE="$(totp_code "$TOTP_SECRET")" || fail "could not compute a TOTP code with python3"
[[ "$TOTP_CODE" =~ ^[0-9]{6}$ ]] || fail "the computed TOTP code '$TOTP_CODE' is not 6 digits"
CURL=(curl --silent --show-error --max-time "$CURL_MAX_TIME")
CRED="$DEMO_USER:$APP_PASSWORD"
CRED_CODE="$DEMO_USER:$APP_PASSWORD$TOTP_CODE"
# Another /24 on the loopback interface (Linux delivers all of 127.0.0.0/8 locally).
OTHER_SRC=127.0.1.1

# Interactive mode logs in from 127.0.1.1, so that 127.0.0.1, where your own mail client connects
# from, is not unlocked yet and asks for a code as a new device would. --check logs in from
# 127.0.0.1 and then shows that the unlock does not reach 127.0.1.1.
SHOW_FROM=""
CURL_SHOW=("${CURL[@]}")
if [ "$MODE" = interactive ] &&
  "${CURL[@]}" --interface "$OTHER_SRC" --output /dev/null "http://$HOST:$ADMIN_PORT/healthz" 2>/dev/null; then
  SHOW_FROM="--interface $OTHER_SRC "
  CURL_SHOW+=(--interface "$OTHER_SRC")
fi

step "curl: list mailboxes with app password + current TOTP code (imaps://$HOST:$TLS_PORT/)"
log "\$ curl ${SHOW_FROM}--insecure imaps://$HOST:$TLS_PORT/ --user '$CRED_CODE'"
OUT="$("${CURL_SHOW[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$CRED_CODE" 2>&1)" ||
  fail "login with app password + code over implicit TLS failed: $OUT"
printf '%s\n' "$OUT"
grep -q 'INBOX' <<<"$OUT" || fail "mailbox list has no INBOX"

step "curl: fetch message 1 of INBOX with the app password alone (unlocked from this /24 now)"
log "\$ curl ${SHOW_FROM}--insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user '$CRED'"
OUT="$("${CURL_SHOW[@]}" --insecure "imaps://$HOST:$TLS_PORT/INBOX;UID=1" --user "$CRED" 2>&1)" ||
  fail "fetching message 1 with the unlocked app password failed: $OUT"
printf '%s\n' "$OUT"
grep -q '^Subject: Welcome to imapgate' <<<"$OUT" || fail "message 1 is not the demo message"

# imap_oauth MECH USER TOKEN: a real client, Python's imaplib, logs in to the implicit-TLS port
# with AUTHENTICATE MECH (XOAUTH2 or OAUTHBEARER) and the bearer TOKEN, lists the mailboxes and
# reads the subject of message 1. Exit 0: logged in; 3: the gateway refused the token; 1: other.
imap_oauth() {
  python3 - "$HOST" "$TLS_PORT" "$@" <<'PY'
import imaplib, ssl, sys

host, port, mech, user, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # like curl --insecure: the demo's throwaway CA
if mech == "XOAUTH2":  # Google's format
    first = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
else:  # RFC 7628 OAUTHBEARER
    first = f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()
rounds = []


def respond(challenge):
    # First the credentials. A refusal comes as an error challenge first (RFC 7628 3.2.2), which
    # wants a dummy answer: an empty line for XOAUTH2, ^A for OAUTHBEARER.
    rounds.append(challenge)
    if len(rounds) == 1:
        return first
    print(f"  server's error challenge: {challenge.decode(errors='replace')}")
    return b"" if mech == "XOAUTH2" else b"\x01"


try:
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=30)
    try:
        typ, data = m.authenticate(mech, respond)
    except imaplib.IMAP4.error as e:
        print(f"  AUTHENTICATE {mech} refused: {e}")
        sys.exit(3 if "AUTHENTICATIONFAILED" in str(e) else 1)
    print(f"  AUTHENTICATE {mech}: {typ} {data[0].decode(errors='replace')}")
    typ, boxes = m.list()
    for box in boxes:
        print(f"  LIST: {box.decode(errors='replace')}")
    typ, data = m.select("INBOX", readonly=True)
    print(f"  SELECT INBOX: {data[0].decode()} message(s)")
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    print(f"  message 1: {data[0][1].decode(errors='replace').strip()}")
    m.logout()
except (OSError, imaplib.IMAP4.error) as e:
    print(f"  error: {e}")
    sys.exit(1)
PY
}

if [ "$OAUTH" -eq 1 ]; then
  step "OAuth: get a token for $DEMO_USER from the identity provider (client credentials, client '$IDP_CLIENT')"
  log "\$ curl -u $IDP_CLIENT:$IDP_SECRET -d grant_type=client_credentials -d scope=imap -d resource=$IDP_RESOURCE $IDP_URL/token"
  TOKEN="$(idp_client_token "$IDP_URL" "$IDP_CLIENT" "$IDP_SECRET" "$IDP_RESOURCE" imap)" ||
    fail "could not get a token from the identity provider"
  log "access token: a JWT (RS256, 10 minutes); its claims: $(jwt_claims "$TOKEN")"

  step "python3 imaplib: AUTHENTICATE XOAUTH2 as $DEMO_USER with that token (imaps://$HOST:$TLS_PORT/)"
  log "\$ python3 -c \"m = imaplib.IMAP4_SSL('$HOST', $TLS_PORT, ...); m.authenticate('XOAUTH2', lambda _: b'user=$DEMO_USER^Aauth=Bearer TOKEN^A^A'); ...\""
  RC=0
  OUT="$(imap_oauth XOAUTH2 "$DEMO_USER" "$TOKEN" 2>&1)" || RC=$?
  printf '%s\n' "$OUT"
  [ "$RC" -eq 0 ] || fail "imaplib could not log in with XOAUTH2 (exit $RC)"
  grep -q 'Subject: Welcome to imapgate' <<<"$OUT" || fail "imaplib did not read the demo message after XOAUTH2"

  step "curl: fetch message 1 with the token (AUTHENTICATE XOAUTH2)"
  log "\$ curl --insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user '$DEMO_USER:' --oauth2-bearer \"\$TOKEN\" --login-options AUTH=XOAUTH2"
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/INBOX;UID=1" --user "$DEMO_USER:" \
    --oauth2-bearer "$TOKEN" --login-options AUTH=XOAUTH2 2>&1)" || fail "curl could not log in with XOAUTH2: $OUT"
  grep '^Subject:' <<<"$OUT" || true
  grep -q '^Subject: Welcome to imapgate' <<<"$OUT" || fail "curl did not fetch the demo message after XOAUTH2: $OUT"
fi

# expect_refused WHAT OUTPUT RC: the login must have failed as an authentication failure (curl
# exit 67, "Login denied"), not for an unrelated reason such as a connection or interface error.
expect_refused() {
  [ "$3" -ne 0 ] || fail "$1 logged in: $2"
  [ "$3" -eq 67 ] || fail "$1: expected an authentication failure (curl exit 67), got exit $3: $2"
  log "ok: refused ($2)"
}

# audit_count PATTERN...: how many audit lines match every extended regex.
audit_count() {
  local line p ok n=0
  if [ -r "$GW/audit.log" ]; then
    while IFS= read -r line; do
      ok=1
      for p in "$@"; do
        if ! grep -Eq -- "$p" <<<"$line"; then
          ok=0
          break
        fi
      done
      n=$((n + ok))
    done <"$GW/audit.log"
  fi
  printf '%s\n' "$n"
}

# audit_has PATTERN...: waits up to 5 s for one audit line that matches every extended regex.
audit_has() {
  local deadline=$((SECONDS + 5)) line p ok
  while :; do
    if [ -r "$GW/audit.log" ]; then
      while IFS= read -r line; do
        ok=1
        for p in "$@"; do
          if ! grep -Eq -- "$p" <<<"$line"; then
            ok=0
            break
          fi
        done
        [ "$ok" -eq 0 ] || return 0
      done <"$GW/audit.log"
    fi
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# forge_token TOKEN [KEY]: the token with its `exp` moved a year on; the IdP's signature kept,
# or, with KEY (an RSA private key in PEM), a new RS256 signature by that key (same header/kid).
forge_token() {
  python3 - "$1" "${2:-}" <<'PY'
import base64, json, subprocess, sys

def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

header, payload, signature = sys.argv[1].split(".")
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
claims["exp"] += 365 * 86400
payload = b64(json.dumps(claims, separators=(",", ":")).encode())
if sys.argv[2]:
    signature = b64(subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", sys.argv[2]],
        input=f"{header}.{payload}".encode(), capture_output=True, check=True).stdout)
print(f"{header}.{payload}.{signature}")
PY
}

# expect_token_refused WHAT TOKEN USER REASON: both imaplib (XOAUTH2) and curl (XOAUTH2) must be
# refused as an authentication failure, and the audit log must get two new lines with REASON.
expect_token_refused() {
  local what="$1" token="$2" user="$3" reason="$4" out rc=0 before deadline
  before="$(audit_count '"result":"failure"' "\"reason\":\"$reason\"")"
  out="$(imap_oauth XOAUTH2 "$user" "$token" 2>&1)" || rc=$?
  [ "$rc" -ne 0 ] || fail "$what: imaplib logged in: $out"
  [ "$rc" -eq 3 ] || fail "$what: imaplib expected an authentication failure, got exit $rc: $out"
  log "ok: imaplib refused:"
  printf '%s\n' "$out" >&2
  rc=0
  out="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$user:" --oauth2-bearer "$token" \
    --login-options AUTH=XOAUTH2 2>&1)" || rc=$?
  expect_refused "$what (curl XOAUTH2)" "$out" "$rc"
  deadline=$((SECONDS + 5))
  until [ "$(audit_count '"result":"failure"' "\"reason\":\"$reason\"")" -ge $((before + 2)) ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: the audit log has no two new failures with reason $reason"
    sleep 0.2
  done
  log "ok: the audit log gives reason $reason for both"
}

OAUTH_TOKEN_PID=""
oauth_checks() {
  step "check: the audit log records the token login (credential oauth:$IDP_ISSUER_NAME, mfa idp)"
  audit_has '"result":"success"' "\"credential\":\"oauth:$IDP_ISSUER_NAME\"" '"mfa":"idp"' ||
    fail "no audit line for a successful token login"
  log "ok"

  step "check: OAUTHBEARER too (imaplib, and curl's own choice with --oauth2-bearer)"
  OUT="$(imap_oauth OAUTHBEARER "$DEMO_USER" "$TOKEN" 2>&1)" || fail "imaplib could not log in with OAUTHBEARER: $OUT"
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:" --oauth2-bearer "$TOKEN" 2>&1)" ||
    fail "curl could not log in with --oauth2-bearer: $OUT"
  grep -q 'INBOX' <<<"$OUT" || fail "mailbox list after curl's token login has no INBOX: $OUT"
  log "ok"

  step "check: a forged token (the real one with exp a year later, the IdP's signature kept) is refused"
  FORGED="$(forge_token "$TOKEN")" || fail "could not forge a token"
  [ "$FORGED" != "$TOKEN" ] || fail "the forged token equals the real one"
  expect_token_refused "a token with an altered payload" "$FORGED" "$DEMO_USER" bad_signature

  step "check: a token signed with someone else's RSA key under the IdP's kid is refused"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$IDP_DIR/attacker.key" 2>/dev/null ||
    fail "openssl could not make an RSA key"
  FORGED="$(forge_token "$TOKEN" "$IDP_DIR/attacker.key")" || fail "could not sign a forged token"
  expect_token_refused "a token signed by another key" "$FORGED" "$DEMO_USER" bad_signature

  step "check: a genuine token for alice@example.org cannot log in as $DEMO_USER"
  ALICE_TOKEN="$(idp_client_token "$IDP_URL" alice secret-alice "$IDP_RESOURCE" imap)" ||
    fail "could not get a token for alice"
  expect_token_refused "alice's token as $DEMO_USER" "$ALICE_TOKEN" "$DEMO_USER" user_mismatch

  step "check: imapgate oauth token (device flow, client imapgate-cli), approved at the IdP's test hook"
  "$BIN" oauth token --issuer "$IDP_ISSUER_NAME" --client-id imapgate-cli --timeout 60s -c "$CONFIG" \
    >"$IDP_DIR/device-token" 2>"$IDP_DIR/oauth-token.log" &
  OAUTH_TOKEN_PID=$!
  local deadline=$((SECONDS + 20)) user_code=""
  while :; do
    user_code="$(grep -oE '\b[B-DF-HJ-NP-TV-XZ]{4}-[B-DF-HJ-NP-TV-XZ]{4}\b' "$IDP_DIR/oauth-token.log" || true)"
    user_code="${user_code%%$'\n'*}" # the first one
    [ -z "$user_code" ] || break
    kill -0 "$OAUTH_TOKEN_PID" 2>/dev/null || fail "imapgate oauth token exited without showing a user code"
    [ "$SECONDS" -lt "$deadline" ] || fail "imapgate oauth token showed no user code within 20 s"
    sleep 0.2
  done
  log "user code $user_code; approving it for account 'demo' (POST $IDP_URL/__device/approve)"
  OUT="$("${CURL[@]}" --fail-with-body --data-urlencode "user_code=$user_code" --data account=demo \
    "$IDP_URL/__device/approve" 2>&1)" || fail "the IdP did not approve $user_code: $OUT"
  wait_pid_gone "$OAUTH_TOKEN_PID" 70 || fail "imapgate oauth token still runs 70 s after the approval"
  RC=0
  wait "$OAUTH_TOKEN_PID" || RC=$?
  OAUTH_TOKEN_PID=""
  [ "$RC" -eq 0 ] || fail "imapgate oauth token failed (exit $RC)"
  DEVICE_TOKEN="$(head -n 1 "$IDP_DIR/device-token")"
  log "token claims: $(jwt_claims "$DEVICE_TOKEN" 2>/dev/null || echo '(not a JWT)')"
  OUT="$(imap_oauth XOAUTH2 "$DEMO_USER" "$DEVICE_TOKEN" 2>&1)" ||
    fail "imaplib could not log in with the device-flow token: $OUT"
  log "ok: logged in with it (XOAUTH2)"
}

# portal_checks: the portal's main path in a real browser, run last because it ends with the
# helpdesk resetting the demo user's TOTP: tests/browser/portal_e2e.py (headless Chromium through
# Playwright, axe-core on every page) as the demo user and the helpdesk, against this demo's IdP,
# portal, gateway and Dovecot.
portal_checks() {
  local ca="$TLS_DIR/ca.pem" metrics="http://$HOST:$ADMIN_PORT/metrics"
  step "check: the portal answers $PORTAL_URL/healthz (its certificate verified against the demo's CA)"
  OUT="$("${CURL[@]}" --fail --cacert "$ca" "$PORTAL_URL/healthz" 2>&1)" || fail "the portal's /healthz did not answer 2xx: $OUT"
  log "ok: $OUT"

  step "check: sign-in approval in headless Chromium (tests/browser/approval_e2e.py): curl without a code from new networks is refused with an [ALERT]; $PORTAL_ACCOUNT approves one in the portal (that login then works) and denies another (it stays refused)"
  RC=0
  IMAPGATE_TEST_APP_PASSWORD="$APP_PASSWORD" timeout --kill-after=10 180 "$BROWSER_PYTHON" tests/browser/approval_e2e.py \
    --portal "$PORTAL_URL" --imap-port "$TLS_PORT" --ca "$ca" --account "$PORTAL_ACCOUNT" || RC=$?
  [ "$RC" -ne 124 ] || fail "the approval browser test did not finish within 180 s"
  [ "$RC" -eq 0 ] || fail "the approval browser test failed (exit $RC; its FAIL line is above)"
  audit_has '"event":"operator"' '"via":"portal"' '"action":"signin_approved"' "\"actor\":\"$DEMO_USER\"" ||
    fail "no audit line for the approval"
  audit_has '"event":"operator"' '"via":"portal"' '"action":"signin_denied"' "\"actor\":\"$DEMO_USER\"" ||
    fail "no audit line for the denial"
  log "ok: approved and denied in the browser, both audited"

  # The browser test enrols TOTP on the portal's page, as a newcomer would: so the enrolment the
  # CLI made above goes first, as the helpdesk would remove it after a lost phone.
  step "check: $DEMO_USER's TOTP (enrolled with the CLI above) reset through the admin API, to enrol again in the portal"
  "$BIN" totp reset "$DEMO_USER" "${API[@]}" >>"$GW/cli.log" 2>&1 || fail "imapgate totp reset through the API failed"
  OUT="$("$BIN" users show "$DEMO_USER" -c "$CONFIG" 2>>"$GW/cli.log")" || fail "imapgate users show $DEMO_USER failed"
  ! grep -q '^totp: enrolled' <<<"$OUT" || fail "$DEMO_USER is still enrolled after the reset: $OUT"
  log "ok"

  step "check: the portal in headless Chromium (tests/browser/portal_e2e.py): $PORTAL_ACCOUNT signs in at the IdP, makes an app password, enrols TOTP, logs in over IMAP, revokes it; the helpdesk $PORTAL_ADMIN_ACCOUNT resets the TOTP"
  log "\$ $BROWSER_PYTHON tests/browser/portal_e2e.py --portal $PORTAL_URL --idp $IDP_URL --imap-port $TLS_PORT --ca $ca --user-account $PORTAL_ACCOUNT --admin-account $PORTAL_ADMIN_ACCOUNT --metrics $metrics"
  RC=0
  timeout --kill-after=10 300 "$BROWSER_PYTHON" tests/browser/portal_e2e.py --portal "$PORTAL_URL" --idp "$IDP_URL" \
    --imap-host "$HOST" --imap-port "$TLS_PORT" --ca "$ca" --user-account "$PORTAL_ACCOUNT" \
    --admin-account "$PORTAL_ADMIN_ACCOUNT" --metrics "$metrics" || RC=$?
  [ "$RC" -ne 124 ] || fail "the portal's browser test did not finish within 300 s"
  [ "$RC" -eq 0 ] || fail "the portal's browser test failed (exit $RC; its FAIL line is above)"

  step "check: the audit log has the portal's sign-ins and actions, each with its actor"
  audit_has '"event":"portal"' '"action":"signed_in"' "\"user\":\"$DEMO_USER\"" ||
    fail "no audit line for $DEMO_USER's sign-in to the portal"
  audit_has '"event":"operator"' '"via":"portal"' '"action":"app_password_created"' "\"actor\":\"$DEMO_USER\"" ||
    fail "no audit line for the app password $DEMO_USER made in the portal"
  audit_has '"event":"operator"' '"via":"portal"' '"action":"app_password_revoked"' "\"actor\":\"$DEMO_USER\"" ||
    fail "no audit line for the app password $DEMO_USER revoked in the portal"
  audit_has '"event":"operator"' '"via":"portal"' '"action":"totp_reset"' \
    "\"actor\":\"$PORTAL_ADMIN_ACCOUNT@example.org\"" "\"user\":\"$DEMO_USER\"" ||
    fail "no audit line for the helpdesk's TOTP reset of $DEMO_USER"
  log "ok: signed_in, app_password_created and app_password_revoked by $DEMO_USER, totp_reset by $PORTAL_ADMIN_ACCOUNT@example.org"
}

# mail_checks: SMTP submission and POP3 through the gateway, with real clients. curl sends one
# message through each SMTP listener (implicit TLS; STARTTLS) with the bare app password: the IMAP
# login with a code at the start unlocked it for 127.0.0.1, and the unlock window holds for every
# protocol. The gateway hands the login to Postfix with XCLIENT; Postfix delivers to Dovecot over
# LMTP; both messages are then read back through the gateway over POP3 (curl pop3s://) and IMAP
# (SEARCH). Last, Python's smtplib checks the submission port's pre-auth rules.
mail_checks() {
  local ca="$TLS_DIR/ca.pem" run mail_dir="$WORK/mail" maildir="$DV/mail/$DEMO_USER/Maildir"
  local kind port scheme msg subject deadline n nonce urls=()
  local -A subjects=()
  nonce="$(random_secret)"
  run="$(date +%s)-${nonce:0:8}"
  mkdir -p "$mail_dir"
  for kind in smtps submission; do
    subject="imapgate demo check $run via $kind"
    subjects[$kind]="$subject"
    msg="$mail_dir/$kind.eml"
    printf '%s\r\n' "From: $DEMO_USER" "To: $DEMO_USER" "Subject: $subject" "Date: $(date -R)" \
      "Message-ID: <$run.$kind@imapgate-demo.invalid>" "" \
      "Sent through imapgate's $kind listener with an app password; Postfix got the login by XCLIENT." >"$msg"
    if [ "$kind" = smtps ]; then
      port="$SMTP_TLS_PORT" scheme=smtps
      step "check: curl sends a message through SMTP submission over implicit TLS (smtps://$HOST:$port) with the bare app password (the IMAP login with a code unlocked 127.0.0.1 for every protocol)"
    else
      port="$SMTP_STARTTLS_PORT" scheme=smtp
      step "check: curl sends a message through SMTP submission with STARTTLS (smtp://$HOST:$port --ssl-reqd)"
    fi
    log "\$ curl --cacert $ca --ssl-reqd $scheme://$HOST:$port --user '$CRED' --mail-from $DEMO_USER --mail-rcpt $DEMO_USER --upload-file $msg"
    RC=0
    OUT="$("${CURL[@]}" --cacert "$ca" --ssl-reqd "$scheme://$HOST:$port" --user "$CRED" \
      --mail-from "$DEMO_USER" --mail-rcpt "$DEMO_USER" --upload-file "$msg" 2>&1)" || RC=$?
    [ "$RC" -eq 0 ] || fail "curl could not send through $scheme://$HOST:$port (exit $RC): $OUT"
    audit_has '"result":"success"' '"protocol":"smtp"' "\"listener\":\"$kind\"" "\"user\":\"$DEMO_USER\"" ||
      fail "no audit line for the SMTP login on the $kind listener"
    log "ok: accepted (audit: protocol smtp, listener $kind)"
  done
  audit_has '"result":"success"' '"protocol":"smtp"' '"mfa":"unlocked"' ||
    fail "no audit line shows an SMTP login in the unlock window the IMAP login earned"

  step "check: Postfix delivers both to Dovecot (LMTP) within 20 s"
  deadline=$((SECONDS + 20))
  for kind in smtps submission; do
    until grep -rqsF -- "Subject: ${subjects[$kind]}" "$maildir/new" "$maildir/cur"; do
      [ "$SECONDS" -lt "$deadline" ] ||
        fail "the message sent through the $kind listener did not reach $DEMO_USER's mailbox within 20 s (Postfix's log, postfix/maillog, is below)"
      sleep 0.2
    done
  done
  log "ok: both delivered"

  step "check: curl reads them back through the gateway over POP3 (pop3s://$HOST:$POP3_TLS_PORT/)"
  log "\$ curl --cacert $ca pop3s://$HOST:$POP3_TLS_PORT/ --user '$CRED'"
  OUT="$("${CURL[@]}" --cacert "$ca" "pop3s://$HOST:$POP3_TLS_PORT/" --user "$CRED" 2>&1)" ||
    fail "curl could not list the mailbox over POP3: $OUT"
  printf '%s\n' "$OUT"
  for n in $(tr -d '\r' <<<"$OUT" | awk '$1 ~ /^[0-9]+$/ { print $1 }'); do
    urls+=("pop3s://$HOST:$POP3_TLS_PORT/$n")
  done
  [ "${#urls[@]}" -ge 3 ] || fail "POP3 lists ${#urls[@]} message(s), expected the welcome message and the two sent"
  OUT="$("${CURL[@]}" --cacert "$ca" --user "$CRED" "${urls[@]}" 2>&1)" || fail "curl could not retrieve the messages over POP3: $OUT"
  for kind in smtps submission; do
    grep -qF -- "Subject: ${subjects[$kind]}" <<<"$OUT" || fail "POP3 does not return the message sent through $kind"
  done
  # Postfix took the login from XCLIENT (smtpd_sasl_authenticated_header = yes says so).
  [ "$(grep -cF "(Authenticated sender: $DEMO_USER)" <<<"$OUT")" -ge 2 ] ||
    fail "the messages' Received headers do not name $DEMO_USER as the authenticated sender (XCLIENT LOGIN)"
  { grep -F -e 'Subject: imapgate demo check' -e 'Authenticated sender' <<<"$OUT" || true; } | tr -d '\r' | sed 's/^[[:space:]]*/  /'
  audit_has '"result":"success"' '"protocol":"pop3"' '"listener":"pop3s"' "\"user\":\"$DEMO_USER\"" ||
    fail "no audit line for the POP3 login"
  log "ok: both there, each received by Postfix from (Authenticated sender: $DEMO_USER)"

  step "check: curl finds them through the gateway over IMAP too (SEARCH SUBJECT $run)"
  OUT="$("${CURL[@]}" --cacert "$ca" "imaps://$HOST:$TLS_PORT/INBOX?SUBJECT%20$run" --user "$CRED" 2>&1)" ||
    fail "curl could not search the mailbox over IMAP: $OUT"
  OUT="$(tr -d '\r' <<<"$OUT")"
  [ "$(sed -n 's/^\* SEARCH//p' <<<"$OUT" | wc -w)" -eq 2 ] ||
    fail "IMAP SEARCH SUBJECT $run did not find exactly the two messages: $OUT"
  log "ok: $OUT"

  step "check: the submission port's pre-auth rules (python3 smtplib): the gateway's own greeting; before STARTTLS no AUTH offered, AUTH and MAIL refused with 530; after it AUTH PLAIN LOGIN offered, MAIL before AUTH refused with 530"
  python3 - "$HOST" "$SMTP_STARTTLS_PORT" "$ca" "$DEMO_USER" <<'PY' || fail "the submission port broke a pre-auth rule (above)"
import smtplib, ssl, sys

host, port, ca, user = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def expect(what, reply, code, text):
    got, msg = reply[0], reply[1].decode(errors="replace")
    print(f"  {what}: {got} {msg}")
    if got != code or text not in msg:
        sys.exit(f"FAIL: {what}: expected {code} {text}")


s = smtplib.SMTP(timeout=30)
expect("greeting", s.connect(host, port), 220, "localhost ESMTP")
s._host = host  # the name STARTTLS verifies; smtplib sets it only when its constructor connects
if "postfix" in s.ehlo("client.example")[1].decode(errors="replace").lower():
    sys.exit("FAIL: the EHLO reply shows the backend's name")
print(f"  EHLO before TLS: {' '.join(sorted(s.esmtp_features))}")
if s.has_extn("auth") or not s.has_extn("starttls"):
    sys.exit("FAIL: before TLS the EHLO reply must offer STARTTLS and no AUTH")
# No initial response: a server that would take a password in cleartext answers 334 here.
expect("AUTH PLAIN before STARTTLS", s.docmd("AUTH", "PLAIN"), 530, "5.7.0")
expect("MAIL before STARTTLS", s.docmd("MAIL", f"FROM:<{user}>"), 530, "5.7.0")
s.starttls(context=ssl.create_default_context(cafile=ca))
s.ehlo("client.example")
mechanisms = s.esmtp_features.get("auth", "").upper().split()
print(f"  EHLO after TLS: {' '.join(sorted(s.esmtp_features))} (AUTH {' '.join(mechanisms)})")
if not {"PLAIN", "LOGIN"} <= set(mechanisms) or s.has_extn("starttls") or s.has_extn("xclient"):
    sys.exit("FAIL: after TLS the EHLO reply must offer AUTH PLAIN LOGIN, and neither STARTTLS nor XCLIENT")
expect("MAIL before AUTH", s.docmd("MAIL", f"FROM:<{user}>"), 530, "5.7.0")
s.quit()
PY
  log "ok"
}

if [ "$MODE" = check ]; then
  step "check: the audit log says how the second factor was met (totp, then unlocked)"
  audit_has '"result":"success"' '"mfa":"totp"' || fail "no audit line for a login with a TOTP code"
  audit_has '"result":"success"' '"mfa":"unlocked"' || fail "no audit line for a login in the unlock window"
  log "ok"

  step "check: login over STARTTLS (imap://$HOST:$STARTTLS_PORT/ --ssl-reqd; same /24, so unlocked)"
  OUT="$("${CURL[@]}" --insecure --ssl-reqd "imap://$HOST:$STARTTLS_PORT/" --user "$CRED" 2>&1)" ||
    fail "login over STARTTLS failed: $OUT"
  grep -q 'INBOX' <<<"$OUT" || fail "mailbox list over STARTTLS has no INBOX: $OUT"
  log "ok: $(tr -d '\r' <<<"$OUT" | head -n 1)"

  step "check: the app password without spaces works too"
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:${APP_PASSWORD// /}" 2>&1)" ||
    fail "login with the app password without spaces failed: $OUT"
  log "ok"

  step "check: the same app password + code from another /24 ($OTHER_SRC) is refused (the code was used)"
  RC=0
  OUT="$("${CURL[@]}" --interface "$OTHER_SRC" --insecure "imaps://$HOST:$TLS_PORT/" --user "$CRED_CODE" 2>&1)" || RC=$?
  expect_refused "a replayed code from $OTHER_SRC" "$OUT" "$RC"
  audit_has '"result":"failure"' '"reason":"code_replayed"' "\"client_ip\":\"$OTHER_SRC\"" ||
    fail "no audit line with reason code_replayed for $OTHER_SRC"

  step "check: the app password alone from $OTHER_SRC is refused (not unlocked there)"
  RC=0
  OUT="$("${CURL[@]}" --interface "$OTHER_SRC" --insecure "imaps://$HOST:$TLS_PORT/" --user "$CRED" 2>&1)" || RC=$?
  expect_refused "the app password alone from $OTHER_SRC" "$OUT" "$RC"
  audit_has '"result":"failure"' '"reason":"code_missing"' "\"client_ip\":\"$OTHER_SRC\"" ||
    fail "no audit line with reason code_missing for $OTHER_SRC"

  step "check: imaplib sends ID (\"name\" \"imaplib-demo\" ...) and logs in; the audit line carries the client's name"
  log "\$ python3 -c \"m = imaplib.IMAP4_SSL('$HOST', $TLS_PORT, ...); m._simple_command('ID', '(\\\"name\\\" \\\"imaplib-demo\\\" ...)'); m.login(...)\""
  RC=0
  OUT="$(python3 - "$HOST" "$TLS_PORT" "$DEMO_USER" "$APP_PASSWORD" <<'PY' 2>&1
import imaplib, ssl, sys
host, port, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # like curl --insecure: the demo's throwaway CA
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")  # RFC 2971; imaplib has no ID method
m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=30)
typ, data = m._simple_command("ID", '("name" "imaplib-demo" "version" "1.0" "os" "not-logged")')
assert typ == "OK", (typ, data)
typ, data = m.login(user, pw)
assert typ == "OK", (typ, data)
m.logout()
print("ok")
PY
)" || RC=$?
  [ "$RC" -eq 0 ] || fail "imaplib with ID could not log in (exit $RC): $OUT"
  audit_has '"result":"success"' '"client_name":"imaplib-demo"' '"client_version":"1.0"' ||
    fail "no audit line with the client's ID name (imaplib-demo) for the imaplib login"
  ! grep -q 'not-logged' "$GW/audit.log" || fail "an ID field other than name/version reached the audit log"
  log "ok: the audit line names the client: imaplib-demo 1.0 (and nothing else of its ID)"

  step "check: a wrong app password is refused, code or not"
  RC=0
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:aaaabbbbccccdddd$(totp_code "$TOTP_SECRET")" 2>&1)" || RC=$?
  expect_refused "a wrong app password" "$OUT" "$RC"

  GUESSER=127.0.2.1
  step "check: a password guesser at $GUESSER is blocked after 5 failures, then refused unchecked"
  for i in 1 2 3 4 5 6 7; do
    RC=0
    OUT="$("${CURL[@]}" --interface "$GUESSER" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:guess${i}guess${i}" 2>&1)" || RC=$?
    [ "$RC" -eq 67 ] || fail "guess $i: expected an authentication failure (curl exit 67), got exit $RC: $OUT"
  done
  audit_has '"event":"guard"' '"action":"block"' '"scope":"ip"' "\"key\":\"$GUESSER\"" ||
    fail "no audit line for the block of $GUESSER"
  audit_has '"result":"failure"' '"reason":"guard"' "\"client_ip\":\"$GUESSER\"" ||
    fail "no audit line shows a guess from $GUESSER refused by the guard (unchecked)"
  log "ok: blocked; later guesses were answered like wrong passwords without being checked"
  step "check: imapgate guard status lists the block; imapgate guard clear lifts it"
  OUT="$("$BIN" guard status -c "$CONFIG" 2>&1)" || fail "imapgate guard status failed: $OUT"
  printf '%s\n' "$OUT"
  grep -Eq "^ip +$GUESSER " <<<"$OUT" || fail "imapgate guard status does not list $GUESSER"
  OUT="$("$BIN" guard clear -c "$CONFIG" --scope ip --value "$GUESSER" 2>&1)" || fail "imapgate guard clear failed: $OUT"
  grep -q '"cleared":1' <<<"$OUT" || fail "imapgate guard clear did not clear the block: $OUT"
  OUT="$("$BIN" guard status -c "$CONFIG" 2>&1)" || fail "imapgate guard status failed: $OUT"
  ! grep -Eq "^ip +$GUESSER " <<<"$OUT" || fail "$GUESSER is still blocked after guard clear: $OUT"
  log "ok: cleared"

  API=(--admin "http://$HOST:$ADMIN_PORT" --token-file "$ADMIN_TOKEN_FILE")
  step "check: an app password created through the admin API logs in (imapgate app-password create --admin …)"
  API_PASSWORD="$("$BIN" app-password create "$DEMO_USER" --label api-demo "${API[@]}" 2>>"$GW/cli.log")" ||
    fail "app-password create through the API failed: $(tail -n 2 "$GW/cli.log")"
  [[ "$API_PASSWORD" =~ ^[a-z]{4}( [a-z]{4}){3}$ ]] || fail "the API printed '$API_PASSWORD', not an app password"
  API_ID="$("$BIN" app-password list "$DEMO_USER" "${API[@]}" 2>>"$GW/cli.log" | awk -F '\t' '$4 == "api-demo" { print $1 }')"
  [ -n "$API_ID" ] || fail "app-password list through the API does not show the new app password"
  # A code of the next 30-second step: accepted (±1 step) and not used yet by the checks above.
  NEXT_AT=$(($(date +%s) + 30))
  NEXT_CODE="$(totp_code "$TOTP_SECRET" "$NEXT_AT")"
  IDLE_LOG="$GW/idle.log"
  python3 - "$HOST" "$TLS_PORT" "$DEMO_USER" "${API_PASSWORD// /}$NEXT_CODE" >"$IDLE_LOG" 2>&1 <<'PY' &
import imaplib, socket, ssl, sys, time
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=30)
m.login(user, password)
m.select("INBOX")
tag = m._new_tag().decode()
m.send(f"{tag} IDLE\r\n".encode())
if not m.readline().startswith(b"+"):
    print("no IDLE continuation"); sys.exit(2)
print("idling", flush=True)
m.sock.settimeout(20)
try:
    while True:
        line = m.readline()
        if not line or line.startswith(b"* BYE"):
            break
except (OSError, socket.timeout):
    pass
print(f"closed {time.time():.3f}", flush=True)
PY
  IDLE_PID=$!
  for _ in $(seq 1 100); do
    grep -q '^idling' "$IDLE_LOG" 2>/dev/null && break
    kill -0 "$IDLE_PID" 2>/dev/null || fail "imaplib could not log in with the API's app password: $(cat "$IDLE_LOG")"
    sleep 0.1
  done
  grep -q '^idling' "$IDLE_LOG" || fail "imaplib did not reach IDLE: $(cat "$IDLE_LOG")"
  log "ok: imaplib logged in with it and idles"
  step "check: imapgate sessions list (through the API) shows that session"
  SESSIONS="$("$BIN" sessions list "$DEMO_USER" "${API[@]}" 2>>"$GW/cli.log")" || fail "imapgate sessions list failed"
  printf '%s\n' "$SESSIONS"
  awk -F '\t' -v id="$API_ID" '$3 == id { found = 1 } END { exit !found }' <<<"$SESSIONS" ||
    fail "imapgate sessions list does not show the session of app password $API_ID"
  step "check: revoking it through the API (imapgate app-password revoke --admin …) ends the IDLE session within 2 s"
  REVOKED_AT="$(date +%s.%N)"
  "$BIN" app-password revoke "$DEMO_USER" "$API_ID" "${API[@]}" >>"$GW/cli.log" 2>&1 || fail "app-password revoke through the API failed"
  wait "$IDLE_PID" || true
  CLOSED_AT="$(sed -n 's/^closed //p' "$IDLE_LOG")"
  [ -n "$CLOSED_AT" ] || fail "the IDLE session did not end: $(cat "$IDLE_LOG")"
  python3 -c "import sys; d = float(sys.argv[2]) - float(sys.argv[1]); print(f'closed {d:.2f} s after the revocation'); sys.exit(0 if d <= 2.0 else 1)" "$REVOKED_AT" "$CLOSED_AT" ||
    fail "the session outlived its revocation by more than 2 s"
  RC=0
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:${API_PASSWORD// /}$(totp_code "$TOTP_SECRET")" 2>&1)" || RC=$?
  expect_refused "the revoked app password" "$OUT" "$RC"
  audit_has '"event":"operator"' '"action":"app_password_revoked"' '"actor":"admin"' ||
    fail "no audit line for the revocation through the API"

  step "check: no login in cleartext on the STARTTLS port"
  if OUT="$("${CURL[@]}" "imap://$HOST:$STARTTLS_PORT/" --user "$CRED" 2>&1)"; then
    fail "a login without TLS succeeded on the STARTTLS port: $OUT"
  fi
  log "ok: refused ($OUT)"

  mail_checks

  if [ "$OAUTH" -eq 1 ]; then
    oauth_checks
  fi

  step "check: admin http://$HOST:$ADMIN_PORT/healthz and /metrics"
  OUT="$("${CURL[@]}" --fail "http://$HOST:$ADMIN_PORT/healthz" 2>&1)" || fail "/healthz did not answer 2xx: $OUT"
  log "ok: $OUT"
  READY=""
  for _ in $(seq 1 50); do
    READY="$("${CURL[@]}" --output /dev/null --write-out '%{http_code}' "http://$HOST:$ADMIN_PORT/readyz" 2>/dev/null || true)"
    [ "$READY" = 200 ] && break
    sleep 0.2
  done
  [ "$READY" = 200 ] || fail "/readyz is not ready (HTTP $READY): $("${CURL[@]}" "http://$HOST:$ADMIN_PORT/readyz" 2>&1)"
  log "ok: /readyz 200"
  OUT="$("${CURL[@]}" --fail "http://$HOST:$ADMIN_PORT/metrics" 2>&1)" || fail "/metrics did not answer 2xx: $OUT"
  for reason in code_replayed code_missing; do
    grep -Eq "^imapgate_totp_failures_total\\{reason=\"$reason\"\\} [1-9]" <<<"$OUT" ||
      fail "/metrics does not count $reason in imapgate_totp_failures_total"
  done
  log "ok: imapgate_totp_failures_total counts code_replayed and code_missing"
  for protocol in imap smtp pop3; do
    grep -Eq "^imapgate_auth_attempts_total\\{mechanism=\"(login|plain)\",protocol=\"$protocol\",result=\"success\"\\} [1-9]" <<<"$OUT" ||
      fail "/metrics does not count the demo's successful $protocol logins in imapgate_auth_attempts_total"
  done
  grep -Eq '^imapgate_guard_blocks_total\{reason="failures",scope="ip"\} [1-9]' <<<"$OUT" ||
    fail "/metrics does not count the guesser's block in imapgate_guard_blocks_total"
  log "ok: imapgate_auth_attempts_total counts the logins over IMAP, SMTP and POP3, imapgate_guard_blocks_total the block"
  grep -Eq '^process_resident_memory_bytes [1-9]' <<<"$OUT" ||
    fail "/metrics has no process_resident_memory_bytes (the process metrics)"
  grep -Eq '^imapgate_limit\{limit="max_connections"\} [1-9]' <<<"$OUT" ||
    fail "/metrics has no imapgate_limit{limit=\"max_connections\"} (the configured caps)"
  grep -Eq '^imapgate_auth_seconds_count\{mechanism="(login|plain)"\} [1-9]' <<<"$OUT" ||
    fail "/metrics does not time the demo's logins by mechanism in imapgate_auth_seconds"
  log "ok: process_resident_memory_bytes, imapgate_limit{limit=\"max_connections\"} and imapgate_auth_seconds by mechanism are on /metrics"
  if command -v promtool >/dev/null 2>&1; then
    LINT="$(promtool check metrics <<<"$OUT" 2>&1)" || fail "promtool check metrics refused the scrape: $LINT"
    log "ok: promtool check metrics accepts the scrape"
  fi
  if [ "$OAUTH" -eq 1 ]; then
    for result in valid bad_signature user_mismatch; do
      grep -Eq "^imapgate_oauth_tokens_total\\{result=\"$result\"\\} [1-9]" <<<"$OUT" ||
        fail "/metrics does not count $result in imapgate_oauth_tokens_total"
    done
    log "ok: imapgate_oauth_tokens_total counts valid, bad_signature and user_mismatch"
  fi

  if [ "$PORTAL" -eq 1 ]; then
    portal_checks
  fi

  kill -0 "$GATEWAY_PID" 2>/dev/null || fail "imapgate exited during the checks"
  SUCCESS=1
  ALSO_PASSED=""
  if [ "$OAUTH" -eq 1 ]; then
    ALSO_PASSED="; OAuth: XOAUTH2/OAUTHBEARER logins with IdP tokens (imaplib, curl), forged and other users' tokens refused, device flow"
  fi
  if [ "$PORTAL" -eq 1 ]; then
    ALSO_PASSED="$ALSO_PASSED; portal: the browser tests in headless Chromium (sign-in approval: approve and deny; sign-in at the IdP, app password, TOTP enrolment, IMAP logins, revocation ending the IDLE session, the helpdesk's TOTP reset)"
  fi
  printf '\nPASS: demo check (imapgate in front of Dovecot and Postfix, users in SQLite: app password + TOTP, unlock window, replayed code refused, a guesser blocked and cleared, an app password made and revoked through the admin API ending its IDLE session, STARTTLS, SMTP submission over implicit TLS and STARTTLS (XCLIENT to Postfix) and POP3: mail sent and read back over POP3 and IMAP, AUTH and MAIL refused before STARTTLS; admin%s)\n' "$ALSO_PASSED"
  exit 0
fi

# --- 7. interactive: print how to connect and stay up ----------------------------------------
ENV_FILE="$START_DIR/demo.env"
cat >"$ENV_FILE" <<EOF
# Written by scripts/demo.sh; valid while that demo runs. Use: . ./demo.env
IMAPGATE_DEMO_HOST=$HOST
IMAPGATE_DEMO_TLS_PORT=$TLS_PORT
IMAPGATE_DEMO_STARTTLS_PORT=$STARTTLS_PORT
IMAPGATE_DEMO_SMTP_TLS_PORT=$SMTP_TLS_PORT
IMAPGATE_DEMO_SMTP_STARTTLS_PORT=$SMTP_STARTTLS_PORT
IMAPGATE_DEMO_POP3_TLS_PORT=$POP3_TLS_PORT
IMAPGATE_DEMO_ADMIN_PORT=$ADMIN_PORT
IMAPGATE_DEMO_CA_FILE=$TLS_DIR/ca.pem
IMAPGATE_DEMO_USER=$DEMO_USER
IMAPGATE_DEMO_PASSWORD='$APP_PASSWORD'
IMAPGATE_DEMO_TOTP_SECRET='$TOTP_SECRET'
IMAPGATE_DEMO_TOTP_URI='$TOTP_URI'
EOF
if [ "$OAUTH" -eq 1 ]; then
  cat >>"$ENV_FILE" <<EOF
IMAPGATE_DEMO_IDP_URL=$IDP_URL
IMAPGATE_DEMO_IDP_CLIENT=$IDP_CLIENT
IMAPGATE_DEMO_IDP_SECRET=$IDP_SECRET
EOF
fi
if [ "$PORTAL" -eq 1 ]; then
  cat >>"$ENV_FILE" <<EOF
IMAPGATE_DEMO_PORTAL_URL=$PORTAL_URL
EOF
  [ "$OAUTH" -eq 1 ] || echo "IMAPGATE_DEMO_IDP_URL=$IDP_URL" >>"$ENV_FILE"
fi
chmod 600 "$ENV_FILE"
if [ -n "${SUDO_UID:-}" ] && [ -n "${SUDO_GID:-}" ]; then
  chown "$SUDO_UID:$SUDO_GID" "$ENV_FILE" 2>/dev/null || true
fi

# The QR code and instructions `imapgate totp enroll` printed, without its closing line.
printf '\n'
grep -v '^TOTP enrolled for ' "$GW/totp-enroll.txt" || true

CODE_CMD="'$REPO/scripts/demo.sh' --code '$ENV_FILE'"
if [ -n "$SHOW_FROM" ]; then
  UNLOCK_NOTE="The demo's own logins came from $OTHER_SRC, another /24: your client on 127.0.0.1 has
not logged in yet, so its first login needs a code."
else
  UNLOCK_NOTE="(curl could not use $OTHER_SRC as a source address here, so the demo logged in from
127.0.0.1 and has already unlocked this app password there: the code is not needed again today.)"
fi

cat <<EOF

imapgate demo is running.

  otpauth URI  $TOTP_URI
               (the QR code above holds the same; scan either into an authenticator app such as
               Aegis, FreeOTP, Google Authenticator, 1Password or Bitwarden)

Point any mail client at it (Thunderbird: "Configure manually", normal password):

  host         $HOST
  IMAPS        port $TLS_PORT   (TLS from the first byte; the demo's own throwaway CA signed
               the certificate: accept it, or trust $TLS_DIR/ca.pem)
  IMAP         port $STARTTLS_PORT   (STARTTLS required before login)
  SMTP         port $SMTP_TLS_PORT (TLS from the first byte) or $SMTP_STARTTLS_PORT (STARTTLS required before AUTH)
  POP3S        port $POP3_TLS_PORT   (TLS from the first byte)
  user         $DEMO_USER
  password     the app password immediately followed by the code your app shows now:
                 $APP_PASSWORD   (an app password; the spaces are optional)
               e.g. in Thunderbird's password field:  ${APP_PASSWORD// /}123456
               (with the current 6 digits in place of 123456; no app at hand? run $CODE_CMD)
  admin        http://$HOST:$ADMIN_PORT/metrics  /healthz  /readyz
  backends     Dovecot IMAP on $HOST:$BACKEND_PORT and POP3 on $HOST:$BACKEND_POP3S_PORT (verified TLS,
               master user '$DOVECOT_MASTER_USER'); Postfix on $HOST:$POSTFIX_PORT (verified STARTTLS, the
               login handed over with XCLIENT), delivering $DEMO_DOMAIN to Dovecot's LMTP

$UNLOCK_NOTE
After one login with a valid code the client may save the whole string; from the same /24 the
app password works without a code for 12 hours (auth.mfa.unlock_ttl), over IMAP, SMTP and POP3
alike, so reconnects, IDLE and sending keep working; after that the client asks again and you
type the app password with a fresh code.
Each code works once: the demo's curl used $TOTP_CODE, so if your app still shows it, wait
for the next one.

Try:
  curl --insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user "$CRED\$($CODE_CMD)"
  curl --insecure --ssl-reqd 'imap://$HOST:$STARTTLS_PORT/' --user '$CRED'   (after a login with a code)
  openssl s_client -quiet -crlf -connect $HOST:$TLS_PORT
  $BIN guard status -c $CONFIG      (after 5 wrong passwords from one address: blocked)

Send mail through the gateway's SMTP submission and read it back over POP3 (after a login with
a code from this /24, over any protocol; else append the code to the password as above):
  printf 'Subject: hello through imapgate\r\n\r\nHello.\r\n' >hello.eml
  curl --cacert '$TLS_DIR/ca.pem' 'smtps://$HOST:$SMTP_TLS_PORT' --user '$CRED' \\
      --mail-from $DEMO_USER --mail-rcpt $DEMO_USER --upload-file hello.eml
  curl --cacert '$TLS_DIR/ca.pem' --ssl-reqd 'smtp://$HOST:$SMTP_STARTTLS_PORT' --user '$CRED' \\
      --mail-from $DEMO_USER --mail-rcpt $DEMO_USER --upload-file hello.eml
  curl --cacert '$TLS_DIR/ca.pem' 'pop3s://$HOST:$POP3_TLS_PORT/' --user '$CRED'     (the list)
  curl --cacert '$TLS_DIR/ca.pem' 'pop3s://$HOST:$POP3_TLS_PORT/2' --user '$CRED'    (message 2)
Postfix's log: $PF/maillog (the gateway's logins show as sasl_method=XCLIENT).

The same settings, the TOTP secret and the otpauth URI are in $ENV_FILE (. ./demo.env).
EOF

if [ "$OAUTH" -eq 1 ]; then
  AS_ROOT=""
  [ -z "${SUDO_UID:-}" ] || AS_ROOT="sudo " # the config is in a root-only directory
  cat <<EOF

OAuth 2.0 (--oauth): imapgate also trusts the test identity provider at $IDP_URL
(issuer '$IDP_ISSUER_NAME': aud imap, scope imap, the user is the token's email; no TOTP code:
the IdP is the second factor). Its client '$IDP_CLIENT' gets tokens for $DEMO_USER, valid 10 minutes:

  TOKEN=\$(curl -s -u $IDP_CLIENT:$IDP_SECRET -d grant_type=client_credentials -d scope=imap \\
      -d resource=$IDP_RESOURCE $IDP_URL/token |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
  curl --insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user '$DEMO_USER:' \\
      --oauth2-bearer "\$TOKEN" --login-options AUTH=XOAUTH2
  (without --login-options curl picks OAUTHBEARER; both work)

Or the device flow (RFC 8628), as a person at a terminal would get one. The test IdP has no login
page, so approve the code it shows with its test hook, from another terminal:

  ${AS_ROOT}'$BIN' oauth token --issuer $IDP_ISSUER_NAME --client-id imapgate-cli -c '$CONFIG'
  curl -d user_code=XXXX-XXXX -d account=demo $IDP_URL/__device/approve

The identity provider's URL, client and secret are in $ENV_FILE too.
EOF
fi

if [ "$PORTAL" -eq 1 ]; then
  cat <<EOF

Self-service portal (--portal): $PORTAL_URL
Open it in a browser on this machine and sign in at the test identity provider
($IDP_URL) as

  $PORTAL_ACCOUNT  / pw-$PORTAL_ACCOUNT      $DEMO_USER: app passwords, authenticator (TOTP), devices, activity,
                       mail setup (the app password 'demo' and the TOTP above are already there)
  $PORTAL_ADMIN_ACCOUNT / pw-$PORTAL_ADMIN_ACCOUNT     the helpdesk (group mail-admins): Helpdesk finds $DEMO_USER and can
                       disable them, reset their TOTP, revoke app passwords, end sessions

Its certificate comes from the demo's throwaway CA, so the browser warns once: accept it, or
trust the CA, $TLS_DIR/ca.pem. An app password made in the portal logs in like the
one above, with a code from the same authenticator. The portal's URL is in $ENV_FILE too.
EOF
fi

cat <<EOF
Audit log: $GW/audit.log. The gateway's log follows. Ctrl-C stops everything.

EOF

tail -n +1 -f "$GW/gateway.log" &
TAIL_PID=$!
# wait returns when the gateway exits or when a signal (Ctrl-C) runs its trap.
GATEWAY_RC=0
wait "$GATEWAY_PID" || GATEWAY_RC=$?
GATEWAY_PID=""
fail "imapgate exited by itself (status $GATEWAY_RC)"
