"""Print a Markdown table of finished runs, one row per configuration: the mean and spread over its
seeds (each configuration a folder of `seed-*` runs, each with summary.json and metrics.jsonl).

    python benchmarks/table.py results/core/iid results/core/iid-sgd
"""

import json
import statistics
import sys
from pathlib import Path


def spread(values: list[float], digits: int, sign: str = "") -> str:
    """mean ± sample standard deviation (the mean alone for one seed); sign "+" signs the mean (a difference)."""
    mean = f"{statistics.fmean(values):{sign}.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def mean_of(accuracies, digits: int) -> str:
    """A round's mean accuracy over the seeds, or — for a round not evaluated (--eval-every)."""
    evaluated = [a for a in accuracies if a is not None]
    return f"{statistics.fmean(evaluated):.{digits}f}" if evaluated else "—"


def row(config: Path) -> str | None:
    runs = sorted(p for p in config.glob("seed-*") if (p / "summary.json").is_file())
    if not runs:
        return None
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    curves = [[json.loads(line)["accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in runs]
    mean_curve = " ".join(mean_of(accs, 2) for accs in zip(*curves))
    first = summaries[0]  # costs: the same for every seed but for the data each client happens to hold
    seeds = ",".join(run.name.removeprefix("seed-") for run in runs)
    return (f"| {config.name} | {seeds} | {first['rounds']} "
            f"| {spread([s['final_accuracy'] for s in summaries], 3)} | {spread([s['best_accuracy'] for s in summaries], 3)} "
            f"| {mean_curve} | {statistics.fmean(s['bytes_up'] for s in summaries) / 1e6:.1f} "
            f"| {statistics.fmean(s['bytes_down'] for s in summaries) / 1e6:.1f} "
            f"| {statistics.fmean(s['client_flops'] for s in summaries) / 1e9:.1f} "
            f"| {statistics.fmean(s['server_flops'] for s in summaries) / 1e9:.0f} "
            f"| {max(s['client_peak_memory_bytes'] for s in summaries) / 2**20:.1f} "
            f"| {statistics.fmean(s['wall_seconds'] for s in summaries):.0f} |")


def main() -> None:
    rows = [line for line in map(row, map(Path, sys.argv[1:])) if line]
    if not rows:
        sys.exit("usage: table.py CONFIG_DIR... (folders of seed-*/ runs holding summary.json)")
    print("| run | seeds | rounds | final acc. | best acc. | mean accuracy per round | MB up | MB down "
          "| client GFLOP | server GFLOP | client peak MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
