#!/usr/bin/env bash
# Renders manifests/install.yaml (plain YAML for `kubectl apply -f`) from charts/kubemail with
# default values, and copies the generated CRDs into the chart (files/crds/, which
# templates/crds.yaml renders). Run after changing the chart or
# the CRD types (`cargo run -p kubemail-operator --bin crdgen -- --out-dir crds` first);
# e2e/tests/chart.rs fails when the committed files are stale.
#   e2e/tools/render-manifests.sh [OUT_FILE]    (default: manifests/install.yaml)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$root/manifests/install.yaml}
helm=${HELM:-$(command -v helm || true)}
if [ -z "$helm" ]; then
  eval "$("$root/e2e/tools/setup.sh" --print-env)"
  helm=$HELM_BIN/helm
fi
if [ "$out" = "$root/manifests/install.yaml" ]; then
  rm -f "$root"/charts/kubemail/files/crds/*.yaml
  cp "$root"/crds/*.yaml "$root/charts/kubemail/files/crds/"
fi
{
  echo "# kubemail install manifest, rendered from charts/kubemail (default values) by"
  echo "# e2e/tools/render-manifests.sh; do not edit. Apply with: kubectl apply --server-side -f install.yaml"
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: kubemail-system"
  echo "  labels:"
  echo "    pod-security.kubernetes.io/enforce: restricted"
  "$helm" template kubemail "$root/charts/kubemail" --namespace kubemail-system \
    --kube-version 1.36.3
} > "$out"
