"""SFPrompt: self-update with the local loss, EL2N pruning, then split training on what was kept."""

import math

from .base import Method


class SFPrompt(Method):
    name = "sfprompt"
    split = True

    def samples_per_phase(self, settings, samples):
        pruning = settings.keep_ratio < 1
        kept = math.ceil(settings.keep_ratio * samples) if pruning else samples  # as `pruning.hardest` keeps
        return {"local": settings.local_epochs * samples, "prune": samples if pruning else 0,
                "split": settings.split_epochs * kept}

    def client_round(self, client, ctx) -> dict:
        local_loss = client.local_update(ctx)
        kept = client.prune(ctx)
        return {"local_loss": local_loss, "train_loss": client.split_train(ctx, kept), "kept": len(kept)}
