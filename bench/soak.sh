#!/usr/bin/env bash
# imapgate's soak: a mixed load through the real gateway to a real Dovecot for MINUTES (default
# 10), with Dovecot killed (SIGKILL, all its processes) at 40% of the run and restarted 30 s
# later.
#
#   bench/soak.sh [--minutes N] [--out FILE]
#
# The load (bench/soak.rs): 6 clients FETCHing whole mailboxes and checking every message
# against the SHA-256 in its X-Soak-SHA256 header (one in five walks away mid-FETCH), 2 clients
# APPENDing new checked messages, 12 IDLE sessions held 5-30 s, 2 clients failing logins from
# 127.0.0.2, 2 clients vanishing before TLS, after the greeting or in the middle of a LOGIN.
# It passes when: no message ever arrives corrupted; every failed login is answered as one;
# nothing fails outside the outage (and 15 s after it); logins work again after the restart;
# the gateway is still running and never logged a panic; once the load stops, its descriptors
# and runtime tasks are back to the baseline taken after a warm-up, and its resident memory is
# within 16 MiB of it. The figures go to stdout and to FILE (default target/bench/soak.json).
#
# Needs root (Dovecot), cargo, python3; loopback only. SOAK_KEEP=1 keeps the work directory
# (logs, audit log, samples).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

MINUTES=10
OUT="$REPO/target/bench/soak.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
[ "$(id -u)" -eq 0 ] || die "run as root: Dovecot must start as root"
SECONDS_TOTAL=$((MINUTES * 60))
OUTAGE_START=$((SECONDS_TOTAL * 4 / 10))
OUTAGE_END=$((OUTAGE_START + 30))

step "packages"
ensure_packages dovecot-imapd:dovecot python3:python3 openssl:openssl curl:curl
disable_boot_service dovecot

step "building imapgate and the soak client (release)"
cargo build --release --locked --bin imapgate --example soak
BIN="$REPO/target/release/imapgate"
SOAK="$REPO/target/release/examples/soak"

