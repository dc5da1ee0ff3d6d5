"""The label attack on forward-only prompt updates (run by `sfprompt audit`): the prompt trajectory.

No gradient crosses the network in a forward-only round, but each `evaluate` of a head with no blocks shows the
server the prompts as they are and, by its seed, the K directions the client perturbs them along (with client
blocks neither travels in the clear: `audit` reads no trajectory then); the next `evaluate` shows
the prompts after the client's step. That step is the optimiser's move along the estimate
g = sum_k a_k z_k, whose K coefficients are the batch's loss differences a_k = (L(p + eps z_k) -
L(p - eps z_k)) / (2 eps K) (antithetic; one-sided: against L(p); residual: L(p + eps z) against the previous
step's, so two batches' labels shape it): numbers the labels shape. So:

1. `step_coefficients` reads each step's coefficients back from two successive prompt sends: exactly
   for SGD (the move is linear in g), and for Adam up to one positive factor per round, by replaying its
   moments (its first nonzero move is the sign of g, which fixes the coefficients' direction; every later
   move their size relative to the earlier ones).
2. `infer_labels` finds the labels whose loss differences on the rows the server returned (it computed
   every set's rows) explain the recovered coefficients best, starting from the label-free guess and
   weighing it as a prior (one label change at a time; each step's noise level unknown, so a step the right
   labels explain exactly counts for much; Adam's factor the one those steps agree on).

The losses need the tail the client used at each step: the audit gives the attacker either that one (an
upper bound: a server could only track it by replaying the tail's steps under its guesses) or the tail it
broadcast (what it holds for certain). Only split-phase messages are read; the upload's prompts would add
the round's last step, and its tail more (see docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which optim.build_optimizer keeps (its eps, 1e-8, is
# negligible beside the gradients: the attack leaves it out, which is what makes Adam's moves scale-free)


@dataclass(frozen=True)
class PromptOptimizer:
    """What the server knows of the client's prompt optimiser (the run's public configuration)."""

    kind: str  # "adam" or "sgd"
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def why_not_invertible(self) -> str | None:
        """Why `step_coefficients` cannot read this optimiser's steps, or None."""
        if self.kind == "adam" and (self.weight_decay or self.proximal_mu):
            return ("Adam with weight decay or a proximal term mixes the estimate with the prompts at an unknown "
                    "scale; the attack inverts plain Adam and SGD")
        return None


def step_coefficients(prompts: list[torch.Tensor], directions: list[torch.Tensor], optimizer: PromptOptimizer,
                      anchor: torch.Tensor | None = None) -> torch.Tensor:
    """The coefficients (T, K) of the gradient estimates behind T steps, from the T + 1 prompts (P, D) sent before
    and after them and each step's directions (K, P, D): exact for SGD; for Adam, all divided by one unknown
    positive factor (the first nonzero step's coefficients have norm 1). A step whose losses did not differ, as on
    a batch the tail fits exactly, reads zero under SGD and under Adam before any other step moved the prompts;
    after one, Adam's momentum still moves them, and it reads near zero (a move of none there reads as the
    least-squares estimate nearest to cancelling the momentum). `anchor`: the prompts FedProx's proximal
    term pulls towards (the broadcast ones; default the first sent)."""
    if optimizer.why_not_invertible():
        raise ValueError(optimizer.why_not_invertible())
    moves = [(before - after).double().flatten() / optimizer.lr for before, after in zip(prompts, prompts[1:])]
    bases = [d.double().flatten(1) for d in directions[: len(moves)]]  # (K, N)
    if optimizer.kind == "sgd":
        anchor = (prompts[0] if anchor is None else anchor).double().flatten()
        return _sgd_coefficients(moves, bases, [p.double().flatten() for p in prompts], anchor, optimizer)
    return _adam_coefficients(moves, bases)


def _sgd_coefficients(moves, bases, prompts, anchor, optimizer: PromptOptimizer) -> torch.Tensor:
    """torch's SGD: buffer_t = momentum buffer_(t-1) + g_t + wd p_t + mu (p_t - anchor), p_(t+1) = p_t - lr buffer_t."""
    coefficients, previous = [], torch.zeros_like(moves[0])
    for move, basis, p in zip(moves, bases, prompts):
        known = optimizer.weight_decay * p + optimizer.proximal_mu * (p - anchor)
        gradient = move - optimizer.momentum * previous - known
        coefficients.append(torch.linalg.lstsq(basis.T, gradient[:, None]).solution[:, 0])
        previous = move
    return torch.stack(coefficients).float()


