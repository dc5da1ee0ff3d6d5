"""Heterogeneous clients: a split point per client, chosen by its compute budget, served by one body
server, averaged into one global model."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.config import Config, ConfigError
from sfprompt.federation import prepare
from sfprompt.runner import run
from sfprompt.splits import _probe, affordable_split, client_models, head_gflop

from conftest import tiny_split
from test_runner import tiny_config


def test_head_costs_are_counted_per_split_point_and_grow_with_every_block():
    _, model = tiny_split()
    costs = head_gflop(model)
    assert len(costs) == model.depth
    assert costs == [_probe(model, blocks) / 1e9 for blocks in range(model.depth)]  # the linear extension is exact
    assert all(a < b for a, b in zip(costs, costs[1:]))


def test_a_client_keeps_the_deepest_head_its_budget_affords():
    costs = [1.0, 3.0, 5.0, 7.0]
    assert [affordable_split(costs, budget) for budget in (1.0, 2.9, 3.0, 6.5, 100.0)] == [0, 0, 1, 2, 3]
    with pytest.raises(ConfigError, match="does not cover the head's embedding"):
        affordable_split(costs, 0.5)


@pytest.mark.parametrize("changes, message", [
    (dict(client_budgets="1,x"), "numbers separated by commas"),
    (dict(client_budgets="1,-2"), "positive numbers"),
    (dict(client_budgets=" , "), "positive numbers"),
    (dict(client_budgets="1,nan"), "positive numbers"),
    (dict(client_budgets="1", client_blocks=1), "leave --client-blocks at 0"),
    (dict(client_budgets="1", method="fl"), "split methods"),
    (dict(client_budgets="1", method="sfl", train_body=True), "not --train-body"),
    (dict(client_budgets="1", pool_tokens=2), "change the function"),
    (dict(client_budgets="1", clip_norm=1.0), "change the function"),
])
def test_bad_budgets_are_refused_naming_the_option(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def budgets_for(model, *blocks: int) -> str:
    """--client-budgets whose values afford exactly these split points."""
    costs = head_gflop(model)
    return ",".join(f"{costs[b]:.9f}" for b in blocks)


def test_each_client_draws_a_budget_and_clients_of_a_split_share_one_model(imagefolder, tmp_path):
    _, model = tiny_split(prompts=2)
    config = tiny_config(imagefolder, tmp_path, clients=12, client_budgets=budgets_for(model, 0, 2, 4))
    models, line = client_models(model, config)
    assert sorted({m.client_blocks for m in models}) == [0, 2, 4]
    assert len({id(m) for m in models}) == 3
    assert [m.client_blocks for m in models] == [m.client_blocks for m in client_models(model, config)[0]]  # seeded
    assert line.startswith("split points (client blocks): 0 for ") and line.count(" GFLOP a sample)") == 3
    counts = Counter(m.client_blocks for m in models)
    for blocks, n in counts.items():
        assert f"{blocks} for {n} {'client' if n == 1 else 'clients'} (" in line


def test_a_mixed_federation_trains_the_same_model_as_a_uniform_one(imagefolder, tmp_path):
    """SplitFed computes the same prompt and tail gradients wherever the head ends (frozen blocks), so a
    federation of clients with different split points ends where one with no client blocks does; it
    spends more client FLOPs, fewer server FLOPs, and receives every row's gradient, not only the prompts'."""
    base = tiny_config(imagefolder, tmp_path, method="sfl", clients=4, clients_per_round=4, rounds=2,
                       shared_rows="per-sample")  # every row of every sample, at every split point: equal bytes up
    fed = prepare(base)
    mixed = base.replace(client_budgets=budgets_for(fed.model, 0, 1, 3), out=str(tmp_path / "mixed"))
    assert {c.model.client_blocks for c in prepare(mixed).clients} == {0, 1}  # the seeded draw, here
    uniform = run(base.replace(out=str(tmp_path / "uniform")), progress=False, log=lambda _: None)
    lines = []
    heterogeneous = run(mixed, progress=False, log=lines.append)
    a, b = load_file(tmp_path / "uniform" / "global.safetensors"), load_file(tmp_path / "mixed" / "global.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    assert heterogeneous["final_accuracy"] == uniform["final_accuracy"]
    assert heterogeneous["bytes_up"] == uniform["bytes_up"]
    assert heterogeneous["bytes_down"] > uniform["bytes_down"]
    assert heterogeneous["client_flops"] > uniform["client_flops"]
    assert heterogeneous["server_flops"] < uniform["server_flops"]
    assert "split points (client blocks): 0 for 3 clients" in lines[0]  # the log says who got which split


def test_sfprompt_runs_and_resumes_with_mixed_split_points(imagefolder, tmp_path):
    _, model = tiny_split(prompts=2)
    config = tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=3, rounds=2,
                         client_budgets=budgets_for(model, 0, 2))
    whole = run(config.replace(out=str(tmp_path / "whole")), progress=False, log=lambda _: None)
    run(config.replace(rounds=1), progress=False, log=lambda _: None)
    resumed = run(config, progress=False, log=lambda _: None, resume=True)
    assert resumed["final_accuracy"] == whole["final_accuracy"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["client_budgets"] == config.client_budgets


def test_cost_refuses_budgets_and_says_how_to_plan_each_split(capsys):
    from sfprompt.cli import main

    assert main(["cost", "--model", "test_vit", "--image-size", "32", "--client-budgets", "1,2"]) == 2
    assert "pass --client-blocks K for each split" in capsys.readouterr().err


def test_the_head_cost_probe_draws_the_defence_randomness_as_clients_do(monkeypatch):
    """On a GPU, the probe's generator once lived on the model's device while the defence draws on the CPU."""
    from sfprompt.defence import Defence

    _, model = tiny_split(defence=Defence(shuffle=True, clip_norm=1.0, noise_multiplier=1.0))
    devices = []
    protect = Defence.protect
    monkeypatch.setattr(Defence, "protect", lambda self, tokens, private, patches, generator:
                        devices.append(generator.device.type) or protect(self, tokens, private, patches, generator))
    head_gflop(model)
    assert devices and set(devices) == {"cpu"}
