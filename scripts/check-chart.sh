#!/usr/bin/env bash
# Checks the Helm chart in helm/imapgate: Chart.yaml, values.yaml against values.schema.json,
# template syntax and .Values references, and, when a renderer is available, the rendered
# manifests (see scripts/check_chart.py for the full list). Exits non-zero on any problem.
#
# Needs python3 (with venv) and PyPI for PyYAML and jsonschema, installed once into a venv.
#
# Environment:
#   IMAPGATE_CHART_VENV    where the venv lives (default: target/chart-venv)
#   IMAPGATE_CHART_RENDER  auto (default): render with `helm` if it is on PATH, else skip rendering
#                          helm: require the helm binary
#                          sdk:  install helm-python-sdk (Helm's own engine as a Python wheel,
#                                pinned by hash, linux x86_64 only) into the venv and render with it
#                          off:  static checks only
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IMAPGATE_CHART_VENV:-$repo/target/chart-venv}"
render="${IMAPGATE_CHART_RENDER:-auto}"

# The one helm-python-sdk artifact this script trusts (v0.2.2, Helm SDK v4.2.3, manylinux x86_64).
sdk_requirement='helm-python-sdk==0.2.2 --hash=sha256:28cc13abaf134c3a7e37f070c939be8d9cdc9825c3c8b8b2d35161073bcd4578'

log() { printf 'check-chart: %s\n' "$*" >&2; }
die() {
  printf 'check-chart: error: %s\n' "$*" >&2
  exit 1
}

case "$render" in
  auto | helm | sdk | off) ;;
  *) die "IMAPGATE_CHART_RENDER must be auto, helm, sdk or off (got '$render')" ;;
esac

command -v python3 >/dev/null 2>&1 || die "python3 is required"

# A venv of our own, so the check never depends on (or changes) the system's Python packages.
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    # Debian splits venv support out of python3.
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing python3-venv"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv" || die "could not create a venv in $venv"
    else
      die "python3 -m venv failed; install python3-venv"
    fi
  fi
fi
py="$venv/bin/python"

if ! "$py" -c 'import yaml, jsonschema' 2>/dev/null; then
  log "installing PyYAML and jsonschema into $venv"
  "$py" -m pip install --quiet --disable-pip-version-check 'PyYAML>=6,<7' 'jsonschema>=4.17,<5' \
    || die "pip could not install PyYAML and jsonschema (is PyPI reachable?)"
fi

args=(--render "$render")
case "$render" in
  sdk)
    [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "IMAPGATE_CHART_RENDER=sdk needs linux x86_64"
    if ! "$py" -c 'import helm_python' 2>/dev/null; then
      log "installing helm-python-sdk into $venv"
      req="$(mktemp)"
      trap 'rm -f "$req"' EXIT
      printf '%s\n' "$sdk_requirement" >"$req"
      "$py" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$req" \
        || die "pip could not install helm-python-sdk"
    fi
    ;;
  auto)
    # Only the helm binary in auto mode; the SDK is used when asked for.
    command -v helm >/dev/null 2>&1 && args=(--render helm) || args=(--render off)
    ;;
esac

"$py" "$repo/scripts/check_chart.py" --chart "$repo/helm/imapgate" \
  --example-config "$repo/config/imapgate.example.yaml" "${args[@]}"
