"""EL2N data pruning (Paul et al., 2021): keep the samples the local model finds hardest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ||softmax(logits) - onehot(label)||_2, shape (B,)."""
    onehot = F.one_hot(labels, num_classes=logits.shape[-1]).to(logits.dtype)
    return torch.linalg.vector_norm(logits.softmax(dim=-1) - onehot, dim=-1)


def hardest(scores: torch.Tensor, keep_ratio: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ceil(keep_ratio * n) highest scores (at least one), in ascending order.

    With `groups` (the labels), the fraction is kept within each group, so pruning never shifts
    the local label distribution. Ties are broken by position, so the choice is deterministic.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if groups is not None:
        members = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
        return torch.cat([m[hardest(scores[m], keep_ratio)] for m in members]).sort().values
    keep = max(1, math.ceil(keep_ratio * len(scores)))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values
