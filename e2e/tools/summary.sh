#!/usr/bin/env bash
# Adds up cargo test's per-binary "test result:" lines into one closing line,
# "N passed, N failed, N skipped", so a long run ends with a single summary.
set -euo pipefail
log=${1:?usage: summary.sh CARGO_TEST_LOG}
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed;?$/) p += $i
         if ($(i+1) ~ /^failed;?$/) f += $i
         if ($(i+1) ~ /^ignored;?$/) s += $i
       }
     }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
