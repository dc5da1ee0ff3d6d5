"""The server's aggregation of a round's uploads: sfprompt's own FedAvg, or one of Flower's strategies.

FedAvg stays the default and sfprompt's own (pure tensor math in float64, so that a run's numbers do not change
with Flower's version). `--aggregator` picks one of Flower's strategies instead, run from our round loop in both
runtimes: the uploads are handed to the strategy's `aggregate_train` as the replies it would get under Flower (one
ArrayRecord and the sample count each), so FedProx's averaging, the server optimizers (FedAvgM, FedAdam, FedYogi,
FedAdagrad) and the robust rules (FedMedian, FedTrimmedAvg) are Flower's code, not ours (FedProx's proximal term is
in the clients' training: `Client._step`). A strategy's state (moments, momentum, the
rounds it has aggregated) is checkpointed with the run, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

# name -> (Flower strategy class, its learning-rate argument, its momentum argument); None: it has none
FLOWER_STRATEGIES = {
    "fedprox": ("FedProx", None, None),  # FedAvg on the server; the clients add the proximal term (--proximal-mu)
    "fedavgm": ("FedAvgM", "server_learning_rate", "server_momentum"),
    "fedadam": ("FedAdam", "eta", "beta_1"),
    "fedyogi": ("FedYogi", "eta", "beta_1"),
    "fedadagrad": ("FedAdagrad", "eta", None),
    "fedmedian": ("FedMedian", None, None),
    "fedtrimmedavg": ("FedTrimmedAvg", None, None),
}
ROBUST = ("fedmedian", "fedtrimmedavg")  # they need every client's upload, not only the average


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Average state dicts key by key, weighted (by local data size in FedAvg)."""
    if not states:
        raise ValueError("fedavg needs at least one client update")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("fedavg weights must sum to a positive number")
    keys = states[0].keys()
    for state in states[1:]:
        if state.keys() != keys:
            raise ValueError("client updates hold different parameters")
    return {
        key: sum(state[key].double() * (w / total) for state, w in zip(states, weights)).to(states[0][key].dtype)
        for key in keys
    }


class FedAvg:
    """sfprompt's own FedAvg: the uploads averaged, weighted by their sample counts. It keeps no state."""

    name = "fedavg"

    def __call__(self, current: Mapping[str, torch.Tensor], uploads: Sequence[Mapping[str, torch.Tensor]],
                 weights: Sequence[float]) -> dict[str, torch.Tensor]:
        return fedavg(uploads, weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class FlowerStrategy(FedAvg):
    """One of Flower's strategies (`FLOWER_STRATEGIES`) as the server's aggregation: each round it gets the global
    state the clients started from (the server optimizers step from it) and the uploads with their sample counts."""

    def __init__(self, name: str, server_lr: float | None = None, server_momentum: float | None = None,
                 proximal_mu: float = 0.0) -> None:
        try:
            from flwr.serverapp import strategy as strategies
        except ImportError:
            raise ImportError(f"--aggregator {name} is Flower's: pip install 'sfprompt[flower]'") from None
        class_name, lr_name, momentum_name = FLOWER_STRATEGIES[name]
        options = {}
        if server_lr is not None:
            options[lr_name] = server_lr
        if server_momentum is not None:
            options[momentum_name] = server_momentum
        if name == "fedprox":  # the strategy only reports it (the clients apply it), but Flower warns without it
            options["proximal_mu"] = proximal_mu
        self.name, self.strategy, self.rounds = name, getattr(strategies, class_name)(**options), 0
        self.names: list[str] = []  # the uploads' tensors, in the order the strategy last saw them
        self._momentum: dict[str, np.ndarray] | None = None  # FedAvgM's restored momentum, until the next round

    def __call__(self, current, uploads, weights):
        from .flower.records import as_numpy, from_arrays, to_arrays

        names = self.names = sorted(uploads[0])
        if hasattr(self.strategy, "momentum_vector"):  # FedAvgM steps from the arrays it holds, in this order
            self.strategy.current_arrays = to_arrays({name: current[name] for name in names})
            if self._momentum is not None:  # restored by name (`load_state_dict`)
                self.strategy.momentum_vector, self._momentum = [self._momentum[name] for name in names], None
        elif hasattr(self.strategy, "m_t"):  # FedAdam, FedYogi, FedAdagrad: from the arrays last broadcast
            self.strategy.current_arrays = {name: as_numpy(current[name]) for name in names}
        self.rounds += 1
        arrays, _ = self.strategy.aggregate_train(self.rounds, [_reply(k, upload, names, weight)
                                                                for k, (upload, weight) in enumerate(zip(uploads, weights))])
        averaged = from_arrays(arrays)
        return {name: averaged[name].to(current[name].device, current[name].dtype) for name in names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's state that a later round depends on (moments, momentum) and the rounds it aggregated."""
        state = {"rounds": torch.tensor(self.rounds)}
        for moment in ("m_t", "v_t"):
            for name, value in (getattr(self.strategy, moment, None) or {}).items():
                state[f"{moment}.{name}"] = torch.from_numpy(np.array(value))
        momentum = self._momentum or dict(zip(self.names, getattr(self.strategy, "momentum_vector", None) or []))
        for name, value in momentum.items():
            state[f"momentum.{name}"] = torch.from_numpy(np.array(value))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.rounds = int(state.get("rounds", 0))
        for moment in ("m_t", "v_t"):
            values = {key.split(".", 1)[1]: value.numpy() for key, value in state.items() if key.startswith(moment + ".")}
            if hasattr(self.strategy, moment):
                setattr(self.strategy, moment, values or None)
        momentum = {key.split(".", 1)[1]: value.numpy() for key, value in state.items() if key.startswith("momentum.")}
        self._momentum = momentum or None  # set on the strategy in the order of the next round's uploads


def make_aggregator(name: str, server_lr: float | None = None, server_momentum: float | None = None,
                    proximal_mu: float = 0.0) -> FedAvg:
    """The aggregation `--aggregator` names, with its `--server-lr` and `--server-momentum` (None: Flower's defaults)
    and FedProx's `--proximal-mu`."""
    return FedAvg() if name == "fedavg" else FlowerStrategy(name, server_lr, server_momentum, proximal_mu)


def configured_aggregator(config) -> FedAvg:
    """The aggregation a run's `Config` asks for (`make_aggregator` with its options)."""
    return make_aggregator(config.aggregator, config.server_lr, config.server_momentum, config.proximal_mu)


def _reply(client: int, upload: Mapping[str, torch.Tensor], names: list[str], weight: float):
    """An upload as the reply Flower's strategies aggregate: its arrays and its sample count, from node `client`."""
    from flwr.app import MetricRecord, RecordDict

    from .flower.records import to_arrays, train_message

    return train_message(RecordDict({"arrays": to_arrays({name: upload[name] for name in names}),
                                     "metrics": MetricRecord({"num-examples": weight})}), src_node=client)
