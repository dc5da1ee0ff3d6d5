"""The round loop, the same for every method and every runtime, and the results it writes.

Sampling, aggregation (the method's: FedAvg but for linear-probe), evaluation, metrics, checkpoints and resuming live here once; a
method (`methods/`) chooses its trainable state and its clients' phases, and a runtime
(`inprocess.InProcessRuntime`, `flower.server_app.FlowerRuntime`) runs the clients' work.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from safetensors.torch import save
from tqdm.auto import tqdm

from . import __version__, checkpoint
from .aggregate import FedAvg, configured_aggregator
from .codec import Message
from .config import Config, ConfigError, saved_options
from .defence import privacy_notice
from .federation import Federation, prepare
from .inprocess import InProcessRuntime
from .machine import processor
from .methods import Method
from .model import SplitViT
from .predict import logits_of
from .runs import own_folder
from .tracking import open_tracker


class Runtime(Protocol):
    """Where the clients' work of a round runs: this process (`InProcessRuntime`) or a Flower federation.

    `train` returns the uploads of the clients that finished, in the order given, and a record of
    each one dropped (`ClientFailure.record()`: client, phase, reason), with every byte and FLOP
    counted on `federation.meter`; the body server forgets a dropped client. Under secure aggregation the
    server never holds a single client's upload: `train` then returns one message, the uploads' average weighted
    by their samples, whose meta says how many clients it `aggregates`. `end_round` lets the
    body server fold its round in; `close` releases what the runtime holds (sockets, the body server's thread).
    """

    def train(self, round_: int, cids: list[int], global_params: torch.nn.Module) -> tuple[list[Message], list[dict]]: ...

    def end_round(self) -> None: ...

    def close(self) -> None: ...


def run(config: Config, progress: bool = True, log: Callable[[str], None] | None = None,
        runtime: Callable[[Federation], Runtime] | None = None, resume: bool = False) -> dict:
    """Run `config.method` as `config` says; write metrics, summary and checkpoint to `config.out`.

    The clients' work runs in this process unless `runtime` builds another (see `flower.server_app`).
    With `resume`, the run continues after the last round checkpointed in `config.out` (up to
    `config.rounds`), with the results it would have had without the interruption.
    """
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    started = time.perf_counter()
    fed = prepare(own_folder(config, resume=resume))
    executor = runtime(fed) if runtime else InProcessRuntime(fed, progress)
    try:
        return _run(fed, executor, log, started, resume)
    finally:
        executor.close()


def run_or_reuse(config: Config, progress: bool = True) -> dict:
    """`run`, for benchmarks that run many configs and may be stopped at any time: a run already finished in
    `config.out` with this very config is not redone, one interrupted after a checkpoint continues, and a
    folder holding anything else is run afresh."""
    if not config.out:
        raise ValueError("run_or_reuse needs the run's folder (config.out): it reuses what is there")
    out = Path(config.out)
    same = (out / "config.json").is_file() and _comparable(_as_run(json.loads((out / "config.json").read_text()))) \
        == _comparable(config.to_dict())
    if same and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    return run(config, progress=progress, resume=same and (out / "checkpoint.safetensors").is_file())


def _run(fed: Federation, executor: Runtime, log: Callable[[str], None], started: float, resume: bool) -> dict:
    config, method = fed.config, fed.method
    sampler = np.random.default_rng(config.seed)
    out = Path(config.out)
    aggregator = configured_aggregator(config)
    if resume:
        global_params, history = _restore(fed, sampler, out, aggregator)
        started -= sum(record.get("seconds", 0.0) for record in history)  # wall_seconds: the earlier sessions' rounds
    else:
        global_params, history = method.stage(1, config).new_params(fed.model).to(fed.device), []

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    log(f"sfprompt {__version__}, method {method.name}: {fed.description}")
    log("config: " + json.dumps(config.to_dict()))
    log(privacy_notice(config))
    if resume:
        log(f"resuming {out} after round {len(history)}")

    _write_text(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))
    tracker, status = open_tracker(config, out, history), "failed"
    try:
        summary = _rounds(fed, executor, log, started, out, history, global_params, sampler, aggregator, tracker)
        status = "finished"
        try:
            tracker.ended(out)
        except Exception as err:  # a tracker is a view of the run, which stands without it
            log(f"the tracker could not show the run's pictures: {type(err).__name__}: {err}")
        return summary
    except KeyboardInterrupt:  # stopped by hand: resumable
        status = "killed"
        raise
    finally:
        try:
            tracker.close(status)
        except Exception as err:
            log(f"the tracker could not end its run: {type(err).__name__}: {err}")


def _rounds(fed: Federation, executor: Runtime, log: Callable[[str], None], started: float, out: Path,
            history: list[dict], global_params: torch.nn.Module, sampler: np.random.Generator, aggregator,
            tracker) -> dict:
    """The run's rounds after `history` (each recorded, checkpointed and shown in `tracker` as it ends), then its
    summary."""
    config, method = fed.config, fed.method
    with open(out / "metrics.jsonl", "a") as metrics_file:
        for round_ in range(len(history) + 1, config.rounds + 1):
            stage = method.stage(round_, config)  # the method, or the probe rounds it opens or closes with
            if _stage_changes(method, round_, config):
                global_params = stage.carry(fed.model, global_params)
            sampled = _sampled(sampler, config, round_)
            record = _round(fed, stage, executor, round_, sampled, global_params, aggregator, log)
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            _persist(fed, out, history, global_params, sampler, aggregator)
            tracker.round(record)
            evaluated = ("not evaluated" if record["accuracy"] is None
                         else f"accuracy {record['accuracy']:.4f}  loss {record['loss']:.4f}")
            if record["stale_tail"]:  # set on evaluated rounds only
                evaluated += " (through the tail trained beside the prompts; the refit rounds fit it to them)"
            measured = [a for a in record.get("client_accuracy") or [] if a is not None]
            if measured:  # a client too small to hold a sample out has none
                evaluated += f"  clients' held-out accuracy: mean {np.mean(measured):.4f}, worst {min(measured):.4f}"

            log(f"round {round_}/{config.rounds}: {evaluated}  "
                f"up {record['bytes_up'] / 1e6:.1f} MB  down {record['bytes_down'] / 1e6:.1f} MB  "
                f"client {record['client_flops'] / 1e9:.1f} GFLOP  server {record['server_flops'] / 1e9:.1f} GFLOP  "
                f"({record['seconds']:.0f} s)")

    if history[-1]["accuracy"] is None:  # resumed to end at a round --eval-every skipped: evaluate it now
        stage = method.stage(len(history), config)
        history[-1]["accuracy"], history[-1]["loss"] = evaluate(stage, fed.model, global_params, fed.test,
                                                                config.batch_size, fed.device, config.seed)
        if config.client_holdout:
            history[-1]["client_accuracy"] = held_out_accuracy(fed, stage, global_params)
        _write_text(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))
        _persist(fed, out, history, global_params, sampler, aggregator)  # the checkpoint's metrics hold it too
    summary = summarise(config, history, time.perf_counter() - started, fed.device)
    _write_json(out / "summary.json", summary)
    log(f"final accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}); "
        f"results in {out}")  # as given, so a log kept beside them names no machine's folders
    return summary


def play_rounds(fed: Federation, executor: Runtime, log: Callable[[str], None],
                last: int | None = None, records: list[dict] | None = None) -> torch.nn.Module:
    """The global params after round `last` (by default the probe rounds the run opens with; 0: none), played as
    `run` plays them (the same clients sampled, the same seeds, the same carry between stages), carried into the
    stage of the round after it: those the next round starts from. Each round's metrics record is appended to
    `records`, if given."""
    config, method = fed.config, fed.method
    if last is None:
        last = config.probe_rounds
    global_params = method.stage(1, config).new_params(fed.model).to(fed.device)
    sampler = np.random.default_rng(config.seed)
    aggregator = configured_aggregator(config)
    for round_ in range(1, last + 2):
        if _stage_changes(method, round_, config):
            global_params = method.stage(round_, config).carry(fed.model, global_params)
        if round_ > last:
            break
        stage = method.stage(round_, config)
        sampled = _sampled(sampler, config, round_)
        record = _round(fed, stage, executor, round_, sampled, global_params, aggregator, log)
        if records is not None:
            records.append(record)
        log(f"round {round_} ({stage.name}) played" + ("" if record["accuracy"] is None
                                                        else f": accuracy {record['accuracy']:.4f}"))
    return global_params


def _stage_changes(method: Method, round_: int, config: Config) -> bool:
    """Whether `round_` opens a stage other than the previous round's (the method's own rounds after its probe
    rounds), so that the global params are carried into the new stage's."""
    return round_ > 1 and type(method.stage(round_, config)) is not type(method.stage(round_ - 1, config))


