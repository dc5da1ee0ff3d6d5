"""The body server: one shared frozen body that runs the middle of every client's model.

It speaks only in `Message`s: a `forward` carrying the head's tokens is answered with the rows of
the body output that the tail reads; the matching `backward` carrying their gradient is answered
with the gradient of the tokens the client needs (only the prompt rows when the head holds no
blocks, since nothing else on the client is trained). A `features` request is a forward that no
backward follows (linear-probe): answered alike, it runs without a graph and leaves nothing pending;
an `evaluate` (forward-only prompt updates) is one for several prompt sets at once: the prompts it
carries and their copies perturbed along the directions its seed names (residual: that copy alone),
answered with the tail's rows for every set; from a head with blocks (residual), a forward without a
graph of the one set the client perturbed itself.

Every request is checked before it is answered: the client must hold a session for this round
(`admit`), with a sequence number above its last (a replayed or reordered request is refused), the
message must be of a known kind with exactly the tensors the wire format names (`wire.WireFormat`:
its dtypes, shared rows once or not), finite, and of the expected shape with at most `max_batch`
samples; replies travel in the same format. Anything else raises `ProtocolError`, which
a network channel returns to that client alone; the server keeps serving the others. The checks of
the values (finite, in range) are computed where the tensors are and read once a batch, after the
body's work for it is queued: a host that waits for the device before queuing leaves a GPU idle
while it queues. A request that fails them is refused before any reply, and its values reach no
other client's answer (each sample goes through the body alone, below). When the work itself would
use them (a trained body's step, fp16's gradient scale), they are read before it.

Batching (`batch_window_s`): requests from concurrent clients (a network channel calls from many
threads) run through the body as one batch, and each client gets its own rows back. A forward batch
gathers until no client that could send one is left out (every client with a session, less those
whose forward awaits its backward or whose request is in flight), `batch_samples` samples (the
device's default: `BATCH_SAMPLES`), or no request came for the window (a pause, not a deadline from
the first: 32 clients arriving one after another outlasted a 10 ms deadline, and the batch cut in two
stayed two, each phase paying two passes through the body); what is left over makes the next batch.
A backward batch gathers until every graph its members ran in has all their backwards (one pass a
graph), or a pause of the window. Gathered batches run one at a time on the server's one body
thread, backwards before forwards. It is exact to float tolerance: every body operation acts on each
sample alone (attention within a sample, LayerNorm per token), so a client's rows and its input
gradient depend only on its own samples. A backward uses the graph of the batch its forward ran in,
with zero gradient for the other members' rows; it waits for them no longer than a pause of the
window, so a slow or failed client delays no one beyond that, and the graph is freed when every
member has sent its backward or expired (a backward from the graph's last member frees it as it
runs; `passes` counts the body's passes). FLOPs are counted per client as if run alone
(`_counted`). Off (None) by default: then requests run one at a time, and a run gives the same
numbers bit for bit whatever the timing.

Clients may end their heads at different blocks (heterogeneous budgets: `splits`): a session is
admitted with its client's split point, the body runs the blocks after it for that client, and its
backwards are answered with the gradient rows its head needs (every row once the prompts pass through
client blocks, only the prompts' without); a batch runs the members of each split point through
their own blocks.

The body is frozen unless the server is given a body optimiser (SplitFed with `--train-body`,
Thapa et al.'s SplitFedV1): then each client trains its own copy of the round's body, and
`end_round` averages the copies, weighted by the samples each one saw, into the shared body.
"""

from __future__ import annotations

import copy
import heapq
import hmac
import itertools
import math
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from .aggregate import fedavg
from .codec import Message, ProtocolError
from .meter import SERVER, Meter, counting_flops, is_fake
from .model import SplitViT
from .optim import build_optimizer


def body_optimizer(settings) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """How the server trains a body copy (SplitFed --train-body): the client optimiser (--optimizer,
    --momentum, --weight-decay of the run's `TrainSettings`) at --backbone-lr."""
    return lambda body: build_optimizer([{"params": list(body.parameters()), "lr": settings.backbone_lr}], settings)


