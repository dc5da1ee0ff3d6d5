#!/usr/bin/env bash
# Which method to choose: docs/benchmarks/choose.md, from compare.sh's runs (OUT_COMPARE, default results/compare:
# run `bash benchmarks/compare.sh` first) and an audit of each split method on the comparison's setting, at its
# initial params (client 0's first round: what the server receives does not depend on training for the attacks
# that matter here, and every split method sends the same kinds of message), into OUT (default results/choose).
#
#   bash benchmarks/choose.sh      # six audits, about 30 minutes on two CPU cores
#
# A finished audit is not redone. AUDIT_SIZE appends options to every audit and DOC names the document written.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/choose}
OUT_COMPARE=${OUT_COMPARE:-results/compare}
read -r -a audit_size <<< "${AUDIT_SIZE:-}"
for method in sfprompt sfprompt-probe-refit sfl sl sfl-train-body linear-probe; do
  options=(--method "$method")
  if [ "$method" = sfl-train-body ]; then options=(--method sfl --train-body); fi
  # the default recipe (compare.py's variant): its first split round, after the probe round the audit plays first
  if [ "$method" = sfprompt-probe-refit ]; then
    options=(--method sfprompt --probe-rounds 1 --refit-rounds 1 --lr 0.0003 --prompt-lr 0.01)
  fi
  if [ ! -f "$OUT/$method/audit.json" ]; then
    mkdir -p "$OUT/$method"
    sfprompt audit --recipe paper --config benchmarks/compare.toml --data-dir "$SHARED/data" \
      --weights "$SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors" "${options[@]}" \
      --out "$OUT/$method" --no-progress "${audit_size[@]}" > "$OUT/$method/audit.log" 2>&1 \
      || { echo "$OUT/$method failed: see $OUT/$method/audit.log" >&2; exit 1; }
  fi
done
DOC=${DOC:-docs/benchmarks/choose.md}
python benchmarks/choose.py "$OUT_COMPARE" "$OUT" > "$DOC"
cat "$DOC"
