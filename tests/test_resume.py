"""Checkpoint and resume: an interrupted or extended run ends exactly where an uninterrupted one does."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sfprompt import checkpoint
from sfprompt.cli import main
from sfprompt.client import Client
from sfprompt.config import Config, ConfigError
from sfprompt.runner import run

from test_probe import ambiguous_folder
from test_runner import tiny_config


def quiet(config, **kw):
    return run(config, progress=False, log=lambda _: None, **kw)


def outcome(folder):
    """Final params and every metric except wall time."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")
    return load_file(folder / "global.safetensors"), records


def assert_same(a, b):
    (params_a, records_a), (params_b, records_b) = a, b
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    assert records_a == records_b


@pytest.mark.parametrize("options", [{"method": "sfprompt"}, {"method": "sl"}, {"method": "sfl", "train_body": True},
                                     {"method": "sfprompt", "prompt_updates": "forward-only", "directions": 2},
                                     {"method": "sfprompt", "aggregator": "fedadam", "server_lr": 0.01}])
def test_killed_and_extended_runs_end_where_an_uninterrupted_run_does(imagefolder, tmp_path, monkeypatch, options):
    base = tiny_config(imagefolder, tmp_path, rounds=4, **options)
    quiet(base.replace(out=str(tmp_path / "straight")))

    quiet(base.replace(rounds=2, out=str(tmp_path / "extended")))
    quiet(base.replace(out=str(tmp_path / "extended")), resume=True)
    assert_same(outcome(tmp_path / "straight"), outcome(tmp_path / "extended"))

    calls, original = [], Client.run_round

    def killed_in_round_3(self, *args, **kwargs):
        calls.append(self.cid)
        if len(calls) > 2 * base.clients_per_round:
            raise KeyboardInterrupt  # the process dies mid-round
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "run_round", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        quiet(base.replace(out=str(tmp_path / "killed")))
    assert checkpoint.load(tmp_path / "killed").round == 2
    monkeypatch.setattr(Client, "run_round", original)
    quiet(base.replace(out=str(tmp_path / "killed")), resume=True)
    assert_same(outcome(tmp_path / "straight"), outcome(tmp_path / "killed"))


def test_a_resumed_run_counts_the_rounds_of_its_earlier_sessions_in_its_wall_seconds(imagefolder, tmp_path,
                                                                                      monkeypatch):
    config = tiny_config(imagefolder, tmp_path, rounds=2, out=str(tmp_path / "run"))
    quiet(config.replace(rounds=1))
    original = checkpoint.load

    def with_a_slow_first_round(path):  # as if round 1 had taken 1,000 s in an earlier session
        state = original(path)
        state.history[0]["seconds"] = 1000.0
        return state

    monkeypatch.setattr(checkpoint, "load", with_a_slow_first_round)
    summary = quiet(config, resume=True)
    assert 1000 < summary["wall_seconds"] < 1000 + 600


def test_a_run_killed_before_its_refit_round_resumes_to_the_fit_on_the_trained_prompts(tmp_path, monkeypatch):
    """The clients' probe statistics are checkpointed with the params they were taken with: resumed, a refit round
    takes its features afresh rather than reuse those of the opening probe round."""
    base = tiny_config(ambiguous_folder(tmp_path), tmp_path, rounds=3, probe_rounds=1, refit_rounds=1)  # they move
    quiet(base.replace(out=str(tmp_path / "straight")))
    calls, original = [], Client.run_round

    def killed_in_round_3(self, *args, **kwargs):
        calls.append(self.cid)
        if len(calls) > base.clients + base.clients_per_round:  # the probe round asked every client
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "run_round", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        quiet(base.replace(out=str(tmp_path / "killed")))
    assert checkpoint.load(tmp_path / "killed").round == 2
    assert all("probe_inputs.prompts" in state for state in checkpoint.load(tmp_path / "killed").clients.values())
    monkeypatch.setattr(Client, "run_round", original)
    with pytest.raises(ConfigError, match="closes with its last 1 rounds .* resume it with --rounds 3"):
        quiet(base.replace(rounds=4, out=str(tmp_path / "killed")), resume=True)  # would move the refit round
    quiet(base.replace(out=str(tmp_path / "killed")), resume=True)
    assert_same(outcome(tmp_path / "straight"), outcome(tmp_path / "killed"))


