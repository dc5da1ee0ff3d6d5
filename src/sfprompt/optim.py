"""The configured optimiser, for a client's phases and for the server's body copies alike."""

from __future__ import annotations

import torch


def build_optimizer(groups: list[dict], settings) -> torch.optim.Optimizer:
    """--optimizer (adam or sgd) with --momentum and --weight-decay over parameter groups (each with
    its own lr); `settings` is the run's `TrainSettings`."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=settings.weight_decay)
    return torch.optim.SGD(groups, momentum=settings.momentum, weight_decay=settings.weight_decay)
