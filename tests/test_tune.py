"""`python benchmarks/tune.py` at a tiny size: every grid point run on validation samples, each method's best
written where `sfprompt compare --method-options` reads it, the sweep resumable."""

import json
import tomllib

import pytest

from conftest import SHARED, needs_shared, run_python_benchmark
from sfprompt.compare import load_method_options

@pytest.mark.slow
@needs_shared
def test_the_sweep_picks_each_methods_best_on_validation_samples(tmp_path):
    setting = tmp_path / "setting.toml"
    setting.write_text('dataset = "fashion-mnist"\nimage-size = 28\nclients = 2\nclients-per-round = 2\n'
                       'train-samples = 40\ntest-samples = 20\nrounds = 1\n')
    files = {"--tuned": tmp_path / "tuned.toml", "--report": tmp_path / "tuning.md"}
    args = ["--shared", str(SHARED), "--config", str(setting), "--methods", "sfl,sfl-train-body",
            "--validation-samples", "10", "--out", str(tmp_path / "runs"), "--no-progress",
            *[str(part) for pair in files.items() for part in pair]]
    done = run_python_benchmark("tune.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {name: sorted((tmp_path / "runs" / name).iterdir()) for name in ("sfl", "sfl-train-body")}
    assert [len(folders) for folders in runs.values()] == [4, 3]
    summaries = {name: [json.loads((f / "summary.json").read_text()) for f in folders] for name, folders in runs.items()}
    for summary in summaries["sfl"] + summaries["sfl-train-body"]:
        assert summary["config"]["validation_samples"] == 10
    tuned = tomllib.loads(files["--tuned"].read_text())
    best_sfl = max(summaries["sfl"], key=lambda s: s["final_accuracy"])
    assert tuned["sfl"]["lr"] == best_sfl["config"]["lr"] == tuned["sfl"]["prompt_lr"]
    for summary in summaries["sfl-train-body"]:  # tuned on top of sfl's best
        assert summary["config"]["train_body"] and summary["config"]["lr"] == tuned["sfl"]["lr"]
    best_body = max(summaries["sfl-train-body"], key=lambda s: s["final_accuracy"])
    assert tuned["sfl-train-body"] == {"backbone_lr": best_body["config"]["backbone_lr"]}
    assert load_method_options(files["--tuned"]) == tuned  # what compare --method-options takes
    table = files["--report"].read_text()
    assert table.count("| sfl |") == 4 and table.count("| sfl-train-body |") == 3 and sum("| **" in line for line in table.splitlines()) == 2
    again = run_python_benchmark("tune.py", *args)
    assert again.returncode == 0 and "round 1/1" not in again.stderr  # nothing redone
