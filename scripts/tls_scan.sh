#!/usr/bin/env bash
# imapgate TLS scan: both listener kinds, implicit TLS and STARTTLS, on loopback.
#
#   scripts/tls_scan.sh [--bin PATH] [--testssl OUT_DIR]
#
# Starts imapgate (default: target/debug/imapgate; --bin PATH for another binary; nothing is
# built) with a throwaway test CA and a 7-day EC P-256 certificate for localhost and 127.0.0.1,
# one implicit-TLS and one STARTTLS listener on free 127.0.0.1 ports, and no live backend (the
# scan only needs the greeting and the handshake). The listeners use the default TLS settings
# (tls.min_version left out). On each listener it runs Debian's sslscan and asserts:
#   - SSLv2, SSLv3, TLS 1.0 and TLS 1.1 disabled; TLS 1.2 and TLS 1.3 enabled;
#   - every accepted suite is TLS 1.3 or ECDHE, and AEAD (AES-GCM or ChaCha20-Poly1305);
#   - no heartbleed, no insecure renegotiation;
# and, with openssl s_client and a small Python probe (raw sockets, standard library):
#   - the server's cipher order: the server's order, derived by offering the accepted suites
#     in one order and in the reverse order, is the same both times (TLS 1.2 and TLS 1.3);
#   - no TLS compression: a TLS 1.2 ClientHello offering DEFLATE gets the null method back
#     (Debian's sslscan is built without zlib and cannot test it), and the TLS 1.3 downgrade
#     sentinel is in the TLS 1.2 ServerHello;
#   - no 0-RTT: a resumption ticket says max_early_data 0, and a client that sends early data
#     anyway (the same ticket with max_early_data forced to 16384) resumes with it rejected;
#   - ALPN: `imap` is accepted, a client offering only other protocols is refused.
# With --testssl OUT_DIR it also runs Debian's testssl.sh on both listeners (`-t imap` on the
# STARTTLS one) with the test CA (--add-ca), no DNS lookups (--ip, --nodns none) and no phone-out
# (the default: no OCSP or CRL fetches), writes the logs, JSON and a findings summary into
# OUT_DIR, and fails when a protocol, cipher or vulnerability finding (or any other finding
# except a certificate finding) is MEDIUM or worse, when a protocol, cipher or vulnerability
# check could not run (WARN), or when testssl.sh did not complete. Certificate findings are
# listed but not fatal: they are about the throwaway test certificate (7 days, no CRL/OCSP), not
# the gateway; that the certificate chains to the test CA and matches the name is asserted.
#
# Installs sslscan (and testssl.sh with --testssl), openssl and python3 if missing. Loopback only.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$REPO/target/debug/imapgate"
TESTSSL_OUT=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --bin)
      [ "$#" -gt 1 ] || {
        usage >&2
        exit 64
      }
      BIN="$2"
      shift
      ;;
    --testssl)
      [ "$#" -gt 1 ] || {
        usage >&2
        exit 64
      }
      TESTSSL_OUT="$2"
      shift
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

# shellcheck source=scripts/lib/common.sh
. "$REPO/scripts/lib/common.sh"

case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
[ -x "$BIN" ] || die "no imapgate binary at $BIN (build it, or pass --bin PATH)"
if [ -n "$TESTSSL_OUT" ]; then
  mkdir -p "$TESTSSL_OUT" || die "cannot create $TESTSSL_OUT"
  TESTSSL_OUT="$(cd "$TESTSSL_OUT" && pwd)"
fi

HOST=127.0.0.1
SERVER_NAME=localhost
STARTED=$SECONDS

step "checking system packages"
PACKAGES=(sslscan:sslscan openssl:openssl python3:python3)
[ -z "$TESTSSL_OUT" ] || PACKAGES+=(testssl.sh:testssl)
ensure_packages "${PACKAGES[@]}"

