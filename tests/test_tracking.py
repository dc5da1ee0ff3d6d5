"""--tracker tensorboard, wandb and mlflow show what the run's own files record, and `sfprompt plot` draws runs side by
side."""

import json

import pytest

from sfprompt.cli import main

from conftest import TINY_RUN

TINY = [*TINY_RUN, "--no-progress", "--rounds", "2"]


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def test_tensorboard_shows_the_config_and_every_round_as_the_metrics_record_them(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--tracker", "tensorboard", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shown, events = scalars(out)
    assert [step for step, _ in shown["accuracy/test"]] == [1, 2]
    assert [round(value, 6) for _, value in shown["accuracy/test"]] == [round(r["accuracy"], 6) for r in records]
    spent = records[0]["bytes_up"] + records[1]["bytes_up"]
    assert abs(shown["cost/MB_up_cumulative"][-1][1] - spent / 1e6) < 1e-3
    assert '"tracker": "tensorboard"' in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "plots/accuracy_vs_bytes" in events.Tags()["images"]  # the run's pictures, drawn into its folder too
    assert (out / "accuracy_vs_bytes.png").is_file()


def test_a_resumed_run_shows_each_round_once(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--tracker", "tensorboard", "--out", str(out)]) == 0
    assert main(["run", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    shown, _ = scalars(out)
    assert [step for step, _ in shown["accuracy/test"]] == [1, 2]


def test_plot_draws_runs_side_by_side_and_refuses_what_is_not_a_run(tmp_path, capsys):
    for method in ("sfprompt", "linear-probe"):
        assert main(["run", *TINY, "--rounds", "1", "--method", method, "--out", str(tmp_path / method)]) == 0
    pictures = tmp_path / "pictures"
    assert main(["plot", str(tmp_path / "sfprompt"), str(tmp_path / "linear-probe"), "--out", str(pictures)]) == 0
    assert sorted(p.name for p in pictures.iterdir()) == ["accuracy_per_round.png", "accuracy_vs_bytes.png",
                                                         "accuracy_vs_client_flops.png", "client_flops.png"]
    assert main(["plot", str(tmp_path / "sfprompt")]) == 0  # one run: its own folder
    assert (tmp_path / "sfprompt" / "accuracy_vs_bytes.png").is_file()
    assert main(["plot", str(tmp_path / "pictures")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_wandb_keeps_an_offline_run_in_the_run_folder_and_a_resumed_run_continues_it(tmp_path):
    """--tracker wandb: nothing is sent (offline mode); the run's W&B log, in its folder, holds the config and every
    round's scalars, and a resumed run logs to the same W&B run id."""
    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--tracker", "wandb", "--out", str(out)]) == 0
    run_id = (out / "wandb" / "run-id").read_text().strip()
    assert main(["run", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    assert (out / "wandb" / "run-id").read_text().strip() == run_id
    logs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # one offline log per process, one W&B run: `wandb sync` joins them
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, resumed = (log.read_bytes() for log in logs)
    assert b"accuracy/test" in first and b"cost/MB_up_cumulative" in first and b'"wandb"' in first
    assert json.dumps(records[0]["accuracy"]).encode() in first and json.dumps(records[1]["accuracy"]).encode() in resumed
    assert b"plots/accuracy_vs_bytes" in resumed  # the run's pictures, once it has ended


def test_mlflow_keeps_a_run_in_the_run_folder_and_a_resumed_run_continues_it(tmp_path):
    """--tracker mlflow: the config as the run's parameters, every round's scalars by step, in a SQLite store inside
    the run folder; a resumed run logs its later rounds to the same MLflow run."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    assert main(["run", *TINY, "--rounds", "1", "--tracker", "mlflow", "--out", str(out)]) == 0
    assert main(["run", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "sfprompt"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == (out / "mlflow" / "run-id").read_text().strip() and run.info.status == "FINISHED"
    assert json.loads(run.data.params["tracker"]) == "mlflow" and json.loads(run.data.params["rounds"]) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shown = client.get_metric_history(run.info.run_id, "accuracy/test")
    assert [(m.step, round(m.value, 6)) for m in shown] == [(r["round"], round(r["accuracy"], 6)) for r in records]
    spent = client.get_metric_history(run.info.run_id, "cost/MB_up_cumulative")[-1].value
    assert abs(spent - sum(r["bytes_up"] for r in records) / 1e6) < 1e-3
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/accuracy_vs_bytes.png"}


def test_a_run_that_fails_is_marked_failed_in_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sfprompt import runner

    def fails(*args, **kwargs):
        raise runner.RoundFailed("every client dropped")

    monkeypatch.setattr(runner, "_round", fails)
    out = tmp_path / "run"
    assert main(["run", *TINY, "--tracker", "mlflow", "--out", str(out)]) == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    assert client.get_run((out / "mlflow" / "run-id").read_text().strip()).info.status == "FAILED"


def test_a_run_stopped_by_hand_is_killed_in_mlflow_and_running_again_once_resumed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sfprompt import runner

    out, rounds = tmp_path / "run", runner._round

    def stopped(fed, method, executor, round_, *args):
        if round_ == 2:
            raise KeyboardInterrupt
        return rounds(fed, method, executor, round_, *args)

    monkeypatch.setattr(runner, "_round", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["run", *TINY, "--tracker", "mlflow", "--out", str(out)])
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    run_id = (out / "mlflow" / "run-id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(runner, "_round", rounds)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "accuracy/test")] == [1, 2]