WORK="$(mktemp -d /tmp/imapgate-soak.XXXXXX)"
chmod 755 "$WORK"
GW_PID=""
cleanup() {
  [ -z "$GW_PID" ] || stop_pid "$GW_PID" imapgate || true
  dovecot_sandbox_stop || true
  if [ "${SOAK_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

mapfile -t PORTS < <(free_ports 3)
DV=${PORTS[0]} GW=${PORTS[1]} ADMIN=${PORTS[2]}
USERS=()
for i in $(seq -w 1 16); do USERS+=("soak$i@soak.test"); done

step "Dovecot on :$DV with 16 mailboxes of 40 checked messages"
dovecot_sandbox_start "$WORK/dv" "$DV" none "${USERS[@]}"
python3 - "$WORK/dv/mail" "${USERS[@]}" <<'PY'
import hashlib, os, random, sys
root, users = sys.argv[1], sys.argv[2:]
rnd = random.Random(11)
for u in users:
    md = os.path.join(root, u, "Maildir")
    for f in os.listdir(os.path.join(md, "new")):
        os.remove(os.path.join(md, "new", f))  # the sandbox's welcome message has no checksum
    for i in range(40):
        size = rnd.randrange(1000, 200_000)
        lines, n = [], 0
        while n < size:
            line = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 .,") for _ in range(rnd.randrange(1, 78)))
            lines.append(line)
            n += len(line) + 2
        body = ("\r\n".join(lines) + "\r\n").encode()
        head = (f"From: soak <soak@soak.test>\r\nTo: {u}\r\nSubject: soak {i}\r\n"
                f"X-Soak-SHA256: {hashlib.sha256(body).hexdigest()}\r\n\r\n").encode()
        with open(os.path.join(md, "cur", f"{1700000000 + i}.M{i}P1.soak:2,S"), "wb") as f:
            f.write(head + body)
PY
chown -R nobody:nogroup "$WORK/dv/mail"

step "imapgate on :$GW (admin :$ADMIN)"
make_test_pki "$WORK/tls"
# The key ring: app-password create indexes each new app password under it.
(umask 077 && "$BIN" keys generate >"$WORK/k1.key")
cat >"$WORK/gw.yaml" <<EOF
listeners: [{ name: imaps, address: "127.0.0.1:$GW", tls: implicit }]
tls: { certificates: [{ cert_file: "$WORK/tls/server.pem", key_file: "$WORK/tls/server.key" }] }
auth:
  users_file: "$WORK/users.yaml"
  secret_keys: [{ id: k1, file: "$WORK/k1.key" }]
  mfa: { default: off }
backends:
  - name: dovecot
    address: "127.0.0.1:$DV"
    tls: none
    login: master_user
    master_user: gateway
    master_password_file: "$WORK/dv/master.secret"
    connect_timeout: 2s
    login_timeout: 5s
routes: { default: dovecot }
admin: { address: "127.0.0.1:$ADMIN" }
logging: { format: json, level: info, audit: "$WORK/audit.log" }
EOF
: >"$WORK/users.txt"
for u in "${USERS[@]}"; do
  "$BIN" users add "$u" -c "$WORK/gw.yaml" 2>>"$WORK/cli.log"
  pw="$("$BIN" app-password create "$u" -c "$WORK/gw.yaml" 2>>"$WORK/cli.log")"
  printf '%s %s\n' "$u" "$pw" >>"$WORK/users.txt"
done
"$BIN" check-config -c "$WORK/gw.yaml" >/dev/null
"$BIN" run -c "$WORK/gw.yaml" >"$WORK/gw.log" 2>&1 &
GW_PID=$!
wait_for_port 127.0.0.1 "$GW" 30 "$GW_PID" || die "imapgate did not start: $(cat "$WORK/gw.log")"

metric() { # NAME: the value of an unlabelled metric
  curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}
probe() { # -> "RSS_KIB FDS TASKS"
  local rss fds
  rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$GW_PID/status")"
  fds="$(find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)"
  printf '%s %s %s\n' "$rss" "$fds" "$(metric imapgate_runtime_tasks)"
}
settle() { # waits (at most 60 s) until no session is open
  local i open
  for i in $(seq 1 600); do
    open="$(curl -fsS "http://127.0.0.1:$ADMIN/metrics" |
      awk '$1 == "imapgate_sessions_preauth" || $1 == "imapgate_sessions_relayed" { s += $2 } END { print s + 0 }')"
    [ "$open" = 0 ] && { sleep 1; return 0; }
    sleep 0.1
  done
  die "sessions still open 60 s after the load stopped"
}

step "warm-up: 20 s of the same load"
"$SOAK" --addr "127.0.0.1:$GW" --ca "$WORK/tls/ca.pem" --users "$WORK/users.txt" --seconds 20 \
  >"$WORK/warmup.json" || die "the warm-up failed: $(cat "$WORK/warmup.json")"
settle
read -r RSS0 FDS0 TASKS0 < <(probe)
log "baseline: rss ${RSS0} KiB, ${FDS0} descriptors, ${TASKS0} tasks"

step "soak: ${MINUTES} min; Dovecot killed at ${OUTAGE_START}s, restarted at ${OUTAGE_END}s"
"$SOAK" --addr "127.0.0.1:$GW" --ca "$WORK/tls/ca.pem" --users "$WORK/users.txt" \
  --seconds "$SECONDS_TOTAL" --outage "$OUTAGE_START:$OUTAGE_END" >"$WORK/soak.json" \
  2>"$WORK/soak.err" &
SOAK_PID=$!
START=$(date +%s)
PEAK_RSS=0 PEAK_FDS=0
: >"$WORK/samples.txt"
killed=0 restarted=0
while kill -0 "$SOAK_PID" 2>/dev/null; do
  t=$(($(date +%s) - START))
  if [ "$killed" = 0 ] && [ "$t" -ge "$OUTAGE_START" ]; then
    log "t=${t}s: SIGKILL to Dovecot (pid $DOVECOT_PID) and all its processes"
    pkill -KILL -P "$DOVECOT_PID" || true
    kill -KILL "$DOVECOT_PID" || true
    killed=1
  fi
  if [ "$killed" = 1 ] && [ "$restarted" = 0 ] && [ "$t" -ge "$OUTAGE_END" ]; then
    log "t=${t}s: restarting Dovecot"
    "$(PATH="$PATH:/usr/sbin" command -v dovecot)" -c "$DOVECOT_CONF" -F >>"$WORK/dv/dovecot.stderr" 2>&1 &
    DOVECOT_PID=$!
    wait_for_port 127.0.0.1 "$DV" 30 "$DOVECOT_PID" || die "Dovecot did not restart"
    restarted=1
  fi
  kill -0 "$GW_PID" 2>/dev/null || die "imapgate exited during the soak: $(tail -n 20 "$WORK/gw.log")"
  read -r rss fds _ < <(probe)
  echo "$t $rss $fds" >>"$WORK/samples.txt"
  [ "$rss" -gt "$PEAK_RSS" ] && PEAK_RSS=$rss
  [ "$fds" -gt "$PEAK_FDS" ] && PEAK_FDS=$fds
  sleep 5
done
SOAK_OK=1
wait "$SOAK_PID" || SOAK_OK=0
cat "$WORK/soak.err" >&2
settle
read -r RSS1 FDS1 TASKS1 < <(probe)
log "after: rss ${RSS1} KiB, ${FDS1} descriptors, ${TASKS1} tasks (peak ${PEAK_RSS} KiB, ${PEAK_FDS} descriptors)"

PANICS="$(grep -c -i 'panicked' "$WORK/gw.log" || true)"
mkdir -p "$(dirname "$OUT")"
python3 - "$WORK/soak.json" "$OUT" "$MINUTES" "$RSS0" "$FDS0" "$TASKS0" "$RSS1" "$FDS1" "$TASKS1" \
  "$PEAK_RSS" "$PEAK_FDS" "$PANICS" "$SOAK_OK" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
minutes, rss0, fds0, tasks0, rss1, fds1, tasks1, peak_rss, peak_fds, panics, soak_ok = sys.argv[3:]
r = json.load(open(src))
r["gateway"] = {
    "baseline": {"rss_kib": int(rss0), "fds": int(fds0), "tasks": float(tasks0)},
    "after": {"rss_kib": int(rss1), "fds": int(fds1), "tasks": float(tasks1)},
    "peak": {"rss_kib": int(peak_rss), "fds": int(peak_fds)},
    "panics": int(panics),
}
checks = {
    "client": soak_ok == "1" and r.get("ok", False),
    "no_panic": int(panics) == 0,
    "fds_back": int(fds1) <= int(fds0) + 2,
    "tasks_back": float(tasks1) <= float(tasks0) + 2,
    "rss_back": int(rss1) <= int(rss0) + 16 * 1024,
}
r["checks"] = checks
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r, indent=2))
sys.exit(0 if all(checks.values()) else 1)
PY
log "soak passed; figures in $OUT"
