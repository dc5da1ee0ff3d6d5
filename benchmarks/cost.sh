#!/usr/bin/env bash
# The deployment-cost table of docs/cost.md: `sfprompt cost` for ViT-B/16 and ViT-L/16 at 224 px with 500 samples per
# client, fl and sfprompt in each wire format (the paper's: float32, every row with every sample; the default:
# float32 with the shared rows once; bfloat16 and int8, the shared rows once), one JSON each in OUT (results/cost),
# then the ratios the table quotes. About 3 minutes on two CPU cores: the rounds run on fake tensors.
#
#   bash benchmarks/cost.sh
#   MODELS=test_vit FORMATS="float32:per-sample int8:once" SIZE="--image-size 32 --samples-per-client 40" \
#     OUT=/tmp/cost bash benchmarks/cost.sh  # a test's size
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/cost}
MODELS=${MODELS:-vit_base_patch16_224 vit_large_patch16_224}
FORMATS=${FORMATS:-float32:per-sample float32:once bfloat16:once int8:once}  # wire dtype:shared rows
read -r -a size <<< "${SIZE:---image-size 224 --samples-per-client 500}"
mkdir -p "$OUT"
for model in $MODELS; do
  for format in $FORMATS; do
    dtype=${format%:*} rows=${format#*:}
    sfprompt cost --model "$model" "${size[@]}" --methods fl,sfprompt --wire-dtype "$dtype" --shared-rows "$rows" \
      --out "$OUT/$model-$dtype-$rows.json" > /dev/null
  done
done
python - "$OUT" "$MODELS" "$FORMATS" <<'PY'
import json, sys
out, models, formats = sys.argv[1], sys.argv[2].split(), [f.split(":") for f in sys.argv[3].split()]
print("| model | wire format | sfprompt bytes / fl | sfprompt client FLOPs / fl | client peak MiB sfprompt / fl |")
print("|---|---|---|---|---|")
for model in models:
    for dtype, rows in formats:
        costs = json.load(open(f"{out}/{model}-{dtype}-{rows}.json"))["per_client_per_round"]
        fl, sfp = costs["fl"], costs["sfprompt"]
        ratio = (sfp["bytes_up"] + sfp["bytes_down"]) / (fl["bytes_up"] + fl["bytes_down"])
        print(f"| {model} | {dtype}, shared rows {rows} | {ratio:.3g}x | {100 * sfp['client_flops'] / fl['client_flops']:.3g} % "
              f"| {sfp['client_peak_memory_bytes'] / 2**20:,.1f} / {fl['client_peak_memory_bytes'] / 2**20:,.1f} |")
PY
