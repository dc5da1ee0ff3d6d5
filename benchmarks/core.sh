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

options() {  # the options of one row: the paper's recipe (common's --recipe paper), changed in one thing
  case "$1" in
    iid) echo "--rounds 5" ;;
    dirichlet-0.5) echo "--rounds 10 --alpha 0.5" ;;
    iid-shared-local-classifier) echo "--rounds 5 --local-classifier shared" ;;
    iid-global-pruning) echo "--rounds 5 --no-prune-per-class" ;;
    iid-split-epochs-1) echo "--rounds 5 --split-epochs 1" ;;
    iid-sgd) echo "--rounds 5 --optimizer sgd --lr 0.01 --prompt-lr 0.01" ;;
    iid-keep-all) echo "--rounds 5 --keep-ratio 1" ;;  # no pruning: twice the bytes and server FLOPs
    iid-prune-easiest) echo "--rounds 5 --prune-keep easiest" ;;
    iid-prune-middle) echo "--rounds 5 --prune-keep middle" ;;
    iid-prune-random) echo "--rounds 5 --prune-keep random" ;;
    iid-prune-received) echo "--rounds 5 --prune-scores received" ;;  # scored before the self-update
    dirichlet-0.5-prune-by-size) echo "--rounds 10 --alpha 0.5 --prune-keep by-size" ;;  # IID clients are all one size
    dirichlet-0.5-prune-random) echo "--rounds 10 --alpha 0.5 --prune-keep random" ;;
    dirichlet-0.5-keep-all) echo "--rounds 10 --alpha 0.5 --keep-ratio 1" ;;  # no pruning under skew
    iid-client-blocks-2) echo "--rounds 5 --client-blocks 2" ;;
    iid-mixed-budgets) echo "--rounds 5 --client-budgets 0.05,0.5,1.0" ;;  # heads of 0, 2 and 5 blocks
    iid-shared-once) echo "--rounds 5 --shared-rows once" ;;  # the wire format's rows (wire.sh)
    iid-wire-bfloat16) echo "--rounds 5 --shared-rows once --wire-dtype bfloat16" ;;
    iid-wire-float16) echo "--rounds 5 --shared-rows once --wire-dtype float16" ;;
    iid-wire-int8) echo "--rounds 5 --shared-rows once --wire-dtype int8" ;;
    dirichlet-0.5-wire-int8) echo "--rounds 10 --alpha 0.5 --shared-rows once --wire-dtype int8" ;;  # under skew
    iid-bf16) echo "--rounds 5 --precision bf16" ;;
    iid-fp16) echo "--rounds 5 --precision fp16" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

one_run() {  # one row and seed
  # shellcheck disable=SC2046
  run_once "$OUT/$1/seed-$2" "$OUT/$1/seed-$2.log" "${common[@]}" $(options "$1") "${size[@]}" --seed "$2"
}

for row in $ROWS; do
  options "$row" > /dev/null  # an unknown row stops the benchmark before anything runs
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
