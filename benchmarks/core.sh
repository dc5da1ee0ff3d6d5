#!/usr/bin/env bash
# The measurements behind docs/results.md and docs/benchmarks/index.md's "Ablations": SFPrompt on Fashion-MNIST
# with the real pre-trained ViT-S/14 from ../shared (5,000 train / 2,000 test samples, 10 clients, 5 a
# round), IID for 5 rounds and Dirichlet(0.5) for 10, then the ablations behind the defaults (local
# classifier, per-class pruning, split epochs, optimiser), each with every seed in SEEDS; then the table of
# means and spreads (docs/benchmarks/ablations.md) and docs/benchmarks/index.md's "Ablations" section.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/core.sh   # about 1.5 hours on two CPU cores (5-8 minutes an
#                                                       # IID run, 10-15 a Dirichlet one)
#   SHARED=/path/to/shared OUT=results/core SEEDS="0 1 2" ROWS="iid iid-sgd" bash benchmarks/core.sh
#
# Rows iid-bf16 and iid-fp16 (the server body's precision) are not in the default ROWS: a CPU without
# bf16 arithmetic emulates it, many times slower; `bash benchmarks/precision.sh` runs them on a GPU.
# Rows iid-client-blocks-2 and iid-mixed-budgets (split points) are `bash benchmarks/heterogeneous.sh`'s, rows
# iid-shared-once, iid-wire-* and dirichlet-0.5-wire-int8 (the wire format) `bash benchmarks/wire.sh`'s, rows
# iid-prune-* and dirichlet-0.5-prune-* (which samples pruning keeps) `bash benchmarks/pruning.sh`'s.
#
# A finished run is not redone and an interrupted one continues after its last complete round, so the
# benchmark can be stopped and restarted at any time. JOBS runs that many at once (default 1). SIZE
# appends options to every run, TABLE and DOC name the table and the document written (DOC empty:
# only the table; a test runs the script at a tiny size), and HEADER opens the table (default: this
# command and the machine; empty: the table alone, as the scripts that report core.sh's rows want it).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/core}
SEEDS=${SEEDS:-0 1 2}
ROWS=${ROWS:-iid iid-shared-local-classifier iid-global-pruning iid-split-epochs-1 iid-sgd dirichlet-0.5}
read -r -a size <<< "${SIZE:-}"
common=(--recipe paper --dataset fashion-mnist --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --image-size 56 --clients 10 --clients-per-round 5 --train-samples 5000 --test-samples 2000
        --no-progress)

one_run() {  # one row and seed
  # shellcheck disable=SC2046
  run_once "$OUT/$1/seed-$2" "$OUT/$1/seed-$2.log" "${common[@]}" $(core_options "$1") "${size[@]}" --seed "$2"
}

for row in $ROWS; do
  core_options "$row" > /dev/null  # an unknown row stops the benchmark before anything runs
  for seed in $SEEDS; do
    wait_for_lane "${JOBS:-1}"
    one_run "$row" "$seed" &
  done
done
wait_for_all
mkdir -p docs/benchmarks
rows=(); for row in $ROWS; do rows+=("$OUT/$row"); done
TABLE=${TABLE:-docs/benchmarks/ablations.md}
HEADER=${HEADER-$(command_header core)}
{ if [ -n "$HEADER" ]; then echo "$HEADER"; echo; fi; python benchmarks/table.py "${rows[@]}"; } > "$TABLE"
cat "$TABLE"
DOC=${DOC-docs/benchmarks/index.md}
if [ -n "$DOC" ]; then python benchmarks/write_benchmarks.py --update-reports "$DOC" "$TABLE"; fi
