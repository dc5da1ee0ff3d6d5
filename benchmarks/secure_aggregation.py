"""Secure aggregation (Flower's SecAgg+) against plain FedAvg under the Flower simulation: the default job, each
seed run both ways, each run in a fresh process.

    python benchmarks/secure_aggregation.py      # the default job, 3 seeds: about an hour on two cores

Reports each round's accuracy both ways, the final accuracy's mean and spread over the seeds, the largest gap
in any round's accuracy, the bytes a round sends up and down (the masked uploads, and the keys, shares and
ciphertexts of the protocol). A run already finished in --out is reused, not redone.
Prints a Markdown report and writes docs/benchmarks/secure-aggregation.md, which docs/flower.md and docs/privacy.md link to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from flower_scale import child  # noqa: F401  (the --child entry point runs a case in its own process)


def finished(config, options: dict) -> dict | None:
    """A run this benchmark already finished with `config`, plain or secure as `options` say (a secure run's rounds
    count SecAgg+'s bytes): its records, so that an interrupted benchmark, or one given more seeds, runs only what is
    missing."""
    from sfprompt.config import Config, saved_options

    out = Path(config.out)
    if not (out / "summary.json").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secure = all("up/secagg" in record["bytes_by_phase"] for record in records)
    saved = Config().to_dict() | saved_options(summary["config"])
    if any(saved[key] != value for key, value in config.to_dict().items() if key not in ("out", "device", "tracker")) or (
            secure != bool(options)):  # where it ran, on which device and what showed it may differ
        return None
    return {"records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10, help="SuperNodes, one client each (the default job's 10)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--options", default="", help="JSON of Config changes to the default job (a smaller test)")
    parser.add_argument("--out", type=Path, default=Path("results/secure-aggregation"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/secure-aggregation.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from sfprompt.config import Config
    from sfprompt.flower.settings import FlowerOptions
    from write_benchmarks import command_line, in_fresh_process, publish

    changes = json.loads(args.options) if args.options else {}
    per_round = changes.pop("clients_per_round", Config().clients_per_round)
    runs: dict[tuple[str, int], dict] = {}
    for seed in map(int, args.seeds.split(",")):
        for mode, options in (("plain", {}), ("secure", {"secure-aggregation": True})):
            config = Config(**changes, clients=args.nodes, clients_per_round=min(per_round, args.nodes), seed=seed,
                            out=str((args.out / f"{mode}-{seed}").resolve()))
            runs[mode, seed] = finished(config, options)
            if runs[mode, seed] is None:
                in_fresh_process(__file__, {"runtime": "flower", "config": config.to_dict(), "flower_options": options})
                runs[mode, seed] = finished(config, options)
            print(mode, seed, [r["accuracy"] for r in runs[mode, seed]["records"]], file=sys.stderr)
    seeds = sorted({seed for _, seed in runs})
    command = "python benchmarks/secure_aggregation.py" + (f" --nodes {args.nodes}" if args.nodes != 10 else "") + (
        f" --seeds {args.seeds}" if args.seeds != "0,1,2" else "") + (f" --options '{args.options}'" if args.options else "")
    config = Config(**changes)
    lines = [command_line(command) + ". "
             f"The default job ({config.dataset}, {config.model} at {config.image_size} px, {args.nodes} SuperNodes on "
             f"Flower's simulation, {min(per_round, args.nodes)} a round, {config.rounds} rounds), each "
             f"seed with plain FedAvg and with SecAgg+ (`secure-aggregation=true`: every round's clients share "
             f"keys with each other, half of them can recover a dropped one's masks, values clipped to "
             f"+-{FlowerOptions().secagg_clipping_range:g} and quantised into 2^22 levels).", "",
             "| aggregation | accuracy per round (seed " + ", ".join(map(str, seeds)) + ") | final accuracy, mean ± sd "
             "| MB up a round: uploads | MB up: SecAgg+ keys and shares | MB down: SecAgg+ | MB up and down a round, all "
             "|", "|---|---|---|---|---|---|---|"]
    for mode in ("plain", "secure"):
        records = [runs[mode, seed]["records"] for seed in seeds]
        finals = [rounds[-1]["accuracy"] for rounds in records]
        per_round = "; ".join(" ".join(f"{r['accuracy']:.4f}" for r in rounds) for rounds in records)
        flat = [r for rounds in records for r in rounds]

        def per_round_mb(phase: str) -> str:
            return f"{statistics.mean(r['bytes_by_phase'].get(phase, 0) for r in flat) / 1e6:.3f}"

        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        total = statistics.mean(r["bytes_up"] + r["bytes_down"] for r in flat) / 1e6
        lines.append(f"| {'SecAgg+' if mode == 'secure' else 'FedAvg'} | {per_round} | {statistics.mean(finals):.4f} ± "
                     f"{spread:.4f} | {per_round_mb('up/upload')} | {per_round_mb('up/secagg')} | "
                     f"{per_round_mb('down/secagg')} | {total:.1f} |")
    gaps = [abs(a["accuracy"] - b["accuracy"]) for seed in seeds
            for a, b in zip(runs["plain", seed]["records"], runs["secure", seed]["records"], strict=True)]
    lines += ["", f"Largest gap between the two in any round's accuracy, over every seed: {max(gaps):.4f}. A run "
              "already in the output folder with the same options is reused (options added to sfprompt after it ran "
              "take their defaults, which change nothing), so the rows may come from several revisions of the code "
              "and the machine line describes the last invocation; wall times are not compared, as the runs shared "
              "the machine with other work."]
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
