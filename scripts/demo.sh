#!/usr/bin/env bash
# imapgate demo: a real Dovecot behind imapgate, on loopback, in one command.
#
#   scripts/demo.sh          build, start Dovecot + imapgate, show a login, stay up until Ctrl-C
#   scripts/demo.sh --check  the same on free ports, non-interactively; exit 0 only if it all works
#
# Needs a Debian-like machine with cargo. Installs dovecot-imapd, openssl and curl if missing
# (with sudo when not root; no system service is started). Dovecot must run as root, so when
# you are not root the script builds as you and then re-runs itself under sudo.
#
# Ports (interactive mode): IMAPGATE_DEMO_TLS_PORT (1993, implicit TLS),
# IMAPGATE_DEMO_STARTTLS_PORT (1143), IMAPGATE_DEMO_ADMIN_PORT (9190), all on 127.0.0.1.
# The backend Dovecot gets a free port. --check picks free ports for everything.
# IMAPGATE_DEMO_BIN=path uses that imapgate binary instead of running `cargo build --locked`.
set -euo pipefail

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

MODE=interactive
case "${1:-}" in
  "") ;;
  --check) MODE=check ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    usage >&2
    exit 64
    ;;
esac

START_DIR="$PWD" # demo.env goes here
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"
cd "$REPO"

DEMO_USER=demo@example.org
HOST=127.0.0.1
CURL_MAX_TIME=30

# --- 1. system packages ----------------------------------------------------------------------
if [ -z "${IMAPGATE_DEMO_REEXEC:-}" ]; then
  step "checking system packages"
  ensure_packages dovecot-imapd:dovecot openssl:openssl curl:curl ca-certificates
  case " $ENSURE_PACKAGES_INSTALLED " in
    # We just installed Dovecot; if its service started anyway, it is ours to stop.
    *" dovecot-imapd "*) stop_system_dovecot ;;
  esac
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

# Dovecot needs root; re-run the rest under sudo with the binary we just built.
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "Dovecot must be started as root; run this as root or install sudo"
  step "re-running as root with sudo (Dovecot must start as root)"
  cd "$START_DIR"
  exec sudo env IMAPGATE_DEMO_REEXEC=1 IMAPGATE_DEMO_BIN="$BIN" \
    IMAPGATE_DEMO_TLS_PORT="${IMAPGATE_DEMO_TLS_PORT:-}" \
    IMAPGATE_DEMO_STARTTLS_PORT="${IMAPGATE_DEMO_STARTTLS_PORT:-}" \
    IMAPGATE_DEMO_ADMIN_PORT="${IMAPGATE_DEMO_ADMIN_PORT:-}" \
    PATH="$PATH:/usr/sbin:/sbin" bash "$REPO/scripts/demo.sh" "$@"
fi

# --- 3. ports and scratch space --------------------------------------------------------------
if [ "$MODE" = check ]; then
  mapfile -t PORTS < <(free_ports 4)
  [ "${#PORTS[@]}" -eq 4 ] || die "could not pick free ports"
  TLS_PORT="${PORTS[0]}" STARTTLS_PORT="${PORTS[1]}" ADMIN_PORT="${PORTS[2]}" BACKEND_PORT="${PORTS[3]}"
else
  TLS_PORT="${IMAPGATE_DEMO_TLS_PORT:-1993}"
  STARTTLS_PORT="${IMAPGATE_DEMO_STARTTLS_PORT:-1143}"
  ADMIN_PORT="${IMAPGATE_DEMO_ADMIN_PORT:-9190}"
  for spec in "TLS_PORT:$TLS_PORT" "STARTTLS_PORT:$STARTTLS_PORT" "ADMIN_PORT:$ADMIN_PORT"; do
    port="${spec#*:}"
    case "$port" in '' | *[!0-9]*) die "IMAPGATE_DEMO_${spec%%:*} must be a port number, not '$port'" ;; esac
    if port_open "$HOST" "$port"; then
      die "$HOST:$port is already in use; set IMAPGATE_DEMO_${spec%%:*} to another port"
    fi
  done
  read -r BACKEND_PORT < <(free_ports 1)
fi

