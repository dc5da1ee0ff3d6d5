"""The body server: one shared frozen body that runs the middle of every client's model.

It speaks only in `Message`s: a `forward` carrying the head's tokens is answered with the rows of
the body output that the tail reads; the matching `backward` carrying their gradient is answered
with the gradient of the tokens the client needs (only the prompt rows when the head holds no
blocks, since nothing else on the client is trained).

The body is frozen unless the server is given a body optimiser (SplitFed with `--train-body`,
Thapa et al.'s SplitFedV1): then each client trains its own copy of the round's body, and
`end_round` averages the copies, weighted by the samples each one saw, into the shared body.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable

import torch
from torch import nn

from .aggregate import fedavg
from .codec import Message
from .meter import SERVER, Meter
from .model import SplitViT


class ProtocolError(RuntimeError):
    """A message the server cannot act on (unknown kind, backward without forward, bad shape)."""


class BodyServer:
    def __init__(self, model: SplitViT, meter: Meter, device: torch.device,
                 body_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 pending_timeout_s: float = 600.0) -> None:
        self.body = model.body
        self.layout = model.layout
        self.meter = meter
        self.device = device
        self.grad_rows = model.grad_rows
        self.body_optimizer = body_optimizer
        # client id -> (tokens it sent, body output rows returned, when), awaiting the backward; a
        # forward whose backward never comes (the client crashed) is dropped after pending_timeout_s.
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.pending_timeout_s = pending_timeout_s
        self._lock = threading.Lock()  # a network channel calls from many threads: one batch at a time
        # client id -> [its body copy, its optimiser, samples trained] for this round (--train-body).
        self._copies: dict[str, list] = {}

    def end_round(self) -> None:
        """Fold this round's per-client body copies into the shared body (nothing if it is frozen),
        and forget every client's state: a forward still waiting for its backward was abandoned."""
        with self._lock:
            if self._copies:
                copies = list(self._copies.values())
                self.body.load_state_dict(fedavg([body.state_dict() for body, _, _ in copies], [n for _, _, n in copies]))
            self._copies.clear()
            self._pending.clear()

    def forget(self, client: str) -> None:
        """Drop everything held for a client that failed: its pending forward and its body copy."""
        with self._lock:
            self._pending.pop(client, None)
            self._copies.pop(client, None)

    @property
    def pending(self) -> int:
        """How many forwards await their backward (what the server holds for clients)."""
        return len(self._pending)

    def _body_for(self, client: str) -> nn.Module:
        if self.body_optimizer is None:
            return self.body
        if client not in self._copies:
            body = copy.deepcopy(self.body).requires_grad_(True)
            self._copies[client] = [body, self.body_optimizer(body), 0]
        return self._copies[client][0]

    def handle(self, message: Message) -> Message:
        with self._lock:
            self._expire()
            return self._handle(message)

    def _expire(self) -> None:
        stale = time.monotonic() - self.pending_timeout_s
        for client in [c for c, (_, _, since) in self._pending.items() if since < stale]:
            del self._pending[client]

    def _handle(self, message: Message) -> Message:
        client = str(message.meta.get("client"))
        if message.kind == "forward":
            return self._forward(client, message.tensors["tokens"])
        if message.kind == "backward":
            return self._backward(client, message.tensors["grad"])
        raise ProtocolError(f"unknown message kind {message.kind!r}")

    def _forward(self, client: str, tokens: torch.Tensor) -> Message:
        expected = (self.layout.length, self.layout.width)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ProtocolError(f"tokens of shape {tuple(tokens.shape)}, expected (B, {expected[0]}, {expected[1]})")
        tokens = tokens.to(self.device).requires_grad_(True)
        with self.meter.work(SERVER, "split"), torch.enable_grad():
            rows = self._body_for(client)(tokens)[:, self.layout.tail_rows]  # (B, R, D)
        self._pending[client] = (tokens, rows, time.monotonic())
        return Message("body_output", {"rows": rows.detach()})

    def _backward(self, client: str, grad: torch.Tensor) -> Message:
        if client not in self._pending:
            raise ProtocolError(f"backward from client {client} without a pending forward")
        tokens, rows, _ = self._pending.pop(client)
        if grad.shape != rows.shape:
            raise ProtocolError(f"gradient of shape {tuple(grad.shape)}, expected {tuple(rows.shape)}")
        with self.meter.work(SERVER, "split"):
            rows.backward(grad.to(self.device))
            if client in self._copies:  # the server's own training step (--train-body)
                _, optimizer, _ = self._copies[client]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self._copies[client][2] += len(grad)
        return Message("input_grad", {"grad": tokens.grad[:, self.grad_rows]})
