#!/usr/bin/env bash
# Which method to choose: docs/benchmarks/choose.md, from compare.sh's runs (OUT_COMPARE, default results/compare:
# run `bash benchmarks/compare.sh` first) and an audit of each split method on the comparison's setting, at its
# initial params (client 0's first round: what the server receives does not depend on training for the attacks
# that matter here, and every split method sends the same kinds of message), into OUT (default results/choose).
#
#   bash benchmarks/choose.sh      # six audits, about 30 minutes on two CPU cores
#
# A finished audit is not redone. AUDITED names the methods and variants audited (default all six), AUDIT_SIZE
# appends options to every audit and DOC names the document written (a test runs it at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/choose}
OUT_COMPARE=${OUT_COMPARE:-results/compare}
read -r -a audit_size <<< "${AUDIT_SIZE:-}"

method_options() {  # a method's flags, or a variant's as `sfprompt compare` runs it (sfprompt.compare.VARIANTS)
  python - "$1" <<'PYTHON'
import sys
from sfprompt.compare import VARIANTS
method, overrides = VARIANTS.get(sys.argv[1], (sys.argv[1], {}))
flags = ["--method", method]
for name, value in overrides.items():
    flag = name.replace("_", "-")
    flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
print(" ".join(flags))
PYTHON
}

# sfprompt-probe-refit, the default recipe: its first split round, after the probe round the audit plays first
for method in ${AUDITED:-sfprompt sfprompt-probe-refit sfl sl sfl-train-body linear-probe}; do
  flags=$(method_options "$method")  # an assignment: a failure stops the script
  read -r -a options <<< "$flags"
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
