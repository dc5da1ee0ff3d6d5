import json

import pytest
import torch

from sfprompt.client import Client
from sfprompt.codec import decode, encode
from sfprompt.config import METHODS as METHOD_NAMES
from sfprompt.methods import METHODS, Method
from sfprompt.runner import run

from test_runner import tiny_config


def quiet(config):
    return run(config, progress=False, log=lambda _: None)


def records(tmp_path, name="run"):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_every_configurable_method_exists():
    assert set(METHOD_NAMES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(method, imagefolder, tmp_path):
    summary = quiet(tiny_config(imagefolder, tmp_path, method=method, rounds=2))
    assert summary["method"] == method and summary["rounds"] == 2
    history = records(tmp_path)
    assert [r["round"] for r in history] == [1, 2] and summary["final_accuracy"] == history[-1]["accuracy"]
    correct = summary["final_accuracy"] * 12  # tiny_config's 12 test samples
    assert abs(correct - round(correct)) < 1e-9  # a count of correct test samples
    # the probe's closed-form classifier may be certain of every tiny test sample: a loss of exactly 0
    assert history[-1]["loss"] > 0 or (method == "linear-probe" and history[-1]["loss"] == 0)
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0 and summary["client_flops"] > 0
    # every method trains on the client, but the probe, whose classifier is fitted by the server
    assert all((r["train_loss"] is None) == (method == "linear-probe") for r in history)
    assert summary["threads"] == torch.get_num_threads()


def test_fl_sends_the_whole_model_down_and_up_once_per_client(imagefolder, tmp_path, monkeypatch):
    config = tiny_config(imagefolder, tmp_path, method="fl", rounds=1)
    captured = []
    original = Client.run_round

    def spy(self, method, received, *args):
        captured.append(len(encode(received)))
        return original(self, method, received, *args)

    monkeypatch.setattr(Client, "run_round", spy)
    quiet(config)
    record = records(tmp_path)[0]
    model_bytes = captured[0]
    assert model_bytes > 4 * 300_000  # test_vit has about 300k parameters
    assert record["bytes_down"] == config.clients_per_round * model_bytes
    # the upload is the same tensors plus a small JSON header (client id, sample count, loss)
    assert 0 <= record["bytes_up"] - config.clients_per_round * model_bytes < config.clients_per_round * 200
    assert record["server_flops"] == 0 and "up/split" not in record["bytes_by_phase"]


def test_fl_prompt_runs_the_whole_model_on_the_client(imagefolder, tmp_path):
    prompt = quiet(tiny_config(imagefolder, tmp_path, method="fl-prompt", rounds=1, out=str(tmp_path / "p")))
    split = quiet(tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, out=str(tmp_path / "s")))
    assert prompt["server_flops"] == 0 and split["server_flops"] > 0
    assert prompt["client_flops"] > split["client_flops"]
    assert prompt["bytes_up"] < split["bytes_up"]  # only prompts and tail cross the network
    assert prompt["client_peak_memory_bytes"] > split["client_peak_memory_bytes"]  # it holds the body


def test_sl_visits_clients_in_order_and_never_averages(imagefolder, tmp_path, monkeypatch):
    visits = []
    original = Client.run_round

    def spy(self, method, received, *args):
        upload = original(self, method, received, *args)
        visits.append((self.cid, dict(received.tensors), decode(upload).tensors))
        return upload

    monkeypatch.setattr(Client, "run_round", spy)
    monkeypatch.setattr(Method, "aggregate", lambda *a: pytest.fail("sl must not average"))
    quiet(tiny_config(imagefolder, tmp_path, method="sl", rounds=2, clients=3, clients_per_round=3))
    assert [cid for cid, _, _ in visits] == [0, 1, 2, 0, 1, 2]
    for (_, _, previous_upload), (_, received, _) in zip(visits, visits[1:]):
        assert all(torch.equal(received[k], previous_upload[k]) for k in received)


def test_sfl_splits_all_data_and_sfprompt_only_the_kept(imagefolder, tmp_path):
    sfl = quiet(tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, out=str(tmp_path / "a")))
    sfp = quiet(tiny_config(imagefolder, tmp_path, method="sfprompt", rounds=1, keep_ratio=0.25, out=str(tmp_path / "b")))
    a, b = records(tmp_path, "a")[0], records(tmp_path, "b")[0]
    assert a["kept_samples"] == 24 and b["kept_samples"] < 12  # two clients of 12 samples
    assert b["bytes_by_phase"]["up/split"] < a["bytes_by_phase"]["up/split"]
    assert sfp["server_flops"] < sfl["server_flops"]
    assert a["local_loss"] is None and b["local_loss"] is not None


def test_split_training_equals_prompt_tuning_on_the_whole_model(imagefolder, tmp_path):
    """sfl computes fl-prompt's gradients, only split across client and server: same global result."""
    from safetensors.torch import load_file

    for method in ("sfl", "fl-prompt"):
        quiet(tiny_config(imagefolder, tmp_path, method=method, rounds=2, out=str(tmp_path / method)))
    split, whole = load_file(tmp_path / "sfl" / "global.safetensors"), load_file(tmp_path / "fl-prompt" / "global.safetensors")
    assert split.keys() == whole.keys()
    for key in split:
        assert torch.allclose(split[key], whole[key], atol=1e-5, rtol=1e-4), key
    assert [r["accuracy"] for r in records(tmp_path, "sfl")] == [r["accuracy"] for r in records(tmp_path, "fl-prompt")]


def test_sfl_train_body_averages_per_client_body_copies(imagefolder, tmp_path, monkeypatch):
    """The original SplitFed: each client trains its own copy of the body on the server; the copies
    are averaged (by samples seen) into the body the next round starts from and the checkpoint holds."""
    from safetensors.torch import load_file

    import sfprompt.server as server_module

    averaged, differ = [], []
    original = server_module.fedavg

    def spy(states, weights):
        averaged.append((len(states), list(weights)))
        differ.append(any(not torch.equal(states[0][k], states[1][k]) for k in states[0]))
        return original(states, weights)

    monkeypatch.setattr(server_module, "fedavg", spy)
    frozen = quiet(tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, out=str(tmp_path / "frozen")))
    trained = quiet(tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, train_body=True, out=str(tmp_path / "body")))
    assert averaged == [(2, [24, 24])]  # two clients, 12 samples each, two split epochs
    assert differ == [True]  # each copy trained on its own client's data
    assert trained["server_flops"] > frozen["server_flops"]  # weight gradients of the body
    assert trained["bytes_up"] == frozen["bytes_up"]  # the same tensors cross the network
    checkpoint = load_file(tmp_path / "body" / "global.safetensors")
    bodies = [k for k in checkpoint if k.startswith("body.")]
    assert bodies and not any(k.startswith("body.") for k in load_file(tmp_path / "frozen" / "global.safetensors"))


def test_train_body_is_refused_outside_sfl(imagefolder, tmp_path):
    from sfprompt.config import ConfigError

    with pytest.raises(ConfigError, match="--train-body"):
        tiny_config(imagefolder, tmp_path, method="sfprompt", train_body=True)
