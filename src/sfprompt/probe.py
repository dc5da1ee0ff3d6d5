"""The federated linear probe: a classifier on the frozen body's features, fitted in closed form from
statistics the clients report, with no training loop.

Each client sends its images through the frozen body once (`Client.probe_statistics`), turns the rows
the body returns into the tail's features (its final norm and pooling, frozen in the probe), and keeps three
averages over its samples: how often each class occurs, the per-class feature sums, and the feature
second moment. Averaged over clients weighted by their sample counts (FedAvg), these are exactly the
averages over all their samples, so the server's classifier is the one a central fit on the same
samples would give, whatever the label skew: a shared-covariance Gaussian classifier (linear
discriminant analysis), W = (M - mu) S^-1 with M the class means, mu their mean and S the pooled within-class
covariance, shrunk towards a multiple of the identity by the Oracle Approximating Shrinkage rule (Chen et al., 2010),
which needs nothing but S and the sample count: a few hundred samples of 384 features leave S singular,
and no fixed shrinkage suits both them and thousands (measured in the same benchmark).

Why not FedAvg of tails trained locally: the features have a large common mean (condition number in
the thousands), so Adam's mini-batches stop about a point short of the optimum a full logistic
regression reaches, and FedAvg of local fits drifts under label skew: after the default job's 5 rounds
under Dirichlet(0.5), 0.74 against the closed form's 0.93 on mnist-5k, 0.68 to 0.72 against 0.83 on
Fashion-MNIST, which is within a point of the central logistic regression in both partitions (measured:
`benchmarks/probe_fit.py`, docs/benchmarks/probe-fit.md). The closed form is the approach of FedNCM
(Legate et al., 2023), Fed3R (Fanì et al., 2024) and FedCGS (Guan et al., 2025).

The statistics accumulate over the rounds, each round's clients weighted by their samples (a client
sampled twice counts twice, as FedAvg counts it), so once every client has reported the fit is the
central one. What they show the server (each client's label counts and class means, unless secure
aggregation sums them first) is said in docs/privacy.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aggregate import fedavg

STATISTICS = ("class_frequency", "class_sums", "second_moment")
SAMPLES = "samples"  # the global state's count of the samples its statistics average over
ABSENT = -1e4  # the bias of a class no client has shown yet: never predicted


class RunningStatistics:
    """A client's statistics, summed batch by batch (in float64), so that what it holds does not grow with
    its samples: `averages` are the class frequencies (C,), the per-class feature sums over the samples
    (C, D), and the feature second moment (D, D), in float32. The sums are made like the first batch's
    features (their width, device and kind: fake ones under `sfprompt cost`)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.samples = num_classes, 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        z = features.detach().double()
        if not self.sums:
            width = z.shape[1]
            self.sums = {name: z.new_zeros(shape) for name, shape in (
                ("class_frequency", (self.num_classes,)), ("class_sums", (self.num_classes, width)),
                ("second_moment", (width, width)))}
        onehot = F.one_hot(labels, self.num_classes).double()
        self.sums["class_frequency"] += onehot.sum(0)
        self.sums["class_sums"] += onehot.T @ z
        self.sums["second_moment"] += z.T @ z
        self.samples += len(z)

    def averages(self) -> dict[str, torch.Tensor]:
        if not self.samples:
            raise ValueError("no samples: statistics need at least one")
        return {name: (total / self.samples).float() for name, total in self.sums.items()}


