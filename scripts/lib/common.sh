# shellcheck shell=bash
# Shared helpers for scripts/test.sh and scripts/demo.sh. Source this file; do not run it.
#
# Everything here is bounded: every wait has a deadline, every process we start is stopped by
# its own pid. Nothing here talks to the network except apt-get.

# --- output --------------------------------------------------------------------------------

log() { printf '%s\n' "$*" >&2; }
step() { printf '\n==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# --- privileges and packages ---------------------------------------------------------------

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root for: $* (run as root or install sudo)"
  fi
}

# True when the Debian package is installed.
pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# ensure_packages PKG[:COMMAND] ...
# Installs the packages that are missing, with one apt-get update, behind a policy-rc.d that
# stops dpkg from starting services. A package counts as present when dpkg says so or when its
# COMMAND is already on PATH (e.g. a python3 from pyenv); a COMMAND that is an absolute path may
# be a glob (quote it), and then any executable match counts (PostgreSQL's server lives in
# /usr/lib/postgresql/VERSION/bin, off PATH). Sets ENSURE_PACKAGES_INSTALLED to the packages it
# installed (empty when the machine was warm).
# shellcheck disable=SC2034 # read by the scripts that source this file
ENSURE_PACKAGES_INSTALLED=""
ensure_packages() {
  local spec pkg cmd missing=()
  for spec in "$@"; do
    pkg="${spec%%:*}"
    cmd=""
    [ "$spec" != "$pkg" ] && cmd="${spec#*:}"
    if pkg_installed "$pkg"; then continue; fi
    if [ -n "$cmd" ] && command_present "$cmd"; then continue; fi
    missing+=("$pkg")
  done
  ENSURE_PACKAGES_INSTALLED=""
  if [ "${#missing[@]}" -eq 0 ]; then
    log "system packages present: ${*%%:*}"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
  log "installing: ${missing[*]}"

  # Stop dpkg from starting services (dovecot would grab 143/993). Keep an existing policy;
  # remove ours afterwards so a developer's machine is left as it was.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    created_policy=1
  fi
  local rc=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
  if [ "$rc" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" || rc=$?
  fi
  if [ "$created_policy" -eq 1 ]; then as_root rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc) installing: ${missing[*]}"
  # shellcheck disable=SC2034
  ENSURE_PACKAGES_INSTALLED="${missing[*]}"
}

# debconf_preseed 'PACKAGE QUESTION TYPE VALUE'...: answers a package's debconf questions
# before ensure_packages installs it (debconf-set-selections), so apt-get asks nothing. Only
# for packages that are not installed yet: an installed one keeps its owner's answers.
debconf_preseed() {
  local line
  for line in "$@"; do
    pkg_installed "${line%% *}" && continue
    printf '%s\n' "$line" | as_root debconf-set-selections || die "debconf-set-selections failed: $line"
  done
}

