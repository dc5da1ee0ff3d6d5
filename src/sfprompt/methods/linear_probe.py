"""The federated linear probe: every client sends its images through the frozen body once, the first round
it is sampled, and reports statistics of the features (`probe`); the server fits the classifier on them in
closed form. No gradient and no label-dependent message per sample. As a method it has no prompts; as the
rounds that open a prompt method's run (`--probe-rounds`), it takes the features with the initial prompts, and
as those that close it (`--refit-rounds`), with the trained ones."""

from ..probe import SAMPLES, STATISTICS, ProbeParams, accumulate
from .base import Method


class LinearProbe(Method):
    name = "linear-probe"
    split = True
    server_only = (*STATISTICS, SAMPLES)  # the statistics so far: the server's to fit with, no client's business

    def new_params(self, model):
        initial = model.new_params()
        return ProbeParams(initial.prompts, initial.tail, model.num_classes, model.layout.width)

    def state_bytes(self, model):
        classes, width = model.num_classes, model.layout.width
        return model.params_bytes + 4 * (classes + classes * width + width * width) + 8  # the statistics, the count

    def aggregate(self, current, uploads, weights, aggregator):  # summed statistics: no other aggregator applies
        return accumulate(current, uploads, weights)

    def client_round(self, client, ctx) -> dict:
        ctx.params.report(client.probe_statistics(ctx))
        return {"train_loss": None, "kept": client.num_examples}
