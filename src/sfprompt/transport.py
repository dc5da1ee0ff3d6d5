"""How messages travel in the one-process runtime: through the codec, counted as bytes.

Every message is encoded, its bytes counted for its direction and phase, and decoded on the other
side, exactly as a network runtime would do; only the socket is missing.
"""

from __future__ import annotations

import torch

from .codec import Message, decode, encode
from .meter import DOWN, UP, Meter
from .server import BodyServer


class InProcessLink:
    def __init__(self, server: BodyServer, meter: Meter, device: torch.device) -> None:
        self.server, self.meter, self.device = server, meter, device

    def send(self, message: Message, direction: str, phase: str) -> Message:
        """One message crossing the (simulated) network: encode, count, decode."""
        payload = encode(message)
        self.meter.count_message(direction, phase, payload)
        return decode(payload, self.device)

    def request(self, message: Message, phase: str) -> Message:
        """A client request to the body server and its reply."""
        reply = self.server.handle(self.send(message, UP, phase))
        return self.send(reply, DOWN, phase)
