"""`sfprompt compare`: several methods on the same data partition and seed, side by side.

Every number in the table comes from the runs' own `metrics.jsonl`, so ratios and costs-to-target
are computed from exactly what each run measured.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from .config import METHODS, Config, ConfigError

# Ablations of SFPrompt and the full SplitFed, selectable in --methods beside the method names.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sfprompt-no-local-loss": ("sfprompt", {"local_epochs": 0}),
    "sfprompt-no-pruning": ("sfprompt", {"keep_ratio": 1.0}),
    "sfl-train-body": ("sfl", {"train_body": True}),  # the original SplitFed: the server trains the body
}

COLUMNS = [
    "method", "final_accuracy", "best_accuracy", "rounds", "bytes_up", "bytes_down", "client_flops",
    "server_flops", "client_peak_memory_bytes", "bytes_to_target", "client_flops_to_target", "round_to_target",
]
RATIOS = ["bytes_up", "bytes_down", "client_flops", "server_flops", "client_peak_memory_bytes"]


def parse_methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in METHODS and n not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join([*METHODS, *VARIANTS])}")
    if len(set(names)) != len(names):
        raise ConfigError("--methods lists a method twice")
    return names


def variant_config(base: Config, name: str) -> Config:
    method, overrides = VARIANTS.get(name, (name, {}))
    return base.replace(method=method, out=str(Path(base.out) / name), **overrides)


def compare(base: Config, names: list[str], target: float | None, run: Callable[[Config], dict]) -> list[dict]:
    """Run each method (same data, partition and seed: only the method differs) and tabulate."""
    rows = []
    for name in names:
        config = variant_config(base, name)
        run(config)
        rows.append(tabulate(name, Path(config.out), target))
    add_ratios(rows)
    return rows


def tabulate(name: str, out: Path, target: float | None) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = {key: summary[key] for key in COLUMNS if key in summary} | {"method": name}
    row.update(bytes_to_target=None, client_flops_to_target=None, round_to_target=None)
    if target is not None:
        sent = flops = 0
        for record in history:
            sent += record["bytes_up"] + record["bytes_down"]
            flops += record["client_flops"]
            if record["accuracy"] >= target:
                row.update(bytes_to_target=sent, client_flops_to_target=flops, round_to_target=record["round"])
                break
    row["history"] = [{"round": r["round"], "accuracy": r["accuracy"],
                       "bytes": r["bytes_up"] + r["bytes_down"]} for r in history]
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each cost as a fraction of federated full fine-tuning's, when `fl` is among the rows."""
    reference = next((row for row in rows if row["method"] == "fl"), None)
    for row in rows:
        for key in RATIOS:
            row[f"{key}_vs_fl"] = row[key] / reference[key] if reference and reference[key] else None


def write(rows: list[dict], out: Path, target: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = COLUMNS + [f"{key}_vs_fl" for key in RATIOS]
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "comparison.md").write_text(markdown(rows, target))
    plot(rows, out)


def markdown(rows: list[dict], target: float | None) -> str:
    def mb(v): return "—" if v is None else f"{v / 1e6:,.1f}"
    def gf(v): return "—" if v is None else f"{v / 1e9:,.1f}"
    def ratio(v): return "—" if v is None else f"{v:.3g}×"

    goal = f"{target:.2f}" if target is not None else "(no --target-accuracy)"
    lines = [
        f"| method | final acc. | best acc. | rounds | MB up | MB down | client GFLOP | server GFLOP "
        f"| client peak MiB | MB to {goal} | client GFLOP to {goal} | up / fl | down / fl | client FLOPs / fl "
        f"| client memory / fl |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['rounds']} "
            f"| {mb(r['bytes_up'])} | {mb(r['bytes_down'])} | {gf(r['client_flops'])} | {gf(r['server_flops'])} "
            f"| {r['client_peak_memory_bytes'] / 2**20:,.1f} | {mb(r['bytes_to_target'])} "
            f"| {gf(r['client_flops_to_target'])} | {ratio(r['bytes_up_vs_fl'])} | {ratio(r['bytes_down_vs_fl'])} "
            f"| {ratio(r['client_flops_vs_fl'])} | {ratio(r['client_peak_memory_bytes_vs_fl'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot([h["round"] for h in r["history"]], [h["accuracy"] for h in r["history"]], marker="o", label=r["method"])
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        sent, xs = 0, []
        for h in r["history"]:
            sent += h["bytes"]
            xs.append(sent / 1e6)
        ax.plot(xs, [h["accuracy"] for h in r["history"]], marker="o", label=r["method"])
    ax.set(xscale="log", xlabel="cumulative MB sent (up + down, all clients)", ylabel="test accuracy",
           title="Accuracy against communication")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["method"] for r in rows], [r["client_flops"] / 1e9 for r in rows])
    ax.set(yscale="log", ylabel="client GFLOP (all clients, all rounds)", title="Client compute")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "client_flops.png", dpi=120)
    plt.close("all")
