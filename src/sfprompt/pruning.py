"""EL2N data pruning (Paul et al., 2021): which of its samples a client keeps for split training.

The paper keeps the hardest (highest EL2N). Sorscher et al. (2022) find that keeping the hardest pays only
when data is plentiful and the easiest pays when it is scarce, so the kept band can also sit elsewhere in the
score order, or slide with how much data a client holds; a random draw is the control.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Where the kept band sits in the order of scores, hardest first: 0 the hardest, 1 the easiest.
BANDS = {"hardest": 0.0, "middle": 0.5, "easiest": 1.0}


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ||softmax(logits) - onehot(label)||_2, shape (B,)."""
    onehot = F.one_hot(labels, num_classes=logits.shape[-1]).to(logits.dtype)
    return torch.linalg.vector_norm(logits.softmax(dim=-1) - onehot, dim=-1)


def size_band(samples: int, mean_samples: float) -> float:
    """`by-size`'s band for a client holding `samples` where the federation's clients hold `mean_samples` on
    average: the easiest with almost nothing, the middle at the mean, the hardest from twice the mean."""
    return min(1.0, max(0.0, 1.0 - samples / (2.0 * mean_samples)))


def keep_band(scores: torch.Tensor, keep_ratio: float, band: float = 0.0,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of ceil(keep_ratio * n) samples (at least one), in ascending order: a contiguous band of the
    scores sorted from highest to lowest, starting `band` of the way down what is left out (0: the highest
    scores, 1: the lowest, 0.5: the middle).

    With `groups` (the labels), the fraction is kept within each group, so pruning never shifts
    the local label distribution. Ties are broken by position, so the choice is deterministic.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not 0.0 <= band <= 1.0:
        raise ValueError(f"band must be in [0, 1], got {band}")
    if groups is not None:
        members = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
        return torch.cat([m[keep_band(scores[m], keep_ratio, band)] for m in members]).sort().values
    keep = max(1, math.ceil(keep_ratio * len(scores)))
    start = math.floor((len(scores) - keep) * band + 0.5)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[start:start + keep].sort().values

