#!/usr/bin/env bash
# The method comparison behind BENCHMARKS.md: every method, SplitFed with a trained body and both SFPrompt ablations on
# the setting of benchmarks/compare.toml (Fashion-MNIST with the real pre-trained ViT-S/14 from ../shared, 10
# clients, 5 a round), IID and Dirichlet(0.5), same data, partition and seed for every method, each method with
# its tuned options from TUNED (default benchmarks/tuned.toml, written by benchmarks/tune.py) when that exists,
# with every seed in SEEDS (the mean and spread over them); then writes BENCHMARKS.md.
#
#   bash benchmarks/compare.sh        # about an hour per seed on two CPU cores
#   SHARED=/path/to/shared OUT=results/compare ROUNDS=5 SEEDS="0 1 2" bash benchmarks/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/compare}
ROUNDS=${ROUNDS:-5}
SEEDS=${SEEDS:-0 1 2}
TUNED=${TUNED:-benchmarks/tuned.toml}
common=(--config benchmarks/compare.toml --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --rounds "$ROUNDS" --seeds "$(echo $SEEDS | tr ' ' ,)" --target-accuracy 0.7 --no-progress)
if [ -f "$TUNED" ]; then common+=(--method-options "$TUNED"); else echo "no $TUNED: every method runs with the defaults" >&2; fi
methods=fl,fl-prompt,sl,sfl,sfl-train-body,sfprompt,sfprompt-no-local-loss,sfprompt-no-pruning

sfprompt compare "${common[@]}" --methods "$methods" --out "$OUT/iid"
sfprompt compare "${common[@]}" --methods "$methods" --alpha 0.5 --out "$OUT/dirichlet-0.5"
python benchmarks/write_benchmarks.py "$OUT" "bash benchmarks/compare.sh (ROUNDS=$ROUNDS SEEDS=\"$SEEDS\")" > BENCHMARKS.md
