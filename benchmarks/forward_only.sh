#!/usr/bin/env bash
# Forward-only prompt updates against backprop and the probe on the headline setting (the default job with 50
# prompts: mnist-5k, ViT-S/14 at 56 px, 10 clients, 5 a round, 5 rounds; docs/benchmarks/central.md), IID and
# Dirichlet(0.5), each row with every seed in SEEDS; then docs/benchmarks/forward-only.md with accuracy, bytes and
# server FLOPs per row, and each row against backprop, seed by seed, at equal bytes and at equal server FLOPs
# (benchmarks/equal_cost_table.py). Rows: linear-probe; backprop (the default recipe, SFPrompt's gradient messages);
# and forward-only-K (--prompt-updates forward-only --directions K, the antithetic estimator at 1e-3, the defaults
# benchmarks/zo_quality.py chose), the same recipe otherwise; forward-only-1-label-epsilon-3 takes its steps at
# randomized-response labels (--label-epsilon 3), which the forward-only audits measure at K = 1
# (docs/benchmarks/forward-only-audit.md, one round, and forward-only-audit-run.md, a whole run): what it costs;
# forward-only-1-one-sided takes the one-sided estimator at 1e-2 (--estimator one-sided --perturbation 0.01, where
# zo_quality.py found it ties the antithetic one at K = 1): one prompt set fewer a batch; forward-only-1-residual the
# residual estimator at 1e-2 (--estimator residual: one set a batch, its loss against the previous batch's), the
# cheapest forward-only step: no client FLOPs beyond backprop's. backprop-client-blocks-1 and
# forward-only-1-residual-client-blocks-1 are the same two with one client block (--client-blocks 1: the residual
# estimator is the one blocks take), each compared with the other.
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/forward_only.sh      # about 8 hours on two CPU cores (a run at one
#                                                                 # thread beside another: backprop and K = 1 14 to
#                                                                 # 29 minutes, K = 4 30 to 39, one-sided 16 to 25,
#                                                                 # residual 15 to 22; with a client block,
#                                                                 # backprop 16 to 19, residual 12 to 13)
#                                                                 # (K = 16, named in ROWS beside these rows: about
#                                                                 # 6 hours more, 33 body passes a batch against
#                                                                 # K = 4's 9 and K = 1's 3)
#   ROWS="backprop forward-only-4" SETTINGS=iid SEEDS=0 bash benchmarks/forward_only.sh
#   TUNE=1 JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/forward_only.sh  # the prompts' rate first (1.7 hours)
#
# With TUNE=1 it runs instead forward-only-4 in IID at each prompt learning rate of TUNE_RATES (default 0.0001 0.001
# 0.01: the default recipe gives forward-only steps backprop's rate, 0.01, under Adam, whose steps do not shrink with
# an estimate that is mostly noise), seed 0 (TUNE_SEEDS), each run evaluated on 500 validation samples held out of
# the clients' data (the test set unread), into OUT/tune, and writes docs/benchmarks/forward-only-tuning.md
# (TUNE_DOC names another file); the grid's backprop reference is recipe.sh's TUNE=headline refit-prompt-lr-0.01.
#
# The linear-probe and backprop rows are recipe.sh's linear-probe and default-prompts-50 runs (the same options):
# OUT/SETTING/ROW links to RECIPE_OUT/default-SETTING/ROW's (RECIPE_OUT defaults to recipe beside OUT), so a run
# either script made is not made again. A finished run is not redone and an interrupted one continues after its
# last complete round. SIZE appends options to every run and DOC names the document written (a test runs it at a
# tiny size); TABLE_ONLY=1 makes no training run and writes the document from the runs there are.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
OUT=${OUT:-results/forward-only}
RECIPE_OUT=${RECIPE_OUT:-$(dirname "$OUT")/recipe}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=${SETTINGS:-iid dirichlet-0.5}
ROWS=${ROWS:-linear-probe backprop forward-only-1 forward-only-4 forward-only-1-label-epsilon-3 \
  forward-only-1-one-sided forward-only-1-residual backprop-client-blocks-1 forward-only-1-residual-client-blocks-1}
read -r -a size <<< "${SIZE:-}"

setting() {  # recipe.sh's default-iid and default-dirichlet-0.5
  case "$1" in
    iid) echo "--rounds 5" ;;
    dirichlet-0.5) echo "--rounds 5 --alpha 0.5" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

