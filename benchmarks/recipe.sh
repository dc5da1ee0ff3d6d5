#!/usr/bin/env bash
# SFPrompt's recipe against the linear probe of the same frozen body, on the default job (mnist-5k, 4,000 / 1,000,
# 5 rounds) and on core.sh's Fashion-MNIST setting (5,000 / 2,000; 5 rounds IID, 10 under Dirichlet(0.5)), both
# partitions, 10 clients and 5 a round, each row with every seed in SEEDS; then docs/benchmarks/recipe.md.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh            # every row in every setting: days on two CPU cores
#   ROWS="paper default" SETTINGS=default-iid SEEDS=0 bash benchmarks/recipe.sh
#   JOBS=2 OMP_NUM_THREADS=1 SETTINGS="default-iid default-dirichlet-0.5" ROWS=default-prompts-50-keep-1.0 \
#     DOC=/tmp/keep.md bash benchmarks/recipe.sh                   # the headline's recipe, 3 seeds: 1.4 hours
#   TUNE=1 JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh     # the learning rates of the warm start (1 hour)
#   TUNE=headline JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/recipe.sh  # the prompts' rate and samples, 50 prompts (5 hours)
#   TUNE=headline TUNE_SEEDS="0 1 2" VARIANTS="refit-prompt-lr-0.005 refit-prompt-lr-0.01 refit-prompt-lr-0.02" ...  # 3 seeds
#
# The committed runs (results/recipe: not every row in every setting, nor every seed) took 19.9 lane-hours, about
# 10 hours at JOBS=2, tune/ and tune-headline/ aside; the report lists the rows each setting has. Each was run with
# ROWS and SETTINGS as above.
#
# Rows: the federated linear probe (`--method linear-probe`; linear-probe-all asking every client every round,
# whose fit is the central one), the paper's recipe (no probe round, Adam at 0.01 for prompts and tail, the
# paper's float32 wire format: --recipe paper), and SFPrompt's default (`sfprompt run` with no options: a first
# round in which every client sends its samples' features on the initial prompts once and the server fits the
# tail in closed form, then SFPrompt's rounds with the tail at the learning rate TUNE chose and the
# prompts at 0.01, then a refit round in which every client sends its features once more, with the trained prompts,
# and the classifier is fitted on them afresh; float32 on the wire with the shared rows once); default-prompts-50
# the default with 50 prompts, default-prompts-50-lr-0.03 that with the prompts at the rate TUNE=headline chose
# for it (--prompt-lr 0.03), default-prompts-50-keep-1.0 that with every sample in split training (--keep-ratio 1.0:
# twice the prompts' steps, TUNE=headline's refit-keep-1.0). The default-no-refit rows are the default as it was before it closed with a refit
# round (--refit-rounds 0, which trains the prompts at the tail's rate), alone and with 50 prompts; the
# default-probe-5 rows that as it was before its probe round asked every client (--probe-clients 5: round 1's
# draw), alone, with 50 prompts, in the paper's wire format (-float32: --wire-dtype float32 --shared-rows
# per-sample, as the default recipe was first measured) and in int8 (-int8: --wire-dtype int8, the shared rows
# once); the -float32 and -int8 probe rows the probe in those formats.
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
ROWS=${ROWS:-linear-probe linear-probe-all paper default default-prompts-50 default-prompts-50-lr-0.03 default-no-refit
  default-no-refit-prompts-50 default-probe-5 linear-probe-float32 default-probe-5-float32 linear-probe-int8
  default-probe-5-int8 default-probe-5-prompts-50 default-prompts-50-keep-1.0}
WARM_LR=0.0003  # the best final validation accuracy of TUNE's grid (docs/benchmarks/recipe-tuning.md): the default
FLOAT32="--wire-dtype float32 --shared-rows per-sample"  # the paper's wire format
NO_REFIT="--refit-rounds 0"  # no closing refit round, the prompts at WARM_LR: the default until it had one
PROBE_5="--probe-clients 5 $NO_REFIT"  # and the probe round asks round 1's draw of 5, the default until it asked all 10
read -r -a size <<< "${SIZE:-}"

