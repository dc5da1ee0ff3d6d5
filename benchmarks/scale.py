"""What many simulated clients cost in one process: set-up time and resident memory of a run's
federation (`federation.prepare`: data, model, partition, clients) against the number of clients,
everything else fixed, each count in a fresh process.

    python benchmarks/scale.py            # about 2 minutes on two cores: full Fashion-MNIST (60,000), 28 px,
                                          # 10 / 1,000 / 10,000 clients, IID and Dirichlet(0.5)

The memory per client is the growth over the smallest count divided by the clients added: what an
idle client holds beyond the shared model and data. Prints a Markdown report and writes
docs/benchmarks/scale.md, which docs/benchmarks/index.md includes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from write_benchmarks import memory_mib  # this script's folder is on sys.path


def child(config: dict) -> None:
    """prepare(config) in this fresh process; prints time and memory as JSON."""
    from sfprompt.config import Config
    from sfprompt.federation import prepare

    before = memory_mib()["VmRSS"]
    started = time.perf_counter()
    fed = prepare(Config.from_dict(config))
    seconds = time.perf_counter() - started
    after = memory_mib()
    print(json.dumps({"clients": len(fed.clients), "setup_s": seconds, "rss_mib": after["VmRSS"] - before,
                      "peak_mib": after["VmHWM"] - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--train-samples", type=int, default=None, help="default: the whole training set")
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/scale.md"))
    args = parser.parse_args()
    from sfprompt.config import Config, recipe_options
    from write_benchmarks import command_line, in_fresh_process, publish

    rows = []
    for alpha in (None, 0.5):
        for clients in args.clients:
            config = Config(**recipe_options("paper"), dataset="fashion-mnist", data_dir=str(args.shared / "data"), image_size=28,
                            weights=str(args.shared / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"),
                            train_samples=args.train_samples, clients=clients, clients_per_round=min(10, clients),
                            alpha=alpha, device="cpu")
            rows.append({"alpha": alpha, **in_fresh_process(__file__, config.to_dict())})
            print(rows[-1], file=sys.stderr)

    samples = f"{args.train_samples:,}" if args.train_samples else "all 60,000"
    lines = [command_line("python benchmarks/scale.py") + ". "
             f"Setting up a run's federation (`federation.prepare`) in a fresh process: Fashion-MNIST ({samples} training "
             "images), ViT-S/14 at 28 px, the number of clients changed and nothing else. Memory is what set-up adds "
             "to the process (after imports); per idle client is its growth over the smallest count, divided by "
             "the clients added.",
             "", "| partition | clients | set-up | resident memory added | peak | per idle client |", "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["alpha"] == row["alpha"])
        added = row["clients"] - base["clients"]
        per_client = f"{(row['rss_mib'] - base['rss_mib']) * 1024 / added:.1f} KB" if added else "-"
        lines.append(f"| {'IID' if row['alpha'] is None else 'Dirichlet ' + str(row['alpha'])} | {row['clients']:,} "
                     f"| {row['setup_s']:.1f} s | {row['rss_mib']:.0f} MiB | {row['peak_mib']:.0f} MiB | {per_client} |")
    publish(lines, args.markdown)


if __name__ == "__main__":  # the script's folder is on sys.path: write_benchmarks imports in both modes
    if sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
    else:
        main()
