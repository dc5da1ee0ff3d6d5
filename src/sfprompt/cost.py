"""`sfprompt cost`: per-client, per-round compute and communication of every method, for planning.

No cost is modelled, and no phase logic is repeated here: each method's client round
runs through the same client code, codec and counters as a training run, on a probe just large enough
for a full `--batch-size` batch in every phase, two epochs of each phase at most, with the chosen
architecture's weights as fake tensors (`fake_vit`): every operation is dispatched, so the FLOP
counter and the memory tracker count it, but none is computed, and each message is counted at the
exact length its encoding would have (`codec.encoded_size`). So ViT-L/16 takes seconds and about a
gigabyte where real rounds took half an hour and 20 GB. How many samples each phase processes on a
client holding `samples_per_client` samples is counted the same way, by running the same round on
that many samples through a tiny real ViT (seconds), with the configured pruning (per class over a
balanced label mix, as IID data gives). Each phase's costs are scaled by the ratio of the two counts;
the broadcast and upload do not depend on the data and are taken as measured. Per-message headers (a
few hundred bytes) are scaled with the samples too, a negligible error at real activation sizes.
Client peak memory is measured as the probe runs: full batches, and a second epoch with the
optimiser's state, as in a training run. A method whose run opens or closes with probe rounds (SFPrompt's
default recipe) gets a second row, one of those rounds: the linear probe's round through its prompts; in the
printed table, methods whose probe rounds cost the same share that row (`--out` keeps one for each).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .client import Client, TrainSettings
from .compare import VARIANTS
from .config import PROMPT_FREE, Config, ConfigError
from .inprocess import client_round
from .meter import Meter
from .methods import METHODS
from .model import SplitViT, create_vit
from .server import MAX_BATCH, BodyServer
from .transport import InProcessLink

COSTS = ("client_flops", "server_flops", "bytes_up", "bytes_down", "client_peak_memory_bytes")
PROBE_ROUND = "a probe round"  # the name of a method's opening and refit rounds in `estimate`'s results
COUNTING_MODEL, COUNTING_SIZE = "test_vit", 32  # the tiny ViT that counts a round's samples per phase


class _CountingClient(Client):
    """A client that also counts the samples each of its phases loads (every epoch, every batch)."""

    samples: Counter

    def _loader(self, data, ctx, shuffle=True):
        for batch in super()._loader(data, ctx, shuffle):
            self.samples[ctx.phase] += len(batch[0])
            yield batch


def _round(config: Config, vit: torch.nn.Module, method_name: str, samples: int, num_classes: int,
           settings: TrainSettings, probe_round: bool = False) -> tuple[dict, Counter]:
    """One client round through `vit` (real, or fake: `fake_vit`) on `samples` random images with balanced
    labels: its costs as a training run measures them, and the samples each phase processed. `probe_round`: the
    round of the method's run that opens or closes it, which the linear probe runs through the method's prompts
    (`Method.stage`)."""
    model = SplitViT.from_config(vit, config, 0 if method_name in PROMPT_FREE else config.prompt_tokens)
    generator = torch.Generator().manual_seed(config.seed)
    size = vit.patch_embed.img_size
    images = torch.randn(samples, 3, *size, generator=generator)
    data = [(images[i], i % num_classes) for i in range(samples)]
    method = METHODS["linear-probe" if probe_round else method_name]()  # a probe round: through the method's prompts
    meter, device = Meter(), torch.device("cpu")
    body = BodyServer(model, meter, device, max_batch=max(MAX_BATCH, samples))  # counting: one batch of every image
    link = InProcessLink(body, meter, device,
                         model.messages.max_bytes(settings.batch_size, method.state_bytes(model)))
    client = _CountingClient(0, data, np.arange(samples), model, settings, meter, device)
    client.samples = Counter()
    client_round(link, client, method, method.new_params(model), config.seed)
    return meter.take(), client.samples


def estimate(config: Config, samples_per_client: int, num_classes: int, methods: list[str],
             probe_samples: int | None = None) -> dict[str, dict]:
    """Each method's costs per client and round, from `probe_samples` run on fake weights (default: `probe_size`)."""
    with warnings.catch_warnings():  # torch's deepcopy of a parameter asks for its data pointer, which a fake one lacks
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        return _estimate(config, samples_per_client, num_classes, methods, probe_samples)


def _estimate(config: Config, samples_per_client: int, num_classes: int, methods: list[str],
              probe_samples: int | None) -> dict[str, dict]:
    # The noise of --upload-epsilon changes no size, and the probe's rounds (linear-probe, the probe variants) could
    # not take it: every method is costed without it.
    config = config.replace(upload_clip=None, upload_epsilon=None)
    torch.manual_seed(config.seed)
    vit = fake_vit(config.model, num_classes, config.image_size)
    counting_vit = create_vit(COUNTING_MODEL, num_classes, COUNTING_SIZE, "none")
    results = {}
    for name in methods:
        method, overrides = VARIANTS.get(name, (name, {}))  # a variant: the method with other options
        variant, has_probe_rounds = _as_method(config, method, overrides)
        results[name] = _method_round(variant, vit, counting_vit, method, samples_per_client, num_classes,
                                      probe_samples)
        if has_probe_rounds:  # its opening and refit rounds: the probe's, with its prompts in the features
            results[f"{name}: {PROBE_ROUND}"] = _method_round(variant, vit, counting_vit, method, samples_per_client,
                                                              num_classes, probe_samples, probe_round=True)
    return results


