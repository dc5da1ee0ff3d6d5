"""A state's tensors as Flower's ArrayRecord and back: how the broadcast and each upload travel in the Flower
runtime, so that Flower's own tools (its strategies, its mods such as `LocalDpMod` or `arrays_size_mod`) read them
as they read any Flower app's model. The byte figures stay those of the codec's encoding (`codec.encoded_size`),
the one encoding both runtimes count."""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata


def to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The tensors as an ArrayRecord, by name in sorted order (NumPy has no bfloat16: such a tensor goes as float32,
    which holds it exactly)."""
    return ArrayRecord({name: Array(as_numpy(tensors[name])) for name in sorted(tensors)})


def from_arrays(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors an ArrayRecord holds. It may come from another machine, so each array is read as the one thing it
    may be, a NumPy `.npy` buffer without pickle; anything else (a zip, a truncated buffer, an object array, a dtype
    PyTorch cannot hold) raises `ValueError` or `TypeError`, and nothing in it is executed."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {name: _tensor(name, array).to(device) for name, array in record.items()}


def _tensor(name: str, array: Array) -> torch.Tensor:
    if not isinstance(array.data, bytes) or not array.data.startswith(b"\x93NUMPY"):
        raise ValueError(f"{name}: not a NumPy .npy buffer")
    try:
        values = np.lib.format.read_array(io.BytesIO(array.data), allow_pickle=False)
    except Exception as err:  # NumPy raises several types for a malformed buffer
        raise ValueError(f"{name}: {type(err).__name__}: {err}") from None
    return torch.from_numpy(np.array(values))  # TypeError for a dtype PyTorch cannot hold


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as Flower's arrays hold it (NumPy has no bfloat16: such a tensor goes as float32)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def train_message(content: RecordDict, src_node: int = 0) -> Message:
    """A `train` message holding `content`, from node `src_node`, as Flower's own code gets one: how sfprompt hands
    its tensors to Flower's strategies and mods outside a Flower run (the in-process runtime does too)."""
    return Message(content, metadata=Metadata(run_id=0, message_id="", src_node_id=src_node, dst_node_id=0,
                                              reply_to_message_id="", group_id="", created_at=0.0, ttl=0.0,
                                              message_type=MessageType.TRAIN))
