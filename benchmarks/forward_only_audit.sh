#!/usr/bin/env bash
# What forward-only prompt updates still tell a curious server about the labels, on the headline setting (the
# default job with 50 prompts: mnist-5k, ViT-S/14 at 56 px, 10 clients, 5 a round, IID), against backprop's
# gradients, and with randomized-response labels (--label-epsilon): for each row and seed, `sfprompt audit`, which
# plays the probe round that opens the default recipe (of all 10 clients) and attacks client 0's first round of
# prompt updates after it (the probe-fitted tail, the initial prompts, the prompts at their own rate), from the
# server's label-free guesses (the victim's tail's and the broadcast model's: audit.json's broadcast_model); then
# docs/benchmarks/forward-only-audit.md. The audit's image attacks run at a reduced size (AUDIT_SIZE): forward-only
# sends the same activations as backprop, attacked in docs/privacy.md.
#
#   bash benchmarks/forward_only_audit.sh          # about 2.5 hours at one thread (an audit 4 to 16 minutes; K = 16's longest)
#   ROWS="forward-only-4" SEEDS=0 bash benchmarks/forward_only_audit.sh
#   UPLOADS=aggregated bash benchmarks/forward_only_audit.sh   # a server under secure aggregation
#   SENDS=run bash benchmarks/forward_only_audit.sh            # every send of the whole run
#
# UPLOADS is what the server holds of the victim's uploads (`sfprompt audit --uploads`): seen (the default), each
# one, so its label-free guess and the attacks' prior read the victim's uploaded tail, trained on its labels; or
# aggregated, their sum only (secure aggregation), so they read the tail it broadcast, and the table says what the
# upload alone would have named (rows: backprop, K = 1 with either estimator, and K = 1 with label DP; about an
# hour). Its audits go to OUT (default results/forward-only-audit, and results/forward-only-audit-aggregated) and
# its table to DOC (docs/benchmarks/forward-only-audit.md, and forward-only-audit-aggregated.md).
#
# SENDS=run attacks instead every send of the runs whose accuracy forward_only.sh reports (its IID ones, in RUNS,
# default results/forward-only/iid: the default recipe, a probe round of all 10 clients, 3 rounds of prompt updates
# and a refit round), replayed by `sfprompt audit --from RUN --sends run` (each round's trajectory read with the
# broadcast it started from; the replay is checked against the run's saved params, or, as these runs are kept
# without them, each round's accuracy and loss: on a CPU whose float rounding differs from the one that made the
# run, it is a run of the same recipe, seeds and sampled clients, not that run). The server's guess at the end also
# reads the run's final model (audit.json's final_model), the second prior of the attacks. The victim is, in each
# seed's run, the client its split rounds sampled most often (the lowest such id): the one whose steps the server
# sees most. Rows: backprop, K = 1 (the default), K = 1 with label DP at epsilon 3, K = 1 one-sided and residual by
# default; the audits and table take "-run" after the names above (results/forward-only-audit-run,
# docs/benchmarks/forward-only-audit-run.md). A replay is about as long as the run (forward_only.sh's IID runs: 15
# to 25 minutes at one thread; these audits 17 to 28). A missing run is refused, before any audit starts, with the
# command that makes it, and an audit there of another run (another RUNS, or made before SENDS=run replayed
# forward_only.sh's runs) is refused too.
#
# A finished audit is not redone (and one made with other UPLOADS or SENDS is refused before any audit runs). SIZE
# appends options to every one-round audit (a whole run's are the run's own) and DOC names the document written (a
# test runs it at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
UPLOADS=${UPLOADS:-seen}
case "$UPLOADS" in seen) suffix="" ;; aggregated) suffix="-aggregated" ;;
  *) echo "UPLOADS must be seen or aggregated, got $UPLOADS" >&2; exit 2 ;; esac
SENDS=${SENDS:-round}
case "$SENDS" in round) ;; run) suffix+="-run" ;; *) echo "SENDS must be round or run, got $SENDS" >&2; exit 2 ;; esac
OUT=${OUT:-results/forward-only-audit$suffix}
SEEDS=${SEEDS:-0 1 2}
if [ "$SENDS" = run ]; then  # the default K, and with the label DP that the goal's margin may need
  ROWS=${ROWS:-backprop forward-only-1 forward-only-1-label-epsilon-3 forward-only-1-one-sided \
    forward-only-1-residual}