def _sampled(sampler: np.random.Generator, config: Config, round_: int) -> list[int]:
    """A round's clients, drawn as every run draws them: --clients-per-round of them, and in a probe round as many
    more as --probe-clients asks, drawn from a generator of that round's own, so that every later round draws the
    clients it would draw without them."""
    drawn = sampler.choice(config.clients, config.clients_per_round, replace=False)
    more = config.probe_clients - config.clients_per_round if config.is_probe_round(round_) else 0
    if more:
        others = np.setdiff1d(np.arange(config.clients), drawn)
        apart = np.random.default_rng([config.seed, round_])
        drawn = np.concatenate([drawn, apart.choice(others, more, replace=False)])
    return sorted(drawn.tolist())


def _round(fed: Federation, method: Method, executor: Runtime, round_: int, sampled: list[int],
           global_params: torch.nn.Module, aggregator: FedAvg, log: Callable[[str], None]) -> dict:
    """One round of `method` (the run's, or a probe stage it opens or closes with): the sampled clients train,
    their valid uploads are aggregated into `global_params` (in place, by `aggregator`), and the result is
    evaluated; returns the round's metrics record."""
    config = fed.config
    started = time.perf_counter()
    if method.sequential:  # each client starts from the previous one's (validated) result, no averaging
        updates, dropped = [], []
        for cid in sampled:
            done, failed = _valid_updates(*executor.train(round_, [cid], global_params), global_params)
            updates, dropped = updates + done, dropped + failed
            if done:
                global_params.load_state_dict(done[-1].tensors)
    else:
        updates, dropped = _valid_updates(*executor.train(round_, sampled, global_params), global_params)
    for failure in dropped:
        log(f"round {round_}: dropped client {failure['client']} (phase {failure['phase']}): {failure['reason']}")
    finished = sum(u.meta.get("aggregates", 1) for u in updates)  # a securely aggregated upload sums several
    if finished < config.min_clients:
        raise RoundFailed(f"round {round_}: {finished} of {len(sampled)} clients finished, fewer than "
                          f"--min-clients {config.min_clients}; nothing was aggregated, and `sfprompt run "
                          f"--resume {config.out}` retries the round")
    executor.end_round()
    weights = [u.meta["num_examples"] for u in updates]
    if not method.sequential:
        global_params.load_state_dict(method.aggregate(global_params.state_dict(), [u.tensors for u in updates], weights,
                                                       aggregator))
    accuracy = loss = client_accuracy = None  # not evaluated this round (--eval-every)
    if round_ % config.eval_every == 0 or round_ == config.rounds:
        accuracy, loss = evaluate(method, fed.model, global_params, fed.test, config.batch_size, fed.device, config.seed)
        client_accuracy = held_out_accuracy(fed, method, global_params)
    return {
        "round": round_,
        "stage": method.name,  # the run's method, or linear-probe in the rounds it opens or closes with
        "accuracy": accuracy,
        "loss": loss,
        # its accuracy read through the tail that the refit rounds then replace
        "stale_tail": accuracy is not None and config.reads_a_stale_tail(round_),
        "train_loss": weighted_mean([u.meta["train_loss"] for u in updates], weights),
        "local_loss": weighted_mean([u.meta.get("local_loss") for u in updates], weights),  # None: no local phase
        **fed.meter.take(),
        "clients": sampled,
        "dropped": dropped,
        "kept_samples": sum(u.meta["kept"] for u in updates),
        **({"client_accuracy": client_accuracy} if config.client_holdout else {}),
        "seconds": time.perf_counter() - started,
    }


