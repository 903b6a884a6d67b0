# shellcheck shell=bash
# The SMTP submission run of bench/run.sh (sourced by it, never run on its own; it uses run.sh's
# WORK, BIN, CA, run, log, die and the helpers of scripts/lib/common.sh).
#
# What it measures: messages/s of 50 KB mails, and CPU per message, submitted
#   - directly to Postfix over implicit TLS (RFC 8314) on a port of Postfix's own smtpd
#     (`smtpd_tls_wrappermode`), no AUTH: the client's loopback address is in mynetworks, the
#     way a trusted network submits without a password;
#   - through imapgate's SMTP front (implicit TLS, AUTH PLAIN with an app password, the
#     verified-credential cache warm as in the IMAP warm runs), which hands the session over to
#     the same Postfix with XCLIENT on another smtpd port, plain loopback (`tls: none`, as the
#     IMAP benchmark's upstream), then relays.
# Both through the same loadgen (`loadgen smtp`): each client opens a session, sends 10
# messages (MAIL, RCPT and DATA pipelined, the message, `.`), QUITs and reconnects, as a mail
# client does; the same message bytes and the same Postfix for both.
#
# Postfix: a non-system instance in $WORK/pf (its own config directory, queue and data
# directory, `postfix -c DIR start`, stopped at the end), as in tests/gateway/harness.rs. Every
# recipient @bench.test goes to the `discard` transport, so the figures are about submission:
# smtpd, cleanup writing the queue file (with fsync, on the work directory's disk), qmgr and a
# delivery that throws the message away. Postfix's log goes to its own postlogd (a file), which
# is part of its process tree and so of its CPU: logging is a cost every mail server pays (on a
# syslog host it would land in rsyslogd).
#
# CPU of processes that come and go: Postfix's master starts smtpd, cleanup, trivial-rewrite
# and the delivery agent on demand, and they exit after max_idle (100 s) or max_use (100
# connections) by default. loadgen samples, at the start and the end of each run, every process
# in the tree under Postfix's master, counting each one's own time (utime + stime) and that of
# its children it has reaped (cutime + cstime): a child that exits in between moves its time to
# its parent's reaped counters, so the tree's sum misses nothing. On top of that this Postfix
# keeps its daemons alive for the whole benchmark (max_use and max_idle high), so the breakdown
# by process (cpu_by_process in the JSON) names smtpd, cleanup, qmgr… rather than `exited`,
# and no run pays for the process starts of the previous one. Before each CPU sample loadgen
# waits for Postfix's queue to be empty, so a run's CPU is its own messages' delivery, whole.
# The gateway is one process; its CPU is its own. CPU per message counts only messages whose
# `250` after the `.` arrived.

# Set by smtp_start.
PF_DIR=""
PF_CONF=""
PF_PID=""
GWM_PID=""

