"""Experiment tracking: a run's config and each round's measurements, also written where a tracker shows them
(`--tracker tensorboard`: TensorBoard's event files in the run's folder, `tensorboard --logdir runs`). The run's
own files stay the record; a tracker is a view of them, so it never changes a run's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError

# What each round's record adds to a tracker: the scalar, and how it is shown (cumulative costs beside the
# per-round ones, so that accuracy can be read against what was spent).
SCALARS = {"accuracy": "accuracy/test", "loss": "loss/test", "train_loss": "loss/train", "local_loss": "loss/local"}
COSTS = {"bytes_up": ("cost/MB_up", 1e6), "bytes_down": ("cost/MB_down", 1e6),
         "client_flops": ("cost/client_GFLOP", 1e9), "server_flops": ("cost/server_GFLOP", 1e9)}


class TensorBoard:
    """TensorBoard's event files under `out/tensorboard`, through PyTorch's writer (no server, nothing sent)."""

    def __init__(self, config: Config, out: Path, history: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # PyTorch's writer needs the tensorboard package
            raise ConfigError("--tracker tensorboard needs TensorBoard: pip install -e '.[track]'") from None

        # purge_step: a resumed run drops what a killed one logged after its last checkpoint, so no round shows twice
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=len(history) + 1 if history else None)
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```", 0)
        self.spent = {key: sum(record[key] for record in history) for key in COSTS}

    def round(self, record: dict) -> None:
        step = record["round"]
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        for key, (tag, scale) in COSTS.items():
            self.spent[key] += record[key]
            self.writer.add_scalar(tag + "_per_round", record[key] / scale, step)
            self.writer.add_scalar(tag + "_cumulative", self.spent[key] / scale, step)
        self.writer.add_scalar("cost/client_peak_MiB", record["client_peak_memory_bytes"] / 2**20, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoTracker:
    def round(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(config: Config, out: Path, history: list[dict]) -> TensorBoard | NoTracker:
    """The tracker `config.tracker` names, for a run in `out` that has `history` already (a resumed one)."""
    return TensorBoard(config, out, history) if config.tracker == "tensorboard" else NoTracker()