# A row: linear-probe, backprop or forward-only-K; the last two with -label-epsilon-E (--label-epsilon E) or
# -client-blocks-B (--client-blocks B) after them.
options() {
  local row=${1%-label-epsilon-*} extra=""
  [ "$row" = "$1" ] || extra="--label-epsilon ${1##*-label-epsilon-}"
  if [ -z "$extra" ]; then row=${1%-client-blocks-*}; [ "$row" = "$1" ] || extra="--client-blocks ${1##*-client-blocks-}"; fi
  case "$row" in
    linear-probe) [ -z "$extra" ] && echo "--method linear-probe" ;;
    backprop) echo "--method sfprompt --prompt-tokens 50 $extra" ;;
    forward-only-*) echo "--method sfprompt --prompt-tokens 50 $(forward_only_options "$row") $extra" ;;
    *) false ;;
  esac || { echo "unknown row $1" >&2; exit 2; }
}

tune_options() { echo "--prompt-lr ${1#prompt-lr-}"; }  # a TUNE=1 variant: prompt-lr-RATE
if [ -n "${TUNE:-}" ]; then
  TUNE_RATES=${TUNE_RATES:-0.0001 0.001 0.01}
  # shellcheck disable=SC2046
  tune_grid "$OUT/tune" "$(printf 'prompt-lr-%s ' $TUNE_RATES)" tune_options $(setting iid) $(options forward-only-4)
  TUNE_DOC=${TUNE_DOC:-docs/benchmarks/forward-only-tuning.md}
  {
    command_header forward_only TUNE=1
    echo "forward-only-4 (\`--prompt-updates forward-only --directions 4\`) on the headline setting in IID, the default"
    echo "recipe otherwise, at each prompt learning rate (the row's name), each run evaluated on 500 validation samples"
    echo "held out of the clients' data (the test set unread). Round 1 is the probe round, before the prompts move; the"
    echo "last, the refit round, fits the tail to the prompts the forward-only rounds left. Backprop's reference on the"
    echo "same samples: TUNE=headline's refit-prompt-lr-0.01 row (recipe-tuning-headline.md)."
    echo
    tables_of "$OUT"/tune/prompt-lr-*  # each rate that has run, here or before
  } > "$TUNE_DOC"
  cat "$TUNE_DOC"
  exit 0
fi

recipe_row() {  # ROW: recipe.sh's row of the same options, if it has one
  case "$1" in linear-probe) echo linear-probe ;; backprop) echo default-prompts-50 ;; esac
}
check_grid  # a misspelt setting or row stops here, before any link is made
for setting in $SETTINGS; do
  for row in $ROWS; do
    here="$OUT/$setting/$row" there=$(recipe_row "$row")
    if [ -n "$there" ] && [ ! -e "$here" ] && [ ! -L "$here" ]; then  # (a dangling one stays: its runs fail)
      mkdir -p "$OUT/$setting" "$RECIPE_OUT/default-$setting/$there"
      ln -s "$(realpath -m --relative-to="$OUT/$setting" "$RECIPE_OUT/default-$setting/$there")" "$here"
    fi
  done
done
run_grid  # (under TABLE_ONLY it checks the rows and runs none)
for row in $ROWS; do  # a row at a split point is compared with backprop there: say where that is not in ROWS
  case "$row" in
    backprop-client-blocks-*) ;;
    *-client-blocks-*) [[ " $ROWS " == *" backprop-client-blocks-${row##*-client-blocks-} "* ]] ||
      echo "no backprop-client-blocks-${row##*-client-blocks-} in ROWS: $row is compared with none" >&2 ;;
  esac
done

# What one client's round costs at each number of directions K (`sfprompt cost`, on fake tensors: seconds each, made
# once and kept, TABLE_ONLY too), antithetic, and one-sided and residual at K = 1 (residual with a client block too,
# against backprop with one): the headline setting's 4,000
# training digits over 10 clients are COST_SAMPLES=400 a client.
COST_DIRECTIONS=${COST_DIRECTIONS:-1 2 4 8 16 32} COST_SAMPLES=${COST_SAMPLES:-400}
mkdir -p "$OUT/cost"
costs=()
cost_of() {  # NAME [OPTIONS...]: one client's round, forward-only with OPTIONS, against backprop's
  local cost="$OUT/cost/$1-samples-$COST_SAMPLES.json"; shift
  costs+=("$cost")
  # shellcheck disable=SC2046
  [ -f "$cost" ] || sfprompt cost $(setting iid) $(options backprop) "${size[@]}" --no-progress "$@" \
    --methods sfprompt,sfprompt-forward-only --samples-per-client "$COST_SAMPLES" --out "$cost" > /dev/null
}
# shellcheck disable=SC2046  # the options are words
for k in $COST_DIRECTIONS; do cost_of "directions-$k" $(forward_only_estimate "forward-only-$k"); done
# shellcheck disable=SC2046
cost_of directions-1-one-sided $(forward_only_estimate forward-only-1-one-sided)
# shellcheck disable=SC2046
cost_of directions-1-residual $(forward_only_estimate forward-only-1-residual)
# shellcheck disable=SC2046  # with a client block, against backprop's round with one
cost_of directions-1-residual-client-blocks-1 $(forward_only_estimate forward-only-1-residual) --client-blocks 1

