#!/usr/bin/env bash
# Re-runs the measurements quoted in README.md ("Measured"): SFPrompt on Fashion-MNIST with the real
# pre-trained ViT-S/14 from ../shared (5,000 train / 2,000 test samples, 10 clients, 5 a round),
# IID for 5 rounds and Dirichlet(0.5) for 10, then the ablations behind the defaults (local classifier,
# split epochs, per-class pruning, optimiser), and prints the table.
#
#   bash benchmarks/core.sh            # about 65 minutes on two CPU cores
#   SHARED=/path/to/shared OUT=runs/core bash benchmarks/core.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/core}
common=(--dataset fashion-mnist --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --image-size 56 --clients 10 --clients-per-round 5 --train-samples 5000 --test-samples 2000)

sfprompt run "${common[@]}" --rounds 5 --out "$OUT/iid"
sfprompt run "${common[@]}" --rounds 10 --alpha 0.5 --out "$OUT/dirichlet-0.5"
sfprompt run "${common[@]}" --rounds 5 --local-classifier shared --out "$OUT/iid-shared-local-classifier"
sfprompt run "${common[@]}" --rounds 5 --no-prune-per-class --out "$OUT/iid-global-pruning"
sfprompt run "${common[@]}" --rounds 5 --seed 1 --out "$OUT/iid-seed-1"
sfprompt run "${common[@]}" --rounds 5 --seed 1 --no-prune-per-class --out "$OUT/iid-global-pruning-seed-1"
sfprompt run "${common[@]}" --rounds 5 --split-epochs 1 --out "$OUT/iid-split-epochs-1"
sfprompt run "${common[@]}" --rounds 5 --split-epochs 1 --no-prune-per-class --out "$OUT/iid-split-epochs-1-global-pruning"
sfprompt run "${common[@]}" --rounds 5 --optimizer sgd --lr 0.01 --prompt-lr 0.01 --out "$OUT/iid-sgd"
python benchmarks/table.py "$OUT"/iid "$OUT"/dirichlet-0.5 "$OUT"/iid-*
