import math

import pytest
import torch

from sfprompt.aggregate import fedavg
from sfprompt.client import Client, TrainSettings
from sfprompt.config import Config
from sfprompt.meter import Meter
from sfprompt.pruning import el2n, hardest

from conftest import tiny_split


def test_el2n_matches_its_definition():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = el2n(logits, torch.tensor([0, 1]))
    assert scores[0] < 1e-3  # confident and right
    assert math.isclose(scores[1].item(), math.sqrt((1 / 3) ** 2 * 2 + (2 / 3) ** 2), rel_tol=1e-6)


def test_hardest_keeps_the_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert hardest(scores, 0.4).tolist() == [1, 3]
    assert hardest(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert hardest(scores, 0.01).tolist() == [1]
    with pytest.raises(ValueError):
        hardest(scores, 0.0)


def test_hardest_per_class_keeps_the_label_mix():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert hardest(scores, 0.5).tolist() == [0, 1, 2]  # overall: class 1 would vanish
    assert hardest(scores, 0.5, labels).tolist() == [0, 1, 4, 5]  # ceil(0.5 * 3) = 2 of each class


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