# smtp_postfix_start TLS_PORT XCLIENT_PORT: starts the Postfix instance; sets PF_DIR, PF_CONF and
# PF_PID (the master).
smtp_postfix_start() {
  local tls_port="$1" xclient_port="$2" postfix
  postfix="$(PATH="$PATH:/usr/sbin" command -v postfix)" || die "no postfix (Debian's postfix package)"
  PF_DIR="$WORK/pf"
  PF_CONF="$PF_DIR/conf"
  mkdir -p "$PF_CONF" "$PF_DIR/queue" "$PF_DIR/data"
  chmod 755 "$PF_DIR" "$PF_CONF" "$PF_DIR/queue"
  # data_directory belongs to postfix; `postfix check` makes the queue's subdirectories.
  chown postfix "$PF_DIR/data"
  chmod 700 "$PF_DIR/data"
  cat >"$PF_CONF/main.cf" <<EOF
# Throwaway Postfix for imapgate's SMTP benchmark: loopback only, everything under $PF_DIR.
compatibility_level = 3.6
queue_directory = $PF_DIR/queue
data_directory = $PF_DIR/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bench.test
mydomain = bench.test
myorigin = bench.test
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Every address @bench.test is local, accepted and thrown away (discard): a sink that costs
# little, so the figures are about submission.
mydestination = bench.test
local_recipient_maps =
local_transport = discard:bench sink
alias_maps =
alias_database =
# No syslog: Postfix's own postlogd writes this file.
maillog_file = $PF_DIR/maillog
maillog_file_prefixes = $PF_DIR
# Loopback only: no DNS, no reverse lookups.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_tls_cert_file = $WORK/tls/server.pem
smtpd_tls_key_file = $WORK/tls/server.key
smtpd_tls_security_level = may
smtpd_error_sleep_time = 0
# No inflow pacing: by default smtpd waits up to 1 s before taking a message while the queue
# manager lags behind (in_flow_delay), and on two busy cores that froze random clients for a
# second (p99 1.0 s direct) and tied both targets' rates to qmgr's pace instead of the work per
# message.
in_flow_delay = 0
# Daemons live for the whole benchmark (see bench/smtp.sh on CPU accounting).
max_use = 1000000
max_idle = 7200s
EOF
  # Services as in Postfix's master.cf.proto, none chrooted, no port 25; smtpd on two loopback
  # ports: implicit TLS for direct clients, plain with XCLIENT for the gateway.
  cat >"$PF_CONF/master.cf" <<EOF
127.0.0.1:$tls_port inet n - n - - smtpd
  -o syslog_name=postfix/submissions
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
127.0.0.1:$xclient_port inet n - n - - smtpd
  -o syslog_name=postfix/gateway
  -o smtpd_tls_security_level=none
  -o smtpd_authorized_xclient_hosts=127.0.0.0/8
  -o smtpd_sasl_auth_enable=no
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
EOF
  "$postfix" -c "$PF_CONF" check >"$PF_DIR/check.log" 2>&1 || die "postfix check: $(cat "$PF_DIR/check.log")"
  "$postfix" -c "$PF_CONF" start >"$PF_DIR/start.log" 2>&1 || die "postfix start: $(cat "$PF_DIR/start.log")"
  local p
  for p in "$tls_port" "$xclient_port"; do
    wait_for_port 127.0.0.1 "$p" 30 || die "Postfix did not open $p: $(tail -20 "$PF_DIR/maillog" 2>/dev/null)"
  done
  PF_PID="$(tr -d ' \n' <"$PF_DIR/queue/pid/master.pid")"
  kill -0 "$PF_PID" 2>/dev/null || die "no Postfix master (pid file said '$PF_PID')"
}

# smtp_postfix_stop: stops the instance (master and its daemons), also one whose start failed
# half-way; harmless when none runs.
smtp_postfix_stop() {
  [ -n "$PF_CONF" ] || return 0
  local pid="$PF_PID"
  [ -n "$pid" ] || pid="$(tr -d ' \n' <"$PF_DIR/queue/pid/master.pid" 2>/dev/null || true)"
  "$(PATH="$PATH:/usr/sbin" command -v postfix)" -c "$PF_CONF" stop >/dev/null 2>&1 || true
  if [ -n "$pid" ]; then
    wait_pid_gone "$pid" 15 || kill -KILL "$pid" 2>/dev/null || true
  fi
  PF_PID="" PF_CONF=""
}

# smtp_gateway_config PORT ADMIN BACKEND_PORT: an imapgate with one SMTP listener (implicit TLS)
# and Postfix as its only backend, XCLIENT over plain loopback.
smtp_gateway_config() {
  cat <<EOF
listeners: [{ name: submissions, protocol: smtp, address: "127.0.0.1:$1", tls: implicit, hostname: gw.bench.test }]
tls: { certificates: [{ cert_file: "$WORK/tls/server.pem", key_file: "$WORK/tls/server.key" }] }
limits: { max_connections: 100000, max_preauth_per_ip: 100000, max_sessions_per_ip: 100000, max_sessions_per_user: 100000 }
auth:
  users_file: "$WORK/users.yaml"
  secret_keys: [{ id: k1, file: "$WORK/k1.key" }]
  mfa: { default: off }
  verified_cache_ttl: 5m
guard: { allow: [127.0.0.0/8] }   # one source address for every client: the benchmark, not an attack
backends:
  - name: postfix
    protocol: smtp
    address: "127.0.0.1:$3"
    tls: none
    login: xclient
    connect_timeout: 5s
    login_timeout: 10s
admin: { address: "127.0.0.1:$2" }
logging: { level: warn, audit: "$WORK/smtp-audit.log" }
EOF
}

