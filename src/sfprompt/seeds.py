"""Every seed a run derives, in one place: from the run's --seed (simulation) or a client's own secrets.

`derive_seed` gives an independent seed for each combination of its parts, so that each use of
randomness (a round's shuffling, a client's local classifier, its private defence randomness, the
validation draw, the budget draw) is its own stream, and the same config gives the same numbers.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

# Salts, one per use, so that two uses of the same parts never share a stream.
LOCAL_HEAD = 0x10CA1  # a client's local classifier's initial weights (from the run seed and client id)
PRIVATE = 0x5EC12E7  # a simulated client's private seed (a deployed node draws its own instead)
VALIDATION = 0x7A11D  # the validation draw, independent of the partition's
BUDGETS = 0xB0D6E7  # each simulated client's budget, drawn from --client-budgets
HOLDOUT = 0x401D007  # which of a client's samples --client-holdout keeps out of its training
UPLOAD_NOISE = 0xD9A0  # the noise on a client's upload (--upload-epsilon), from its private noise seed
DIRECTIONS = 0xD12EC7  # forward-only's direction seeds where the defence draws noise or shuffles from the private one


def derive_seed(*parts: int) -> int:
    """An independent seed for each combination of `parts` (run seed, round, client, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def secret_words(*parts: int) -> list[int]:
    """128 bits for a secret stream from `parts` (a client's private seed first), as the words NumPy's generators
    take: a 32-bit `derive_seed` would let the server try every seed of a noise it wants to take off."""
    return [int(word) for word in np.random.SeedSequence(list(parts)).generate_state(4)]


LEGACY = 2**64  # a secret below it seeds PyTorch's generator as `manual_seed` does (which takes up to 64 bits)
_STATE = struct.Struct("=QiiQ624Q")  # PyTorch's CPU generator state: its seed, left, seeded, next, 624 words...
_STATE_BYTES = 5056  # ...then the normal samples it caches: the size torch 2.x saves


def private_generator(secret: int, *parts: int) -> torch.Generator:
    """PyTorch's CPU generator for a client's private randomness (its defence's noise and shuffles, its randomized
    labels), from its `secret` and public `parts` (the round's seed). `manual_seed` keeps 32 bits of any seed, so a
    server could try every stream to take a noise off a send or undo the randomized labels: a secret at or above
    `LEGACY` (a node's, 127 bits) fills the Mersenne Twister's whole state instead, from NumPy's SeedSequence of it
    and `parts`. A smaller one seeds it as `manual_seed` always has (itself, or with `parts` through `derive_seed`):
    a simulated client's (derived from --seed, which the server knows anyway), a configured `private-seed`, and a
    node's drawn before 127-bit secrets, whose randomized labels must not be drawn a second time."""
    if secret < LEGACY:
        return torch.Generator().manual_seed(derive_seed(secret, *parts) if parts else secret)
    generator = torch.Generator().manual_seed(0)
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _STATE_BYTES or _STATE.unpack_from(state)[1:4] != (1, 1, 0):
        raise RuntimeError(f"torch {torch.__version__}'s CPU generator saves its state in a layout sfprompt does not "
                           "know, so a secret longer than 64 bits cannot seed it")
    words = np.random.MT19937(np.random.SeedSequence([secret, *parts])).state["state"]["key"]
    _STATE.pack_into(state, 0, 0, 1, 1, 0, *(int(word) for word in words))
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8))
    if generator.get_state().numpy().tobytes() != bytes(state):
        raise RuntimeError(f"torch {torch.__version__}'s CPU generator did not take the state sfprompt wrote")
    return generator


def client_seed(seed: int, round_: int, cid: int) -> int:
    """The seed of client `cid`'s work in round `round_` of a run seeded `seed` (its shuffling)."""
    return derive_seed(seed, round_, cid)


def private_seed(seed: int, cid: int) -> int:
    """The private seed of simulated client `cid` (its defence's randomness). A deployed client draws its own
    secret instead (`flower.client_app.NodeState`); in simulation it is derived from --seed so runs repeat."""
    return derive_seed(seed, cid, PRIVATE)