def _persist(fed: Federation, out: Path, history: list[dict], global_params: torch.nn.Module,
             sampler: np.random.Generator, aggregator: FedAvg) -> None:
    """After a round: the user's model file and the checkpoint `--resume` continues from (nothing lost
    on a crash)."""
    config, round_ = fed.config, len(history)
    body = fed.model.body if config.train_body else None
    save_checkpoint(out / "global.safetensors", global_params, config, round_, fed.data.classes, body)
    checkpoint.save(out, checkpoint.RunState(
        round_, config.to_dict(), history, sampler.bit_generator.state, torch.get_rng_state(),
        global_params.state_dict(), {c.cid: c.state_dict() for c in fed.clients if c.has_state},
        body.state_dict() if body is not None else None, aggregator.state_dict()))


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


# What may differ between a run and its resumption: how long it runs, where, on which device, and what shows it.
RESUMABLE_CHANGES = ("rounds", "device", "out", "tracker")


def _comparable(options: dict) -> dict:
    """A run's options less those that do not change its numbers (a tracker only shows them)."""
    return {key: value for key, value in options.items() if key != "tracker"}


def _as_run(saved: dict) -> dict:
    """A run's saved options, with any option added to sfprompt after the run began read as the run had it
    (`config.saved_options`)."""
    return Config().to_dict() | saved_options(saved)


