"""SplitFed (Thapa et al., 2022) with a frozen body: parallel split training on all local data, FedAvg."""

from .base import Method


class SplitFed(Method):
    name = "sfl"
    split = True

    def client_round(self, client, ctx) -> dict:
        everything = list(range(client.num_examples))
        return {"train_loss": client.split_train(ctx, everything), "kept": len(everything)}
