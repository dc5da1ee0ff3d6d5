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


def derive_seed(*parts: int) -> int:
    """An independent seed for each combination of `parts` (run seed, round, client, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def secret_words(*parts: int) -> list[int]:
    """128 bits for a secret stream from `parts` (a client's private seed first), as the words NumPy's generators
    take: a 32-bit `derive_seed` would let the server try every seed of a noise it wants to take off."""
    return [int(word) for word in np.random.SeedSequence(list(parts)).generate_state(4)]


def private_generator(secret: int, *parts: int) -> torch.Generator:
    """PyTorch's CPU generator for a client's private randomness (its defence's noise and shuffles, its randomized
    labels), keeping all of `secret`'s entropy. `manual_seed` keeps 32 bits of any seed: a secret below 2^32 (a
    simulated client's, derived from --seed, which the server knows anyway; or a node's configured `private-seed`)
    seeds it as it always has (itself, or with `parts` through `derive_seed`), so documented runs repeat; a larger
    one (a deployed node's 127 bits) fills the Mersenne Twister's whole state from NumPy's SeedSequence of the secret
    and `parts`, since a server could try every one of 2^32 streams to take a noise off a send."""
    if secret < 2**32:
        return torch.Generator().manual_seed(derive_seed(secret, *parts) if parts else secret)
    generator = torch.Generator().manual_seed(0)
    words = np.random.MT19937(np.random.SeedSequence([secret, *parts])).state["state"]["key"]
    state = bytearray(generator.get_state().numpy().tobytes())
    # The layout PyTorch's CPU generator saves: its seed (8 bytes), `left` and `seeded` (4 each), `next` (8), the
    # 624 state words (8 bytes each), then the normal samples it caches; a freshly seeded one has 1, 1 and 0.
    header, end = struct.calcsize("=QiiQ"), struct.calcsize("=QiiQ") + 8 * len(words)
    if len(state) < end or struct.unpack_from("=QiiQ", state)[1:] != (1, 1, 0):
        raise RuntimeError(f"torch {torch.__version__}'s CPU generator saves its state in a layout sfprompt does not "
                           "know, so a secret longer than 32 bits cannot seed it")
    state[header:end] = words.astype(np.uint64).tobytes()
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8))
    return generator


def client_seed(seed: int, round_: int, cid: int) -> int:
    """The seed of client `cid`'s work in round `round_` of a run seeded `seed` (its shuffling)."""
    return derive_seed(seed, round_, cid)


def private_seed(seed: int, cid: int) -> int:
    """The private seed of simulated client `cid` (its defence's randomness). A deployed client draws its own
    secret instead (`flower.client_app.NodeState`); in simulation it is derived from --seed so runs repeat."""
    return derive_seed(seed, cid, PRIVATE)
