#!/usr/bin/env bash
# Forward-only prompt updates against backprop and the probe on the headline setting (the default job with 50
# prompts: mnist-5k, ViT-S/14 at 56 px, 10 clients, 5 a round, 5 rounds; docs/benchmarks/central.md), IID and
# Dirichlet(0.5), each row with every seed in SEEDS; then docs/benchmarks/forward-only.md with accuracy, bytes and
# server FLOPs per row. Rows: linear-probe; backprop (the default recipe, SFPrompt's gradient messages); and
# forward-only-K (--prompt-updates forward-only --directions K, the antithetic estimator at 1e-3, the defaults
# benchmarks/zo_quality.py chose), the same recipe otherwise; forward-only-4-label-epsilon-3 takes its steps at
# randomized-response labels (--label-epsilon 3), which the forward-only audit measured hides the labels
# (docs/benchmarks/forward-only-audit.md): what it costs.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/forward_only.sh      # about 19 hours on two CPU cores (estimated: a
#                                                                 # K = 16 run makes 33 body passes a batch, most of it)
#   ROWS="backprop forward-only-4" SETTINGS=iid SEEDS=0 bash benchmarks/forward_only.sh
#
# A finished run is not redone and an interrupted one continues after its last complete round. SIZE appends
# options to every run and DOC names the document written (a test runs it at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
OUT=${OUT:-results/forward-only}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=${SETTINGS:-iid dirichlet-0.5}
ROWS=${ROWS:-linear-probe backprop forward-only-1 forward-only-4 forward-only-16 forward-only-4-label-epsilon-3}
read -r -a size <<< "${SIZE:-}"

setting() {
  case "$1" in
    iid) echo "--prompt-tokens 50" ;;
    dirichlet-0.5) echo "--prompt-tokens 50 --alpha 0.5" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

# A row: linear-probe, backprop or forward-only-K; the last two with -label-epsilon-E (--label-epsilon E) after them.
options() {
  local row=${1%-label-epsilon-*} labels=""
  [ "$row" = "$1" ] || labels="--label-epsilon ${1##*-label-epsilon-}"
  case "$row" in
    linear-probe) [ -z "$labels" ] && echo "--method linear-probe" ;;
    backprop) echo "--method sfprompt $labels" ;;
    forward-only-*) echo "--method sfprompt --prompt-updates forward-only --directions ${row#forward-only-} $labels" ;;
    *) false ;;
  esac || { echo "unknown row $1" >&2; exit 2; }
}

run_grid
DOC=${DOC:-docs/benchmarks/forward-only.md}
{
  echo "$(command_header forward_only) Test accuracy, mean ± standard deviation over the seeds; bytes and FLOPs"
  echo "of the whole run. Rows: linear-probe, backprop (\`sfprompt run --prompt-tokens 50\`: the default recipe) and"
  echo "forward-only-K (the same with \`--prompt-updates forward-only --directions K\`; -label-epsilon-E: and"
  echo "\`--label-epsilon E\`)."
  grid_tables
} > "$DOC"
cat "$DOC"
