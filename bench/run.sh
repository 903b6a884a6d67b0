#!/usr/bin/env bash
# imapgate's benchmark: direct Dovecot over TLS, the nginx mail proxy and imapgate, on one
# machine, in one run, on the same work, interleaved so that machine drift hits all alike.
#
#   bench/run.sh [--quick] [--sessions N] [--rounds R] [--seconds S] [--out FILE]
#   bench/run.sh --compare OTHER_BINARY [--rounds R] [--seconds S]
#   bench/run.sh --stores [--quick] [--rounds R] [--seconds S] [--out FILE]
#   bench/run.sh --smtp [--quick] [--rounds R] [--seconds S] [--out FILE]
#
# What runs (all on 127.0.0.1, ports chosen at run time):
#   - Dovecot (Debian's), with a generated mailbox (2000 messages of 50 KB; --quick: 200), a
#     plain listener for the proxies and an implicit-TLS one for direct clients, tuned for many
#     sessions (process and client limits, mail_max_userip_connections);
#   - nginx's mail proxy (Debian's nginx-light + libnginx-mod-mail), with an auth_http served by
#     the same nginx that logs in upstream as Dovecot's master user, plain to Dovecot;
#   - imapgate, plain to Dovecot like nginx (`tls: none`), app passwords checked (warm: the
#     verified-credential cache; a second instance with the cache off measures cold argon2
#     logins), and a third with a TLS upstream, reported beside;
#   - the same warm and cold imapgate with the same users in the other credential stores
#     (auth.store.backend sqlite and postgres, each filled with `imapgate users import` from
#     the file store's users file): a SQLite file, and a throwaway PostgreSQL cluster (Debian's,
#     initdb + postgres as nobody in the work directory, a free loopback port, a random password,
#     removed at the end);
#   - the test identity provider (tests/idp, npm oidc-provider) issuing RS256 JWTs, for OAuth
#     logins (AUTHENTICATE XOAUTH2) through the warm imapgate;
#   - SMTP submission (bench/smtp.sh): a throwaway Postfix (Debian's; own config, queue and
#     data directories in the work directory, delivering to `discard`) and an imapgate whose
#     SMTP front (implicit TLS, AUTH PLAIN with app passwords) hands sessions to it with
#     XCLIENT; 50 KB messages, 10 per session, at 8 and 32 clients, directly to Postfix over
#     implicit TLS and through the gateway, in every round.
# Figures: logins/s (password, and for imapgate also OAuth) at 8 and 64 clients with p50/p99 and the proxy's CPU per login; bulk FETCH
# MB/s and CPU per MB; NOOP round-trip p50/p99; N idle sessions (IDLE) with the proxy's memory
# per session and CPU while idle. When the hard open-files limit keeps one imapgate process
# from holding N sessions (two descriptors each), the idle run spreads them over replicas of
# the warm gateway and adds up their figures (nginx, with two workers, is two processes too). A table with ratios to Dovecot and to nginx goes to stdout,
# every raw result to the JSON file (default target/bench/results.json). The credential-store
# targets are compared with the file store's (logins only): their ratios, and whether warm
# logins/s stay within 10 %. --stores measures only those logins (file, sqlite, postgres; warm
# and cold), round after round in a rotating order, for medians that the host's drift moves less.
# SMTP: messages/s and CPU per message (the gateway's, and Postfix's own: all its processes),
# in a table of their own with the ratios issue 21 targets. --smtp runs only that part (no
# Dovecot, nginx, PostgreSQL or identity provider).
#
# BENCH_PERF=PREFIX profiles warm logins and a FETCH instead (docs/benchmarks.md);
# BENCH_PERF_TARGET=imapgate-sqlite|imapgate-postgres profiles that store's logins; with --smtp,
# BENCH_PERF profiles the gateway's SMTP submission instead.
#
# Needs root (Dovecot, Postfix), cargo, python3, Debian's postgresql and postfix; installs missing
# Debian packages behind policy-rc.d.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

QUICK=0
LOADAVG_AT_START="$(cut -d" " -f1-3 /proc/loadavg)"
SESSIONS=2000
SESSIONS_GIVEN=0
ROUNDS=3
ROUNDS_GIVEN=0
SECONDS_PER_RUN=10
SECONDS_GIVEN=0
OUT="$REPO/target/bench/results.json"
COMPARE=""
STORES=0
SMTP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --sessions) SESSIONS="$2"; SESSIONS_GIVEN=1; shift ;;
    --rounds) ROUNDS="$2"; ROUNDS_GIVEN=1; shift ;;
    --seconds) SECONDS_PER_RUN="$2"; SECONDS_GIVEN=1; shift ;;
    --out) OUT="$2"; shift ;;
    --compare) COMPARE="$(realpath "$2")"; shift ;;
    --stores) STORES=1 ;;
    --smtp) SMTP=1 ;;
    -h | --help) sed -n '2,49p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
