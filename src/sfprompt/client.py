"""A simulated client: its data, its private state, and the phases every method is composed of.

In the split methods a client never holds the body: it holds a reference to the shared frozen head,
its own copy of the global prompts and tail for the round, an optimiser per phase, and a private local
classifier that persists across rounds (SFPrompt's local loss). Which phases run is the method's
choice (`methods/`); how each phase trains, counts and talks to the server is decided here, once.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import zeroth_order
from .checkpoint import prefixed, unprefixed
from .codec import Message, ProtocolError
from .config import ConfigError
from .defence import private_upload
from .meter import CLIENT, Meter, PeakMemory, is_fake, scalar
from .optim import build_optimizer
from .model import ClientParams, SplitViT
from .probe import RunningStatistics
from .pruning import BANDS, el2n, keep_band, size_band
from .seeds import DIRECTIONS, LOCAL_HEAD, UPLOAD_NOISE, derive_seed, private_generator, secret_words
from .transport import Link, encode_held

@dataclass
class RoundContext:
    """What a client holds for one round: its copy of the global params and its working state.

    No optimiser: each phase builds a fresh one over exactly what that phase trains, so a parameter a
    phase cannot reach is neither stepped nor decayed by it, and nothing carries over between phases
    (Adam's moments of the local loss, on head features, would mislead the split phase).
    """

    params: torch.nn.Module
    link: Link
    generator: torch.Generator  # the round's shuffling
    private: torch.Generator  # the defence's randomness, from a seed the server never sees
    memory: PeakMemory
    deadline: float | None = None  # time.monotonic() by which the round must be done
    phase: str = "start"  # the phase running now, reported if the client fails
    anchor: dict[str, torch.Tensor] | None = None  # the global params as received, for FedProx's proximal term
    directions: torch.Generator | None = None  # forward-only's direction seeds, sent in the clear (None: `private`)
    # the residual estimator's previous forward-only step's loss: a round's own (each round starts from the
    # broadcast prompts with a fresh optimiser, so an earlier round's loss was taken at other prompts)
    last_loss: torch.Tensor | None = None


class RoundPlan(Protocol):
    """What a client needs of a method (`methods.Method` is one): its trainable state, the frozen modules
    a client holds, and which phases run. Methods use the client, never the other way round."""

    def new_params(self, model: SplitViT) -> nn.Module: ...

    def client_holds(self, model: SplitViT) -> tuple[nn.Module, ...]: ...

    def client_round(self, client: "Client", ctx: RoundContext) -> dict: ...


PROBE_STATE = ("probe.", "probe_inputs.")  # in a client's state: its probe statistics and what they were taken with


class ClientFailure(RuntimeError):
    """A client's round failed (an error, a timeout, a lost connection): the runtime drops the client."""

    def __init__(self, client: int, phase: str, reason: str) -> None:
        super().__init__(f"client {client} failed in phase {phase}: {reason}")
        self.client, self.phase, self.reason = client, phase, reason

    def record(self) -> dict:
        """What the round's metrics say about it."""
        return {"client": self.client, "phase": self.phase, "reason": self.reason}


class ClientTimeout(RuntimeError):
    """The round's time limit (--client-timeout-s) passed."""


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int
    local_classifier: str  # 'separate' | 'shared'
    keep_ratio: float
    prune_per_class: bool
    prune_keep: str
    prune_scores: str
    split_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    prompt_lr: float
    backbone_lr: float
    momentum: float
    weight_decay: float
    prompt_updates: str = "backprop"  # or "forward-only": zeroth-order prompt steps (SplitViT.perturbations)
    mean_samples: float | None = None  # the federation's mean samples per client (--prune-keep by-size), if known
    proximal_mu: float = 0.0  # FedProx's proximal term (--proximal-mu); 0: none
    upload_clip: float | None = None  # local DP of the upload (--upload-clip, --upload-epsilon, --dp-delta)
    upload_epsilon: float | None = None
    dp_delta: float = 1e-5

    @classmethod
    def from_config(cls, config, **changes) -> "TrainSettings":
        """The client-side slice of a `Config`, optionally changed."""
        fields = [name for name in cls.__dataclass_fields__ if hasattr(config, name)]
        return cls(**({name: getattr(config, name) for name in fields} | changes))


class LocalHead(nn.Module):
    """The private classifier of the local loss: norm + linear on the mean of the patch tokens.

    With `client_blocks = 0` the CLS token leaving the head is the same for every input, so the
    local path pools the (input-dependent) patch tokens instead.
    """

    def __init__(self, width: int, num_classes: int, seed: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)
        # nn.Linear's default range, drawn from the client's own seed: its start depends on nothing
        # else (not on the model's initialisation, nor on other clients), so a node builds it alone.
        bound, generator = 1 / math.sqrt(width), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound, generator=generator)
            self.fc.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(patch_tokens.mean(dim=1)))  # (B, N, D) -> (B, C)