def _as_method(config: Config, method: str, overrides: dict) -> tuple[Config, bool]:
    """`config` as a run of `method` takes it (with a variant's overrides, the defaults it derives its own), and
    whether that run opens or closes with probe rounds. Where the method refuses an option that `config` sets for
    its own method (--pool-tokens for fl, which sends no activation; --train-body for sfprompt), its round is costed
    under `config` as it is, as before probe rounds were costed, and its probe rounds are those of a run of it with
    `config`'s rounds and probe options."""
    try:
        variant = config.replace(method=method, **overrides)
        return variant, variant.has_probe_rounds
    except ConfigError:
        if overrides:
            raise
    given = {name: value for name, value in config.given().items() if name in ("probe_rounds", "refit_rounds")
             and value is not None}
    try:
        return config, Config(method=method, rounds=config.rounds, **given).has_probe_rounds
    except ConfigError:  # probe options its method's runs cannot take: no probe round to cost
        return config, False


def _method_round(variant: Config, vit: torch.nn.Module, counting_vit: torch.nn.Module, method: str,
                  samples_per_client: int, num_classes: int, probe_samples: int | None,
                  probe_round: bool = False) -> dict:
    """One client's costs in a round of `method` (or in one of its probe rounds), scaled to `samples_per_client`."""
    # Counting: samples per phase do not depend on the batch size, so one batch per epoch (seconds, not minutes).
    counting = TrainSettings.from_config(variant, batch_size=samples_per_client, mean_samples=samples_per_client)
    # Two epochs of each phase at most: the second one's batches meet the optimiser's state, as a run's do.
    probing = TrainSettings.from_config(variant, local_epochs=min(variant.local_epochs, 2),
                                        split_epochs=min(variant.split_epochs, 2), mean_samples=samples_per_client)
    counting_config = variant.replace(model=COUNTING_MODEL, image_size=COUNTING_SIZE, pool_tokens=0, client_blocks=0,
                                      shared_rows="once")  # (which forward-only without blocks needs; no sample count moves)
    _, full = _round(counting_config, counting_vit, method, samples_per_client, num_classes, counting, probe_round)
    probe = min(probe_samples or probe_size(variant, pruned="prune" in full), samples_per_client)
    measured, probed = _round(variant, vit, method, probe, num_classes, probing, probe_round)
    return _scaled(measured, {phase: full[phase] / probed[phase] for phase in probed})


def fake_vit(model: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """The architecture with fake weights (shapes and dtypes, no values, no memory): what it computes is
    counted (FLOPs, the bytes of its messages, the memory its tensors would take) without being done."""
    # The prompts and a client's private classifier stay real (their own code makes them; kilobytes): an in-place
    # update of them by a fake operand is dropped, which changes no count (tests/test_cost.py holds every count
    # equal to a real round's).
    with torch.device("meta"):
        vit = create_vit(model, num_classes, image_size, "none")
    with FakeTensorMode(allow_non_fake_inputs=True):  # the data, labels and generators stay real
        return vit.to_empty(device="cpu")


def probe_size(config: Config, pruned: bool) -> int:
    """Samples enough for a full batch in every phase, so peak memory is measured at --batch-size: one
    batch, or enough that pruning keeps one."""
    return math.ceil(config.batch_size / config.keep_ratio) if pruned else config.batch_size


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
    for name, r in _shared_probe_rounds(results).items():
        flops_ratio = bytes_ratio = "—"
        if reference:
            flops_ratio = f"{100 * r['client_flops'] / reference['client_flops']:.3g} %"
            total = r["bytes_up"] + r["bytes_down"]
            bytes_ratio = f"{total / (reference['bytes_up'] + reference['bytes_down']):.3g}×"
        lines.append(f"| {name} | {r['client_flops'] / 1e9:,.1f} | {r['server_flops'] / 1e9:,.1f} "
                     f"| {r['bytes_up'] / 1e6:,.1f} | {r['bytes_down'] / 1e6:,.1f} "
                     f"| {r['client_peak_memory_bytes'] / 2**20:,.1f} | {flops_ratio} | {bytes_ratio} |")
    return "\n".join(lines) + "\n"


def _shared_probe_rounds(results: dict[str, dict]) -> dict[str, dict]:
    """`results` with the probe rounds that cost the same (SFPrompt's variants differ in their own rounds only) in
    one row, "sfprompt, sfprompt-no-pruning: a probe round", where the first of them was."""
    suffix, rows = f": {PROBE_ROUND}", {}
    sharing: dict[str, list[str]] = {}  # a probe round's first row -> the methods whose probe rounds cost the same
    for name, costs in results.items():
        same = next((row for row in sharing if rows[row] == costs), None) if name.endswith(suffix) else None
        if same is not None:
            sharing[same].append(name.removesuffix(suffix))
            continue
        rows[name] = costs
        if name.endswith(suffix):
            sharing[name] = [name.removesuffix(suffix)]
    return {", ".join(sharing[name]) + suffix if name in sharing else name: costs for name, costs in rows.items()}
