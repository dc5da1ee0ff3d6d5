"""How messages travel in the one-process runtime: through the codec, counted as bytes.

Every message is encoded, its bytes counted for its direction and phase, and decoded on the other
side, exactly as a network runtime would do; only the socket is missing. `SessionLink` is a
client's view of any link for one round (this one or `channel.ChannelLink`): it stamps each
request with the client's id, its session and a sequence number, which the body server checks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .codec import MAX_PAYLOAD_BYTES, Message, decode, encode
from .meter import DOWN, UP, Meter
from .server import BodyServer


class InProcessLink:
    def __init__(self, server: BodyServer, meter: Meter, device: torch.device,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.server, self.meter, self.device, self.max_bytes = server, meter, device, max_bytes

    def send(self, message: Message, direction: str, phase: str) -> Message:
        """One message crossing the (simulated) network: encode, count, decode."""
        payload = encode(message)
        self.meter.count_message(direction, phase, payload)
        return decode(payload, self.device, self.max_bytes)

    def request(self, message: Message, phase: str) -> Message:
        """A client request to the body server and its reply."""
        reply = self.server.handle(self.send(message, UP, phase))
        return self.send(reply, DOWN, phase)


class Link(Protocol):
    def request(self, message: Message, phase: str) -> Message: ...


class SessionLink:
    def __init__(self, link: Link, client: int, session: str) -> None:
        self.link, self.client, self.session, self.seq = link, client, session, 0

    def request(self, message: Message, phase: str) -> Message:
        self.seq += 1
        meta = {**message.meta, "client": self.client, "session": self.session, "seq": self.seq}
        return self.link.request(Message(message.kind, message.tensors, meta), phase)
