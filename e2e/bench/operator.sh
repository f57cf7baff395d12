#!/usr/bin/env bash
# `make bench-operator`: the operator at scale on the local real cluster. Applies N MailDomains
# at once (default 500) to a fresh namespace watched by a release build of the operator, all
# attached to one MailPool (BENCH_MODE=pool, the default) or each with a Deployment of its own
# (BENCH_MODE=dedicated), and measures the time from the apply to all of them Ready, the
# operator's reconciles, the API requests the API server served meanwhile, the operator's peak
# RSS and CPU time, and (pool) the pool node's config reload time. Writes the section
# "Operator at scale" of BENCHMARKS.md (replacing the previous one; rows of the other mode
# are kept).
#
# Needs the local cluster up and its env loaded (the Makefile target brings it up and down
# under the cluster lock). Settings (environment):
#   BENCH_MODE=pool        pool: one MailPool (BENCH_POOL_REPLICAS=1 node) serves every domain;
#                          dedicated: each MailDomain has its own Deployment
#   BENCH_DOMAINS=500      MailDomains to apply
#   BENCH_REPLICAS=0       dedicated: node pods per MailDomain (0: the operator's own work
#                          only; each pod is an smtp-node process on this machine)
#   BENCH_DKIM=rsa         rsa (RSA-2048 only) or both (RSA-2048 + Ed25519)
#   BENCH_CONCURRENCY=8    the operator's --reconcile-concurrency
#   BENCH_TIMEOUT=600      seconds to wait for all Ready
#   BENCH_MARKDOWN=BENCHMARKS.md
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${KUBEMAIL_CACHE:-$HOME/.cache/kubemail}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
PATH="$(ls -d "$cache"/tools/*/ 2>/dev/null | tr '\n' ':')$PATH"
export PATH
: "${KUBECONFIG:?load the local cluster env first: set -a; . .kubemail-local/env; set +a}"
: "${NATS_URL:?}"
mode=${BENCH_MODE:-pool}
pool_replicas=${BENCH_POOL_REPLICAS:-1}
domains=${BENCH_DOMAINS:-500}
replicas=${BENCH_REPLICAS:-0}
dkim=${BENCH_DKIM:-rsa}
concurrency=${BENCH_CONCURRENCY:-8}
limit=${BENCH_TIMEOUT:-600}
markdown=${BENCH_MARKDOWN:-$root/BENCHMARKS.md}
case $mode in pool|dedicated) ;; *) echo "BENCH_MODE must be pool or dedicated" >&2; exit 2 ;; esac
case $dkim in
  rsa) algorithms='[rsa-sha256]' ;;
  both) algorithms='[rsa-sha256, ed25519-sha256]' ;;
  *) echo "BENCH_DKIM must be rsa or both" >&2; exit 2 ;;
esac

cd "$root"
cargo build --release -q -p kubemail-operator --bin kubemail-operator
operator=$CARGO_TARGET_DIR/release/kubemail-operator
cargo run -q -p kubemail-operator --bin crdgen -- --out-dir "$(mktemp -d)" >/dev/null
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null

work=$(mktemp -d -t kubemail-bench-operator.XXXXXX)
ns=kmbench-op-$(printf '%06x' $((RANDOM * RANDOM % 16777216)))
stream=KMBENCH_$(echo "$ns" | tr 'a-z-' 'A-Z_')
kubectl create namespace "$ns" >/dev/null
op_pid=
cleanup() {
  # The operator finalizes the domains while the namespace goes; then it stops.
  kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    kubectl get namespace "$ns" >/dev/null 2>&1 || break
    sleep 1
  done
  # Whatever the operator did not finalize in time is released, or the namespace never goes.
  kubectl get maildomains -n "$ns" -o name 2>/dev/null \
    | xargs -r -n 50 kubectl patch -n "$ns" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  if [ -n "$op_pid" ]; then kill "$op_pid" 2>/dev/null || true; wait "$op_pid" 2>/dev/null || true; fi
  echo "work directory (operator log): $work"
}
trap cleanup EXIT

