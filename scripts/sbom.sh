#!/usr/bin/env bash
# A CycloneDX SBOM (JSON, spec 1.5) of the imapgate binary, from `cargo cyclonedx`: every crate
# compiled into it, build-time dependencies included and dev-dependencies not, each with its
# version, checksum, licence and package URL.
#
#   scripts/sbom.sh [--target TRIPLE] [OUTPUT_DIR]
#
# Writes OUTPUT_DIR/imapgate.cdx.json (default OUTPUT_DIR: target/sbom) for the host's target
# triple, or TRIPLE (the image's, e.g. aarch64-unknown-linux-gnu: crates that only some targets
# compile differ). Then checks what it wrote: valid JSON, bomFormat CycloneDX 1.5, the component
# described is imapgate, and rustls, tokio, aws-lc-rs and imap-codec are listed at the versions
# Cargo.lock pins (every listed crate must be in Cargo.lock); a bench-only dev-dependency is not.
#
# The timestamp is the last commit's (SOURCE_DATE_EPOCH, which cargo-cyclonedx honours), so two
# runs on one commit differ only in the random serial number. cargo-cyclonedx is installed with
# `cargo install --locked` (pinned version, about 2-3 minutes on two cores) when `cargo cyclonedx`
# is missing, else reused. docs/operations.md ("Build, sign and publish") attaches the result to
# the image with `cosign attest --type cyclonedx`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cyclonedx_version=0.5.9
target=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target)
      [ $# -ge 2 ] || {
        echo "sbom: --target needs a target triple" >&2
        exit 64
      }
      target="$2"
      shift 2
      ;;
    -h | --help)
      sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "sbom: unknown option $1" >&2
      exit 64
      ;;
    *)
      out="$1"
      shift
      ;;
  esac
done
out="${out:-$repo/target/sbom}"

log() { printf 'sbom: %s\n' "$*" >&2; }

if ! cargo cyclonedx --version >/dev/null 2>&1; then
  log "cargo-cyclonedx not found; installing it (cargo install --locked cargo-cyclonedx --version $cyclonedx_version)"
  cargo install --locked cargo-cyclonedx --version "$cyclonedx_version"
fi
command -v python3 >/dev/null 2>&1 || {
  log "python3 is required to check the SBOM"
  exit 1
}

if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git -C "$repo" rev-parse --verify -q HEAD >/dev/null; then
  SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct)"
  export SOURCE_DATE_EPOCH
fi

mkdir -p "$out"
# --describe binaries writes <binary>_bin.cdx.json beside Cargo.toml; it is moved from there.
generated="$repo/imapgate_bin.cdx.json"
trap 'rm -f "$generated"' EXIT
args=(--manifest-path "$repo/Cargo.toml" --format json --spec-version 1.5 --describe binaries -q)
if [ -n "$target" ]; then
  args+=(--target "$target")
fi
cargo cyclonedx "${args[@]}"
[ -s "$generated" ] || {
  log "cargo cyclonedx wrote no $generated"
  exit 1
}
mv "$generated" "$out/imapgate.cdx.json"
trap - EXIT

python3 - "$out/imapgate.cdx.json" "$repo/Cargo.lock" <<'EOF'
import json
import sys
import tomllib

sbom_path, lock_path = sys.argv[1], sys.argv[2]
problems = []
try:
    with open(sbom_path, encoding="utf-8") as f:
        bom = json.load(f)
except (OSError, json.JSONDecodeError) as err:
    sys.exit(f"sbom: {sbom_path} is not JSON: {err}")
with open(lock_path, "rb") as f:
    locked = {(p["name"], p["version"]) for p in tomllib.load(f).get("package", [])}

if bom.get("bomFormat") != "CycloneDX":
    problems.append(f"bomFormat is {bom.get('bomFormat')!r}, not 'CycloneDX'")
if bom.get("specVersion") != "1.5":
    problems.append(f"specVersion is {bom.get('specVersion')!r}, not '1.5'")
described = bom.get("metadata", {}).get("component", {})
if described.get("name") != "imapgate":
    problems.append(f"describes {described.get('name')!r}, not imapgate")
components = bom.get("components", [])
listed = {}
for c in components:
    name, version = c.get("name"), c.get("version")
    listed[name] = version
    if not c.get("purl", "").startswith("pkg:cargo/"):
        problems.append(f"{name} {version} has no pkg:cargo purl")
    if (name, version) not in locked:
        problems.append(f"{name} {version} is not in Cargo.lock")
for name in ("rustls", "tokio", "aws-lc-rs", "imap-codec"):
    if name not in listed:
        problems.append(f"{name} is missing")
    elif (name, listed[name]) not in locked:
        problems.append(f"{name} {listed[name]} is not the version Cargo.lock pins")
# A benchmark harness (dev-dependency only) is never part of the binary.
if "divan" in listed:
    problems.append("lists divan, a dev-dependency: the SBOM must describe the binary only")
if problems:
    sys.exit("sbom: " + sbom_path + ":\n  " + "\n  ".join(problems))
print(f"sbom: {sbom_path}: CycloneDX {bom['specVersion']}, imapgate {described.get('version')}, "
      f"{len(components)} components (rustls {listed['rustls']}, tokio {listed['tokio']})", file=sys.stderr)
EOF