def _restore(fed: Federation, sampler: np.random.Generator, out: Path,
             aggregator: FedAvg) -> tuple[torch.nn.Module, list[dict]]:
    """Load the last checkpoint in `out` into this run's state (the aggregator's too); returns the global params
    (of the stage its last round ran) and the metrics so far."""
    state = checkpoint.load(out)
    saved, current = _as_run(state.config), fed.config.to_dict()
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        raise ConfigError(f"{out} was run with other options ({', '.join('--' + k.replace('_', '-') for k in changed)}); "
                          f"a resumed run may only change {', '.join('--' + k for k in RESUMABLE_CHANGES)}")
    if state.round > fed.config.rounds:
        raise ConfigError(f"{out} already completed {state.round} rounds; pass --rounds {state.round} or more")
    if saved["refit_rounds"] and saved["rounds"] != fed.config.rounds:
        raise ConfigError(f"{out} closes with its last {saved['refit_rounds']} rounds (--refit-rounds): another "
                          f"--rounds would move them; resume it with --rounds {saved['rounds']}, or start a new run")
    global_params = fed.method.stage(state.round, fed.config).new_params(fed.model).to(fed.device)
    global_params.load_state_dict(state.params)
    for cid, kept in state.clients.items():
        fed.clients[cid].load_state_dict(kept)
    if state.body is not None:
        fed.model.body.load_state_dict(state.body)
    aggregator.load_state_dict(state.aggregator)
    sampler.bit_generator.state = state.sampler
    torch.set_rng_state(state.torch_rng)
    return global_params, state.history


def held_out_accuracy(fed: Federation, method: Method, params: torch.nn.Module) -> list[float | None] | None:
    """The global model's accuracy on each client's held-out samples (--client-holdout; None without it, and for a
    client with none held out): a measurement of the simulation, like the test accuracy, not a protocol step."""
    if not fed.config.client_holdout:
        return None
    return [evaluate(method, fed.model, params, Subset(fed.train, held.tolist()), fed.config.batch_size, fed.device,
                     fed.config.seed)[0] if len(held) else None for held in fed.holdouts]


@torch.no_grad()
def evaluate(method: Method, model: SplitViT, params: torch.nn.Module, data, batch_size: int,
             device: torch.device, seed: int = 0) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of the full model on `data` (not a protocol step),
    with the privacy defence applied as a client using the model would apply it (seeded by `seed`)."""
    correct, loss, seen = 0, 0.0, 0
    forward = functools.partial(method.logits, model, params)
    for logits, labels in logits_of(forward, data, batch_size, device, seed):
        labels = labels.to(device)
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        seen += len(labels)
    return correct / seen, loss / seen


def summarise(config: Config, history: list[dict], wall_seconds: float, device: torch.device) -> dict:
    def total(key: str) -> int:
        return sum(record[key] for record in history)

    evaluated = [record for record in history if record["accuracy"] is not None]

    return {
        "method": config.method,
        "config": config.to_dict(),
        "final_accuracy": evaluated[-1]["accuracy"],  # the last round is always evaluated (`_run`)
        "best_accuracy": max(record["accuracy"] for record in evaluated),
        "rounds": len(history),
        "bytes_up": total("bytes_up"),
        "bytes_down": total("bytes_down"),
        "client_flops": total("client_flops"),
        "server_flops": total("server_flops"),
        "client_peak_memory_bytes": max(record["client_peak_memory_bytes"] for record in history),
        "wall_seconds": wall_seconds,
        "threads": torch.get_num_threads(),  # the same seed gives slightly different numbers with another count
        "processor": processor(device),  # and on another processor
        "versions": versions(),
    }


def save_checkpoint(path: Path, params: torch.nn.Module, config: Config, round_: int, classes: list[str],
                    body: torch.nn.Module | None = None) -> None:
    """The global trainable state (and the body, when it trains), with its config and class names, so
    that `predict.load_run` rebuilds the model from this file alone (write, then rename)."""
    state = {name: t.detach().cpu().contiguous() for name, t in params.state_dict().items()}
    if body is not None:
        state |= {f"body.{name}": t.detach().cpu().contiguous() for name, t in body.state_dict().items()}
    checkpoint.write_atomically(path, save(state, metadata={"config": json.dumps(config.to_dict()), "round": str(round_),
                                                            "classes": json.dumps(classes)}))


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"sfprompt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "platform": platform.platform()}


def weighted_mean(values: list[float | None], weights: list[int]) -> float | None:
    """Weighted mean of what clients reported; None when a phase did not run."""
    if any(v is None for v in values):
        return None
    return float(np.average(values, weights=weights))


def _write_json(path: Path, value: dict) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    checkpoint.write_atomically(path, text.encode())  # a reader (or a crash) never sees half a file
