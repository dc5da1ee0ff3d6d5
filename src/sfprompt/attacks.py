"""The attacks of an honest-but-curious server on what a client sends (run by `sfprompt audit`).

The attacker holds what the server legitimately holds: the architecture and the public pre-trained
weights (so the whole frozen head), the configuration and the defence's algorithm with its public
parameters, every message a client sends (activations, gradients, the uploaded prompts and tail),
and auxiliary images of the same domain that no client holds. It never holds a client's data,
labels or private randomness (its noise draws, shuffles and randomized labels).

Images are reconstructed as [0, 1] pixels at the model's input size (one channel when the domain
is grayscale); `Simulator` turns such pixels into the activations a client would send.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm.auto import tqdm

from .model import SplitViT


class Simulator:
    """The client's sending path as the attacker computes it: pixels -> model input -> head ->
    defence. `clean` is its deterministic part (clipped, no noise, in order); `observe` adds the
    defence's randomness with the attacker's own generator and undoes a shuffle as well as it can."""

    def __init__(self, model: SplitViT, prompts: torch.Tensor, mean, std, channels: int) -> None:
        self.model, self.prompts, self.channels = model, prompts.detach(), channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        defence = model.defence
        self.deterministic = dataclasses.replace(defence, shuffle=False, noise_multiplier=0.0)
        self.rows = model.private_rows  # the rows that depend on the input
        self.unshuffler: Unshuffler | None = None

    def unclipped(self) -> "Simulator":
        """This sending path without the defence's clipping (which scales each sample's rows by its own factor)."""
        path = copy.copy(self)
        path.deterministic = dataclasses.replace(self.deterministic, clip_norm=None)
        return path

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, channels, H, W) -> the model's normalised RGB input."""
        return (pixels.expand(-1, 3, -1, -1) - self.mean) / self.std

    @torch.no_grad()
    def clean_all(self, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """`clean` of many images (the auxiliary set), `chunk` at a time, without a graph."""
        return torch.cat([self.clean(pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)])

    def clean(self, pixels: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """The sent tokens (B, L, D) without the defence's randomness, made with `prompts` ((B, P, D): each
        sample's own) or the simulator's."""
        tokens = self.model.head(self.inputs(pixels), self.prompts if prompts is None else prompts)
        return self.deterministic.protect(tokens, self.rows, self.model.layout.patch_rows, None)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the attacks read from tokens in order (B, L, D): the input-dependent rows, flattened."""
        return tokens[:, self.rows].flatten(1)

    @torch.no_grad()
    def is_affine(self, aux: torch.Tensor) -> bool:
        """Whether the clean sending path is affine in the pixels, tried on mixtures of auxiliary images (up to
        8 pairs: each image with the next, however few there are)."""
        pairs = min(8, max(len(aux) // 2, 1))
        first, second = aux[:pairs], aux[pairs:2 * pairs] if len(aux) > 1 else aux.flip(-1)
        mixed = self.features(self.clean(0.3 * first + 0.7 * second))
        expected = 0.3 * self.features(self.clean(first)) + 0.7 * self.features(self.clean(second))
        return bool((mixed - expected).norm() <= 1e-3 * expected.norm())

    def received(self, tokens: torch.Tensor) -> torch.Tensor:
        """`features` of tokens as a client sent them: a shuffle is undone first, if there is one."""
        if self.unshuffler is not None:
            tokens = self.unshuffler(tokens)
        return self.features(tokens)

    def observe(self, clean: torch.Tensor, sends: int, generator: torch.Generator) -> torch.Tensor:
        """Features of `sends` independent protected sends of each sample, averaged (as the attacker
        averages a sample's repeated sends), from its `clean` tokens."""
        model = self.model
        total = sum(self.received(model.defence.protect(clean, self.rows, model.layout.patch_rows, generator))
                    for _ in range(sends))
        return total / sends


class Unshuffler:
    """Puts shuffled patch tokens back in place, one-to-one (the Hungarian algorithm), each received
    token at the position whose reference it is nearest to.

    Where the sending path is affine in the pixels (no client blocks), a token is its position's
    offset (the token of a black patch there) plus the embedding of its pixels, which lies in one
    subspace for every position: the distance that counts is the part of (token - offset) outside that
    subspace, and the position embeddings make it vanish at the right position only. Otherwise the
    reference is each position's mean token over the auxiliary images."""

    def __init__(self, references: torch.Tensor, patch_rows: slice, content: torch.Tensor | None = None) -> None:
        self.references, self.patch_rows = references, patch_rows  # (N, D)
        width = references.shape[1]
        # projection onto what the pixels cannot change, (D, D); the identity when it is not known
        self.residual = torch.eye(width) if content is None else torch.eye(width) - content @ content.T

    @classmethod
    def fit(cls, sim: "Simulator", aux: torch.Tensor) -> "Unshuffler":
        rows = sim.model.layout.patch_rows
        with torch.no_grad():
            if sim.is_affine(aux):
                offsets = sim.clean(torch.zeros(1, *aux.shape[1:]))[0, rows]  # (N, D)
                patch = sim.model.head.vit_embed.patch_embed.patch_size
                pixels = torch.zeros(aux.shape[1] * patch[0] * patch[1], *aux.shape[1:])
                for k, (c, y, x) in enumerate(np.ndindex(aux.shape[1], patch[0], patch[1])):
                    pixels[k, c, y, x] = 1.0  # one pixel of the first patch at a time
                changes = (sim.clean(pixels)[:, rows] - offsets).flatten(0, 1)
                _, values, vectors = torch.linalg.svd(changes, full_matrices=False)
                rank = int((values > 1e-5 * values[0]).sum())
                if rank < offsets.shape[1]:  # the pixels of a patch cannot reach every direction of a token
                    return cls(offsets, rows, vectors[:rank].T)
            return cls(sim.clean_all(aux)[:, rows].mean(0), rows)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.patch_rows]  # (B, N, D)
        outside = (patches[:, :, None] - self.references[None, None]) @ self.residual  # (B, N, N, D)
        costs = outside.pow(2).sum(-1).numpy()
        placed = torch.empty_like(patches)
        for b, cost in enumerate(costs):
            received, position = linear_sum_assignment(cost)
            placed[b, position] = patches[b, received]
        return torch.cat([tokens[:, : self.patch_rows.start], placed, tokens[:, self.patch_rows.stop :]], dim=1)


def affine_attack(sim: Simulator, observed: torch.Tensor, aux: torch.Tensor, noise_var: float | torch.Tensor,
                  max_dims: int = 16384) -> tuple[torch.Tensor | None, str]:
    """The linear minimum-mean-square-error estimate of the pixels where the sending path is affine
    in them (no client blocks): x = mu + S A' (A S A' + s I)^-1 (y - A mu - b), with A, b the path's
    matrix and offset, mu and S the mean and covariance of the auxiliary images and s the noise left
    after averaging (one for all samples, or each its own: (B,), as many sends as it made). Where A is
    injective and there is no noise it returns the exact input.

    Clipping makes the path affine up to a per-sample scale, c = min(1, C / |A x + b|): each sample's
    y / c is estimated first, its 1 / c (at least 1) as the most probable value under the same Gaussian
    model (y / c is A x + b, so the part of y outside what A x + b can reach fixes it), with the auxiliary
    images' own scales as prior. Returns (None, why) where it does not apply."""
    shape = aux.shape[1:]
    n = int(np.prod(shape))
    path = sim.unclipped()
    with torch.no_grad():
        if not path.is_affine(aux):
            return None, "the sending path is not affine in the pixels (client blocks at work)"
        m = observed.shape[1]
        if max(n, m) > max_dims:
            return None, f"{n} pixels and {m} sent numbers exceed the {max_dims} this solve handles"
        offset = path.features(path.clean(torch.zeros(1, *shape)))[0].double()
        columns = [path.features(path.clean(torch.eye(n)[i : i + 512].view(-1, *shape))).double() - offset
                   for i in range(0, n, 512)]
    matrix = torch.cat(columns).T  # (m, n)
    pixels = aux.flatten(1).double()
    mean = pixels.mean(0)
    covariance = torch.cov(pixels.T)
    covariance += 1e-3 * covariance.diagonal().mean() * torch.eye(n, dtype=torch.float64)  # fewer images than pixels
    # A S A' = U diag(values) U' from the thin SVD A L = U diag(singular) W' (S = L L'): min(m, n) cubed, not m cubed;
    # A S A' is zero beyond U, and S A' (A S A' + v I)^-1 = L W diag(singular / (values + v)) U' for every v.
    factor = torch.linalg.cholesky(covariance)
    basis, singular, right = torch.linalg.svd(matrix @ factor, full_matrices=False)
    values = singular**2
    jitter = float(1e-9 * values.mean())  # beside the noise, so that a noise-free solve stays defined
    expected = offset + mean @ matrix.T  # A mu + b
    scales = torch.ones(len(observed), dtype=torch.float64)
    noise_var = torch.as_tensor(noise_var, dtype=torch.float64).expand(len(observed))  # (B,)
    if sim.deterministic.clip_norm is not None:
        norms = path.features(path.clean_all(aux)).norm(dim=1)  # the auxiliary images' own scales: the prior
        prior = (norms.double() / sim.deterministic.clip_norm).clamp_min(1.0).log()
        scales = _unclipping_scales(values, basis, observed.double(), expected, noise_var, jitter, prior)
    # x = mu + S A' (A S A' + t^2 s I)^-1 (t y - A mu - b)
    weights = ((scales[:, None] * observed.double() - expected) @ basis
               / (values + jitter + (scales**2 * noise_var)[:, None]))
    estimate = mean + (weights * singular) @ right @ factor.T
    return estimate.float().clamp(0, 1).view(-1, *shape), ""


def _unclipping_scales(values: torch.Tensor, basis: torch.Tensor, observed: torch.Tensor, expected: torch.Tensor,
                       noise_var: float | torch.Tensor, jitter: float, prior: torch.Tensor,
                       grid: int = 400) -> torch.Tensor:
    """Each sample's 1 / c, the most probable t >= 1 given its observation y, where t y = A x + b + t n:
    t y ~ N(e, A S A' + t^2 s I) with e = A mu + b and A S A' = U diag(values) U' (zero beyond U; the scale's
    Jacobian t^m counted; s each sample's own, (B,)), with log t a priori normal with the mean and variance (at
    least (log 2)^2) of `prior`, the auxiliary images' log scales (noise alone leaves the likelihood nearly flat
    in t): a MAP estimate, searched on a geometric grid from 1 to ten times the largest auxiliary scale (at
    least 10^4), then twice more finely around the best point."""
    m, k = observed.shape[1], len(values)
    noise_var = torch.as_tensor(noise_var, dtype=torch.float64).expand(len(observed))
    p, q = observed @ basis, expected @ basis  # (B, k), (k,): the parts within U
    # |t y - e|^2 beyond U, as t^2 a - 2 t b + c per sample, from the parts beyond U themselves (no cancellation)
    y_beyond, e_beyond = observed - p @ basis.T, expected - q @ basis.T
    a, b, c = y_beyond.pow(2).sum(1), y_beyond @ e_beyond, e_beyond.pow(2).sum()
    # a spread of at least a factor of 2 either way: auxiliary images that are rarely clipped cannot pin t at 1
    centre, spread = prior.mean(), (prior.var(unbiased=False) if len(prior) > 1 else torch.tensor(1.0)).clamp_min(0.48)
    top = max(4.0, float(prior.max()) / math.log(10) + 1)  # decades: ten times the largest auxiliary scale, or 10^4

    def best(scales: torch.Tensor) -> torch.Tensor:  # each sample's scale of least loss among its candidates (B, T)
        losses = []
        for t in scales.split(8, dim=1):  # (B, 8, k) at a time
            within = values + jitter + t[..., None] ** 2 * noise_var[:, None, None]
            beyond = jitter + t**2 * noise_var[:, None]
            losses.append(((t[..., None] * p[:, None] - q) ** 2 / within).sum(-1) + within.log().sum(-1)
                          + (t**2 * a[:, None] - 2 * t * b[:, None] + c).clamp_min(0) / beyond
                          + (m - k) * beyond.log() - 2 * m * t.log() + (t.log() - centre) ** 2 / spread)
        return scales[torch.arange(len(scales)), torch.cat(losses, dim=1).argmin(1)]

    step = top / (grid - 1)  # decades between grid points
    scales = best(torch.logspace(0, top, grid, dtype=torch.float64).expand(len(observed), -1))
    for _ in range(2):  # twice finer around the best point: a relative error of about 1e-5 where there is no noise
        decades = scales.log10()[:, None] + torch.linspace(-step, step, 101, dtype=torch.float64)
        scales = best(10 ** decades.clamp_min(0))  # t >= 1
        step /= 50
    return scales


def optimisation_attack(sim: Simulator, observed: torch.Tensor, start: torch.Tensor, steps: int,
                        progress: bool = True, image: torch.Tensor | None = None,
                        prompts: torch.Tensor | None = None) -> torch.Tensor:
    """White-box optimisation: the pixels whose clean sent activations best match the observed ones
    (mean squared error; Adam on the pixels' logits with a cosine schedule), from the auxiliary mean image.
    `observed` holds one row per image, or one per send, `image` (S,) naming each send's image and `prompts`
    (S, P, D) the prompts it was made with (which the sent rows depend on where client blocks run)."""
    images = len(observed) if image is None else int(image.max()) + 1
    logits = torch.logit(start.clamp(0.02, 0.98)).expand(images, *start.shape).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    scale = observed.pow(2).mean().clamp_min(1e-12)
    for _ in tqdm(range(steps), desc="audit: white-box optimisation", unit="step", leave=False, disable=not progress):
        pixels = torch.sigmoid(logits) if image is None else torch.sigmoid(logits)[image]
        loss = (sim.features(sim.clean(pixels, prompts)) - observed).pow(2).mean() / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return torch.sigmoid(logits).detach()


class InversionNet(nn.Module):
    """A learned decoder from sent features to pixels: the features' top principal components
    (whitened, fitted on the auxiliary data), a two-layer MLP, and a linear path beside it, so it is
    never worse than the best linear decoder of those components."""

    def __init__(self, features: torch.Tensor, shape: tuple[int, ...], components: int = 512, hidden: int = 1024) -> None:
        super().__init__()
        self.shape = shape
        pixels = int(np.prod(shape))
        centred = features - features.mean(0)
        _, values, vectors = torch.linalg.svd(centred, full_matrices=False)
        k = min(components, len(values))
        scale = (values[:k] / max(len(features) - 1, 1) ** 0.5).clamp_min(1e-6)
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("basis", vectors[:k].T / scale)  # (features, k): projection and whitening
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, pixels))
        self.linear = nn.Linear(k, pixels)

    def components(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) @ self.basis

    def forward(self, components: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(components) + self.linear(components)).view(-1, *self.shape)


