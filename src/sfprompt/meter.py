"""Measurement: encoded bytes per direction and phase, FLOPs per side and phase, client peak memory.

No cost is modelled here: bytes are the lengths of encoded messages (a message of `sfprompt cost`'s fake
tensors: the exact length its encoding would have, `codec.encoded_size`), FLOPs are what
`torch.utils.flop_counter.FlopCounterMode` counts while the work runs (the body server scales its first
count per sample: `server.BodyServer._counted`), and peak memory is the most
tensor storage alive at once during a client's work, as `PeakMemory` sees it being allocated and
freed (its frozen head, prompts, tail, activations, gradients and optimiser state), plus the encoded
message buffers it sends and receives, while they exist beside the tensors; the server's body and
its activations are never attributed to a client.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict
from typing import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

UP, DOWN = "up", "down"  # client -> server, server -> client
CLIENT, SERVER = "client", "server"


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # scores = q k^T, then scores v


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)  # the gradients' four products


_aten = torch.ops.aten
# Attention counted as its matrix products, whichever kernel runs it: PyTorch's counter skips the CPU's
# fused kernel (timm's default), and counts a fused CUDA backward's recomputation of the scores, which
# the unfused products do not do. So a configuration counts the same FLOPs on every device (tested
# against timm's unfused attention).
ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    **dict.fromkeys([_aten._scaled_dot_product_flash_attention_for_cpu_backward,
                     _aten._scaled_dot_product_efficient_attention_backward,
                     _aten._scaled_dot_product_flash_attention_backward,
                     _aten._scaled_dot_product_cudnn_attention_backward], _attention_backward),
}


def counting_flops() -> FlopCounterMode:
    """A FLOP counter for the enclosed work, attention counted as its matrix products (above)."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether `tensor` has a shape and a dtype but no values: `sfprompt cost` runs a round on a model of
    fake tensors (PyTorch's FakeTensor), so that FLOPs, bytes and memory are counted without the work.
    Code that reads a value then stands in for the read with one that changes no count."""
    return isinstance(tensor, FakeTensor)


def scalar(tensor: torch.Tensor) -> float:
    """A one-element tensor's value (a loss, for the record); NaN for a fake tensor, which has none."""
    return float("nan") if is_fake(tensor) else tensor.item()


class PeakMemory(TorchDispatchMode):
    """Tracks bytes of tensor storage alive while entered, and their peak.

    Storages created by operators inside the mode are counted until freed; storages that existed
    before (parameters, a batch from the data loader, a decoded message) are added with `hold`.
    It can be entered many times (once per step of a client's work): frees are seen at any time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def hold(self, *items: torch.Tensor | torch.nn.Module | torch.optim.Optimizer) -> None:
        for tensor in _tensors(items):
            self._add(tensor)

    def buffer(self, nbytes: int) -> None:
        """`nbytes` alive for a moment beside everything tracked (an encoded message being sent or decoded)."""
        self.peak = max(self.peak, self.current + nbytes)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


def _tensors(items: Iterable) -> Iterator[torch.Tensor]:
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, torch.nn.Module):
            yield from item.parameters()
            yield from item.buffers()
            yield from (p.grad for p in item.parameters() if p.grad is not None)
        elif isinstance(item, torch.optim.Optimizer):
            for state in item.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class Meter:
    """Accumulates one round's costs; `take()` returns them and starts the next round at zero.

    Thread-safe: a network body server counts from its request threads. A client in another process
    sends its `counts()` with its upload and the server `merge`s them, so one round's record holds
    every side's measurements, whichever runtime produced them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.flops: dict[tuple[str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str], int] = defaultdict(int)
        self.client_peak_memory = 0

    def count_message(self, direction: str, phase: str, payload: bytes) -> None:  # or a codec.ShapesOnly: its len()
        self.count_bytes(direction, phase, len(payload))

    def count_bytes(self, direction: str, phase: str, size: int) -> None:
        """Count one message of `size` bytes (one another encoding measured, such as Flower's SecAgg+ records)."""
        with self._lock:
            self.bytes[direction, phase] += size
            self.messages[direction, phase] += 1

    @contextlib.contextmanager
    def work(self, side: str, phase: str, memory: PeakMemory | None = None) -> Iterator[None]:
        """Count the FLOPs of the enclosed work (and, given a tracker, the client's memory)."""
        with counting_flops() as flops, memory or contextlib.nullcontext():
            yield
        self.add_flops(side, phase, flops.get_total_flops())
        if memory is not None:
            self.record_peak(memory)

    def add_flops(self, side: str, phase: str, flops: int) -> None:
        """FLOPs counted elsewhere (the body server's share of a batch it ran for several clients)."""
        with self._lock:
            self.flops[side, phase] += flops

    def record_peak(self, memory: PeakMemory) -> None:
        """Take a client's peak so far into the round's largest."""
        with self._lock:
            self.client_peak_memory = max(self.client_peak_memory, memory.peak)

    def counts(self) -> dict:
        """The raw counters, JSON-able, for `merge` on another meter (a client's, sent to the server)."""
        with self._lock:
            return {"bytes": _flat(self.bytes), "messages": _flat(self.messages), "flops": _flat(self.flops),
                    "client_peak_memory": self.client_peak_memory}

    def merge(self, counts: dict) -> None:
        """Add another meter's `counts()` to this one: all of it, or (ValueError, counts from an
        untrusted peer that are not such a record) nothing."""
        try:
            increments = [(name, tuple(key.split("/", 1)), _count(value))
                          for name in ("bytes", "messages", "flops") for key, value in counts[name].items()]
            peak = _count(counts["client_peak_memory"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a meter's counts: {type(err).__name__}: {err}") from None
        if any(len(key) != 2 for _, key, _ in increments):
            raise ValueError("not a meter's counts: a key is not 'direction/phase' or 'side/phase'")
        with self._lock:
            for name, key, value in increments:
                getattr(self, name)[key] += value
            self.client_peak_memory = max(self.client_peak_memory, peak)

    def take(self) -> dict:
        """This round's totals and per-phase breakdown, as plain JSON-able numbers."""
        with self._lock:
            return self._take()

    def _take(self) -> dict:
        result = {
            "bytes_up": sum(v for (d, _), v in self.bytes.items() if d == UP),
            "bytes_down": sum(v for (d, _), v in self.bytes.items() if d == DOWN),
            "client_flops": sum(v for (s, _), v in self.flops.items() if s == CLIENT),
            "server_flops": sum(v for (s, _), v in self.flops.items() if s == SERVER),
            "client_peak_memory_bytes": self.client_peak_memory,
            "bytes_by_phase": _flat(self.bytes),
            "messages_by_phase": _flat(self.messages),
            "flops_by_phase": _flat(self.flops),
        }
        self._reset()
        return result


def _flat(counters: dict[tuple[str, str], int]) -> dict[str, int]:
    return {f"{a}/{b}": v for (a, b), v in sorted(counters.items())}


def _count(value) -> int:
    """A count from another meter: a non-negative integer, nothing else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a meter's counts: {value!r} is not a count")
    return value
