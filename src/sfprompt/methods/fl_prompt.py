"""Federated prompt tuning: each client holds the whole frozen model and trains prompts and tail."""

from .base import Method


class FedPrompt(Method):
    name = "fl-prompt"

    def client_holds(self, model):
        return (model.head, model.body)

    def client_round(self, client, ctx) -> dict:
        loss = client.train_locally(ctx, lambda images: client.model.logits(images, ctx.params))
        return {"train_loss": loss, "kept": client.num_examples}
