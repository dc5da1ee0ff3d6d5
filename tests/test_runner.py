import json

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.cli import main
from sfprompt.codec import Message, encode
from sfprompt.config import Config, ConfigError
from sfprompt.federation import resolve_device
from sfprompt.machine import processor
from sfprompt.runner import run


def tiny_config(imagefolder, tmp_path, **changes):
    # No probe round unless a test asks for one (the default recipe's is tested in test_probe), so that every round
    # of a method is its own.
    options = dict(dataset="imagefolder", data_dir=str(imagefolder), model="test_vit", weights="none",
                   image_size=32, prompt_tokens=2, clients=3, clients_per_round=2, rounds=2, batch_size=8,
                   probe_rounds=0, out=str(tmp_path / "run"))
    return Config(**(options | changes))


def test_run_writes_metrics_summary_and_checkpoint(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path)
    summary = run(config, progress=False, log=lambda line: None)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for key in ("accuracy", "loss", "bytes_up", "bytes_down", "client_flops", "server_flops"):
        assert all(key in r for r in records), key
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["method"] == "sfprompt" and on_disk["config"] == config.to_dict()
    for key in ("bytes_up", "bytes_down", "client_flops", "server_flops"):
        assert on_disk[key] == sum(r[key] for r in records) > 0
    assert on_disk["final_accuracy"] == records[-1]["accuracy"]
    assert on_disk["best_accuracy"] == max(r["accuracy"] for r in records)
    assert 0 < on_disk["client_peak_memory_bytes"]
    assert on_disk["processor"] == processor(resolve_device(config.device)) != ""  # whose rounding made these numbers
    assert summary["client_flops"] < summary["server_flops"]
    checkpoint = load_file(out / "global.safetensors")
    assert checkpoint["prompts"].shape == (1, 2, 64) and "tail.head.weight" in checkpoint


