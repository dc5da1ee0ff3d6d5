"""EL2N data pruning (Paul et al., 2021): keep the samples the local model finds hardest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ||softmax(logits) - onehot(label)||_2, shape (B,)."""
    onehot = F.one_hot(labels, num_classes=logits.shape[-1]).to(logits.dtype)
    return torch.linalg.vector_norm(logits.softmax(dim=-1) - onehot, dim=-1)


def hardest(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Positions of the ceil(keep_ratio * n) highest scores (at least one), in ascending order.

    Ties are broken by position, so the choice is deterministic.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    keep = max(1, math.ceil(keep_ratio * len(scores)))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values
