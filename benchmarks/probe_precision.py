"""How much the probe round's closed form depends on the precision of the clients' statistics and features.

Each client reports float32 averages of its features' class sums and raw second moment (`Client.probe_statistics`),
and the server's within-class covariance is the second moment less the class means' outer products. This takes the
features of every training image through the frozen body with a run's initial prompts, as a probe round that asks
every client does, and fits the classifier (a) from the statistics of all of them in float64 and (b) as the run
does, from each client's float32 averages under FedAvg, IID and Dirichlet(0.5): the same samples, so an exact fit
would be the same in all three. Then, (c) the float64 fit of the features each multiplied by 1 + 1e-7 N(0, 1), three
draws: how far a perturbation at float32's own resolution, as another machine, thread count or batch would compute
the features, moves the fit. Each fit is scored in float32, as a run's tail scores it.

With 50 prompts the columns once parted by up to 1.5 points (0.926 to 0.941): not the statistics' precision, but
the fit's float32 logits, which cancelled from weights of 4e5 before `probe.fit_classifier` fitted about the
features' mean. Since then every column agrees within a sample.

    python benchmarks/probe_precision.py        # the default job, seed 0, 0 / 10 / 50 prompts: about 20 min on one core
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_fit import accuracy, tail_features  # noqa: E402
from write_benchmarks import machine  # noqa: E402

from sfprompt.aggregate import fedavg  # noqa: E402
from sfprompt.config import Config  # noqa: E402
from sfprompt.federation import prepare  # noqa: E402
from sfprompt.probe import RunningStatistics, feature_statistics, fit_classifier  # noqa: E402


BATCH = 64  # the features' batches (the 50-prompt fit moved with their last bits before the fix: keep it)
DRAWS, RELATIVE = 3, 1e-7  # the perturbed fits: how many, and the relative size of the features' perturbation


def float64_fit(clients: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                draw: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit from the float64 statistics of every client's features together; with a `draw`, each feature value
    multiplied first by 1 + RELATIVE N(0, 1) from a generator seeded by it."""
    running = RunningStatistics(num_classes)
    generator = torch.Generator().manual_seed(draw) if draw is not None else None
    for z, labels in clients:
        z = z.double()
        if generator is not None:
            z = z * (1 + RELATIVE * torch.randn(z.shape, generator=generator, dtype=torch.float64))
        running.add(z, labels)
    return fit_classifier({name: total / running.samples for name, total in running.sums.items()}, running.samples)


def measure(options: dict, tokens: int) -> dict[str, float | list[float]]:
    """The test accuracy of each fit with `tokens` initial prompts (of the perturbed fits, a list: one a draw)."""
    result, test = {}, None
    for partition, alpha in (("iid", None), ("dirichlet-0.5", 0.5)):
        config = Config.from_dict({**options, "prompt_tokens": tokens, "alpha": alpha})
        fed = prepare(config)
        params = fed.method.new_params(fed.model)
        test = test or tail_features(fed.model, params, fed.test, BATCH)
        clients = [tail_features(fed.model, params, client.data, BATCH) for client in fed.clients]
        samples = sum(len(labels) for _, labels in clients)
        if not result:  # every client's samples together: the same in both partitions
            result["float64"] = accuracy(*float64_fit(clients, fed.model.num_classes), *test)
            result["perturbed"] = [accuracy(*float64_fit(clients, fed.model.num_classes, draw), *test)
                                   for draw in range(1, 1 + DRAWS)]
        reported = [feature_statistics(z, labels, fed.model.num_classes) for z, labels in clients]  # float32
        averaged = fedavg(reported, [len(labels) for _, labels in clients])  # as the server's accumulate
        result[f"float32 {partition}"] = accuracy(*fit_classifier(averaged, samples), *test)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[0, 10, 50], help="initial prompt counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="run options as JSON (a test runs it at a tiny size)")
    parser.add_argument("--markdown", default="docs/benchmarks/probe-precision.md")
    args = parser.parse_args(argv)
    options = {"seed": args.seed, **json.loads(args.options)}
    rows = []
    for tokens in args.prompts:
        result = measure(options, tokens)
        rows.append(f"| {tokens} | {result['float64']:.3f} | {result['float32 iid']:.3f} | "
                    f"{result['float32 dirichlet-0.5']:.3f} | {min(result['perturbed']):.3f} to "
                    f"{max(result['perturbed']):.3f} |")
        print(rows[-1], flush=True)
    command = "python benchmarks/probe_precision.py" + (f" --seed {args.seed}" if args.seed else "")
    text = "\n".join([
        f"Command: `{command}`; {machine()}. The default job's training images (seed {args.seed}) through the",
        "frozen body with a run's initial prompts, as a probe round that asks every client takes them; test accuracy",
        "of the closed-form classifier fitted from the statistics of all of them in float64, and as the run fits it",
        "from each client's float32 averages under FedAvg, with the clients of an IID and a Dirichlet(0.5)",
        "partition: the same samples each time, so that an exact fit would score the same in all three columns. The",
        f"last: the float64 fit of the features each multiplied by 1 + {RELATIVE:g} N(0, 1), {DRAWS} draws (a",
        "perturbation at float32's own resolution, as another machine, thread count or batch computes the features).",
        "",
        "| prompts | float64, all samples | float32 clients, IID | float32 clients, Dirichlet(0.5) "
        "| float64, perturbed |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
