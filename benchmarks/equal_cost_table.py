"""Each configuration against a reference one, seed by seed, at equal cost: Markdown tables of the per-seed
difference in final accuracy, and in accuracy at equal bytes (up and down) and at equal server FLOPs, where
forward-only and backprop differ most. Each configuration is a folder of `seed-*` runs; a seed counts where both it
and the reference finished (the same seed: the same data and partition).

At equal cost each run of a pair is read after its last evaluated round within the smaller of the two runs' totals,
so the dearer run is read before its end. Unlike `sfprompt compare`'s equal-cost tables (which read every method at
SFPrompt's spend after set rounds, and count every round), a round read through a stale tail does not count here:
it is not a model the run could stop with, as only its refit round makes those prompts usable.

    python benchmarks/equal_cost_table.py results/forward-only/iid/backprop results/forward-only/iid/forward-only-4
"""

import sys
from pathlib import Path

from sfprompt.compare import tabulate
from table import spread  # the script's folder is on sys.path

COSTS = (("bytes", "MB", 1e6), ("server_flops", "server GFLOP", 1e9))


def finished(config: Path) -> dict[str, dict]:
    """seed -> the run's row (its summary and its accuracy after each round against the costs spent until then)."""
    return {run.name.removeprefix("seed-"): tabulate(config.name, run, None)
            for run in sorted(config.glob("seed-*")) if (run / "summary.json").is_file()}


def spent(run: dict, cost: str) -> float:
    return run["history"][-1][cost]


def at(run: dict, cost: str, budget: float) -> dict | None:
    """The run's last evaluated round within `budget` of `cost` not read through a stale tail (None: none is)."""
    within = [h for h in run["history"] if h[cost] <= budget and not h["stale_tail"]]
    return within[-1] if within else None


def rounds(readings: list[dict]) -> str:
    """The rounds the seeds were read after: "4", or "3/4" where they differ."""
    return "/".join(str(n) for n in sorted({h["round"] for h in readings}))


def final_row(name: str, pairs: list[tuple[dict, dict]]) -> str:
    differences = [100 * (run["final_accuracy"] - ref["final_accuracy"]) for run, ref in pairs]
    ratios = " | ".join(spread([spent(run, cost) / spent(ref, cost) for run, ref in pairs], 2) for cost, _, _ in COSTS)
    return f"| {name} | {len(pairs)} | {spread(differences, 1, '+')} | {ratios} |"


def equal_cost_row(name: str, pairs: list[tuple[dict, dict]], cost: str, scale: float) -> str:
    budgets = [min(spent(run, cost), spent(ref, cost)) for run, ref in pairs]
    mine, theirs = ([at(pair[side], cost, b) for pair, b in zip(pairs, budgets)] for side in (0, 1))

    def reading(readings: list[dict | None]) -> str:  # — where a seed has no round to read
        if None in readings:
            return "—"
        return f"{spread([h['accuracy'] for h in readings], 3)} ({rounds(readings)})"

    both = None not in mine + theirs
    difference = spread([100 * (a["accuracy"] - b["accuracy"]) for a, b in zip(mine, theirs)], 1, "+") if both else "—"
    return (f"| {name} | {len(pairs)} | {spread([b / scale for b in budgets], 0)} | {reading(mine)} "
            f"| {reading(theirs)} | {difference} |")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: equal_cost_table.py REFERENCE CONFIG... (folders of seed-*/ runs holding summary.json)")
    reference, *configs = map(Path, sys.argv[1:])
    ref = finished(reference)
    paired = {config: [(run, ref[seed]) for seed, run in finished(config).items() if seed in ref] for config in configs}
    alone = [config.name for config, pairs in paired.items() if not pairs]
    paired = {config.name: pairs for config, pairs in paired.items() if pairs}
    if not paired:
        print(f"(no seed finished both in {reference.name} and in another row)")
        return
    print(f"Against {reference.name}, seed by seed (mean ± standard deviation over the seeds both finished): the "
          "difference in points and each cost's ratio, over the whole run"
          + (f"; no seed to pair in {', '.join(alone)}." if alone else "."))
    print()
    print("| run | seeds | final acc. − reference's, points | "
          + " | ".join(f"{unit} / reference" for _, unit, _ in COSTS) + " |")
    print("|---|---|---|" + "---|" * len(COSTS))
    print("\n".join(final_row(name, pairs) for name, pairs in paired.items()))
    for cost, unit, scale in COSTS:
        print()
        print(f"At equal {unit}{' (up and down)' if cost == 'bytes' else ''}: each run of a pair read after its last "
              f"evaluated round within the smaller of the two runs' totals, not through a stale tail (that round in "
              "brackets; —: a seed has none).")
        print()
        print(f"| run | seeds | smaller total, {unit} | run's accuracy | {reference.name}'s | difference, points |")
        print("|---|---|---|---|---|---|")
        print("\n".join(equal_cost_row(name, pairs, cost, scale) for name, pairs in paired.items()))


if __name__ == "__main__":
    main()
