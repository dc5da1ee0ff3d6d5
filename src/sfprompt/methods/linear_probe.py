"""The federated linear probe: every client sends its images through the frozen body once, the first round
it is sampled, and reports statistics of the features (`probe`); the server fits the classifier on them in
closed form. No prompts, no gradient and no label-dependent message per sample."""

from ..probe import ProbeParams, accumulate
from .base import Method


class LinearProbe(Method):
    name = "linear-probe"
    split = True

    def new_params(self, model):
        return ProbeParams(model.new_params().tail, model.num_classes, model.layout.width)

    def aggregate(self, current, uploads, weights, settings):
        return accumulate(current, uploads, weights)

    def client_round(self, client, ctx) -> dict:
        ctx.params.report(client.probe_statistics(ctx))
        return {"train_loss": None, "kept": client.num_examples}