MESSAGES=2000
if [ "$QUICK" -eq 1 ]; then
  MESSAGES=200
  [ "$ROUNDS_GIVEN" -eq 1 ] || ROUNDS=1
  [ "$SECONDS_GIVEN" -eq 1 ] || SECONDS_PER_RUN=3
  [ "$SESSIONS_GIVEN" -eq 1 ] || SESSIONS=200
fi
[ "$(id -u)" -eq 0 ] || die "run as root: Dovecot and Postfix must start as root"
# shellcheck source=bench/smtp.sh
. "$REPO/bench/smtp.sh"

step "packages"
# Postfix without a system configuration: nothing in /etc/postfix, nothing started.
debconf_preseed 'postfix postfix/main_mailer_type select No configuration'
if [ "$SMTP" -eq 1 ]; then
  ensure_packages postfix:postfix python3:python3 openssl:openssl
else
  ensure_packages dovecot-imapd:dovecot nginx-light:nginx libnginx-mod-mail python3:python3 openssl:openssl \
    nodejs:node npm:npm curl:curl 'postgresql:/usr/lib/postgresql/*/bin/postgres' postfix:postfix
  if [ ! -d tests/idp/node_modules/oidc-provider ] || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
    (cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
for s in nginx dovecot postgresql postfix; do disable_boot_service "$s"; done

step "building imapgate and the load generator (release)"
cargo build --release --locked --bin imapgate --example loadgen
BIN="$REPO/target/release/imapgate"
LOADGEN="$REPO/target/release/examples/loadgen"

# Enough descriptors for thousands of sessions, in this shell and its children.
ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null || log "open files limit: $(ulimit -n)"

WORK="$(mktemp -d /tmp/imapgate-bench.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
PG_PID=""
cleanup() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p" bench || true; done
  smtp_postfix_stop || true
  idp_stop || true
  if [ -n "$PG_PID" ]; then
    # Fast shutdown (SIGINT): rolls back open transactions and closes clients at once.
    kill -INT "$PG_PID" 2>/dev/null || true
    wait_pid_gone "$PG_PID" 10 || kill -KILL "$PG_PID" 2>/dev/null || true
    wait "$PG_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t PORTS < <(free_ports 29)
DV_PLAIN=${PORTS[0]} DV_TLS=${PORTS[1]} NGX=${PORTS[2]} NGX_HTTP=${PORTS[3]}
GW=${PORTS[4]} GW_ADMIN=${PORTS[5]} GWC=${PORTS[6]} GWC_ADMIN=${PORTS[7]} GWT=${PORTS[8]}
GWT_ADMIN=${PORTS[9]} GWB=${PORTS[10]} GWB_ADMIN=${PORTS[11]}
# (12-15: replicas for the idle run, below.) The credential-store targets and PostgreSQL:
GWS=${PORTS[16]} GWS_ADMIN=${PORTS[17]} GWSC=${PORTS[18]} GWSC_ADMIN=${PORTS[19]}
GWP=${PORTS[20]} GWP_ADMIN=${PORTS[21]} GWPC=${PORTS[22]} GWPC_ADMIN=${PORTS[23]} PG_PORT=${PORTS[24]}
# SMTP: Postfix's implicit-TLS port (direct clients) and XCLIENT port (the gateway), the gateway.
SMTP_PF_TLS=${PORTS[25]} SMTP_PF_X=${PORTS[26]} GWM=${PORTS[27]} GWM_ADMIN=${PORTS[28]}
# Replicas of the warm gateway for the idle run, when one process may not hold --sessions:
# a relayed session holds two descriptors (client and Dovecot), and where the hard open-files
# limit is below twice the sessions (this sandbox: 20000, and no CAP_SYS_RESOURCE to raise
# it) the sessions are spread over replicas, as a deployment would, and their figures added.
FD_HARD="$(ulimit -Hn)"
GW_REPLICAS=1
if [ "$FD_HARD" != unlimited ]; then
  GW_REPLICAS=$(((2 * SESSIONS + 200 + FD_HARD - 1) / FD_HARD))
fi
[ "$GW_REPLICAS" -le 3 ] || die "--sessions $SESSIONS needs $GW_REPLICAS gateway processes under an open-files limit of $FD_HARD (at most 3 here)"

step "PKI and users"
make_test_pki "$WORK/tls"
CA="$WORK/tls/ca.pem"
NUSERS=64
MASTER_PW="$(random_secret)"
printf '%s' "$MASTER_PW" >"$WORK/master.secret"
chmod 600 "$WORK/master.secret"
: >"$WORK/dovecot-users"
: >"$WORK/direct.txt"
for i in $(seq -w 1 "$NUSERS"); do
  u="user$i@bench.test"
  pw="pw-$(random_secret)"
  printf '%s:{PLAIN}%s\n' "$u" "$pw" >>"$WORK/dovecot-users"
  printf '%s %s\n' "$u" "$pw" >>"$WORK/direct.txt"
done
# The identity provider's client `demo` gets tokens whose email is demo@example.org: that user
# has a mailbox too (the OAuth logins), but is not in direct.txt.
printf 'demo@example.org:{PLAIN}%s\n' "$(random_secret)" >>"$WORK/dovecot-users"
printf 'gateway:{PLAIN}%s\n' "$MASTER_PW" >"$WORK/dovecot-masters"
if [ "$SMTP" -eq 0 ]; then
  chown root:dovecot "$WORK/dovecot-users" "$WORK/dovecot-masters"
  chmod 640 "$WORK/dovecot-users" "$WORK/dovecot-masters"
fi

mkdir -p "$(dirname "$OUT")"
RAW="$WORK/raw.jsonl"
: >"$RAW"
run() { # LABEL PORT[,PORT…] USERS PID[,PID…] MODE ARGS...
  local label="$1" port="$2" users="$3" pid="$4" mode="$5"
  shift 5
  "$LOADGEN" "$mode" --label "$label" --addr "127.0.0.1:${port//,/,127.0.0.1:}" \
    --ca "$CA" --users "$users" --pid "$pid" "$@" | tee -a "$RAW"
}

# perf_summary DATA: where the time went, by shared object, then the top symbols.
perf_summary() {
  perf report -i "$1" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' || true
  echo
  perf report -i "$1" --no-children --sort sym -g none --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -n '1,60p' || true
  echo
  echo "# inclusive (with callees)"
  perf report -i "$1" --children --sort sym -g none --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -n '1,80p' || true
}


# machine_meta: the key=value pairs that describe the machine, for report.py.
machine_meta() {
  printf '%s\n' "cpus=$(nproc)" "model=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
    "mem_gib=$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" \
    "postfix=$(postconf -d -h mail_version 2>/dev/null)" "loadavg_at_start=$LOADAVG_AT_START" "loadavg_at_end=$(cut -d' ' -f1-3 /proc/loadavg)"
}

if [ "$SMTP" -eq 1 ]; then
  # SMTP submission only: Postfix and the gateway's SMTP front, nothing of the IMAP part.
  smtp_start "$SMTP_PF_TLS" "$SMTP_PF_X" "$GWM" "$GWM_ADMIN"
  log "pids: postfix master $PF_PID, imapgate (SMTP) $GWM_PID"
  if [ -n "${BENCH_PERF:-}" ]; then
    smtp_perf "$BENCH_PERF"
    exit 0
  fi
  step "SMTP submission: $ROUNDS round(s) of ${SECONDS_PER_RUN}s, 8 and 32 clients, targets interleaved"
  for r in $(seq 1 "$ROUNDS"); do
    log "round $r"
    smtp_round "$r"
  done
  smtp_check
  step "results"
  mapfile -t META < <(machine_meta)
  python3 "$REPO/bench/report.py" "$RAW" "$OUT" "${META[@]}" \
    "mode=smtp" "quick=$QUICK" "rounds=$ROUNDS" "seconds_per_run=$SECONDS_PER_RUN"
  exit 0
fi

step "mailbox: $MESSAGES messages of 50 KB for user01@bench.test"
python3 - "$WORK/mail" "$MESSAGES" "$NUSERS" <<'PY'
import os, random, sys
root, n, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(7)
for name in [f"user{u:02d}@bench.test" for u in range(1, users + 1)] + ["demo@example.org"]:
    md = os.path.join(root, name, "Maildir")
    for d in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(md, d), exist_ok=True)
