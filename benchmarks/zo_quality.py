"""How good forward-only's prompt gradient is, before any federation: the estimate of `sfprompt.zeroth_order`
against the true gradient of the same loss, on the real model.

On the headline setting (mnist-5k, ViT-S/14 at 56 px, 50 prompts: where prompt tuning beats the probe by two
points centrally, docs/benchmarks/central.md), with the initial prompts and the tail fitted in closed form on
their features (where the default recipe's split training starts), this takes mini-batches of 32 training
images and compares, for every perturbation size and number of directions K, each estimator's estimate g^ of
the prompts' gradient with the true one g (backpropagated through the body; the residual one, K = 1, from the
second batch on: its loss at p + eps z against the previous batch's, the tail and prompts held): their cosine, and
the descent g . g^ / |g|^2, which is 1 on average for an unbiased estimate. For exact directional derivatives along K
standard normal directions in d dimensions the expected cosine is about sqrt(K / (K + d)): the table gives it
beside the measured one, so a perturbation that is too small (float rounding) or too large (curvature) shows
as a shortfall from it.

    python benchmarks/zo_quality.py        # about 10 minutes on two CPU cores

Writes results/zo-quality/results.json and docs/benchmarks/zo-quality.md (--out and --doc move them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from sfprompt import zeroth_order
from sfprompt.config import ESTIMATORS
from sfprompt.federation import prepare
from sfprompt.probe import feature_statistics, fit_classifier

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def probe_tail(fed, prompts: torch.Tensor) -> torch.nn.Module:
    """The tail with its classifier fitted in closed form on every training image's features under `prompts`."""
    model, tail = fed.model, fed.method.new_params(fed.model).tail
    features, labels = [], []
    for images, targets in torch.utils.data.DataLoader(fed.train, batch_size=250):
        rows = model.body(model.head(images.to(fed.device), prompts))[:, model.layout.tail_rows]
        features.append(tail.features(rows))
        labels.append(targets.to(fed.device))
    features, labels = torch.cat(features), torch.cat(labels)
    weight, bias = fit_classifier(feature_statistics(features, labels, model.num_classes), len(features))
    tail.head.weight.copy_(weight.float())
    tail.head.bias.copy_(bias.float())
    return tail


def batch_loss(fed, tail, images: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    model = fed.model
    return F.cross_entropy(tail(model.body(model.head(images, prompts))[:, model.layout.tail_rows]), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "zo-quality"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "zo-quality.md"))
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--directions", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--perturbations", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--options", default="--prompt-tokens 50",
                        help="run options of the setting (default: the headline's 50 prompts; tests: '--model test_vit')")
    args = parser.parse_args()
    from sfprompt.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["run", *args.options.split()]))
    torch.manual_seed(config.seed)
    fed = prepare(config.replace(out=str(Path(args.out) / "unused")))
    prompts = fed.method.new_params(fed.model).prompts.detach()  # (1, P, D)
    tail = probe_tail(fed, prompts).requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(fed.train, batch_size=32, shuffle=True, generator=generator)
    kmax, dims = max(args.directions), prompts.numel()
    found: dict[tuple, list[tuple[float, float]]] = {}
    last: dict[float, torch.Tensor] = {}  # the previous batch's loss at p + eps z_1 (the residual estimator's)
    for batch, (images, labels) in zip(range(args.batches), loader):
        images, labels = images.to(fed.device), labels.to(fed.device)
        wanted = prompts.clone().requires_grad_(True)
        batch_loss(fed, tail, images, labels, wanted).backward()
        true = wanted.grad[0]
        directions = torch.randn((kmax, *prompts.shape[1:]), generator=generator).to(fed.device)
        for eps in args.perturbations:
            with torch.no_grad():
                sets = zeroth_order.prompt_sets(prompts[0], directions, eps, "antithetic")  # p, p + eps z, p - eps z
                losses = torch.stack([batch_loss(fed, tail, images, labels, p[None]) for p in sets])
            previous, last[eps] = last.get(eps), losses[1]
            for k in args.directions:
                for estimator in ESTIMATORS:  # all from the same losses: p, the first k of +, the first k of -
                    if estimator == "residual" and (k != 1 or previous is None):  # K = 1, from the second batch
                        continue
                    chosen = {"antithetic": torch.cat([losses[:1 + k], losses[1 + kmax:1 + kmax + k]]),
                              "one-sided": losses[:1 + k], "residual": losses[1:2]}[estimator]
                    estimate = zeroth_order.gradient(chosen, directions[:k], eps, estimator, previous)
                    cosine = float(F.cosine_similarity(estimate.flatten(), true.flatten(), dim=0))
                    descent = float((estimate * true).sum() / (true * true).sum())
                    found.setdefault((estimator, eps, k), []).append((cosine, descent))
        print(f"batch {batch + 1}/{args.batches} done", flush=True)
    rows = [{"estimator": estimator, "perturbation": eps, "directions": k, "prompt_dims": dims,
             "cosine": statistics.fmean(c for c, _ in values), "descent": statistics.fmean(d for _, d in values),
             "exact_cosine": math.sqrt(k / (k + dims)), "batches": len(values)}
            for (estimator, eps, k), values in found.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config.to_dict(), "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `python benchmarks/zo_quality.py`; {config.dataset}, {config.model} at {config.image_size} px, "
             f"{config.prompt_tokens} prompts ({dims} numbers), seed {config.seed}, the tail fitted in closed form on the "
             f"initial prompts' features; mean over {args.batches} mini-batches of 32{_residual_batches(rows)}. Cosine of "
             "the estimate with the "
             "true gradient, the descent g . g^ / |g|^2 (1 on average when unbiased), and the cosine exact directional "
             "derivatives would give, sqrt(K / (K + d)).", "",
             "| estimator | perturbation | directions K | cosine | exact-derivative cosine | descent |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['estimator']} | {r['perturbation']:g} | {r['directions']} | {r['cosine']:.4f} | "
              f"{r['exact_cosine']:.4f} | {r['descent']:.3f} |" for r in rows]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _residual_batches(rows: list[dict]) -> str:
    """How many mini-batches the residual rows' means are over (each batch's loss against the one before: from the
    second on), where any were measured."""
    counts = {r["batches"] for r in rows if r["estimator"] == "residual"}
    return f" (residual: the {max(counts)} from the second on, each against the one before)" if counts else ""


if __name__ == "__main__":
    main()
