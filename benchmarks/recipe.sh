#!/usr/bin/env bash
# SFPrompt's recipe against the linear probe of the same frozen body, on the default job (mnist-5k, 4,000 / 1,000,
# 5 rounds) and on core.sh's Fashion-MNIST setting (5,000 / 2,000; 5 rounds IID, 10 under Dirichlet(0.5)), both
# partitions, 10 clients and 5 a round, each row with every seed in SEEDS; then docs/benchmarks/recipe.md.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh            # about 4 hours on two CPU cores
#   ROWS="paper default" SETTINGS=default-iid SEEDS=0 bash benchmarks/recipe.sh
#   TUNE=1 JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh     # the learning rates of the warm start (1 hour)
#   TUNE=headline JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh  # the prompts' rate and samples, 50 prompts (3 hours)
#
# Rows: the federated linear probe (`--method linear-probe`), the paper's recipe (no probe round, Adam at 0.01 for
# prompts and tail, the paper's float32 wire format: --recipe paper), and SFPrompt's default (`sfprompt run` with
# no options: a first round that fits the tail in closed form on the initial prompts' features, then SFPrompt's
# rounds at the learning rate TUNE chose, float32 on the wire with the shared rows once); the -float32 rows are the
# probe and the default in the paper's wire format (--wire-dtype float32 --shared-rows per-sample), as the default
# recipe was first measured, and the -int8 rows the same in int8 (--wire-dtype int8, the shared rows once); the
# -probe-all rows open with a probe round that asks all 10 clients (--probe-clients 10) rather than one round's 5.
# With TUNE=1 it runs instead the grid of
# learning rates (tail and prompts alike) for the warm start on the default job, seed 0, each run evaluated on
# 500 validation samples held out of the clients' data (the test set unread), into OUT/tune, and writes
# docs/benchmarks/recipe-tuning.md (TUNE_DOC names another file).
#
# A finished run is not redone and an interrupted one continues after its last complete round. SIZE appends options
# to every run and DOC names the document written (a test runs it at a tiny size); TABLE_ONLY=1 runs nothing and
# writes the document from the runs there are (a row with none is left out).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/recipe}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=${SETTINGS:-default-iid default-dirichlet-0.5 fashion-iid fashion-dirichlet-0.5}
ROWS=${ROWS:-linear-probe paper default linear-probe-float32 default-float32 linear-probe-int8 default-int8
  default-prompts-50 default-probe-all default-prompts-50-probe-all}
WARM_LR=0.0003  # the best final validation accuracy of TUNE's grid (docs/benchmarks/recipe-tuning.md): the default
FLOAT32="--wire-dtype float32 --shared-rows per-sample"  # the paper's wire format
read -r -a size <<< "${SIZE:-}"

setting() {  # the data, partition and rounds of a setting
  local fashion="--dataset fashion-mnist --data-dir $SHARED/data --weights $SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors --train-samples 5000 --test-samples 2000"
  case "$1" in
    default-iid) echo "--rounds 5" ;;
    default-dirichlet-0.5) echo "--rounds 5 --alpha 0.5" ;;
    fashion-iid) echo "$fashion --rounds 5" ;;
    fashion-dirichlet-0.5) echo "$fashion --rounds 10 --alpha 0.5" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

options() {  # the options of one row
  case "$1" in
    linear-probe) echo "--method linear-probe" ;;
    paper) echo "--recipe paper" ;;
    default) echo "--method sfprompt" ;;  # the defaults: a probe round, then SFPrompt at WARM_LR
    linear-probe-float32) echo "--method linear-probe $FLOAT32" ;;
    default-float32) echo "--method sfprompt $FLOAT32" ;;
    linear-probe-int8) echo "--method linear-probe --wire-dtype int8" ;;
    default-int8) echo "--method sfprompt --wire-dtype int8" ;;
    default-prompts-50) echo "--method sfprompt --prompt-tokens 50" ;;  # central.sh's best setting for prompts
    default-probe-all) echo "--method sfprompt --probe-clients 10" ;;  # the probe round asks all 10 clients
    default-prompts-50-probe-all) echo "--method sfprompt --prompt-tokens 50 --probe-clients 10" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

headline_options() {  # the options of one TUNE=headline variant, beside the probe round and the tail at WARM_LR
  case "$1" in
    prompt-lr-0.0003) echo "--prompt-lr $WARM_LR" ;;  # the default recipe
    prompt-lr-0.001) echo "--prompt-lr 0.001" ;;
    prompt-lr-0.003) echo "--prompt-lr 0.003" ;;
    prompt-lr-0.01) echo "--prompt-lr 0.01" ;;
    keep-1.0) echo "--keep-ratio 1.0 --prompt-lr $WARM_LR" ;;  # every sample in split training: twice the prompt steps
    keep-1.0-prompt-lr-0.001) echo "--keep-ratio 1.0 --prompt-lr 0.001" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

