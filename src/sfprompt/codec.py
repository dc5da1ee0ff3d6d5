"""The one wire format: every client<->server message becomes bytes here, and is counted from them.

A message is a kind, a small JSON-able `meta` dict and named tensors. On the wire it is a
safetensors buffer whose header metadata carries the kind and meta as JSON: no pickle, nothing
executable, and the tensors are raw little-endian buffers with declared dtype and shape.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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


def encode(message: Message) -> bytes:
    header = json.dumps({"kind": message.kind, "meta": message.meta}, separators=(",", ":"))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in message.tensors.items()}
    return st_save(tensors, metadata={_META_KEY: header})


def decode(payload: bytes, device: torch.device | str = "cpu", max_bytes: int = MAX_PAYLOAD_BYTES) -> Message:
    """The message in `payload`, or `CodecError`. Nothing is executed, and nothing larger than the
    payload itself is allocated: safetensors checks every tensor's extent against the buffer."""
    if len(payload) > max_bytes:
        raise CodecError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
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
