"""Shared fixtures: tiny random ViTs and small synthetic image folders, so tests run in seconds."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest runs two workers (pyproject.toml): one core each, their children too
    os.environ["OMP_NUM_THREADS"] = "1"  # before numpy and torch size their thread pools

import numpy as np
import pytest
import torch
from PIL import Image

from sfprompt.defence import Defence
from sfprompt.wire import WireFormat
from sfprompt.model import SplitViT, create_vit

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_WEIGHTS = SHARED / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"
SHARED_DATA = SHARED / "data"
# Tests of the real checkpoint and Fashion-MNIST from ../shared (benchmarks at a tiny size): skipped where it is missing.
needs_shared = pytest.mark.skipif(
    not (SHARED_WEIGHTS.is_file() and (SHARED_DATA / "FashionMNIST" / "raw").is_dir()),
    reason=f"the real checkpoint ({SHARED_WEIGHTS}) or Fashion-MNIST ({SHARED_DATA}) is missing",
)


# Options that shrink any run to seconds, and an audit of it (the documented commands and the benchmarks, at CI size).
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


def run_python_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS` in a fresh process, as run by hand (its folder on sys.path)."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True)


def tiny_split(model: str = "test_vit", prompts: int = 3, client_blocks: int = 0, num_classes: int = 4, seed: int = 0,
               pool_tokens: int = 0, defence: Defence = Defence(), wire: WireFormat = WireFormat()):
    """A randomly initialised tiny timm ViT (embedding 64) at 32 px (2 x 2 patches), split."""
    torch.manual_seed(seed)
    vit = create_vit(model, num_classes=num_classes, image_size=32, weights="none")
    return vit, SplitViT(vit, prompts, client_blocks, seed, pool_tokens, defence, wire=wire)


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


def certificates() -> tuple[bytes, bytes, bytes]:
    """A CA and, signed by it, a server certificate for 127.0.0.1 and localhost with its key (PEM):
    what the deployment guide's step 1 makes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def signed(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = signed("sfprompt test CA", ca_key, "sfprompt test CA", ca_key, ca=True)
    server = signed("sfprompt server", server_key, "sfprompt test CA", ca_key, ca=False)
    key = server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return ca, server, key


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """The tiny test ViT's random weights as a file in timm's layout, as a pre-trained checkpoint is."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    path = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_vit("test_vit", 1000, 32, "none").state_dict().items()}, str(path))
    return path


def client_folders(fed, root: Path) -> list[Path]:
    """Each client's partition of a prepared run written out as its own folder, as a node would hold it
    (`sfprompt export-clients`)."""
    from sfprompt.federation import export_clients

    return export_clients(fed.config, root, progress=False)