elif [ "$UPLOADS" = seen ]; then
  ROWS=${ROWS:-backprop forward-only-1 forward-only-1-one-sided forward-only-4 forward-only-16 \
    forward-only-1-label-epsilon-3 forward-only-1-residual}
else  # the default K with either estimator, and with label DP
  ROWS=${ROWS:-backprop forward-only-1 forward-only-1-one-sided forward-only-1-label-epsilon-3}
fi
DOC=${DOC:-docs/benchmarks/forward-only-audit$suffix.md}
read -r -a size <<< "${SIZE:-}"
RUNS=${RUNS:-results/forward-only/iid}
if [ "$SENDS" = run ] && [ -n "${SIZE:-}" ]; then
  echo "SIZE is for one round's audits: SENDS=run replays RUNS's runs with their own options" >&2; exit 2
fi
read -r -a audit_size <<< "${AUDIT_SIZE:---images 20 --aux-samples 1000 --gallery 20 --steps 100 --inversion-epochs 10}"

# A row: backprop, forward-only-K, forward-only-K-one-sided or forward-only-1-residual (lib.sh's
# forward_only_options), each with -label-epsilon-E (--label-epsilon E) after it or not.
options() {
  local row=${1%-label-epsilon-*} labels=""
  [ "$row" = "$1" ] || labels="--label-epsilon ${1##*-label-epsilon-}"
  case "$row" in
    backprop) echo "--prompt-updates backprop $labels" ;;
    forward-only-*) echo "$(forward_only_options "$row") $labels" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

for row in $ROWS; do options "$row" > /dev/null; done
table() { python benchmarks/forward_only_audit_table.py --uploads "$UPLOADS" --sends "$SENDS" "$OUT" $ROWS; }
table > /dev/null  # refuses OUT's audits made with other UPLOADS or SENDS now, not after the missing ones have run

# The client a run's split rounds (those of its own method, not its probe or refit rounds) sampled most often.
most_sampled() {
  python - "$1" <<'PY'
import collections, json, pathlib, sys
run = pathlib.Path(sys.argv[1])
method = json.loads((run / "config.json").read_text())["method"]
rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
counts = collections.Counter(c for r in rounds if r.get("stage") == method for c in r["clients"])
if not counts:
    sys.exit(f"{run}: none of its rounds is one of {method}'s own")
print(min(counts, key=lambda c: (-counts[c], c)))
PY
}
# audit_value AUDIT KEY...: the value at KEY... in the audit.json AUDIT, empty where it has none (an audit's
# `params` names the run it replayed; one round's names no folder).
audit_value() {
  python -c 'import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)' "$@"
}
if [ "$SENDS" = run ]; then  # every run there, and every finished audit one of them, before any audit starts
  for seed in $SEEDS; do for row in $ROWS; do
    run="$RUNS/$row/seed-$seed" audit="$OUT/$row/seed-$seed/audit.json"
    if [ -f "$audit" ]; then
      [ "$(audit_value "$audit" params)" = "$run" ] || {
        echo "$audit is not an audit of $run: remove it or audit into another folder (OUT)" >&2; exit 2; }
    elif [ -f "$run/summary.json" ]; then
      most_sampled "$run" > /dev/null
    else
      echo "no finished run $run to replay: make it with forward_only.sh (SETTINGS=iid SEEDS=$seed bash" \
        "benchmarks/forward_only.sh, which skips its finished runs; RUNS is its OUT/iid)" >&2; exit 2
    fi
  done; done
