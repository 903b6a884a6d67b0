#!/usr/bin/env bash
# Runs the fuzz targets, one after another, each for SECONDS (default 600), on stable Rust
# without a sanitizer (`-s none`); `FUZZ_ASAN=1` uses AddressSanitizer via RUSTC_BOOTSTRAP=1.
#   fuzz/run.sh [--smoke] [SECONDS] [TARGET...]
# --smoke: 10 s per target, the check scripts/test.sh runs (not logged). New inputs go to fuzz/corpus/TARGET
# (not committed; the committed seeds are in fuzz/seeds/TARGET). A crash stops the run with
# the reproducer in fuzz/artifacts/TARGET/ and a non-zero status. Each finished run appends a
# line to fuzz/runs.log: date, target, seconds, executions, corpus size.
set -euo pipefail
cd "$(dirname "$0")"
seconds=600
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  seconds=10
  smoke=1
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list)
fi
sanitizer=(-s none)
if [[ "${FUZZ_ASAN:-0}" == 1 ]]; then
  export RUSTC_BOOTSTRAP=1
  sanitizer=(-s address)
fi
cargo fuzz build "${sanitizer[@]}"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="$(mktemp)"
  start=$(date +%s)
  # -rss_limit_mb: a target that needs more than 2 GiB for one input is a finding.
  if ! cargo fuzz run "${sanitizer[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $t FAILED (reproducer in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  took=$(($(date +%s) - start))
  line=$(printf '%s %s %ss %s execs, corpus %s%s' "$(date -u +%FT%TZ)" "$t" "$took" \
    "${execs:-?}" "$corpus" "$([[ ${FUZZ_ASAN:-0} == 1 ]] && echo ', asan')")
  echo "$line"
  [[ $smoke == 1 ]] || echo "$line" >>runs.log
  rm -f "$log"
done
