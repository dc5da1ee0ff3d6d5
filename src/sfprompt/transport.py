"""How messages travel in the one-process runtime: through the codec, counted as bytes.

Every message is encoded, its bytes counted for its direction and phase, and decoded on the other
side, exactly as a network runtime would do; only the socket is missing. `SessionLink` is a
client's view of any link for one round (this one or `channel.ChannelLink`): it stamps each
request with the client's id, its session and a sequence number, which the body server checks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .codec import MAX_PAYLOAD_BYTES, Message, Payload, decode, encode
from .meter import DOWN, UP, Meter, PeakMemory
from .server import BodyServer


def encode_held(message: Message, memory: PeakMemory | None) -> Payload:
    """`message` encoded by a client, its buffer counted in the client's memory beside the tensors."""
    payload = encode(message)
    if memory is not None:
        memory.buffer(len(payload))
    return payload


def decode_held(payload: Payload, device: torch.device, max_bytes: int, memory: PeakMemory | None) -> Message:
    """`payload` decoded by a client: for a moment it holds the buffer and the decoded tensors both."""
    message = decode(payload, device, max_bytes)
    if memory is not None:
        memory.buffer(len(payload) + sum(t.untyped_storage().nbytes() for t in message.tensors.values()))
    return message


class InProcessLink:
    def __init__(self, server: BodyServer, meter: Meter, device: torch.device,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.server, self.meter, self.device, self.max_bytes = server, meter, device, max_bytes

    def send(self, message: Message, direction: str, phase: str) -> Message:
        """One message crossing the (simulated) network: encode, count, decode."""
        return self.deliver(encode(message), direction, phase)

    def deliver(self, payload: Payload, direction: str, phase: str, memory: PeakMemory | None = None) -> Message:
        """An encoded message arriving: counted, then decoded (`memory`: a client's, when it is the receiver)."""
        self.meter.count_message(direction, phase, payload)
        return decode_held(payload, self.device, self.max_bytes, memory)

    def request(self, message: Message, phase: str, memory: PeakMemory | None = None) -> Message:
        """A client request to the body server and its reply (`memory`: the client's, which holds both encoded)."""
        reply = self.server.handle(self.deliver(encode_held(message, memory), UP, phase))
        return self.deliver(encode(reply), DOWN, phase, memory)


class Link(Protocol):
    def request(self, message: Message, phase: str, memory: PeakMemory | None = None) -> Message: ...


class SessionLink:
    def __init__(self, link: Link, client: int, session: str) -> None:
        self.link, self.client, self.session, self.seq = link, client, session, 0

    def request(self, message: Message, phase: str, memory: PeakMemory | None = None) -> Message:
        self.seq += 1
        meta = {**message.meta, "client": self.client, "session": self.session, "seq": self.seq}
        return self.link.request(Message(message.kind, message.tensors, meta), phase, memory)