def feature_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The statistics of samples with `features` (N, D) and `labels` (N,), as `RunningStatistics` averages them."""
    running = RunningStatistics(num_classes)
    running.add(features, labels)
    return running.averages()


def fit_classifier(statistics: dict[str, torch.Tensor], samples: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear discriminant (weight (C, D), bias (C,)) of statistics averaged over `samples` samples: with the
    class means M, their frequency-weighted mean mu, the offsets A = M - mu and the pooled within-class covariance S
    shrunk by OAS, W = A S^-1 and b = -W (mu + A / 2) + log(class frequency). Computed in float64, returned in
    float32.

    That is the textbook W = M S^-1, b = -1/2 diag(M S^-1 M^T) + log(class frequency) less a term every class
    shares. The dropped term is the tail's features' large shared mean (a LayerNorm's output), which S^-1 amplified
    into weights of up to 4e5, whose float32 logits cancelled to a few units (docs/results.md: up to 4.5 points of
    accuracy, depending on the machine's rounding)."""
    frequency = statistics["class_frequency"].double()
    sums, second = statistics["class_sums"].double(), statistics["second_moment"].double()
    present = frequency > 0
    means = torch.zeros_like(sums)
    means[present] = sums[present] / frequency[present, None]
    within = second - (frequency[:, None, None] * means[:, :, None] * means[:, None, :]).sum(0)
    within = (within + within.T) / 2
    mean = (frequency[:, None] * means).sum(0) / frequency.sum()
    offsets = means - mean  # A
    weight = torch.linalg.solve(oas_shrunk(within, samples), offsets.T).T  # (C, D)
    bias = -(weight * (mean + offsets / 2)).sum(1) + torch.log(frequency.clamp_min(1e-300))
    weight[~present] = 0
    bias[~present] = ABSENT
    return weight.float(), bias.float()


def oas_shrunk(covariance: torch.Tensor, samples: float) -> torch.Tensor:
    """(1 - rho) S + rho tr(S) / D I, with the Oracle Approximating Shrinkage coefficient rho of a D x D sample
    covariance S from `samples` samples (Chen, Wiesel, Eldar & Hero, 2010; scikit-learn's `OAS`)."""
    width = covariance.shape[0]
    trace, trace_sq = torch.trace(covariance), (covariance * covariance).sum()
    mean_variance = trace / width
    denominator = (samples + 1 - 2 / width) * (trace_sq - trace**2 / width)
    rho = 1.0 if float(denominator) <= 0 else min(1.0, float(((1 - 2 / width) * trace_sq + trace**2) / denominator))
    eye = torch.eye(width, dtype=covariance.dtype, device=covariance.device)
    return (1 - rho) * covariance + rho * mean_variance.clamp_min(1e-12) * eye


class ProbeParams(nn.Module):
    """A probe's global state: the prompts the features are taken with (frozen; none for linear-probe, which
    reads the pre-trained model's own tokens; the initial ones when a probe round opens a prompt method's
    run, the trained ones when a refit round closes it), the tail (final norm and pooling, frozen here, then the
    fitted classifier), and the statistics it was fitted on, with how many samples they average over."""

    def __init__(self, prompts: torch.Tensor, tail: nn.Module, num_classes: int, width: int) -> None:
        super().__init__()
        if not isinstance(tail.head, nn.Linear):
            raise ValueError("a linear probe fits a linear classifier: the model's head must be nn.Linear")
        self.register_buffer("prompts", prompts.detach().clone())  # (1, P, D)
        self.tail = tail
        self.register_buffer("class_frequency", torch.zeros(num_classes))
        self.register_buffer("class_sums", torch.zeros(num_classes, width))
        self.register_buffer("second_moment", torch.zeros(width, width))
        self.register_buffer(SAMPLES, torch.zeros((), dtype=torch.float64))

    def report(self, statistics: dict[str, torch.Tensor]) -> None:
        """Put a client's own statistics where its upload carries them."""
        with torch.no_grad():
            for name in STATISTICS:
                getattr(self, name).copy_(statistics[name])


def accumulate(current: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
               weights: list[int]) -> dict[str, torch.Tensor]:
    """The next global state: the statistics so far and the uploads' averaged, each weighted by its
    samples, and the classifier fitted on them (the tail's norm stays as it was broadcast)."""
    seen = float(current[SAMPLES])
    pick = lambda state: {name: state[name] for name in STATISTICS}  # noqa: E731
    statistics = fedavg([pick(current), *map(pick, uploads)], [seen, *weights])
    samples = current[SAMPLES] + sum(weights)
    weight, bias = fit_classifier(statistics, float(samples))
    return {**current, **statistics, SAMPLES: samples,
            "tail.head.weight": weight.to(current["tail.head.weight"]),
            "tail.head.bias": bias.to(current["tail.head.bias"])}
