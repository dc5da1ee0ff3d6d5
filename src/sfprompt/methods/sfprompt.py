"""SFPrompt: self-update with the local loss, EL2N pruning (scored after the self-update, or before it with
--prune-scores received), then split training on what was kept."""

from .base import Method


class SFPrompt(Method):
    name = "sfprompt"
    split = True

    def client_round(self, client, ctx) -> dict:
        if client.settings.prune_scores == "received":
            kept = client.prune(ctx)
            local_loss = client.local_update(ctx)
        else:
            local_loss = client.local_update(ctx)
            kept = client.prune(ctx)
        return {"local_loss": local_loss, "train_loss": client.split_train(ctx, kept), "kept": len(kept)}
