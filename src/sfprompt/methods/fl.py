"""Federated full fine-tuning (FedAvg): each client trains the whole model; it all crosses the network."""

from .base import Method


class FedFull(Method):
    name = "fl"

    def state_bytes(self, model):
        return model.model_bytes

    def new_params(self, model):
        return model.new_full_params()

    def client_holds(self, model):
        return ()  # the client's trainable copy is everything it holds

    def logits(self, model, params, images, generator=None):
        return params(images)

    def client_round(self, client, ctx) -> dict:
        return {"train_loss": client.train_locally(ctx, ctx.params), "kept": client.num_examples}
