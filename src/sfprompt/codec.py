"""The one wire format: every client<->server message becomes bytes here, and is counted from them.

A message is a kind, a small JSON-able `meta` dict and named tensors. On the wire it is a
safetensors buffer whose header metadata carries the kind and meta as JSON: no pickle, nothing
executable, and the tensors are raw little-endian buffers with declared dtype and shape.

A message of fake tensors (shapes and dtypes, no values: `sfprompt cost` runs rounds on them) is not
serialised: `encode` returns a `ShapesOnly` payload whose length is, exactly, that of the buffer the
same tensors with values would encode to (`encoded_size`), and `decode` gives its message back.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .meter import is_fake

_META_KEY = "sfprompt"
MAX_PAYLOAD_BYTES = 1 << 28  # 256 MiB: the default where the model is not known; runs use SplitViT.max_message_bytes
MAX_HEADER_BYTES = 1 << 20  # names, dtypes, shapes and the JSON meta of a few tensors


class CodecError(ValueError):
    """A payload that is not a well-formed sfprompt message."""


class ProtocolError(RuntimeError):
    """A well-formed message that its receiver cannot act on (unknown kind, backward without forward,
    bad shape): raised by the body server on requests and by a client on replies."""


@dataclass
class Message:
    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    wire_bytes: int = field(default=0, compare=False)  # the length of the payload it was decoded from


@dataclass(frozen=True)
class ShapesOnly:
    """What `encode` returns for a message holding fake tensors: the message, and the length in bytes
    its encoding would have (`len()`), for the meter to count; `decode` returns the message."""

    message: Message
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes


Payload = bytes | ShapesOnly  # what crosses a link: an encoded message, or (fake tensors) its length


def encode(message: Message) -> Payload:
    if any(is_fake(t) for t in message.tensors.values()):
        return ShapesOnly(message, encoded_size(message))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in message.tensors.items()}
    return st_save(tensors, metadata={_META_KEY: _header(message)})


def _header(message: Message) -> str:
    return json.dumps({"kind": message.kind, "meta": message.meta}, separators=(",", ":"))


# safetensors' names of the dtypes, in the order in which it lays tensors out (the last first, then by name)
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_LAYOUT_ORDER = list(_DTYPES.values())


def encoded_size(message: Message) -> int:
    """The length of `encode(message)` from its tensors' shapes and dtypes alone: safetensors' layout
    (8 bytes of header length, the JSON header padded with spaces to 8 bytes, then each tensor's bytes in
    its order), tested equal to the encoded length."""
    for name, tensor in message.tensors.items():
        if tensor.dtype not in _DTYPES:
            raise CodecError(f"{name}: dtype {tensor.dtype} has no size rule here")
    ordered = sorted(message.tensors.items(), key=lambda item: (-_LAYOUT_ORDER.index(_DTYPES[item[1].dtype]), item[0]))
    entries, offset = {"__metadata__": {_META_KEY: _header(message)}}, 0
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = len(json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + header + (-header) % 8 + offset


def decode(payload: Payload, device: torch.device | str = "cpu", max_bytes: int = MAX_PAYLOAD_BYTES) -> Message:
    """The message in `payload`, or `CodecError`. Nothing is executed, and nothing larger than the
    payload itself is allocated: safetensors checks every tensor's extent against the buffer."""
    if len(payload) > max_bytes:
        raise CodecError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    if isinstance(payload, ShapesOnly):  # a receiver's own copies, as decoding a buffer makes
        sent = payload.message
        tensors = {name: t.detach().clone().to(device) for name, t in sent.tensors.items()}
        return Message(sent.kind, tensors, json.loads(json.dumps(sent.meta)), wire_bytes=len(payload))
    if len(payload) < 8:
        raise CodecError("payload shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > min(len(payload) - 8, MAX_HEADER_BYTES):
        raise CodecError(f"declared header of {header_len} bytes is longer than the payload or the limit")
    try:
        header = json.loads(payload[8 : 8 + header_len])
        envelope = json.loads(header["__metadata__"][_META_KEY])
        kind, meta = envelope["kind"], envelope["meta"]
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise CodecError(f"payload has no sfprompt header: {err!r}") from None
    if not isinstance(kind, str) or not isinstance(meta, dict):
        raise CodecError("payload header's kind is not a string or its meta not an object")
    try:
        tensors = st_load(payload)
    except Exception as err:  # safetensors raises its own error type
        raise CodecError(f"payload tensors are malformed: {err}") from None
    if device != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return Message(kind=kind, tensors=tensors, meta=meta, wire_bytes=len(payload))