def learned_attack(sim: Simulator, observed: torch.Tensor, aux: torch.Tensor, sends: int, epochs: int,
                   generator: torch.Generator, progress: bool = True, batch_size: int = 128) -> torch.Tensor:
    """Trains an `InversionNet` on the auxiliary images, each sent through the simulated defence
    (fresh randomness every epoch, `sends` sends averaged, as the victim's), then decodes the
    observed features. It needs none of the client's secrets."""
    with torch.no_grad():
        clean = sim.clean_all(aux)
        random = sim.model.defence.shuffle or sim.model.defence.noise_std > 0
        features = sim.observe(clean, sends, generator)
        net = InversionNet(features, tuple(aux.shape[1:]))
        inputs = net.components(features)
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for epoch in tqdm(range(epochs), desc="audit: learned inversion", unit="epoch", leave=False, disable=not progress):
        if random and epoch:
            with torch.no_grad():
                inputs = net.components(sim.observe(clean, sends, generator))
        order = torch.randperm(len(aux), generator=generator)
        for i in range(0, len(aux), batch_size):
            batch = order[i : i + batch_size]
            loss = F.mse_loss(net(inputs[batch]), aux[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        schedule.step()
    with torch.no_grad():
        return net.eval()(net.components(observed))


def label_attacks(tail: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, grads: torch.Tensor,
                  sample: torch.Tensor, num_classes: int, keep_probability: float, graded: torch.Tensor | None = None,
                  tails: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
                  batch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each sample's label as the server infers it (one guess per distinct `sample` id, ascending), from the body
    output `rows` (S, R, D) of every send and the `backward` gradients `grads` of the sends `graded` marks (all, by
    default), in order:

    - label_free: the prediction of `tail` (one the server holds) from the rows it computed itself;
    - gradient: the class whose loss gradient at a send's rows points most like the gradient received (cosine
      similarity, summed over the sample's sends), the loss taken through the tail that send's gradient came
      from (`tails[batch[s]]`; `tail` by default), at any scale (a sure tail's gradients are 1e-20 and below); a
      gradient of exactly zero (the label's probability rounds to 1) names the class whose loss gradient is
      smallest, as a vote of similarity 1; a sample no gradient was received for keeps its label-free guess;
    - gradient_with_prior: the gradient's class combined with the model's prediction (its log-probabilities
      averaged over the sample's sends, which see the same image: summed, they would count it once a send), as a
      Bayesian attacker who knows the randomized-response rate (`keep_probability`) would combine them.
    """
    rows = rows.detach()
    graded = torch.ones(len(rows), dtype=torch.bool) if graded is None else graded
    tails, batch = ([tail], torch.zeros(len(rows), dtype=torch.long)) if tails is None else (tails, batch)
    received = torch.cumsum(graded, 0) - 1  # a graded send's row in `grads`
    similarity = torch.zeros(len(rows), num_classes)
    sent = torch.nonzero(graded).flatten()
    with torch.enable_grad():
        for b in batch[sent].unique().tolist():
            at = sent[batch[sent] == b]
            rows_ = rows[at].clone().requires_grad_(True)
            logits = tails[b](rows_)
            got = grads[received[at]].flatten(1)
            sizes = torch.zeros(len(at), num_classes)
            for c in range(num_classes):
                target = torch.full((len(at),), c, dtype=torch.long)
                (g,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), rows_, retain_graph=True)
                similarity[at, c] = (_direction(g.flatten(1)) * _direction(got)).sum(dim=1)
                sizes[:, c] = g.flatten(1).abs().amax(dim=1)
            zero = (got == 0).all(dim=1)  # no direction to compare: the label is where the loss has no gradient
            similarity[at[zero]] = F.one_hot(sizes[zero].argmin(dim=1), num_classes).float()
    prior = per_sample(log_probs(tail, rows), sample)
    sends = per_sample(torch.ones(len(rows), 1), sample)
    has_gradient = per_sample(graded[:, None].float(), sample)[:, 0] > 0
    gradient = torch.where(has_gradient, per_sample(similarity, sample).argmax(dim=1), prior.argmax(dim=1))
    return {"label_free": prior.argmax(dim=1), "gradient": gradient,
            "gradient_with_prior": with_randomized_label(prior / sends, gradient, keep_probability)}


def log_probs(tail: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The label-free log-probabilities (S, C) of `tail` on each send's rows, which the server computed itself."""
    with torch.no_grad():
        return tail(rows).log_softmax(dim=1)


def _direction(vectors: torch.Tensor) -> torch.Tensor:
    """Each row (n, d) as a unit vector, zeros kept: scaled first by its largest entry, so a gradient as small as a
    confident tail's (1e-20 and below) keeps its direction, where a cosine's norms would underflow to its eps."""
    scaled = vectors / vectors.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    return F.normalize(scaled, dim=1)


def with_randomized_label(prior: torch.Tensor, shown: torch.Tensor, keep_probability: float) -> torch.Tensor:
    """Each sample's most probable true label given its label-free log-scores `prior` (n, C) and the label `shown`
    (n,) that randomized response kept with `keep_probability` (else drew uniformly among the others): what a
    Bayesian attacker who knows the rate infers (the shown label itself where randomized response keeps every one)."""
    if keep_probability >= 1:
        return shown
    classes = prior.shape[1]
    other = (1 - keep_probability) / max(classes - 1, 1)
    likelihood = torch.where(F.one_hot(shown, classes).bool(), torch.tensor(keep_probability), torch.tensor(other))
    return (prior + likelihood.clamp_min(1e-12).log()).argmax(dim=1)


def statistics_label_attacks(upload: torch.nn.Module, rows: torch.Tensor, sample: torch.Tensor,
                             samples: int) -> dict[str, torch.Tensor]:
    """Each sample's label as the server infers it from a linear-probe client (one guess per distinct `sample`
    id, ascending), which sends no gradient:

    - label_free: the global model's prediction from the body output rows it computed itself;
    - statistics: the classifier fitted on the client's own uploaded statistics (over its `samples`
      samples), which the server holds unless secure aggregation sums them with other clients' first;
    - class_means: the nearest of the client's own class means (its class sums over its frequencies),
      which needs no covariance (better where a client holds few samples of many features).
    """
    from .probe import STATISTICS, fit_classifier

    with torch.no_grad():
        features = upload.tail.features(rows)
        statistics = {name: getattr(upload, name) for name in STATISTICS}
        weight, bias = fit_classifier(statistics, samples)
        present = statistics["class_frequency"] > 0
        means = statistics["class_sums"] / statistics["class_frequency"].clamp_min(1e-12)[:, None]
        distances = torch.cdist(features.double(), means.double()).float()
        scores = {"label_free": upload.tail.head(features).log_softmax(dim=1),
                  "statistics": (features @ weight.T + bias).log_softmax(dim=1),
                  "class_means": torch.where(present, -distances, torch.tensor(float("-inf")))}
    return {name: per_sample(value, sample).argmax(dim=1) for name, value in scores.items()}


def per_sample(scores: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Per-send `scores` (S, C) summed over each sample's sends: one row per distinct `sample` id, ascending."""
    ids, inverse = sample.unique(return_inverse=True)
    return torch.zeros(len(ids), scores.shape[1]).index_add_(0, inverse, scores)
