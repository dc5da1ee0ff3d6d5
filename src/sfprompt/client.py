"""A simulated client: its data, its private state, and the three SFPrompt phases it runs.

A client never holds the body. It holds a reference to the shared frozen head, its own copy of the
global prompts and tail for the round, an optimiser, and (by default) a private local classifier
that persists across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .codec import Message
from .meter import CLIENT, Meter, PeakMemory
from .model import ClientParams, SplitViT
from .pruning import el2n, hardest
from .transport import InProcessLink


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int
    local_classifier: str  # 'separate' | 'shared'
    keep_ratio: float
    prune_per_class: bool
    split_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    prompt_lr: float
    momentum: float
    weight_decay: float


class LocalHead(nn.Module):
    """The private classifier of the local loss: norm + linear on the mean of the patch tokens.

    With `client_blocks = 0` the CLS token leaving the head is the same for every input, so the
    local path pools the (input-dependent) patch tokens instead.
    """

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(patch_tokens.mean(dim=1)))  # (B, N, D) -> (B, C)


class Client:
    def __init__(
        self,
        cid: int,
        data: Dataset,
        indices: np.ndarray,
        model: SplitViT,
        settings: TrainSettings,
        meter: Meter,
        device: torch.device,
    ) -> None:
        self.cid = cid
        self.data = Subset(data, indices.tolist())
        self.model = model
        self.settings = settings
        self.meter = meter
        self.device = device
        self.local_head = LocalHead(model.layout.width, model.num_classes).to(device)

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def run_round(self, global_state: Message, link: InProcessLink, seed: int) -> Message:
        """All three phases for one round; returns the upload for FedAvg."""
        params = self.model.new_params().to(self.device)
        params.load_state_dict(global_state.tensors)
        optimizer = self._optimizer(params)
        generator = torch.Generator().manual_seed(seed)
        memory = PeakMemory()  # everything this client holds during the round
        memory.hold(self.model.head, params, self.local_head)
        local_loss = self.local_update(params, optimizer, generator, memory)
        kept = self.prune(params, memory)
        split_loss = self.split_train(params, optimizer, kept, link, generator, memory)
        meta = {"client": self.cid, "num_examples": self.num_examples, "kept": len(kept),
                "local_loss": local_loss, "split_loss": split_loss}
        return Message("update", dict(params.state_dict()), meta)

    # Phase 1: self-update on the local model tail(head(x; p)), no server involved.
    def local_update(
        self, params: ClientParams, optimizer: torch.optim.Optimizer, generator: torch.Generator, memory: PeakMemory
    ) -> float:
        losses = []
        for _ in range(self.settings.local_epochs):
            for images, labels in self._loader(self.data, generator, memory):
                with self.meter.work(CLIENT, "local", memory):
                    loss = F.cross_entropy(self._local_logits(images, params), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                losses.append(loss.item())
        return float(np.mean(losses)) if losses else float("nan")

    def _local_logits(self, images: torch.Tensor, params: ClientParams) -> torch.Tensor:
        tokens = self.model.head(images, params.prompts)  # (B, prefix+P+N, D)
        patches = tokens[:, self.model.layout.patch_rows]  # (B, N, D)
        classifier = params.tail if self.settings.local_classifier == "shared" else self.local_head
        return classifier(patches)

    # Phase 1b: EL2N scores under the local model; keep the hardest samples.
    @torch.no_grad()
    def prune(self, params: ClientParams, memory: PeakMemory) -> list[int]:
        if self.settings.keep_ratio >= 1.0:
            return list(range(self.num_examples))
        scores, all_labels = [], []
        for images, labels in self._loader(self.data, None, memory):
            with self.meter.work(CLIENT, "prune", memory):
                scores.append(el2n(self._local_logits(images, params), labels))
            all_labels.append(labels)
        groups = torch.cat(all_labels) if self.settings.prune_per_class else None
        return hardest(torch.cat(scores), self.settings.keep_ratio, groups).tolist()

    # Phase 2: split training on the kept samples, activations and gradients through the link.
    def split_train(
        self,
        params: ClientParams,
        optimizer: torch.optim.Optimizer,
        kept: list[int],
        link: InProcessLink,
        generator: torch.Generator,
        memory: PeakMemory,
    ) -> float:
        losses = []
        for _ in range(self.settings.split_epochs):
            for images, labels in self._loader(Subset(self.data, kept), generator, memory):
                with self.meter.work(CLIENT, "split", memory):
                    tokens = self.model.head(images, params.prompts)  # (B, prefix+P+N, D)
                reply = link.request(Message("forward", {"tokens": tokens}, {"client": self.cid}), "split")
                memory.hold(reply.tensors["rows"])
                with self.meter.work(CLIENT, "split", memory):
                    rows = reply.tensors["rows"].requires_grad_(True)  # (B, R, D)
                    loss = F.cross_entropy(params.tail(rows), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                reply = link.request(Message("backward", {"grad": rows.grad}, {"client": self.cid}), "split")
                memory.hold(reply.tensors["grad"])
                with self.meter.work(CLIENT, "split", memory):
                    tokens[:, self.model.grad_rows].backward(reply.tensors["grad"])  # into the prompts (and head blocks)
                    optimizer.step()
                losses.append(loss.item())
        return float(np.mean(losses)) if losses else float("nan")

    def _optimizer(self, params: ClientParams) -> torch.optim.Optimizer:
        s = self.settings
        groups = [
            {"params": [params.prompts], "lr": s.prompt_lr},
            {"params": list(params.tail.parameters()) + list(self.local_head.parameters()), "lr": s.lr},
        ]
        if s.optimizer == "adam":
            return torch.optim.Adam(groups, weight_decay=s.weight_decay)
        return torch.optim.SGD(groups, momentum=s.momentum, weight_decay=s.weight_decay)

    def _loader(self, data: Dataset, generator: torch.Generator | None, memory: PeakMemory):
        """Mini-batches on the device (shuffled when given a generator), held by the client."""
        loader = DataLoader(data, batch_size=self.settings.batch_size, shuffle=generator is not None,
                            generator=generator)
        for images, labels in loader:
            images, labels = images.to(self.device), labels.to(self.device)
            memory.hold(images, labels)
            yield images, labels
