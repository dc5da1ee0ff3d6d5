# Shell helpers the benchmark scripts share; each script sources this file after `cd` to the repository.

# run_once RUN LOG OPTIONS...: `sfprompt run OPTIONS --out RUN`, its output in LOG, unless RUN holds a finished run;
# one interrupted after a checkpoint continues from it, so that a benchmark can be stopped and restarted at any time.
# With DEADLINE (seconds since the epoch) set, a run still going then is stopped (it continues next time from its
# last complete round) and none starts after it, so that a benchmark fits a short lease of a machine.
run_once() {
  local run=$1 log=$2 rc=0
  shift 2
  if [ -f "$run/summary.json" ]; then echo "$run: done before"; return; fi
  local limit=()
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 0 ]; then echo "$run: not started (DEADLINE passed)"; return; fi
    limit=(timeout "$left")
  fi
  mkdir -p "$(dirname "$run")"
  if [ -f "$run/checkpoint.safetensors" ]; then
    echo "$run: continuing after its last complete round"
    "${limit[@]}" sfprompt run --resume "$run" --no-progress >> "$log" 2>&1 || rc=$?
  else
    echo "$run ..."
    "${limit[@]}" sfprompt run "$@" --out "$run" > "$log" 2>&1 || rc=$?
  fi
  if [ "$rc" = 124 ] && [ ${#limit[@]} -gt 0 ]; then echo "$run: stopped at DEADLINE; run again to continue"; return; fi
  if [ "$rc" != 0 ]; then echo "$run failed: see $log" >&2; return 1; fi
}

# forward_only_estimate ROW: the estimate of a row named forward-only-K (K directions, the antithetic estimator at
# 1e-3) or forward-only-K-one-sided (the one-sided estimator at 1e-2, where benchmarks/zo_quality.py found it ties the
# antithetic one at K = 1) or forward-only-1-residual (the residual estimator, one set a batch, at one-sided's 1e-2),
# without any -label-epsilon-E suffix; nothing (and a failure) for another name. Every
# estimate is written out, defaults or not, so that a row keeps its meaning if the defaults change. (`sfprompt cost`
# takes the estimate alone: --prompt-updates there would make its backprop row forward-only too.)
forward_only_estimate() {
  local k=${1#forward-only-}
  case "$1" in
    forward-only-*-one-sided) echo "--directions ${k%-one-sided} --estimator one-sided --perturbation 0.01" ;;
    forward-only-1-residual) echo "--directions 1 --estimator residual --perturbation 0.01" ;;
    forward-only-*) echo "--directions $k --estimator antithetic --perturbation 0.001" ;;
    *) return 1 ;;
  esac
}

# forward_only_options ROW: a forward-only row's prompt-update options: its estimate, forward-only.
forward_only_options() {
  local estimate; estimate=$(forward_only_estimate "$1") || return 1
  echo "--prompt-updates forward-only $estimate"
}

