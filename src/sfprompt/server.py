"""The body server: one shared frozen body that runs the middle of every client's model.

It speaks only in `Message`s: a `forward` carrying the head's tokens is answered with the rows of
the body output that the tail reads; the matching `backward` carrying their gradient is answered
with the gradient of the tokens the client needs (only the prompt rows when the head holds no
blocks, since nothing else on the client is trained).

Every request is checked before it touches the body: the client must hold a session for this round
(`admit`), with a sequence number above its last (a replayed or reordered request is refused), the
message must be of a known kind with exactly the expected tensor, of the model's dtype, finite, and
of the expected shape with at most `max_batch` samples. Anything else raises `ProtocolError`, which
a network channel returns to that client alone; the server keeps serving the others.

The body is frozen unless the server is given a body optimiser (SplitFed with `--train-body`,
Thapa et al.'s SplitFedV1): then each client trains its own copy of the round's body, and
`end_round` averages the copies, weighted by the samples each one saw, into the shared body.
"""

from __future__ import annotations

import copy
import hmac
import secrets
import threading
import time
from typing import Callable

import torch
from torch import nn

from .aggregate import fedavg
from .codec import Message, ProtocolError
from .meter import SERVER, Meter
from .model import SplitViT
from .optim import build_optimizer


def body_optimizer(settings) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """How the server trains a body copy (SplitFed --train-body): the client optimiser (--optimizer,
    --momentum, --weight-decay of the run's `TrainSettings`) at --backbone-lr."""
    return lambda body: build_optimizer([{"params": list(body.parameters()), "lr": settings.backbone_lr}], settings)


class BodyServer:
    def __init__(self, model: SplitViT, meter: Meter, device: torch.device,
                 body_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 pending_timeout_s: float = 600.0, max_batch: int = 4096) -> None:
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
        self.max_batch = max_batch
        self.dtype = model.initial_params.prompts.dtype
        # client id -> [its session secret for this round, the last sequence number it used]
        self._sessions: dict[str, list] = {}
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
            self._sessions.clear()

    def admit(self, client: str, session: str | None = None) -> str:
        """Open a session for `client` for this round; returns the secret its requests must carry."""
        session = session or secrets.token_hex(16)
        with self._lock:
            self._sessions[client] = [session, 0]
        return session

    def forget(self, client: str) -> None:
        """Drop everything held for a client that failed: its pending forward and its body copy."""
        with self._lock:
            self._pending.pop(client, None)
            self._copies.pop(client, None)
            self._sessions.pop(client, None)

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
        client = self._check_session(message.meta)
        expected = {"forward": "tokens", "backward": "grad"}.get(message.kind)
        if expected is None:
            raise ProtocolError(f"unknown message kind {message.kind!r}")
        if set(message.tensors) != {expected}:
            raise ProtocolError(f"a {message.kind} carries exactly one tensor, {expected!r}; got {sorted(message.tensors)}")
        tensor = message.tensors[expected]
        if tensor.dtype != self.dtype:
            raise ProtocolError(f"{expected} of dtype {tensor.dtype}, expected {self.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"{expected} holds non-finite values")
        if message.kind == "forward":
            return self._forward(client, tensor)
        return self._backward(client, tensor)

    def _check_session(self, meta: dict) -> str:
        client, session, seq = meta.get("client"), meta.get("session"), meta.get("seq")
        if not isinstance(client, (int, str)) or isinstance(client, bool):
            raise ProtocolError("the message names no client")
        client = str(client)
        entry = self._sessions.get(client)
        if entry is None or not isinstance(session, str) or not hmac.compare_digest(session.encode(), entry[0].encode()):
            raise ProtocolError(f"client {client} has no session in this round")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= entry[1]:
            raise ProtocolError(f"request {seq!r} of client {client} is a replay or out of order (last was {entry[1]})")
        entry[1] = seq
        return client

    def _forward(self, client: str, tokens: torch.Tensor) -> Message:
        expected = (self.layout.length, self.layout.width)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected or not 1 <= len(tokens) <= self.max_batch:
            raise ProtocolError(f"tokens of shape {tuple(tokens.shape)}, expected (B, {expected[0]}, {expected[1]}) "
                                f"with 1 <= B <= {self.max_batch}")
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
