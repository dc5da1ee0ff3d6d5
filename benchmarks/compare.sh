#!/usr/bin/env bash
# The method comparison behind BENCHMARKS.md: every method, SplitFed with a trained body and both SFPrompt ablations on
# Fashion-MNIST with the real pre-trained ViT-S/14 from ../shared, 10 clients (5 a round), IID and
# Dirichlet(0.5), same data, partition and seed for every method; then writes BENCHMARKS.md.
#
#   bash benchmarks/compare.sh        # about an hour on two CPU cores
#   SHARED=/path/to/shared OUT=runs/compare ROUNDS=5 bash benchmarks/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/compare}
ROUNDS=${ROUNDS:-5}
common=(--dataset fashion-mnist --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --image-size 56 --clients 10 --clients-per-round 5 --train-samples 2500 --test-samples 1000
        --rounds "$ROUNDS" --target-accuracy 0.7 --no-progress)
methods=fl,fl-prompt,sl,sfl,sfl-train-body,sfprompt,sfprompt-no-local-loss,sfprompt-no-pruning

sfprompt compare "${common[@]}" --methods "$methods" --out "$OUT/iid"
sfprompt compare "${common[@]}" --methods "$methods" --alpha 0.5 --out "$OUT/dirichlet-0.5"
python benchmarks/write_benchmarks.py "$OUT" "bash benchmarks/compare.sh (ROUNDS=$ROUNDS)" > BENCHMARKS.md
