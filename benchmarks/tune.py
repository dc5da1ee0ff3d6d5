"""Each method's learning rates, tuned as carefully as SFPrompt's: a small grid per method on the comparison's
setting (benchmarks/compare.toml), every run evaluated on validation samples held out of the clients' training
data (`--validation-samples`; the test set is never read). Writes each method's best, by final validation
accuracy, to benchmarks/tuned.toml (which compare.sh passes to `sfprompt compare --method-options`) and every
point to docs/benchmarks/tuning.md (which docs/benchmarks/index.md includes).

    python benchmarks/tune.py                       # 31 runs, 2.8 hours of one-thread runs (fl's 12: 72 minutes)
    python benchmarks/tune.py --methods fl,sfprompt --shared /path/to/shared

A finished run is not redone and an interrupted one continues after its last complete round, so the sweep can
be stopped and restarted at any time. Two invocations on disjoint --methods (sfl-train-body with sfl) can share
two cores, each with OMP_NUM_THREADS=1 and its own --tuned and --report; a plain run afterwards only reads
their runs and writes both files. `sfl-train-body` is tuned after `sfl`, on top of sfl's best (as compare runs
it); SFPrompt's ablations take sfprompt's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sfprompt.compare import as_flags, variant_config
from sfprompt.config import Config, recipe_options
from sfprompt.runner import run_or_reuse

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LRS = [{"lr": lr, "prompt_lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]  # tail and prompts, Adam
GRID: dict[str, list[dict]] = {
    "fl": [{"optimizer": "adam", "backbone_lr": backbone, "lr": head} for backbone in (1e-5, 3e-5, 1e-4)
           for head in (1e-3, 1e-2)]
          + [{"optimizer": "sgd", "backbone_lr": backbone, "lr": head} for backbone in (1e-3, 3e-3, 1e-2)
             for head in (1e-2, 1e-1)],
    "fl-prompt": PROMPT_LRS,
    "sl": PROMPT_LRS,
    "sfl": PROMPT_LRS,
    "sfprompt": PROMPT_LRS,
    "sfl-train-body": [{"backbone_lr": backbone} for backbone in (1e-5, 3e-5, 1e-4)],  # on sfl's best
}


def point_name(point: dict) -> str:
    return "-".join(f"{key.replace('_', '-')}-{value}" for key, value in point.items())


def chosen(points: list[dict]) -> dict:
    """A method's best point: the highest final validation accuracy, the first of equals in grid order."""
    return max(points, key=lambda r: r["final"])


def sweep(base: Config, methods: list[str], progress: bool) -> dict[str, list[dict]]:
    """Run every grid point of `methods` (each in base.out/METHOD/POINT, resumed where it stopped); the points
    with their final and best validation accuracy."""
    results: dict[str, list[dict]] = {}
    best: dict[str, dict] = {}
    for name in methods:
        results[name] = []
        for k, point in enumerate(GRID[name], 1):
            config = variant_config(base, name, {**best, name: point}).replace(
                out=str(Path(base.out) / name / point_name(point)))
            print(f"{name} {k}/{len(GRID[name])}: {point_name(point)}", file=sys.stderr, flush=True)
            summary = run_or_reuse(config, progress=progress)
            results[name].append({"point": point, "final": summary["final_accuracy"], "best": summary["best_accuracy"],
                                  "seconds": summary["wall_seconds"]})
        best[name] = chosen(results[name])["point"]
    return results


def tuned_toml(results: dict[str, list[dict]], command: str) -> str:
    lines = [f"# Written by `{command}`: each method's learning rates with the best final accuracy on validation",
             "# samples held out of the clients' training data (docs/benchmarks/tuning.md has every point).",
             "# `sfprompt compare --method-options` reads it; re-run the script rather than editing it."]
    for name, points in results.items():
        lines += ["", f"[{name}]"]
        for key, value in chosen(points)["point"].items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def report(results: dict[str, list[dict]], base: Config, command: str) -> str:
    setting = {key: value for key, value in base.to_dict().items() if value != getattr(Config(), key)
               and key not in ("out", "data_dir", "weights")}
    lines = [f"Command: `{command}`. Setting: {json.dumps(setting)}, one seed; each run evaluated on "
             f"{base.validation_samples} validation samples held out of the training clients' data (the test set "
             "unread). The best of each method (final validation accuracy, **bold**) is in benchmarks/tuned.toml; "
             "sfl-train-body was tuned on sfl's best, SFPrompt's ablations take sfprompt's.", "",
             "| method | options | final val. acc. | best val. acc. | wall s |", "|---|---|---|---|---|"]
    for name, points in results.items():
        best = chosen(points)
        for r in points:
            options = as_flags(r["point"])
            final = f"**{r['final']:.4f}**" if r is best else f"{r['final']:.4f}"
            lines.append(f"| {name} | {options} | {final} | {r['best']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults are relative to the repository's root, where the sweep runs, and so are the paths its runs save: a
    # finished run in results/ has the same config, and is reused, wherever the repository is checked out.
    parser.add_argument("--shared", default="../shared", help="the folder holding data/ and models/")
    parser.add_argument("--config", default="benchmarks/compare.toml", help="the setting (compare.sh's)")
    parser.add_argument("--methods", default=",".join(GRID), help="methods to tune, in order")
    parser.add_argument("--validation-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/tune")
    parser.add_argument("--tuned", default="benchmarks/tuned.toml", help="where the best options go")
    parser.add_argument("--report", default="docs/benchmarks/tuning.md", help="where the table goes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    for name in ("shared", "config", "out", "tuned", "report"):  # a path given on the command line: from here
        if getattr(args, name) != parser.get_default(name):
            setattr(args, name, os.path.relpath(Path(getattr(args, name)).resolve(), ROOT))
    os.chdir(ROOT)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in GRID]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none)'}; tunable: {', '.join(GRID)}")
    if "sfl-train-body" in methods and "sfl" not in methods:
        parser.error("sfl-train-body is tuned on sfl's best: tune sfl with it")
    shared = Path(args.shared)
    base = Config.from_toml(args.config, **recipe_options("paper"), data_dir=str(shared / "data"),
                            weights=str(shared / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"),
                            validation_samples=args.validation_samples, seed=args.seed, out=args.out)
    results = sweep(base, methods, progress=not args.no_progress)
    command = "python benchmarks/tune.py" + "".join(f" {arg}" for arg in sys.argv[1:])
    Path(args.tuned).write_text(tuned_toml(results, command))
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(report(results, base, command))
    print(Path(args.report).read_text())


if __name__ == "__main__":
    main()