def test_resume_from_the_command_line_and_its_refusals(imagefolder, tmp_path, capsys):
    folder = tmp_path / "run"
    quiet(tiny_config(imagefolder, tmp_path, rounds=1, out=str(folder)))
    assert main(["run", "--resume", str(folder), "--rounds", "2", "--no-progress"]) == 0
    assert json.loads((folder / "summary.json").read_text())["rounds"] == 2
    assert main(["run", "--resume", str(folder), "--lr", "0.1"]) == 2
    assert "only --rounds and --device" in capsys.readouterr().err
    assert main(["run", "--resume", str(folder), "--rounds", "1"]) == 2
    assert "already completed 2 rounds" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_truncated_checkpoint_is_refused_with_a_clear_message(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, rounds=1)
    quiet(config)
    path = tmp_path / "run" / checkpoint.FILE
    payload = path.read_bytes()
    for cut in (len(payload) - 1, len(payload) // 2, 7):
        path.write_bytes(payload[:cut])
        with pytest.raises(ConfigError, match="damaged or truncated"):
            quiet(config.replace(rounds=2), resume=True)
    path.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        quiet(config.replace(rounds=2), resume=True)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(imagefolder, tmp_path, monkeypatch):
    config = tiny_config(imagefolder, tmp_path, rounds=2)
    original = checkpoint.os.fsync
    rounds_written = []

    def crash_on_second_write(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(checkpoint.FILE + ".partial"):
            rounds_written.append(fd)
            if len(rounds_written) == 2:
                raise OSError("disk full")
        original(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", crash_on_second_write)
    with pytest.raises(OSError, match="disk full"):
        quiet(config)
    assert checkpoint.load(tmp_path / "run").round == 1


def test_a_run_checkpointed_before_an_option_existed_resumes_with_its_default(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, rounds=2)
    quiet(config.replace(rounds=1))
    state = checkpoint.load(tmp_path / "run")
    del state.config["precision"]  # as a checkpoint written before --precision was added
    checkpoint.save(tmp_path / "run", state)
    quiet(config, resume=True)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_probe_round_checkpointed_before_probe_clients_existed_resumes_as_it_ran(imagefolder, tmp_path):
    """Before --probe-clients a probe round asked the round's --clients-per-round clients: a run saved without the
    option is read so (`config.BEFORE`), not with the option's default of an unrelated config, and resumes."""
    config = tiny_config(imagefolder, tmp_path, rounds=3, probe_rounds=1, probe_clients=2)  # 2 a round, of 3
    quiet(config.replace(rounds=2))
    state = checkpoint.load(tmp_path / "run")
    del state.config["probe_clients"]
    checkpoint.save(tmp_path / "run", state)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["probe_clients"]
    resumed = Config.from_saved({**saved, "rounds": 3})  # as `sfprompt run --resume` reads it
    assert (resumed.clients, resumed.probe_clients) == (3, 2)  # not today's default, every client
    quiet(resumed, resume=True)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_run_or_reuse_does_not_redo_a_finished_run_and_continues_an_interrupted_one(tmp_path, monkeypatch):
    """What compare and benchmarks/tune.py run through: a benchmark can be stopped and restarted at any time."""
    from sfprompt import runner
    from sfprompt.config import Config

    calls = []
    monkeypatch.setattr(runner, "run", lambda config, progress=True, resume=False: calls.append(resume) or {"ran": 1})
    config = Config(out=str(tmp_path / "run"))
    out = tmp_path / "run"
    assert runner.run_or_reuse(config) == {"ran": 1} and calls == [False]  # nothing there: run
    out.mkdir()
    saved = config.to_dict()
    del saved["prune_keep"]  # a run from before an option existed has what is now its default
    (out / "config.json").write_text(json.dumps(saved))
    (out / "checkpoint.safetensors").write_bytes(b"")
    runner.run_or_reuse(config)
    assert calls == [False, True]  # interrupted: continued
    (out / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
    assert runner.run_or_reuse(config) == {"final_accuracy": 0.5} and len(calls) == 2  # finished: not redone
    runner.run_or_reuse(config.replace(lr=0.5))
    assert calls[-1] is False and len(calls) == 3  # another config in the folder: run afresh
