"""The in-process runtime: every client of a round runs here, one after another.

Nothing is shortcut: each message still goes through the codec and is counted
(`transport.InProcessLink`), and each client talks to the body server in its own session.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from .client import Client, ClientFailure
from .codec import Message
from .federation import Federation
from .seeds import client_seed
from .meter import DOWN, UP
from .methods import Method
from .server import BodyServer, body_optimizer
from .transport import InProcessLink, SessionLink


def client_round(link: InProcessLink, client: Client, method: Method, global_params: torch.nn.Module, seed: int,
                 timeout_s: float | None = None) -> Message:
    """One client's round in this process, every message through the codec: the global params down,
    the client's phases in a session of its own, its upload up (returned as the server decodes it)."""
    received = link.send(Message("global", method.broadcast(global_params.state_dict())), DOWN, "broadcast")
    session = SessionLink(link, client.cid, link.server.admit(str(client.cid), client_blocks=client.model.client_blocks))
    return link.deliver(client.run_round(method, received, session, seed, timeout_s), UP, "upload")


class InProcessRuntime:
    """Clients run one after another in this process; messages still pass through the codec."""

    def __init__(self, federation: Federation, progress: bool = True) -> None:
        fed = self.federation = federation
        self.server = BodyServer(fed.model, fed.meter, fed.device,
                                 body_optimizer(fed.settings) if fed.config.train_body else None)
        self.link = InProcessLink(self.server, fed.meter, fed.device, fed.max_message_bytes)
        self.progress = progress

    def train(self, round_: int, cids: list[int], global_params: torch.nn.Module) -> tuple[list[Message], list[dict]]:
        fed = self.federation
        updates, dropped = [], []
        for cid in tqdm(cids, desc=f"round {round_}/{fed.config.rounds}", unit="client",
                        leave=False, disable=not self.progress, file=sys.stderr):
            try:
                updates.append(client_round(self.link_for(cid), fed.clients[cid], fed.method.stage(round_, fed.config),
                                            global_params, client_seed(fed.config.seed, round_, cid),
                                            fed.config.client_timeout_s))
            except ClientFailure as failure:
                self.server.forget(str(cid))
                dropped.append(failure.record())
        return updates, dropped

    def link_for(self, cid: int) -> InProcessLink:
        """The link client `cid`'s messages take: one for all (`sfprompt audit` taps its victim's)."""
        return self.link

    def end_round(self) -> None:
        self.server.end_round()

    def close(self) -> None:
        self.server.close()
