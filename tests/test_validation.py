"""--validation-samples: tuning evaluates on samples held out of the clients' training data, never the test set."""

import json

import numpy as np
import pytest

from sfprompt.cli import main
from sfprompt.config import Config, ConfigError, recipe_options
from sfprompt.data import load_splits
from sfprompt.federation import prepare, train_partition, training_pool

TINY = ["--dataset", "imagefolder", "--model", "test_vit", "--weights", "none", "--image-size", "32",
        "--prompt-tokens", "2", "--clients", "3", "--clients-per-round", "2", "--rounds", "1", "--batch-size", "8",
        "--no-progress"]


def config(imagefolder, **changes) -> Config:
    return Config(dataset="imagefolder", data_dir=str(imagefolder), model="test_vit", weights="none", image_size=32,
                  prompt_tokens=2, clients=3, clients_per_round=2, rounds=1, batch_size=8, **changes)


def test_validation_samples_are_held_out_of_every_client_stratified_and_seeded(imagefolder):
    splits = load_splits("imagefolder", imagefolder)
    base = config(imagefolder)
    held = config(imagefolder, validation_samples=9)
    train, validation = training_pool(held, splits)
    assert len(validation) == 9 and len(train) == 36 - 9
    assert not set(train) & set(validation) and sorted([*train, *validation]) == list(range(36))
    assert np.bincount(splits.train_labels[validation]).tolist() == [3, 3, 3]  # the class mix kept
    train_idx, parts = train_partition(held, splits)
    clients_hold = {int(train_idx[p]) for part in parts for p in part}
    assert clients_hold == set(train.tolist())  # every other training sample, and no validation one, is a client's
    assert (training_pool(held, splits)[1] == validation).all()  # the same draw in every process
    assert len(training_pool(base, splits)[1]) == 0 and len(training_pool(base, splits)[0]) == 36
    other_seed = training_pool(held.replace(seed=1), splits)[1]
    assert set(other_seed) != set(validation)


def test_a_validation_run_never_reads_the_test_set(imagefolder, tmp_path, capsys):
    for image in (imagefolder / "test").rglob("*.png"):
        image.write_bytes(b"not an image")  # decoding any test image now fails
    out = tmp_path / "run"
    assert main(["run", *TINY, "--data-dir", str(imagefolder), "--validation-samples", "6", "--out", str(out)]) == 0
    assert "30 train / 6 validation samples (the test set unread)" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["validation_samples"] == 6
    with pytest.raises(Exception, match="cannot identify image"):  # the same run on the test set reads it
        main(["run", *TINY, "--data-dir", str(imagefolder), "--out", str(tmp_path / "test")])


def test_evaluation_uses_the_validation_samples(imagefolder):
    fed = prepare(config(imagefolder, validation_samples=6))
    validation = training_pool(fed.config, fed.data)[1]
    assert fed.test.indices == validation.tolist() and fed.test.dataset.raw is fed.data.train


@pytest.mark.parametrize("changes, message", [
    ({"validation_samples": 0}, "--validation-samples must be at least 1"),
    ({"validation_samples": 34}, "leaves fewer training samples than --clients"),
    ({"train_samples": 12, "validation_samples": 10}, r"--train-samples \(12\) less --validation-samples \(10\)"),
])
def test_too_many_validation_samples_are_refused(imagefolder, changes, message):
    with pytest.raises(ConfigError, match=message):
        prepare(config(imagefolder, **changes))


def test_the_mean_samples_per_client_count_only_the_clients_samples(imagefolder, tmp_path):
    """--prune-keep by-size places a client against the federation's mean, which leaves validation samples out."""
    from sfprompt.federation import export_clients, prepare_client

    assert prepare(config(imagefolder)).settings.mean_samples == 36 / 3
    held = config(imagefolder, validation_samples=9)
    assert prepare(held).settings.mean_samples == 27 / 3
    assert prepare_client(held, 0, ["class_0", "class_1", "class_2"]).settings.mean_samples == 27 / 3
    folder = export_clients(config(imagefolder), tmp_path / "nodes", progress=False)[0]
    classes = ["class_0", "class_1", "class_2"]
    assert prepare_client(config(imagefolder), 0, classes, str(folder)).settings.mean_samples is None  # a node alone
    assert prepare_client(config(imagefolder, train_samples=30), 0, classes, str(folder)).settings.mean_samples == 10


def test_an_option_left_unset_follows_the_recipe_and_a_change_of_method():
    from sfprompt.compare import variant_config

    sfprompt = Config()
    # the probe warm start of the tail, the prompts at 0.01, and a closing refit round
    assert (sfprompt.probe_rounds, sfprompt.refit_rounds, sfprompt.lr, sfprompt.prompt_lr) == (1, 1, 3e-4, 0.01)
    assert [(c.probe_rounds, c.refit_rounds, c.prompt_lr) for c in (Config(rounds=2), Config(refit_rounds=0))] == [
        (1, 0, 3e-4), (1, 0, 3e-4)]  # no room for a refit round, or none asked: the prompts at the tail's rate
    assert [(c.probe_rounds, c.refit_rounds) for c in (Config(probe_rounds=0), Config(probe_rounds=2, rounds=3),
            Config(probe_rounds=2, rounds=4), Config(method="sfl", probe_rounds=1))] == [(0, 0), (2, 0), (2, 1), (1, 0)]
    assert sfprompt.to_dict()["lr"] == 3e-4 and sfprompt.given()["lr"] is None  # saved as taken, left unset in given
    assert (Config(rounds=1).probe_rounds, Config(rounds=1).lr) == (0, 0.01)  # one round: no room for a probe
    assert (sfprompt.probe_clients, Config(clients=20, clients_per_round=4).probe_clients) == (10, 20)  # every client
    assert (Config(rounds=1).probe_clients, Config(method="sfl").probe_clients, Config(probe_clients=7).probe_clients) \
        == (5, 5, 7)  # without probe rounds, a round's clients; one given stays
    assert (Config(probe_rounds=0).lr, Config(method="sfl").probe_rounds, Config(method="sfl").lr) == (0.01, 0, 0.01)
    assert Config(method="sfl", probe_rounds=1).lr == 3e-4 and Config(lr=0.05).lr == 0.05
    assert (sfprompt.replace(method="fl").probe_rounds, sfprompt.replace(method="fl").lr) == (0, 0.01)
    assert Config(lr=0.05).replace(method="sfl").lr == 0.05
    assert (variant_config(sfprompt, "fl-prompt", {}).lr, variant_config(sfprompt, "fl", {}).probe_rounds) == (0.01, 0)
    refit = variant_config(sfprompt.replace(out="x"), "sfprompt-probe-refit", {})  # compare's name for the default
    assert refit.to_dict() == sfprompt.replace(out=refit.out).to_dict()
    assert Config(**{**recipe_options("paper"), "probe_rounds": 1}).refit_rounds == 0  # the paper's recipe has none
    assert Config.from_dict(sfprompt.to_dict()).given()["lr"] == 3e-4  # a saved run's values are given
    assert Config.from_saved({"method": "sfprompt", "lr": 0.01, "prompt_lr": 0.01}).probe_rounds == 0  # saved before
    assert Config.from_saved({"method": "sfprompt", "probe_rounds": 1, "lr": 3e-4, "prompt_lr": 3e-4}).refit_rounds == 0
    saved = {"method": "sfprompt", "probe_rounds": 1, "clients": 10, "clients_per_round": 4}  # before --probe-clients
    assert Config.from_saved(saved).probe_clients == 4 and Config.from_saved({**saved, "probe_clients": 10}).probe_clients == 10
