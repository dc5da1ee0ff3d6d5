"""What a Flower ClientApp costs before it trains: the time to build what it needs for a message and the
memory that holds it, each in a fresh process, as a deployed SuperNode runs every message.

    python benchmarks/clientapp.py            # about 3 minutes on two cores; writes a 344 MB ViT-B file
                                              # under --out (random values: only sizes matter here)

Three ways to build one client's side of the benchmark run (Fashion-MNIST, 5,000 samples, 10 clients):
  before        what the ClientApp did until this report was added: `federation.prepare` (the whole
                dataset, partitioned, and the whole ViT) and then dropping the body
  partition     `federation.prepare_client` without a folder (simulation): the whole dataset to draw the
                seeded partition, and from the weights file only the head's and tail's tensors
  own folder    `prepare_client` with the node's own `data-folder` (deployment): its own images only
and, in one process, a second message (the simulation engine keeps its processes; `client_side` keeps
the build between a run's messages). For ViT-S/14 at 56 px (the real checkpoint) and ViT-B/16 at
224 px (the deployment scale). Prints a Markdown report and writes docs/benchmarks/clientapp.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from write_benchmarks import memory_mib  # this script's folder is on sys.path

BUILDS = ("before", "partition", "own folder")
MODELS = {  # name -> (timm model, image size, weights: "shared" = the real checkpoint, else generated)
    "ViT-S/14, 56 px": ("vit_small_patch14_dinov2", 56, "shared"),
    "ViT-B/16, 224 px": ("vit_base_patch16_224", 224, "generated"),
}


def child(spec: dict) -> None:
    """One build in this (fresh) process; prints its measurements as JSON."""
    started = time.perf_counter()
    import torch  # noqa: F401 (imports are part of a fresh process's cost, reported apart)

    from sfprompt.config import Config
    from sfprompt.federation import prepare
    from sfprompt.flower import client_app
    imported, after_imports = time.perf_counter(), memory_mib()["VmRSS"]
    config = Config.from_dict(spec["config"])
    if spec["build"] == "before":
        fed = prepare(config)
        fed.model.drop_body()
        model = fed.model
    else:
        side = client_app.client_side(json.dumps(spec["config"]), 0, json.dumps(spec["classes"]), spec["folder"],
                                      config.client_blocks)
        model = side.model
    built = time.perf_counter()
    if spec["build"] != "before":  # a second message of the run in the same process
        client_app.client_side(json.dumps(spec["config"]), 0, json.dumps(spec["classes"]), spec["folder"],
                               config.client_blocks)
    again = time.perf_counter()
    held = sum(t.numel() * t.element_size() for t in model._vit.state_dict().values())
    print(json.dumps({"import_s": imported - started, "build_s": built - imported, "again_s": again - built,
                      "imports_rss_mib": after_imports, "build_peak_mib": memory_mib()["VmHWM"] - after_imports,
                      "model_mb": held / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("runs/clientapp"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/clientapp.md"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--train-samples", type=int, default=5000)
    args = parser.parse_args()
    from safetensors.torch import save_file

    from sfprompt.config import Config, recipe_options
    from sfprompt.data import write_client_folder
    from sfprompt.federation import prepare
    from sfprompt.model import create_vit
    from write_benchmarks import command_line, in_fresh_process, publish

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in args.models:
        model, size, source = MODELS[label]
        weights = args.shared / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"
        if source == "generated":
            weights = args.out / f"{model}.safetensors"
            if not weights.is_file():
                save_file({k: v.contiguous() for k, v in create_vit(model, 1000, size, "none").state_dict().items()},
                          str(weights))
        config = Config(**recipe_options("paper"), dataset="fashion-mnist", data_dir=str(args.shared / "data"), model=model, image_size=size,
                        weights=str(weights), train_samples=args.train_samples, clients=10, out=str(args.out / "run"))
        fed = prepare(config)
        folder = args.out / f"client-0-of-{args.train_samples}"
        if not folder.is_dir():
            write_client_folder(fed.data.train, [fed.train.indices[p] for p in fed.clients[0].data.indices],
                                fed.data.classes, folder)
        spec = {"config": config.to_dict(), "classes": fed.data.classes}
        del fed
        for build in BUILDS:
            result = in_fresh_process(__file__, spec | {"build": build, "folder": str(folder) if build == "own folder" else None})
            rows.append({"model": label, "build": build, **result})
            print(rows[-1], file=sys.stderr)
    (args.out / "clientapp.json").write_text(json.dumps(rows, indent=2) + "\n")

    lines = [command_line("python benchmarks/clientapp.py") + ". "
             f"Each row is a fresh process building one client's side of a run (Fashion-MNIST, {args.train_samples:,} "
             f"training samples, 10 clients) as a deployed SuperNode does for every message: *before* is what the "
             "ClientApp did before commit 381da75 (the whole dataset and the whole ViT, then the body dropped); *partition* is a simulated node "
             "now (the whole dataset for its seeded partition, the head's and tail's weights only); *own folder* a "
             "deployed node with its own images only. A second message in the same process (the simulation engine "
             "keeps its processes) reuses the build.",
             "",
             "| model | build | imports (time, RSS) | build | second message | memory the build adds at its peak "
             "| model tensors kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        again = "rebuilt" if r["build"] == "before" else f"{1e3 * r['again_s']:.2f} ms"
        lines.append(f"| {r['model']} | {r['build']} | {r['import_s']:.1f} s, {r['imports_rss_mib']:.0f} MiB "
                     f"| {r['build_s']:.2f} s | {again} | {r['build_peak_mib']:.0f} MiB | {r['model_mb']:.1f} MB |")
    publish(lines, args.markdown)


if __name__ == "__main__":  # the script's folder is on sys.path: write_benchmarks imports in both modes
    if sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
    else:
        main()