md = os.path.join(root, "user01@bench.test", "Maildir", "cur")
line = lambda: "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(76))
body_lines = [line() for _ in range(700)]
for i in range(n):
    body = "\r\n".join(body_lines[(i + k) % 700] for k in range(640))
    msg = (f"From: bench <bench@bench.test>\r\nTo: user01@bench.test\r\n"
           f"Subject: message {i}\r\nMessage-ID: <{i}@bench.test>\r\n\r\n{body}\r\n")
    with open(os.path.join(md, f"{1700000000 + i}.M{i}P1.bench:2,S"), "w") as f:
        f.write(msg)
PY
chown -R nobody:nogroup "$WORK/mail"

step "Dovecot (plain :$DV_PLAIN for the proxies, TLS :$DV_TLS direct)"
mkdir -p "$WORK/dv/run" "$WORK/dv/state"
chmod 755 "$WORK/dv" "$WORK/dv/run" "$WORK/dv/state"
cat >"$WORK/dovecot.conf" <<EOF
base_dir = $WORK/dv/run
state_dir = $WORK/dv/state
instance_name = imapgate-bench
log_path = $WORK/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <$WORK/tls/server.pem
ssl_key = <$WORK/tls/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
login_trusted_networks = 127.0.0.1
mail_uid = nobody
mail_gid = nogroup
mail_location = maildir:~/Maildir
auth_failure_delay = 0
default_process_limit = 20000
default_client_limit = 100000
default_vsz_limit = 1G
passdb {
  driver = passwd-file
  args = $WORK/dovecot-masters
  master = yes
  result_success = continue
}
passdb {
  driver = passwd-file
  args = $WORK/dovecot-users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$WORK/mail/%u
}
protocol imap {
  mail_max_userip_connections = 100000
}
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
# High-performance login: login processes serve many connections.
service imap-login {
  service_count = 0
  process_min_avail = 2
  inet_listener imap {
    port = $DV_PLAIN
  }
  inet_listener imaps {
    port = $DV_TLS
    ssl = yes
  }
}
service imap {
  process_limit = 20000
}
EOF
"$(PATH="$PATH:/usr/sbin" command -v dovecot)" -c "$WORK/dovecot.conf" -F >"$WORK/dovecot.stderr" 2>&1 &
DV_PID=$!
PIDS+=("$DV_PID")
wait_for_port 127.0.0.1 "$DV_TLS" 30 "$DV_PID" || die "Dovecot did not start: $(cat "$WORK/dovecot.stderr")"

