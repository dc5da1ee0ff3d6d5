"""The split of a timm Vision Transformer into client head, server body and client tail.

The split wraps timm's own seams (`patch_embed` -> `_pos_embed` -> `norm_pre` -> `blocks` ->
`norm` -> pooling -> `head`) instead of forking the model:

    head (client, frozen, shared):  patch embedding, prefix + position embedding, prompts inserted
                                    after the prefix tokens, then blocks[:client_blocks], then the
                                    patch tokens average-pooled to a coarser grid (`pool_tokens`)
    body (server, frozen, shared):  blocks[client_blocks:]
    tail (client, trained):         final norm, pooling, classifier

What a client trains and uploads is a `ClientParams` (prompts + tail), or for federated full
fine-tuning a `FullParams` (the whole model). The frozen head and body are built once and shared by
every simulated client, so hundreds of clients cost only their params.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import PRECISIONS, ConfigError
from .defence import Defence
from .protocol import SplitMessages
from .wire import WireFormat
from .zeroth_order import Perturbations


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in the sequence the head emits: (B, prefix + P + N, D)."""

    prefix: int  # CLS and register tokens
    prompts: int
    patches: int
    width: int
    pool: str  # timm's global_pool: 'token' (CLS) or 'avg'

    @property
    def length(self) -> int:
        return self.prefix + self.prompts + self.patches

    @property
    def prompt_rows(self) -> slice:
        return slice(self.prefix, self.prefix + self.prompts)

    @property
    def patch_rows(self) -> slice:
        return slice(self.prefix + self.prompts, self.length)

    @property
    def tail_rows(self) -> slice:
        """The rows of the body output the tail reads; only these travel back to the client."""
        return slice(0, 1) if self.pool == "token" else self.patch_rows


class PromptedHead(nn.Module):
    """Client-side frozen embedding (+ first blocks); prompts are passed in, not owned.

    With `pool_grid`, the patch tokens leaving the head are average-pooled from the model's patch
    grid to `pool_grid` x `pool_grid` (fewer bytes, coarser content; what it hides is measured by
    `sfprompt audit`). The body sees the shorter sequence: its blocks take any token count.
    """

    def __init__(self, vit: nn.Module, client_blocks: int, pool_grid: int | None = None) -> None:
        super().__init__()
        self.vit_embed = _EmbedSeams(vit)
        self.blocks = nn.Sequential(*vit.blocks[:client_blocks])
        self.num_prefix = vit.num_prefix_tokens
        self.grid = vit.patch_embed.grid_size
        self.pool_grid = pool_grid

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        x = self.vit_embed(images)  # (B, prefix + N, D)
        prompts = prompts.expand(x.shape[0], -1, -1)  # (B, P, D)
        x = torch.cat([x[:, : self.num_prefix], prompts, x[:, self.num_prefix :]], dim=1)  # (B, prefix+P+N, D)
        x = self.blocks(x)
        if self.pool_grid is None:
            return x
        kept = self.num_prefix + len(prompts[0])
        patches = x[:, kept:].transpose(1, 2).unflatten(2, self.grid)  # (B, D, h, w)
        pooled = F.adaptive_avg_pool2d(patches, self.pool_grid).flatten(2).transpose(1, 2)  # (B, G*G, D)
        return torch.cat([x[:, :kept], pooled], dim=1)


class _EmbedSeams(nn.Module):
    """timm's embedding stages, held without the rest of the model."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.no_embed_class = vit.no_embed_class
        self.dynamic_img_size = vit.dynamic_img_size
        self.num_prefix_tokens = vit.num_prefix_tokens

    # timm's `_pos_embed` only reads the attributes copied above, so it is reused as is.
    _pos_embed = timm.models.vision_transformer.VisionTransformer._pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


AUTOCAST_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16)))  # --precision -> autocast dtype


class Body(nn.Module):
    """Server-side frozen blocks, run in the configured precision wherever they run (the server's
    split steps, evaluation, `predict`): 'bf16' and 'fp16' autocast the blocks (mixed precision: weights
    and the residual stream stay float32), and the output is returned in the input's dtype, so the
    wire format does not change."""

    def __init__(self, vit: nn.Module, client_blocks: int, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.blocks = nn.Sequential(*vit.blocks[client_blocks:])
        self.precision = precision

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return self.blocks(tokens)
        with torch.autocast(tokens.device.type, dtype=dtype):
            return self.blocks(tokens).to(tokens.dtype)


class Tail(nn.Module):
    """Final norm, pooling and classifier; reads only `TokenLayout.tail_rows` of the body output."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm = copy.deepcopy(vit.norm)
        self.fc_norm = copy.deepcopy(vit.fc_norm)
        self.head = copy.deepcopy(vit.head)

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        # LayerNorm is per token, so normalising only the rows read equals timm's norm-then-pool.
        x = self.norm(rows)  # (B, R, D)
        return self.fc_norm(x.mean(dim=1))  # (B, D); R == 1 for CLS pooling

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(rows))


