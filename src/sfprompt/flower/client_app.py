"""The Flower ClientApp: one client's round, run by the same `Client` code as the in-process runtime.

A SuperNode holds only what its client uses: its own samples (node config `data-folder`, a folder of
images per class; without one, the seeded partition of the run's dataset, as in simulation) and, in
the split methods, only the head's and tail's weights (`federation.prepare_client`). The server sends
the run's resolved config, so the node builds the same frozen model and initial params. What the node
keeps (its private seed, and after each round its client's private state: the local classifier, the
linear probe's statistics) lives on its own disk
(`NodeState`), so a new `flwr run` that resumes a run finds it. Split-training batches go to the body
server over the body channel; the upload and this client's measurements go back as a Flower reply.
"""

from __future__ import annotations

import functools
import json
import math
import re
import secrets
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from safetensors.torch import load_file, save

from ..channel import ChannelLink
from ..checkpoint import write_atomically
from ..client import ClientFailure
from ..codec import Message as Payload
from ..codec import decode, encoded_size
from ..config import Config
from ..data import count_images
from ..federation import ClientSide, prepare_client
from ..meter import Meter
from ..seeds import LEGACY
from ..transport import SessionLink
from .records import from_arrays, to_arrays
from .secure import TASK, broadcast_of, client_mod, scaled_upload, upload_reply

app = ClientApp()
STATE_DIR = Path("~/.cache/sfprompt/supernode")  # a node's default state-dir: STATE_DIR/partition-K