every_client() {  # the clients of a run: SIZE's last --clients N (or --clients=N), else the default job's 10
  local clients=10 i
  for ((i = 0; i < ${#size[@]}; i++)); do
    case "${size[i]}" in
      --clients) if ((i + 1 < ${#size[@]})); then clients=${size[i + 1]}; fi ;;
      --clients=*) clients=${size[i]#--clients=} ;;
    esac
  done
  echo "$clients"
}

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

options() {  # the options of one row (forward_only.sh's linear-probe and backprop rows are linear-probe and
  # default-prompts-50 in default-iid and default-dirichlet-0.5: change those and its reference rows change too)
  case "$1" in
    linear-probe) echo "--method linear-probe" ;;
    # the probe asking every client every round: each sends once, in round 1, and the fit is the central one
    linear-probe-all) echo "--method linear-probe --clients-per-round $(every_client)" ;;
    paper) echo "--recipe paper" ;;
    # the defaults: a probe round of every client, SFPrompt's rounds (the tail at WARM_LR, the prompts at 0.01), a
    # closing refit round of every client
    default) echo "--method sfprompt" ;;
    default-prompts-50) echo "--method sfprompt --prompt-tokens 50" ;;  # central.sh's best setting for prompts
    # the prompts' rate TUNE=headline chose for the default recipe with 50 prompts (recipe-tuning-headline.md)
    default-prompts-50-lr-0.03) echo "--method sfprompt --prompt-tokens 50 --prompt-lr 0.03" ;;
    # every sample in split training (TUNE=headline's refit-keep-1.0): twice the prompts' steps
    default-prompts-50-keep-1.0) echo "--method sfprompt --prompt-tokens 50 --keep-ratio 1.0" ;;
    default-no-refit) echo "--method sfprompt $NO_REFIT" ;;
    default-no-refit-prompts-50) echo "--method sfprompt --prompt-tokens 50 $NO_REFIT" ;;
    default-probe-5) echo "--method sfprompt $PROBE_5" ;;
    linear-probe-float32) echo "--method linear-probe $FLOAT32" ;;
    default-probe-5-float32) echo "--method sfprompt $PROBE_5 $FLOAT32" ;;
    linear-probe-int8) echo "--method linear-probe --wire-dtype int8" ;;
    default-probe-5-int8) echo "--method sfprompt $PROBE_5 --wire-dtype int8" ;;
    default-probe-5-prompts-50) echo "--method sfprompt $PROBE_5 --prompt-tokens 50" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

headline_options() {  # the options of one TUNE=headline variant, beside the probe round and the tail at WARM_LR
  case "$1" in refit-*) ;; *) echo -n "$PROBE_5 " ;; esac  # first with no refit round and round 1's 5 in the probe
  case "$1" in  # round, as the default was then
    prompt-lr-0.0003) echo "--prompt-lr $WARM_LR" ;;  # that default
    prompt-lr-0.001) echo "--prompt-lr 0.001" ;;
    prompt-lr-0.003) echo "--prompt-lr 0.003" ;;
    prompt-lr-0.01) echo "--prompt-lr 0.01" ;;
    keep-1.0) echo "--keep-ratio 1.0 --prompt-lr $WARM_LR" ;;  # every sample in split training: twice the steps
    keep-1.0-prompt-lr-0.001) echo "--keep-ratio 1.0 --prompt-lr 0.001" ;;
    # then the default recipe: the probe round of every client, and a refit round closing the run
    refit-prompt-lr-0.005) echo "--refit-rounds 1 --prompt-lr 0.005" ;;
    refit-prompt-lr-0.01) echo "--refit-rounds 1 --prompt-lr 0.01" ;;  # the default
    refit-prompt-lr-0.02) echo "--refit-rounds 1 --prompt-lr 0.02" ;;
    refit-prompt-lr-0.03) echo "--refit-rounds 1 --prompt-lr 0.03" ;;
    refit-prompt-lr-0.1) echo "--refit-rounds 1 --prompt-lr 0.1" ;;
    refit-keep-1.0) echo "--refit-rounds 1 --keep-ratio 1.0 --prompt-lr 0.01" ;;  # every sample: twice the prompts' steps
    refit-keep-1.0-prompt-lr-0.005) echo "--refit-rounds 1 --keep-ratio 1.0 --prompt-lr 0.005" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