WORK=""
GATEWAY_PID=""
FAILURES=()

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$GATEWAY_PID" ]; then
    stop_pid "$GATEWAY_PID" imapgate
  fi
  if [ "$rc" -ne 0 ] && [ -n "$WORK" ] && [ -s "$WORK/gateway.log" ]; then
    printf '\n----- gateway.log (last 50 lines) -----\n' >&2
    tail -n 50 "$WORK/gateway.log" >&2 || true
  fi
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# check_fail MESSAGE: records a failed assertion; the script goes on and fails at the end.
check_fail() {
  FAILURES+=("$*")
  printf '  FAIL: %s\n' "$*" >&2
}
check_ok() { printf '  ok: %s\n' "$*" >&2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/imapgate-tls-scan.XXXXXX")"
chmod 700 "$WORK"

# --- helpers in Python (standard library only) ----------------------------------------------
cat >"$WORK/tlsprobe.py" <<'PY'
"""Two small TLS helpers the openssl command line cannot do.

probe HOST PORT SNI [starttls]
    Sends one TLS 1.2 ClientHello that offers DEFLATE and null compression (in that order) and
    only ECDHE AEAD suites, reads the ServerHello and prints
    `version=0303 cipher=c02c compression=0 downgrade_sentinel=yes`. With `starttls`, does the
    IMAP STARTTLS exchange first.
forge-early-data IN OUT
    Copies an OpenSSL SSL_SESSION (PEM) and sets max_early_data ([15]) to 16384, so that
    `openssl s_client -sess_in OUT -early_data FILE` sends early data whatever the server said.
"""
import base64
import os
import re
import socket
import sys


def recv_line(s):
    buf = b""
    while not buf.endswith(b"\r\n"):
        c = s.recv(1)
        if not c:
            raise SystemExit("connection closed during the IMAP exchange: %r" % buf)
        buf += c
    return buf.decode("latin-1").rstrip("\r\n")


def starttls(s):
    greeting = recv_line(s)
    if not greeting.startswith("* OK"):
        raise SystemExit("no IMAP greeting: %r" % greeting)
    s.sendall(b"p1 STARTTLS\r\n")
    while True:
        line = recv_line(s)
        if line.startswith("p1 "):
            break
    if not line.upper().startswith("P1 OK"):
        raise SystemExit("STARTTLS refused: %r" % line)


def ext(kind, body):
    return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def client_hello(sni):
    name = sni.encode()
    server_name = ext(0, (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name)
    groups = b"\x00\x1d\x00\x17\x00\x18"  # x25519, secp256r1, secp384r1
    supported_groups = ext(10, len(groups).to_bytes(2, "big") + groups)
    point_formats = ext(11, b"\x01\x00")
    sigalgs = bytes.fromhex("040305030603080408050806040105010601")
    signature_algorithms = ext(13, len(sigalgs).to_bytes(2, "big") + sigalgs)
    ems = ext(23, b"")
    reneg = ext(0xFF01, b"\x00")
    extensions = server_name + supported_groups + point_formats + signature_algorithms + ems + reneg
    suites = bytes.fromhex("c02cc02bcca9c030c02fcca8")  # ECDHE-{ECDSA,RSA} AES-GCM, ChaCha20
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x00"
        + len(suites).to_bytes(2, "big")
        + suites
        + b"\x02\x01\x00"  # compression methods: DEFLATE, null
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            raise SystemExit("connection closed after %d of %d bytes" % (len(buf), n))
        buf += c
    return buf


def probe(host, port, sni, mode):
    s = socket.create_connection((host, int(port)), timeout=10)
    if mode == "starttls":
        starttls(s)
    s.sendall(client_hello(sni))
    header = recv_exact(s, 5)
    payload = recv_exact(s, int.from_bytes(header[3:5], "big"))
    if header[0] == 0x15:
        raise SystemExit("server sent alert %s" % payload.hex())
    if header[0] != 0x16 or payload[0] != 0x02:
        raise SystemExit("expected a ServerHello, got record %02x: %s" % (header[0], payload[:8].hex()))
    sh = payload[4:]
    version = sh[0:2].hex()
    random = sh[2:34]
    sid_len = sh[34]
    cipher = sh[35 + sid_len : 37 + sid_len].hex()
    compression = sh[37 + sid_len]
    sentinel = "yes" if random[24:] == b"DOWNGRD\x01" else "no"
    print("version=%s cipher=%s compression=%d downgrade_sentinel=%s" % (version, cipher, compression, sentinel))
    s.close()


def tlv(buf, i):
    tag = buf[i]
    i += 1
    length = buf[i]
    i += 1
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[i : i + n], "big")
        i += n
    return tag, i, length


def der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def forge(src, dst):
    pem = open(src).read()
    m = re.search(r"-----BEGIN SSL SESSION PARAMETERS-----(.*?)-----END SSL SESSION PARAMETERS-----", pem, re.S)
    if not m:
        raise SystemExit("%s: no SSL SESSION PARAMETERS block" % src)
    der = base64.b64decode("".join(m.group(1).split()))
    tag, off, length = tlv(der, 0)
    if tag != 0x30:
        raise SystemExit("%s: not a DER SEQUENCE" % src)
    body = der[off : off + length]
    elems, i = [], 0
    while i < len(body):
        t, start, n = tlv(body, i)
        elems.append((t, body[i : start + n]))
        i = start + n
    # [15] EXPLICIT INTEGER 16384, in tag order among the context-specific fields.
    new = b"\xaf\x04\x02\x02\x40\x00"
    out, placed = [], False
    for t, raw in elems:
        if t == 0xAF:
            continue  # an existing max_early_data is replaced
        if not placed and (t & 0xC0) == 0x80 and (t & 0x1F) > 15:
            out.append(new)
            placed = True
        out.append(raw)
    if not placed:
        out.append(new)
    content = b"".join(out)
    der2 = b"\x30" + der_len(len(content)) + content
    with open(dst, "w") as f:
        f.write("-----BEGIN SSL SESSION PARAMETERS-----\n")
        f.write(base64.encodebytes(der2).decode())
        f.write("-----END SSL SESSION PARAMETERS-----\n")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "probe":
        probe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
    elif len(sys.argv) == 4 and sys.argv[1] == "forge-early-data":
        forge(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
PY

# --- the gateway -----------------------------------------------------------------------------
step "test PKI (throwaway CA, 7-day EC P-256 leaf for localhost and 127.0.0.1) and gateway config"
make_test_pki "$WORK/pki"
CA="$WORK/pki/ca.pem"
mapfile -t PORTS < <(free_ports 3)
[ "${#PORTS[@]}" -eq 3 ] || die "could not pick free ports"
TLS_PORT="${PORTS[0]}" STARTTLS_PORT="${PORTS[1]}" BACKEND_PORT="${PORTS[2]}"

(umask 077 && "$BIN" keys generate >"$WORK/k1.key" 2>>"$WORK/cli.log") || die "imapgate keys generate failed"
(umask 077 && random_secret >"$WORK/master.secret")
CONFIG="$WORK/imapgate.yaml"
cat >"$CONFIG" <<EOF
# imapgate TLS scan configuration, written by scripts/tls_scan.sh (throwaway).
# Default TLS settings (no tls.min_version): what an operator gets.
listeners:
  - { name: imaps, address: "$HOST:$TLS_PORT", tls: implicit }
  - { name: imap, address: "$HOST:$STARTTLS_PORT", tls: starttls }
tls:
  certificates:
    - cert_file: "$WORK/pki/server.pem"
      key_file: "$WORK/pki/server.key"
auth:
  users_file: "$WORK/users.yaml"
  secret_keys:
    - id: k1
      file: "$WORK/k1.key"
  active_key: k1
backends:                          # never contacted: nobody logs in during the scan
  - name: none-running
    address: "127.0.0.1:$BACKEND_PORT"
    tls: implicit
    ca_file: "$CA"
    server_name: localhost
    login: master_user
    master_user: gateway
    master_password_file: "$WORK/master.secret"
routes:
  default: none-running
logging:
  format: text
  level: info
EOF
"$BIN" check-config -c "$CONFIG" >>"$WORK/cli.log" 2>&1 ||
  die "imapgate check-config rejected the scan config: $(cat "$WORK/cli.log")"
"$BIN" users add scan@example.org -c "$CONFIG" >>"$WORK/cli.log" 2>&1 || die "imapgate users add failed"

step "starting imapgate (implicit TLS $HOST:$TLS_PORT, STARTTLS $HOST:$STARTTLS_PORT)"
"$BIN" run -c "$CONFIG" >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
for port in "$TLS_PORT" "$STARTTLS_PORT"; do
  wait_for_port "$HOST" "$port" 30 "$GATEWAY_PID" ||
    die "imapgate is not listening on $HOST:$port after 30 s (or it exited)"
done

# imap_capability PORT: the greeting and CAPABILITY line of a plain IMAP port, on one line each.
imap_capability() {
  local port="$1" greeting="" caps=""
  exec 3<>"/dev/tcp/$HOST/$port" || return 1
  IFS= read -r -t 5 greeting <&3 || true
  printf 'c1 CAPABILITY\r\n' >&3
  IFS= read -r -t 5 caps <&3 || true
  printf 'c2 LOGOUT\r\n' >&3 || true
  exec 3<&- 3>&-
  printf '%s\n%s\n' "${greeting%$'\r'}" "${caps%$'\r'}"
}
mapfile -t STARTTLS_BANNER < <(imap_capability "$STARTTLS_PORT")
[[ "${STARTTLS_BANNER[0]:-}" == "* OK"* ]] ||
  die "no IMAP greeting on the STARTTLS port (got '${STARTTLS_BANNER[0]:-}')"
log "STARTTLS port greets without a backend: ${STARTTLS_BANNER[0]}"
log "                                        ${STARTTLS_BANNER[1]:-}"

# --- sslscan and openssl checks --------------------------------------------------------------
# s_client NAME-OF-LISTENER-KIND PORT ARGS...: openssl s_client against the listener, stdin
# closed, bounded; prints its output.
s_client() {
  local kind="$1" port="$2"
  shift 2
  local extra=()
  [ "$kind" = starttls ] && extra=(-starttls imap)
  timeout 20 openssl s_client -connect "$HOST:$port" "${extra[@]}" -servername "$SERVER_NAME" \
    -CAfile "$CA" "$@" </dev/null 2>&1 || true
}

# negotiated KIND PORT ARGS...: "TLSv1.x SUITE" of a full handshake, or nothing.
negotiated() {
  s_client "$@" | sed -n 's/^New, \(TLSv1\.[23]\), Cipher is \(.*\)$/\1 \2/p' | head -n 1
}

# server_order KIND PORT PROTO SUITE...: the server's order of SUITEs, found by offering the
# remaining suites in the given order and taking the server's pick each time.
server_order() {
  local kind="$1" port="$2" proto="$3"
  shift 3
  local remaining=("$@") order=() pick list flag
  while [ "${#remaining[@]}" -gt 0 ]; do
    list="$(IFS=:; echo "${remaining[*]}")"
    if [ "$proto" = TLSv1.3 ]; then flag=(-tls1_3 -ciphersuites "$list"); else flag=(-tls1_2 -cipher "$list:@SECLEVEL=0"); fi
    pick="$(negotiated "$kind" "$port" "${flag[@]}")"
    pick="${pick#* }"
    local next=() hit=0 s
    for s in "${remaining[@]}"; do
      if [ "$s" = "$pick" ]; then hit=1; else next+=("$s"); fi
    done
    if [ "$hit" -ne 1 ]; then
      echo "ERROR(offered $list, got '${pick}')"
      return 0
    fi
    order+=("$pick")
    remaining=("${next[@]}")
  done
  echo "${order[*]}"
}

reverse_words() {
  local out=() w
  for w in "$@"; do out=("$w" "${out[@]}"); done
  echo "${out[*]}"
}

# scan_listener KIND PORT: every sslscan and openssl assertion for one listener.
scan_listener() {
  local kind="$1" port="$2" label out sslscan_args=(--no-colour)
  label="$kind listener $HOST:$port"
  [ "$kind" = starttls ] && sslscan_args+=(--starttls-imap)
  out="$WORK/sslscan-$kind.txt"
  step "sslscan ${sslscan_args[*]} $HOST:$port ($kind)"
  local t0=$SECONDS rc=0
  timeout 120 sslscan "${sslscan_args[@]}" "$HOST:$port" >"$out" 2>&1 || rc=$?
  log "  (sslscan took $((SECONDS - t0))s, exit $rc)"
  [ -z "$TESTSSL_OUT" ] || cp "$out" "$TESTSSL_OUT/sslscan-$kind.txt"
  if [ "$rc" -ne 0 ] || ! grep -q 'SSL/TLS Protocols:' "$out"; then
    check_fail "$label: sslscan did not complete (exit $rc): $(tail -n 5 "$out" | tr '\n' ' ')"
    return 0
  fi

  # Protocols.
  local proto want state
  for proto in SSLv2:disabled SSLv3:disabled TLSv1.0:disabled TLSv1.1:disabled TLSv1.2:enabled TLSv1.3:enabled; do
    want="${proto#*:}"
    state="$(awk -v p="${proto%%:*}" '$1 == p { print $2; exit }' "$out")"
    if [ "$state" = "$want" ]; then
      check_ok "$label: ${proto%%:*} $state"
    else
      check_fail "$label: ${proto%%:*} is '${state:-not reported}', expected $want"
    fi
  done

  # Accepted suites: TLS 1.2 or 1.3 only, forward secret, AEAD.
  local line n=0 bad=0 suite ver
  while IFS= read -r line; do
    n=$((n + 1))
    ver="$(awk '{ print $2 }' <<<"$line")"
    suite="$(awk '{ print $5 }' <<<"$line")"
    case "$ver" in
      TLSv1.3)
        [[ "$suite" =~ ^TLS_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)$ ]] || {
          bad=1
          check_fail "$label: accepted TLS 1.3 suite $suite is not AES-GCM or ChaCha20-Poly1305: $line"
        }
        ;;
      TLSv1.2)
        [[ "$suite" =~ ^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$ ]] || {
          bad=1
          check_fail "$label: accepted TLS 1.2 suite $suite is not ECDHE with AES-GCM or ChaCha20-Poly1305: $line"
        }
        ;;
      *)
        bad=1
        check_fail "$label: suite accepted over $ver: $line"
        ;;
    esac
  done < <(grep -E '^(Preferred|Accepted) ' "$out")
  if [ "$n" -eq 0 ]; then
    check_fail "$label: sslscan lists no accepted suite"
  elif [ "$bad" -eq 0 ]; then
    check_ok "$label: all $n accepted suites are TLS 1.3 or ECDHE, and AEAD"
  fi

  # Heartbleed and renegotiation.
  if grep -Ei 'vulnerable to heartbleed' "$out" | grep -vqi 'not vulnerable'; then
    check_fail "$label: $(grep -Ei 'vulnerable to heartbleed' "$out" | grep -vi 'not vulnerable' | head -n 1)"
  elif grep -qi 'not vulnerable to heartbleed' "$out"; then
    check_ok "$label: not vulnerable to heartbleed ($(grep -ci 'not vulnerable to heartbleed' "$out") protocol versions)"
  else
    check_fail "$label: sslscan reported nothing about heartbleed"
  fi
  if grep -qi 'Insecure session renegotiation supported' "$out"; then
    check_fail "$label: insecure session renegotiation supported"
  else
    check_ok "$label: $(grep -iE 'renegotiation (not )?supported' "$out" | head -n 1)"
  fi

  # Compression: sslscan first; Debian's is built without zlib, so also a raw ClientHello.
  if grep -qi 'Compression enabled' "$out"; then
    check_fail "$label: sslscan: TLS compression enabled"
  fi
  local probe
  probe="$(timeout 20 python3 "$WORK/tlsprobe.py" probe "$HOST" "$port" "$SERVER_NAME" "$kind" 2>&1)" || true
  if [[ "$probe" =~ compression=0 ]] && [[ "$probe" =~ version=0303 ]]; then
    check_ok "$label: TLS 1.2 ClientHello offering DEFLATE: null compression chosen ($probe)"
  else
    check_fail "$label: compression probe: $probe"
  fi
  if [[ "$probe" =~ downgrade_sentinel=yes ]]; then
    check_ok "$label: TLS 1.2 ServerHello carries the TLS 1.3 downgrade sentinel"
  else
    check_fail "$label: no TLS 1.3 downgrade sentinel in the TLS 1.2 ServerHello ($probe)"
  fi

  # Server cipher order, per protocol.
  local forward reverse suites
  for proto in TLSv1.2 TLSv1.3; do
    mapfile -t suites < <(grep -E "^(Preferred|Accepted) +$proto " "$out" | awk '{ print $5 }')
    if [ "${#suites[@]}" -lt 2 ]; then
      check_fail "$label: fewer than two $proto suites; cannot check the server's order"
      continue
    fi
    forward="$(server_order "$kind" "$port" "$proto" "${suites[@]}")"
    # shellcheck disable=SC2046 # word splitting intended: the suites
    reverse="$(server_order "$kind" "$port" "$proto" $(reverse_words "${suites[@]}"))"
    if [[ "$forward" == ERROR* ]] || [[ "$reverse" == ERROR* ]]; then
      check_fail "$label: $proto order probe failed: $forward / $reverse"
    elif [ "$forward" = "$reverse" ]; then
      check_ok "$label: $proto server order (same for both client orders): $forward"
    else
      check_fail "$label: $proto suite follows the client's order: offered in one order -> $forward; reversed -> $reverse"
    fi
  done

  # No 0-RTT: the ticket's max_early_data, then early data sent anyway.
  printf 'e1 NOOP\r\n' >"$WORK/early.txt"
  local sess="$WORK/sess-$kind.pem" forged="$WORK/sess-$kind-forged.pem" first second third st=()
  [ "$kind" = starttls ] && st=(-starttls imap)
  rm -f "$sess" "$forged"
  # The tickets (NewSessionTicket) are written when the handshake completes and leave with the
  # session's first reply: send a command, and keep stdin open for a moment.
  first="$( (printf 'n1 NOOP\r\n'; sleep 1) | timeout 20 openssl s_client -connect "$HOST:$port" \
    "${st[@]}" -servername "$SERVER_NAME" -CAfile "$CA" \
    -tls1_3 -sess_out "$sess" 2>&1 || true)"
  if [ ! -s "$sess" ]; then
    check_fail "$label: no TLS 1.3 session ticket received (cannot check 0-RTT): $(grep -E 'New,|error' <<<"$first" | head -n 2)"
    return 0
  fi
  local max_early
  max_early="$(openssl sess_id -in "$sess" -noout -text 2>/dev/null | sed -n 's/^ *Max Early Data: *//p' | head -n 1)"
  if [ "$max_early" = 0 ]; then
    check_ok "$label: TLS 1.3 ticket allows no early data (Max Early Data: 0)"
  else
    check_fail "$label: TLS 1.3 ticket allows early data (Max Early Data: ${max_early:-not reported})"
  fi
  second="$( (sleep 1) | timeout 20 openssl s_client -connect "$HOST:$port" \
    "${st[@]}" -servername "$SERVER_NAME" -CAfile "$CA" \
    -tls1_3 -sess_in "$sess" -early_data "$WORK/early.txt" 2>&1 || true)"
  if grep -qi 'Early data was accepted' <<<"$second"; then
    check_fail "$label: early data accepted with the server's own ticket"
  else
    check_ok "$label: resumption with the server's ticket: $(grep -E '^(New|Reused),' <<<"$second" | head -n 1 | cut -d, -f1); $(grep -i 'early data' <<<"$second" | head -n 1)"
  fi
  # A client that sends early data anyway: a fresh ticket with max_early_data forced up.
  rm -f "$sess"
  (printf 'n2 NOOP\r\n'; sleep 1) | timeout 20 openssl s_client -connect "$HOST:$port" \
    "${st[@]}" -servername "$SERVER_NAME" -CAfile "$CA" \
    -tls1_3 -sess_out "$sess" >/dev/null 2>&1 || true
  if [ ! -s "$sess" ] || ! python3 "$WORK/tlsprobe.py" forge-early-data "$sess" "$forged" 2>"$WORK/forge.err"; then
    check_fail "$label: could not make a session that sends early data: $(cat "$WORK/forge.err" 2>/dev/null)"
    return 0
  fi
  third="$( (sleep 1) | timeout 20 openssl s_client -connect "$HOST:$port" \
    "${st[@]}" -servername "$SERVER_NAME" -CAfile "$CA" \
    -tls1_3 -sess_in "$forged" -early_data "$WORK/early.txt" 2>&1 || true)"
  if grep -qi 'Early data was accepted' <<<"$third" || grep -q '^e1 ' <<<"$third"; then
    check_fail "$label: 0-RTT: early data accepted: $(grep -iE 'early data|^e1 ' <<<"$third" | tr '\n' ' ')"
  elif grep -q '^Reused,' <<<"$third" && grep -qi 'Early data was rejected' <<<"$third"; then
    check_ok "$label: client sending 0-RTT data anyway: session resumed, early data rejected"
  else
    check_fail "$label: 0-RTT attempt inconclusive (expected 'Reused' and 'Early data was rejected'): $(grep -iE '^(New|Reused),|early data|error' <<<"$third" | tr '\n' ' ')"
  fi

  # ALPN (ALPACA): imap accepted, only-other protocols refused.
  local alpn
  alpn="$(s_client "$kind" "$port" -alpn imap)"
  if grep -q '^ALPN protocol: imap' <<<"$alpn"; then
    check_ok "$label: ALPN imap accepted"
  else
    check_fail "$label: ALPN imap not negotiated: $(grep -E 'ALPN|error' <<<"$alpn" | head -n 2 | tr '\n' ' ')"
  fi
  alpn="$(s_client "$kind" "$port" -alpn h2,http/1.1)"
  if grep -qi 'no application protocol' <<<"$alpn"; then
    check_ok "$label: ALPN h2,http/1.1 refused (no_application_protocol)"
  else
    check_fail "$label: a client offering only ALPN h2,http/1.1 was not refused: $(grep -E 'ALPN|New,|alert' <<<"$alpn" | head -n 3 | tr '\n' ' ')"
  fi

  # For the record: suites in the server's order as sslscan lists them, and the groups.
  log "  sslscan suites ($kind):"
  grep -E '^(Preferred|Accepted) ' "$out" | sed 's/^/    /' >&2
  log "  sslscan key exchange groups ($kind):"
  sed -n '/Server Key Exchange Group/,/^$/p' "$out" | grep -E '^TLSv' | sed 's/^/    /' >&2 || true
}