class ClientParams(nn.Module):
    """Everything a client trains and uploads in the prompt methods: the prompts and the tail."""

    def __init__(self, prompts: torch.Tensor, tail: Tail) -> None:
        super().__init__()
        self.prompts = nn.Parameter(prompts)  # (1, P, D)
        self.tail = tail

    def param_groups(self, lr: float, prompt_lr: float, backbone_lr: float) -> list[dict]:
        return [{"params": [self.prompts], "lr": prompt_lr}, {"params": list(self.tail.parameters()), "lr": lr}]


class FullParams(nn.Module):
    """The whole model as one client's trainable copy (federated full fine-tuning): no prompts."""

    def __init__(self, vit: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.vit = copy.deepcopy(vit).requires_grad_(True)
        self.vit.head.load_state_dict(classifier.state_dict())  # the same seeded start as the prompt methods

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    def param_groups(self, lr: float, prompt_lr: float, backbone_lr: float) -> list[dict]:
        classifier = list(self.vit.get_classifier().parameters())
        chosen = {id(p) for p in classifier}
        backbone = [p for p in self.vit.parameters() if id(p) not in chosen]
        return [{"params": backbone, "lr": backbone_lr}, {"params": classifier, "lr": lr}]


class SplitViT:
    """A timm ViT cut into a shared frozen head and body plus the initial trainable params.

    `send` is what a client puts on the wire for a batch of images: the head's tokens, protected by
    the configured `Defence` (shuffled, clipped and noised with the client's private randomness);
    `messages` is how they, the body's output and the gradients travel at this split point
    (`protocol.SplitMessages`, in the run's `wire.WireFormat`).
    """

    def __init__(self, vit: nn.Module, prompt_tokens: int, client_blocks: int, seed: int,
                 pool_tokens: int = 0, defence: Defence = Defence(), precision: str = "fp32",
                 wire: WireFormat = WireFormat(), perturbations: Perturbations | None = None) -> None:
        if getattr(vit, "dist_token", None) is not None:
            raise ConfigError("distilled ViTs (a distillation token and a second classifier, e.g. DeiT's *_distilled_*) "
                              "are not supported: use the model without distillation")
        if vit.attn_pool is not None or vit.global_pool not in ("token", "avg") or vit.pool_include_prefix:
            raise ConfigError(
                f"model pooling {vit.global_pool!r} is not supported: use a ViT with CLS ('token') or 'avg' pooling"
            )
        depth = len(vit.blocks)
        if not 0 <= client_blocks < depth:
            raise ConfigError(f"--client-blocks must be between 0 and {depth - 1} for this model, got {client_blocks}")
        grid = vit.patch_embed.grid_size
        if not 0 <= pool_tokens <= min(grid):
            raise ConfigError(f"--pool-tokens must be between 0 (no pooling) and the patch grid's {min(grid)} for this "
                              f"model and image size, got {pool_tokens}")
        vit.eval().requires_grad_(False)
        self.layout = TokenLayout(
            prefix=vit.num_prefix_tokens,
            prompts=prompt_tokens,
            patches=pool_tokens**2 if pool_tokens else vit.patch_embed.num_patches,
            width=vit.embed_dim,
            pool=vit.global_pool,
        )
        self._vit = vit
        self.depth, self.image_size = depth, tuple(vit.patch_embed.img_size)
        self.pool_grid, self.precision, self.defence, self.wire = pool_tokens or None, precision, defence, wire
        self.perturbations = perturbations  # forward-only's: the body server applies them to an evaluate's prompts (with
        # client blocks the client does, before its blocks)
        self._split_at(client_blocks)
        self._splits = {client_blocks: self}  # split point -> its view (`at`), shared by every view
        self.num_classes = vit.num_classes
        self.model_bytes = _tensor_bytes(vit.state_dict())  # what `fl` broadcasts and uploads, less the header
        generator = torch.Generator().manual_seed(seed)
        self.initial_params = ClientParams(_init_prompts(vit, prompt_tokens, generator), Tail(vit))
        _reset_classifier(self.initial_params.tail.head, generator)
        self.initial_params.requires_grad_(True)
        self.params_bytes = _tensor_bytes(self.initial_params.state_dict())  # the prompts and tail

    def _split_at(self, client_blocks: int) -> None:
        """Set what depends on the split point: the head, the body, the rows a defence protects and what
        the messages carry."""
        self.head = PromptedHead(self._vit, client_blocks, self.pool_grid)
        self.body = Body(self._vit, client_blocks, self.precision)
        self.client_blocks = client_blocks
        # The rows that depend on the input: without client blocks the prefix and prompt rows are the
        # same for every image, so only the patch rows carry (and need protecting) anything of it.
        self.private_rows = self.layout.patch_rows if client_blocks == 0 else slice(0, self.layout.length)
        self.messages = SplitMessages(self.layout, client_blocks, self.wire, self.perturbations)  # what its messages carry

    def at(self, client_blocks: int) -> "SplitViT":
        """The same model split after `client_blocks` blocks instead (a client of another budget): it
        shares every frozen weight and the initial params, and computes the same function unless pooling or
        clipping acts where the head ends (`Config` refuses those with budgets), so prompts and tails trained
        at different split points average (FedAvg) as they are. One view per split
        point, made on first use and shared by every caller (clients, the body server)."""
        split = self._splits.get(client_blocks)
        if split is None:
            if self.body is None or not 0 <= client_blocks < self.depth:
                raise ConfigError(f"a split after {client_blocks} blocks is not one of this model's "
                                  f"(0 to {self.depth - 1}, on a model that still holds its body)")
            split = copy.copy(self)
            split._split_at(client_blocks)
            self._splits[client_blocks] = split
        return split

    @classmethod
    def from_config(cls, vit: nn.Module, config, prompt_tokens: int | None = None) -> "SplitViT":
        """The split and defence a run's `Config` asks for (`prompt_tokens`: another method's count than its own)."""
        return cls(vit, config.prompts if prompt_tokens is None else prompt_tokens, config.client_blocks, config.seed, config.pool_tokens,
                   Defence.from_config(config), config.precision, WireFormat.from_config(config), config.perturbations)

    def send(self, images: torch.Tensor, prompts: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The activations a client sends for `images`: (B, L, D), protected by the defence."""
        return self.defence.protect(self.head(images, prompts), self.private_rows, self.layout.patch_rows, generator)

    def new_params(self) -> ClientParams:
        return copy.deepcopy(self.initial_params)

    def new_full_params(self) -> FullParams:
        return FullParams(self._vit, self.initial_params.tail.head)

    def logits(self, images: torch.Tensor, params: ClientParams, generator: torch.Generator | None = None) -> torch.Tensor:
        """The full model tail(body(send(x; p))) in one place (evaluation, or a client holding it all),
        with the defence applied as a client applies it (`generator` draws its randomness)."""
        tokens = self.body(self.send(images, params.prompts, generator))  # (B, prefix+P+N, D)
        return params.tail(tokens[:, self.layout.tail_rows])

    def drop_body(self) -> None:
        """Free the server's blocks in a process that only plays a split-training client."""
        del self._vit.blocks[self.client_blocks:]
        self.body = None
        self._splits = {self.client_blocks: self}  # other views would keep the body's blocks alive

    def to(self, device: torch.device) -> "SplitViT":
        self._vit.to(device)
        self.initial_params.to(device)
        return self


def _init_prompts(vit: nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    """VPT's initialisation: uniform with the Xavier bound of the patch projection."""
    patch = vit.patch_embed.patch_size
    bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + vit.embed_dim))
    return (torch.rand(1, count, vit.embed_dim, generator=generator) * 2 - 1) * bound


def _reset_classifier(head: nn.Module, generator: torch.Generator) -> None:
    """A seeded, zero-bias classifier so every run with the same seed starts the same."""
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
            head.bias.zero_()


def create_vit(model: str, num_classes: int, image_size: int, weights: str) -> nn.Module:
    """Build a timm ViT with pre-trained weights from the hub, a local safetensors file, or none.

    Both pre-trained paths go through timm's own loader, which resamples the position embedding
    when `image_size` differs from the checkpoint's.
    """
    if model not in timm.list_models():
        close = timm.list_models(f"*{model.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown model {model!r}{hint}")
    try:
        vit = _create(model, weights, num_classes=num_classes, img_size=image_size)
    except TypeError:  # a non-ViT architecture has no `img_size`
        vit = None
    if not isinstance(vit, timm.models.vision_transformer.VisionTransformer):
        raise ConfigError(f"model {model!r} is not a timm VisionTransformer")
    patch = vit.patch_embed.patch_size
    if image_size % patch[0] or image_size % patch[1]:
        raise ConfigError(f"--image-size {image_size} is not divisible by the patch size {patch[0]} of {model!r}")
    return vit


def create_head_vit(model: str, num_classes: int, image_size: int, weights: str, client_blocks: int) -> nn.Module:
    """The ViT as a split-training client needs it: the embedding, the first `client_blocks` blocks, the
    final norm and the classifier, with its pre-trained weights read from the safetensors file `weights`
    alone. The body's blocks stay on PyTorch's meta device (shapes, no memory) for `SplitViT` to check
    and `drop_body` to remove; their tensors are never read, so a file without them works as well.

    Equal to `create_vit` for every tensor it holds: the same keys pass through timm's checkpoint filter
    (which resamples the position embedding), and the classifier is reset by `SplitViT` either way."""
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    with torch.device("meta"):
        vit = create_vit(model, num_classes, image_size, "none")
    blocks = list(vit.blocks)
    if not 0 <= client_blocks < len(blocks):
        raise ConfigError(f"--client-blocks must be between 0 and {len(blocks) - 1} for this model, got {client_blocks}")
    vit.blocks = nn.Sequential(*blocks[:client_blocks])
    vit.to_empty(device="cpu")
    vit.init_weights()  # defined values for the classifier, which the file may lack (SplitViT resets it)
    classifier = {f"head.{name}" for name, _ in vit.get_classifier().named_parameters()}
    body = re.compile(r"blocks\.(\d+)\.")
    with safe_open(str(path), "pt") as file:
        wanted = [k for k in file.keys()
                  if k not in classifier and not ((m := body.match(k)) and int(m.group(1)) >= client_blocks)]
        state = {k: file.get_tensor(k) for k in wanted}
    state = timm.models.vision_transformer.checkpoint_filter_fn(state, vit)
    missing, unexpected = vit.load_state_dict({k: v for k, v in state.items() if k not in classifier}, strict=False)
    missing = sorted(set(missing) - classifier)
    if missing or unexpected:
        raise ConfigError(f"weights file {path} does not match the head and tail of {model!r} in timm's layout: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    vit.blocks = nn.Sequential(*vit.blocks, *blocks[client_blocks:])  # the body, on the meta device
    return vit


def _create(model: str, weights: str, **kwargs) -> nn.Module:
    if weights == "none":
        vit = timm.create_model(model, pretrained=False, **kwargs)
    elif weights == "hub":
        try:
            vit = timm.create_model(model, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:  # no network, no such hub entry, ...
            raise ConfigError(
                f"could not load hub weights for {model!r} ({type(err).__name__}: {str(err)[:200]}); "
                "pass --weights PATH to a local .safetensors file"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist")
        try:
            vit = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise ConfigError(f"weights file {path} does not match model {model!r}: {detail}") from None
    return vit


def data_config(vit: nn.Module) -> dict:
    """The model's pretrained normalisation (mean, std, interpolation) as timm resolves it."""
    return timm.data.resolve_data_config({}, model=vit)


def _tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
