#!/usr/bin/env bash
# What local DP of the uploads costs (--upload-epsilon: Flower's LocalDpMod on each client, the change from the
# broadcast clipped to --upload-clip and noised): the default job without its probe round (--probe-rounds 0: a
# probe round uploads statistics, which the mod does not cover), every seed in SEEDS, IID; then
# docs/benchmarks/upload-dp.md. Rows: clear (no noise), clip-only (the clipping with noise of std 1e-8) and
# epsilon-E (`--upload-clip CLIP --upload-epsilon E`: the
# change clipped to CLIP, default 1, below every change of the clear runs' first round, 3.4 to 3.7; then the noise
# Flower calibrates to (E, 1e-5), proven for E < 1 only: the report gives the bound Opacus' accountant proves).
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/upload_dp.sh      # 15 runs of the default job: about an hour on two cores
#   ROWS="clear epsilon-100" SEEDS=0 bash benchmarks/upload_dp.sh
#
# A finished run is not redone and an interrupted one continues after its last complete round. SIZE appends
# options to every run and DOC names the document written (a test runs it at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
OUT=${OUT:-results/upload-dp}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=iid
ROWS=${ROWS:-clear clip-only epsilon-1000 epsilon-100 epsilon-10}
CLIP=${CLIP:-1}
read -r -a size <<< "${SIZE:-}"

setting() {
  case "$1" in
    iid) echo "--probe-rounds 0" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

options() {
  case "$1" in
    clear) echo "" ;;
    clip-only) echo "--upload-clip $CLIP --upload-epsilon 1e9" ;;  # noise of std 1e-8: what the clipping costs
    epsilon-*) echo "--upload-clip $CLIP --upload-epsilon ${1#epsilon-}" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

run_grid
DOC=${DOC:-docs/benchmarks/upload-dp.md}
{
  echo "$(command_header upload_dp) The default job without its probe round (\`sfprompt run --probe-rounds 0\`),"
  echo "test accuracy, mean ± standard deviation over the seeds. Rows: clear (uploads as trained), clip-only (each"
  echo "change clipped to $CLIP, with noise of std 1e-8: \`--upload-epsilon 1e9\`) and epsilon-E"
  echo "(\`--upload-clip $CLIP --upload-epsilon E\`: each upload's change clipped to $CLIP, then the noise Flower's"
  echo "LocalDpMod calibrates to (E, 1e-5), a calibration proven for E < 1 only; below, the local DP that Opacus' RDP"
  echo "accountant proves of it, per client and for its whole data)."
  grid_tables
  echo
  python - "$CLIP" $ROWS <<'PY'
import sys
from sfprompt.config import Config
from sfprompt.defence import local_epsilon, upload_noise_multiplier

clip, rows, delta = float(sys.argv[1]), [row for row in sys.argv[2:] if row.startswith("epsilon-")], 1e-5
print("| row | noise std a value | proven ε of one upload | over the 5 rounds a client may upload in |")
print("|---|---|---|---|")
for row in rows:
    multiplier = upload_noise_multiplier(float(row.split("-", 1)[1]), delta)
    print(f"| {row} | {multiplier * clip:.3g} | {local_epsilon(multiplier, 1, delta):,.3g} | "
          f"{local_epsilon(multiplier, Config().rounds, delta):,.3g} |")
PY
} > "$DOC"
cat "$DOC"
