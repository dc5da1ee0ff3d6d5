"""--aggregator: Flower's strategies as the server's aggregation, from sfprompt's round loop."""

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.aggregate import FLOWER_STRATEGIES, fedavg, make_aggregator
from sfprompt.config import AGGREGATORS, Config, ConfigError
from sfprompt.runner import run

from test_runner import tiny_config


def uploads(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"prompts": torch.randn(1, 2, 4, generator=generator), "tail.head.weight": torch.randn(3, 4, generator=generator)}
            for _ in range(count)]


def test_every_aggregator_the_config_offers_is_one_flower_has():
    assert AGGREGATORS == ("fedavg", *FLOWER_STRATEGIES)
    current = uploads(1, seed=9)[0]
    for name in AGGREGATORS:
        result = make_aggregator(name)(current, uploads(), [1, 2, 3])
        assert result.keys() == current.keys() and all(result[k].dtype == current[k].dtype for k in result), name


def test_fedavgm_without_momentum_is_fedavg_and_the_robust_rules_resist_an_outlier():
    current, sent = uploads(1, seed=9)[0], uploads()
    averaged = fedavg(sent, [1, 2, 3])
    flower = make_aggregator("fedavgm")(current, sent, [1, 2, 3])
    assert all(torch.allclose(averaged[k], flower[k], atol=1e-6) for k in averaged)
    poisoned = uploads(4) + [{name: value + 1e3 for name, value in sent[0].items()}]
    for name in ("fedmedian", "fedtrimmedavg"):  # one wild upload of five moves neither far (Flower trims 20 % a side)
        robust = make_aggregator(name)(current, poisoned, [1] * 5)
        assert all(robust[k].abs().max() < 10 for k in robust), name
    assert fedavg(poisoned, [1] * 5)["prompts"].abs().max() > 100


@pytest.mark.parametrize("name, momentum", [("fedavgm", 0.9), ("fedadam", None), ("fedyogi", None), ("fedadagrad", None)])
def test_a_server_optimizer_resumed_from_its_state_continues_exactly(name, momentum):
    current = uploads(1, seed=9)[0]
    straight = make_aggregator(name, server_lr=0.5, server_momentum=momentum)
    for seed in range(2):
        current = straight(current, uploads(seed=seed), [1, 2, 3])
    resumed = make_aggregator(name, server_lr=0.5, server_momentum=momentum)
    resumed.load_state_dict({k: v.clone() for k, v in straight.state_dict().items()})
    assert resumed.state_dict().keys() == straight.state_dict().keys() and len(straight.state_dict()) > 1
    a, b = straight(current, uploads(seed=5), [1, 2, 3]), resumed(current, uploads(seed=5), [1, 2, 3])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_a_server_optimizer_checkpoints_its_state_and_moves_otherwise(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, rounds=2)
    run(config.replace(out=str(tmp_path / "fedavg")), progress=False, log=lambda _: None)
    run(config.replace(out=str(tmp_path / "fedadam"), aggregator="fedadam", server_lr=0.01), progress=False,
        log=lambda _: None)
    plain, adam = load_file(tmp_path / "fedavg" / "global.safetensors"), load_file(tmp_path / "fedadam" / "global.safetensors")
    assert not torch.allclose(plain["prompts"], adam["prompts"]) and all(torch.isfinite(v).all() for v in adam.values())
    saved = load_file(tmp_path / "fedadam" / "checkpoint.safetensors")
    assert {"aggregator.rounds", "aggregator.m_t.prompts", "aggregator.v_t.prompts"} <= saved.keys()


@pytest.mark.parametrize("changes, error", [
    ({"method": "linear-probe", "aggregator": "fedadam"}, "its statistics are summed"),
    ({"method": "sl", "aggregator": "fedmedian"}, "one after another"),
    ({"aggregator": "fedadagrad", "server_momentum": 0.9}, "--server-momentum does not apply to --aggregator fedadagrad"),
    ({"aggregator": "fedavg", "server_lr": 0.1}, "--server-lr does not apply to --aggregator fedavg"),
    ({"aggregator": "fedadam", "server_lr": 0.0}, "--server-lr must be positive"),
    ({"aggregator": "fedavgm", "server_momentum": 1.0}, r"--server-momentum must be in \[0, 1\)"),
    ({"aggregator": "krum"}, "krum"),
    ({"aggregator": "fedprox"}, "--aggregator fedprox needs --proximal-mu above 0"),
    ({"proximal_mu": 0.1}, "--proximal-mu is FedProx's"),
    ({"proximal_mu": -0.5}, "--proximal-mu must be a finite number, 0 or more"),
    ({"aggregator": "fedprox", "proximal_mu": float("nan")}, "--proximal-mu must be a finite number"),
    ({"method": "sfl", "train_body": True, "aggregator": "fedprox", "proximal_mu": 0.1}, "trains each client's body copy"),
])
def test_aggregator_options_that_cannot_apply_are_refused(changes, error):
    with pytest.raises(ConfigError, match=error):
        Config(**changes)


def test_fedprox_pulls_each_client_towards_the_global_params_it_received(imagefolder, tmp_path):
    from sfprompt.federation import prepare

    config = tiny_config(imagefolder, tmp_path, rounds=1, clients_per_round=3)
    fed = prepare(config)
    start = fed.method.new_params(fed.model).state_dict()  # the broadcast of round 1
    moved = {}
    for name, changes in (("fedavg", {}), ("fedprox", {"aggregator": "fedprox", "proximal_mu": 100.0})):
        run(config.replace(out=str(tmp_path / name), **changes), progress=False, log=lambda _: None)
        trained = load_file(tmp_path / name / "global.safetensors")
        moved[name] = sum(float((trained[k] - start[k]).norm()) for k in ("prompts", "tail.head.weight"))
    assert 0 < moved["fedprox"] < 0.5 * moved["fedavg"]


def test_fedprox_adds_mu_times_the_distance_to_the_received_params_to_each_step():
    from sfprompt.client import Client, RoundContext

    class Settings:
        proximal_mu = 0.5

    params = torch.nn.Linear(3, 2)
    anchor = {name: value.detach().clone() for name, value in params.named_parameters()}
    with torch.no_grad():
        params.weight.add_(1.0)  # moved one unit away from the broadcast
    optimizer = torch.optim.SGD(params.parameters(), lr=0.1)
    params.weight.grad, params.bias.grad = torch.zeros(2, 3), torch.zeros(2)
    client = Client.__new__(Client)
    client.settings = Settings()
    before = params.weight.detach().clone()
    client._step(RoundContext(params, None, None, None, None, anchor=anchor), optimizer)
    assert torch.allclose(params.weight, before - 0.1 * 0.5 * 1.0) and torch.equal(params.bias, anchor["bias"])