step "nginx mail proxy (:$NGX, auth_http :$NGX_HTTP)"
mkdir -p "$WORK/nginx"
MAIL_MODULE=/usr/lib/nginx/modules/ngx_mail_module.so
[ -r "$MAIL_MODULE" ] || die "no $MAIL_MODULE (libnginx-mod-mail)"
cat >"$WORK/nginx.conf" <<EOF
load_module $MAIL_MODULE;
daemon off;
user nobody nogroup;
worker_processes 2;
worker_rlimit_nofile 200000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 100000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx;
  scgi_temp_path $WORK/nginx;
  server {
    listen 127.0.0.1:$NGX_HTTP;
    # The minimal auth_http: every login goes upstream as the master user.
    location = /auth {
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port $DV_PLAIN;
      add_header Auth-User "\$http_auth_user*gateway";
      add_header Auth-Pass "$MASTER_PW";
      return 204;
    }
  }
}
mail {
  server_name localhost;
  auth_http 127.0.0.1:$NGX_HTTP/auth;
  proxy on;
  imap_capabilities "IMAP4rev1" "IDLE" "LITERAL+";
  server {
    listen 127.0.0.1:$NGX ssl;
    protocol imap;
    ssl_certificate $WORK/tls/server.pem;
    ssl_certificate_key $WORK/tls/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
  }
}
EOF
chmod 755 "$WORK/nginx"
nginx -c "$WORK/nginx.conf" >"$WORK/nginx.stderr" 2>&1 &
NGX_PID=$!
PIDS+=("$NGX_PID")
wait_for_port 127.0.0.1 "$NGX" 30 "$NGX_PID" || die "nginx did not start: $(cat "$WORK/nginx.stderr")"

step "PostgreSQL (:$PG_PORT, a throwaway cluster in $WORK/pg)"
# Debian keeps the server per major version, off PATH; the newest installed one.
PG_BIN="$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -1)"
[ -n "$PG_BIN" ] || die "no /usr/lib/postgresql/*/bin/postgres (Debian's postgresql)"
PG_BIN="$(dirname "$PG_BIN")"
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; }
mkdir -p "$WORK/pg"
chown nobody:nogroup "$WORK/pg"
chmod 700 "$WORK/pg"
PG_SUPER_PW="$(random_secret)" PG_PW="$(random_secret)"
(umask 077 && printf '%s\n' "$PG_SUPER_PW" >"$WORK/pg/superuser.pw")
chown nobody:nogroup "$WORK/pg/superuser.pw"
# Password logins only (SCRAM), also on loopback: other local users get nowhere.
as_nobody "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres --auth=scram-sha-256 \
  --pwfile="$WORK/pg/superuser.pw" -E UTF8 --no-sync >"$WORK/pg/initdb.log" 2>&1 ||
  die "initdb failed: $(cat "$WORK/pg/initdb.log")"
