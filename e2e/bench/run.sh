#!/usr/bin/env bash
# `make bench`: build kubemail (release) and the benchmark runner, then run every benchmark
# against kubemail and a private Postfix instance on this machine, alternating, and write
# BENCHMARKS.md and bench-results.json at the repository root. Needs root (Postfix's master
# runs as root) and the tools from `make setup`. Extra arguments go to the runner, e.g.
#   e2e/bench/run.sh --smoke                 short run that checks the harness
#   e2e/bench/run.sh --scenarios accept,tls  only some benchmarks
#   e2e/bench/run.sh --keep                  keep the work directory (logs, queues)
#   e2e/bench/run.sh --background-load 0     no loaded runs of accept and relay
#   e2e/bench/run.sh --no-cgroup-load        only the loaded run that shares CPUs per task
#   e2e/bench/run.sh --no-pin                generator and servers share every CPU
# See `bench --help` (target/release/bench) for the rest. By default the load generator and
# the servers under test are pinned to separate CPUs, and accept-and-queue and relay run a
# second time beside 2 busy loops (a load average around 2) and a third time with those loops
# in a cgroup of their own, each reported apart.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${KUBEMAIL_CACHE:-$HOME/.cache/kubemail}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
# nats-server from the pinned tools; smtp-sink and postfix from Debian.
PATH="$(ls -d "$cache"/tools/*/ 2>/dev/null | tr '\n' ':')/usr/sbin:$PATH"
export PATH
# 10,000 idle connections need as many descriptors in the generator and in smtp-node.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cd "$root"
cargo build --release -p kubemail-smtp-node -p kubemail-e2e --bin smtp-node --bin bench --bin loadgen
echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg) (representative runs need < 1.0; the runner waits up to --settle-secs, default 300, for it)"
# Defaults through the environment so that arguments can still override them.
export BENCH_SMTP_NODE=${BENCH_SMTP_NODE:-$CARGO_TARGET_DIR/release/smtp-node}
export BENCH_MARKDOWN=${BENCH_MARKDOWN:-$root/BENCHMARKS.md}
export BENCH_JSON=${BENCH_JSON:-$root/bench-results.json}
export BENCH_BACKGROUND_LOAD=${BENCH_BACKGROUND_LOAD:-2}
exec "$CARGO_TARGET_DIR/release/bench" "$@"