def _adam_coefficients(moves, bases) -> torch.Tensor:
    """torch's Adam without weight decay, whose moves m_hat / (sqrt(v_hat) + eps) do not change when every gradient
    is scaled alike (eps aside): the first nonzero move's signs give the first nonzero coefficients' direction (a
    gradient met with empty moments moves every number by one amount, which the step count sets), and each later
    move the next coefficients, in their unit, given the moments replayed so far."""
    (beta1, beta2), first, second = ADAM_BETAS, torch.zeros_like(moves[0]), torch.zeros_like(moves[0])
    coefficients = []
    for step, (move, basis) in enumerate(zip(moves, bases), start=1):
        if not second.any():  # no gradient yet (a zero one leaves the prompts and the moments where they were)
            a = _direction_from_signs(torch.sign(move), basis)
        else:
            def predicted(a):
                g = a @ basis
                m, v = beta1 * first + (1 - beta1) * g, beta2 * second + (1 - beta2) * g * g
                return (m / (1 - beta1**step)) / (v / (1 - beta2**step)).sqrt().clamp_min(1e-300)
            scale = next(c for c in reversed(coefficients) if c.any())  # the unit's size, set by a nonzero step
            a = _least_squares(predicted, move, start=_correlation_start(move, basis, scale))
        g = a @ basis
        first, second = beta1 * first + (1 - beta1) * g, beta2 * second + (1 - beta2) * g * g
        coefficients.append(a)
    return torch.stack(coefficients).float()


