#!/usr/bin/env bash
# docs/privacy.md's table: every defence (and today's undefended protocol) trained on the Fashion-MNIST
# benchmark setting with the real pre-trained ViT-S/14 from ../shared (56 px, 5,000 / 2,000 samples,
# 10 clients, 5 a round, IID, 5 rounds), then attacked by `sfprompt audit --from` its finished run
# of seed 0 (an attacker who knows the defence); then seeds 1 and 2 of every row, for the accuracy's
# mean and spread; `fl` once, as the reference for client FLOPs. A finished run or audit is not
# redone and an interrupted run continues after its last complete round (each run's log is beside it),
# so the benchmark can be stopped and restarted at any time, and the table can be written at any point
# from what is finished (it says how many seeds each accuracy rests on).
#
#   bash benchmarks/privacy.sh            # about 9.5 hours of one core (runs 6.6, audits 2.8; seed 0 alone 5.5)
#   SHARED=/path/to/shared OUT=results/privacy SEEDS="0" ROWS="none pool-2" bash benchmarks/privacy.sh
#
# ROWS picks some configurations by name (all by default), so that two copies can share the work,
# e.g. each with OMP_NUM_THREADS=1 on two cores. Each audit attacks every send the victim makes over the whole
# run (`sfprompt audit --sends run`, which replays the run first: 4 to 19 minutes of one core a row) and redoes
# an audit made of one round; SENDS=round attacks one round's sends instead, where a row has no audit yet.
# The table says which sends its audits attacked. SIZE and AUDIT_SIZE append options to every run and
# audit, and DOC names the document written (a test runs the whole script at a tiny size this way).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/privacy}
SEEDS=${SEEDS:-0 1 2}
ROWS=${ROWS:-}
SENDS=${SENDS:-run}
case "$SENDS" in round | run) ;; *) echo "SENDS must be round or run, got $SENDS" >&2; exit 2 ;; esac
DOC=${DOC:-docs/privacy.md}
read -r -a size <<< "${SIZE:-}"
read -r -a audit_size <<< "${AUDIT_SIZE:-}"
common=(--recipe paper --dataset fashion-mnist --data-dir "$SHARED/data"
        --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors"
        --image-size 56 --clients 10 --clients-per-round 5 --train-samples 5000 --test-samples 2000
        --rounds 5 --no-progress "${size[@]}")

# The configurations: a name and its privacy options (every one given, whatever the defaults are).
rows=(
    "none|--client-blocks 0 --pool-tokens 0"
    "client-blocks-1|--client-blocks 1 --pool-tokens 0"
    "client-blocks-2|--client-blocks 2 --pool-tokens 0"
    "shuffle|--client-blocks 0 --pool-tokens 0 --shuffle-tokens"
    "pool-2|--client-blocks 0 --pool-tokens 2"
    "pool-1|--client-blocks 0 --pool-tokens 1"
    "noise-0.05|--client-blocks 0 --pool-tokens 0 --clip-norm 10 --noise-multiplier 0.005"
    "pool-2-noise-0.05|--client-blocks 0 --pool-tokens 2 --clip-norm 5 --noise-multiplier 0.01"
    "pool-2-dp-epsilon-8|--client-blocks 0 --pool-tokens 2 --clip-norm 5 --noise-multiplier 4"
    "label-epsilon-1|--client-blocks 0 --pool-tokens 0 --label-epsilon 1"
    "label-epsilon-3|--client-blocks 0 --pool-tokens 0 --label-epsilon 3"
    "forward-only-1|--client-blocks 0 --pool-tokens 0 --shared-rows once $(forward_only_options forward-only-1)"
    "forward-only-1-one-sided|--client-blocks 0 --pool-tokens 0 --shared-rows once $(forward_only_options forward-only-1-one-sided)"
    "forward-only-1-label-epsilon-3|--client-blocks 0 --pool-tokens 0 --shared-rows once --label-epsilon 3 $(forward_only_options forward-only-1)"
    "linear-probe|--method linear-probe --client-blocks 0 --pool-tokens 0"
)

# train NAME SEED OPTIONS...: one run (its log beside it), unless it finished before; an interrupted one continues.
train() {
    local name=$1 seed=$2
    shift 2
    run_once "$OUT/$name/seed-$seed" "$OUT/$name/seed-$seed.log" "${common[@]}" "$@" --seed "$seed"
}

# audited AUDIT: whether AUDIT exists and, with SENDS=run, attacked the whole run (an audit saved before --sends
# attacked a round); with SENDS=round any audit there is kept (a whole run's is not redone as less).
audited() {
    local read_sends='import json, sys; print(json.load(open(sys.argv[1]))["audit"].get("sends", "round"))'
    [ -f "$1" ] && { [ "$SENDS" = round ] || [ "$(python -c "$read_sends" "$1")" = run ]; }
}

run_once "$OUT/fl" "$OUT/fl.log" "${common[@]}" --method fl
for seed in $SEEDS; do
    for row in "${rows[@]}"; do
        name=${row%%|*}
        [ -z "$ROWS" ] || [[ " $ROWS " == *" $name "* ]] || continue
        # shellcheck disable=SC2086  # the options are words
        train "$name" "$seed" ${row#*|}
        if [ "$seed" = 0 ] && ! audited "$OUT/$name/seed-0/audit.json"; then
            sfprompt audit --from "$OUT/$name/seed-0" --sends "$SENDS" --no-progress "${audit_size[@]}"
        fi
    done
done
python benchmarks/privacy_table.py "$OUT" "$DOC" "${rows[@]%%|*}"