class Client:
    """One client: its data, its private local classifier (its start drawn from the run's `seed` and the
    client id alone), and two secrets that never leave it: `private_seed`, behind its randomized labels
    (one draw per sample for good, so that no run shows a sample's label twice), and `noise_seed` (by
    default the same), behind each round's noise and shuffles (a deployed node draws it anew for every
    run, so that two runs never add the same noise to the same send)."""

    def __init__(
        self,
        cid: int,
        data: Dataset,
        indices: np.ndarray,
        model: SplitViT,
        settings: TrainSettings,
        meter: Meter,
        device: torch.device,
        private_seed: int = 0,
        seed: int = 0,
        noise_seed: int | None = None,
    ) -> None:
        self.cid = cid
        self.data = Subset(data, np.asarray(indices))
        self.model = model
        self.settings = settings
        self.meter = meter
        self.device = device
        self.private_seed = private_seed
        self.noise_seed = private_seed if noise_seed is None else noise_seed
        self.seed = seed
        self.probe: dict[str, torch.Tensor] | None = None  # linear-probe's statistics of its features, once sent
        self.probe_inputs: dict[str, torch.Tensor] | None = None  # the params they were taken with

    @functools.cached_property
    def local_head(self) -> LocalHead:
        """The private local classifier, made on first use: a client that was never sampled holds
        nothing but its sample indices (its start depends on the run seed and its id alone, so when it
        is made does not matter)."""
        width, classes = self.model.layout.width, self.model.num_classes
        return LocalHead(width, classes, derive_seed(self.seed, self.cid, LOCAL_HEAD)).to(self.device)

    @property
    def has_state(self) -> bool:
        """Whether the client holds anything a checkpoint must keep (its local classifier, once made; its
        probe statistics, once computed)."""
        return "local_head" in self.__dict__ or self.probe is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the client keeps between rounds, privately: its local classifier (`local_head.*`) and its
        linear-probe statistics (`probe.*`) with the params they were taken with (`probe_inputs.*`), each once
        it exists."""
        state = prefixed("local_head.", self.local_head.state_dict()) if "local_head" in self.__dict__ else {}
        return state | prefixed("probe.", self.probe or {}) | prefixed("probe_inputs.", self.probe_inputs or {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (a state saved before the probe existed holds the local
        classifier alone, its keys without the prefix; one saved before refit rounds, statistics without the
        params they were taken with: those of a run that never changed them)."""
        if state and not any(key.startswith(("local_head.", "probe.")) for key in state):
            state = prefixed("local_head.", state)
        head = unprefixed("local_head.", state)
        if head:
            self.local_head.load_state_dict(head)
        self.probe = {name: t.to(self.device) for name, t in unprefixed("probe.", state).items()} or None
        self.probe_inputs = {name: t.to(self.device) for name, t in unprefixed("probe_inputs.", state).items()} or None

    @functools.cached_property
    def label_draws(self) -> torch.Tensor:
        """Two uniform draws per sample, fixed by the private seed, for randomized response: a sample
        shows the same label every time it is sent (made on first use)."""
        return torch.rand(self.num_examples, 2, generator=private_generator(self.private_seed))

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def run_round(self, method: RoundPlan, global_state: Message, link: Link, seed: int,
                  timeout_s: float | None = None) -> bytes:
        """This client's part of a round, as the method composes it; returns its upload, encoded.

        Any error, or passing `timeout_s` (checked before every mini-batch), raises `ClientFailure`
        naming the phase; what the client keeps (`state_dict`) is then as it was before the round.
        """
        memory = PeakMemory()  # everything this client holds during the round, the messages included
        memory.hold(*method.client_holds(self.model), *self.state_dict().values(), *global_state.tensors.values())
        memory.buffer(global_state.wire_bytes)  # the broadcast as it arrived, beside what it decoded to
        params = method.new_params(self.model).to(self.device)
        expected = set(params.state_dict()) - set(method.server_only)
        if set(global_state.tensors) != expected:
            raise ClientFailure(self.cid, "start", f"the broadcast holds {sorted(global_state.tensors)[:4]}, not the "
                                f"{len(expected)} tensors of {method.name}'s global state")
        params.load_state_dict(global_state.tensors, strict=False)  # the server's own entries start fresh
        memory.hold(params)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        private = private_generator(self.noise_seed, seed)  # this round's noise and shuffles
        # Forward-only's direction seeds travel in the clear: where the defence draws secrets from `private`, they come
        # from a stream of their own (a Mersenne Twister's outputs are linear in its state: enough would give it away).
        defence = self.model.defence
        directions = None
        if defence.shuffle or defence.noise_std:
            directions = private_generator(self.noise_seed, seed, DIRECTIONS)
        anchor = None
        if self.settings.proximal_mu:  # FedProx pulls the params it trains towards these
            anchor = {name: value.detach().clone() for name, value in params.named_parameters() if value.requires_grad}
            memory.hold(*anchor.values())
        ctx = RoundContext(params, link, torch.Generator().manual_seed(seed), private, memory, deadline, anchor=anchor,
                           directions=directions)
        kept = {name: t.clone() for name, t in self.state_dict().items()}
        try:
            report = method.client_round(self, ctx)
            if method.split:  # the body server need not wait for this client's requests any longer
                ctx.phase = "close"
                _expect(link.request(Message("done"), "close", memory), "closed")
            tensors = self._upload(global_state, params, seed, ctx)
        except Exception as err:
            self.__dict__.pop("local_head", None)  # made anew from its seed if it did not exist before
            self.load_state_dict(kept)
            raise ClientFailure(self.cid, ctx.phase, f"{type(err).__name__}: {err}") from err
        update = Message("update", tensors, {"client": self.cid, "num_examples": self.num_examples, **report})
        payload = encode_held(update, memory)
        self.meter.record_peak(memory)
        return payload

    def _upload(self, global_state: Message, params: nn.Module, seed: int, ctx: RoundContext) -> dict[str, torch.Tensor]:
        """What the client uploads of its trained params: all of them, or with --upload-epsilon their change from the
        broadcast clipped and noised by Flower's LocalDpMod (`defence.private_upload`), with the client's own noise."""
        tensors, s = dict(params.state_dict()), self.settings
        if s.upload_epsilon is None:  # (`sfprompt cost` costs every method without it: it changes no size)
            return tensors
        ctx.phase = "upload"
        return private_upload(global_state.tensors, tensors, s.upload_clip, s.upload_epsilon, s.dp_delta,
                              secret_words(self.noise_seed, seed, UPLOAD_NOISE))

    # SFPrompt phase 1: self-update on the local model (head, then a classifier), no server involved.
    def local_update(self, ctx: RoundContext) -> float | None:
        ctx.phase = "local"
        s, params = self.settings, ctx.params
        classifier = params.tail if s.local_classifier == "shared" else self._held_local_head(ctx)
        groups = [{"params": list(classifier.parameters()), "lr": s.lr}]
        if self.model.client_blocks > 0:  # without client blocks the local loss cannot reach the prompts
            groups.append({"params": [params.prompts], "lr": s.prompt_lr})
        return self._train(ctx, self.data, s.local_epochs, "local", lambda images: self._local_logits(images, params),
                           build_optimizer(groups, s))

    def _held_local_head(self, ctx: RoundContext) -> LocalHead:
        """The private local classifier, counted in the client's memory from its first use in a round."""
        ctx.memory.hold(self.local_head)
        return self.local_head

    def _local_logits(self, images: torch.Tensor, params: ClientParams) -> torch.Tensor:
        tokens = self.model.head(images, params.prompts)  # (B, prefix+P+N, D)
        patches = tokens[:, self.model.layout.patch_rows]  # (B, N, D)
        classifier = params.tail if self.settings.local_classifier == "shared" else self.local_head
        return classifier(patches)

    # SFPrompt phase 1b: EL2N scores under the local model; keep a band of them (the hardest by default).
    @torch.no_grad()
    def prune(self, ctx: RoundContext) -> list[int]:
        s = self.settings
        if s.keep_ratio >= 1.0:
            return list(range(self.num_examples))
        ctx.phase = "prune"
        scores, all_labels = [], []
        for images, labels in self._loader(self.data, ctx, shuffle=False):
            if s.prune_keep != "random":
                if s.local_classifier == "separate":
                    self._held_local_head(ctx)
                with self.meter.work(CLIENT, "prune", ctx.memory):
                    scores.append(el2n(self._local_logits(images, ctx.params), labels))
            all_labels.append(labels)
        labels = torch.cat(all_labels)
        ranked = torch.cat(scores) if scores else torch.rand(len(labels), generator=ctx.generator)
        if is_fake(ranked):  # `sfprompt cost`: no scores to rank; how many are kept depends on the labels alone (the
            # draw moves the round's generator on, so later batches differ from a real round's, not their number)
            ranked = torch.rand(len(labels), generator=ctx.generator)
        return keep_band(ranked, s.keep_ratio, self._band(), labels if s.prune_per_class else None).tolist()

    def _band(self) -> float:
        if self.settings.prune_keep != "by-size":
            return BANDS.get(self.settings.prune_keep, 0.0)  # a random draw ranks by random scores
        if self.settings.mean_samples is None:
            raise ConfigError("--prune-keep by-size needs the federation's mean samples per client: with a node's "
                              "own data folder, set --train-samples to the federation's total")
        return size_band(self.num_examples, self.settings.mean_samples)

    # linear-probe: every sample through the frozen body once (the first round the client is sampled with these
    # prompts and tail norms: again in a refit round, after split training moved them), kept as the statistics of
    # the tail's features (`probe`); no gradient crosses the link.
    @torch.no_grad()
    def probe_statistics(self, ctx: RoundContext) -> dict[str, torch.Tensor]:
        inputs = _feature_inputs(ctx.params)
        if self.probe is not None and (self.probe_inputs is None or _equal(inputs, self.probe_inputs)):
            return self.probe
        ctx.phase = "probe"
        running = RunningStatistics(self.model.num_classes)
        for images, labels, _ in self._loader(_Positioned(self.data), ctx, shuffle=False):
            with self.meter.work(CLIENT, "probe", ctx.memory):
                tokens = self._head_tokens(ctx, images, ctx.params.prompts)  # (B, L, D)
            rows = self._body_rows(ctx, "features", tokens)
            with self.meter.work(CLIENT, "probe", ctx.memory):
                running.add(ctx.params.tail.features(rows), labels)  # the tail's final norm and pooling
        with self.meter.work(CLIENT, "probe", ctx.memory):
            self.probe = running.averages()
        self.probe_inputs = {name: t.clone() for name, t in inputs.items()}
        return self.probe

    # Split training on the chosen samples: activations (and, with backprop, gradients) cross the link each batch.
    def split_train(self, ctx: RoundContext, chosen: list[int]) -> float | None:
        ctx.phase = "split"
        s = self.settings
        optimizer = build_optimizer(ctx.params.param_groups(s.lr, s.prompt_lr, s.backbone_lr), s)  # prompts and tail
        step = self._forward_only_step if s.prompt_updates == "forward-only" else self._backprop_step
        losses = []
        for _ in range(s.split_epochs):
            for images, labels, positions in self._loader(Subset(_Positioned(self.data), chosen), ctx):
                losses.append(scalar(step(ctx, images, labels, positions, optimizer)))
        return _mean(losses)

    def _backprop_step(self, ctx: RoundContext, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                       optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """A forward, the tail's step on the rows it brings back, and a backward whose reply the prompts step on."""
        params, memory = ctx.params, ctx.memory
        with self.meter.work(CLIENT, "split", memory):
            tokens = self._head_tokens(ctx, images, params.prompts)  # (B, L, D)
        rows = self._body_rows(ctx, "forward", tokens)
        shown = self._shown_labels(labels, positions, memory)
        with self.meter.work(CLIENT, "split", memory):
            loss, grad = self._tail_step(params.tail, rows, labels, shown, optimizer)
        reply = self._send_grad(ctx, grad)
        with self.meter.work(CLIENT, "split", memory):
            memory.hold(self._backward_into_head(tokens, reply))  # the prompts (and head blocks)
            self._step(ctx, optimizer)
        return loss

    def _forward_only_step(self, ctx: RoundContext, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                           optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """A step in which no gradient crosses the network: one `evaluate`, the tokens a forward carries and the seed
        (from the client's private generator) of the random directions along which the body server evaluates
        perturbed copies of the prompts (`zeroth_order`); with client blocks (residual), the tokens of the one
        perturbed set, made by the client's own blocks, and no seed. No backward runs through the client's blocks
        either: the prompts' step is the client's own estimate. The tail steps first order on the rows of the prompts
        as they are (residual: of its one perturbed set); the prompts step by the estimate the client's own loss
        differences give (residual: from the round's second step on): the labels and the losses stay on the
        client. The server can read the loss differences back from the prompts' steps (`trajectory`), so with
        --label-epsilon they are taken at the randomized-response labels, as backprop's gradients are: the prompts
        then depend on the true labels only through those."""
        params, memory = ctx.params, ctx.memory
        prompts, messages, perturbations = params.prompts, self.model.messages, self.model.perturbations
        with self.meter.work(CLIENT, "split", memory), torch.no_grad():
            seed = int(torch.randint(zeroth_order.SEED_LIMIT, (1,), generator=ctx.directions or ctx.private))
            directions = perturbations.draw(seed, prompts.shape[1:])
            meta = messages.evaluate_meta(seed, directions)
            directions = directions.to(prompts.device)
            tokens = self._head_tokens(ctx, images, messages.sent_prompts(prompts, directions))  # (B, L, D)
        reply = ctx.link.request(Message("evaluate", messages.pack_tokens(tokens), meta), ctx.phase, memory)
        rows = messages.unpack_rows(_expect(reply, "body_output"), perturbations.sets * len(tokens))
        memory.hold(rows)
        rows = rows.view(perturbations.sets, len(tokens), *rows.shape[1:])  # (S, B, R, D)
        shown = self._shown_labels(labels, positions, memory)  # the labels the prompts' steps are taken at
        with self.meter.work(CLIENT, "split", memory):
            loss, _ = self._tail_step(params.tail, rows[0], labels, None, optimizer)  # the tail: first order
            with torch.no_grad():
                base = loss.detach() if shown is labels else F.cross_entropy(params.tail(rows[0]), shown)
                set_losses = torch.stack([base] + [F.cross_entropy(params.tail(r), shown) for r in rows[1:]])
                previous = None
                if perturbations.estimator == "residual":  # against the round's last step's loss
                    previous, ctx.last_loss = ctx.last_loss, base
                if perturbations.estimator != "residual" or previous is not None:  # (none yet: the tail's step alone)
                    prompts.grad = zeroth_order.gradient(set_losses, directions, perturbations.size,
                                                         perturbations.estimator, previous)[None]
            self._step(ctx, optimizer)
        return loss

    def _head_tokens(self, ctx: RoundContext, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The tokens (B, L, D) the head sends for a batch's images with `prompts` (1, P, D), protected by the
        defence with the round's private randomness."""
        return self.model.send(images, prompts, ctx.private)

    @staticmethod
    def _tail_step(tail: nn.Module, rows: torch.Tensor, labels: torch.Tensor, shown: torch.Tensor | None,
                   optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss on the body's rows (B, R, D) and the gradient sent for them, the tail's own gradient in
        place (not stepped yet). What the server gets is the gradient of the loss at the labels the defence
        shows (randomized response; the true labels without it); the tail always learns from the true ones.
        With `shown` None no gradient is sent (forward-only steps), and the rows' is not computed."""
        sent_rows = None  # the rows whose gradient is sent
        if shown is labels:
            rows = sent_rows = rows.requires_grad_(True)
        elif shown is not None:  # (a backward, not autograd.grad: the FLOP counter's hooks)
            sent_rows = rows.detach().requires_grad_(True)
            F.cross_entropy(tail(sent_rows), shown).backward()
        loss = F.cross_entropy(tail(rows), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, None if sent_rows is None else sent_rows.grad

    def _backward_into_head(self, tokens: torch.Tensor, reply: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backpropagate the gradient of the sent rows that an `input_grad` reply carries (checked) into the
        head that made `tokens`; returns it."""
        messages = self.model.messages
        input_grad = messages.unpack_input_grad(reply, tokens)
        messages.sent_rows(tokens).backward(input_grad)
        return input_grad

    # The protocol's exchanges with the body server, packed and checked as `protocol.SplitMessages` says.
    def _body_rows(self, ctx: RoundContext, kind: str, tokens: torch.Tensor) -> torch.Tensor:
        """The body output rows the tail reads for a batch's tokens (B, L, D): a `forward`, which a backward
        follows, or a probe's `features` request, which none does."""
        messages = self.model.messages
        reply = ctx.link.request(Message(kind, messages.pack_tokens(tokens)), ctx.phase, ctx.memory)
        rows = messages.unpack_rows(_expect(reply, "body_output"), len(tokens))
        ctx.memory.hold(rows)
        return rows

    def _send_grad(self, ctx: RoundContext, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Send the gradient of the rows the tail read (a `backward`); the tensors of the `input_grad` reply."""
        reply = ctx.link.request(Message("backward", self.model.messages.pack_grad(grad)), ctx.phase, ctx.memory)
        return _expect(reply, "input_grad")

    def _shown_labels(self, labels: torch.Tensor, positions: torch.Tensor, memory: PeakMemory) -> torch.Tensor:
        """The labels behind the gradients sent: `labels` itself, or randomized response (--label-epsilon)."""
        defence = self.model.defence
        if defence.label_epsilon is None:
            return labels
        memory.hold(self.label_draws)
        draws = self.label_draws[positions.cpu()].to(labels.device)
        return defence.randomized_response(labels, draws, self.model.num_classes)

    # Training with the whole model on the client (federated baselines): all local data, no server.
    def train_locally(self, ctx: RoundContext, logits: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        ctx.phase = "local"
        s = self.settings
        optimizer = build_optimizer(ctx.params.param_groups(s.lr, s.prompt_lr, s.backbone_lr), s)
        return self._train(ctx, self.data, s.split_epochs, "local", logits, optimizer)

    def _train(self, ctx: RoundContext, data: Dataset, epochs: int, phase: str, logits: Callable,
               optimizer: torch.optim.Optimizer) -> float | None:
        losses = []
        for _ in range(epochs):
            for images, labels in self._loader(data, ctx):
                with self.meter.work(CLIENT, phase, ctx.memory):
                    loss = F.cross_entropy(logits(images), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self._step(ctx, optimizer)
                losses.append(scalar(loss))
        return _mean(losses)

    def _step(self, ctx: RoundContext, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step, after FedProx's proximal term (--proximal-mu: mu/2 ||w - w_received||^2 over the global
        params this client trains) adds its gradient mu (w - w_received) to theirs."""
        if ctx.anchor is not None:
            self._proximal_pull(((param, ctx.anchor[name]) for name, param in ctx.params.named_parameters()
                                 if name in ctx.anchor), self.settings.proximal_mu)
        optimizer.step()

    @staticmethod
    def _proximal_pull(pairs, mu: float) -> None:
        """FedProx's gradient mu (w - w_received) added to each (w, w_received) pair's w.grad, where w has one (the
        audit replays a client's tail steps with it)."""
        with torch.no_grad():
            for param, received in pairs:
                if param.grad is not None:
                    param.grad.add_(param - received, alpha=mu)

    def _loader(self, data: Dataset, ctx: RoundContext, shuffle: bool = True):
        """Mini-batches (images, labels[, positions]) on the device, shuffled by the round's generator,
        held by the client."""
        loader = DataLoader(data, batch_size=self.settings.batch_size, shuffle=shuffle,
                            generator=ctx.generator if shuffle else None)
        for batch in loader:
            if ctx.deadline is not None and time.monotonic() > ctx.deadline:
                raise ClientTimeout("the round's time limit passed")
            batch = [tensor.to(self.device) for tensor in batch]
            ctx.memory.hold(*batch[:2])  # images and labels (positions are the loader's own bookkeeping)
            yield batch


def _feature_inputs(params: nn.Module) -> dict[str, torch.Tensor]:
    """What a probe's features depend on beside the images: the prompts, and the tail but its classifier."""
    tail = {name: t for name, t in params.tail.state_dict().items() if not name.startswith("head.")}
    return {"prompts": params.prompts.detach(), **prefixed("tail.", tail)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(t, b[name]) for name, t in a.items())


class _Positioned(Dataset):
    """A client's samples with their position in its data: (image, label, position)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, position: int):
        return (*self.data[position], position)


def _expect(reply: Message, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of a server reply of `kind`; the wire format checks them as the server checks requests."""
    if reply.kind != kind:
        raise ProtocolError(f"expected a {kind}, got a {reply.kind} carrying {sorted(reply.tensors)}")
    return reply.tensors


def _mean(losses: list[float]) -> float | None:
    return float(np.mean(losses)) if losses else None
