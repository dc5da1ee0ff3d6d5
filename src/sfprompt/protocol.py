"""What split training's messages carry at one split point, packed by one side and checked by the other.

A `forward` (or a probe's `features` request) carries the tokens the head sent; its reply, a
`body_output`, the rows of the body's output the tail reads; a `backward` carries their gradient;
its reply, an `input_grad`, the gradient of the token rows the client's head needs. Forward-only
prompt updates send an `evaluate` instead: a forward's tensors and, in its metadata, the seed of the
directions along which the server perturbs the prompts it received; its `body_output` holds the
tail's rows for the prompts as they are and every perturbed set (the residual estimator's: its one
perturbed set), and no backward follows. A head with blocks (residual only) perturbs its prompts itself
before its blocks, since every token it sends depends on them: its `evaluate` carries the tokens of its one set
and no seed, and the directions never leave the client. Every tensor travels in the run's `wire.WireFormat` (number
format, rows shared once a batch), and unpacking is checking: exactly the tensors the format names, of
the expected shapes and dtypes, finite, or `ProtocolError`. The client and the body server pack and
unpack with the same `SplitMessages`, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import MAX_HEADER_BYTES, ProtocolError
from .wire import WireFormat
from .zeroth_order import SEED_LIMIT, Perturbations, checksum


@dataclass(frozen=True)
class SplitMessages:
    """The messages of a split after `client_blocks` blocks of a model whose head emits `layout`'s tokens."""

    layout: object  # model.TokenLayout: where the prefix, prompt and patch rows sit
    client_blocks: int
    wire: WireFormat
    perturbations: Perturbations | None = None  # forward-only's (an `evaluate`'s prompt sets); None: no evaluates

    @property
    def grad_rows(self) -> slice:
        """The token rows whose gradient the client needs back: only the prompts' when the head holds no
        blocks (nothing else on the client trains), every row once the prompts pass through blocks."""
        return self.layout.prompt_rows if self.client_blocks == 0 else slice(None)

    @property
    def shares_rows(self) -> bool:
        """Whether the rows every image shares (prefix, prompts: the same for every image without client
        blocks) travel once a batch, as the wire format asks."""
        return self.wire.shared_once and self.client_blocks == 0 and self.layout.patch_rows.start > 0

    @property
    def tail_shape(self) -> tuple[int, int]:
        """(rows, width) of one sample's body output that travels back to the client."""
        return len(range(self.layout.length)[self.layout.tail_rows]), self.layout.width

    def pack_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a forward carries for the tokens a head sent (B, L, D): every row of every sample, or, when
        rows are shared, each sample's image rows and one copy of the rows every image shares."""
        if not self.shares_rows:
            return self.wire.pack("tokens", tokens)
        shared = slice(0, self.layout.patch_rows.start)
        return {**self.wire.pack("tokens", tokens[:, self.layout.patch_rows]), **self.wire.pack("shared", tokens[0, shared])}

    def unpack_tokens(self, tensors: dict[str, torch.Tensor], check_values: bool = True) -> torch.Tensor:
        """The (B, L, D) float32 tokens a forward carries, checked (`WireFormat.unpack` says what
        `check_values` leaves out): the server's side of `pack_tokens`."""
        width = self.layout.width
        if not self.shares_rows:
            return self.wire.unpack(tensors, {"tokens": (None, self.layout.length, width)}, check_values)["tokens"]
        shared_rows = self.layout.patch_rows.start
        got = self.wire.unpack(tensors, {"tokens": (None, self.layout.patches, width), "shared": (shared_rows, width)},
                               check_values)
        images = got["tokens"]
        return torch.cat([got["shared"].expand(len(images), shared_rows, width), images], dim=1)

    @property
    def server_perturbs(self) -> bool:
        """Whether the body server perturbs an `evaluate`'s prompts (a head with no blocks: they travel as rows of
        their own) or the client did before its blocks (residual's one set: no seed travels)."""
        return self.client_blocks == 0

    def sent_prompts(self, prompts: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """The prompts (1, P, D) a forward-only head sends its images with: the prompts as they are, which the server
        perturbs, or, with blocks, residual's one perturbed set."""
        if self.server_perturbs:
            return prompts
        return self.perturbations.sets_of(prompts[0], directions)

    def evaluate_meta(self, seed: int, directions: torch.Tensor) -> dict:
        """What an `evaluate` carries beside a forward's tensors: the seed of its directions and their checksum
        (nothing where the client perturbed its prompts itself)."""
        if not self.server_perturbs:
            return {}
        return {"directions-seed": seed, "directions-sum": checksum(directions)}

    def check_evaluates(self) -> None:
        """`ProtocolError` unless this run's clients send `evaluate`s (forward-only, with no client blocks the prompt
        rows shared, with blocks the residual estimator's one set)."""
        if self.perturbations is None or not (self.shares_rows if self.server_perturbs
                                              else self.perturbations.estimator == "residual"):
            raise ProtocolError("this run sends no evaluates (forward-only prompt updates, a head with no blocks and "
                                "the shared rows sent once, or with blocks the residual estimator)")

    def evaluated_tokens(self, tokens: torch.Tensor, meta: dict) -> torch.Tensor:
        """The server's side of an `evaluate` whose tokens (B, L, D) are unpacked already: the tokens of every
        prompt set, set after set (S x B, L, D), the prompts as they came, then perturbed along the directions
        the seed in `meta` names, as `Perturbations` says (residual: the perturbed set alone); the seed and its
        checksum checked. With client blocks the tokens as they came, which the client's one set made."""
        self.check_evaluates()
        if not self.server_perturbs:
            if {"directions-seed", "directions-sum"} & meta.keys():
                raise ProtocolError("a head with blocks perturbs its prompts itself: its evaluate names no directions")
            return tokens
        seed = meta.get("directions-seed")
        if type(seed) is not int or not 0 <= seed < SEED_LIMIT:
            raise ProtocolError(f"an evaluate names its directions by an integer seed in [0, 2^31), got {seed!r}")
        prompts = tokens[0, self.layout.prompt_rows]
        directions = self.perturbations.draw(seed, prompts.shape)
        if meta.get("directions-sum") != checksum(directions):
            raise ProtocolError("the directions this server draws from the evaluate's seed are not the client's "
                                "(another torch version draws others): run the same torch on both sides")
        sets = self.perturbations.sets_of(prompts, directions.to(prompts.device))  # (S, P, D)
        head, tail = tokens[:, :self.layout.prompt_rows.start], tokens[:, self.layout.patch_rows]
        return torch.cat([torch.cat([head, p.expand(len(tokens), -1, -1), tail], dim=1) for p in sets])

    def pack_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The body output rows the tail reads (B, R, D), as a `body_output` carries them."""
        return self.wire.pack("rows", rows)

    def unpack_rows(self, tensors: dict[str, torch.Tensor], samples: int) -> torch.Tensor:
        """The client's side of `pack_rows`, checked: (samples, R, D) float32."""
        return self.wire.unpack(tensors, {"rows": (samples, *self.tail_shape)})["rows"]

    def pack_grad(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradient of the rows the tail read (B, R, D), as a `backward` carries it."""
        return self.wire.pack("grad", grad)

    def unpack_grad(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                    check_values: bool = True) -> torch.Tensor:
        """The server's side of `pack_grad`, checked against the shape of the rows it returned."""
        return self.wire.unpack(tensors, {"grad": shape}, check_values)["grad"]

    def pack_input_grad(self, token_grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """The server's answer to one client's backward from the gradient of its tokens (B, L, D): the rows
        its head needs, summed over the batch when they are shared rows (one broadcast's gradient)."""
        rows = token_grad[:, self.grad_rows]
        return self.wire.pack("grad", rows.sum(dim=0) if self.shares_rows else rows)

    def sent_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rows of the tokens a head sent (B, L, D) whose gradient an `input_grad` carries: one copy of
        the shared rows when they travel once a batch (its gradient is the batch's sum)."""
        rows = tokens[:, self.grad_rows]
        return rows[0] if self.shares_rows else rows

    def unpack_input_grad(self, tensors: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """The client's side of `pack_input_grad`, checked: the gradient of `sent_rows(tokens)`."""
        return self.wire.unpack(tensors, {"grad": tuple(self.sent_rows(tokens).shape)})["grad"]

    def max_bytes(self, batch_size: int, state_bytes: int) -> int:
        """The largest payload a run legitimately sends, so the codec refuses anything larger: the global
        state (`state_bytes`: the broadcast and each upload) or one batch of activations (B, L, D) or
        gradients, with room for the header."""
        activations = batch_size * self.layout.length * self.layout.width * 4  # float32, the widest wire format
        if self.perturbations is not None:  # an evaluate's reply: every set's rows
            activations += self.perturbations.sets * batch_size * self.tail_shape[0] * self.layout.width * 4
        return max(state_bytes, activations) + MAX_HEADER_BYTES
