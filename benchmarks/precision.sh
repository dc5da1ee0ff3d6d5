#!/usr/bin/env bash
# The server body's precision on the benchmark setting: core.sh's iid row (Fashion-MNIST, the real
# ViT-S/14 at 56 px, 5,000 / 2,000 samples, 10 clients, 5 a round, 5 rounds) with the body in fp32,
# bf16 and fp16 mixed precision, every seed in SEEDS (default 0 1 2), all on one device, JOBS runs
# at once (default 9). Meant for a GPU: a CPU without bf16 arithmetic emulates it, many times slower.
# Writes docs/benchmarks/precision.md (REPORT names another file), which docs/benchmarks/index.md includes.
#
#   bash benchmarks/precision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
OUT=${OUT:-results/precision}
ROWS=${ROWS:-iid iid-bf16 iid-fp16}
export JOBS=${JOBS:-9}
rows_report precision "core.sh's iid setting with the server's body in fp32, bf16 and fp16 mixed precision (rows iid, iid-bf16, iid-fp16), every run on this device; wall seconds are of $JOBS runs sharing it."