class NodeState:
    """What a SuperNode keeps on its own disk, in its node config's `state-dir` (default
    ~/.cache/sfprompt/supernode/partition-K): its private seed, and for each run (a key the ServerApp
    keeps with the run, so a resumed run finds it) its client's private state (`Client.state_dict`) after
    each round it trained in. Flower gives every `flwr run` a fresh Context, so nothing that must outlive
    one run may live there."""

    def __init__(self, context: Context) -> None:
        partition, _ = node_partition(context)
        self.root = Path(str(context.node_config.get("state-dir") or STATE_DIR / f"partition-{partition}")).expanduser()
        self.node_config = context.node_config

    def private_seed(self) -> int:
        """The secret behind this node's randomized labels: its node config's `private-seed` when set (a
        reproducible experiment), otherwise drawn once from the operating system's entropy and kept in the
        state dir (readable by its owner only), so that a sample shows the same randomized label in every
        round and run. The server never sees it."""
        if "private-seed" in self.node_config:
            return int(self.node_config["private-seed"])
        return self._secret(self.root / "private-seed")

    def noise_seed(self, run_key: str) -> int:
        """The secret behind this node's noise and shuffles in the run `run_key`: drawn from the operating
        system's entropy for each run and kept in the run's folder, so that two runs (a learning-rate sweep
        with one --seed, say) never add the same noise to the same send, while a restarted node resumes the
        run with the same draws; its node config's `private-seed` instead when set (a reproducible
        experiment: the run then repeats, noise included)."""
        if "private-seed" in self.node_config:
            return int(self.node_config["private-seed"])
        return self._secret(self._folder(run_key) / "noise-seed")

    @staticmethod
    def _secret(path: Path) -> int:
        """A secret kept in `path` (readable by its owner only), drawn from the operating system's entropy once:
        127 bits, at least 2^127, so that every private stream keeps them all (`seeds.private_generator`). One drawn
        before (63 bits) is kept as it is, with a warning: its streams keep 32 bits of it, and a new one would draw
        the node's randomized labels a second time."""
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, str(1 << 127 | secrets.randbits(127)).encode(), mode=0o600)
        secret = int(path.read_text())
        if secret < LEGACY:
            log(WARNING, "%s was drawn before sfprompt drew 127-bit secrets: the private streams it seeds keep 32 bits "
                "of it, which a server could search. Deleting it draws a new one; if it is the private-seed, that also "
                "draws every sample's randomized label anew, which then shows the server each label randomized twice.",
                path)
        return secret

    def client_state(self, run_key: str, round_: int) -> tuple[int, dict | None]:
        """(round, state) of the client's private state as it stood before `round_`: the latest saved in an
        earlier round of this run ((0, None) if none; later rounds were a crashed attempt)."""
        saved = {r: path for r, path in self._rounds(run_key).items() if r < round_}
        if not saved:
            return 0, None
        return max(saved), load_file(saved[max(saved)])

    def save_client_state(self, run_key: str, round_: int, state: dict, start: int) -> None:
        """Keep the client's state after `round_` (atomically) and forget rounds before `start`, the one this
        round began from (which a retried round needs)."""
        path = self._file(run_key, round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save({k: v.contiguous() for k, v in state.items()}))
        for old, old_path in self._rounds(run_key).items():
            if old < start:
                old_path.unlink(missing_ok=True)

    def _rounds(self, run_key: str) -> dict[int, Path]:
        """round -> the file of the state saved after it (a node of an earlier version named it local-head-*)."""
        return {int(path.stem.removeprefix(prefix)): path for prefix in ("local-head-round-", "client-state-round-")
                for path in self._folder(run_key).glob(f"{prefix}*.safetensors")}

    def _file(self, run_key: str, round_: int) -> Path:
        return self._folder(run_key) / f"client-state-round-{round_}.safetensors"

    def _folder(self, run_key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", run_key):  # the server names a folder here: only a plain name
            raise ValueError(f"run key {run_key!r} is not 32 hex digits")
        return self.root / run_key


def node_partition(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) of this SuperNode, from its node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError:
        raise ValueError("this SuperNode has no partition: start it with "
                         "--node-config 'partition-id=K num-partitions=N'") from None


def node_budget(context: Context) -> float:
    """This SuperNode's compute budget (node config `budget-gflop`: GFLOP per training sample its head may
    cost), from which the server chooses where its head ends (`splits`)."""
    value = context.node_config["budget-gflop"]
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"node config budget-gflop must be a positive number of GFLOP per sample, got {value!r}")
    return budget


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode plays, what data it holds (its own folder, and how many images are
    in it, which bounds its FedAvg weight; or the seeded partition of the run's dataset), and its
    compute budget when its node config sets one."""
    partition, partitions = node_partition(context)
    folder = context.node_config.get("data-folder")
    answer = {"partition-id": partition, "num-partitions": partitions, "data": "folder" if folder else "partition"}
    if folder:
        answer["examples"] = count_images(str(folder))
    if "budget-gflop" in context.node_config:
        answer["budget-gflop"] = node_budget(context)
    return Message(RecordDict({"sfprompt": ConfigRecord(answer)}), reply_to=msg)


@functools.lru_cache(maxsize=1)
def client_side(config_json: str, partition: int, classes_json: str, folder: str | None,
                client_blocks: int) -> ClientSide:
    """This node's side of a run, built once per process and kept for the run's later messages (the
    simulation engine reuses its processes; a deployed SuperNode starts one per message, so there it is
    built each time, from the head's weights and the node's own data only)."""
    return prepare_client(Config.from_dict(json.loads(config_json)), partition, json.loads(classes_json), folder,
                          client_blocks)


@app.train(mods=[client_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of this node's client: a plain round's task, or (secure aggregation) the task inside SecAgg+'s
    masking stage, whose upload Flower's mod masks before it leaves the node."""
    secure = TASK in msg.content.config_records
    task = msg.content.config_records[TASK] if secure else msg.content["sfprompt"]
    partition, _ = node_partition(context)
    if int(task["partition"]) != partition:
        raise ValueError(f"asked to train partition {task['partition']}, but this SuperNode holds partition {partition}")
    config = Config.from_dict(json.loads(task["config"]))
    if "data-dir" in context.node_config:  # where this machine keeps the dataset, if not where the server does
        config = config.replace(data_dir=str(context.node_config["data-dir"]))
    folder = context.node_config.get("data-folder")
    side = client_side(json.dumps(config.to_dict()), partition, task["classes"], str(folder) if folder else None,
                       int(task["client-blocks"]))
    meter, state = Meter(), NodeState(context)
    run_key, round_ = str(task["run-key"]), int(task["round"])
    client = side.client(partition, meter, state.private_seed(), state.noise_seed(run_key))
    start, kept = state.client_state(run_key, round_)
    if kept is not None:
        client.load_state_dict(kept)
    method = side.method.stage(round_, config)  # the run's method, or the probe rounds it opens or closes with
    root = task["body-root-certificate"] or None
    try:
        with ChannelLink(task["body-address"], task["body-token"], meter, side.device,
                         root_certificate=root, timeout_s=float(task["body-timeout-s"]),
                         max_bytes=side.max_message_bytes) as channel:
            link = SessionLink(channel, client.cid, task["session"])
            upload = client.run_round(method, broadcast(msg, secure, method, side), link, int(task["seed"]),
                                      config.client_timeout_s)
        update = decode(upload, side.device, side.max_message_bytes)  # what the server reads of it
        if secure:  # for Flower to mask
            scaled = scaled_upload(client.cid, update.tensors, update.meta["num_examples"], task)
    except ClientFailure as failure:  # the server drops this client from the round, and says why
        report = {"failure": failure.record(), "meter": meter.counts()}
        if secure:  # no weight, and zeros of the upload's shapes: its masks cancel, it adds nothing
            zeros = {name: torch.zeros_like(t) for name, t in method.new_params(side.model).state_dict().items()}
            return upload_reply(msg, zeros, 0, report)
        reply = ConfigRecord({"failure": json.dumps(report["failure"]), "meter": json.dumps(report["meter"])})
        return Message(RecordDict({"sfprompt": reply}), reply_to=msg)
    state.save_client_state(run_key, round_, client.state_dict(), start)
    if secure:
        return upload_reply(msg, scaled, update.meta["num_examples"], {"meta": update.meta, "meter": meter.counts()})
    reply = ConfigRecord({"meta": json.dumps(update.meta), "meter": json.dumps(meter.counts())})
    return Message(RecordDict({"upload": to_arrays(update.tensors), "sfprompt": reply}), reply_to=msg)


def broadcast(msg: Message, secure: bool, method, side: ClientSide) -> Payload:
    """The round's broadcast of the global state: the train message's ArrayRecord (`global`), or under secure
    aggregation its legacy FitIns's parameters (in the order of the state's names). Its `wire_bytes`, what the
    client holds of it as it arrived, are the codec's encoding's, as in-process."""
    if secure:
        names = sorted(method.broadcast(method.new_params(side.model).state_dict()))
        tensors = broadcast_of(msg, names)
    else:
        tensors = from_arrays(msg.content.array_records["global"])
    received = Payload("global", {name: t.to(side.device) for name, t in tensors.items()})
    if (size := encoded_size(received)) > side.max_message_bytes:
        raise ValueError(f"the broadcast of {size} bytes exceeds the run's {side.max_message_bytes}-byte limit")
    received.wire_bytes = size
    return received