if [ "${TUNE:-}" = headline ]; then  # the headline setting (50 prompts): the prompts' rate and how many samples they see
  VARIANTS=${VARIANTS:-prompt-lr-0.0003 prompt-lr-0.001 prompt-lr-0.003 prompt-lr-0.01 keep-1.0 keep-1.0-prompt-lr-0.001}
  for variant in $VARIANTS; do headline_options "$variant" > /dev/null; done
  for variant in $VARIANTS; do
    wait_for_lane "${JOBS:-1}"
    # shellcheck disable=SC2046
    run_once "$OUT/tune-headline/$variant/seed-0" "$OUT/tune-headline/$variant/seed-0.log" --prompt-tokens 50 \
      --probe-rounds 1 --lr "$WARM_LR" $(headline_options "$variant") --validation-samples 500 --no-progress "${size[@]}" &
  done
  wait_for_all
  TUNE_DOC=${TUNE_DOC:-docs/benchmarks/recipe-tuning-headline.md}
  {
    echo "Command: \`TUNE=headline bash benchmarks/recipe.sh\`; $(python benchmarks/write_benchmarks.py --machine). The"
    echo "headline setting (the default job with 50 prompts), seed 0: the default recipe's probe round and tail learning rate"
    echo "($WARM_LR); prompt-lr-R rows train the prompts at R on the kept half (the default --keep-ratio 0.5), keep-1.0 rows"
    echo "on every sample (--keep-ratio 1.0, at $WARM_LR or the rate named); each run evaluated on 500 validation samples"
    echo "held out of the clients' data (the test set unread). One seed a row."
    echo
    tune_rows=(); for variant in $VARIANTS; do tune_rows+=("$OUT/tune-headline/$variant"); done  # each ran above
    python benchmarks/table.py "${tune_rows[@]}"
  } > "$TUNE_DOC"
  cat "$TUNE_DOC"
  exit 0
fi

if [ -n "${TUNE:-}" ]; then
  grid=(0.0001 0.0003 0.001 0.003 0.01)
  for lr in "${grid[@]}"; do
    wait_for_lane "${JOBS:-1}"
    # shellcheck disable=SC2086
    run_once "$OUT/tune/lr-$lr/seed-0" "$OUT/tune/lr-$lr/seed-0.log" --probe-rounds 1 --lr "$lr" --prompt-lr "$lr" $FLOAT32 \
      --validation-samples 500 --no-progress "${size[@]}" &
  done
  wait_for_all
  TUNE_DOC=${TUNE_DOC:-docs/benchmarks/recipe-tuning.md}
  {
    echo "Command: \`TUNE=1 bash benchmarks/recipe.sh\`; $(python benchmarks/write_benchmarks.py --machine). The probe warm start"
    echo "(--probe-rounds 1) on the default job, seed 0, with the tail's and the prompts' learning rate alike, each run"
    echo "evaluated on 500 validation samples held out of the clients' data (the test set unread): the rows' \"final acc.\""
    echo "is what chooses. Each row is one seed: read the differences against the validation set's resolution."
    echo
    tune_rows=(); for lr in "${grid[@]}"; do tune_rows+=("$OUT/tune/lr-$lr"); done
    python benchmarks/table.py "${tune_rows[@]}"
  } > "$TUNE_DOC"
  cat "$TUNE_DOC"
  exit 0
fi

for setting in $SETTINGS; do setting "$setting" > /dev/null; done  # an unknown setting stops it, TABLE_ONLY too
if [ -z "${TABLE_ONLY:-}" ]; then run_grid; fi
DOC=${DOC:-docs/benchmarks/recipe.md}
{
  echo "$(command_header recipe) Test accuracy; mean ± standard deviation over the seeds. Rows: linear-probe is"
  echo "\`--method linear-probe\`, default \`sfprompt run\` with no options, paper \`--recipe paper\`; the -float32 rows"
  echo "are those two in the paper's wire format (every row with every sample), the -int8 rows with \`--wire-dtype int8\`,"
  echo "default-prompts-50 the default with 50 prompts (the headline setting's, docs/benchmarks/central.md); the -probe-all"
  echo "rows open with a probe round that asks all 10 clients (\`--probe-clients 10\`) rather than one round's 5."
  grid_tables
} > "$DOC"
cat "$DOC"
