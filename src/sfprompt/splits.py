"""Heterogeneous clients: each client's split point, chosen by its compute budget (the paper's dynamic
client-server partitioning).

A client's budget is the compute it can spend on its head per training sample: one split step's
forward and the backward into its prompts (and through its blocks), in GFLOP, as `head_gflop`
counts it (the same count on every device). Each client keeps the deepest head it can afford, so a
stronger client runs more blocks itself, and sends activations that are no longer an affine map of
its pixels (docs/privacy.md measures what that hides).

Without the defences that act where the head ends (pooling, clipping and the noise on top of it, which
`Config` refuses beside budgets), the split point does not change the function the model computes (head
and body are frozen, and the prompts enter before the first block; a shuffle of the patch tokens is undone
by attention's indifference to their order), so prompts and tails trained at different split points are
averaged as they are, and the global model is evaluated at any one of them. What differs per client
is its compute and memory, the gradient rows it gets back (every row once prompts pass through its
blocks, only the prompts' without), and its local loss, which reads its head's output.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .seeds import BUDGETS, derive_seed
from .config import Config, ConfigError
from .meter import counting_flops
from .model import SplitViT



def head_gflop(model: SplitViT) -> list[float]:
    """GFLOP per training sample of the client's head at each split point 0 .. depth-1: a one-sample
    split step (the defended forward, then the backward of the rows the server's gradient reaches),
    counted at 0, 1 and 2 blocks; deeper heads add the same per block (every block is the same)."""
    depth = model.depth
    counted = [_probe(model, blocks) for blocks in range(min(depth, 3))]
    per_block = counted[2] - counted[1] if depth > 2 else 0
    flops = counted + [counted[-1] + per_block * (blocks - 2) for blocks in range(3, depth)]
    return [value / 1e9 for value in flops]


def _probe(model: SplitViT, client_blocks: int) -> int:
    split = model.at(client_blocks)
    prompts = model.initial_params.prompts.detach().clone().requires_grad_(True)
    images = torch.zeros(1, 3, *model.image_size, device=prompts.device)
    with counting_flops() as flops:
        # the defence draws its randomness on the CPU and moves it (as a client's private generator does)
        tokens = split.send(images, prompts, torch.Generator().manual_seed(0))
        rows = tokens[:, split.messages.grad_rows]
        rows.backward(torch.ones_like(rows))
    return flops.get_total_flops()


def affordable_split(costs: list[float], budget: float) -> int:
    """The deepest split point whose head costs at most `budget` GFLOP per sample (`costs`: `head_gflop`)."""
    if not budget >= costs[0]:
        raise ConfigError(f"a client budget of {budget:g} GFLOP per sample does not cover the head's embedding "
                          f"alone ({costs[0]:.3g} GFLOP per sample for this model and image size)")
    return max(blocks for blocks, cost in enumerate(costs) if cost <= budget)


def client_budgets(config: Config) -> np.ndarray | None:
    """Each simulated client's budget, drawn uniformly from --client-budgets by the run's seed (None:
    every client keeps --client-blocks)."""
    if config.budgets is None:
        return None
    return np.random.default_rng(derive_seed(config.seed, BUDGETS)).choice(config.budgets, size=config.clients)


def client_models(model: SplitViT, config: Config) -> tuple[list[SplitViT], str]:
    """The split each client of the run holds (one shared model per split point), and a line saying
    how many clients got each split."""
    budgets = client_budgets(config)
    if budgets is None:
        return [model] * config.clients, ""
    costs = head_gflop(model)
    splits = {budget: affordable_split(costs, budget) for budget in config.budgets}
    models = [model.at(splits[budget]) for budget in budgets.tolist()]
    counts = Counter(split.client_blocks for split in models)
    line = "split points (client blocks): " + ", ".join(
        f"{blocks} for {n} client{'s' * (n != 1)} ({costs[blocks]:.3g} GFLOP a sample)"
        for blocks, n in sorted(counts.items()))
    return models, line
