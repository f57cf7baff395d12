#!/usr/bin/env bash
# kubemail demo on the local real cluster (`make demo` runs it after `e2e/local-cluster up`):
# installs the chart with Helm, applies the demo MailDomain, waits until it is Ready, sends one
# message through the cluster (587, STARTTLS + AUTH as alice, with swaks) to carol@remote.test,
# shows that it arrived at mailpit DKIM-signed, and prints the trace and DNS records to look at.
# Builds nothing (make already did); safe to run again (helm upgrade --install, kubectl apply).
#   e2e/demo/run.sh            env: DEMO_NAMESPACE (default kubemail-demo), DEMO_RELEASE (kubemail)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
demo=$root/e2e/demo
env_file=$root/.kubemail-local/env
[ -f "$env_file" ] || { echo "demo: $env_file missing; run e2e/local-cluster up first" >&2; exit 1; }
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
ns=${DEMO_NAMESPACE:-kubemail-demo}
release=${DEMO_RELEASE:-kubemail}
md=example-test
# Every wait below is bounded; the first start of a node takes a few seconds.
wait_timeout=180s
for tool in helm kubectl swaks curl python3; do
  command -v "$tool" >/dev/null || { echo "demo: $tool not found on PATH (run make setup)" >&2; exit 1; }
done
step() { printf '\n==> %s\n' "$*"; }

step "namespace $ns"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl get namespace "$ns" --no-headers

step "CRDs (kubectl apply --server-side -f crds/; the local cluster's releases share them)"
kubectl apply --server-side --force-conflicts -f "$root/crds/" >/dev/null
kubectl wait --for=condition=Established -f "$root/crds/" --timeout="$wait_timeout" >/dev/null

step "helm upgrade --install $release charts/kubemail (local values from $env_file)"
values=$(mktemp)
trap 'rm -f "$values"' EXIT
KUBEMAIL_WATCH_NAMESPACE=$ns OTEL_ENDPOINT=$OTEL_EXPORTER_OTLP_ENDPOINT \
  "$demo/render-values.sh" "$env_file" > "$values"
# The operator watches only the demo namespace, so it never touches the tests' domains.
helm upgrade --install "$release" "$root/charts/kubemail" --namespace "$ns" -f "$values"
kubectl -n "$ns" rollout status "deployment/$release-operator" --timeout="$wait_timeout"

step "kubectl apply MailDomain $md + users Secret (alice / wonderland)"
mailpit_port=${MAILPIT_SMTP##*:}
sed "s/^\(      port: \)1025/\1$mailpit_port/" "$demo/maildomain.yaml" | kubectl -n "$ns" apply -f -
kubectl -n "$ns" wait "maildomain/$md" --for=condition=Ready --timeout="$wait_timeout"
kubectl -n "$ns" rollout status "deployment/$md" --timeout="$wait_timeout"
kubectl -n "$ns" get maildomain,pods -o wide

# The local cluster's pods share one network namespace, each on its own 127.1.x.y address:
# talk to the node by its pod IP (ClusterIPs are not routed here).
pod_ip=$(kubectl -n "$ns" get pods -l "app.kubernetes.io/instance=$md,app.kubernetes.io/name=kubemail-smtp-node" \
  --field-selector=status.phase=Running -o jsonpath='{.items[0].status.podIP}')
[ -n "$pod_ip" ] || { echo "demo: no running node pod for $md" >&2; exit 1; }

tag="demo-$(date +%s)-$$"
step "send a message: $pod_ip:2587, STARTTLS + AUTH PLAIN as alice@example.test -> carol@remote.test"
swaks --server "$pod_ip" --port 2587 --tls --auth PLAIN \
  --auth-user alice@example.test --auth-password wonderland \
  --from alice@example.test --to carol@remote.test \
  --header "Subject: kubemail demo $tag" --body "Hello from the kubemail demo ($tag)." \
  --hide-all --silent 1 >/dev/null || { echo "demo: swaks could not submit the message" >&2; exit 1; }
echo "accepted (250) by the node"

step "delivered to mailpit (the remote MX of remote.test)?"
id=""
for _ in $(seq 1 60); do
  id=$(curl -fsS "$MAILPIT_API/api/v1/search?query=subject:%22$tag%22" \
    | python3 -c 'import json,sys; m=json.load(sys.stdin)["messages"]; print(m[0]["ID"] if m else "")')
  [ -n "$id" ] && break
  sleep 1
done
[ -n "$id" ] || { echo "demo: the message did not arrive at mailpit within 60 s" >&2; exit 1; }
curl -fsS "$MAILPIT_API/api/v1/message/$id" \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print("Subject:", m["Subject"]); print("To:", ", ".join(a["Address"] for a in m["To"]))'
curl -fsS "$MAILPIT_API/api/v1/message/$id/headers" \
  | python3 -c '
import json, sys
for v in json.load(sys.stdin).get("Dkim-Signature", []):
    print("DKIM-Signature:", v[:150] + ("..." if len(v) > 150 else ""))'

step "trace"
# Our Received header carries the message's trace id: "... id <queue id> (trace <32 hex>) ...".
trace=$(curl -fsS "$MAILPIT_API/api/v1/message/$id/raw" | grep -o '(trace [0-9a-f]\{32\})' | head -1 | tr -d '()' | cut -d' ' -f2 || true)
if [ -n "$trace" ]; then
  echo "the message's trace (from its Received header): $JAEGER_API/trace/$trace"
  found=""
  for _ in $(seq 1 20); do   # spans are exported in batches: allow a few seconds
    if curl -fsS --max-time 5 "$JAEGER_API/api/traces/$trace" >/dev/null 2>&1; then found=1; break; fi
    sleep 1
  done
  if [ -n "$found" ]; then
    curl -fsS "$JAEGER_API/api/traces/$trace" | python3 -c '
import json, sys
spans = json.load(sys.stdin)["data"][0]["spans"]
names = sorted({s["operationName"] for s in spans})
print("  %d spans: %s" % (len(spans), ", ".join(names)))'
  else
    echo "  not in Jaeger yet; look again in a few seconds"
  fi
else
  echo "no trace id in the Received header"
fi
echo "all node traces: $JAEGER_API/search?service=kubemail-smtp-node; reconciles: $JAEGER_API/search?service=kubemail-operator"

step "DNS records to publish for example.test (status.dnsRecords)"
kubectl -n "$ns" get maildomain "$md" \
  -o jsonpath='{range .status.dnsRecords[*]}{.name}{"\t"}{.ttl}{"\tIN\t"}{.type}{"\t"}{.value}{"\n"}{end}' \
  | cut -c1-160

echo
echo "demo done: $md is Ready in namespace $ns; run e2e/demo/run.sh again any time."
echo "stop everything with: e2e/local-cluster down"
