#!/usr/bin/env bash
# Installs and builds everything kubemail's local cluster and tests need, once per machine:
#   - Go tools pinned in versions.env, built from the Go module proxy into
#     $KUBEMAIL_CACHE/tools/<name>-<version>/ (skipped when already there);
#   - Debian packages (swaks, postfix, openssl, ...);
#   - Python peers from requirements.txt into $KUBEMAIL_CACHE/venv-<hash>/.
# Usage: e2e/tools/setup.sh [--tools-only|--no-apt]
# Prints one line per step with its duration, and finally the tool paths in shell syntax.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
CACHE=${KUBEMAIL_CACHE:-$HOME/.cache/kubemail}
TOOLS=$CACHE/tools
SRC=$CACHE/src
mkdir -p "$TOOLS" "$SRC" "$CACHE/logs"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false

log() { printf '[setup] %s\n' "$*" >&2; }
timed() { # timed NAME CMD...: run, report duration; on failure show the log tail
  local name=$1; shift
  local t0=$SECONDS logf="$CACHE/logs/$name.log"
  log "building $name (log: $logf)"
  # A subshell outside any `if`, so `set -e` applies inside the build function.
  local rc=0
  set +e
  ( set -e; "$@" ) >"$logf" 2>&1
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    tail -n 40 "$logf" >&2
    log "FAILED: $name after $((SECONDS - t0))s"
    return 1
  fi
  log "built $name in $((SECONDS - t0))s"
}

