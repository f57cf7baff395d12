# kubemail developer entry points. The two that matter on a fresh machine:
#   make demo   build, bring up the local real cluster (see e2e/local-cluster), leave it running
#   make test   set up tools, start the local cluster, run every test, stop the cluster
# Built tools and the cargo target dir live outside the clone so every clone reuses them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
KUBEMAIL_CACHE ?= $(HOME)/.cache/kubemail
CARGO_TARGET_DIR ?= $(KUBEMAIL_CACHE)/target
export KUBEMAIL_CACHE CARGO_TARGET_DIR

.PHONY: setup build images demo test test-unit lint down status bench bench-operator fuzz hostile

setup: ## install Debian/Python peers and build the pinned Go tools (cached)
	e2e/tools/setup.sh

build:
	cargo build --workspace --bins

# OCI image archives of the operator and the SMTP node from one release build, without a
# container runtime: $(IMAGES_DIR)/operator.tar and smtp-node.tar, byte-identical for the same
# commit. The local cluster builds them too and runs its pods from them (e2e/images/README.md).
IMAGES_DIR ?= $(CARGO_TARGET_DIR)/oci-images
images:
	e2e/images/build.sh $(IMAGES_DIR)

demo: setup build ## bring the local cluster up, install kubemail, send a message; leave it running
	e2e/local-cluster up || { e2e/local-cluster down; exit 1; }
	e2e/demo/run.sh
	@echo
	@echo "local cluster is up:  . .kubemail-local/env   (stop it with: e2e/local-cluster down)"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Every test, against the real components; the cluster is stopped even when tests fail.
test: setup build
	e2e/local-cluster up || { e2e/local-cluster down; exit 1; }
	set +e; set -a; . .kubemail-local/env; set +a; \
	log=$$(mktemp -t kubemail-test.XXXXXX); \
	cargo test --workspace --no-fail-fast -- --test-threads=4 2>&1 | tee "$$log"; \
	rc=$${PIPESTATUS[0]}; \
	e2e/local-cluster down; \
	e2e/tools/summary.sh "$$log"; \
	rm -f "$$log"; \
	exit $$rc

# kubemail against Postfix on this machine, same run, alternating: BENCHMARKS.md and
# bench-results.json (about 26 minutes on two CPUs; BENCH_ARGS=--smoke for a short harness check).
bench: setup
	e2e/bench/run.sh $(BENCH_ARGS)

# The operator at scale on the local cluster: 500 MailDomains applied at once, time to all
# Ready, API requests, operator peak RSS and CPU; writes BENCHMARKS.md's "Operator at scale"
# section. BENCH_DOMAINS, BENCH_REPLICAS, BENCH_DKIM, BENCH_CONCURRENCY: see e2e/bench/operator.sh.
bench-operator: setup build
	e2e/local-cluster up || { e2e/local-cluster down; exit 1; }
	set +e; set -a; . .kubemail-local/env; set +a; \
	e2e/bench/operator.sh; rc=$$?; \
	e2e/local-cluster down; \
	exit $$rc

# Long fuzzing of the SMTP node's parsers with libFuzzer on stable Rust (smtp-node/fuzz):
# FUZZ_SECONDS per target (default 120), FUZZ_JOBS targets at once; prints the executions.
fuzz:
	e2e/hostile/fuzz.sh $(FUZZ_TARGETS)

# The hostile-input suite, long versions (HOSTILE_LONG=1): TLS scan, fault injection, abuse,
# fuzz short runs, and the cases that are known findings (ignored in `make test`). Ends with
# one line "N passed, N failed, N skipped".
hostile: setup build
	set +e; export PATH="$$(ls -d $(KUBEMAIL_CACHE)/tools/*/ 2>/dev/null | tr '\n' ':')$$PATH"; \
	HOSTILE_LONG=1 cargo test -p kubemail-e2e --no-fail-fast --test 'hostile_*' -- \
	  --include-ignored --nocapture --test-threads=1 2>&1 | tee "$(KUBEMAIL_CACHE)/last-hostile.log"; \
	rc=$${PIPESTATUS[0]}; \
	e2e/tools/summary.sh "$(KUBEMAIL_CACHE)/last-hostile.log"; \
	exit $$rc

test-unit:
	cargo test --workspace --lib

down:
	e2e/local-cluster down

status:
	e2e/local-cluster status