as_nobody "$PG_BIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -k "$WORK/pg" \
  -c listen_addresses=127.0.0.1 >"$WORK/pg/postgres.log" 2>&1 &
PG_PID=$!
deadline=$((SECONDS + 30))
until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do
  kill -0 "$PG_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ] ||
    die "PostgreSQL did not start: $(cat "$WORK/pg/postgres.log")"
  sleep 0.2
done
# The gateway's own role owns its database (not the superuser).
PGPASSWORD="$PG_SUPER_PW" "$PG_BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
  -v ON_ERROR_STOP=1 -c "CREATE ROLE imapgate LOGIN PASSWORD '$PG_PW'" -c "CREATE DATABASE imapgate OWNER imapgate" ||
  die "could not create the imapgate role and database"
# The URL holds the password: a 0600 file, never an argument.
(umask 077 && printf 'postgres://imapgate:%s@127.0.0.1:%s/imapgate' "$PG_PW" "$PG_PORT" >"$WORK/pg.url")

step "identity provider (tests/idp)"
idp_start "$WORK/idp" || die "the identity provider did not start: $(cat "$WORK/idp/idp.log")"
log "issuer $IDP_URL"

step "imapgate: warm (:$GW), cold (:$GWC, no verified-credential cache), TLS upstream (:$GWT); sqlite (:$GWS, cold :$GWSC), postgres (:$GWP, cold :$GWPC)"
# The credential store of one gateway: the users file (default), a SQLite file of its own, or
# the PostgreSQL database (shared by the warm and the cold gateway, as replicas would share it).
store_config() { # NAME STORE
  case "$2" in
    file) printf '  users_file: "%s"' "$WORK/users.yaml" ;;
    sqlite) printf '  store: { backend: sqlite, sqlite: { path: "%s" } }' "$WORK/$1.db" ;;
    postgres) printf '  store: { backend: postgres, postgres: { url_file: "%s" } }' "$WORK/pg.url" ;;
    *) die "store_config: unknown store $2" ;;
  esac
}
gw_config() { # NAME PORT ADMIN CACHE BACKEND_TLS BACKEND_PORT [STORE: file | sqlite | postgres]
  cat <<EOF
listeners: [{ name: imaps, address: "127.0.0.1:$2", tls: implicit }]
tls: { certificates: [{ cert_file: "$WORK/tls/server.pem", key_file: "$WORK/tls/server.key" }] }
limits: { max_connections: 100000, max_preauth_per_ip: 100000, max_sessions_per_ip: 100000, max_sessions_per_user: 100000 }
auth:
$(store_config "$1" "${7:-file}")
  secret_keys: [{ id: k1, file: "$WORK/k1.key" }]
  mfa: { default: off }
  verified_cache_ttl: $4
$(if [ "$1" = warm ]; then printf '  oauth: { issuers: [{ name: idp, issuer: "%s", audiences: [imap], required_scopes: [imap] }] }' "$IDP_URL"; fi)
guard: { allow: [127.0.0.0/8] }   # one source address for every client: the benchmark, not an attack
backends:
  - name: dovecot
    address: "127.0.0.1:$6"
    tls: $5
$(if [ "$5" != none ]; then printf '    ca_file: "%s"\n    server_name: localhost' "$CA"; fi)
    login: master_user
    master_user: gateway
    master_password_file: "$WORK/master.secret"
    connect_timeout: 5s
    login_timeout: 10s
routes: { default: dovecot }
admin: { address: "127.0.0.1:$3" }
logging: { level: warn, audit: "$WORK/$1-audit.log" }
EOF
}
# The key ring: app-password create indexes each new app password under it.
(umask 077 && "$BIN" keys generate >"$WORK/k1.key")
gw_config warm "$GW" "$GW_ADMIN" 5m none "$DV_PLAIN" >"$WORK/gw.yaml"
gw_config cold "$GWC" "$GWC_ADMIN" 0s none "$DV_PLAIN" >"$WORK/gwc.yaml"
gw_config tlsup "$GWT" "$GWT_ADMIN" 5m implicit "$DV_TLS" >"$WORK/gwt.yaml"
gw_config sqlite "$GWS" "$GWS_ADMIN" 5m none "$DV_PLAIN" sqlite >"$WORK/gws.yaml"
gw_config sqlite-cold "$GWSC" "$GWSC_ADMIN" 0s none "$DV_PLAIN" sqlite >"$WORK/gwsc.yaml"
gw_config postgres "$GWP" "$GWP_ADMIN" 5m none "$DV_PLAIN" postgres >"$WORK/gwp.yaml"
gw_config postgres-cold "$GWPC" "$GWPC_ADMIN" 0s none "$DV_PLAIN" postgres >"$WORK/gwpc.yaml"
: >"$WORK/gateway.txt"
while read -r u _; do
  "$BIN" users add "$u" -c "$WORK/gw.yaml" 2>>"$WORK/cli.log"
  pw="$("$BIN" app-password create "$u" -c "$WORK/gw.yaml" 2>>"$WORK/cli.log")"
  printf '%s %s\n' "$u" "${pw// /}" >>"$WORK/gateway.txt"
