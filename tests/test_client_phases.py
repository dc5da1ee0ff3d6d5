"""Each client phase trains exactly what it can reach, with an optimiser of its own."""

import numpy as np
import pytest
import torch

from sfprompt.client import Client, RoundContext, TrainSettings
from sfprompt.config import Config
from sfprompt.meter import Meter, PeakMemory

from conftest import tiny_split
from test_cost import measured_round


def local_phase(client_blocks: int, **settings) -> tuple[torch.nn.Module, torch.nn.Module, Client]:
    """The global params before and after one client's local phase (8 samples, batches of 4)."""
    _, split = tiny_split(client_blocks=client_blocks)
    data = [(torch.randn(3, 32, 32), i % 4) for i in range(8)]
    config = Config(model="test_vit", image_size=32, batch_size=4, local_epochs=2, **settings)
    client = Client(0, data, np.arange(8), split, TrainSettings.from_config(config), Meter(), torch.device("cpu"))
    before, params = split.new_params(), split.new_params()
    client.initial_local_head = client.local_head.fc.weight.clone()
    ctx = RoundContext(params, None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), PeakMemory())
    client.local_update(ctx)
    return before, params, client


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_local_phase_leaves_unreachable_prompts_alone(optimizer):
    """Without client blocks the local loss cannot reach the prompts: weight decay and momentum must
    not move them either (one optimiser over every phase did)."""
    before, after, client = local_phase(0, optimizer=optimizer, weight_decay=0.1)
    assert torch.equal(after.prompts, before.prompts)
    assert torch.equal(after.tail.head.weight, before.tail.head.weight)  # the separate classifier trained instead
    assert not torch.equal(client.local_head.fc.weight, client.initial_local_head)


def test_the_local_phase_trains_prompts_that_pass_through_client_blocks():
    before, after, _ = local_phase(1)
    assert not torch.equal(after.prompts, before.prompts)


def test_the_shared_local_classifier_is_the_tail():
    before, after, _ = local_phase(0, local_classifier="shared")
    assert not torch.equal(after.tail.head.weight, before.tail.head.weight)
    assert torch.equal(after.prompts, before.prompts)


@pytest.mark.parametrize("method", ["sfprompt", "fl"])
def test_client_memory_counts_every_message_it_sends_or_receives(method, monkeypatch):
    """The encoded buffers (about the size of the activations) count towards the client's peak, at the
    moment they exist beside the tensors: one per message the client sends or receives."""
    seen = []
    original = PeakMemory.buffer

    def spy(self, nbytes):
        seen.append((nbytes, self.current + nbytes))
        original(self, nbytes)

    monkeypatch.setattr(PeakMemory, "buffer", spy)
    costs = measured_round(method, 8)
    assert len(seen) == sum(costs["messages_by_phase"].values())
    assert sum(nbytes for nbytes, _ in seen) >= costs["bytes_up"] + costs["bytes_down"]  # received: buffer + decoded
    assert costs["client_peak_memory_bytes"] >= max(total for _, total in seen)
