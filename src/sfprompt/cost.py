"""`sfprompt cost`: per-client, per-round compute and communication of every method, for planning.

Nothing is estimated from shapes: each method's client round runs for real (randomly initialised
weights of the chosen architecture, random images) on a small probe batch, through the same client
code, codec and counters as a training run. Each phase's FLOPs and bytes are then scaled by the
number of samples that phase would process on a client holding `samples_per_client` samples; the
broadcast and upload do not depend on the data and are taken as measured. Per-message headers
(a few hundred bytes) are scaled with the samples too, a negligible error at real activation sizes.
Client peak memory is measured at the probe batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from .client import Client, TrainSettings
from .config import Config
from .inprocess import client_round
from .meter import Meter
from .methods import METHODS
from .model import SplitViT, create_vit
from .server import BodyServer
from .transport import InProcessLink

COSTS = ("client_flops", "server_flops", "bytes_up", "bytes_down", "client_peak_memory_bytes")


def estimate(config: Config, samples_per_client: int, probe_samples: int, num_classes: int,
             methods: list[str]) -> dict[str, dict]:
    torch.manual_seed(config.seed)
    vit = create_vit(config.model, num_classes, config.image_size, "none")
    model = SplitViT.from_config(vit, config)
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(probe_samples, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, num_classes, (probe_samples,), generator=generator)
    probe = [(images[i], int(labels[i])) for i in range(probe_samples)]
    # One batch per epoch in the probe; pruning ranks over all probe samples (not per class).
    settings = TrainSettings.from_config(config, batch_size=probe_samples, prune_per_class=False)
    device = torch.device("cpu")
    results = {}
    for name in methods:
        method, meter = METHODS[name](), Meter()
        limit = model.max_message_bytes(settings.batch_size, method.sends_whole_model)
        link = InProcessLink(BodyServer(model, meter, device), meter, device, limit)
        client = Client(0, probe, np.arange(probe_samples), model, settings, meter, device)
        client_round(link, client, method, method.new_params(model), config.seed)
        measured = meter.take()
        probed = method.samples_per_phase(settings, probe_samples)
        scale = {phase: full / probed[phase]
                 for phase, full in method.samples_per_phase(settings, samples_per_client).items() if probed[phase]}
        results[name] = _scaled(measured, scale)
    return results


def _scaled(measured: dict, scale: dict[str, float]) -> dict:
    totals = dict.fromkeys(COSTS[:4], 0.0)
    for key, value in measured["flops_by_phase"].items():
        side, phase = key.split("/")
        totals[f"{side}_flops"] += value * scale.get(phase, 1.0)
    for key, value in measured["bytes_by_phase"].items():
        direction, phase = key.split("/")
        totals[f"bytes_{direction}"] += value * scale.get(phase, 1.0)
    return {key: int(round(v)) for key, v in totals.items()} | {
        "client_peak_memory_bytes": measured["client_peak_memory_bytes"]}


def table(results: dict[str, dict]) -> str:
    reference = results.get("fl")
    lines = ["| method | client GFLOP | server GFLOP | MB up | MB down | client peak MiB (probe batch) "
             "| client FLOPs / fl | bytes (up + down) / fl |", "|" + "---|" * 8]
    for name, r in results.items():
        flops_ratio = bytes_ratio = "—"
        if reference:
            flops_ratio = f"{100 * r['client_flops'] / reference['client_flops']:.3g} %"
            total = r["bytes_up"] + r["bytes_down"]
            bytes_ratio = f"{total / (reference['bytes_up'] + reference['bytes_down']):.3g}×"
        lines.append(f"| {name} | {r['client_flops'] / 1e9:,.1f} | {r['server_flops'] / 1e9:,.1f} "
                     f"| {r['bytes_up'] / 1e6:,.1f} | {r['bytes_down'] / 1e6:,.1f} "
                     f"| {r['client_peak_memory_bytes'] / 2**20:,.1f} | {flops_ratio} | {bytes_ratio} |")
    return "\n".join(lines) + "\n"
