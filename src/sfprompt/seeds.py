"""Every seed a run derives, in one place: from the run's --seed (simulation) or a client's own secrets.

`derive_seed` gives an independent seed for each combination of its parts, so that each use of
randomness (a round's shuffling, a client's local classifier, its private defence randomness, the
validation draw, the budget draw) is its own stream, and the same config gives the same numbers.
"""

from __future__ import annotations

import numpy as np

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


def client_seed(seed: int, round_: int, cid: int) -> int:
    """The seed of client `cid`'s work in round `round_` of a run seeded `seed` (its shuffling)."""
    return derive_seed(seed, round_, cid)


def private_seed(seed: int, cid: int) -> int:
    """The private seed of simulated client `cid` (its defence's randomness). A deployed client draws its own
    secret instead (`flower.client_app.NodeState`); in simulation it is derived from --seed so runs repeat."""
    return derive_seed(seed, cid, PRIVATE)