done <"$WORK/direct.txt"
"$BIN" users add demo@example.org -c "$WORK/gw.yaml" 2>>"$WORK/cli.log"
# The same users, app passwords (hashes and lookup indexes) and all, in the database stores.
for name in gws gwsc gwp; do
  "$BIN" users import "$WORK/users.yaml" -c "$WORK/$name.yaml" 2>>"$WORK/cli.log" ||
    die "users import into $name failed: $(tail -5 "$WORK/cli.log")"
done
# oauth.txt: `user token` for loadgen --mech xoauth2, fetched fresh before each run (tokens
# live 10 minutes).
oauth_users() {
  local token
  token="$(idp_client_token "$IDP_URL" demo secret-demo)" || die "no token from the identity provider"
  printf 'demo@example.org %s\n' "$token" >"$WORK/oauth.txt"
}
for name in gw gwc gwt gws gwsc gwp gwpc; do
  "$BIN" run -c "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  eval "${name^^}_PID=$pid"
done
for p in "$GW" "$GWC" "$GWT" "$GWS" "$GWSC" "$GWP" "$GWPC"; do
  wait_for_port 127.0.0.1 "$p" 30 || die "imapgate did not start on $p: $(cat "$WORK"/gw*.log)"
done
# shellcheck disable=SC2153 # GW_PID is set by eval above
IDLE_GW_PORTS="$GW" IDLE_GW_PIDS="$GW_PID"
for i in $(seq 2 "$GW_REPLICAS"); do
  port=${PORTS[$((8 + 2 * i))]} admin=${PORTS[$((9 + 2 * i))]}
  gw_config warm "$port" "$admin" 5m none "$DV_PLAIN" |
    sed "s#warm-audit.log#warm$i-audit.log#" >"$WORK/gw$i.yaml"
  "$BIN" run -c "$WORK/gw$i.yaml" >"$WORK/gw$i.log" 2>&1 &
  PIDS+=("$!")
  IDLE_GW_PORTS+=",$port" IDLE_GW_PIDS+=",$!"
  wait_for_port 127.0.0.1 "$port" 30 || die "imapgate replica $i did not start: $(cat "$WORK/gw$i.log")"
done
[ "$GW_REPLICAS" -eq 1 ] || log "idle run: $SESSIONS sessions over $GW_REPLICAS imapgate processes (ports $IDLE_GW_PORTS) under an open-files limit of $FD_HARD"
# shellcheck disable=SC2153 # set by eval above
log "pids: dovecot $DV_PID, nginx $NGX_PID, imapgate $GW_PID (cold $GWC_PID, tls upstream $GWT_PID, sqlite $GWS_PID/$GWSC_PID, postgres $GWP_PID/$GWPC_PID), postgresql $PG_PID"