DOC=${DOC:-docs/benchmarks/forward-only.md}
{
  echo "$(command_header forward_only) Test accuracy, mean ± standard deviation over the seeds; bytes and FLOPs"
  echo "of the whole run. Rows: linear-probe, backprop (\`sfprompt run --prompt-tokens 50\`: the default recipe) and"
  echo "forward-only-K (the same with \`--prompt-updates forward-only --directions K --estimator antithetic"
  echo "--perturbation 0.001\`; -one-sided: \`--estimator one-sided --perturbation 0.01\` instead; -residual:"
  echo "\`--estimator residual --perturbation 0.01\`; -label-epsilon-E: and \`--label-epsilon E\`; -client-blocks-B:"
  echo "and \`--client-blocks B\`). Then each setting's rows against backprop at their split point at equal cost,"
  echo "seed by seed (benchmarks/equal_cost_table.py). The machine named is the one"
  echo "that wrote this page; runs kept from before may have been made on another (docs/method.md says which)."
  grid_tables
  for setting in $SETTINGS; do
    for reference in $ROWS; do  # each row against backprop at its split point (-client-blocks-B: backprop-client-blocks-B)
      case "$reference" in backprop | backprop-client-blocks-*) ;; *) continue ;; esac
      blocks=${reference#backprop} others=()
      for row in $ROWS; do
        case "$row" in
          backprop | backprop-client-blocks-*) continue ;;
          *-client-blocks-*) at=-client-blocks-${row##*-client-blocks-} ;;
          *) at="" ;;
        esac
        if [ "$at" = "$blocks" ]; then others+=("$OUT/$setting/$row"); fi
      done
      if [ ${#others[@]} -gt 0 ]; then
        echo; echo "### $setting against $reference"; echo
        python benchmarks/equal_cost_table.py "$OUT/$setting/$reference" "${others[@]}"
      fi
    done
  done
  echo; echo "### One client's round at each K"; echo
  echo "\`sfprompt cost --prompt-tokens 50 --methods sfprompt,sfprompt-forward-only --directions K --estimator"
  echo "antithetic --perturbation 0.001 --samples-per-client $COST_SAMPLES\`: a split round of one client (a probe round"
  echo "costs both the same), antithetic (2K + 1 prompt sets a batch; one-sided, \`--estimator one-sided --perturbation"
  echo "0.01\`: K + 1; residual, \`--estimator residual --perturbation 0.01\`: 1), against backprop's; with a"
  echo "client block (\`--client-blocks 1\`, residual alone), against backprop's with one."
  echo
  python - "${costs[@]}" <<'PY'
import json, sys
costs = [json.load(open(path)) for path in sys.argv[1:]]
blocks = lambda cost: cost["inputs"]["config"]["client_blocks"]  # noqa: E731
backprops = {}  # each split point's backprop round, which every file made at it must repeat
for path, cost in zip(sys.argv[1:], costs):
    if backprops.setdefault(blocks(cost), cost["per_client_per_round"]["sfprompt"]) != cost["per_client_per_round"]["sfprompt"]:
        sys.exit(f"backprop's round differs between the files of {blocks(cost)} client blocks ({path}): made with other "
                 "options? remove them")
print("| prompt updates | MB up | MB down | bytes / backprop's | server GFLOP | / backprop's | client GFLOP "
      "| / backprop's | client peak MiB |")
print("|---|---|---|---|---|---|---|---|---|")
def row(name, cost, backprop):
    sent = (cost["bytes_up"] + cost["bytes_down"]) / (backprop["bytes_up"] + backprop["bytes_down"])
    print(f"| {name} | {cost['bytes_up'] / 1e6:.1f} | {cost['bytes_down'] / 1e6:.1f} | {sent:.2f} | "
          f"{cost['server_flops'] / 1e9:,.0f} | {cost['server_flops'] / backprop['server_flops']:.2f} | "
          f"{cost['client_flops'] / 1e9:.1f} | {100 * (cost['client_flops'] / backprop['client_flops'] - 1):+.3f} % | "
          f"{cost['client_peak_memory_bytes'] / 2**20:.1f} |")
for split, backprop in backprops.items():
    at = f", {split} client block{'s' * (split > 1)}" if split else ""
    row(f"backprop{at}", backprop, backprop)
    for cost in costs:
        if blocks(cost) == split:
            config = cost["inputs"]["config"]
            estimator = "" if config["estimator"] == "antithetic" else f", {config['estimator']}"
            row(f"forward-only, K = {config['directions']}{estimator}{at}",
                cost["per_client_per_round"]["sfprompt-forward-only"], backprop)
PY
} > "$DOC"
cat "$DOC"
