"""A state's tensors as Flower's ArrayRecord and back: how the broadcast and each upload travel in the Flower
runtime, so that Flower's own tools (its strategies, its mods such as `LocalDpMod` or `arrays_size_mod`) read them
as they read any Flower app's model. The byte figures stay those of the codec's encoding (`codec.encoded_size`),
the one encoding both runtimes count."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The tensors as an ArrayRecord, by name in sorted order (NumPy has no bfloat16: such a tensor goes as float32,
    which holds it exactly)."""
    return ArrayRecord({name: Array(as_numpy(tensors[name])) for name in sorted(tensors)})


def from_arrays(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors an ArrayRecord holds. It may come from another machine: an array that NumPy cannot read without
    pickle, or that PyTorch cannot hold, raises `ValueError` or `TypeError` (nothing in it is executed)."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {name: torch.from_numpy(np.array(array.numpy())).to(device) for name, array in record.items()}


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as Flower's arrays hold it (NumPy has no bfloat16: such a tensor goes as float32)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
