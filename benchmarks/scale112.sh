#!/usr/bin/env bash
# Evidence at a size two CPU cores reach (issue 34's CPU benchmark): the real ViT-S/14 at 112 px (an 8 x 8 grid of
# patches, four times the 56 px benchmarks' 4 x 4), Fashion-MNIST (TRAIN training images, default 5,000; TEST test
# images, default 2,000), 10 clients, 5 a round, ROUNDS rounds (default 10), IID (SETTINGS may add dirichlet-0.5),
# for the linear probe, SFPrompt (its default recipe) and SplitFed, each with every seed in SEEDS (default 0 1 2), in
# float32. Then docs/benchmarks/scale-112.md (DOC). Forward-only SFPrompt (ROWS may add sfprompt-forward-only, at
# its default K = 1: three body passes a batch) is left out of the default rows: it is measured on the headline
# setting (benchmarks/forward_only.sh).
#
#   JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/scale112.sh    # about 4 hours on two CPU cores: a probe run took
#                                                           # 16 minutes, an SFPrompt run 45 to 50, at one thread;
#                                                           # SplitFed (every sample) perhaps twice that
#   ABLATIONS=1 JOBS=2 OMP_NUM_THREADS=1 bash benchmarks/scale112.sh
#   python benchmarks/scale_conclusions.py > docs/benchmarks/scale-112-conclusions.md   # then, from both
#
# With ABLATIONS=1 the rows are instead core.sh's IID ablations at this size, whose conclusions the docs drew at
# 56 px: the paper's recipe (--recipe paper, 5 rounds, as core.sh's IID rows) and that recipe changed in one thing
# (the shared local classifier, global top-k pruning, one split epoch, SGD, the default wire format's rows once,
# and int8 on the wire), into OUT/iid beside the grid's rows (about 5 hours: 21 runs of 25 to 30 minutes, estimated
# from the SFPrompt rounds), and the document is docs/benchmarks/scale-112-ablations.md.
#
# A finished run is not redone and an interrupted one continues after its last complete round (DEADLINE, as
# scale224.sh, stops a run at a given time), so the benchmark can be stopped and restarted at any time; the document
# is written once every run has finished. SHARED names a folder holding models/ and data/ as ../shared does, SIZE
# appends options to every run, ROWS, SETTINGS and SEEDS choose what runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
SHARED=${SHARED:-../shared}
OUT=${OUT:-results/scale-112}
SEEDS=${SEEDS:-0 1 2}
SETTINGS=${SETTINGS:-iid}
if [ -n "${ABLATIONS:-}" ]; then
  ROWS=${ROWS:-paper paper-shared-local-classifier paper-global-pruning paper-split-epochs-1 paper-sgd paper-shared-once
    paper-wire-int8}
else
  ROWS=${ROWS:-linear-probe sfprompt sfl}
fi
read -r -a size <<< "${SIZE:-}"

setting() {  # the data, federation and partition of a setting
  local common="--dataset fashion-mnist --data-dir $SHARED/data --weights $SHARED/models/vit_small_patch14_dinov2.imgfocus.safetensors
    --image-size 112 --train-samples ${TRAIN:-5000} --test-samples ${TEST:-2000} --clients 10 --clients-per-round 5
    --rounds ${ROUNDS:-10}"
  case "$1" in
    iid) echo "$common" ;;
    dirichlet-0.5) echo "$common --alpha 0.5" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

options() {  # the method of a row
  case "$1" in
    linear-probe|sfprompt|sfl) echo "--method $1" ;;
    sfprompt-forward-only) echo "--method sfprompt --prompt-updates forward-only" ;;
    # the ablations: core.sh's iid rows (iid-X named paper-X), whose common options hold --recipe paper
    paper|paper-*) local changed  # (core_options would name the iid- row)
      changed=$(core_options "iid${1#paper}" 2> /dev/null) || { echo "unknown row $1" >&2; exit 2; }
      echo "--recipe paper $changed" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

run_grid
if [ -n "${ABLATIONS:-}" ]; then
  DOC=${DOC:-docs/benchmarks/scale-112-ablations.md} grid_report scale112 "core.sh's ablations at 112 px: Fashion-MNIST
through the real ViT-S/14 at 112 px (8 x 8 patches), ${TRAIN:-5000} training and ${TEST:-2000} test images, 10 clients,
5 a round, 5 rounds, float32, the paper's recipe (--recipe paper) and that recipe changed in one thing. Test accuracy,
mean ± standard deviation over the seeds." ABLATIONS=1
  exit
fi
DOC=${DOC:-docs/benchmarks/scale-112.md} grid_report scale112 "Fashion-MNIST through the real ViT-S/14 at 112 px (8 x 8
patches), ${TRAIN:-5000} training and ${TEST:-2000} test images, 10 clients, 5 a round, ${ROUNDS:-10} rounds, float32.
Test accuracy, mean ± standard deviation over the seeds."