# core_options ROW: the options of one of core.sh's rows beside its common ones, which hold --recipe paper: the paper's
# recipe changed in one thing (scale112.sh's ABLATIONS rows are its iid ones at 112 px). An unknown row stops the
# script.
core_options() {
  case "$1" in
    iid) echo "--rounds 5" ;;
    dirichlet-0.5) echo "--rounds 10 --alpha 0.5" ;;
    iid-shared-local-classifier) echo "--rounds 5 --local-classifier shared" ;;
    iid-global-pruning) echo "--rounds 5 --no-prune-per-class" ;;
    iid-split-epochs-1) echo "--rounds 5 --split-epochs 1" ;;
    iid-sgd) echo "--rounds 5 --optimizer sgd --lr 0.01 --prompt-lr 0.01" ;;
    iid-keep-all) echo "--rounds 5 --keep-ratio 1" ;;  # no pruning: twice the bytes and server FLOPs
    iid-prune-easiest) echo "--rounds 5 --prune-keep easiest" ;;
    iid-prune-middle) echo "--rounds 5 --prune-keep middle" ;;
    iid-prune-random) echo "--rounds 5 --prune-keep random" ;;
    iid-prune-received) echo "--rounds 5 --prune-scores received" ;;  # scored before the self-update
    dirichlet-0.5-prune-by-size) echo "--rounds 10 --alpha 0.5 --prune-keep by-size" ;;  # IID clients are all one size
    dirichlet-0.5-prune-random) echo "--rounds 10 --alpha 0.5 --prune-keep random" ;;
    dirichlet-0.5-keep-all) echo "--rounds 10 --alpha 0.5 --keep-ratio 1" ;;  # no pruning under skew
    iid-client-blocks-2) echo "--rounds 5 --client-blocks 2" ;;
    iid-mixed-budgets) echo "--rounds 5 --client-budgets 0.05,0.5,1.0" ;;  # heads of 0, 2 and 5 blocks
    iid-shared-once) echo "--rounds 5 --shared-rows once" ;;  # the wire format's rows (wire.sh)
    iid-wire-bfloat16) echo "--rounds 5 --shared-rows once --wire-dtype bfloat16" ;;
    iid-wire-float16) echo "--rounds 5 --shared-rows once --wire-dtype float16" ;;
    iid-wire-int8) echo "--rounds 5 --shared-rows once --wire-dtype int8" ;;
    dirichlet-0.5-wire-int8) echo "--rounds 10 --alpha 0.5 --shared-rows once --wire-dtype int8" ;;  # under skew
    iid-bf16) echo "--rounds 5 --precision bf16" ;;
    iid-fp16) echo "--rounds 5 --precision fp16" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

# wait_for_lane JOBS: returns once fewer than JOBS background runs are running; stops the script if one failed.
wait_for_lane() {
  while [ "$(jobs -rp | wc -l)" -ge "$1" ]; do wait -n || exit 1; done
}

# wait_for_all: returns once every background run has finished; stops the script if one failed.
wait_for_all() {
  wait_for_lane 1
}

# check_grid: stops the script at an unknown setting of SETTINGS or row of ROWS (the calling script's `setting` and
# `options` refuse it), before anything is made for any of them.
check_grid() {
  local setting row
  for setting in $SETTINGS; do setting "$setting" > /dev/null; done
  for row in $ROWS; do options "$row" > /dev/null; done
}

# run_grid: every row of ROWS in every setting of SETTINGS with every seed of SEEDS, JOBS at a time, each run in
# OUT/SETTING/ROW/seed-N with the options the calling script's `setting SETTING` and `options ROW` print (and its
# `size` array appended); returns once all have finished. An unknown setting or row stops it before any run
# (check_grid); with TABLE_ONLY set it runs nothing after that check, for a script to report the runs there are.
run_grid() {
  local setting row seed
  check_grid
  [ -z "${TABLE_ONLY:-}" ] || return 0
  for setting in $SETTINGS; do
    for row in $ROWS; do
      for seed in $SEEDS; do
        wait_for_lane "${JOBS:-1}"
        # shellcheck disable=SC2046
        run_once "$OUT/$setting/$row/seed-$seed" "$OUT/$setting/$row/seed-$seed.log" $(setting "$setting") \
          $(options "$row") --seed "$seed" --no-progress "${size[@]}" &
      done
    done
  done
  wait_for_all
}

# grid_tables: for each setting of SETTINGS, a "### SETTING" heading and benchmarks/table.py's table of the ROWS that
# have runs under OUT/SETTING (or "(no runs)").
grid_tables() {
  local setting row rows
  for setting in $SETTINGS; do
    echo; echo "### $setting"; echo
    rows=(); for row in $ROWS; do rows+=("$OUT/$setting/$row"); done
    tables_of "${rows[@]}"
  done
}