tune_options() { echo "--lr ${1#lr-} --prompt-lr ${1#lr-}"; }  # a TUNE=1 variant: lr-RATE, the tail's and the prompts'
if [ "${TUNE:-}" = headline ]; then  # the headline setting (50 prompts): the prompts' rate and how many samples they see
  EVERY_VARIANT="prompt-lr-0.0003 prompt-lr-0.001 prompt-lr-0.003 prompt-lr-0.01 keep-1.0 keep-1.0-prompt-lr-0.001
    refit-prompt-lr-0.005 refit-prompt-lr-0.01 refit-prompt-lr-0.02 refit-prompt-lr-0.03 refit-prompt-lr-0.1
    refit-keep-1.0 refit-keep-1.0-prompt-lr-0.005"
  VARIANTS=${VARIANTS:-$EVERY_VARIANT}  # those to run; the report shows every variant that has run
  tune_grid "$OUT/tune-headline" "$VARIANTS" headline_options --prompt-tokens 50 --probe-rounds 1 --lr "$WARM_LR"
  TUNE_DOC=${TUNE_DOC:-docs/benchmarks/recipe-tuning-headline.md}
  {
    echo "$(command_header recipe TUNE=headline) The"
    echo "headline setting (the default job with 50 prompts), the default tail learning rate ($WARM_LR) after a"
    echo "probe round: the rows without refit- of round 1's 5 clients and with no refit round ($PROBE_5, the default"
    echo "then), the refit- rows of every client, closing with a refit round (--refit-rounds 1, the default now);"
    echo "prompt-lr-R rows train the prompts at R on the kept half (the default --keep-ratio 0.5), keep-1.0 rows on every"
    echo "sample (--keep-ratio 1.0; at the rate named, else the recipe's own: $WARM_LR without a refit round, 0.01"
    echo "with one); each run evaluated on 500 validation"
    echo "samples held out of the clients' data (the test set unread). The seeds column says which seeds a row's"
    echo "figures rest on (TUNE_SEEDS; seed 0 alone unless it says more)."
    echo
    tune_rows=(); for variant in $EVERY_VARIANT; do tune_rows+=("$OUT/tune-headline/$variant"); done
    tables_of "${tune_rows[@]}"  # each variant that has run, here or before
  } > "$TUNE_DOC"
  cat "$TUNE_DOC"
  exit 0
fi

if [ -n "${TUNE:-}" ]; then
  grid="lr-0.0001 lr-0.0003 lr-0.001 lr-0.003 lr-0.01"
  # shellcheck disable=SC2086
  TUNE_SEEDS=0 tune_grid "$OUT/tune" "$grid" tune_options --probe-rounds 1 $PROBE_5 $FLOAT32
  TUNE_DOC=${TUNE_DOC:-docs/benchmarks/recipe-tuning.md}
  {
    echo "$(command_header recipe TUNE=1) The probe warm start"
    echo "(--probe-rounds 1 $PROBE_5: round 1's draw, the default's until it asked all 10) on the default job, seed 0,"
    echo "with the tail's and the prompts' learning rate alike, each run evaluated on 500 validation samples held out of"
    echo "the clients' data (the test set unread): the rows' \"final acc.\" is what chooses. Each row is one seed: read the"
    echo "differences against the validation set's resolution."
    echo
    tune_rows=(); for lr in $grid; do tune_rows+=("$OUT/tune/$lr"); done
    tables_of "${tune_rows[@]}"
  } > "$TUNE_DOC"
  cat "$TUNE_DOC"
  exit 0
fi

if [ -z "${TABLE_ONLY:-}" ]; then
  for row in $ROWS; do  # SIZE's options come after a row's, so they would win
    [ "$row" = linear-probe-all ] || continue
    for option in "${size[@]}"; do
      if [[ "$option" == --clients-per-round || "$option" == --clients-per-round=* ]]; then
        echo "SIZE's --clients-per-round would override linear-probe-all's (every client): leave it out" >&2; exit 2
      fi
    done
  done
fi
run_grid  # (under TABLE_ONLY it checks the settings and rows and runs none)
DOC=${DOC:-docs/benchmarks/recipe.md}
{
  echo "$(command_header recipe) Test accuracy; mean ± standard deviation over the seeds. Rows: linear-probe is"
  echo "\`--method linear-probe\`, linear-probe-all the same, asking every client every round (\`--clients-per-round $(every_client)\`),"
  echo "default \`sfprompt run\` with no options (a probe round of all $(every_client) clients, SFPrompt's"
  echo "rounds, a refit round of all $(every_client)), paper \`--recipe paper\`, default-prompts-50 the default with 50 prompts (the"
  echo "headline setting's, docs/benchmarks/central.md), default-prompts-50-lr-0.03 that with the prompts at the rate"
  echo "TUNE=headline chose for it (\`--prompt-lr 0.03\`), default-prompts-50-keep-1.0 that with every sample in split"
  echo "training (\`--keep-ratio 1.0\`: twice the prompts' steps); the default-no-refit rows are the default as it was until it"
  echo "closed with a refit round (\`$NO_REFIT\`: the prompts at the tail's rate), alone and with 50 prompts; the"
  echo "default-probe-5 rows that as it was until its probe round asked every client (\`$PROBE_5\`: round 1's"
  echo "draw), alone and with 50 prompts; the -float32 rows are the probe and that default in the paper's wire format"
  echo "(every row with every sample), the -int8 rows with \`--wire-dtype int8\`."
  grid_tables
} > "$DOC"
cat "$DOC"
