"""How to fit a federated linear probe: the measurements behind `--method linear-probe`'s closed form.

Every fit here reads the same features: the frozen body's output for each training image without
prompts, through the tail's frozen final norm and pooling (what `Client.probe_statistics` computes),
computed once per dataset and seed. Centrally: logistic regression fitted to convergence (full-batch
L-BFGS, L2 penalty of scikit-learn's C = 0.1), the tail trained as a split method trains it (Adam
mini-batches), and the closed-form discriminant (`sfprompt.probe`). Federated, on the default job's
federation (10 clients, 5 a round, 5 rounds, IID and Dirichlet(0.5)): FedAvg of logistic tails fitted
locally by L-BFGS from the global one (a few iterations, or to convergence), against the closed form
from the statistics accumulated over the rounds, which is what the method runs.

    python benchmarks/probe_fit.py                   # about 15 minutes on two CPU cores
    python benchmarks/probe_fit.py --seeds 0 --datasets mnist-5k --out /tmp/probe   # one setting

Writes results/probe-fit/results.json and docs/benchmarks/probe-fit.md (--out and --doc move them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfprompt.aggregate import fedavg  # noqa: E402
from sfprompt.config import Config  # noqa: E402
from sfprompt.data import partition  # noqa: E402
from sfprompt.federation import prepare  # noqa: E402
from sfprompt.probe import accumulate, feature_statistics, fit_classifier  # noqa: E402

SHARED = ROOT.parent / "shared"
SETTINGS = {  # the default job, and core.sh's Fashion-MNIST setting
    "mnist-5k": {},
    "fashion-mnist": {"dataset": "fashion-mnist", "data_dir": str(SHARED / "data"), "train_samples": 5000,
                      "test_samples": 2000,
                      "weights": str(SHARED / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors")},
}
PARTITIONS = {"iid": None, "dirichlet-0.5": 0.5}
CLIENTS, PER_ROUND, ROUNDS = 10, 5, 5
C = 0.1  # scikit-learn's inverse penalty: 1 / (C n) on the mean loss over n samples


@torch.no_grad()
def tail_features(model, params, data, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail's features of every sample of `data` (the frozen final norm and pooling of the frozen body's rows,
    what `Client.probe_statistics` computes), taken with `params`' prompts and tail, and their labels."""
    zs, ys = [], []
    for images, labels in torch.utils.data.DataLoader(data, batch_size=batch_size):
        rows = model.body(model.head(images, params.prompts))[:, model.layout.tail_rows]
        zs.append(params.tail.features(rows))
        ys.append(labels)
    return torch.cat(zs), torch.cat(ys)


