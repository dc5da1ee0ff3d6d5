"""Print a Markdown table of finished runs (each a folder with summary.json and metrics.jsonl).

    python benchmarks/table.py runs/core/*
"""

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = " ".join(f"{r['accuracy']:.2f}" for r in rounds)
    return (f"| {run.name} | {summary['rounds']} | {summary['final_accuracy']:.4f} | {summary['best_accuracy']:.4f} "
            f"| {curve} | {summary['bytes_up'] / 1e6:.1f} | {summary['bytes_down'] / 1e6:.1f} "
            f"| {summary['client_flops'] / 1e9:.1f} | {summary['server_flops'] / 1e9:.0f} "
            f"| {100 * summary['client_flops'] / summary['server_flops']:.2f} % "
            f"| {summary['client_peak_memory_bytes'] / 2**20:.1f} | {summary['wall_seconds']:.0f} |")


def main() -> None:
    runs = [Path(arg) for arg in sys.argv[1:] if (Path(arg) / "summary.json").is_file()]
    if not runs:
        sys.exit("usage: table.py RUN_DIR... (folders holding summary.json)")
    print("| run | rounds | final acc. | best acc. | accuracy per round | MB up | MB down "
          "| client GFLOP | server GFLOP | client / server FLOPs | client peak MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main()