KINDS = ("forward", "backward", "features", "evaluate")  # the requests that reach the body ("done" closes a session)
# Batching: the most body samples a gathered forward batch holds, by device type. On two CPU cores the
# body runs no faster a sample above 64 and slower above 128 (docs/benchmarks/batching-cpu.md), so a
# larger batch only holds more graphs at once; a GPU gathers every request it can (up to max_batch).
BATCH_SAMPLES = {"cpu": 128}
MAX_BATCH = 4096  # the most images one request may carry, by default
FP16_GRAD_PEAK = 2.0**8  # under --precision fp16 a gradient is scaled so its largest entry is about this


class _Graph:
    """One batch's trip through the body: its input tokens, the rows the tail reads, and the split point
    its members' heads end at."""

    def __init__(self, tokens: torch.Tensor, rows: torch.Tensor, split: SplitViT) -> None:
        self.tokens, self.rows, self.split = tokens, rows, split
        self.owing = 0  # members whose backward has not come: the last one need not keep the graph


class _Pending:
    """A client's forward awaiting its backward: the graph it ran in and its samples' place there."""

    def __init__(self, graph: _Graph, samples: slice) -> None:
        self.graph, self.samples, self.since = graph, samples, time.monotonic()

    def abandon(self) -> None:
        """Its backward will not come (expired, forgotten, closed, malformed or refused): its graph owes one
        backward fewer, so that the graph's other members' backward batch need not wait for it."""
        self.graph.owing -= 1