SSLSCAN_STARTED=$SECONDS
scan_listener implicit "$TLS_PORT"
scan_listener starttls "$STARTTLS_PORT"
SSLSCAN_SECONDS=$((SECONDS - SSLSCAN_STARTED))

# --- testssl.sh ------------------------------------------------------------------------------
TESTSSL_SECONDS=0
if [ -n "$TESTSSL_OUT" ]; then
  TESTSSL_STARTED=$SECONDS
  TESTSSL=(testssl)
  # testssl.sh (3.0.8) finds the STARTTLS capability with a case-sensitive "IMAP4rev1", as some
  # clients do; the gateway writes the RFC's spelling (src/imap/mod.rs), checked here.
  caps_line="${STARTTLS_BANNER[1]:-}"
  [[ "$caps_line" == *IMAP4rev1* ]] || check_fail "STARTTLS capability line lacks 'IMAP4rev1': $caps_line"
  TESTSSL_VERSION="$(testssl --version 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | sed -n 's/^ *testssl *\([0-9][^ ]*\) .*/\1/p' | head -n 1)"
  log "testssl.sh ${TESTSSL_VERSION:-unknown}"

  run_testssl() {
    local kind="$1" port="$2" rc=0 extra=()
    [ "$kind" = starttls ] && extra=(--starttls imap)
    rm -f "$TESTSSL_OUT/testssl-$kind.log" "$TESTSSL_OUT/testssl-$kind.json" "$TESTSSL_OUT/testssl-$kind.stdout"
    step "testssl ${extra[*]:+${extra[*]} }$SERVER_NAME:$port ($kind)"
    local t0=$SECONDS
    # --ip: no name resolution; --nodns none: no DNS at all (no CAA, no rDNS); no --phone-out:
    # no OCSP or CRL fetches. --warnings batch: never wait for a keypress.
    timeout 900 "${TESTSSL[@]}" --quiet --color 0 --warnings batch \
      --add-ca "$CA" --ip "$HOST" --nodns none \
      --connect-timeout 10 --openssl-timeout 10 \
      "${extra[@]}" \
      --logfile "$TESTSSL_OUT/testssl-$kind.log" --jsonfile "$TESTSSL_OUT/testssl-$kind.json" \
      "$SERVER_NAME:$port" >"$TESTSSL_OUT/testssl-$kind.stdout" 2>&1 </dev/null || rc=$?
    log "  (testssl took $((SECONDS - t0))s, exit $rc)"
    # testssl's exit status is a sum of its tests' returns; only its own errors (>= 242) and
    # our timeout (124) mean the run did not complete. The JSON is checked below as well.
    if [ "$rc" -eq 124 ] || [ "$rc" -ge 242 ]; then
      check_fail "testssl ($kind) did not complete (exit $rc): $(tail -n 5 "$TESTSSL_OUT/testssl-$kind.stdout" | tr '\n' ' ')"
    fi
  }
  run_testssl implicit "$TLS_PORT"
  run_testssl starttls "$STARTTLS_PORT"

  step "testssl findings (severity LOW or higher; fatal: MEDIUM+ outside certificate findings)"
  SUMMARY_RC=0
  python3 - "$TESTSSL_OUT" implicit starttls >"$TESTSSL_OUT/summary.txt" <<'PY' || SUMMARY_RC=$?
