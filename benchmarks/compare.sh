#!/usr/bin/env bash
# The method comparison behind docs/benchmarks/index.md: every method, SplitFed with a trained body, both SFPrompt
# ablations and its two probe-round recipes (sfprompt-probe-warm, sfprompt-probe-refit) on
# the setting of benchmarks/compare.toml (Fashion-MNIST with the real pre-trained ViT-S/14 from ../shared, 10
# clients, 5 a round), IID and Dirichlet(0.5), same data, partition and seed for every method, each method with
# its tuned options from TUNED (default benchmarks/tuned.toml, written by benchmarks/tune.py) when that exists,
# then those of the TOML files in OPTIONS (they add to and override TUNED's: say, the rounds each method runs),
# with every seed in SEEDS (the mean and spread over them); then writes docs/benchmarks/index.md. JOBS (default 2) runs that
# many partitions at once, each with OMP_NUM_THREADS (default: the cores shared out among them). METHODS names the
# methods, SIZE appends options to every run and DOC names the document written (one not named index.md
# holds only this comparison: benchmarks/write_benchmarks.py); a test runs it at a tiny size.
#
#   bash benchmarks/compare.sh        # 66 runs, about 3 hours on two CPU cores
#   SHARED=/path/to/shared OUT=results/compare ROUNDS=5 SEEDS="0 1 2" JOBS=1 bash benchmarks/compare.sh
#   # the 10- and 20-round equal-cost columns, of the 8 methods it compared before the linear probe and the
#   # probe-round recipes (about 6 hours on two CPU cores; benchmarks/equal-cost.toml says why):
#   ROUNDS=20 OPTIONS=benchmarks/equal-cost.toml OUT=results/compare-long DOC=docs/benchmarks/comparison-long.md \
#     METHODS=fl,fl-prompt,sl,sfl,sfl-train-body,sfprompt,sfprompt-no-local-loss,sfprompt-no-pruning bash benchmarks/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/compare}
ROUNDS=${ROUNDS:-5}
SEEDS=${SEEDS:-0 1 2}
TUNED=${TUNED:-benchmarks/tuned.toml}
JOBS=${JOBS:-2}
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores > JOBS ? cores / JOBS : 1 ))}  # the same seed gives slightly
# different numbers with another thread count: docs/benchmarks/index.md's machine line names it
common=(--recipe paper --config benchmarks/compare.toml --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --rounds "$ROUNDS" --seeds "$(echo $SEEDS | tr ' ' ,)" --target-accuracy 0.7 --no-progress)
method_options=()
if [ -f "$TUNED" ]; then method_options+=("$TUNED"); else echo "no $TUNED: every method runs with the defaults" >&2; fi
read -r -a more_options <<< "${OPTIONS:-}"
method_options+=("${more_options[@]}")
if [ ${#method_options[@]} -gt 0 ]; then common+=(--method-options "${method_options[@]}"); fi
methods=${METHODS:-fl,fl-prompt,sl,sfl,sfl-train-body,sfprompt,sfprompt-no-local-loss,sfprompt-no-pruning,sfprompt-probe-warm,sfprompt-probe-refit,linear-probe}
read -r -a size <<< "${SIZE:-}"

mkdir -p "$OUT"
partition() {  # NAME [OPTIONS]: one partition's comparison and its table in $OUT/NAME, its log appended to $OUT/NAME.log
  local name=$1; shift
  sfprompt compare "${common[@]}" --methods "$methods" "$@" "${size[@]}" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1 \
    && cat "$OUT/$name/comparison.md" || { echo "$OUT/$name failed: see $OUT/$name.log" >&2; return 1; }
}
while read -r name options; do
  wait_for_lane "$JOBS"
  # shellcheck disable=SC2086
  partition "$name" $options &
done <<< "iid
dirichlet-0.5 --alpha 0.5"
wait_for_all
label="ROUNDS=$ROUNDS SEEDS=\"$SEEDS\"${METHODS:+ METHODS=$METHODS}${OPTIONS:+ OPTIONS=$OPTIONS}"
python benchmarks/write_benchmarks.py "$OUT" "bash benchmarks/compare.sh ($label)" "${DOC:-docs/benchmarks/index.md}"