class _ValueChecks:
    """A batch's value checks (`WireFormat.values_ok`), copied to the host ahead of the body's work for
    the batch, so that reading them once that work is queued waits for the copy, not for the work."""

    def __init__(self, batch: list[_Request], device: torch.device) -> None:
        self.batch, self._read = batch, False
        flags = [request.values_ok for request in batch]
        flags = torch.stack(flags if len({flag.device for flag in flags}) == 1 else [f.to(device) for f in flags])
        self._copied: torch.cuda.Event | None = None
        if flags.is_cuda:
            self._host = torch.empty(len(batch), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = flags

    def refuse_invalid(self) -> None:
        """Give each member whose values fail its `ProtocolError` (the first call reads; later ones do nothing)."""
        if self._read:
            return
        self._read = True
        if self._copied is not None:
            self._copied.synchronize()
        for request, ok in zip(self.batch, self._host.tolist()):
            if not ok:
                try:
                    request.split.messages.wire.check_values(request.carried)
                except ProtocolError as fault:
                    request.error = fault


class _Request:
    """A validated request on its way through the body; `done` is set once it has a reply or an error."""

    def __init__(self, client: str, session: list, kind: str, tensor: torch.Tensor, carried: dict[str, torch.Tensor],
                 pending: _Pending | None = None) -> None:
        self.client, self.session, self.kind, self.tensor, self.pending = client, session, kind, tensor, pending
        self.split: SplitViT = session[2]  # where this client's head ends, fixed when it was admitted
        self.carried = carried  # the tensors as they came: their values are checked with the batch
        self.values_ok = self.split.messages.wire.values_ok(carried)  # not read yet
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def result(self) -> Message:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


def _grouped(requests: list[_Request], key: Callable[[_Request], object]) -> list[list[_Request]]:
    """`requests` in groups of equal `key`, each in arrival order."""
    groups: dict[object, list[_Request]] = {}
    for request in requests:
        groups.setdefault(key(request), []).append(request)
    return list(groups.values())


class BodyServer:
    def __init__(self, model: SplitViT, meter: Meter, device: torch.device,
                 body_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 pending_timeout_s: float = 600.0, max_batch: int = MAX_BATCH,
                 batch_window_s: float | None = None, batch_samples: int | None = None) -> None:
        if batch_window_s is not None and (batch_window_s < 0 or body_optimizer is not None):
            raise ValueError("a batch window is 0 s or more, and cannot batch a trained body (a copy per client)")
        if batch_samples is not None and batch_samples < 1:
            raise ValueError(f"a batch holds at least 1 sample, got batch_samples={batch_samples}")
        self.model = model
        self.body = model.body
        self.layout = model.layout
        self.meter = meter
        self.device = device
        self.body_optimizer = body_optimizer
        # client id -> its forward awaiting the backward; a forward whose backward never comes (the
        # client crashed) is dropped after pending_timeout_s.
        self._pending: dict[str, _Pending] = {}
        self.pending_timeout_s = pending_timeout_s
        self.max_batch = max_batch  # images in one request
        self.batch_window_s = batch_window_s
        # batching: a gathering batch stops at this many body samples (default: the device's, BATCH_SAMPLES)
        self.batch_samples = batch_samples or BATCH_SAMPLES.get(device.type, max_batch)
        # client id -> [its session secret for this round, the last sequence number it used, its split]
        self._sessions: dict[str, list] = {}
        # The server's state; held for the whole request when not batching (one request at a time).
        self._lock = threading.RLock()
        # batching: the one thread that runs every batch through the body, one at a time. A CPU body run
        # from whichever client thread leads a batch ran slower a sample: each leading thread brings its
        # own OpenMP team to spin beside the others, and frees a graph that another thread's allocator
        # arena holds (docs/benchmarks/batching-cpu.md).
        self._body_thread = ThreadPoolExecutor(1, thread_name_prefix="body") if batch_window_s is not None else None
        self._batches: list[tuple[int, int, list[_Request]]] = []  # batching: gathered, waiting for the body (a heap)
        self._order = itertools.count()  # batching: the order batches were gathered in
        self._in_flight: Counter[str] = Counter()  # batching: client -> its requests queued or in the body
        self._queued: dict[str, list[_Request]] = {kind: [] for kind in KINDS}  # batching: waiting requests
        self._arrived = threading.Condition(self._lock)  # batching: a request was queued
        # client id -> [its body copy, its optimiser, samples trained] for this round (--train-body).
        self._copies: dict[str, list] = {}
        self._flops_per_sample: dict[tuple, int] = {}  # (kind, split point) -> the body's FLOPs per sample
        self.passes: Counter[str] = Counter()  # 'forward' / 'backward' -> passes through the body so far
        self._closed = False

    def close(self) -> None:
        """Stop serving (the runtime's end): later requests are refused, as is a batch still gathering; the
        batches already handed to the body run, and the body thread ends once they have."""
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()
        if self._body_thread is not None:
            self._body_thread.shutdown(wait=True)

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

    def admit(self, client: str, session: str | None = None, client_blocks: int | None = None) -> str:
        """Open a session for `client` for this round, its head ending after `client_blocks` blocks (default:
        the model's split); returns the secret its requests must carry. The body runs the rest of the
        blocks for it, and its backwards are answered with the gradient rows its head needs."""
        split = self.model.at(self.model.client_blocks if client_blocks is None else client_blocks)
        if split is not self.model and self.body_optimizer is not None:
            raise ValueError("a trained body (--train-body) has one split point for every client")
        session = session or secrets.token_hex(16)
        with self._lock:
            self._sessions[client] = [session, 0, split]
        return session

    def forget(self, client: str) -> None:
        """Drop everything held for a client that failed: its pending forward and its body copy."""
        with self._arrived:
            self._drop_pending(client)
            self._copies.pop(client, None)
            self._sessions.pop(client, None)
            self._arrived.notify_all()  # a gathering batch waits for it no longer

    @property
    def pending(self) -> int:
        """How many forwards await their backward (what the server holds for clients)."""
        return len(self._pending)

    def _body_for(self, request: _Request) -> nn.Module:
        if self.body_optimizer is None:
            return request.split.body
        client = request.client
        if client not in self._copies:
            body = copy.deepcopy(self.body).requires_grad_(True)
            self._copies[client] = [body, self.body_optimizer(body), 0]
        return self._copies[client][0]

    def handle(self, message: Message) -> Message:
        if message.kind == "done":
            return self._close(message)
        if self.batch_window_s is None:
            with self._lock:
                self._expire()
                request = self._check(message)
                self._run([request])
        else:
            request = self._join_batch(message)
        return request.result()

    def _join_batch(self, message: Message) -> _Request:
        """Check the request and queue it by its kind, in one step under the server's lock (a gathering
        batch counts each client as owing a backward, as in flight or as free to send, never as none);
        the request at the head of the queue leads: it gathers until every client that could send such a
        request has, `batch_samples` samples, or a pause of the window, and hands that batch to the body
        thread; the head of what is left then leads the next (each leader leads its own batch only, so
        no client's thread is kept gathering for others after its own request has left)."""
        with self._arrived:
            self._expire()
            request = self._check(message)
            self._in_flight[request.client] += 1
            queue = self._queued[request.kind]
            queue.append(request)
            self._arrived.notify_all()
            while request in queue:
                if queue[0] is not request:
                    self._arrived.wait()
                    continue
                try:
                    batch = self._gather(queue)
                    if self._closed:  # while it gathered: the body thread takes no more work
                        for member in batch:
                            member.error = ProtocolError("the body server closed")
                        self._abandon_refused(batch)
                        self._release(batch)
                    else:
                        heapq.heappush(self._batches, (0 if batch[0].kind == "backward" else 1, next(self._order), batch))
                        self._body_thread.submit(self._run_next)
                finally:
                    self._arrived.notify_all()  # the new head of the queue leads next
        request.done.wait()
        return request

    def _run_next(self) -> None:
        """The body thread's task (one a gathered batch): run the waiting batch that goes first. Backwards go
        before forwards, oldest first within each: a backward frees its graph, and on a CPU a body that
        ran every client's forward before any backward held every graph at once and ran slower a sample
        (docs/benchmarks/batching-cpu.md)."""
        with self._lock:
            _, _, batch = heapq.heappop(self._batches)
        try:
            self._run(batch)
        finally:
            self._release(batch)

    def _release(self, batch: list[_Request]) -> None:
        """Wake a batch's clients, answered or refused. They are free to send again before they are woken:
        counted busy until after, one woken first could close the next batch on its own request alone."""
        with self._arrived:
            self._in_flight.subtract(request.client for request in batch)
            self._in_flight = +self._in_flight  # drop the clients with none left
            self._arrived.notify_all()
        for request in batch:
            request.done.set()

    def _gather(self, queue: list[_Request]) -> list[_Request]:
        """The leader's wait (holding `_arrived`): the head of the queue once it is complete or paused, cut
        at `batch_samples` samples for forwards (the rest stays queued)."""
        arrived, deadline = 0, 0.0
        while not self._gathered(queue):
            if len(queue) > arrived:
                arrived, deadline = len(queue), time.monotonic() + self.batch_window_s
            if (left := deadline - time.monotonic()) <= 0:
                break
            self._arrived.wait(left)
        taken, samples = 0, 0  # the head, then each next request while the batch stays within batch_samples
        while taken < len(queue) and (queue[0].kind == "backward" or taken == 0
                                      or samples + len(queue[taken].tensor) <= self.batch_samples):
            samples += len(queue[taken].tensor)
            taken += 1
        batch = queue[:taken]
        del queue[:taken]
        return batch

    def _gathered(self, queue: list[_Request]) -> bool:
        """Whether a gathering batch is complete: no client that could still send such a request is left;
        or, for forwards, `batch_samples` samples are in it; or, for backwards, every graph they ran in
        has all its members' (each graph takes one backward pass whatever the batch holds, and a graph's
        members that came apart would take one each)."""
        if self._closed:
            return True
        kind = queue[0].kind
        if kind == "backward":
            if not self._pending:  # every client that owes a backward has sent it
                return True
            members = Counter(id(request.pending.graph) for request in queue)
            return all(members[id(request.pending.graph)] == request.pending.graph.owing for request in queue)
        free = self._sessions.keys() - self._pending.keys() - self._in_flight.keys()  # nothing of theirs awaited
        return not free or sum(len(request.tensor) for request in queue) >= self.batch_samples

    def _expire(self) -> None:
        stale = time.monotonic() - self.pending_timeout_s
        for client in [c for c, pending in self._pending.items() if pending.since < stale]:
            self._drop_pending(client)

    def _drop_pending(self, client: str) -> None:
        """Forget a client's forward whose backward will not come (expired, forgotten, closed)."""
        pending = self._pending.pop(client, None)
        if pending is not None:
            pending.abandon()

    def _check(self, message: Message) -> _Request:
        if self._closed:
            raise ProtocolError("the body server is closed")
        client = self._check_session(message.meta)
        if message.kind not in KINDS:
            raise ProtocolError(f"unknown message kind {message.kind!r}")
        session = self._sessions[client]
        split: SplitViT = session[2]
        if message.kind != "backward":
            if message.kind == "evaluate":
                split.messages.check_evaluates()
            tokens = split.messages.unpack_tokens(message.tensors, check_values=False)
            if len(tokens) > self.max_batch:
                raise ProtocolError(f"a {message.kind} of {len(tokens)} images; at most {self.max_batch} are served")
            if message.kind == "evaluate":  # its samples are its images under each prompt set, made once they passed
                tokens = split.messages.evaluated_tokens(tokens, message.meta)
            return _Request(client, session, message.kind, tokens, message.tensors)
        pending = self._pending.pop(client, None)
        if pending is None:
            raise ProtocolError(f"backward from client {client} without a pending forward")
        try:
            grad = split.messages.unpack_grad(message.tensors, tuple(pending.graph.rows[pending.samples].shape),
                                              check_values=False)
        except ProtocolError:
            pending.abandon()
            raise
        return _Request(client, session, "backward", grad, message.tensors, pending)

    def _close(self, message: Message) -> Message:
        """A client whose work with the body is over for the round (`done`, no tensors): its session ends, so a
        gathering batch stops counting it among the clients that could still send (and waits for it no
        longer); a forward it left without a backward is dropped."""
        with self._arrived:
            client = self._check_session(message.meta)
            if message.tensors:
                raise ProtocolError(f"a done message carries no tensors, got {sorted(message.tensors)}")
            self._drop_pending(client)
            self._sessions.pop(client, None)
            self._arrived.notify_all()
        return Message("closed")

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

    def _run(self, batch: list[_Request]) -> None:
        """Run a batch of requests of one kind through the body and give each its reply or its error (a member
        whose values fail their checks is refused alone); batching's `_run_next` then wakes them."""
        try:
            checks = _ValueChecks(batch, self.device)
            if self.body_optimizer is not None or self.body.precision == "fp16":
                checks.refuse_invalid()  # the work would use them: a trained body's step, fp16's gradient scale
            valid = [request for request in batch if request.error is None]
            with self._lock:
                self._abandon_refused(batch)  # before the work
            if valid and valid[0].kind == "backward":
                self._backward(valid, checks)
            elif valid:
                self._forward(valid, checks)
        except Exception as err:  # the body failed (out of memory, say): every member of this batch is told
            for request in batch:
                request.error = request.error or err

    @staticmethod
    def _abandon_refused(batch: list[_Request]) -> None:
        """The forwards of the batch's refused backwards: their backward will not come (holding the lock)."""
        for request in batch:
            if request.error is not None and request.pending is not None:
                request.pending.abandon()

    def _still_admitted(self, request: _Request) -> bool:
        """Whether the request's session outlived its trip through the body (not forgotten, round not ended)."""
        if self._sessions.get(request.client) is request.session:
            return True
        request.error = ProtocolError(f"client {request.client}'s session ended while its request ran")
        return False

    def _forward(self, batch: list[_Request], checks: _ValueChecks) -> None:
        for members in _grouped(batch, lambda r: r.split.client_blocks):  # heads ending elsewhere: other blocks
            self._forward_through(members[0].split, members, checks)

    def _forward_through(self, split: SplitViT, batch: list[_Request], checks: _ValueChecks) -> None:
        """Run a batch of forwards (kept for their backwards) or of features or evaluate requests (no graph kept)."""
        kind = batch[0].kind
        tokens = torch.cat([request.tensor for request in batch]).to(self.device).requires_grad_(kind == "forward")
        body = self._body_for(batch[0])
        with torch.set_grad_enabled(kind == "forward"):
            rows = self._counted((kind, split.client_blocks), lambda: body(tokens)[:, self.layout.tail_rows],
                                 len(tokens))  # (B, R, D)
        self.passes[kind] += 1
        checks.refuse_invalid()
        graph, start = _Graph(tokens, rows, split) if kind == "forward" else None, 0
        with self._lock:
            for request in batch:
                samples = slice(start, start + len(request.tensor))
                start = samples.stop
                if self._answer(request, lambda: Message("body_output", split.messages.pack_rows(rows[samples]))) \
                        and graph is not None:  # a forward awaits its backward
                    self._pending[request.client] = _Pending(graph, samples)
                    graph.owing += 1

    def _answer(self, request: _Request, reply: Callable[[], Message]) -> bool:
        """Give a request that passed its checks and whose session outlived its trip through the body the
        reply `reply()` makes; a reply its wire format cannot carry (float16's range) is that member's
        error alone, not its batch's. Whether it was answered."""
        if request.error is not None or not self._still_admitted(request):
            return False
        try:
            request.reply = reply()
        except ProtocolError as fault:
            request.error = fault
            return False
        return True

    def _backward(self, batch: list[_Request], checks: _ValueChecks) -> None:
        for members in _grouped(batch, lambda r: id(r.pending.graph)):
            self._backward_through(members[0].pending.graph, members, checks)

    def _backward_through(self, graph: _Graph, members: list[_Request], checks: _ValueChecks) -> None:
        """Backpropagate the members' gradients through the graph their forwards ran in (the other rows'
        gradient zero; the graph is kept for members still to come), step a trained body, answer each."""
        grad = torch.zeros_like(graph.rows)
        for request in members:
            grad[request.pending.samples] = request.tensor.to(self.device)
        scale = self._grad_scale(grad)
        with self._lock:
            graph.owing -= len(members)
            keep = graph.owing > 0 or scale != 1  # for members still to come, or fp16's retry
        self.passes["backward"] += 1
        token_grad = self._token_grad(graph, grad, scale, keep, sum(len(request.tensor) for request in members))
        self._step_body_copy(members)
        checks.refuse_invalid()
        with self._lock:
            for request in members:
                rows = token_grad[request.pending.samples]
                self._answer(request, lambda: Message("input_grad", graph.split.messages.pack_input_grad(rows)))

    def _token_grad(self, graph: _Graph, grad: torch.Tensor, scale: float, keep: bool, answered: int) -> torch.Tensor:
        """The gradient of the graph's input tokens for the gradient `grad` of its rows, counted for the
        `answered` samples; under fp16 computed at `scale` (a scaled gradient that overflowed is computed
        again at a smaller one, uncounted) and returned unscaled."""

        def backward() -> None:
            graph.tokens.grad = None
            graph.rows.backward(grad * scale if scale != 1 else grad, retain_graph=keep)

        self._counted(("backward", graph.split.client_blocks), backward, len(graph.tokens), answered)
        for _ in range(2):
            if scale == 1 or bool(torch.isfinite(graph.tokens.grad).all()):
                break
            scale /= 2.0**8
            backward()
        token_grad, graph.tokens.grad = graph.tokens.grad, None
        return token_grad / scale if scale != 1 else token_grad

    def _step_body_copy(self, members: list[_Request]) -> None:
        """The server's own step of a client's body copy (--train-body: one client a batch)."""
        if len(members) == 1 and members[0].client in self._copies:
            _, optimizer, _ = entry = self._copies[members[0].client]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            entry[2] += len(members[0].tensor)

    def _counted(self, kind: tuple, work: Callable[[], torch.Tensor | None], samples: int,
                 answered: int | None = None) -> torch.Tensor | None:
        """Do the body's `work` on `samples` samples and count the FLOPs of `answered` of them (all by
        default), as if they had run alone. The body's FLOPs are exactly linear in its samples, so the
        first batch of each kind is counted operation by operation and later ones from its count per
        sample: the counter costs about 0.1 ms of Python a body operation, more than the body's own
        work on a GPU (measured: docs/flower.md)."""
        per_sample = self._flops_per_sample.get(kind)
        if per_sample is None:
            with counting_flops() as flops:
                result = work()
            total = flops.get_total_flops()
            if total % samples == 0:
                self._flops_per_sample[kind] = total // samples
            per_sample = total / samples
        else:
            result = work()
        phase = "probe" if kind[0] == "features" else "split"  # the client phase the request came from
        self.meter.add_flops(SERVER, phase, round(per_sample * (samples if answered is None else answered)))
        return result

    def _grad_scale(self, grad: torch.Tensor) -> float:
        """Under fp16, a power of two that lifts the gradient's largest entry to about FP16_GRAD_PEAK, so
        that small gradients do not underflow in half precision (exactly undone on the way out). A fake
        gradient (`sfprompt cost`) has no peak: unscaled, which changes no count."""
        if self.body.precision != "fp16" or is_fake(grad):
            return 1.0
        peak = float(grad.abs().max())
        if peak == 0:
            return 1.0
        return 2.0 ** math.floor(math.log2(FP16_GRAD_PEAK / peak))