import json, os, re, sys
from collections import Counter

out_dir = sys.argv[1]
ORDER = ["DEBUG", "INFO", "OK", "LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"]
BAD = {"MEDIUM", "HIGH", "CRITICAL"}
PROTOCOL = {"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "NPN", "ALPN", "ALPN_HTTP2", "protocol_negotiated"}
VULN = {"heartbleed", "CCS", "ticketbleed", "ROBOT", "secure_renego", "secure_client_renego", "CRIME_TLS",
        "BREACH", "POODLE_SSL", "POODLE_TLS", "fallback_SCSV", "SWEET32", "FREAK", "DROWN", "DROWN_hint",
        "LOGJAM", "LOGJAM-common_primes", "BEAST", "LUCKY13", "RC4", "GREASE", "winshock", "opossum"}
# Must be present for a complete run.
REQUIRED = ["TLS1_2", "TLS1_3", "cipher_order", "heartbleed", "fallback_SCSV", "cert_trust", "cert_chain_of_trust"]


def category(i):
    if i in PROTOCOL:
        return "protocol"
    if i in VULN or i.startswith("BEAST_") or i.startswith("POODLE"):
        return "vulnerability"
    if re.match(r"^(cipher|cipherlist_|cipherorder_|PFS|FS|pre_128cipher)", i):
        return "cipher"
    if re.match(r"^(cert|OCSP|DNS_CAArecord|certificate_transparency|intermediate_cert)", i):
        return "certificate"
    if i.startswith("clientsimulation-") or i in {"service", "scanTime", "engine_problem", "TLS_extensions",
                                                  "TLS_session_ticket", "SSL_sessionID_support",
                                                  "sessionresumption_ticket", "sessionresumption_ID",
                                                  "TLS_timestamp", "optimal_proto"}:
        return "other"
    return "unclassified"


fatal = []
for kind in sys.argv[2:]:
    path = os.path.join(out_dir, "testssl-%s.json" % kind)
    try:
        findings = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        fatal.append("%s: cannot read %s: %s" % (kind, path, e))
        continue
    counts = Counter(f["severity"] for f in findings)
    ids = {f["id"] for f in findings}
    print("== %s: %d findings; %s" % (kind, len(findings),
          ", ".join("%s %d" % (s, counts[s]) for s in ORDER if counts[s])))
    for r in REQUIRED:
        if r not in ids:
            fatal.append("%s: no '%s' finding: the scan did not complete" % (kind, r))
    for f in findings:
        sev, i, text = f["severity"], f["id"], f["finding"]
        cat = category(i)
        if i == "scanTime" and "interrupt" in text.lower():
            fatal.append("%s: scan interrupted" % kind)
        if i in ("cert_trust", "cert_chain_of_trust") and sev != "OK":
            fatal.append("%s: %s is %s (%s): the test CA or name setup is wrong" % (kind, i, sev, text))
        if sev in ("LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"):
            print("  %-8s %-13s %-28s %s" % (sev, cat, i, text))
        # WARN: testssl could not run that check. Fatal where the finding matters here; in
        # "other" and "certificate" it is listed only (e.g. engine_problem: no GOST engine in the
        # local OpenSSL; sessionresumption_ticket: openssl s_client can exit before the TLS 1.3
        # ticket arrives, a race in the check itself).
        if sev == "FATAL" or (sev == "WARN" and cat not in ("other", "certificate")):
            fatal.append("%s: testssl %s %s %s: %s" % (kind, sev, cat, i, text))
        if sev in BAD and cat not in ("certificate", "other"):
            fatal.append("%s: %s %s finding %s: %s" % (kind, sev, cat, i, text))
        if sev in BAD and cat == "other":
            fatal.append("%s: %s finding %s (not protocol/cipher/vulnerability, but not judged safe "
                         "either): %s" % (kind, sev, i, text))
if fatal:
    print("== FATAL")
    for x in fatal:
        print("  " + x)
    sys.exit(1)
print("== no MEDIUM or worse among protocol, cipher and vulnerability findings")
PY
  cat "$TESTSSL_OUT/summary.txt" >&2
  if [ "$SUMMARY_RC" -ne 0 ]; then
    while IFS= read -r line; do check_fail "testssl: ${line#  }"; done < <(sed -n '/^== FATAL/,$p' "$TESTSSL_OUT/summary.txt" | tail -n +2)
  fi
  TESTSSL_SECONDS=$((SECONDS - TESTSSL_STARTED))
fi

# --- verdict ---------------------------------------------------------------------------------
kill -0 "$GATEWAY_PID" 2>/dev/null || check_fail "imapgate exited during the scan"
if [ "${#FAILURES[@]}" -gt 0 ]; then
  printf '\nFAIL: scripts/tls_scan.sh: %d failed check(s) (%ds):\n' "${#FAILURES[@]}" "$((SECONDS - STARTED))" >&2
  printf '  - %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
TESTSSL_NOTE=""
[ -z "$TESTSSL_OUT" ] || TESTSSL_NOTE="; testssl.sh ${TESTSSL_SECONDS}s, results in $TESTSSL_OUT"
printf '\nPASS: scripts/tls_scan.sh: implicit TLS and STARTTLS listeners: TLS 1.2+ only, ECDHE/TLS 1.3 AEAD suites only, server cipher order, no compression, no heartbleed, no 0-RTT (sslscan + openssl %ds%s; total %ds)\n' \
  "$SSLSCAN_SECONDS" "$TESTSSL_NOTE" "$((SECONDS - STARTED))"
