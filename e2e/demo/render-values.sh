#!/usr/bin/env bash
# Prints Helm values for the local real cluster from its env file (NATS_URL, DNS_SERVER,
# MAILPIT_SMTP), so ports that differ from values-local.yaml's defaults still work.
#   e2e/demo/render-values.sh [ENV_FILE]   (default: .kubemail-local/env; already-set vars win)
# Optional env: KUBEMAIL_WATCH_NAMESPACE (the operator reconciles only that namespace, so a demo
# and the tests never reconcile each other's domains), KUBEMAIL_NATS_STREAM and
# KUBEMAIL_NATS_SUBJECT_PREFIX (a queue of one's own), OTEL_ENDPOINT (traces of the operator
# and the nodes).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
env_file=${1:-$root/.kubemail-local/env}
if [ -z "${NATS_URL:-}" ] || [ -z "${DNS_SERVER:-}" ] || [ -z "${MAILPIT_SMTP:-}" ]; then
  [ -f "$env_file" ] || { echo "render-values.sh: $env_file missing; run e2e/local-cluster up" >&2; exit 1; }
  # shellcheck disable=SC1090
  . "$env_file"
fi
: "${NATS_URL:?}" "${DNS_SERVER:?}" "${MAILPIT_SMTP:?}"
mx_port=${MAILPIT_SMTP##*:}
# The local cluster's NATS is authenticated and serves TLS (e2e/local-cluster plays its
# administrator): hand the chart the account keys and the CA.
nats_security() {
  if [ -n "${NATS_ACCOUNT_DIR:-}" ] && [ -f "$NATS_ACCOUNT_DIR/account.pub" ]; then
    printf '  auth:\n    enabled: true\n    account: "%s"\n    signingKeySeed: "%s"\n' \
      "$(cat "$NATS_ACCOUNT_DIR/account.pub")" "$(cat "$NATS_ACCOUNT_DIR/signing-key.nk")"
  else
    printf '  auth:\n    enabled: false\n'
  fi
  if [ -n "${NATS_CA:-}" ] && [ -f "$NATS_CA" ]; then
    printf '  tls:\n    enabled: true\n    caCert: |\n'
    sed 's/^/      /' "$NATS_CA"
  else
    printf '  tls:\n    enabled: false\n'
  fi
}
cat <<YAML
# rendered by e2e/demo/render-values.sh from $env_file (see values-local.yaml for the why)
# Several releases (the demo, the tests) share the local cluster and only one could own the
# CRDs: the callers apply crds/ server-side before installing.
crds:
  enabled: false
nats:
  enabled: false
  url: "$NATS_URL"
$(nats_security)
node:
  bindPodIp: true
  config:
    dns:
      nameservers: ["$DNS_SERVER"]
    delivery:
      mxPort: $mx_port
      allowedNetworks: ["127.0.0.0/8"]
      retry:
        minBackoff: 5s
        maxBackoff: 30s
otel:
  endpoint: "${OTEL_ENDPOINT:-}"
operator:
  logFormat: text
YAML
env_entry() { printf '    - name: %s\n      value: "%s"\n' "$1" "$2"; }
extra=$(
  [ -z "${KUBEMAIL_WATCH_NAMESPACE:-}" ] || env_entry KUBEMAIL_WATCH_NAMESPACES "$KUBEMAIL_WATCH_NAMESPACE"
  [ -z "${KUBEMAIL_NATS_STREAM:-}" ] || env_entry KUBEMAIL_NATS_STREAM "$KUBEMAIL_NATS_STREAM"
  [ -z "${KUBEMAIL_NATS_SUBJECT_PREFIX:-}" ] || env_entry KUBEMAIL_NATS_SUBJECT_PREFIX "$KUBEMAIL_NATS_SUBJECT_PREFIX"
  true
)
if [ -n "$extra" ]; then printf '  extraEnv:\n%s\n' "$extra"; else echo '  extraEnv: []'; fi
