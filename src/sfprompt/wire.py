"""How split training's activations and gradients travel: their number format, and rows sent once.

Almost every byte of a split method is a mini-batch's activations going up and their gradient
coming down. `WireFormat.dtype` chooses how each element travels: float32 (exact), bfloat16 or
float16 (half the bytes; float16 keeps more mantissa but overflows above 65504), or int8 with one
float32 scale per token (its largest magnitude / 127, rounded to nearest: about a quarter). The
receiver always computes in float32. Which one keeps accuracy is measured (`benchmarks/wire.sh`).

`shared_once`: a head without blocks emits the same CLS (and register) and prompt rows for every
image of a batch (only the patch rows depend on the image); they are then sent once a batch instead
of B times, and the prompts' gradient comes back summed over the batch, which is what the client's
backward through the broadcast computes anyway. Exact to float rounding. Off, every sample carries
every row, as the paper's protocol does.

Receiving is validation: `unpack` accepts exactly the tensors the format names, in its dtypes and
the expected shape, finite, or raises `ProtocolError` (the body server refuses the request). The
checks of the values read them, which waits for the device they are on; a receiver of many requests
(the batching body server) can leave them out of `unpack` and read `values_ok` once for a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import ProtocolError
from .config import WIRE_DTYPES
from .meter import is_fake

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INT8_LEVELS = 127.0
_SCALE = ".scale"  # suffix of an int8 tensor's per-token scales


@dataclass(frozen=True)
class WireFormat:
    dtype: str = "float32"
    shared_once: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_config(cls, config) -> "WireFormat":
        return cls(config.wire_dtype, config.shared_rows == "once")

    def names(self, name: str) -> set[str]:
        """The tensor names a packed `name` travels under."""
        return {name, name + _SCALE} if self.dtype == "int8" else {name}

    def pack(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """`tensor` (float, last dim the token width) as the named tensors that carry it."""
        tensor = tensor.detach()
        if self.dtype == "int8":
            scale = tensor.abs().amax(dim=-1, keepdim=True).float() / _INT8_LEVELS
            levels = torch.round(tensor / scale.clamp_min(torch.finfo(torch.float32).tiny))
            return {name: levels.clamp(-_INT8_LEVELS, _INT8_LEVELS).to(torch.int8), name + _SCALE: scale}
        packed = tensor.to(_FLOAT_DTYPES[self.dtype])
        if self.dtype == "float16" and not is_fake(packed) and not bool(torch.isfinite(packed).all()) \
                and bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"{name} exceeds float16's range (largest magnitude {float(tensor.abs().max()):.4g}); "
                                "use --wire-dtype bfloat16")
        return {name: packed}

    def unpack(self, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int | None, ...]],
               check_values: bool = True) -> dict[str, torch.Tensor]:
        """The float32 tensors named in `shapes`, carried in `tensors` and checked: exactly the tensors the
        format names, in its dtypes, of the expected shape (None: any length, at least 1) and, unless
        `check_values` is False (the caller then checks `values_ok`), finite; `ProtocolError` otherwise."""
        expected = set().union(*(self.names(name) for name in shapes))
        if set(tensors) != expected:
            raise ProtocolError(f"expected the tensors {sorted(expected)} ({self.dtype} on the wire), got {sorted(tensors)}")
        unpacked = {name: self._unpack(tensors, name, shape) for name, shape in shapes.items()}
        if check_values:
            self.check_values(tensors)
        return unpacked

    def values_ok(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Whether every value check of `unpack` passes, as a boolean tensor on the tensors' device (not
        read yet: reading it waits for that device)."""
        checks = [ok for ok, _ in self._value_checks(tensors)]
        return torch.stack(checks).all() if checks else torch.tensor(True)

    def check_values(self, tensors: dict[str, torch.Tensor]) -> None:
        """`ProtocolError` naming the first value check of `unpack` that fails."""
        for ok, fault in self._value_checks(tensors):
            if not bool(ok):
                raise ProtocolError(fault)

    def _value_checks(self, tensors: dict[str, torch.Tensor]):
        """(a boolean tensor, what it means when False) for each check of the values (finite; an int8
        scale non-negative; an int8 level in the symmetric range)."""
        for name, tensor in sorted(tensors.items()):
            if is_fake(tensor):  # no values to check (`sfprompt cost`)
                continue
            if name.endswith(_SCALE):
                yield (torch.isfinite(tensor) & (tensor >= 0)).all(), f"{name} holds negative or non-finite values"
            elif self.dtype == "int8":
                yield (tensor != -128).all(), f"{name} holds -128, outside the symmetric int8 range"
            else:
                yield torch.isfinite(tensor).all(), f"{name} holds non-finite values"

    def _unpack(self, tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        tensor = tensors[name]
        wanted = torch.int8 if self.dtype == "int8" else _FLOAT_DTYPES[self.dtype]
        if tensor.dtype != wanted:
            raise ProtocolError(f"{name} of dtype {tensor.dtype}, expected {wanted} (--wire-dtype {self.dtype})")
        if tensor.dim() != len(shape) or any(t != s if s is not None else t < 1 for t, s in zip(tensor.shape, shape)):
            expected = tuple("B" if s is None else s for s in shape)
            raise ProtocolError(f"{name} of shape {tuple(tensor.shape)}, expected {expected} with B >= 1")
        if self.dtype != "int8":
            return tensor.float()
        scale = tensors[name + _SCALE]
        if scale.dtype != torch.float32 or tuple(scale.shape) != (*tensor.shape[:-1], 1):
            raise ProtocolError(f"{name}{_SCALE} of dtype {scale.dtype} and shape {tuple(scale.shape)}, expected "
                                f"float32 of shape {(*tensor.shape[:-1], 1)}")
        return tensor.float() * scale
