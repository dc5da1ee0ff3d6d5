"""Using a finished run: its global model as one `torch.nn.Module`, and `sfprompt predict` to CSV.

A run ends with `global.safetensors`: the global prompts and tail (the whole fine-tuned ViT for
`fl`, and the body too under `--train-body`), with the run's config and class names in its
metadata. `load_run` puts them back on the pre-trained backbone the run started from, so the
module computes exactly what the run evaluated, its privacy defence included.

    model = sfprompt.load_run("runs/latest")         # eval mode, on the CPU
    probabilities = model(model.transform(image).unsqueeze(0)).softmax(-1)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from .config import Config, ConfigError
from .data import Transformed, load_splits, model_transform
from .federation import normalisation, resolve_device, resolve_weights, subset_indices
from .methods import METHODS, Method
from .model import SplitViT, create_vit

FILE = "global.safetensors"


class RunModel(nn.Module):
    """A finished run's model: the frozen pre-trained ViT, the run's global prompts and tail (for `fl`,
    its fine-tuned ViT), and the run's privacy defence as its clients apply it. Takes images as
    `transform` makes them, (B, 3, H, W); returns logits over `classes`."""

    def __init__(self, config: Config, method: Method, split: SplitViT, params: nn.Module, classes: list[str],
                 round_: int) -> None:
        super().__init__()
        self.config, self.method, self.split, self.classes, self.round = config, method, split, classes, round_
        self.params = params
        self.body = split.body  # registered, so .to() moves the body and the head with the params
        self.head = split.head
        vit = split._vit
        self.transform: Callable = model_transform(config.image_size, **normalisation(vit))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits (B, classes); `generator` draws the defence's randomness, if the run had any."""
        return self.method.logits(self.split, self.params, images, generator)


def load_run(folder: str | Path, device: str = "cpu") -> RunModel:
    """The model of the run in `folder` (or its `global.safetensors` itself), in eval mode on `device`."""
    path = Path(folder)
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; a run folder holds {FILE} after its first round")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        config = Config.from_saved({**json.loads(meta["config"]), "device": device})
    except (KeyError, ValueError, OSError) as err:
        raise ConfigError(f"{path} is not an sfprompt run's model file ({type(err).__name__}: {err})") from None
    classifier = tensors.get("tail.head.weight", tensors.get("vit.head.weight"))
    num_classes = classifier.shape[0]
    classes = json.loads(meta.get("classes", "null")) or [str(k) for k in range(num_classes)]
    torch.manual_seed(config.seed)
    vit = create_vit(config.model, num_classes, config.image_size, resolve_weights(config))
    round_ = int(meta.get("round", 0))
    split = SplitViT.from_config(vit, config)
    method = METHODS[config.method]().stage(max(round_, 1), config)  # a run stopped in its probe rounds: the probe
    params = method.new_params(split)
    params.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("body.")})
    body = {k.removeprefix("body."): v for k, v in tensors.items() if k.startswith("body.")}
    if body:
        split.body.load_state_dict(body)
    model = RunModel(config, method, split, params, classes, round_)
    return model.to(resolve_device(device)).eval().requires_grad_(False)


@torch.no_grad()
def logits_of(model: Callable, data: Dataset, batch_size: int, device: torch.device, seed: int,
              progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) batch by batch: how a run evaluates, so its reported accuracy is reproduced
    (batches of at least 128, the defence's randomness seeded by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=max(batch_size, 128))
    for images, labels in tqdm(loader, desc="predict", unit="batch", disable=not progress, file=sys.stderr):
        yield model(images.to(device), generator), labels


class ImageFiles(Dataset):
    """Every image under a folder (recursively, sorted), unlabelled (-1): what `--images` predicts."""

    def __init__(self, root: Path, transform: Callable) -> None:
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.paths:
            raise ConfigError(f"--images {root}: no image files there ({', '.join(IMG_EXTENSIONS)})")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image), -1


def run_split(model: RunModel, split: str) -> Dataset:
    """The run's own train or test samples (its dataset, `--data-dir` and seeded subset)."""
    config = model.config
    data = load_splits(config.dataset, config.data_dir)
    raw, labels, size = ((data.test, data.test_labels, config.test_samples) if split == "test"
                         else (data.train, data.train_labels, config.train_samples))
    option = "--test-samples" if split == "test" else "--train-samples"
    return Subset(Transformed(raw, model.transform), subset_indices(labels, size, config.seed, option).tolist())


def predict(folder: Path, images: Path | None, split: str, out: Path | None, device: str,
            progress: bool = True) -> float | None:
    """Write top-1 class and class probabilities to CSV; return the accuracy when labels are known.
    Batches are the run's evaluation batches, so a defence's randomness falls as it did in the run."""
    model = load_run(folder, device)
    if images is not None:
        if not images.is_dir():
            raise ConfigError(f"--images {images}: not a folder")
        data: Dataset = ImageFiles(images, model.transform)
        names = [str(p.relative_to(images)) for p in data.paths]
    else:
        data = run_split(model, split)
        names = [f"{split}:{i}" for i in range(len(data))]
    out = out or (Path(folder) if Path(folder).is_dir() else Path(folder).parent) / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    correct = seen = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "label", "predicted", "predicted_class", "probability",
                         *(f"p[{name}]" for name in model.classes)])
        rows = iter(names)
        for logits, labels in logits_of(model, data, model.config.batch_size, resolve_device(device),
                                        model.config.seed, progress):
            probabilities = logits.softmax(dim=-1).cpu()
            top = probabilities.argmax(dim=-1)
            for p, k, label in zip(probabilities.tolist(), top.tolist(), labels.tolist()):
                writer.writerow([next(rows), "" if label < 0 else label, k, model.classes[k], f"{p[k]:.6f}",
                                 *(f"{q:.6f}" for q in p)])
            known = labels >= 0
            correct += int((top[known] == labels[known]).sum())
            seen += int(known.sum())
    print(f"{len(names)} predictions by the round-{model.round} model of {folder} written to {out}")
    if not seen:
        return None
    accuracy = correct / seen
    print(f"accuracy {accuracy:.4f} on {seen} labelled samples")
    return accuracy
