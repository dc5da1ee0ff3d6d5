"""Forward-only (zeroth-order) prompt updates: the prompt sets a client asks the body to evaluate, and the
gradient estimate its own losses on them give (SPSA, as MeZO uses it for fine-tuning by forward passes).

With random directions z_1..z_K and a perturbation size eps, the antithetic estimator evaluates the loss
at p + eps z_k and p - eps z_k and estimates the gradient as the mean of
(L(p + eps z_k) - L(p - eps z_k)) / (2 eps) z_k; the one-sided one evaluates p + eps z_k against the
loss at p itself. For standard normal z both are unbiased up to O(eps^2) (antithetic) or O(eps)
(one-sided) for a smooth loss, with a variance that grows with the prompts' size over K.
"""

from __future__ import annotations

import torch


def prompt_sets(prompts: torch.Tensor, directions: torch.Tensor, perturbation: float, estimator: str) -> torch.Tensor:
    """The prompt sets (S, P, D) of one estimate, for prompts (P, D) and directions (K, P, D): the prompts as
    they are (set 0, whose rows the tail trains on), then p + eps z_k for every k, then (antithetic) p - eps z_k."""
    signs = (1.0, -1.0) if estimator == "antithetic" else (1.0,)
    return torch.cat([prompts[None]] + [prompts[None] + sign * perturbation * directions for sign in signs])


def gradient(losses: torch.Tensor, directions: torch.Tensor, perturbation: float, estimator: str) -> torch.Tensor:
    """The estimate of the loss's gradient at the prompts (P, D) from the losses (S,) of `prompt_sets`' sets."""
    k = len(directions)
    if estimator == "antithetic":
        slopes = (losses[1:1 + k] - losses[1 + k:]) / (2 * perturbation)
    else:
        slopes = (losses[1:] - losses[0]) / perturbation
    return torch.einsum("k,k...->...", slopes, directions) / k
