"""Resumable run state: everything a run needs to continue bit-identically, in one atomic file.

After every round the runner writes `checkpoint.safetensors` into the run folder: the global params,
what every client keeps privately (its local classifier, its linear-probe statistics), the body when the server trains it, the random-number
generator states and the metrics so far (JSON in the header). It is written to a temporary file,
flushed to disk and renamed over the previous one, so a crash mid-write leaves the previous round's
checkpoint intact; safetensors checks that the tensors fill the file exactly, so a truncated or
damaged file is refused rather than half-loaded. Client optimisers restart every round by design
(each client round starts from the new global state), so they hold nothing to save.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ConfigError

FILE = "checkpoint.safetensors"
_META = "sfprompt.checkpoint"


class CheckpointError(ConfigError):
    """A checkpoint that is missing or damaged (a bad `--resume` folder)."""


@dataclass
class RunState:
    round: int  # the last complete round
    config: dict
    history: list[dict]  # one metrics record per complete round
    sampler: dict  # numpy's bit-generator state of the client sampler
    torch_rng: torch.Tensor
    params: dict[str, torch.Tensor]
    clients: dict[int, dict[str, torch.Tensor]]  # client id -> its `Client.state_dict()`
    body: dict[str, torch.Tensor] | None
    aggregator: dict[str, torch.Tensor] = field(default_factory=dict)  # `--aggregator`'s state, if any


def save(folder: Path, state: RunState) -> None:
    tensors = {"rng.torch": state.torch_rng, **prefixed("params.", state.params)}
    for cid, kept in state.clients.items():
        tensors |= prefixed(f"client.{cid}.", kept)
    if state.body is not None:
        tensors |= prefixed("body.", state.body)
    tensors |= prefixed("aggregator.", state.aggregator)
    meta = {"round": state.round, "config": state.config, "history": state.history, "sampler": state.sampler}
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={_META: json.dumps(meta)})
    write_atomically(folder / FILE, payload)


def write_atomically(path: Path, payload: bytes, mode: int | None = None) -> None:
    """Write `payload` to `path` so that a crash leaves either the old file or the new one, never half
    of it: to a temporary file beside it (with permissions `mode`, when given), flushed to disk, then
    renamed over `path`. Every file a run or a node keeps is written this way."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def load(folder: Path) -> RunState:
    path = folder / FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: nothing to resume (a run writes it after each round)")
    payload = path.read_bytes()
    try:
        tensors = st_load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        meta = json.loads(json.loads(payload[8:8 + header_len])["__metadata__"][_META])
        round_, config, history, sampler = meta["round"], meta["config"], meta["history"], meta["sampler"]
    except Exception as err:  # safetensors and json raise their own types; any of them means damage
        raise CheckpointError(f"{path} is damaged or truncated and cannot be resumed from ({err})") from None
    if len(history) != round_:
        raise CheckpointError(f"{path} is inconsistent: round {round_} but {len(history)} metrics records")
    clients: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for prefix, kept in (("client.", ""), ("local_head.", "local_head.")):  # local_head.K.*: before the probe
            if key.startswith(prefix):
                cid, name = key[len(prefix):].split(".", 1)
                clients.setdefault(int(cid), {})[kept + name] = value
    body = unprefixed("body.", tensors)
    return RunState(round_, config, history, sampler, tensors["rng.torch"], unprefixed("params.", tensors),
                    clients, body or None, unprefixed("aggregator.", tensors))


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each name after `prefix` (one state among others in a flat file)."""
    return {prefix + name: value for name, value in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named with `prefix`, without it: what `prefixed` put there."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