# command_present COMMAND: true when COMMAND is on PATH (with /usr/sbin and /sbin), or, for an
# absolute path (which may be a glob), when an executable file matches it.
command_present() {
  local cmd="$1" match
  case "$cmd" in
    /*)
      for match in $cmd; do
        [ -f "$match" ] && [ -x "$match" ] && return 0
      done
      return 1
      ;;
    *) PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 ;;
  esac
}

# disable_boot_service NAME: keeps a service that a package installed (and policy-rc.d kept from
# starting) from starting at the next boot, under systemd and under SysV init. Stops nothing.
disable_boot_service() {
  local name="$1"
  if command -v deb-systemd-helper >/dev/null 2>&1; then
    as_root deb-systemd-helper disable "$name.service" >/dev/null 2>&1 || true
  fi
  if [ -x "/etc/init.d/$name" ] && command -v update-rc.d >/dev/null 2>&1; then
    as_root update-rc.d "$name" disable >/dev/null 2>&1 || true
  fi
}

# Stops a system-wide Dovecot (the distribution's service, base_dir /run/dovecot) if one runs.
# Our sandboxes use their own base_dir, so they are never touched.
stop_system_dovecot() {
  local pidfile=/run/dovecot/master.pid pid
  [ -r "$pidfile" ] || return 0
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  warn "a system Dovecot (pid $pid) is running; stopping it"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl stop dovecot.service dovecot.socket 2>/dev/null || true
  fi
  as_root kill -TERM "$pid" 2>/dev/null || true
  wait_pid_gone "$pid" 10 || as_root kill -KILL "$pid" 2>/dev/null || true
}

# --- processes and ports -------------------------------------------------------------------

# wait_pid_gone PID SECONDS: true once PID has exited, false after SECONDS.
wait_pid_gone() {
  local pid="$1" deadline=$((SECONDS + $2))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# stop_pid PID [NAME]: SIGTERM, up to 10 s to exit, then SIGKILL. Reaps it if it is our child.
stop_pid() {
  local pid="$1" name="${2:-process}"
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" 10; then
      warn "$name (pid $pid) did not stop within 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_gone "$pid" 5 || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# free_ports N: prints N distinct free TCP ports on 127.0.0.1, one per line.
free_ports() {
  local n="$1"
  if command -v python3 >/dev/null 2>&1 && python3 -c '
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
' "$n" 2>/dev/null; then
    return 0
  fi
  # No python3: probe random high ports until N refuse a connection.
  local found=() port tries=0
  while [ "${#found[@]}" -lt "$n" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 1000 ] || die "could not find $n free ports"
    port=$((20000 + RANDOM % 12000))
    case " ${found[*]} " in *" $port "*) continue ;; esac
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue; fi
    found+=("$port")
  done
  printf '%s\n' "${found[@]}"
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for_port HOST PORT SECONDS [PID]: waits until the port accepts connections; fails after
# SECONDS or as soon as PID (the process that should open it) has exited.
wait_for_port() {
  local host="$1" port="$2" deadline=$((SECONDS + $3)) pid="${4:-}"
  until port_open "$host" "$port"; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# random_secret: 32 hex characters from /dev/urandom (no SIGPIPE under pipefail).
random_secret() {
  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

# totp_code SECRET [UNIX_TIME [DIGITS]]: the RFC 6238 code (HMAC-SHA1, 30-second steps) for a
# base32 SECRET (as in an otpauth:// URI; padding and case do not matter) at UNIX_TIME (default:
# now), DIGITS long (default 6). Needs python3 (standard library only).
totp_code() {
  python3 - "$1" "${2:-}" "${3:-6}" <<'PY'
import base64, hashlib, hmac, struct, sys, time

secret = sys.argv[1].replace(" ", "").rstrip("=").upper()
key = base64.b32decode(secret + "=" * (-len(secret) % 8))
now = int(sys.argv[2]) if sys.argv[2] else int(time.time())
digits = int(sys.argv[3])
digest = hmac.new(key, struct.pack(">Q", now // 30), hashlib.sha1).digest()
offset = digest[-1] & 0x0F
number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
print(str(number % 10**digits).zfill(digits))
PY
}

# --- certificates --------------------------------------------------------------------------

# make_test_pki DIR: a throwaway CA (DIR/ca.pem) and a server certificate signed by it
# (DIR/server.pem, DIR/server.key) for localhost and 127.0.0.1, EC P-256, valid 7 days.
# The leaf is a proper end-entity certificate (CA:FALSE, serverAuth, SAN) so rustls/webpki
# accepts it.
make_test_pki() {
  local dir="$1"
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
    -subj '/CN=imapgate test CA' \
    -addext 'basicConstraints=critical,CA:TRUE' \
    -addext 'keyUsage=critical,keyCertSign,cRLSign' \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj '/CN=localhost' -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf '%s\n' \
    'basicConstraints=critical,CA:FALSE' \
    'keyUsage=critical,digitalSignature' \
    'extendedKeyUsage=serverAuth' \
    'subjectAltName=DNS:localhost,IP:127.0.0.1' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 7 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
  rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
  chmod 600 "$dir/ca.key" "$dir/server.key"
}

# --- throwaway Dovecot ---------------------------------------------------------------------

# dovecot_sandbox_start DIR PORT TLS USER...
# Starts a Dovecot that serves only 127.0.0.1:PORT (TLS = implicit | starttls | none), with a
# master user "gateway" and a maildir per USER holding one demo message. Dovecot runs as root
# (it needs to), mail is served as nobody:nogroup. After it returns:
#   DOVECOT_PID            the master process (stop with dovecot_sandbox_stop)
#   DOVECOT_CONF           DIR/dovecot.conf
#   DOVECOT_LOG            DIR/dovecot.log
#   DOVECOT_MASTER_USER    gateway
#   DIR/master.secret      the master password (no newline, mode 0600)
#   DIR/tls/ca.pem         the CA that signed Dovecot's certificate (TLS modes)
# Users' own Dovecot passwords are random and never written anywhere but the passwd-file, so
# the only way in is the master user.
# Optional, set for the call (e.g. `DOVECOT_SANDBOX_LMTP_PORT=24 dovecot_sandbox_start ...`):
#   DOVECOT_SANDBOX_POP3S_PORT  also serve POP3 over implicit TLS there (RFC 8314; TLS modes
#                               only), for the same users and master user (`user*gateway`)
#   DOVECOT_SANDBOX_LMTP_PORT   also accept deliveries over LMTP (RFC 2033), plain, on
#                               127.0.0.1 there (for a Postfix's local_transport); mail for an
#                               address that is not a user is refused at RCPT
DOVECOT_PID=""
DOVECOT_CONF=""
DOVECOT_LOG=""
DOVECOT_MASTER_USER="gateway"
dovecot_sandbox_start() {
  local dir="$1" port="$2" tls="$3"
  shift 3
  local dovecot_bin
  dovecot_bin="$(PATH="$PATH:/usr/sbin:/sbin" command -v dovecot)" || die "dovecot is not installed"
  [ "$(id -u)" -eq 0 ] || die "the Dovecot sandbox must be started as root"
  getent passwd dovecot >/dev/null || die "system user 'dovecot' missing (dovecot-core not installed?)"

  # Login processes (dovenull) and auth (dovecot) must traverse every directory up to base_dir.
  mkdir -p "$dir/run" "$dir/state" "$dir/mail"
  chmod 755 "$dir" "$dir/run" "$dir/state"
  DOVECOT_CONF="$dir/dovecot.conf"
  DOVECOT_LOG="$dir/dovecot.log"

  local master_pw user
  master_pw="$(random_secret)"
  printf '%s' "$master_pw" >"$dir/master.secret"
  chmod 600 "$dir/master.secret"

  # passwd-files are read by the auth process, which runs as the 'dovecot' user.
  printf '%s:{PLAIN}%s\n' "$DOVECOT_MASTER_USER" "$master_pw" >"$dir/dovecot-masters"
  : >"$dir/dovecot-users"
  for user in "$@"; do
    printf '%s:{PLAIN}%s\n' "$user" "$(random_secret)" >>"$dir/dovecot-users"
    dovecot_sandbox_add_message "$dir" "$user"
  done
  chown root:dovecot "$dir/dovecot-masters" "$dir/dovecot-users"
  chmod 640 "$dir/dovecot-masters" "$dir/dovecot-users"
  chown -R nobody:nogroup "$dir/mail"
  chmod 700 "$dir/mail"

  local ssl_block="" imap_port=0 imaps_port=0 plaintext="no"
  local pop3s_port="${DOVECOT_SANDBOX_POP3S_PORT:-}" lmtp_port="${DOVECOT_SANDBOX_LMTP_PORT:-}"
  local protocols="imap" more_services="" wait_ports=("$port")
  case "$tls" in
    implicit | starttls)
      make_test_pki "$dir/tls"
      ssl_block="ssl = required
ssl_cert = <$dir/tls/server.pem
ssl_key = <$dir/tls/server.key
ssl_min_protocol = TLSv1.2"
      if [ -r /usr/share/dovecot/dh.pem ]; then
        ssl_block="$ssl_block
ssl_dh = </usr/share/dovecot/dh.pem"
      fi
      plaintext="yes"
      if [ "$tls" = implicit ]; then imaps_port="$port"; else imap_port="$port"; fi
      ;;
    none)
      ssl_block="ssl = no"
      imap_port="$port"
      ;;
    *) die "dovecot_sandbox_start: TLS must be implicit, starttls or none, not '$tls'" ;;
  esac
  if [ -n "$pop3s_port" ]; then
    [ "$tls" != none ] || die "dovecot_sandbox_start: POP3 over implicit TLS needs a TLS mode, not '$tls'"
    protocols="$protocols pop3"
    # Port 0: no cleartext POP3 listener (the default would take 110).
    more_services="$more_services
service pop3-login {
  inet_listener pop3 {
    port = 0
  }
  inet_listener pop3s {
    port = $pop3s_port
    ssl = yes
  }
}"
    wait_ports+=("$pop3s_port")
  fi
  if [ -n "$lmtp_port" ]; then
    protocols="$protocols lmtp"
    # The static userdb cannot list users, so Dovecot checks each recipient with a passdb
    # lookup: an address that is not a user is refused at RCPT.
    more_services="$more_services
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $lmtp_port
  }
}"
    wait_ports+=("$lmtp_port")
  fi

  cat >"$DOVECOT_CONF" <<EOF
# Throwaway Dovecot for imapgate's demo and tests: loopback only, everything under $dir.
base_dir = $dir/run
state_dir = $dir/state
instance_name = imapgate-sandbox
log_path = $dir/dovecot.log
info_log_path = $dir/dovecot.log
protocols = $protocols
listen = 127.0.0.1
$ssl_block
disable_plaintext_auth = $plaintext
auth_mechanisms = plain login
auth_master_user_separator = *
login_trusted_networks = 127.0.0.1
mail_uid = nobody
mail_gid = nogroup
mail_location = maildir:~/Maildir

# Master users: "user*gateway" + the master password logs in as user. result_success =
# continue makes Dovecot look the user up in the next passdb, so only existing users work.
passdb {
  driver = passwd-file
  args = $dir/dovecot-masters
  master = yes
  result_success = continue
}
# Real users, with random passwords nobody is told: the master user is the only way in.
passdb {
  driver = passwd-file
  args = $dir/dovecot-users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$dir/mail/%u
}
# Failed logins are answered at once and do not slow down later ones from 127.0.0.1 (by
# default Dovecot waits 2 s and its anvil penalty grows to 15 s per source IP, which makes
# negative tests slow and flaky).
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service imap-login {
  inet_listener imap {
    port = $imap_port
  }
  inet_listener imaps {
    port = $imaps_port
    ssl = yes
  }
}$more_services
EOF

  "$dovecot_bin" -c "$DOVECOT_CONF" -F >"$dir/dovecot.stderr" 2>&1 &
  DOVECOT_PID=$!
  local p
  for p in "${wait_ports[@]}"; do
    if ! wait_for_port 127.0.0.1 "$p" 30 "$DOVECOT_PID"; then
      log "--- dovecot stderr"
      cat "$dir/dovecot.stderr" >&2 || true
      log "--- dovecot log"
      cat "$DOVECOT_LOG" >&2 2>/dev/null || true
      die "Dovecot did not start listening on 127.0.0.1:$p within 30 s"
    fi
  done
}

# dovecot_sandbox_add_message DIR USER: drops one small message into USER's INBOX (maildir new/).
dovecot_sandbox_add_message() {
  local dir="$1" user="$2" maildir
  maildir="$dir/mail/$user/Maildir"
  mkdir -p "$maildir/cur" "$maildir/new" "$maildir/tmp"
  cat >"$maildir/new/1700000000.M1P1.imapgate-demo" <<EOF
From: imapgate demo <noreply@example.org>
To: $user
Subject: Welcome to imapgate
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <welcome@imapgate.invalid>
Content-Type: text/plain; charset=us-ascii

This message was served by a real Dovecot, relayed through imapgate.
EOF
  chown -R nobody:nogroup "$dir/mail/$user"
}

# dovecot_sandbox_stop: stops the Dovecot started by dovecot_sandbox_start (idempotent).
dovecot_sandbox_stop() {
  if [ -n "$DOVECOT_PID" ]; then
    stop_pid "$DOVECOT_PID" dovecot
    DOVECOT_PID=""
  fi
}

# --- throwaway Postfix ---------------------------------------------------------------------

# postfix_sandbox_start DIR PORT LMTP_PORT DOMAIN
# Starts a non-system Postfix instance that lives in DIR (never /etc/postfix, never port 25):
# its config (DIR/conf), queue (DIR/queue), data directory (DIR/data) and log (DIR/maillog,
# written by its own postlog service; no syslog). Its one smtpd listens on 127.0.0.1:PORT as a
# submission port for a gateway on 127.0.0.1: XCLIENT (Postfix's XCLIENT_README) from
# 127.0.0.1 only, no SASL of its own, STARTTLS offered with a certificate from a throwaway CA.
# It delivers DOMAIN (its only destination; other domains are refused at RCPT) to the LMTP
# server on 127.0.0.1:LMTP_PORT, e.g. dovecot_sandbox_start's. `master` runs as root (it must);
# its daemons run as the package's postfix user. After it returns:
#   POSTFIX_CONF_DIR   DIR/conf (stop with postfix_sandbox_stop)
#   POSTFIX_LOG        DIR/maillog
#   DIR/tls/ca.pem     the CA that signed its certificate (for localhost and 127.0.0.1)
POSTFIX_CONF_DIR=""
POSTFIX_LOG=""
postfix_sandbox_start() {
  local dir="$1" port="$2" lmtp_port="$3" domain="$4" postfix_bin
  postfix_bin="$(PATH="$PATH:/usr/sbin:/sbin" command -v postfix)" || die "postfix is not installed"
  [ "$(id -u)" -eq 0 ] || die "the Postfix sandbox must be started as root"
  getent passwd postfix >/dev/null || die "system user 'postfix' missing (postfix not installed?)"
  getent group postdrop >/dev/null || die "system group 'postdrop' missing (postfix not installed?)"

  # The postfix user must reach the queue; the data directory is its own (`postfix check`
  # warns otherwise) and `postfix check` makes the queue's subdirectories with their owners.
  mkdir -p "$dir/conf" "$dir/queue" "$dir/data"
  chmod 755 "$dir" "$dir/conf" "$dir/queue"
  chown postfix "$dir/data"
  chmod 700 "$dir/data"
  make_test_pki "$dir/tls"
  POSTFIX_LOG="$dir/maillog"

  cat >"$dir/conf/main.cf" <<EOF
# Throwaway Postfix for imapgate's demo: loopback only, everything under $dir.
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.$domain
mydomain = $domain
myorigin = $domain
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# $domain is the only destination. Every address in it goes to LMTP, whose server refuses
# unknown users (hence no local_recipient_maps); nothing is relayed anywhere else.
mydestination = $domain
local_recipient_maps =
local_transport = lmtp:inet:127.0.0.1:$lmtp_port
smtpd_relay_restrictions = reject_unauth_destination
default_transport = error:this demo Postfix delivers to $domain only
alias_maps =
alias_database =
# No syslog: the postlog service writes this file.
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
# Loopback only: no DNS, no reverse lookups.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
lmtp_host_lookup = native
smtp_host_lookup = native
smtpd_tls_cert_file = $dir/tls/server.pem
smtpd_tls_key_file = $dir/tls/server.key
smtpd_tls_security_level = may
smtpd_tls_session_cache_database =
# Errors are answered at once (no tarpit).
smtpd_error_sleep_time = 0
EOF
  # The gateway's port, then the internal services Postfix needs (as in its master.cf.proto),
  # none chrooted.
  cat >"$dir/conf/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_authorized_xclient_hosts=127.0.0.1
  -o smtpd_sasl_auth_enable=no
  -o smtpd_sasl_authenticated_header=yes
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

  # Set before the start, so that postfix_sandbox_stop also stops a half-started instance.
  POSTFIX_CONF_DIR="$dir/conf"
  local verb
  for verb in check start; do
    if ! "$postfix_bin" -c "$POSTFIX_CONF_DIR" "$verb" >>"$dir/postfix.out" 2>&1; then
      cat "$dir/postfix.out" >&2 || true
      die "postfix -c $POSTFIX_CONF_DIR $verb failed"
    fi
  done
  if ! wait_for_port 127.0.0.1 "$port" 30; then
    log "--- postfix log"
    cat "$POSTFIX_LOG" >&2 2>/dev/null || true
    die "Postfix did not start listening on 127.0.0.1:$port within 30 s"
  fi
}

# postfix_sandbox_stop: stops the Postfix started by postfix_sandbox_start, master and daemons
# (`postfix stop` waits for them, up to 5 s); idempotent.
postfix_sandbox_stop() {
  [ -n "$POSTFIX_CONF_DIR" ] || return 0
  PATH="$PATH:/usr/sbin:/sbin" postfix -c "$POSTFIX_CONF_DIR" stop >/dev/null 2>&1 || true
  POSTFIX_CONF_DIR=""
}

# --- browser tests (tests/browser) -----------------------------------------------------------

# Playwright for Python, pinned (with its one dependency). It drives Debian's chromium
# (/usr/bin/chromium); `playwright install` is never run, so no browser is downloaded.
BROWSER_PY_REQUIREMENTS=(playwright==1.65.3 greenlet==3.5.6)
BROWSER_PYTHON=""

# ensure_browser_venv DIR: a venv in DIR holding BROWSER_PY_REQUIREMENTS (pip from PyPI the
# first time, or when the pins change; reused after). Sets BROWSER_PYTHON to its python (an
# absolute path).
ensure_browser_venv() {
  local venv="$1" want have
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      rm -rf "$venv"
      # Debian splits venv support out of python3.
      ensure_packages python3-venv
      python3 -m venv "$venv" || die "could not create a venv in $venv"
    fi
  fi
  want="$(printf '%s\n' "${BROWSER_PY_REQUIREMENTS[@]}" | sort)"
  have="$({ "$venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null || true; } \
    | { grep -iE '^(playwright|greenlet)==' || true; } | sort)"
  if [ "$have" != "$want" ]; then
    log "installing ${BROWSER_PY_REQUIREMENTS[*]} into $venv (once)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "${BROWSER_PY_REQUIREMENTS[@]}" || die "pip could not install ${BROWSER_PY_REQUIREMENTS[*]} (is PyPI reachable?)"
  fi
  BROWSER_PYTHON="$(cd "$venv" && pwd)/bin/python"
}

# browser_selfcheck DIR: starts the test IdP (logs in DIR), runs tests/browser/idp_selfcheck.py
# with BROWSER_PYTHON against it (Chromium signs in through the IdP's login form), stops the IdP.
# Fails with the self-check's FAIL line and the IdP's log when anything is wrong.
browser_selfcheck() {
  local dir="$1" rc=0
  [ -n "$BROWSER_PYTHON" ] || die "browser_selfcheck: call ensure_browser_venv first"
  idp_start "$dir" || {
    cat "$dir/idp.log" >&2 2>/dev/null || true
    idp_stop
    die "the test identity provider did not start (log above)"
  }
  "$BROWSER_PYTHON" "$(dirname "$IDP_SERVER_JS")/../browser/idp_selfcheck.py" --idp "$IDP_URL" \
    --screenshots "$dir/screenshots" || rc=$?
  idp_stop
  if [ "$rc" -ne 0 ]; then
    log "--- identity provider log ($dir/idp.log)"
    cat "$dir/idp.log" >&2 2>/dev/null || true
    die "the browser self-check failed (exit $rc): Chromium, Playwright or the test IdP's sign-in flow is broken"
  fi
}

# --- test identity provider (tests/idp) -----------------------------------------------------

# idp_start DIR [ARG...]: starts the test OpenID provider (node tests/idp/server.js, npm
# oidc-provider; tests/idp/node_modules must be installed) on a free loopback port, with the
# server's extra ARGs (e.g. --client ID:SECRET:REDIRECT_URI), and waits up to 30 s for it.
# Its stdout (the READY line) goes to DIR/idp.out, its log to DIR/idp.log. After it returns 0:
#   IDP_PID   the node process (stop with idp_stop)
#   IDP_URL   the issuer, http://127.0.0.1:PORT (no trailing slash)
# Returns 1 (with IDP_PID still set if it is running) when it did not come up.
IDP_PID=""
IDP_URL=""
IDP_SERVER_JS="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/tests/idp/server.js"
idp_start() {
  local dir="$1" deadline=$((SECONDS + 30))
  shift
  mkdir -p "$dir"
  IDP_URL=""
  node "$IDP_SERVER_JS" --port 0 "$@" >"$dir/idp.out" 2>"$dir/idp.log" &
  IDP_PID=$!
  until IDP_URL="$(sed -n 's|^READY \(http://127\.0\.0\.1:[0-9][0-9]*\)$|\1|p' "$dir/idp.out")" && [ -n "$IDP_URL" ]; do
    if ! kill -0 "$IDP_PID" 2>/dev/null; then
      wait "$IDP_PID" 2>/dev/null || true
      IDP_PID=""
      log "the identity provider exited before it was ready"
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "the identity provider was not ready after 30 s"
      return 1
    fi
    sleep 0.1
  done
}

# idp_stop: stops the identity provider started by idp_start (SIGTERM; idempotent).
idp_stop() {
  if [ -n "$IDP_PID" ]; then
    stop_pid "$IDP_PID" "identity provider"
    IDP_PID=""
  fi
}

# idp_client_token URL CLIENT SECRET [RESOURCE [SCOPE]]: prints an access token from the test
# identity provider's client credentials grant (client_secret_basic; resource default
# urn:imapgate:rs256, scope default imap). Fails with the IdP's answer on stderr.
idp_client_token() {
  local out
  out="$(curl --silent --show-error --max-time 30 --user "$2:$3" \
    --data grant_type=client_credentials --data-urlencode "scope=${5:-imap}" \
    --data-urlencode "resource=${4:-urn:imapgate:rs256}" "$1/token" 2>&1)" || {
    log "token request to $1/token failed: $out"
    return 1
  }
  python3 -c 'import json, sys; print(json.loads(sys.argv[1])["access_token"])' "$out" 2>/dev/null || {
    log "no access_token from $1/token: $out"
    return 1
  }
}

# jwt_claims TOKEN: prints the (unverified) payload of a compact JWT as one line of JSON.
jwt_claims() {
  python3 -c '
import base64, json, sys
p = sys.argv[1].split(".")[1]
print(json.dumps(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))), sort_keys=True))
' "$1"
}