def features(config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The tail's features of every training and test image (no prompts), their labels, and the tail."""
    fed = prepare(config.replace(method="linear-probe"))
    params = fed.method.new_params(fed.model)
    return (*tail_features(fed.model, params, fed.train), *tail_features(fed.model, params, fed.test), params.tail)


def accuracy(weight, bias, z, y) -> float:
    """The share of the samples with features `z` and labels `y` that the classifier (weight, bias) gets right."""
    return float(((z @ weight.T + bias).argmax(1) == y).float().mean())


def logistic(z, y, classes, l2, start=None, iterations=500):
    """Logistic regression with an `l2` penalty on the mean loss, by full-batch L-BFGS from `start` (zero
    weights by default)."""
    weight = torch.zeros(classes, z.shape[1]) if start is None else start[0].clone()
    bias = torch.zeros(classes) if start is None else start[1].clone()
    weight.requires_grad_(True), bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(z @ weight.T + bias, y) + l2 / 2 * weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach(), bias.detach()


def adam_tail(z, y, classes, seed, epochs=100, lr=1e-3, batch=32):
    """The classifier trained as split training trains the tail: Adam on mini-batches (lr as tuned for sfl)."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(z.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for batch_idx in torch.randperm(len(z), generator=generator).split(batch):
            optimizer.zero_grad()
            F.cross_entropy(head(z[batch_idx]), y[batch_idx]).backward()
            optimizer.step()
    return head.weight.detach(), head.bias.detach()


def federated(z, y, zt, yt, classes, alpha, seed, fit) -> list[float]:
    """Test accuracy after each of ROUNDS rounds of `fit`, on the runner's client sampling."""
    parts = [torch.as_tensor(p) for p in partition(y.numpy(), CLIENTS, alpha, seed)]
    sampler = np.random.default_rng(seed)
    state, curve = None, []
    for _ in range(ROUNDS):
        clients = sorted(sampler.choice(CLIENTS, PER_ROUND, replace=False).tolist())
        state, (weight, bias) = fit(state, [parts[c] for c in clients])
        curve.append(accuracy(weight, bias, zt, yt))
    return curve


def closed_form(z, y, classes):
    def fit(state, parts):
        if state is None:
            state = {name: torch.zeros_like(v) for name, v in feature_statistics(z[:1], y[:1], classes).items()}
            state |= {"samples": torch.zeros((), dtype=torch.float64), "tail.head.weight": torch.zeros(classes, z.shape[1]),
                      "tail.head.bias": torch.zeros(classes)}
        uploads = [{**state, **feature_statistics(z[p], y[p], classes)} for p in parts]
        state = accumulate(state, uploads, [len(p) for p in parts])
        return state, (state["tail.head.weight"], state["tail.head.bias"])
    return fit


def fedavg_logistic(z, y, classes, iterations):
    """Each client fits from the global classifier, with the central fit's penalty (that of all n samples)."""
    def fit(state, parts):
        start = state or (torch.zeros(classes, z.shape[1]), torch.zeros(classes))
        local = [logistic(z[p], y[p], classes, 1 / (C * len(z)), start, iterations) for p in parts]
        averaged = fedavg([{"w": w, "b": b} for w, b in local], [len(p) for p in parts])
        state = (averaged["w"], averaged["b"])
        return state, state
    return fit


def measure(dataset: str, seed: int, size: dict) -> dict:
    config = Config(**{**SETTINGS[dataset], **size}, seed=seed, clients=CLIENTS, clients_per_round=PER_ROUND)
    z, y, zt, yt, _ = features(config)
    classes = int(max(y.max(), yt.max())) + 1
    row = {"central": {
        "logistic (L-BFGS, C = 0.1)": accuracy(*logistic(z, y, classes, 1 / (C * len(z))), zt, yt),
        "tail by Adam (100 epochs, lr 1e-3)": accuracy(*adam_tail(z, y, classes, seed), zt, yt),
        "closed form (LDA + OAS)": accuracy(*fit_classifier(feature_statistics(z, y, classes), len(z)), zt, yt),
    }}
    for name, alpha in PARTITIONS.items():
        row[name] = {
            "FedAvg of logistic, 30 L-BFGS steps": federated(z, y, zt, yt, classes, alpha, seed,
                                                             fedavg_logistic(z, y, classes, 30)),
            "FedAvg of logistic, to convergence": federated(z, y, zt, yt, classes, alpha, seed,
                                                            fedavg_logistic(z, y, classes, 500)),
            "closed form, accumulated (linear-probe)": federated(z, y, zt, yt, classes, alpha, seed,
                                                                  closed_form(z, y, classes)),
        }
    return row


def report(results: dict, seeds: list[int]) -> str:
    def cell(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    lines = [f"Command: `python benchmarks/probe_fit.py`; seeds {', '.join(map(str, seeds))} (each its own "
             "training subset where the dataset is subsampled, client partition and sampling); ViT-S/14 at 56 px, "
             "no prompts. Test accuracy, mean ± standard deviation over the seeds.", ""]
    for dataset, by_seed in results.items():
        rows = list(by_seed.values())
        lines += [f"## {dataset}", "", "| fit | central | " + " | ".join(f"{p}, after round {ROUNDS}"
                                                                           for p in PARTITIONS) + " |",
                  "|---|---|" + "---|" * len(PARTITIONS)]
        for name in rows[0]["central"]:
            lines.append(f"| {name} | {cell([r['central'][name] for r in rows])} |" + " |" * len(PARTITIONS))
        for name in rows[0][next(iter(PARTITIONS))]:
            lines.append(f"| {name} | |" + "".join(f" {cell([r[p][name][-1] for r in rows])} |" for p in PARTITIONS))
        lines.append("")
        lines.append("Per round (mean over seeds): " + "; ".join(
            f"{p} {name}: " + ", ".join(f"{statistics.mean(r[p][name][k] for r in rows):.3f}" for k in range(ROUNDS))
            for p in PARTITIONS for name in rows[0][p]) + ".")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "results" / "probe-fit"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "probe-fit.md"))
    parser.add_argument("--train-samples", type=int, help="fewer training samples than the setting's (tests)")
    parser.add_argument("--test-samples", type=int, help="fewer test samples than the setting's (tests)")
    parser.add_argument("--image-size", type=int, help="another image size than the setting's 56 px (tests)")
    args = parser.parse_args()
    size = {name: getattr(args, name) for name in ("train_samples", "test_samples", "image_size")
            if getattr(args, name) is not None}
    results = {dataset: {seed: measure(dataset, seed, size) for seed in args.seeds} for dataset in args.datasets}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results, args.seeds)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