# tables_of DIR...: benchmarks/table.py's table of those DIRs (folders of seed-* runs) with a finished run, or
# "(no runs)".
tables_of() {
  local dir dirs=()
  for dir in "$@"; do if compgen -G "$dir/seed-*/summary.json" > /dev/null; then dirs+=("$dir"); fi; done
  if [ ${#dirs[@]} -gt 0 ]; then python benchmarks/table.py "${dirs[@]}"; else echo "(no runs)"; fi
}

# tune_grid DIR VARIANTS OPTIONS [COMMON...]: a tuning grid: each variant of VARIANTS with each seed of TUNE_SEEDS
# (default 0; every variant's first seed before any second), JOBS at a time, each run in DIR/VARIANT/seed-N with the
# COMMON options, then those `OPTIONS VARIANT` prints, evaluated on 500 validation samples held out of the clients'
# data (the test set unread), and the calling script's `size` appended; returns once all have finished. An unknown
# variant (OPTIONS exits) stops the script before any run starts.
tune_grid() {
  local dir=$1 variants=$2 variant_options=$3 seed variant
  shift 3
  for variant in $variants; do "$variant_options" "$variant" > /dev/null; done
  for seed in ${TUNE_SEEDS:-0}; do
    for variant in $variants; do
      wait_for_lane "${JOBS:-1}"
      # shellcheck disable=SC2046
      run_once "$dir/$variant/seed-$seed" "$dir/$variant/seed-$seed.log" "$@" $("$variant_options" "$variant") \
        --validation-samples 500 --no-progress --seed "$seed" "${size[@]}" &
    done
  done
  wait_for_all
}

# grid_report NAME INTRO [VARIABLES]: once every run of the grid (SETTINGS x ROWS x SEEDS under OUT) has finished,
# writes DOC (default docs/benchmarks/NAME.md): the command that re-runs it (`VARIABLES bash benchmarks/NAME.sh`) and
# the machine, INTRO, and grid_tables; until then says how many runs are left.
grid_report() {
  local name=$1 intro=$2 variables=${3:-} setting row seed unfinished=0
  for setting in $SETTINGS; do for row in $ROWS; do for seed in $SEEDS; do
    [ -f "$OUT/$setting/$row/seed-$seed/summary.json" ] || unfinished=$((unfinished + 1))
  done; done; done
  if [ "$unfinished" -gt 0 ]; then echo "$unfinished runs not finished: run again to continue"; return; fi
  local doc=${DOC:-docs/benchmarks/$name.md}
  { echo "$(command_header "$name" "$variables") $intro"; grid_tables; } > "$doc"
  cat "$doc"
}

# command_header NAME [VARIABLES]: the line a report of `VARIABLES bash benchmarks/NAME.sh` opens with (e.g.
# VARIABLES=TUNE=1 for a mode of the script), naming the machine that ran it.
command_header() {
  echo "Command: \`${2:+$2 }bash benchmarks/$1.sh\`; $(python benchmarks/write_benchmarks.py --machine)."
}

# rows_report NAME INTRO: runs core.sh's rows named in ROWS (every seed in SEEDS; runs done before, in the
# same OUT, default results/core, are reused) and writes docs/benchmarks/NAME.md (REPORT names another file):
# the command that re-runs it and the machine, INTRO, whatever a `report_notes` function the script defines
# prints, and the table of means and spreads.
rows_report() {
  local name=$1 intro=$2 table
  table=$(mktemp)
  : "${OUT:=results/core}"  # report_notes reads the runs there too
  OUT=$OUT ROWS=$ROWS TABLE=$table DOC= HEADER= bash benchmarks/core.sh
  {
    echo "$(command_header "$name") $intro"
    echo
    if declare -F report_notes > /dev/null; then report_notes; echo; fi
    cat "$table"
  } > "${REPORT:=docs/benchmarks/$name.md}"
  rm -f "$table"
  cat "$REPORT"
}