build_kubernetes() {
  local out=$TOOLS/kubernetes-$KUBERNETES_VERSION work=$SRC/kubernetes-$KUBERNETES_VERSION
  local sver="v0.${KUBERNETES_VERSION#v1.}" minor
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  mkdir -p "$work" "$out.tmp"
  cd "$work"
  # The k8s.io/kubernetes module replaces its staging modules with ./staging paths that module
  # zips do not contain; a wrapper module replaces each with its published v0.X.Y instead.
  local dl modfile gover staging
  dl=$(cd "$(mktemp -d)" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION")
  modfile=$(printf '%s' "$dl" | sed -n 's/.*"GoMod": "\([^"]*\)".*/\1/p')
  gover=$(sed -n 's/^go \([0-9][0-9.]*\).*/\1/p' "$modfile")
  staging=$(sed -n 's#^[[:space:]]*\(replace[[:space:]]\{1,\}\)\{0,1\}\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\2#p' "$modfile" | sort -u)
  [ -n "$staging" ] || { echo "no staging replaces in $modfile"; return 1; }
  {
    printf 'module local.test/k8sbins\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$gover" "$KUBERNETES_VERSION"
    for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$sver"; done
    printf ')\n\ntool (\n'
    for c in kube-apiserver kube-controller-manager kubectl; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$c"; done
    printf ')\n'
  } > go.mod
  go mod tidy
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -trimpath -ldflags "$ld" -o "$out.tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
  "$out.tmp/kube-apiserver" --version
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_etcd() {
  local out=$TOOLS/etcd-$ETCD_VERSION work=$SRC/etcd-$ETCD_VERSION
  mkdir -p "$work" "$out.tmp" && cd "$work"
  # etcd's server module has ../api style replaces, so `go install` refuses it; a wrapper works.
  printf 'module local.test/etcdbin\n\ngo 1.24\n\ntool go.etcd.io/etcd/server/v3\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  "$out.tmp/etcd" --version
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_go_install() { # NAME VERSION PACKAGE
  local name=$1 ver=$2 pkg=$3 out=$TOOLS/$1-$2
  mkdir -p "$out.tmp"
  GOBIN=$out.tmp go install -trimpath -ldflags "-s -w" "$pkg@$ver"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_go_wrapper() { # NAME VERSION MODULE PACKAGE: for modules whose go.mod has replace directives
  local name=$1 ver=$2 mod=$3 pkg=$4 out=$TOOLS/$1-$2 work=$SRC/$1-$2
  mkdir -p "$work" "$out.tmp" && cd "$work"
  local dl modfile gover
  dl=$(cd "$(mktemp -d)" && go mod download -json "$mod@$ver")
  modfile=$(printf '%s' "$dl" | sed -n 's/.*"GoMod": "\([^"]*\)".*/\1/p')
  gover=$(sed -n 's/^go \([0-9][0-9.]*\).*/\1/p' "$modfile")
  {
    printf 'module local.test/%sbin\n\ngo %s\n\nrequire %s %s\n\ntool %s\n\n' "$name" "$gover" "$mod" "$ver" "$pkg"
    # Keep the upstream replaces that point at published versions (local paths cannot apply).
    grep -E '^replace .* => [^ ]+ v[0-9]' "$modfile" || true
  } > go.mod
  go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$out.tmp/$name" "$pkg"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# JSON schemas for kubeconform, without the internet: OUT/k8s/<group>/<kind>_<version>.json from
# the pinned Kubernetes' swagger.json, and OUT/crds/ with the third-party CRDs the chart renders
# objects of (the tests convert those together with kubemail's own CRDs).
kube_schemas_dir() {
  echo "$TOOLS/kube-schemas-$KUBERNETES_VERSION-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-cert-manager-$CERT_MANAGER_VERSION"
}
build_kube_schemas() {
  local out tmp dl
  out=$(kube_schemas_dir)
  tmp=$out.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/crds"
  module_dir() { (cd "$(mktemp -d)" && go mod download -json "$1") | sed -n 's/.*"Dir": "\([^"]*\)".*/\1/p'; }
  dl=$(module_dir "k8s.io/kubernetes@$KUBERNETES_VERSION")
  python3 "$here/kube-schemas.py" swagger "$dl/api/openapi-spec/swagger.json" "$tmp/k8s"
  dl=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
  for k in servicemonitors podmonitors prometheusrules; do
    cp "$dl/example/prometheus-operator-crd/monitoring.coreos.com_$k.yaml" "$tmp/crds/"
  done
  dl=$(module_dir "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION")
  for k in certificates issuers clusterissuers; do
    cp "$dl/deploy/crds/cert-manager.io_$k.yaml" "$tmp/crds/"
  done
  chmod -R u+w "$tmp"
  rm -rf "$out" && mv "$tmp" "$out"
}

have() { [ -d "$TOOLS/$1" ] && [ -n "$(ls -A "$TOOLS/$1" 2>/dev/null)" ]; }

build_tools() {
  local t0=$SECONDS
  have "kubernetes-$KUBERNETES_VERSION" || timed "kubernetes-$KUBERNETES_VERSION" build_kubernetes
  have "etcd-$ETCD_VERSION" || timed "etcd-$ETCD_VERSION" build_etcd
  have "nats-server-$NATS_SERVER_VERSION" || timed "nats-server-$NATS_SERVER_VERSION" \
    build_go_install nats-server "$NATS_SERVER_VERSION" github.com/nats-io/nats-server/v2
  have "mailpit-$MAILPIT_VERSION" || timed "mailpit-$MAILPIT_VERSION" \
    build_go_install mailpit "$MAILPIT_VERSION" github.com/axllent/mailpit
  have "helm-$HELM_VERSION" || timed "helm-$HELM_VERSION" \
    build_go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
  have "cyclonus-$CYCLONUS_VERSION" || timed "cyclonus-$CYCLONUS_VERSION" \
    build_go_install cyclonus "$CYCLONUS_VERSION" github.com/mattfenwick/cyclonus/cmd/cyclonus
  have "promtool-$PROMETHEUS_VERSION" || timed "promtool-$PROMETHEUS_VERSION" \
    build_go_install promtool "$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool
  have "kubeconform-$KUBECONFORM_VERSION" || timed "kubeconform-$KUBECONFORM_VERSION" \
    build_go_install kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
  have "$(basename "$(kube_schemas_dir)")" || timed kube-schemas build_kube_schemas
  have "jaeger-$JAEGER_VERSION" || timed "jaeger-$JAEGER_VERSION" \
    build_go_wrapper jaeger "$JAEGER_VERSION" github.com/jaegertracing/jaeger github.com/jaegertracing/jaeger/cmd/jaeger
  log "go tools ready in $((SECONDS - t0))s under $TOOLS"
}

# binutils (objcopy) packs the images, skopeo inspects them in the tests and pushes them;
# knot-dnssecutils (kzonesign) signs the DNSSEC test zones.
APT_PACKAGES=(swaks libnet-ssleay-perl libio-socket-ssl-perl postfix openssl python3-venv curl iproute2 procps knot knot-dnssecutils testssl.sh binutils skopeo)
install_apt() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "debian packages present"; return 0; }
  local t0=$SECONDS sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  log "installing debian packages: ${missing[*]}"
  $sudo apt-get update -qq >"$CACHE/logs/apt.log" 2>&1
  # postfix must not start a system MTA or ask questions; the tests run their own instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >>"$CACHE/logs/apt.log" 2>&1 || { tail -n 30 "$CACHE/logs/apt.log" >&2; return 1; }
  log "debian packages installed in $((SECONDS - t0))s"
}

install_python() {
  local hash venv
  hash=$(sha256sum "$here/requirements.txt" | cut -c1-12)
  venv=$CACHE/venv-$hash
  # The marker is written only after every package installed, so an interrupted install is
  # redone rather than leaving a venv without some of the peers.
  if [ ! -f "$venv/.kubemail-complete" ]; then
    local t0=$SECONDS
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$here/requirements.txt" >"$CACHE/logs/pip.log" 2>&1 \
      || { tail -n 30 "$CACHE/logs/pip.log" >&2; return 1; }
    touch "$venv/.kubemail-complete"
    log "python peers installed in $((SECONDS - t0))s"
  fi
  echo "$venv"
}

main() {
  local mode=${1:-all}
  case $mode in
    --tools-only) build_tools ;;
    --no-apt) build_tools; install_python >/dev/null ;;
    all) install_apt; build_tools; install_python >/dev/null ;;
    --print-env) ;;
    *) echo "usage: $0 [--tools-only|--no-apt|--print-env]" >&2; exit 2 ;;
  esac
  cat <<ENV
KUBERNETES_BIN=$TOOLS/kubernetes-$KUBERNETES_VERSION
ETCD_BIN=$TOOLS/etcd-$ETCD_VERSION
NATS_BIN=$TOOLS/nats-server-$NATS_SERVER_VERSION
MAILPIT_BIN=$TOOLS/mailpit-$MAILPIT_VERSION
HELM_BIN=$TOOLS/helm-$HELM_VERSION
JAEGER_BIN=$TOOLS/jaeger-$JAEGER_VERSION
CYCLONUS_BIN=$TOOLS/cyclonus-$CYCLONUS_VERSION
KUBECONFORM_BIN=$TOOLS/kubeconform-$KUBECONFORM_VERSION
PROMTOOL_BIN=$TOOLS/promtool-$PROMETHEUS_VERSION
KUBE_SCHEMAS=$(kube_schemas_dir)
PY_VENV=$CACHE/venv-$(sha256sum "$here/requirements.txt" | cut -c1-12)
ENV
}
main "$@"