if [ -n "${BENCH_PERF:-}" ]; then
  # Profile imapgate's warm logins (8 clients) and FETCH with perf, then stop.
  # BENCH_PERF_TARGET picks whose logins: imapgate (the file store, default), imapgate-sqlite
  # or imapgate-postgres.
  case "${BENCH_PERF_TARGET:-imapgate}" in
    imapgate) PERF_PORT="$GW" PERF_PID="$GW_PID" ;;
    imapgate-sqlite) PERF_PORT="$GWS" PERF_PID="$GWS_PID" ;;
    imapgate-postgres) PERF_PORT="$GWP" PERF_PID="$GWP_PID" ;;
    *) die "BENCH_PERF_TARGET must be imapgate, imapgate-sqlite or imapgate-postgres" ;;
  esac
  PERF_LABEL="${BENCH_PERF_TARGET:-imapgate}"
  step "perf: $PERF_LABEL logins and imapgate FETCH -> $BENCH_PERF.{logins,fetch}.txt"
  # Scheduler and syscall counts first (perf stat), then a sampled profile.
  perf stat -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter -p "$PERF_PID" \
    -o "$BENCH_PERF.logins.stat" -- sleep "$SECONDS_PER_RUN" &
  perf_pid=$!
  run "$PERF_LABEL" "$PERF_PORT" "$WORK/gateway.txt" "$PERF_PID" logins --concurrency 8 --seconds "$SECONDS_PER_RUN"
  wait "$perf_pid" || true
  # One client's logins, every system call in order (a few hundred milliseconds).
  strace -f -tt -p "$PERF_PID" -o "$BENCH_PERF.logins.strace" 2>/dev/null &
  strace_pid=$!
  sleep 1
  run "$PERF_LABEL" "$PERF_PORT" "$WORK/gateway.txt" "$PERF_PID" logins --concurrency 1 --seconds 1
  kill "$strace_pid" 2>/dev/null || true
  wait "$strace_pid" 2>/dev/null || true
  # Which system calls, per thread.
  perf trace -s -p "$PERF_PID" -o "$BENCH_PERF.logins.syscalls" -- sleep "$SECONDS_PER_RUN" 2>/dev/null &
  perf_pid=$!
  run "$PERF_LABEL" "$PERF_PORT" "$WORK/gateway.txt" "$PERF_PID" logins --concurrency 8 --seconds "$SECONDS_PER_RUN"
  wait "$perf_pid" || true
  perf record -F 999 --call-graph "${BENCH_PERF_CALLGRAPH:-fp}" -p "$PERF_PID" -o "$BENCH_PERF.logins.data" -- sleep "$SECONDS_PER_RUN" 2>/dev/null &
  perf_pid=$!
  run "$PERF_LABEL" "$PERF_PORT" "$WORK/gateway.txt" "$PERF_PID" logins --concurrency 8 --seconds "$SECONDS_PER_RUN"
  wait "$perf_pid" || true
  perf_summary "$BENCH_PERF.logins.data" >"$BENCH_PERF.logins.txt"
  perf record -F 999 -g -p "$GW_PID" -o "$BENCH_PERF.fetch.data" -- sleep 8 2>/dev/null &
  perf_pid=$!
  run imapgate "$GW" "$WORK/gateway.txt" "$GW_PID" fetch --rounds 5
  wait "$perf_pid" || true
  perf_summary "$BENCH_PERF.fetch.data" >"$BENCH_PERF.fetch.txt"
  exit 0
fi

if [ -n "$COMPARE" ]; then
  # A/B: the same warm configuration served by another build, logins interleaved round by
  # round, so that a change's effect on CPU per login stands out of the machine's drift.
  step "compare: this build (:$GW) against $COMPARE (:$GWB), $ROUNDS round(s)"
  gw_config base "$GWB" "$GWB_ADMIN" 5m none "$DV_PLAIN" >"$WORK/gwb.yaml"
  # A build from before lookup indexes refuses a users file that has them: give it a copy
  # without (it verifies app passwords the old way; the warm runs hit its verified cache).
  grep -v '^ *lookup:' "$WORK/users.yaml" >"$WORK/users-base.yaml"
  chmod 600 "$WORK/users-base.yaml"
  sed -i "s#$WORK/users.yaml#$WORK/users-base.yaml#" "$WORK/gwb.yaml"
  "$COMPARE" run -c "$WORK/gwb.yaml" >"$WORK/gwb.log" 2>&1 &
  GWB_PID=$!
  PIDS+=("$GWB_PID")
  wait_for_port 127.0.0.1 "$GWB" 30 || die "the other build did not start: $(cat "$WORK/gwb.log")"
  for r in $(seq 1 "$ROUNDS"); do
    for c in 8 64; do
      run imapgate-base "$GWB" "$WORK/gateway.txt" "$GWB_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
      run imapgate "$GW" "$WORK/gateway.txt" "$GW_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    done
  done
  python3 - "$RAW" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for label in ("imapgate-base", "imapgate"):
    for c in (8, 64):
        r = [x for x in rows if x["label"] == label and x["concurrency"] == c]
        cpu = statistics.median(x["cpu_ms_per_login"] for x in r)
        rate = statistics.median(x["per_second"] for x in r)
        print(f"{label:14} {c:3} clients: {rate:6.0f} logins/s, {cpu:.3f} ms CPU per login (median of {len(r)})")
PY
  exit 0
fi

