"""What each wire format keeps of the probe's features: the measurement behind the wire default.

The default recipe opens with a probe round, whose classifier is fitted in closed form on the rows the body
returns. So a format that rounds those rows changes the fit itself, not only a gradient step. On the default
job (mnist-5k, ViT-S/14 at 56 px, the fixed 4,000 / 1,000 split), this fits the probe centrally on every
training image, without prompts and with the 10 initial prompts of seed 0, with the tokens going up and the
rows coming back each in float32 or rounded to a format, as the body server would receive and send them.

    python benchmarks/wire_probe.py        # about 10 minutes on two CPU cores

Writes results/wire-probe/results.json and docs/benchmarks/wire-probe.md (--out and --doc move them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sfprompt.config import Config
from sfprompt.federation import prepare
from sfprompt.probe import feature_statistics, fit_classifier
from sfprompt.wire import WireFormat

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("float32", "bfloat16", "float16", "int8")


def rounded(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` as a receiver decodes it from the wire in `dtype`."""
    wire = WireFormat(dtype)
    return wire.unpack(wire.pack("x", tensor), {"x": (None, *tensor.shape[1:])})["x"]


@torch.no_grad()
def body_rows(fed, data, prompts: torch.Tensor, up: str, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the body returns for every image of `data` (as the tail reads them), its tokens sent in `up`."""
    model, rows, labels = fed.model, [], []
    for images, targets in torch.utils.data.DataLoader(data, batch_size=batch):
        tokens = rounded(model.head(images.to(fed.device), prompts), up)
        rows.append(model.body(tokens)[:, model.layout.tail_rows].cpu())
        labels.append(targets)
    return torch.cat(rows), torch.cat(labels)


def accuracy(fed, train: tuple, test: tuple, down: str) -> float:
    """The closed-form probe's test accuracy on body rows returned in `down`."""
    tail = fed.method.new_params(fed.model).tail.cpu()
    with torch.no_grad():
        (z, y), (zt, yt) = ((tail.features(rounded(rows, down)), labels) for rows, labels in (train, test))
    weight, bias = fit_classifier(feature_statistics(z, y, fed.model.num_classes), len(z))
    return float(((zt @ weight.T + bias).argmax(1) == yt).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "wire-probe"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "wire-probe.md"))
    parser.add_argument("--options", default="", help="run options for a smaller setting (tests), e.g. '--model test_vit'")
    args = parser.parse_args()
    from sfprompt.cli import config_from_args, build_parser

    config = config_from_args(build_parser().parse_args(["run", *args.options.split()]))
    torch.manual_seed(config.seed)
    fed = prepare(config.replace(out=str(Path(args.out) / "unused")))
    prompts = fed.method.new_params(fed.model).prompts
    rows = []
    for name, chosen in (("no prompts", prompts[:, :0]), (f"{prompts.shape[1]} initial prompts", prompts)):
        for up in FORMATS:  # each format of the tokens, the rows back in float32; then float32 tokens, rows rounded
            train, test = body_rows(fed, fed.train, chosen, up), body_rows(fed, fed.test, chosen, up)
            for down in FORMATS if up == "float32" else ("float32",):
                rows.append({"prompts": name, "up": up, "down": down, "accuracy": accuracy(fed, train, test, down)})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config.to_dict(), "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `python benchmarks/wire_probe.py`; {config.dataset}, {len(fed.train)} train / {len(fed.test)} "
             f"test samples, {config.model} at {config.image_size} px, seed {config.seed}. The closed-form probe fitted "
             "centrally on every training image, the tokens going up and the rows coming back each in float32 or "
             "rounded to a wire format as the body server decodes it. Test accuracy.", "",
             "| prompts | tokens up | rows down | accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['prompts']} | {r['up']} | {r['down']} | {r['accuracy']:.4f} |" for r in rows]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
