"""`sfprompt compare`: several methods on the same data partition and seed, side by side, and with
several seeds, the mean and spread over them.

Every number in the table comes from the runs' own `metrics.jsonl`, so ratios and costs-to-target
are computed from exactly what each run measured.
"""

from __future__ import annotations

import csv
import json
import statistics
import tomllib
from pathlib import Path
from typing import Any, Callable

from .config import METHODS, WARM_LR, Config, ConfigError
from .runs import own_folder

# Ablations of SFPrompt and the full SplitFed, selectable in --methods beside the method names.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sfprompt-no-local-loss": ("sfprompt", {"local_epochs": 0}),
    "sfprompt-no-pruning": ("sfprompt", {"keep_ratio": 1.0}),
    "sfl-train-body": ("sfl", {"train_body": True}),  # the original SplitFed: the server trains the body
    # SFPrompt opening with a probe round (of every client, as the default recipe's), then fine-tuning at the
    # learning rates recipe.sh's grid chose, with no closing refit round (the default recipe before it had one)
    "sfprompt-probe-warm": ("sfprompt", {"probe_rounds": 1, "refit_rounds": 0, "lr": WARM_LR, "prompt_lr": WARM_LR}),
    # the default recipe: that probe round, the prompts at 0.01 and the tail at 3e-4, and a closing refit round
    "sfprompt-probe-refit": ("sfprompt", {"probe_rounds": 1, "refit_rounds": 1, "lr": WARM_LR, "prompt_lr": 0.01}),
    # no gradient crosses the network: the prompts step on zeroth-order estimates (docs/method.md)
    "sfprompt-forward-only": ("sfprompt", {"prompt_updates": "forward-only"}),
    "sfl-forward-only": ("sfl", {"prompt_updates": "forward-only"}),
}

COLUMNS = [
    "method", "final_accuracy", "best_accuracy", "rounds", "bytes_up", "bytes_down", "client_flops",
    "server_flops", "client_peak_memory_bytes", "bytes_to_target", "client_flops_to_target", "round_to_target",
]
RATIOS = ["bytes_up", "bytes_down", "client_flops", "server_flops", "client_peak_memory_bytes"]
SPREAD = ["final_accuracy", "best_accuracy"]  # reported as mean ± standard deviation over seeds
EQUAL_COST_ROUNDS = (5, 10, 20)  # the equal-cost tables compare at what SFPrompt spent after these rounds


def parse_methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in METHODS and n not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join([*METHODS, *VARIANTS])}")
    if len(set(names)) != len(names):
        raise ConfigError("--methods lists a method twice")
    return names


