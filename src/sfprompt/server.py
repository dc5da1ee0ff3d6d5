"""The body server: one shared frozen body that runs the middle of every client's model.

It speaks only in `Message`s: a `forward` carrying the head's tokens is answered with the rows of
the body output that the tail reads; the matching `backward` carrying their gradient is answered
with the gradient of the tokens the client needs (only the prompt rows when the head holds no
blocks, since nothing else on the client is trained).
"""

from __future__ import annotations

import torch

from .codec import Message
from .meter import SERVER, Meter
from .model import SplitViT


class ProtocolError(RuntimeError):
    """A message the server cannot act on (unknown kind, backward without forward, bad shape)."""


class BodyServer:
    def __init__(self, model: SplitViT, meter: Meter, device: torch.device) -> None:
        self.body = model.body
        self.layout = model.layout
        self.meter = meter
        self.device = device
        self.grad_rows = model.grad_rows
        # client id -> (tokens it sent, body output rows returned), awaiting the backward.
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def handle(self, message: Message) -> Message:
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
            rows = self.body(tokens)[:, self.layout.tail_rows]  # (B, R, D)
        self._pending[client] = (tokens, rows)
        return Message("body_output", {"rows": rows.detach()})

    def _backward(self, client: str, grad: torch.Tensor) -> Message:
        if client not in self._pending:
            raise ProtocolError(f"backward from client {client} without a pending forward")
        tokens, rows = self._pending.pop(client)
        if grad.shape != rows.shape:
            raise ProtocolError(f"gradient of shape {tuple(grad.shape)}, expected {tuple(rows.shape)}")
        with self.meter.work(SERVER, "split"):
            rows.backward(grad.to(self.device))
        return Message("input_grad", {"grad": tokens.grad[:, self.grad_rows]})
