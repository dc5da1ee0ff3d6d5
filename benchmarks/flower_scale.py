"""The Flower simulation at size: a federation of 100 SuperNodes, 10 sampled a round, against the
in-process runtime on the same configuration, each in a fresh process.

    python benchmarks/flower_scale.py     # about 15 minutes on two cores

Reports wall time (set-up included), the mean round time (the runner's own per-round seconds, so the
difference is the Flower runtime's overhead per round), the peak resident memory of the whole process
tree (the Flower simulation runs Ray's server and workers as child processes; sampled every 0.2 s),
and whether each round's accuracy and bytes equal the in-process run's (bytes to within the last digits
of the losses written in message headers, as tests/test_flower.py checks). Prints a Markdown report and
writes docs/benchmarks/flower-scale.md, which docs/benchmarks/index.md includes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def tree_rss_mib(root: int) -> float:
    """Resident memory of `root` and every process descended from it (read from /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue  # ended while we looked
        parents[int(entry.name)] = int(fields["PPid"])
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total = 0
    for pid, kb in rss.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        total += kb if ancestor == root else 0
    return total / 1024


def child(spec: dict) -> None:
    """One runtime's run in this fresh process (`flower_options`: run-config keys of the Flower runtime); prints what
    it measured as JSON."""
    from sfprompt.config import Config
    from sfprompt.runner import run

    config = Config.from_dict(spec["config"])
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_rss_mib(os.getpid()))

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    if spec["runtime"] == "in-process":
        run(config, progress=False, log=lambda _: None)
    else:
        from flwr.simulation import run_simulation

        from sfprompt.flower import client_app, server_app
        from sfprompt.flower.settings import as_run_config

        run_config = as_run_config(config) | spec.get("flower_options", {})  # the Flower runtime's own keys, if any
        run_simulation(server_app.make_app(run_config), client_app.app, num_supernodes=config.clients,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": os.cpu_count()}})
    wall = time.perf_counter() - started
    done.set()
    records = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"wall_s": wall, "peak_mib": peak[0], "records": records}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/flower-scale"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/flower-scale.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from sfprompt.config import Config, recipe_options
    from write_benchmarks import command_line, in_fresh_process, publish

    base = Config(**recipe_options("paper"), dataset="fashion-mnist", data_dir=str(args.shared / "data"), image_size=28,
                  weights=str(args.shared / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"),
                  train_samples=args.train_samples, test_samples=args.test_samples, clients=args.nodes,
                  clients_per_round=args.per_round, rounds=args.rounds, device="cpu")
    results = {}
    for runtime in ("in-process", "flower"):
        config = base.replace(out=str((args.out / runtime).resolve()))
        results[runtime] = in_fresh_process(__file__, {"runtime": runtime, "config": config.to_dict()})
        print(runtime, {k: v for k, v in results[runtime].items() if k != "records"}, file=sys.stderr)
    local = results["in-process"]["records"]
    command = (f"python benchmarks/flower_scale.py --nodes {args.nodes} --per-round {args.per_round} --rounds {args.rounds} "
               f"--train-samples {args.train_samples} --test-samples {args.test_samples}")
    lines = [command_line(command) + ". "
             f"Fashion-MNIST ({args.train_samples} train / {args.test_samples} test samples) at 28 px, the real "
             f"ViT-S/14, {args.nodes} clients ({args.nodes} SuperNodes under Flower, on Ray with one worker a core), "
             f"{args.per_round} a round.", "",
             "| runtime | wall s (set-up included) | mean round s | round overhead | peak RSS, all processes "
             "| accuracy per round | MB up | MB down | equal to in-process |", "|---|---|---|---|---|---|---|---|---|"]
    local_round = sum(r["seconds"] for r in local) / len(local)
    for runtime, result in results.items():
        records = result["records"]
        mean_round = sum(r["seconds"] for r in records) / len(records)
        accuracy = " ".join("—" if r["accuracy"] is None else f"{r['accuracy']:.4f}" for r in records)
        lines.append(f"| {runtime} | {result['wall_s']:.0f} | {mean_round:.1f} | {mean_round - local_round:+.1f} s "
                     f"| {result['peak_mib']:,.0f} MiB | {accuracy} "
                     f"| {sum(r['bytes_up'] for r in records) / 1e6:.1f} | {sum(r['bytes_down'] for r in records) / 1e6:.1f} "
                     f"| {_equal(local, records)} |")
    publish(lines, args.markdown)


def _equal(local: list[dict], other: list[dict]) -> str:
    """Whether every round has the same clients, accuracy and messages, and bytes within the headers' float digits."""
    for a, b in zip(local, other, strict=True):
        if a["clients"] != b["clients"] or a["accuracy"] != b["accuracy"] or a["messages_by_phase"] != b["messages_by_phase"]:
            return f"no (round {a['round']})"
        if any(abs(b["bytes_by_phase"][phase] - size) > 4 * a["messages_by_phase"][phase]
               for phase, size in a["bytes_by_phase"].items()):
            return f"no (round {a['round']}: bytes)"
    return "yes"


if __name__ == "__main__":
    main()