# smtp_start TLS_PORT XCLIENT_PORT GATEWAY_PORT GATEWAY_ADMIN: Postfix, then the SMTP gateway
# (sets GWM_PID). The users and their app passwords ($WORK/gateway.txt) are made here when the
# IMAP part has not made them already (--smtp).
smtp_start() {
  local tls_port="$1" xclient_port="$2" port="$3" admin="$4"
  step "Postfix (implicit TLS :$tls_port for direct clients, XCLIENT :$xclient_port for the gateway)"
  smtp_postfix_start "$tls_port" "$xclient_port"
  log "postfix $(postconf -c "$PF_CONF" -h mail_version 2>/dev/null), master pid $PF_PID, queue $PF_DIR/queue"
  step "imapgate SMTP front (:$port, implicit TLS, XCLIENT to Postfix)"
  smtp_gateway_config "$port" "$admin" "$xclient_port" >"$WORK/gwm.yaml"
  [ -s "$WORK/k1.key" ] || (umask 077 && "$BIN" keys generate >"$WORK/k1.key")
  if [ ! -s "$WORK/gateway.txt" ]; then
    : >"$WORK/gateway.txt"
    local u pw
    while read -r u _; do
      "$BIN" users add "$u" -c "$WORK/gwm.yaml" 2>>"$WORK/cli.log"
      pw="$("$BIN" app-password create "$u" -c "$WORK/gwm.yaml" 2>>"$WORK/cli.log")"
      printf '%s %s\n' "$u" "${pw// /}" >>"$WORK/gateway.txt"
    done <"$WORK/direct.txt"
  fi
  "$BIN" run -c "$WORK/gwm.yaml" >"$WORK/gwm.log" 2>&1 &
  GWM_PID=$!
  PIDS+=("$GWM_PID")
  wait_for_port 127.0.0.1 "$port" 30 "$GWM_PID" || die "imapgate (SMTP) did not start: $(cat "$WORK/gwm.log")"
}

# smtp_run LABEL C SECONDS [ARGS…]: one run against one target at C clients.
smtp_run() {
  local label="$1" c="$2" secs="$3"
  shift 3
  case "$label" in
    postfix)
      run postfix "$SMTP_PF_TLS" "$WORK/direct.txt" "$PF_PID" smtp --auth none \
        --queue "$PF_DIR/queue" --concurrency "$c" --seconds "$secs" "$@"
      ;;
    imapgate-smtp)
      run imapgate-smtp "$GWM" "$WORK/gateway.txt" "$GWM_PID" smtp --auth plain \
        --backend-pid "$PF_PID" --queue "$PF_DIR/queue" --concurrency "$c" --seconds "$secs" "$@"
      ;;
    *) die "smtp_run: unknown target $label" ;;
  esac
}

# smtp_round R: 8 and 32 clients against both targets; which goes first alternates from round
# to round, so that neither always runs on a queue directory the other just filled.
smtp_round() {
  local r="$1" c first second
  if [ $((r % 2)) -eq 1 ]; then first=postfix second=imapgate-smtp; else first=imapgate-smtp second=postfix; fi
  for c in 8 32; do
    smtp_run "$first" "$c" "$SECONDS_PER_RUN"
    smtp_run "$second" "$c" "$SECONDS_PER_RUN"
  done
}

