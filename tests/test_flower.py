"""The Flower runtime against the in-process one: same config and seed, same result, same bytes."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.config import Config, ConfigError
from sfprompt.flower.settings import as_run_config, from_run_config, run_config_defaults
from sfprompt.runner import run

from test_runner import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_flower_simulation_gives_the_in_process_result(imagefolder, tmp_path):
    from flwr.simulation import run_simulation

    from sfprompt.flower import client_app, server_app

    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=2)
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    run_simulation(server_app.make_app(as_run_config(config.replace(out=str(tmp_path / "flower")))),
                   client_app.app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})

    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert local.keys() == flower.keys()
    for key in local:
        assert torch.allclose(local[key], flower[key], atol=1e-5, rtol=1e-4), key
    for a, b in zip(records(tmp_path / "local"), records(tmp_path / "flower"), strict=True):
        assert a["clients"] == b["clients"] and a["accuracy"] == pytest.approx(b["accuracy"])
        assert a["messages_by_phase"] == b["messages_by_phase"]
        assert a["flops_by_phase"] == b["flops_by_phase"] and a["client_peak_memory_bytes"] == b["client_peak_memory_bytes"]
        # identical tensors; only the JSON header's float losses may differ in their last digit
        for phase, size in a["bytes_by_phase"].items():
            assert abs(b["bytes_by_phase"][phase] - size) <= 4 * a["messages_by_phase"][phase], phase


def test_the_pyproject_run_config_holds_every_option_at_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == run_config_defaults()
    config, options = from_run_config(run_config_defaults())
    assert config == Config() and options.body_address == "127.0.0.1:0" and options.resume is False


def test_run_config_errors_are_clear():
    with pytest.raises(ConfigError, match="number of SuperNodes"):
        from_run_config({"clients": 4})
    with pytest.raises(ConfigError, match="unknown option 'body-port'"):
        from_run_config({"body-port": 1})
    with pytest.raises(ConfigError, match="'resume' expects bool"):
        from_run_config({"resume": "yes"})
    assert from_run_config({"alpha": ""})[0].alpha is None and from_run_config({"alpha": 0.5})[0].alpha == 0.5
