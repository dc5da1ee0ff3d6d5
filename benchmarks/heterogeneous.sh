#!/usr/bin/env bash
# Heterogeneous clients on the benchmark setting: core.sh's iid row (Fashion-MNIST, the real ViT-S/14 at
# 56 px, 5,000 / 2,000 samples, 10 clients, 5 a round, 5 rounds), where every head ends after the
# embedding (iid), after 2 blocks (iid-client-blocks-2), or where each client draws a compute budget of
# 0.05, 0.5 or 1.0 GFLOP per training sample and keeps the deepest head it affords: 0, 2 or 5 blocks
# (iid-mixed-budgets). Every seed in SEEDS (default 0 1 2); runs core.sh has done (same OUT, default
# results/core) are reused. Writes docs/benchmarks/heterogeneous.md (REPORT names another file), which
# docs/benchmarks/index.md includes.
#
#   bash benchmarks/heterogeneous.sh      # about an hour on two CPU cores beyond core.sh's iid row
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
ROWS=${ROWS:-iid iid-client-blocks-2 iid-mixed-budgets}
report_notes() {  # the split points each seed drew
  for log in "$OUT"/iid-mixed-budgets/seed-*.log; do
    if [ -f "$log" ]; then echo "- $(basename "$log" .log): $(grep -o 'split points.*' "$log" | head -1)"; fi
  done
}
rows_report heterogeneous "core.sh's iid setting with every client's head ending after the embedding (iid: no client blocks), after 2 blocks (iid-client-blocks-2), or as deep as the client affords (iid-mixed-budgets: \`--client-budgets 0.05,0.5,1.0\`, GFLOP per training sample, one drawn per client by the seed: heads of 0, 2 and 5 blocks, costing 0.0072, 0.396 and 0.980 GFLOP a sample)."