if [ "$STORES" -eq 1 ]; then
  # The credential stores only: warm and cold logins of the file, sqlite and postgres
  # gateways, each round in another order (so that none always runs right after a cold run).
  step "stores: file, sqlite and postgres logins, $ROUNDS round(s) of ${SECONDS_PER_RUN}s"
  targets=("imapgate $GW $GW_PID" "imapgate-sqlite $GWS $GWS_PID" "imapgate-postgres $GWP $GWP_PID"
    "imapgate-cold $GWC $GWC_PID" "imapgate-sqlite-cold $GWSC $GWSC_PID" "imapgate-postgres-cold $GWPC $GWPC_PID")
  for r in $(seq 1 "$ROUNDS"); do
    log "round $r"
    for c in 8 64; do
      for i in $(seq 0 $((${#targets[@]} - 1))); do
        read -r label port pid <<<"${targets[$(((i + r) % ${#targets[@]}))]}"
        run "$label" "$port" "$WORK/gateway.txt" "$pid" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
      done
    done
  done
  step "results"
  python3 "$REPO/bench/report.py" "$RAW" "$OUT" \
    "cpus=$(nproc)" "model=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
    "mem_gib=$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" \
    "mode=stores" "rounds=$ROUNDS" "seconds_per_run=$SECONDS_PER_RUN" \
    "loadavg_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" "postgresql=$("$PG_BIN/postgres" --version | sed -n 's/^postgres (PostgreSQL) \([^ ]*\).*/\1/p')"
  exit 0
fi

# SMTP submission (bench/smtp.sh): Postfix and the gateway's SMTP front, measured in every round.
smtp_start "$SMTP_PF_TLS" "$SMTP_PF_X" "$GWM" "$GWM_ADMIN"
log "pids: postfix master $PF_PID, imapgate (SMTP) $GWM_PID"

# Idle sessions first, on fresh processes: memory per session is the growth of resident memory,
# which allocations of the earlier runs (kept by the allocator) would blur.
step "idle sessions: $SESSIONS per target"
run dovecot "$DV_TLS" "$WORK/direct.txt" "$DV_PID" idle --sessions "$SESSIONS" --concurrency 64 --hold 10
run nginx "$NGX" "$WORK/direct.txt" "$NGX_PID" idle --sessions "$SESSIONS" --concurrency 64 --hold 10
run imapgate "$IDLE_GW_PORTS" "$WORK/gateway.txt" "$IDLE_GW_PIDS" idle --sessions "$SESSIONS" --concurrency 64 --hold 10

step "measuring: $ROUNDS round(s), targets interleaved"
for r in $(seq 1 "$ROUNDS"); do
  log "round $r"
  for c in 8 64; do
    run dovecot "$DV_TLS" "$WORK/direct.txt" "$DV_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run nginx "$NGX" "$WORK/direct.txt" "$NGX_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate "$GW" "$WORK/gateway.txt" "$GW_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate-cold "$GWC" "$WORK/gateway.txt" "$GWC_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate-sqlite "$GWS" "$WORK/gateway.txt" "$GWS_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate-postgres "$GWP" "$WORK/gateway.txt" "$GWP_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate-sqlite-cold "$GWSC" "$WORK/gateway.txt" "$GWSC_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    run imapgate-postgres-cold "$GWPC" "$WORK/gateway.txt" "$GWPC_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
    oauth_users
    run imapgate-oauth "$GW" "$WORK/oauth.txt" "$GW_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN" --mech xoauth2
    run imapgate-tls-upstream "$GWT" "$WORK/gateway.txt" "$GWT_PID" logins --concurrency "$c" --seconds "$SECONDS_PER_RUN"
  done
  run dovecot "$DV_TLS" "$WORK/direct.txt" "$DV_PID" fetch --rounds 3
  run nginx "$NGX" "$WORK/direct.txt" "$NGX_PID" fetch --rounds 3
  run imapgate "$GW" "$WORK/gateway.txt" "$GW_PID" fetch --rounds 3
  run imapgate-tls-upstream "$GWT" "$WORK/gateway.txt" "$GWT_PID" fetch --rounds 3
  for t in "dovecot $DV_TLS direct.txt $DV_PID" "nginx $NGX direct.txt $NGX_PID" \
    "imapgate $GW gateway.txt $GW_PID" "imapgate-tls-upstream $GWT gateway.txt $GWT_PID"; do
    read -r label port users pid <<<"$t"
    run "$label" "$port" "$WORK/$users" "$pid" noop --count 2000
  done
  smtp_round "$r"
done
smtp_check
step "results"
python3 "$REPO/bench/report.py" "$RAW" "$OUT" \
  "cpus=$(nproc)" "model=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
  "mem_gib=$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" \
  "quick=$QUICK" "messages=$MESSAGES" "sessions=$SESSIONS" "rounds=$ROUNDS" \
  "fd_hard_limit=$FD_HARD" "idle_gateway_processes=$GW_REPLICAS" \
  "dovecot=$(dovecot --version 2>/dev/null | head -1)" "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')" \
  "postgresql=$("$PG_BIN/postgres" --version | sed -n 's/^postgres (PostgreSQL) \([^ ]*\).*/\1/p')" "loadavg_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" \
  "postfix=$(postconf -d -h mail_version 2>/dev/null)"