WORK=""
GATEWAY_PID=""
TAIL_PID=""
SUCCESS=0

# shellcheck disable=SC2317 # called from the EXIT trap
dump_logs() {
  local f
  for f in "$WORK/gateway/cli.log" "$WORK/gateway/gateway.log" "$WORK/gateway/audit.log" \
    "$WORK/dovecot/dovecot.stderr" "$WORK/dovecot/dovecot.log"; do
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
  if [ -n "$TAIL_PID" ]; then
    sleep 0.3 # let tail print the gateway's last lines
    stop_pid "$TAIL_PID" tail
  fi
  if [ -n "$DOVECOT_PID" ]; then
    log "stopping Dovecot (pid $DOVECOT_PID)"
    dovecot_sandbox_stop
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
GW="$WORK/gateway"
mkdir -p "$DV" "$GW"
chmod 700 "$GW"

# --- 4. the backend --------------------------------------------------------------------------
step "starting a throwaway Dovecot on $HOST:$BACKEND_PORT (implicit TLS, master user, demo mailbox)"
dovecot_sandbox_start "$DV" "$BACKEND_PORT" implicit "$DEMO_USER"

# --- 5. the gateway --------------------------------------------------------------------------
CONFIG="$GW/imapgate.yaml"
cat >"$CONFIG" <<EOF
# imapgate demo configuration, written by scripts/demo.sh (throwaway).
listeners:
  - { name: imaps, address: "$HOST:$TLS_PORT", tls: implicit }
  - { name: imap, address: "$HOST:$STARTTLS_PORT", tls: starttls }
tls:
  self_signed: true
auth:
  users_file: "$GW/users.yaml"
backends:
  - name: dovecot
    address: "127.0.0.1:$BACKEND_PORT"
    tls: implicit
    ca_file: "$DV/tls/ca.pem"
    server_name: localhost
    login: master_user
    master_user: $DOVECOT_MASTER_USER
    master_password_file: "$DV/master.secret"
routes:
  default: dovecot
admin:
  address: "$HOST:$ADMIN_PORT"
logging:
  format: text
  level: info
  audit: "$GW/audit.log"
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

step "starting imapgate (imaps $HOST:$TLS_PORT, starttls $HOST:$STARTTLS_PORT, admin $HOST:$ADMIN_PORT)"
"$BIN" run -c "$CONFIG" >"$GW/gateway.log" 2>&1 &
GATEWAY_PID=$!
for port in "$TLS_PORT" "$STARTTLS_PORT" "$ADMIN_PORT"; do
  wait_for_port "$HOST" "$port" 60 "$GATEWAY_PID" ||
    fail "imapgate is not listening on $HOST:$port after 60 s (or it exited)"
done

# --- 6. show it working ----------------------------------------------------------------------
# curl sends the password as typed; the gateway ignores the spaces.
CURL=(curl --silent --show-error --max-time "$CURL_MAX_TIME")
CRED="$DEMO_USER:$APP_PASSWORD"

step "curl: list mailboxes through imapgate (imaps://$HOST:$TLS_PORT/)"
log "\$ curl --insecure imaps://$HOST:$TLS_PORT/ --user '$CRED'"
OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$CRED" 2>&1)" ||
  fail "login over implicit TLS failed: $OUT"
printf '%s\n' "$OUT"
grep -q 'INBOX' <<<"$OUT" || fail "mailbox list has no INBOX"

step "curl: fetch message 1 of INBOX through imapgate"
log "\$ curl --insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user '$CRED'"
OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/INBOX;UID=1" --user "$CRED" 2>&1)" ||
  fail "fetching message 1 failed: $OUT"
printf '%s\n' "$OUT"
grep -q '^Subject: Welcome to imapgate' <<<"$OUT" || fail "message 1 is not the demo message"

if [ "$MODE" = check ]; then
  step "check: login over STARTTLS (imap://$HOST:$STARTTLS_PORT/ --ssl-reqd)"
  OUT="$("${CURL[@]}" --insecure --ssl-reqd "imap://$HOST:$STARTTLS_PORT/" --user "$CRED" 2>&1)" ||
    fail "login over STARTTLS failed: $OUT"
  grep -q 'INBOX' <<<"$OUT" || fail "mailbox list over STARTTLS has no INBOX: $OUT"
  log "ok: $(tr -d '\r' <<<"$OUT" | head -n 1)"

  step "check: the app password without spaces works too"
  OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:${APP_PASSWORD// /}" 2>&1)" ||
    fail "login with the app password without spaces failed: $OUT"
  log "ok"

  step "check: a wrong app password is refused"
  if OUT="$("${CURL[@]}" --insecure "imaps://$HOST:$TLS_PORT/" --user "$DEMO_USER:aaaabbbbccccdddd" 2>&1)"; then
    fail "a wrong app password logged in: $OUT"
  fi
  log "ok: refused ($OUT)"

  step "check: no login in cleartext on the STARTTLS port"
  if OUT="$("${CURL[@]}" "imap://$HOST:$STARTTLS_PORT/" --user "$CRED" 2>&1)"; then
    fail "a login without TLS succeeded on the STARTTLS port: $OUT"
  fi
  log "ok: refused ($OUT)"

  step "check: admin http://$HOST:$ADMIN_PORT/healthz"
  OUT="$("${CURL[@]}" --fail "http://$HOST:$ADMIN_PORT/healthz" 2>&1)" || fail "/healthz did not answer 2xx: $OUT"
  log "ok: $OUT"
  log "(readyz: HTTP $("${CURL[@]}" --output /dev/null --write-out '%{http_code}' "http://$HOST:$ADMIN_PORT/readyz" 2>/dev/null || true))"

  kill -0 "$GATEWAY_PID" 2>/dev/null || fail "imapgate exited during the checks"
  SUCCESS=1
  printf '\nPASS: demo check (imapgate in front of Dovecot: implicit TLS, STARTTLS, admin /healthz)\n'
  exit 0
fi

# --- 7. interactive: print how to connect and stay up ----------------------------------------
ENV_FILE="$START_DIR/demo.env"
cat >"$ENV_FILE" <<EOF
# Written by scripts/demo.sh; valid while that demo runs. Use: . ./demo.env
IMAPGATE_DEMO_HOST=$HOST
IMAPGATE_DEMO_TLS_PORT=$TLS_PORT
IMAPGATE_DEMO_STARTTLS_PORT=$STARTTLS_PORT
IMAPGATE_DEMO_ADMIN_PORT=$ADMIN_PORT
IMAPGATE_DEMO_USER=$DEMO_USER
IMAPGATE_DEMO_PASSWORD='$APP_PASSWORD'
EOF
if [ -n "${SUDO_UID:-}" ] && [ -n "${SUDO_GID:-}" ]; then
  chown "$SUDO_UID:$SUDO_GID" "$ENV_FILE" 2>/dev/null || true
fi

cat <<EOF

imapgate demo is running. Point any IMAP client at it:

  host         $HOST
  IMAPS        port $TLS_PORT   (TLS from the first byte; self-signed certificate: accept it)
  IMAP         port $STARTTLS_PORT   (STARTTLS required before login)
  user         $DEMO_USER
  password     $APP_PASSWORD   (an app password; the spaces are optional)
  admin        http://$HOST:$ADMIN_PORT/metrics  /healthz  /readyz
  backend      Dovecot on $HOST:$BACKEND_PORT (verified TLS, master user '$DOVECOT_MASTER_USER')

Try:
  curl --insecure 'imaps://$HOST:$TLS_PORT/INBOX;UID=1' --user '$CRED'
  curl --insecure --ssl-reqd 'imap://$HOST:$STARTTLS_PORT/' --user '$CRED'
  openssl s_client -quiet -crlf -connect $HOST:$TLS_PORT

The same settings are in $ENV_FILE (. ./demo.env).
Audit log: $GW/audit.log. The gateway's log follows. Ctrl-C stops everything.

EOF

tail -n +1 -f "$GW/gateway.log" &
TAIL_PID=$!
# wait returns when the gateway exits or when a signal (Ctrl-C) runs its trap.
GATEWAY_RC=0
wait "$GATEWAY_PID" || GATEWAY_RC=$?
GATEWAY_PID=""
fail "imapgate exited by itself (status $GATEWAY_RC)"
