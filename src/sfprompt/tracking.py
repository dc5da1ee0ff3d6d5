"""Experiment tracking: a run's config and each round's measurements, also written where a tracker shows them
(`--tracker tensorboard`: TensorBoard's event files in the run's folder, `tensorboard --logdir runs`;
`--tracker wandb`: a Weights & Biases run in offline mode in the run's folder, `wandb sync` to upload it;
`--tracker mlflow`: an MLflow run in a SQLite store in the run's folder, `mlflow ui` to view it). The
run's own files stay the record; a tracker is a view of them, so it never changes a run's numbers. Once a run has
ended, a tracker also shows its pictures (those of `sfprompt plot`, drawn into the run's folder).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from .config import Config, ConfigError

# What each round's record adds to a tracker: the scalar, and how it is shown (cumulative costs beside the
# per-round ones, so that accuracy can be read against what was spent).
SCALARS = {"accuracy": "accuracy/test", "loss": "loss/test", "train_loss": "loss/train", "local_loss": "loss/local"}
COSTS = {"bytes_up": ("cost/MB_up", 1e6), "bytes_down": ("cost/MB_down", 1e6),
         "client_flops": ("cost/client_GFLOP", 1e9), "server_flops": ("cost/server_GFLOP", 1e9)}


class Scalars:
    """What each round's record shows in a tracker, by tag: its own values, and the costs summed over the rounds so
    far (from `history`, a resumed run's rounds before this process)."""

    def __init__(self, history: list[dict]) -> None:
        self.spent = {key: sum(record[key] for record in history) for key in COSTS}

    def __call__(self, record: dict) -> dict[str, float]:
        # a test accuracy read through the tail a refit round then replaces (the record's stale_tail): its own series
        stale = "_stale_tail" if record.get("stale_tail") else ""
        shown = {tag + (stale if key in ("accuracy", "loss") else ""): record[key] for key, tag in SCALARS.items()
                 if record.get(key) is not None}
        for key, (tag, scale) in COSTS.items():
            self.spent[key] += record[key]
            shown[tag + "_per_round"] = record[key] / scale
            shown[tag + "_cumulative"] = self.spent[key] / scale
        shown["cost/client_peak_MiB"] = record["client_peak_memory_bytes"] / 2**20
        return shown


class Tracker:
    """What every tracker does once a run has ended: draws the run's pictures (`sfprompt plot`, into its folder) and
    shows them beside its numbers."""

    def ended(self, out: Path) -> None:
        from .compare import plot_runs

        self.pictures(plot_runs([out], out))

    def pictures(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def close(self, status: str = "finished") -> None:
        """Ends the tracker's run as the run ended: "finished", "failed" (an error) or "killed" (stopped by hand,
        to be resumed)."""
        raise NotImplementedError


class TensorBoard(Tracker):
    """TensorBoard's event files under `out/tensorboard`, through PyTorch's writer (no server, nothing sent)."""

    def __init__(self, config: Config, out: Path, history: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # PyTorch's writer needs the tensorboard package
            raise ConfigError("--tracker tensorboard needs TensorBoard: pip install -e '.[track]'") from None

        # purge_step: a resumed run drops what a killed one logged after its last checkpoint, so no round shows twice
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=len(history) + 1 if history else None)
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```", 0)
        self.scalars = Scalars(history)

    def round(self, record: dict) -> None:
        for tag, value in self.scalars(record).items():
            self.writer.add_scalar(tag, value, record["round"])
        self.writer.flush()

    def pictures(self, paths: list[Path]) -> None:
        from matplotlib.image import imread

        for path in paths:
            self.writer.add_image(f"plots/{path.stem}", imread(path)[..., :3], dataformats="HWC")

    def close(self, status: str = "finished") -> None:
        self.writer.close()


class WandB(Tracker):
    """A Weights & Biases run in offline mode under `out/wandb` (nothing sent; `wandb sync` uploads it later), named
    after the run's folder. A resumed run continues the same W&B run (its id is kept in `out/wandb/run-id`)."""

    def __init__(self, config: Config, out: Path, history: list[dict]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--tracker wandb needs Weights & Biases: pip install -e '.[track]'") from None

        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "run-id"
        run_id = saved.read_text().strip() if history and saved.is_file() else uuid.uuid4().hex[:12]
        saved.write_text(run_id + "\n")
        self.run = wandb.init(project="sfprompt", name=out.name, id=run_id, resume="allow", dir=str(out),
                              config=config.to_dict(), mode="offline",
                              settings=wandb.Settings(silent=True, console="off"))
        self.scalars = Scalars(history)

    def round(self, record: dict) -> None:
        self.run.log(self.scalars(record), step=record["round"])

    def pictures(self, paths: list[Path]) -> None:
        import wandb

        self.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in paths})

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflow(Tracker):
    """An MLflow run in a SQLite store inside the run's folder (`out/mlflow/mlflow.db`, artifacts beside it; `mlflow ui
    --backend-store-uri sqlite:///RUN/mlflow/mlflow.db` shows it): nothing leaves the machine, and nothing global is
    set (the client names its store). The config goes in as the run's parameters and as `config.json`. A resumed run
    continues the same MLflow run (its id is kept in `out/mlflow/run-id`)."""

    def __init__(self, config: Config, out: Path, history: list[dict]) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--tracker mlflow needs MLflow: pip install -e '.[track]'") from None

        self.scalars = Scalars(history)
        folder = (out / "mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        saved = folder / "run-id"
        if history and saved.is_file():
            self.run_id = saved.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")  # it ended killed or failed: it goes on
            return
        experiment = self.client.get_experiment_by_name("sfprompt")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            "sfprompt", artifact_location=(folder / "artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        saved.write_text(self.run_id + "\n")
        options = config.to_dict()
        self.client.log_batch(self.run_id, params=[Param(key, json.dumps(value)) for key, value in options.items()])
        self.client.log_text(self.run_id, json.dumps(options, indent=2), "config.json")

    def round(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, record["round"])
                                                    for tag, value in self.scalars(record).items()])

    def pictures(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())  # MLflow's FINISHED, FAILED, KILLED


class NoTracker:
    def round(self, record: dict) -> None:
        pass

    def ended(self, out: Path) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


BY_NAME = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_tracker(config: Config, out: Path, history: list[dict]) -> TensorBoard | WandB | MLflow | NoTracker:
    """The tracker `config.tracker` names, for a run in `out` that has `history` already (a resumed one)."""
    return BY_NAME[config.tracker](config, out, history) if config.tracker in BY_NAME else NoTracker()