def _direction_from_signs(signs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The unit vector a whose estimate a @ basis has the given signs: the correlation estimate (exact in
    expectation for Gaussian directions), refined by a smooth margin loss; zero for a move of none."""
    if not signs.any():
        return torch.zeros(len(basis), dtype=basis.dtype)
    a = (basis @ signs)
    a = (a / a.norm()).clone().requires_grad_(True)

    def loss():  # a hinge made smooth, on margins in units of the estimate's spread (50: sharp, still smooth)
        z = a @ basis
        return F.softplus(-50 * signs * z / z.pow(2).mean().sqrt()).mean()

    _minimise(loss, a)
    return (a / a.norm()).detach()


def _correlation_start(move: torch.Tensor, basis: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The directions' correlations with the move, at the previous step's size (zero where the move has none along
    the directions)."""
    a = basis @ move
    return a / a.norm() * previous.norm() if a.any() else a


def _least_squares(predicted, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    a = start.clone().requires_grad_(True)
    _minimise(lambda: (predicted(a) - target).pow(2).mean(), a)
    return a.detach()


def _minimise(loss, a: torch.Tensor, iterations: int = 200) -> None:
    optimiser = torch.optim.LBFGS([a], lr=1, max_iter=iterations, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    optimiser.step(closure)


def loss_differences(tail, rows: torch.Tensor, num_classes: int, estimator: str) -> torch.Tensor:
    """(B, C, K): what each sample of a step would add to the K loss differences of `zeroth_order.gradient`
    (summed over the batch, before its 1/B) were its label each class, from the rows of every prompt set
    (S, B, R, D) and a tail. Residual: each sample's loss on the one set (B, C, 1), which `residual_step`
    sets against the previous step's."""
    sets, batch = rows.shape[:2]
    directions = (sets - 1) // 2 if estimator == "antithetic" else sets - 1
    with torch.no_grad():
        losses = -tail(rows.flatten(0, 1)).double().log_softmax(dim=1).view(sets, batch, num_classes)  # (S, B, C)
    if estimator == "residual":
        differences = losses
    elif estimator == "antithetic":
        differences = losses[1:1 + directions] - losses[1 + directions:]
    else:
        differences = losses[1:] - losses[:1]
    return differences.permute(1, 2, 0)


@dataclass
class Step:
    """One forward-only step as the server saw it: its samples (ids linking a sample's sends) and, for each, what
    every label would add to the step's loss differences (`loss_differences`); with the coefficients read from
    the trajectory, in the unit the attacker knows them in."""

    samples: torch.Tensor  # (B,)
    differences: torch.Tensor  # (B, C, K), float64
    coefficients: torch.Tensor  # (K,)
    round: int = 0  # the round it was taken in: Adam's unknown factor is one a round (its moments start anew)


def residual_step(samples: torch.Tensor, losses: torch.Tensor, earlier_samples: torch.Tensor,
                  earlier_losses: torch.Tensor, coefficients: torch.Tensor, round_: int) -> Step:
    """A residual step (`zeroth_order`): its batch's losses (B, C, 1) less the previous step's (B', C, 1), scaled to
    this batch's size (the client compares the two batches' mean losses), so that both batches' labels explain
    its coefficient. (A sample in both batches, as across an epoch's end, is two rows, each scored alone.)"""
    scale = len(samples) / len(earlier_samples)
    return Step(torch.cat([samples, earlier_samples]), torch.cat([losses, -scale * earlier_losses]), coefficients,
                round_)


def infer_labels(steps: list[Step], prior: torch.Tensor, factor: float | None = None,
                 max_changes: int | None = None) -> tuple[torch.Tensor, dict[int, float]]:
    """Each sample's label (ids 0..n-1 as in `prior`, its (n, C) label-free log-probabilities) that best explains
    the steps' coefficients, with the factor of each round that turns its coefficients into the batch's summed loss
    differences (given: SGD's 1, or a fitted one, for every round; None: chosen here, Adam's unknown scale, one a
    round). Steps of several rounds explain the labels of the samples sent in several together.

    The objective is sum over steps of K/2 log |residual|^2 - log prior: each step's noise level unknown (a
    scale-free prior on it), so a step that the right labels explain exactly (to the client's float32 rounding)
    counts for much, and one with a wrong label left in it for little. Greedy from the label-free guess: the one
    label change that lowers the objective most, then the next, while one does (one at a time, so that a wrong
    label's residual is not explained away by the others in its batch). The factor, when unknown, is the one of
    the steps' own least-squares factors (or of all of them together) that lowers the objective most: the steps
    with no wrong label left agree on it exactly."""
    labels, prior = prior.argmax(dim=1).clone(), prior.double()
    targets = [s.coefficients.double() for s in steps]
    rows = [torch.arange(len(s.samples)) for s in steps]
    half = len(targets[0]) / 2

    def factors(sums: list[torch.Tensor]) -> dict[int, float]:
        if factor is not None:
            return {s.round: factor for s in steps}
        return {round_: _best_factor(_of_round(sums, steps, round_), _of_round(targets, steps, round_), half)
                for round_ in sorted({s.round for s in steps})}

    for _ in range(max_changes if max_changes is not None else 10 * len(prior)):
        sums = [s.differences[r, labels[s.samples]].sum(0) for s, r in zip(steps, rows)]  # (K,) each
        chosen = factors(sums)
        # below the float32 rounding of the client's losses (about 1e-7 of them), so it only keeps log finite
        floor = 1e-12 * float(torch.stack([(chosen[s.round] * o).pow(2).sum() for s, o in zip(steps, targets)]).mean())
        floor += 1e-300
        cost = torch.zeros(prior.shape, dtype=torch.float64)  # the objective's change of each label change
        for s, r, x, o in zip(steps, rows, sums, targets):
            residual = x - chosen[s.round] * o
            shifted = residual + s.differences - s.differences[r, labels[s.samples]][:, None]  # (B, C, K)
            cost.index_add_(0, s.samples, half * ((shifted.pow(2).sum(2) + floor).log()
                                                  - (residual.pow(2).sum() + floor).log()))
        cost -= prior - prior.gather(1, labels[:, None])
        best = int(cost.argmin())
        if float(cost.view(-1)[best]) >= -1e-9:
            break
        labels[best // prior.shape[1]] = best % prior.shape[1]
    return labels, factors([s.differences[r, labels[s.samples]].sum(0) for s, r in zip(steps, rows)])


def _of_round(values: list, steps: list[Step], round_: int) -> list:
    """The entries of `values` (one a step) of the steps taken in `round_`."""
    return [value for value, step in zip(values, steps) if step.round == round_]


def _best_factor(sums: list[torch.Tensor], targets: list[torch.Tensor], half: float) -> float:
    """Of each step's least-squares factor and all steps' together, the positive one of least sum K/2 log
    |residual|^2 (Adam's factor is positive; if no candidate is, the labels explain nothing yet and the joint
    least-squares one is returned as it is)."""
    candidates = [float((x * o).sum() / (o * o).sum().clamp_min(1e-300)) for x, o in zip(sums, targets)]
    candidates.append(float(sum((x * o).sum() for x, o in zip(sums, targets))
                            / sum((o * o).sum() for o in targets).clamp_min(1e-300)))
    x, o = torch.stack(sums), torch.stack(targets)  # (T, K)

    def objective(f: float) -> float:
        floor = 1e-12 * float((f * o).pow(2).sum(1).mean()) + 1e-300
        return float(half * ((x - f * o).pow(2).sum(1) + floor).log().sum())

    return min((f for f in candidates if f > 0), key=objective, default=candidates[-1])


def unexplained(steps: list[Step], labels: torch.Tensor, factor: float | None = None) -> float:
    """The share of the steps' summed loss differences at `labels` that the coefficients (times the factor, fitted
    a round when None) leave unexplained: near 0 at the true labels when the attack models the client's steps right
    (the rest is the client's float32 rounding of its losses); where the losses did not differ at all, 0 if the
    coefficients are zero too, else infinite."""
    sums = [s.differences[torch.arange(len(s.samples)), labels[s.samples]].sum(0) for s in steps]
    targets = [s.coefficients.double() for s in steps]
    left = 0.0
    for round_ in sorted({s.round for s in steps}):
        x, o = torch.cat(_of_round(sums, steps, round_)), torch.cat(_of_round(targets, steps, round_))
        fitted = float((x * o).sum() / (o * o).sum().clamp_min(1e-300)) if factor is None else factor
        left += float((x - fitted * o).pow(2).sum())
    total = float(torch.cat(sums).pow(2).sum())
    return left / total if total else (math.inf if left else 0.0)
