"""Forward-only (zeroth-order) prompt updates: the prompt sets a client asks the body to evaluate, and the
gradient estimate its own losses on them give (SPSA, as MeZO uses it for fine-tuning by forward passes).

With random directions z_1..z_K and a perturbation size eps, the antithetic estimator evaluates the loss
at p + eps z_k and p - eps z_k and estimates the gradient as the mean of
(L(p + eps z_k) - L(p - eps z_k)) / (2 eps) z_k; the one-sided one evaluates p + eps z_k against the
loss at p itself. For standard normal z both are unbiased up to O(eps^2) (antithetic) or O(eps)
(one-sided) for a smooth loss, with a variance that grows with the prompts' size over K.

The residual one (one-point residual feedback: Zhang, Zhou, Ji and Zavlanos, Automatica 2022) evaluates one set
a step, p_t + eps z_t, and compares its loss with the previous step's: (L_t(p_t + eps z_t) - L_(t-1)(p_(t-1) +
eps z_(t-1))) / eps z_t, K = 1. It needs no set beyond the one the tail trains on (the fewest bytes and body
forwards, and no client FLOPs beyond backprop's), at the price of a variance that the batches' own loss
differences add to: two steps' losses are taken on different batches (and tails).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEED_LIMIT = 2**31  # a seed of directions travels as a JSON integer in a message's metadata


@dataclass(frozen=True)
class Perturbations:
    """A run's forward-only settings (--directions, --perturbation, --estimator), which the client and the
    body server share: an `evaluate` names its directions by a seed, and the server perturbs the prompts it
    received along the same ones (with client blocks the client perturbs them itself, and sends no seed)."""

    directions: int
    size: float
    estimator: str

    def __post_init__(self) -> None:
        if self.estimator == "residual" and self.directions != 1:
            raise ValueError(f"the residual estimator takes one direction a step, not {self.directions}")

    @property
    def sets(self) -> int:
        """The prompt sets of one estimate: the prompts as they are, and one (one-sided) or two a direction; the
        residual estimator's one perturbed set."""
        if self.estimator == "residual":
            return 1
        return 1 + self.directions * (2 if self.estimator == "antithetic" else 1)

    def draw(self, seed: int, shape: torch.Size) -> torch.Tensor:
        """The directions (K, *shape) a seed names: standard normal, drawn on the CPU by torch's generator."""
        return torch.randn((self.directions, *shape), generator=torch.Generator().manual_seed(seed))

    def sets_of(self, prompts: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        return prompt_sets(prompts, directions, self.size, self.estimator)


def checksum(directions: torch.Tensor) -> float:
    """What a client sends beside a seed so that a body server whose torch draws other directions from it (another
    version) refuses the request rather than answer for directions the client never used."""
    return float(directions.double().sum())


def prompt_sets(prompts: torch.Tensor, directions: torch.Tensor, perturbation: float, estimator: str) -> torch.Tensor:
    """The prompt sets (S, P, D) of one estimate, for prompts (P, D) and directions (K, P, D): the prompts as
    they are (set 0, whose rows the tail trains on), then p + eps z_k for every k, then (antithetic) p - eps z_k;
    residual: p + eps z_1 alone (set 0)."""
    if estimator == "residual":
        return prompts[None] + perturbation * directions
    signs = (1.0, -1.0) if estimator == "antithetic" else (1.0,)
    return torch.cat([prompts[None]] + [prompts[None] + sign * perturbation * directions for sign in signs])


def gradient(losses: torch.Tensor, directions: torch.Tensor, perturbation: float, estimator: str,
             previous: torch.Tensor | None = None) -> torch.Tensor:
    """The estimate of the loss's gradient at the prompts (P, D) from the losses (S,) of `prompt_sets`' sets
    (residual: against the `previous` step's loss)."""
    k = len(directions)
    if estimator == "residual":
        if previous is None:
            raise ValueError("the residual estimate needs the previous step's loss")
        slopes = (losses - previous) / perturbation
    elif estimator == "antithetic":
        slopes = (losses[1:1 + k] - losses[1 + k:]) / (2 * perturbation)
    else:
        slopes = (losses[1:] - losses[0]) / perturbation
    return torch.einsum("k,k...->...", slopes, directions) / k
