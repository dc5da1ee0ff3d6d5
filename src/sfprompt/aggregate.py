"""FedAvg: the server's aggregation, as pure tensor math."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Average state dicts key by key, weighted (by local data size in FedAvg)."""
    if not states:
        raise ValueError("fedavg needs at least one client update")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("fedavg weights must sum to a positive number")
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys:
            raise ValueError("client updates hold different parameters")
    return {
        key: sum(state[key].double() * (w / total) for state, w in zip(states, weights)).to(states[0][key].dtype)
        for key in keys
    }