fi
for seed in $SEEDS; do
  for row in $ROWS; do
    audit="$OUT/$row/seed-$seed"
    if [ -f "$audit/audit.json" ]; then echo "$audit: done before"; continue; fi
    echo "$audit ..."
    mkdir -p "$OUT/$row"
    if [ "$SENDS" = run ]; then
      run="$RUNS/$row/seed-$seed"
      victim=$(most_sampled "$run")
      sfprompt audit --from "$run" --victim "$victim" --no-progress "${audit_size[@]}" \
        --uploads "$UPLOADS" --sends run --out "$audit" > "$audit.log" 2>&1 || { echo "$audit failed: see $audit.log" >&2; exit 1; }
    else
      # shellcheck disable=SC2046  # the options are words
      sfprompt audit --prompt-tokens 50 $(options "$row") --seed "$seed" --no-progress "${size[@]}" "${audit_size[@]}" \
        --uploads "$UPLOADS" --sends round --out "$audit" > "$audit.log" 2>&1 || { echo "$audit failed: see $audit.log" >&2; exit 1; }
    fi
  done
done
rows=$(table)  # before DOC is touched
victims=""  # a whole run's: each seed's, as its audit of the first row names it (every row's runs of a seed sample alike)
read -r -a row_list <<< "$ROWS"
[ "$SENDS" = round ] || for seed in $SEEDS; do
  victims+="seed $seed: client $(audit_value "$OUT/${row_list[0]}/seed-$seed/audit.json" audit victim); "
done
variables=()
[ "$UPLOADS" = seen ] || variables+=("UPLOADS=$UPLOADS")
[ "$SENDS" = round ] || variables+=("SENDS=$SENDS")
{
  setting="$(command_header forward_only_audit "${variables[*]}") The headline setting (\`--prompt-tokens 50\`),"
  if [ "$SENDS" = run ]; then  # the sends attacked, and the tails the server holds after them
    echo "$setting every"
    echo "send of one client's over the whole of each of forward_only.sh's IID runs (\`sfprompt audit --from RUN"
    echo "--sends run\`, which replays the run: with the default RUNS, the default recipe's probe round of all 10"
    echo "clients, 3 rounds of prompt updates and a refit round; each round's steps read from the broadcast it started"
    echo "from). A replay is the run itself only where the float rounding matches the machine that made it; elsewhere"
    echo "it is a run of the same recipe, seeds and sampled clients (each audit's log gives the replayed rounds'"
    echo "accuracies, to hold against the run's metrics.jsonl: these runs are kept without their weights)."
    echo "The victim is the"
    echo "client the run's rounds of prompt updates sampled most often (${victims%; }). Each figure is the"
    echo "share of the labels of the samples it sent that an attack names, mean ± standard deviation over"
    echo "the seeds (each its own run)."
    broadcast="the newest tail it broadcast to it" uploaded="last uploaded tail (trained on its labels)"
  else
    echo "$setting client 0's first round of"
    echo "prompt updates after the default recipe's probe round (of all 10 clients), attacked by \`sfprompt audit\`;"
    echo "each figure the share of the labels of the samples it sent that an attack names, mean ± standard deviation over"
    echo "the seeds (each its own partition, prompts and client 0)."
    broadcast="the tail it broadcast" uploaded="uploaded tail (trained on its labels this round)"
  fi
  if [ "$UPLOADS" = aggregated ]; then
    echo "The server holds the uploads only summed (\`--uploads aggregated\`, secure aggregation): its label-free guess,"
    echo "and the attacks' prior, read $broadcast; the upload alone is what the victim's uploaded tail would"
    echo "have named by itself without secure aggregation."
  else
    echo "The server holds each upload (\`--uploads seen\`): its label-free guess, and the attacks' prior, read the"
    echo "victim's $uploaded."
  fi
  if [ "$SENDS" = run ]; then
    echo "At the end of a run the server also holds the final model: its guess (the final tail on the rows of the"
    echo "refit round, which sends every sample with the final prompts) is a second label-free guess and a second prior"
    echo "(the final model's columns); the advantage and the best attack's errors corrected are counted against the"
    echo "better of the two guesses."
  else
    echo "The server also holds the model it broadcast for the round: with no client blocks it puts the broadcast"
    echo "prompts in place of those each send carries and runs its body, so that model's guess of the victim's own"
    echo "images (the broadcast model's columns) is a second label-free guess and a second prior; the advantage and the"
    echo "best attack's errors corrected are counted against the better of the two guesses."
  fi
  echo
  echo "$rows"
} > "$DOC"
cat "$DOC"