RUST_LOG=warn,kubemail_operator::runtime=info KUBEMAIL_LOG_FORMAT=text "$operator" \
  --kubeconfig "$KUBECONFIG" --watch-namespaces "$ns" --namespace "$ns" \
  --identity bench --admin-address 127.0.0.1:0 --node-image kubemail/smtp-node:bench \
  --nats-url "$NATS_URL" --nats-stream "$stream" --nats-subject-prefix "kmbench.$ns" \
  --reconcile-concurrency "$concurrency" --node-bind-pod-ip \
  2> "$work/operator.log" &
op_pid=$!
admin=
for _ in $(seq 1 100); do
  admin=$(grep -o 'address=[0-9.:]*' "$work/operator.log" 2>/dev/null | head -1 | cut -d= -f2 || true)
  [ -n "$admin" ] && break
  sleep 0.2
done
[ -n "$admin" ] || { echo "the operator's admin endpoint did not come up" >&2; cat "$work/operator.log" >&2; exit 1; }
for _ in $(seq 1 150); do
  curl -fsS "http://$admin/metrics" 2>/dev/null | grep -q '^kubemail_operator_leader 1' && break
  sleep 0.2
done

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$op_pid/stat"; }
api_requests() {
  kubectl get --raw /metrics | awk '/^apiserver_request_total\{/ {s += $NF} END {printf "%d", s}'
}
metric() { curl -fsS "http://$admin/metrics" | awk -v m="$1" 'index($0, m) == 1 {s += $NF} END {printf "%d", s}'; }

if [ "$mode" = pool ]; then
  kubectl apply --server-side -f - >/dev/null <<YAML
apiVersion: kubemail.io/v1alpha1
kind: MailPool
metadata: { name: bench, namespace: $ns }
spec:
  hostname: mx.bench.test
  replicas: $pool_replicas
  service: { type: ClusterIP }
YAML
  for _ in $(seq 1 180); do
    r=$(kubectl get mailpool bench -n "$ns" -o jsonpath='{.status.readyReplicas}' 2>/dev/null || true)
    [ "${r:-0}" -ge 1 ] && break
    sleep 1
  done
  pool_ref="poolRef: { name: bench }"
  replicas=0
else
  pool_ref=""
fi
for i in $(seq 1 "$domains"); do
  cat <<YAML
---
apiVersion: kubemail.io/v1alpha1
kind: MailDomain
metadata: { name: d$i, namespace: $ns }
spec:
  domain: d$i.bench.test
  replicas: $replicas
  service: { type: ClusterIP }
  dkim: { algorithms: $algorithms }
  $pool_ref
YAML
done > "$work/domains.yaml"

cpu0=$(cpu_ticks)
api0=$(api_requests)
t0=$(date +%s.%N)
kubectl apply --server-side -f "$work/domains.yaml" >/dev/null
t_applied=$(date +%s.%N)
ready=0
while :; do
  ready=$(kubectl get maildomains -n "$ns" \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    | grep -c '^True$' || true)
  now=$(date +%s.%N)
  [ "$ready" -ge "$domains" ] && break
  if awk -v n="$now" -v t="$t0" -v l="$limit" 'BEGIN {exit !(n - t > l)}'; then
    echo "timed out: $ready of $domains Ready after ${limit}s" >&2
    break
  fi
  sleep 1
done
t1=$(date +%s.%N)
cpu1=$(cpu_ticks)
api1=$(api_requests)
hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$op_pid/status")
reconciles=$(metric 'kubemail_operator_reconciles_total{controller="maildomain"}')
pool_reconciles=$(metric 'kubemail_operator_reconciles_total{controller="mailpool"}')
failures=$(metric 'kubemail_operator_reconcile_failures_total{controller="maildomain"')