def load_method_options(*paths: str | Path) -> dict[str, dict[str, Any]]:
    """--method-options: TOML files of a table per method or variant of the options it runs with (each
    method's tuned learning rates, as benchmarks/tune.py writes them), e.g. `[fl]` / `optimizer = "sgd"` /
    `backbone_lr = 0.003`. A later file adds to an earlier one's tables, or overrides an option in them (say,
    the rounds each method runs, over the tuned learning rates)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        try:
            tables = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--method-options: {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--method-options: {path} is not valid TOML: {err}") from None
        for name, table in tables.items():
            if name not in METHODS and name not in VARIANTS or not isinstance(table, dict):
                raise ConfigError(f"--method-options: {path} holds {name!r}; each entry must be a [table] named by a "
                                  f"method or variant ({', '.join([*METHODS, *VARIANTS])})")
            if {"method", "out", "seed"} & {key.replace("-", "_") for key in table}:
                raise ConfigError(f"--method-options: [{name}] may not set method, out or seed (the comparison sets them)")
            merged.setdefault(name, {}).update(table)
    return merged


def variant_config(base: Config, name: str, options: dict[str, dict[str, Any]] | None = None) -> Config:
    """`base` run as method or variant `name`, with its options from --method-options (a variant takes its
    method's first, then its own)."""
    method, overrides = VARIANTS.get(name, (name, {}))
    options = options or {}
    tuned = {**options.get(method, {}), **(options.get(name, {}) if name != method else {})}
    values = {**base.given(), **tuned, "method": method, "out": str(Path(base.out) / name), **overrides}
    try:
        return Config.from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds must list distinct seeds, 0 or more, got {text!r}")
    return seeds


def compare(base: Config, names: list[str], target: float | None, run: Callable[[Config], dict],
            options: dict[str, dict[str, Any]] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Run each method (same data, partition and seed: only the method and its --method-options differ) and
    tabulate. With several `seeds`, each seed's comparison goes to --out/seed-S (its table there too) and the rows
    returned are the mean over seeds, with the spread of the accuracies."""
    base = own_folder(base, "compare")
    if not seeds or seeds == [base.seed]:
        return _compare_one(base, names, target, run, options)
    per_seed = []
    for seed in seeds:
        seeded = base.replace(seed=seed, out=str(Path(base.out) / f"seed-{seed}"))
        per_seed.append(_compare_one(seeded, names, target, run, options))
        write(per_seed[-1], Path(seeded.out), target)
    rows = [mean_row([rows[k] for rows in per_seed], target) for k in range(len(names))]
    add_ratios(rows)
    return rows


def _compare_one(base: Config, names: list[str], target: float | None, run: Callable[[Config], dict],
                 options: dict[str, dict[str, Any]] | None) -> list[dict]:
    configs = {name: variant_config(base, name, options) for name in names}  # every option checked before any run
    rows = []
    for name, config in configs.items():
        run(config)
        rows.append(tabulate(name, Path(config.out), target))
        # (a run without probe rounds asks no probe clients: its --probe-clients is not one of its differences)
        rows[-1]["options"] = {key: value for key, value in config.to_dict().items()
                               if value != getattr(base, key) and key not in ("method", "out")
                               and not (key == "probe_clients" and not config.has_probe_rounds)}
    add_ratios(rows)
    return rows


def mean_row(rows: list[dict], target: float | None) -> dict:
    """One method's rows over several seeds: every number the mean, the accuracies with their standard deviation,
    the costs to the target over the seeds that reached it (`reached` counts them), and the history the mean of
    each round's accuracy and cumulative costs."""
    row = {"method": rows[0]["method"], "options": rows[0]["options"], "seeds": len(rows)}
    for key in COLUMNS[1:]:
        values = [r[key] for r in rows if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
    for key in SPREAD:
        row[f"{key}_std"] = statistics.stdev(r[key] for r in rows)
    row["reached"] = sum(r["round_to_target"] is not None for r in rows) if target is not None else None
    rounds = min(len(r["history"]) for r in rows)
    row["history"] = [{"round": rows[0]["history"][k]["round"],  # the evaluated rounds (--eval-every), as each seed's
                       "stale_tail": rows[0]["history"][k].get("stale_tail", False)}
                      | {key: statistics.fmean(r["history"][k][key] for r in rows)
                         for key in ("accuracy", "bytes", "client_flops", "server_flops")}
                      for k in range(rounds)]
    return row


def tabulate(name: str, out: Path, target: float | None) -> dict:
    """The row of the run in `out`: its summary, and its accuracy after each round against what it had spent (a
    run still going, or killed, has no summary yet: its rounds so far)."""
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rule = _stale_tail_rule(out) if any("stale_tail" not in record for record in history) else None
    row = {key: summary[key] for key in COLUMNS if key in summary} | {"method": name}
    row.update(bytes_to_target=None, client_flops_to_target=None, round_to_target=None)
    sent = flops = server_flops = 0
    row["history"] = []  # accuracy after each round against the cost spent until then
    for record in history:
        sent += record["bytes_up"] + record["bytes_down"]
        flops += record["client_flops"]
        server_flops += record["server_flops"]
        if record["accuracy"] is None:  # a round not evaluated (--eval-every): its costs count towards the next
            continue
        row["history"].append({"round": record["round"], "accuracy": record["accuracy"], "bytes": sent,
                               "client_flops": flops, "server_flops": server_flops,
                               "stale_tail": record["stale_tail"] if rule is None else rule(record["round"])})
    reached = next((h for h in row["history"] if target is not None and h["accuracy"] >= target), None)
    if reached:
        row.update(bytes_to_target=reached["bytes"], client_flops_to_target=reached["client_flops"],
                   round_to_target=reached["round"])
    return row


def _stale_tail_rule(out: Path) -> Callable[[int], bool]:
    """Which rounds of the run in `out` were read through a stale tail, for records written before stale_tail was:
    from the run's config (none saved: none)."""
    saved = out / "config.json"
    if not saved.is_file():
        return lambda _: False
    return Config.from_saved(json.loads(saved.read_text())).reads_a_stale_tail


def at_equal_cost(rows: list[dict], cost: str, reference: str = "sfprompt",
                  rounds: tuple[int, ...] = EQUAL_COST_ROUNDS) -> list[tuple[int, float, dict[str, dict | None]]]:
    """Each method's accuracy at the cost (`bytes` or `client_flops`, cumulative) the reference method had spent
    after each of `rounds` (those its run reached): the last round a method finished within that budget (None
    when not even its first fits), and whether its run ended before spending the budget."""
    ref = next((row for row in rows if row["method"] == reference), None)
    if ref is None:
        return []
    tables = []
    reached = {h["round"]: h for h in ref["history"]}  # the rounds it was evaluated after (--eval-every)
    for n in (n for n in rounds if n in reached):
        budget = reached[n][cost]
        cells = {}
        for row in rows:
            within = [h for h in row["history"] if h[cost] <= budget]
            ended = len(within) == len(row["history"]) and bool(within) and within[-1][cost] < budget
            cells[row["method"]] = {**within[-1], "ended": ended} if within else None
        tables.append((n, budget, cells))
    return tables


def add_ratios(rows: list[dict]) -> None:
    """Each cost as a fraction of federated full fine-tuning's, when `fl` is among the rows."""
    reference = next((row for row in rows if row["method"] == "fl"), None)
    for row in rows:
        for key in RATIOS:
            row[f"{key}_vs_fl"] = row[key] / reference[key] if reference and reference[key] else None


def write(rows: list[dict], out: Path, target: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = COLUMNS + [f"{key}_vs_fl" for key in RATIOS] + ["target_accuracy"]
    if "seeds" in rows[0]:  # a mean over seeds
        fields += [f"{key}_std" for key in SPREAD] + ["seeds", "reached"]
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row | {"target_accuracy": target} for row in rows)
    with open(out / "history.csv", "w", newline="") as handle:  # accuracy against cumulative cost, every round
        writer = csv.writer(handle)
        writer.writerow(["method", "round", "accuracy", "cumulative_bytes", "cumulative_client_flops", "stale_tail"])
        writer.writerows([r["method"], h["round"], h["accuracy"], h["bytes"], h["client_flops"], h.get("stale_tail", False)]
                         for r in rows for h in r["history"])
    (out / "comparison.md").write_text(markdown(rows, target))
    plot(rows, out)


def markdown(rows: list[dict], target: float | None) -> str:
    def mb(v): return "—" if v is None else f"{v / 1e6:,.1f}"
    def gf(v): return "—" if v is None else f"{v / 1e9:,.1f}"
    def ratio(v): return "—" if v is None else f"{v:.3g}×"
    def acc(r, key): return f"{r[key]:.4f}" + (f" ± {r[key + '_std']:.4f}" if f"{key}_std" in r else "")

    def to_target(r, text):  # with how many seeds got there, when not all did
        partial = r.get("reached") not in (None, r.get("seeds")) and text != "—"
        return f"{text} ({r['reached']} of {r['seeds']} seeds)" if partial else text

    goal = f"{target:.2f}" if target is not None else "(no --target-accuracy)"
    lines = [] if "seeds" not in rows[0] else [
        f"Mean over {rows[0]['seeds']} seeds, the accuracies ± their standard deviation; a cost to the target is the "
        "mean over the seeds that reached it; the equal-cost tables use each round's mean accuracy and cost.", ""]
    lines += [
        f"| method | final acc. | best acc. | rounds | MB up | MB down | client GFLOP | server GFLOP "
        f"| client peak MiB | MB to {goal} | client GFLOP to {goal} | up / fl | down / fl | client FLOPs / fl "
        f"| client memory / fl |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {acc(r, 'final_accuracy')} | {acc(r, 'best_accuracy')} | {r['rounds']:g} "
            f"| {mb(r['bytes_up'])} | {mb(r['bytes_down'])} | {gf(r['client_flops'])} | {gf(r['server_flops'])} "
            f"| {r['client_peak_memory_bytes'] / 2**20:,.1f} | {to_target(r, mb(r['bytes_to_target']))} "
            f"| {to_target(r, gf(r['client_flops_to_target']))} | {ratio(r['bytes_up_vs_fl'])} | {ratio(r['bytes_down_vs_fl'])} "
            f"| {ratio(r['client_flops_vs_fl'])} | {ratio(r['client_peak_memory_bytes_vs_fl'])} |"
        )
    for cost, unit, scale in (("bytes", "MB", 1e6), ("client_flops", "client GFLOP", 1e9)):
        lines += equal_cost_markdown(rows, cost, unit, scale)
    changed = [f"{r['method']}: " + as_flags(r["options"]) for r in rows if r.get("options")]
    if changed:
        lines += ["", "Options that differ between the methods: " + "; ".join(changed) + "."]
    return "\n".join(lines) + "\n"


def equal_cost_markdown(rows: list[dict], cost: str, unit: str, scale: float) -> list[str]:
    """The `at_equal_cost` table for `cost` as Markdown lines (none without an `sfprompt` row)."""
    tables = at_equal_cost(rows, cost)
    if not tables:
        return []
    lines = ["", f"Accuracy at SFPrompt's {unit}: each method's accuracy after its last round within what `sfprompt` "
                 f"had spent after {', '.join(str(n) for n, _, _ in tables)} rounds (that round in brackets; — : not "
                 "even its first round fits; ≤ : its run ended below that budget).", "",
             "| method | " + " | ".join(f"{unit} of {n} rounds: {budget / scale:,.1f}" for n, budget, _ in tables) + " |",
             "|" + "---|" * (len(tables) + 1)]
    for r in rows:
        cells = [cells[r["method"]] for _, _, cells in tables]
        lines.append(f"| {r['method']} | " + " | ".join(
            "—" if c is None else f"{'≤ ' if c['ended'] else ''}{c['accuracy']:.4f} ({c['round']})" for c in cells) + " |")
    return lines


def _curve(ax, row: dict, x: str, scale: float) -> None:
    """A run's accuracy against `x` (a round, or a cost over `scale`); the rounds read through a tail that a refit
    round then replaces (a record's stale_tail) hollow, so that their dip does not read as the method's."""
    xs, ys = [h[x] / scale for h in row["history"]], [h["accuracy"] for h in row["history"]]
    (line,) = ax.plot(xs, ys, marker="o", label=row["method"])
    stale = [(a, b) for a, b, h in zip(xs, ys, row["history"]) if h.get("stale_tail")]
    if stale:
        ax.plot(*zip(*stale), linestyle="none", marker="o", markerfacecolor="white", color=line.get_color())


def _legend(ax, rows: list[dict]) -> None:
    if any(h.get("stale_tail") for r in rows for h in r["history"]):
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="white", color="grey",
                label="hollow: through the tail the refit round replaces")
    ax.legend(fontsize="small")


def as_flags(options: dict[str, Any]) -> str:
    """Options as the flags that set them: `{"backbone_lr": 0.001}` -> '--backbone-lr 0.001'."""
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in options.items())


def plot_runs(folders: list[Path], out: Path) -> list[Path]:
    """`sfprompt plot`: the runs in `folders` (finished or not) drawn side by side, as a comparison draws its
    methods, each named by its folder; returns the pictures written to `out`."""
    missing = [str(folder) for folder in folders if not (folder / "metrics.jsonl").is_file()]
    if missing:
        raise ConfigError(f"not a run folder (no metrics.jsonl): {', '.join(missing)}")
    rows = [tabulate(folder.resolve().name, folder, None) for folder in folders]
    empty = [row["method"] for row in rows if not row["history"]]
    if empty:
        raise ConfigError(f"no round finished yet in {', '.join(empty)}")
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out)
    return [out / f"{name}.png" for name in PICTURES]


PICTURES = ("accuracy_per_round", "accuracy_vs_bytes", "accuracy_vs_client_flops", "client_flops")


def plot(rows: list[dict], out: Path) -> None:
    """The comparison's pictures (PICTURES) in `out`, drawn on figures of their own (no pyplot: a notebook's
    backend and figures are left as they are)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        _curve(ax, r, "round", 1)
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round")
    _legend(ax, rows)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=120)

    for cost, scale, label, title in (
            ("bytes", 1e6, "cumulative MB sent (up + down, all clients)", "communication"),
            ("client_flops", 1e9, "cumulative client GFLOP (all clients)", "client compute")):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for r in rows:
            _curve(ax, r, cost, scale)
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy", title=f"Accuracy against {title}")
        _legend(ax, rows)
        fig.tight_layout()
        fig.savefig(out / f"accuracy_vs_{cost}.png", dpi=120)

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.bar([r["method"] for r in rows], [r["history"][-1]["client_flops"] / 1e9 for r in rows])
    ax.set(yscale="log", ylabel="client GFLOP (all clients, all rounds)", title="Client compute")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "client_flops.png", dpi=120)
