"""What a federated method is: a few hooks on the shared round loop and the shared client phases."""

from __future__ import annotations

import torch
from torch import nn

from ..aggregate import FedAvg
from ..client import Client, RoundContext
from ..model import SplitViT


class Method:
    name: str = ""
    # Clients train one after another, each from the previous one's upload, with no averaging (sl);
    # otherwise clients start from the same global state and the server averages (FedAvg).
    sequential: bool = False
    # Clients train through the body server (split methods); otherwise a client holds what it runs.
    split: bool = False
    # Entries of the global state that stay on the server: not broadcast (clients start them fresh).
    server_only: tuple[str, ...] = ()

    def new_params(self, model: SplitViT) -> nn.Module:
        """The global trainable state: prompts and tail unless the method trains more."""
        return model.new_params()

    def state_bytes(self, model: SplitViT) -> int:
        """The bytes of the global state (the broadcast, and each upload) less the header: what a message may
        carry beside a batch of activations. The prompts and tail unless the method exchanges more."""
        return model.params_bytes

    def client_holds(self, model: SplitViT) -> tuple[nn.Module, ...]:
        """The frozen modules resident on a client (they count towards its memory)."""
        return (model.head,)

    def logits(self, model: SplitViT, params: nn.Module, images: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The global model's predictions (`generator`: the defence's randomness, if any)."""
        return model.logits(images, params, generator)

    def stage(self, round_: int, config) -> "Method":
        """The method that runs round `round_` of a run of `config`: this one, unless the run opens with probe
        rounds (--probe-rounds) or closes with them (--refit-rounds), which the linear probe runs with the global
        prompts (the method's initial ones, or those it trained)."""
        if config.is_probe_round(round_):
            from .linear_probe import LinearProbe

            return LinearProbe()
        return self

    def carry(self, model: SplitViT, params: nn.Module) -> nn.Module:
        """This method's global state, taken from another stage's (`params`): every tensor the two share by name
        and shape (the prompts, the tail), the rest as `new_params` makes it."""
        fresh = self.new_params(model).to(next(iter(params.state_dict().values())).device)
        held = params.state_dict()
        fresh.load_state_dict({name: held[name] if name in held and held[name].shape == value.shape else value
                               for name, value in fresh.state_dict().items()})
        return fresh

    def broadcast(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the server sends each sampled client of the global state: all of it but `server_only`."""
        return {name: value for name, value in state.items() if name not in self.server_only}

    def aggregate(self, current: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]], weights: list[int],
                  aggregator: FedAvg) -> dict[str, torch.Tensor]:
        """The next global state from the current one and this round's valid uploads, weighted by their sample
        counts: the run's `aggregator` (--aggregator: FedAvg unless it names one of Flower's strategies)."""
        return aggregator(current, uploads, weights)

    def client_round(self, client: Client, ctx: RoundContext) -> dict:
        """One client's work in a round; returns what it reports beside its upload."""
        raise NotImplementedError