reload="—"
if [ "$mode" = pool ]; then
  # The pool node's own log (the local node agent keeps container logs per pod): its config
  # reloads while the domains attached, and the last one's time and domain count.
  log=$(ls -d "$root"/.kubemail-local/agent/pods/"${ns}"_mailpool-bench-*/smtp-node.log 2>/dev/null | head -1 || true)
  if [ -n "$log" ]; then
    reload=$(grep '"config reloaded"' "$log" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
fields = [r.get("fields", r) for r in rows]
if fields:
    last = fields[-1]
    worst = max(int(f.get("elapsed_ms", 0)) for f in fields)
    print("%d reloads; the last took %s ms for %s domains; the slowest %d ms" % (len(fields), last.get("elapsed_ms"), last.get("domains"), worst))
else:
    print("no reload logged")
' 2>/dev/null || echo "log unreadable")
  fi
fi
elapsed=$(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.1f", a - b}')
apply_s=$(awk -v a="$t_applied" -v b="$t0" 'BEGIN {printf "%.1f", a - b}')
cpu_s=$(awk -v a="$cpu1" -v b="$cpu0" -v t="$ticks" 'BEGIN {printf "%.1f", (a - b) / t}')
rss_mib=$(awk -v k="$hwm_kib" 'BEGIN {printf "%.0f", k / 1024}')
api=$((api1 - api0))
per_domain=$(awk -v a="$api" -v d="$domains" 'BEGIN {printf "%.1f", a / d}')
echo "$mode: $ready/$domains Ready in ${elapsed}s (apply ${apply_s}s); reconciles $reconciles (failures $failures); API requests $api ($per_domain per domain); operator CPU ${cpu_s}s, peak RSS ${rss_mib} MiB; node reload: $reload"

row="| $mode | $domains | $([ "$mode" = pool ] && echo "$pool_replicas (pool)" || echo "$replicas each") | $algorithms | $ready | ${elapsed} s | $reconciles + $pool_reconciles pool ($failures failed) | $api ($per_domain) | ${cpu_s} s | ${rss_mib} MiB | $reload |"
rows="$work/rows.md"
# Keep the other mode's row of an earlier run.
if [ -f "$markdown" ]; then
  grep -E '^\| (pool|dedicated) \|' "$markdown" | grep -v "^| $mode |" > "$rows" || true
fi
echo "$row" >> "$rows"
section="$work/section.md"
{
  echo "## Operator at scale"
  echo
  echo "Generated by \`make bench-operator\` (\`e2e/bench/operator.sh\`); last run $(date -u '+%Y-%m-%d %H:%M:%S UTC') (commit $(git rev-parse --short HEAD), release build of the operator), on the local real cluster of this machine ($(nproc) CPUs; kube-apiserver, etcd, kube-controller-manager, the node agent, NATS and the node pods share them with the operator)."
  echo
  echo "N MailDomains applied at once with one \`kubectl apply --server-side\` into a namespace the operator watches (\`--watch-namespaces\`, \`--reconcile-concurrency $concurrency\`), each with a ClusterIP Service, a new DKIM key and a certificate from the operator's CA. *pool*: all attached to one MailPool created beforehand (its pods are up before the clock starts). *dedicated*: each with its own Deployment of the given replicas. Clock: from the start of the apply until \`Ready=True\` on all of them (polled every second). API requests: the change of the API server's \`apiserver_request_total\` over the run (every client: the operator, the poll, the node agent, kube-controller-manager). Peak RSS: the operator's \`VmHWM\`; CPU: its \`utime + stime\`. Node reload: the pool node's own \`config reloaded\` log lines (time to load, validate and swap the domain table)."
  echo
  echo "| Mode | Domains | Node pods | DKIM | Ready | Time to all Ready | Reconciles | API requests (per domain) | Operator CPU | Operator peak RSS | Node config reload |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  cat "$rows"
  echo
  echo "Targets: 500 domains Ready in under 60 s; operator RSS under 128 MiB."
} > "$section"
if [ -f "$markdown" ] && grep -q '^## Operator at scale' "$markdown"; then
  awk '/^## Operator at scale/ {exit} {print}' "$markdown" > "$work/head.md"
else
  cp "$markdown" "$work/head.md" 2>/dev/null || : > "$work/head.md"
  echo >> "$work/head.md"
fi
cat "$work/head.md" "$section" > "$markdown"
echo "wrote the section to $markdown"
