"""Shared fixtures: tiny random ViTs and small synthetic image folders, so tests run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfprompt.defence import Defence
from sfprompt.model import SplitViT, create_vit

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_WEIGHTS = SHARED / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"
SHARED_DATA = SHARED / "data"


# Options that shrink any run to seconds, and an audit of it (the README's commands and the benchmarks, at CI size).
TINY_RUN = ["--train-samples", "40", "--test-samples", "20", "--clients", "2", "--clients-per-round", "2", "--rounds", "1",
            "--image-size", "28"]
TINY_AUDIT = ["--images", "4", "--aux-samples", "30", "--gallery", "4", "--steps", "2", "--inversion-epochs", "1"]


def run_benchmark(script: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """`bash benchmarks/SCRIPT` at a tiny size (SIZE, and AUDIT_SIZE for audits) with ../shared, its runs
    under `tmp_path`, this environment's `sfprompt`, and the script's own `variables`."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SHARED": str(SHARED), "OUT": str(tmp_path / "runs"),
        "SIZE": " ".join(TINY_RUN), "AUDIT_SIZE": " ".join(TINY_AUDIT), **variables,
    }
    return subprocess.run(["bash", str(ROOT / "benchmarks" / script)], env=env, capture_output=True, text=True)


def tiny_split(model: str = "test_vit", prompts: int = 3, client_blocks: int = 0, num_classes: int = 4, seed: int = 0,
               pool_tokens: int = 0, defence: Defence = Defence()):
    """A randomly initialised tiny timm ViT (embedding 64) at 32 px (2 x 2 patches), split."""
    torch.manual_seed(seed)
    vit = create_vit(model, num_classes=num_classes, image_size=32, weights="none")
    return vit, SplitViT(vit, prompts, client_blocks, seed, pool_tokens, defence)


def write_imagefolder(root: Path, classes: int = 3, train_per_class: int = 12, test_per_class: int = 4, size: int = 20,
                      gray: bool = False) -> Path:
    """Class k is a noisy image whose colour and bright quadrant depend on k: learnable, not trivial
    (`gray`: one channel, the quadrant bright)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3))
                half = size // 2
                r, c = divmod(k % 4, 2)
                pixels[r * half:(r + 1) * half, c * half:(c + 1) * half, 0 if gray else k % 3] += 180
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                (image.getchannel(0) if gray else image).save(folder / f"{i}.png")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "images")
