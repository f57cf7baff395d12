#!/usr/bin/env bash
# kubemail's OCI images without a container runtime (`make images`): one release build of the
# operator and the SMTP node, then `oci-image` (e2e/src/image_build) packs each binary with
# exactly the libraries it loads into an oci-archive tarball:
#   OUT_DIR/operator.tar    kubemail/operator:<version>-<rev>   and :<version>
#   OUT_DIR/smtp-node.tar   kubemail/smtp-node:<version>-<rev>  and :<version>
# Same commit, same bytes (SOURCE_DATE_EPOCH = commit time unless set). Incremental: cargo
# rebuilds only what changed and an archive whose image would not change is not rewritten.
#   e2e/images/build.sh [OUT_DIR]   default: $KUBEMAIL_IMAGES_DIR, else $CARGO_TARGET_DIR/oci-images
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kubemail/target}
out=${1:-${KUBEMAIL_IMAGES_DIR:-$CARGO_TARGET_DIR/oci-images}}
for tool in ldd objcopy git; do
  command -v "$tool" >/dev/null || { echo "images: $tool not found (libc-bin, binutils, git)" >&2; exit 1; }
done
cd "$root"
cargo build --release --locked -p kubemail-operator -p kubemail-smtp-node \
  --bin kubemail-operator --bin smtp-node
cargo build --locked -p kubemail-e2e --bin oci-image
"$CARGO_TARGET_DIR/debug/oci-image" --release-dir "$CARGO_TARGET_DIR/release" \
  --out-dir "$out" --source-dir "$root"
