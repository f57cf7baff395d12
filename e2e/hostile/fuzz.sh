#!/usr/bin/env bash
# Long fuzzing runs (`make fuzz`): builds smtp-node/fuzz with libFuzzer's coverage
# instrumentation on stable Rust (SanitizerCoverage through -C passes / -C llvm-args, the
# flags cargo-fuzz passes; no sanitizer, since the node is safe Rust and -Zsanitizer needs
# nightly), then runs every target for FUZZ_SECONDS with its seed corpus and dictionary from
# e2e/hostile. Prints the executions per target and the total; exits 1 when a target crashed
# (the reproducer is in $FUZZ_WORK/<target>/artifacts: copy it to e2e/hostile/corpus/<target>/).
#
# Usage: e2e/hostile/fuzz.sh [target...]   (default: all)
# Env:   FUZZ_SECONDS (per target, default 120), FUZZ_JOBS (parallel targets, default 2),
#        FUZZ_WORK (default $KUBEMAIL_CACHE/fuzz), FUZZ_MAX_LEN (default 65536).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
CACHE=${KUBEMAIL_CACHE:-$HOME/.cache/kubemail}
SECONDS_PER_TARGET=${FUZZ_SECONDS:-120}
JOBS=${FUZZ_JOBS:-2}
WORK=${FUZZ_WORK:-$CACHE/fuzz}
MAX_LEN=${FUZZ_MAX_LEN:-65536}
ALL=(command data address auth reply config message)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")

host=$(rustc -vV | sed -n 's/^host: //p')
# The coverage flags of cargo-fuzz (LLVM >= 13). With --target, they apply to the fuzzed code
# only, not to build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=$CACHE/fuzz-target
echo "[fuzz] building smtp-node/fuzz for $host (instrumented, release; first build takes minutes)" >&2
cargo build --release --manifest-path "$root/smtp-node/fuzz/Cargo.toml" --target "$host" --bins >&2
bin=$CARGO_TARGET_DIR/$host/release

mkdir -p "$WORK"
run_one() {
  local t=$1 dir=$WORK/$1
  mkdir -p "$dir/corpus" "$dir/artifacts"
  # The seed corpus is read-only input; libFuzzer writes what it finds to $dir/corpus.
  local dict=()
  [ -f "$here/dict/$t.dict" ] && dict=("-dict=$here/dict/$t.dict")
  "$bin/$t" "$dir/corpus" "$here/corpus/$t" "${dict[@]}" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="$MAX_LEN" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$dir/artifacts/" >"$dir/log" 2>&1
}

pids=() names=()
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "[fuzz] no target $t" >&2; exit 2; }
  echo "[fuzz] $t: ${SECONDS_PER_TARGET}s (log: $WORK/$t/log)" >&2
  run_one "$t" & pids+=($!) names+=("$t")
  if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || true; done

total=0 crashed=0
for t in "${targets[@]}"; do
  log=$WORK/$t/log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  corpus=$(find "$WORK/$t/corpus" -type f | wc -l)
  if grep -qE '^==[0-9]+== ERROR|deadly signal|panicked at|Test unit written to' "$log"; then
    crashed=1
    echo "fuzz $t: CRASH after ${execs:-?} executions; reproducer: $(ls "$WORK/$t/artifacts" | head -3 | tr '\n' ' ')"
    grep -m3 -E 'panicked at|ERROR' "$log" || true
  else
    echo "fuzz $t: ${execs:-0} executions, coverage ${cov:-?} edges, corpus $corpus inputs, no crash"
  fi
  total=$((total + ${execs:-0}))
done
echo "fuzz total: $total executions over ${#targets[@]} targets (${SECONDS_PER_TARGET}s each)"
exit $crashed
