#!/usr/bin/env bash
# The wire format on the benchmark setting: core.sh's iid row (Fashion-MNIST, the real ViT-S/14 at 56 px,
# 5,000 / 2,000 samples, 10 clients, 5 a round, 5 rounds) as the paper sends it (iid: float32, every row of
# every sample), with the rows every image shares sent once a batch (iid-shared-once), and then in
# bfloat16, float16 and int8 with a scale per token (iid-wire-*); then int8 under Dirichlet(0.5), 10 rounds
# (dirichlet-0.5-wire-int8, against core.sh's dirichlet-0.5). Every seed in SEEDS (default 0 1 2);
# runs core.sh has done (same OUT, default results/core) are reused. Writes docs/benchmarks/wire.md (REPORT
# names another file), which docs/benchmarks/index.md includes.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/wire.sh   # about 1.5 hours on two CPU cores beyond core.sh's
#                                                      # iid and dirichlet-0.5 rows (its 15 committed runs took
#                                                      # 7 to 15 minutes each at one thread: 2.7 hours of a core)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
ROWS=${ROWS:-iid iid-shared-once iid-wire-bfloat16 iid-wire-float16 iid-wire-int8 dirichlet-0.5 dirichlet-0.5-wire-int8}
rows_report wire "core.sh's iid setting with \`--shared-rows once\` (iid-shared-once) and then \`--wire-dtype bfloat16\`, \`float16\` or \`int8\` as well (iid-wire-*); iid is the paper's format (float32, every row of every sample); dirichlet-0.5-wire-int8 is int8 (with \`--shared-rows once\`) under Dirichlet(0.5), 10 rounds, against core.sh's dirichlet-0.5. MB up and down count every message, the prompts' and tail's broadcasts and uploads (float32 in every row) included; wall seconds are not a speed benchmark (runs shared the cores)."
