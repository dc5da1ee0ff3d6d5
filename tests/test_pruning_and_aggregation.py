import math

import numpy as np
import pytest
import torch

from sfprompt.aggregate import fedavg
from sfprompt.client import Client, RoundContext, TrainSettings
from sfprompt.config import Config, ConfigError
from sfprompt.meter import Meter, PeakMemory
from sfprompt.methods import SFPrompt
from sfprompt.pruning import el2n, keep_band, size_band

from conftest import tiny_split


def test_el2n_matches_its_definition():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = el2n(logits, torch.tensor([0, 1]))
    assert scores[0] < 1e-3  # confident and right
    assert math.isclose(scores[1].item(), math.sqrt((1 / 3) ** 2 * 2 + (2 / 3) ** 2), rel_tol=1e-6)


def test_hardest_keeps_the_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert keep_band(scores, 0.4).tolist() == [1, 3]
    assert keep_band(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert keep_band(scores, 0.01).tolist() == [1]
    with pytest.raises(ValueError):
        keep_band(scores, 0.0)
    with pytest.raises(ValueError):
        keep_band(scores, 0.5, band=1.5)


def test_the_band_slides_from_the_hardest_to_the_easiest():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])  # hardest first: positions 1, 3, 2, 5, 4, 0
    assert keep_band(scores, 0.5, 0.0).tolist() == [1, 2, 3]
    assert keep_band(scores, 0.5, 0.5).tolist() == [2, 4, 5]  # 3 left out: 2 harder, 1 easier
    assert keep_band(scores, 0.5, 1.0).tolist() == [0, 4, 5]  # the easiest
    assert keep_band(scores, 1.0, 0.7).tolist() == list(range(6))  # nothing is left out, wherever the band


def test_hardest_per_class_keeps_the_label_mix():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert keep_band(scores, 0.5).tolist() == [0, 1, 2]  # overall: class 1 would vanish
    assert keep_band(scores, 0.5, 0.0, labels).tolist() == [0, 1, 4, 5]  # ceil(0.5 * 3) = 2 of each class
    assert keep_band(scores, 0.5, 1.0, labels).tolist() == [1, 2, 3, 4]  # the easiest two of each


def test_by_size_keeps_easier_samples_the_less_a_client_holds():
    assert size_band(0, 100) == 1.0 and size_band(50, 100) == 0.75 and size_band(100, 100) == 0.5
    assert size_band(200, 100) == 0.0 and size_band(5000, 100) == 0.0


def pruning_client(samples: int = 12, round_seed: int = 0, **options) -> tuple[Client, RoundContext]:
    """A client of 12 samples (3 classes) with a tiny split ViT, and a round's context for it."""
    _, split = tiny_split(client_blocks=0)
    data = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(samples)]
    config = Config(model="test_vit", image_size=32, batch_size=4, **options)
    meter = Meter()
    client = Client(0, data, np.arange(samples), split, TrainSettings.from_config(config, mean_samples=12.0), meter,
                    torch.device("cpu"))
    ctx = RoundContext(split.new_params(), None, torch.Generator().manual_seed(round_seed),
                       torch.Generator().manual_seed(1), PeakMemory())
    return client, ctx


def scores_of(client: Client, ctx) -> torch.Tensor:
    with torch.no_grad():
        images = torch.stack([image for image, _ in client.data])
        return el2n(client._local_logits(images, ctx.params), torch.tensor([label for _, label in client.data]))


@pytest.mark.parametrize("keep, band", [("hardest", 0.0), ("middle", 0.5), ("easiest", 1.0), ("by-size", 0.5)])
def test_a_client_keeps_the_band_it_is_asked_for(keep, band):
    client, ctx = pruning_client(prune_keep=keep)
    labels = torch.tensor([label for _, label in client.data])
    expected = keep_band(scores_of(client, ctx), 0.5, band, labels).tolist()
    assert client.prune(ctx) == expected and len(expected) == 6
    assert client.meter.take()["client_flops"] > 0  # it scored


def test_by_size_without_the_federations_mean_is_refused():
    client, ctx = pruning_client(prune_keep="by-size")
    client.settings = TrainSettings.from_config(Config(prune_keep="by-size"))  # a node that knows only its own data
    with pytest.raises(ConfigError, match="set --train-samples to the federation's total"):
        client.prune(ctx)


def test_a_random_draw_scores_nothing_and_keeps_the_label_mix():
    client, ctx = pruning_client(prune_keep="random")
    kept = client.prune(ctx)
    assert client.meter.take()["client_flops"] == 0
    assert sorted(client.data[k][1] for k in kept) == [0, 0, 1, 1, 2, 2]
    assert pruning_client(prune_keep="random")[0].prune(pruning_client(prune_keep="random")[1]) == kept  # seeded
    other, other_ctx = pruning_client(round_seed=1, prune_keep="random")
    assert other.prune(other_ctx) != kept  # another round, another draw


@pytest.mark.parametrize("scores", ["updated", "received"])
def test_pruning_scores_before_or_after_the_self_update(scores, monkeypatch):
    client, ctx = pruning_client(prune_scores=scores, local_epochs=1)
    order = []
    for phase in ("local_update", "prune"):
        original = getattr(Client, phase)
        monkeypatch.setattr(Client, phase, lambda self, ctx, _o=original, _p=phase: order.append(_p) or _o(self, ctx))
    monkeypatch.setattr(Client, "split_train", lambda self, ctx, kept: 0.0)
    SFPrompt().client_round(client, ctx)
    assert order == (["local_update", "prune"] if scores == "updated" else ["prune", "local_update"])


@pytest.mark.parametrize("local_classifier", ["separate", "shared"])
def test_local_el2n_scores_differ_between_inputs_with_no_client_blocks(local_classifier):
    """With client_blocks = 0 the CLS token is input-independent; the local path must not read it."""
    _, split = tiny_split(client_blocks=0)
    settings = TrainSettings.from_config(Config(local_classifier=local_classifier))
    client = Client(0, [], torch.arange(0).numpy(), split, settings, Meter(), torch.device("cpu"))
    with torch.no_grad():
        logits = client._local_logits(torch.randn(8, 3, 32, 32), split.new_params())
    scores = el2n(logits, torch.zeros(8, dtype=torch.long))
    assert scores.unique().numel() == 8


def test_fedavg_weights_by_data_size():
    a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}
    assert torch.allclose(fedavg([a, b], [3, 1])["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(fedavg([a], [5])["w"], a["w"])


def test_fedavg_refuses_nothing_or_mismatched_updates():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
