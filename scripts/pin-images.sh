#!/usr/bin/env bash
# Refreshes the base-image digests of deploy/Dockerfile from the registry.
#
#   scripts/pin-images.sh [--check] [DOCKERFILE]
#
# Every base image in the Dockerfile is written as <image>:<tag>@sha256:<digest> under a comment
# line "# tag: <image>:<tag>" (scripts/check_deploy.py insists on both). For each such tag this
# asks the registry for the digest the tag points to now (the multi-platform index, so one pin
# serves every architecture), then rewrites the digest and replaces the "# digest:" comment above
# it with where and when it was resolved. Nothing is written unless every tag resolved.
#
#   --check   change nothing; list the stale pins and exit 1 if there is one
#
# Registry clients, the first one found: crane (`crane digest`), docker buildx
# (`docker buildx imagetools inspect`), skopeo (`skopeo inspect --raw`, hashed). PIN_IMAGES_TOOL
# (crane, docker, skopeo or none) picks one. Registry credentials are the client's own
# (docker login, crane auth login, ...); this script never sees them.
#
# Exit status: 0 the pins are current (or were rewritten), 1 stale pins (--check), 2 no registry
# client, or the registry could not be reached or did not know a tag (nothing was changed),
# 64 usage or a Dockerfile without any "# tag:" line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
check=0
file=""
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    -h | --help)
      sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "pin-images: unknown option $arg" >&2
      exit 64
      ;;
    *) file="$arg" ;;
  esac
done
file="${file:-$repo/deploy/Dockerfile}"
[ -f "$file" ] || {
  echo "pin-images: no such file: $file" >&2
  exit 64
}

log() { printf 'pin-images: %s\n' "$*" >&2; }

# The registry client.
tool="${PIN_IMAGES_TOOL:-}"
if [ -z "$tool" ]; then
  if command -v crane >/dev/null 2>&1; then
    tool=crane
  elif command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
    tool=docker
  elif command -v skopeo >/dev/null 2>&1; then
    tool=skopeo
  else
    tool=none
  fi
fi
case "$tool" in
  crane | docker | skopeo) ;;
  none)
    log "no registry client (crane, docker buildx or skopeo) on PATH: cannot resolve tags; nothing changed"
    exit 2
    ;;
  *)
    log "PIN_IMAGES_TOOL must be crane, docker, skopeo or none (got '$tool')"
    exit 64
    ;;
esac

# The digest a tag points to now, or nothing.
resolve() {
  local ref="$1" out
  case "$tool" in
    crane) out="$(crane digest "$ref" 2>/dev/null)" || return 1 ;;
    docker) out="$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}' 2>/dev/null | tr -d '"[:space:]')" || return 1 ;;
    skopeo) out="sha256:$(skopeo inspect --raw "docker://$ref" 2>/dev/null | sha256sum | cut -d' ' -f1)" || return 1 ;;
  esac
  out="$(printf '%s' "$out" | tr -d '[:space:]')"
  [[ "$out" =~ ^sha256:[0-9a-f]{64}$ ]] || return 1
  # skopeo hashing nothing (no manifest came back) gives the digest of the empty string.
  [ "$out" != "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" ] || return 1
  printf '%s\n' "$out"
}

mapfile -t tags < <(sed -n 's/^# tag: *\([^[:space:]]*\)[[:space:]]*$/\1/p' "$file")
[ "${#tags[@]}" -gt 0 ] || {
  log "$file has no '# tag: <image>:<tag>' line"
  exit 64
}

declare -A old new
stale=0
for ref in "${tags[@]}"; do
  pattern="$(printf '%s' "$ref" | sed 's/[][\.*^$/]/\\&/g')@sha256:[0-9a-f]\{64\}"
  current="$({ grep -o "$pattern" "$file" || true; } | head -n 1 | sed 's/.*@//')"
  if [ -z "$current" ]; then
    log "$ref: the '# tag:' line is not followed by a reference $ref@sha256:<digest>"
    exit 64
  fi
  if ! digest="$(resolve "$ref")"; then
    log "$ref: $tool could not resolve it (registry unreachable, unknown tag or no access); nothing changed"
    exit 2
  fi
  old[$ref]="$current"
  new[$ref]="$digest"
  if [ "$current" = "$digest" ]; then
    log "$ref: current ($digest)"
  else
    log "$ref: $current -> $digest"
    stale=1
  fi
done

if [ "$check" -eq 1 ]; then
  exit "$stale"
fi
[ "$stale" -eq 1 ] || exit 0

today="$(date -u +%Y-%m-%d)"
tmp="$(mktemp "$file.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cp "$file" "$tmp"
for ref in "${tags[@]}"; do
  [ "${old[$ref]}" != "${new[$ref]}" ] || continue
  # In the comment block of this tag: drop the old "# digest:" line and its indented
  # continuation lines, write the new one just above the pinned line, and swap the digest.
  awk -v ref="$ref" -v old="${old[$ref]}" -v new="${new[$ref]}" \
    -v note="# digest: multi-platform index, resolved $today with $tool by scripts/pin-images.sh" '
    $0 == "# tag: " ref { inblock = 1; skipping = 0; print; next }
    inblock && /^# digest:/ { skipping = 1; next }
    inblock && skipping && /^#   / { next }
    inblock && /^#/ { skipping = 0; print; next }
    inblock {
      inblock = 0
      print note
      pinned = ref "@" old
      at = index($0, pinned)
      if (at > 0) { $0 = substr($0, 1, at - 1) ref "@" new substr($0, at + length(pinned)) }
      print
      next
    }
    { print }
  ' "$tmp" >"$tmp.next"
  mv "$tmp.next" "$tmp"
done
mv "$tmp" "$file"
trap - EXIT
log "rewrote $file; review the change (git diff) and build the image before committing it"
