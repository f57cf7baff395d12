# kubemail developer entry points. The two that matter on a fresh machine:
#   make demo   build, bring up the local real cluster (see e2e/local-cluster), leave it running
#   make test   set up tools, start the local cluster, run every test, stop the cluster
# Built tools and the cargo target dir live outside the clone so every clone reuses them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
KUBEMAIL_CACHE ?= $(HOME)/.cache/kubemail
CARGO_TARGET_DIR ?= $(KUBEMAIL_CACHE)/target
export KUBEMAIL_CACHE CARGO_TARGET_DIR

.PHONY: setup build demo test test-unit lint down status

setup: ## install Debian/Python peers and build the pinned Go tools (cached)
	e2e/tools/setup.sh

build:
	cargo build --workspace --bins

demo: setup build ## bring the local cluster up and leave it running
	e2e/local-cluster up || { e2e/local-cluster down; exit 1; }
	@echo
	@echo "local cluster is up:  . .kubemail-local/env   (stop it with: e2e/local-cluster down)"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Every test, against the real components; the cluster is stopped even when tests fail.
test: setup build
	e2e/local-cluster up || { e2e/local-cluster down; exit 1; }
	set +e; set -a; . .kubemail-local/env; set +a; \
	cargo test --workspace --no-fail-fast -- --test-threads=4 2>&1 | tee "$(KUBEMAIL_CACHE)/last-test.log"; \
	rc=$${PIPESTATUS[0]}; \
	e2e/local-cluster down; \
	e2e/tools/summary.sh "$(KUBEMAIL_CACHE)/last-test.log"; \
	exit $$rc

test-unit:
	cargo test --workspace --lib

down:
	e2e/local-cluster down

status:
	e2e/local-cluster status
