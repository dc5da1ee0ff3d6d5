"""Write BENCHMARKS.md from the outputs of benchmarks/compare.sh (tables, plots, command, machine).

    python benchmarks/write_benchmarks.py runs/compare "bash benchmarks/compare.sh" > BENCHMARKS.md
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    root, command = Path(sys.argv[1]), sys.argv[2]
    figures = Path("docs/benchmarks")
    figures.mkdir(parents=True, exist_ok=True)
    some_summary = next(root.glob("*/*/summary.json"))
    summary = json.loads(some_summary.read_text())
    print("# Benchmarks\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores, "
          f"{summary['versions']['platform']}; torch {summary['versions']['torch']}, "
          f"timm {summary['versions']['timm']}, sfprompt {summary['versions']['sfprompt']}  ")
    config = summary["config"]
    print(f"Setting: {config['dataset']} ({config['train_samples']} train / {config['test_samples']} test samples), "
          f"{config['model']} at {config['image_size']} px from `{Path(config['weights']).name}`, "
          f"{config['clients']} clients, {config['clients_per_round']} a round, {config['rounds']} rounds, seed {config['seed']}.\n")
    for partition in sorted(p for p in root.iterdir() if (p / "comparison.md").is_file()):
        print(f"## {partition.name}\n")
        print((partition / "comparison.md").read_text())
        for plot in ("accuracy_per_round", "accuracy_vs_bytes", "client_flops"):
            target = figures / f"{partition.name}-{plot}.png"
            shutil.copyfile(partition / f"{plot}.png", target)
            print(f"![{partition.name}: {plot.replace('_', ' ')}]({target.as_posix()})")
        print()


if __name__ == "__main__":
    main()