def test_same_config_gives_the_same_numbers(imagefolder, tmp_path):
    first = run(tiny_config(imagefolder, tmp_path, out=str(tmp_path / "a")), progress=False, log=lambda _: None)
    second = run(tiny_config(imagefolder, tmp_path, out=str(tmp_path / "b")), progress=False, log=lambda _: None)
    for key in ("final_accuracy", "bytes_up", "bytes_down", "client_flops", "server_flops"):
        assert first[key] == second[key], key
    a, b = load_file(tmp_path / "a" / "global.safetensors"), load_file(tmp_path / "b" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_byte_counts_are_the_encoded_messages(imagefolder, tmp_path):
    """Broadcast and upload carry exactly the prompts and tail; split bytes scale with kept samples."""
    config = tiny_config(imagefolder, tmp_path, rounds=1, keep_ratio=0.5, prune_per_class=False)
    run(config, progress=False, log=lambda _: None)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    params = load_file(tmp_path / "run" / "global.safetensors")
    broadcast = len(encode(Message("global", params)))
    assert record["bytes_by_phase"]["down/broadcast"] == 2 * broadcast
    upload = record["bytes_by_phase"]["up/upload"]
    assert 2 * broadcast < upload < 2 * broadcast + 2 * 200  # plus a small JSON meta per upload
    assert record["kept_samples"] == 2 * 6  # two clients of 12 samples, half kept
    # a forward and a backward message each way per mini-batch: 2 clients x 2 epochs x 1 batch of 6 x 2
    assert config.split_epochs == 2
    assert record["messages_by_phase"]["up/split"] == record["messages_by_phase"]["down/split"] == 2 * 2 * 1 * 2


def test_no_pruning_sends_more_activations(imagefolder, tmp_path):
    pruned = run(tiny_config(imagefolder, tmp_path, rounds=1, keep_ratio=0.5, out=str(tmp_path / "p")),
                 progress=False, log=lambda _: None)
    full = run(tiny_config(imagefolder, tmp_path, rounds=1, keep_ratio=1.0, out=str(tmp_path / "f")),
               progress=False, log=lambda _: None)
    assert pruned["bytes_up"] < full["bytes_up"]
    assert pruned["server_flops"] < full["server_flops"]


def test_without_local_loss_the_metrics_stay_valid_json(imagefolder, tmp_path):
    run(tiny_config(imagefolder, tmp_path, rounds=1, local_epochs=0), progress=False, log=lambda _: None)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["local_loss"] is None and record["train_loss"] > 0


def test_learns_a_learnable_task(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, rounds=4, keep_ratio=1.0, optimizer="adam", lr=0.01, prompt_lr=0.01)
    summary = run(config, progress=False, log=lambda _: None)
    assert summary["best_accuracy"] >= 0.75  # three classes: chance is 0.33


def test_config_file_and_flags(imagefolder, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'dataset = "imagefolder"\ndata-dir = "{imagefolder}"\nmodel = "test_vit"\nweights = "none"\n'
                    f'image-size = 32\nclients = 3\nclients-per-round = 2\nrounds = 3\nbatch-size = 8\n')
    out = tmp_path / "cli"
    assert main(["run", "--config", str(toml), "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["config"]["clients"] == 3 and summary["config"]["model"] == "test_vit"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1]"),
        (["--clients", "3", "--clients-per-round", "4"], "exceeds --clients"),
        (["--dataset", "imagenet-1k"], "unknown dataset"),
        (["--model", "resnet50", "--weights", "none"], "not a timm VisionTransformer"),
        (["--image-size", "50", "--weights", "none", "--model", "test_vit"], "not divisible by the patch size"),
        (["--weights", "/missing.safetensors", "--model", "test_vit"], "does not exist"),
        (["--config", "/missing.toml"], "does not exist"),
        (["--train-samples", "5", "--clients", "10"], "fewer than --clients"),
        (["--test-samples", "500", "--model", "test_vit", "--weights", "none", "--image-size", "32"],
         "--test-samples 500 exceeds the 12 samples"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, imagefolder, tmp_path):
    base = ["run", "--dataset", "imagefolder", "--data-dir", str(imagefolder), "--out", str(tmp_path / "x")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_config_key_is_named(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("rounds = 2\nlearning-rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning-rate'"):
        Config.from_toml(toml)
    toml.write_text("rounds = 'two'\n")
    with pytest.raises(ConfigError, match="expects int"):
        Config.from_toml(toml)


def test_eval_every_skips_the_rounds_between_and_changes_nothing_else(imagefolder, tmp_path):
    """--eval-every 2 over 3 rounds evaluates after rounds 2 and 3 only (the last always), with the accuracies and
    the final params of a run evaluated every round: evaluating draws no randomness the training uses."""
    every = run(tiny_config(imagefolder, tmp_path, rounds=3, out=str(tmp_path / "every")), progress=False,
                log=lambda _: None)
    sparse = run(tiny_config(imagefolder, tmp_path, rounds=3, eval_every=2, out=str(tmp_path / "sparse")),
                 progress=False, log=lambda _: None)
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("every", "sparse")}
    assert [r["accuracy"] is None for r in records["sparse"]] == [True, False, False]
    assert [r["accuracy"] for r in records["sparse"][1:]] == [r["accuracy"] for r in records["every"][1:]]
    assert sparse["final_accuracy"] == every["final_accuracy"] and sparse["bytes_up"] == every["bytes_up"]
    saved = [load_file(tmp_path / name / "global.safetensors") for name in ("every", "sparse")]
    assert all(torch.equal(saved[0][key], saved[1][key]) for key in saved[0])
    with pytest.raises(ConfigError, match="--eval-every must be at least 1"):
        Config(eval_every=0)


def test_a_run_resumed_to_end_at_a_round_eval_every_skipped_is_evaluated_there(imagefolder, tmp_path, monkeypatch):
    import sfprompt.runner as runner

    config = tiny_config(imagefolder, tmp_path, rounds=3, eval_every=2)
    original = runner._round

    def failing(fed, method, executor, round_, *args):
        if round_ == 2:
            raise runner.RoundFailed("killed")
        return original(fed, method, executor, round_, *args)

    monkeypatch.setattr(runner, "_round", failing)
    with pytest.raises(runner.RoundFailed):
        run(config, progress=False, log=lambda _: None)
    monkeypatch.setattr(runner, "_round", original)
    summary = run(config.replace(rounds=1), progress=False, log=lambda _: None, resume=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["accuracy"] is not None
    assert summary["final_accuracy"] == records[0]["accuracy"]


def test_client_holdout_keeps_a_seeded_share_of_each_client_out_of_training_and_measures_the_model_on_it(imagefolder,
                                                                                                       tmp_path):
    from sfprompt.federation import prepare

    config = tiny_config(imagefolder, tmp_path, rounds=2, eval_every=2, alpha=0.5, client_holdout=0.25)
    fed, plain = prepare(config), prepare(config.replace(client_holdout=0.0))
    for client, whole, held in zip(fed.clients, plain.clients, fed.holdouts):
        training = set(client.data.indices)
        assert training.isdisjoint(held) and training | set(held) == set(whole.data.indices)
        assert len(held) == min(round(0.25 * whole.num_examples), whole.num_examples - 1)
    assert all(len(held) == 0 for held in plain.holdouts)
    run(config, progress=False, log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["client_accuracy"] is None  # not an evaluated round
    accuracies = records[1]["client_accuracy"]
    assert len(accuracies) == config.clients and all(0 <= a <= 1 for a in accuracies if a is not None)
    run(config.replace(client_holdout=0.0, out=str(tmp_path / "plain")), progress=False, log=lambda _: None)
    plain_record = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "client_accuracy" not in plain_record  # off by default: the records published so far are unchanged
    with pytest.raises(ConfigError, match=r"--client-holdout is a share of each client's samples, in \[0, 1\)"):
        tiny_config(imagefolder, tmp_path, client_holdout=1.0)


def test_a_client_holdout_too_small_to_hold_a_sample_out_measures_no_client(imagefolder, tmp_path):
    lines = []
    run(tiny_config(imagefolder, tmp_path, rounds=1, client_holdout=0.001), progress=False, log=lines.append)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["client_accuracy"] == [None] * 3 and not any("held-out accuracy" in line for line in lines)
