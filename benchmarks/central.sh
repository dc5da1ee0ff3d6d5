#!/usr/bin/env bash
# Where prompts could matter, before any federation: one client holding every training image (--clients 1), so
# nothing but the method differs. For each dataset (the default job's mnist-5k, and core.sh's Fashion-MNIST: 5,000
# train / 2,000 test) and image size (56 px: a 4 x 4 grid of patches; 112 px: 8 x 8), the linear probe of the
# frozen body (linear-probe, its features in float32 as the body computes them), shallow prompt tuning as SFPrompt
# trains it (fl-prompt: prompts and tail through the frozen model, 10 prompts and 50), and full fine-tuning (fl,
# with its tuned learning rates), each with every seed
# in SEEDS; then docs/benchmarks/central.md. Every epoch is a round (evaluated after each), so a fresh Adam starts
# each epoch, as each round of a federation starts one.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/central.sh               # 56 px: about 6 hours on two CPU cores
#   SIZES="112" JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/central.sh   # 112 px: about 7 hours
#   SIZES="56 112 224" JOBS=15 OMP_NUM_THREADS=1 SIZE="--device cuda" bash benchmarks/central.sh  # one GPU, 16 cores
#
# results/central was made the third way on an H200 (16 cores; about 2 minutes a run, bound by the CPU), in two
# calls of 5 and 4.5 minutes, with SHARED naming a copy of ../shared that carried the checkpoint rounded to
# float16 (widened back to float32 there) and the Fashion-MNIST images the three seeds draw; every run's
# config.json names its device and weights. Fashion-MNIST's prompt and fine-tuning rows at 56 and 224 px were
# not reached there; the 56 px ones ran since on two CPU cores at JOBS=2 (14 to 60 minutes a run by their rounds'
# seconds: full fine-tuning the least, 50 prompts the most; about 2.9 hours for the three rows), and the 224 px
# ones have not run.
#
# A finished run is not redone and an interrupted one continues after its last complete epoch (round), so it can be
# stopped and restarted at any time. DATASETS, SIZES, ROWS and SEEDS choose what runs; SIZE appends options to every
# run and DOC names the document written (a test runs it at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/central}
SEEDS=${SEEDS:-0 1 2}
DATASETS=${DATASETS:-mnist-5k fashion-mnist}
SIZES=${SIZES:-56}
ROWS=${ROWS:-probe prompts-10 prompts-50 full}
read -r -a size <<< "${SIZE:-}"

data() {  # the options of one dataset
  case "$1" in
    mnist-5k) echo "--dataset mnist-5k" ;;
    fashion-mnist) echo "--dataset fashion-mnist --data-dir $SHARED/data --weights $SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors --train-samples 5000 --test-samples 2000" ;;
    *) echo "unknown dataset $1" >&2; exit 2 ;;
  esac
}

epochs() {  # ROW PIXELS: epochs of a row at an image size (fewer at 112 px, where each costs four times as much)
  case "$1:$2" in
    probe:*) echo 1 ;;  # one pass of the data through the body: the fit is closed-form
    prompts-*:56) echo 8 ;;
    prompts-*:*) echo 4 ;;
    full:56) echo 5 ;;
    full:*) echo 3 ;;
  esac
}

options() {  # ROW: the method's options (fl with benchmarks/tuned.toml's learning rates)
  case "$1" in
    probe) echo "--method linear-probe --wire-dtype float32" ;;  # the features as the body computes them
    prompts-10) echo "--method fl-prompt --prompt-tokens 10" ;;
    prompts-50) echo "--method fl-prompt --prompt-tokens 50" ;;
    full) echo "--method fl --backbone-lr 3e-5 --lr 1e-3" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

one_run() {  # DATASET PIXELS ROW SEED
  local run=$OUT/$1-$2px/$3/seed-$4
  # shellcheck disable=SC2046
  run_once "$run" "$run.log" $(data "$1") $(options "$3") --image-size "$2" --clients 1 --clients-per-round 1 \
    --rounds "$(epochs "$3" "$2")" --split-epochs 1 --seed "$4" --no-progress "${size[@]}"
}

for dataset in $DATASETS; do
  data "$dataset" > /dev/null
  for pixels in $SIZES; do
    for row in $ROWS; do
      options "$row" > /dev/null  # an unknown row stops the benchmark before anything runs
      for seed in $SEEDS; do
        wait_for_lane "${JOBS:-1}"
        one_run "$dataset" "$pixels" "$row" "$seed" &
      done
    done
  done
done
wait_for_all
python benchmarks/central_table.py "$OUT" > "${DOC:-docs/benchmarks/central.md}"
cat "${DOC:-docs/benchmarks/central.md}"
