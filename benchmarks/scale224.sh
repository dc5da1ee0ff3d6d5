#!/usr/bin/env bash
# Evidence at a realistic size, for one GPU: ViT-S/14 at 224 px (a 16 x 16 grid of patches) with the real checkpoint,
# Fashion-MNIST (TRAIN training images, default 20,000; TEST test images, default 2,000), 100 clients, 10 a round,
# ROUNDS rounds (default 20), IID and Dirichlet(0.5), for the linear probe, SFPrompt (its default recipe), SplitFed,
# SFPrompt with forward-only prompt updates (K = 1) and SplitFed with a trained body, each with every seed in SEEDS
# (default 0). The body runs in bfloat16 (--precision bf16, within a point of float32 in
# docs/benchmarks/precision.md), but for forward-only, which is measured in float32 only. Then
# docs/benchmarks/scale-224.md (DOC), naming the device.
#
#   DEADLINE=$(( $(date +%s) + 270 )) SIZE="--device cuda" bash benchmarks/scale224.sh   # again and again, each a lease
#
# With DEADLINE (seconds since the epoch) every run still going then stops and none starts after it; the next
# invocation continues each run after its last complete round (a checkpoint every round) and skips finished ones, so
# the benchmark advances in invocations of a few minutes. SHARED names a folder holding models/ and data/ as
# ../shared does (a copy carried to the GPU's machine), SIZE appends options to every run, ROWS, SETTINGS and SEEDS
# choose what runs; the document is written once every run has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/scale-224}
SEEDS=${SEEDS:-0}
SETTINGS=${SETTINGS:-iid dirichlet-0.5}
ROWS=${ROWS:-linear-probe sfprompt sfl sfprompt-forward-only sfl-train-body}
read -r -a size <<< "${SIZE:-}"

setting() {  # the data, federation and partition of a setting
  local common="--dataset fashion-mnist --data-dir $SHARED/data --weights $SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors
    --image-size 224 --train-samples ${TRAIN:-20000} --test-samples ${TEST:-2000} --clients 100 --clients-per-round 10
    --rounds ${ROUNDS:-20}"
  case "$1" in
    iid) echo "$common" ;;
    dirichlet-0.5) echo "$common --alpha 0.5" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

options() {  # the method and precision of a row
  case "$1" in
    linear-probe) echo "--method linear-probe --precision bf16" ;;
    sfprompt) echo "--method sfprompt --precision bf16" ;;
    sfl) echo "--method sfl --precision bf16" ;;
    sfprompt-forward-only) echo "--method sfprompt --prompt-updates forward-only --precision fp32" ;;
    sfl-train-body) echo "--method sfl --train-body --precision bf16" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

run_grid
DOC=${DOC:-docs/benchmarks/scale-224.md} grid_report scale224 "Fashion-MNIST through the real ViT-S/14 at 224 px (16 x 16 patches), ${TRAIN:-20000} training
and ${TEST:-2000} test images, 100 clients, 10 a round, ${ROUNDS:-20} rounds; the body in bfloat16 but for forward-only
(float32). Test accuracy, mean ± standard deviation over the seeds."
