#!/usr/bin/env bash
# Which samples pruning keeps, on the benchmark setting (Fashion-MNIST, the real ViT-S/14 at 56 px, 5,000 /
# 2,000 samples, 10 clients, 5 a round): core.sh's iid row (the half that EL2N ranks hardest, the paper's
# choice) against the easiest half, a middle band, a random half (the control: nothing is scored), the
# hardest half scored before the self-update (iid-prune-*) and every sample kept (iid-keep-all: no pruning,
# twice the bytes), 5 rounds; then under Dirichlet(0.5), where clients hold different amounts of data,
# core.sh's dirichlet-0.5 row against a band chosen by each client's size (Sorscher et al. 2022), a
# random half and every sample kept (dirichlet-0.5-keep-all), 10 rounds. Every seed in SEEDS (default
# 0 1 2); runs core.sh has done (same OUT, default results/core) are reused. Writes
# docs/benchmarks/pruning.md (REPORT names another file), which docs/benchmarks/index.md includes.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/pruning.sh   # about 3 hours on two CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
ROWS=${ROWS:-iid iid-prune-easiest iid-prune-middle iid-prune-random iid-prune-received iid-keep-all
             dirichlet-0.5 dirichlet-0.5-prune-by-size dirichlet-0.5-prune-random dirichlet-0.5-keep-all}
rows_report pruning "core.sh's settings, each keeping half of every client's samples within each class (\`--keep-ratio 0.5\`): iid and dirichlet-0.5 keep the half that EL2N ranks hardest after the self-update (the defaults, the paper's choice); the other rows change \`--prune-keep\` (\`easiest\`, \`middle\`, \`random\`, \`by-size\`) or score before the self-update (\`--prune-scores received\`); those rows send the same bytes, only which samples are sent differs. iid-keep-all and dirichlet-0.5-keep-all keep every sample (\`--keep-ratio 1\`): no pruning."