# smtp_check: the runs left nothing behind in Postfix's queue (a deferred message would mean
# the sink refused it) and the gateway logged no error.
smtp_check() {
  local left
  left="$(find "$PF_DIR/queue/deferred" "$PF_DIR/queue/active" "$PF_DIR/queue/incoming" -type f 2>/dev/null | wc -l)"
  [ "$left" -eq 0 ] || warn "Postfix still holds $left message(s): $(grep -E 'status=(deferred|bounced)' "$PF_DIR/maillog" | tail -3)"
  log "Postfix delivered $(grep -c 'status=sent' "$PF_DIR/maillog" || true) message(s) to the sink; $(grep -c 'warning\|fatal\|panic' "$PF_DIR/maillog" || true) warning/fatal line(s) in its log"
  grep 'warning\|fatal\|panic' "$PF_DIR/maillog" | tail -5 >&2 || true
}

# smtp_perf PREFIX: where the gateway's time goes per message (BENCH_PERF with --smtp), after a
# warm run (so no argon2 from a cold verified-credential cache, no process starts in Postfix);
# the profiled runs skip loadgen's warm-up so that the profiler's window holds only them:
#   PREFIX.smtp.stat    perf stat of the gateway, 8 clients: CPU, context switches, system calls,
#                       and the same per message (appended);
#   PREFIX.smtp.strace  every system call of the gateway, in order, for one session of 3
#                       messages: how many reads and writes a message costs each way;
#   PREFIX.smtp.txt     a perf profile, 8 clients (and .data; BENCH_PERF_CALLGRAPH=dwarf for
#                       user-space call graphs).
smtp_perf() {
  local prefix="$1" perf_pid strace_pid
  step "perf: imapgate SMTP submission -> $prefix.smtp.{stat,strace,txt}"
  smtp_run imapgate-smtp 8 3 >/dev/null
  head -1 "$WORK/gateway.txt" >"$WORK/gateway1.txt"
  perf stat -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter -p "$GWM_PID" \
    -o "$prefix.smtp.stat" -- sleep "$SECONDS_PER_RUN" &
  perf_pid=$!
  smtp_run imapgate-smtp 8 "$SECONDS_PER_RUN" --warm-up no | tee "$WORK/perf-run.json"
  wait "$perf_pid" || true
  python3 - "$prefix.smtp.stat" "$WORK/perf-run.json" <<'PY' >"$WORK/perf-per-message.txt"
import json, re, sys
n = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])["messages"]
print(f"\n# per message ({n} messages in the window)")
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.,]+)\s+(msec\s+)?(\S+)", line)
    if m and m.group(3) in ("task-clock", "context-switches", "cpu-migrations", "raw_syscalls:sys_enter"):
        v = float(m.group(1).replace(",", ""))
        print(f"{m.group(3)}: {v / n:.3f}{' ms' if m.group(2) else ''}")
PY
  cat "$WORK/perf-per-message.txt" >>"$prefix.smtp.stat"
  strace -f -tt -p "$GWM_PID" -o "$prefix.smtp.strace" 2>/dev/null &
  strace_pid=$!
  sleep 1
  run imapgate-smtp-strace "$GWM" "$WORK/gateway1.txt" "$GWM_PID" smtp --auth plain \
    --concurrency 1 --sessions-per-client 1 --per-session 3 --warm-up no
  sleep 0.5
  kill "$strace_pid" 2>/dev/null || true
  wait "$strace_pid" 2>/dev/null || true
  perf record -F 999 --call-graph "${BENCH_PERF_CALLGRAPH:-fp}" -p "$GWM_PID" -o "$prefix.smtp.data" -- sleep "$SECONDS_PER_RUN" 2>/dev/null &
  perf_pid=$!
  smtp_run imapgate-smtp 8 "$SECONDS_PER_RUN" --warm-up no
  wait "$perf_pid" || true
  perf_summary "$prefix.smtp.data" >"$prefix.smtp.txt"
}
