"""The probe's benchmarks at a tiny size: the recipe comparison, the central comparison of the probe with
prompt tuning and full fine-tuning, and the study of how to fit a federated probe, each re-run from its
committed command, writing its document."""

import json

import pytest

from conftest import needs_shared, run_benchmark, run_python_benchmark

TINY = "--train-samples 40 --test-samples 20 --image-size 28"


@pytest.mark.slow
@needs_shared
def test_the_recipe_benchmark_runs_each_row_and_writes_its_report(tmp_path):
    doc = tmp_path / "recipe.md"
    done = run_benchmark("recipe.sh", tmp_path, SEEDS="0", SETTINGS="fashion-iid", DOC=str(doc),
                         ROWS="linear-probe linear-probe-all paper default-probe-5-float32 default",
                         SIZE=f"{TINY} --clients=6 --rounds 2")  # 5 a round, the default
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/recipe.sh`") and "### fashion-iid" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "seed" not in line
            and not line.startswith("|---")] == ["| linear-probe", "| linear-probe-all", "| paper",
                                                 "| default-probe-5-float32", "| default"]
    stages = [json.loads(line)["stage"] for line in
              (tmp_path / "runs" / "fashion-iid" / "default" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["linear-probe", "sfprompt"]
    every = json.loads((tmp_path / "runs" / "fashion-iid" / "linear-probe-all" / "seed-0" / "config.json").read_text())
    assert (every["method"], every["clients"], every["clients_per_round"]) == ("linear-probe", 6, 6)  # SIZE's clients
    paper = json.loads((tmp_path / "runs" / "fashion-iid" / "paper" / "seed-0" / "config.json").read_text())
    assert (paper["probe_rounds"], paper["lr"], paper["prompt_lr"], paper["wire_dtype"]) == (0, 0.01, 0.01, "float32")
    default, float32 = (json.loads((tmp_path / "runs" / "fashion-iid" / row / "seed-0" / "config.json").read_text())
                        for row in ("default", "default-probe-5-float32"))
    assert (default["wire_dtype"], default["shared_rows"], default["lr"], default["probe_clients"]) == (
        "float32", "once", 0.0003, 6)  # the probe round asks every client
    assert (float32["wire_dtype"], float32["shared_rows"], float32["probe_rounds"], float32["probe_clients"]) == (
        "float32", "per-sample", 1, 5)
    again = run_benchmark("recipe.sh", tmp_path, SEEDS="0 1", SETTINGS="fashion-iid", DOC=str(doc), TABLE_ONLY="1",
                          ROWS="paper linear-probe-float32 default")  # runs nothing: seed 1 and the -float32 row are not there
    assert again.returncode == 0 and " ..." not in again.stdout, again.stderr[-3000:]
    assert [line.split(" | ")[0] for line in doc.read_text().splitlines() if line.startswith("| ") and "seed" not in line
            and not line.startswith("|---")] == ["| paper", "| default"]


@pytest.mark.slow
@needs_shared
def test_the_recipe_tuning_grids_run_each_variant_on_validation_and_write_their_tables(tmp_path):
    doc = tmp_path / "tuning.md"
    unknown = run_benchmark("recipe.sh", tmp_path, TUNE="headline", VARIANTS="refit-nonsense", TUNE_DOC=str(doc))
    assert unknown.returncode == 2 and "unknown variant refit-nonsense" in unknown.stderr and not doc.exists()
    done = run_benchmark("recipe.sh", tmp_path, TUNE="headline", VARIANTS="refit-keep-1.0", TUNE_DOC=str(doc),
                         SIZE=f"{TINY} --clients 2 --clients-per-round 2 --rounds 3 --validation-samples 10")
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `TUNE=headline bash benchmarks/recipe.sh`") and "| refit-keep-1.0 | 0 | 3 |" in text
    config = json.loads((tmp_path / "runs" / "tune-headline" / "refit-keep-1.0" / "seed-0" / "config.json").read_text())
    assert (config["prompt_tokens"], config["keep_ratio"], config["prompt_lr"], config["lr"], config["refit_rounds"],
            config["validation_samples"]) == (50, 1.0, 0.01, 0.0003, 1, 10)
    listed = run_benchmark("recipe.sh", tmp_path, TUNE="1", DEADLINE="1", TUNE_DOC=str(doc))  # starts none
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [line.split("/tune/")[1] for line in listed.stdout.splitlines() if "not started" in line] == [
        f"lr-{lr}/seed-0: not started (DEADLINE passed)" for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01")]
    assert doc.read_text().startswith("Command: `TUNE=1 bash") and "(no runs)" in doc.read_text()


def test_the_recipe_benchmark_refuses_a_size_whose_clients_per_round_would_override_linear_probe_all(tmp_path):
    done = run_benchmark("recipe.sh", tmp_path, SEEDS="0", SETTINGS="default-iid", ROWS="paper linear-probe-all")
    assert done.returncode == 2 and "override linear-probe-all" in done.stderr  # conftest's SIZE asks 2 a round
    assert not (tmp_path / "runs").exists()
    assert run_benchmark("recipe.sh", tmp_path, SETTINGS="default-iid", ROWS="paper", TABLE_ONLY="1",
                         DOC=str(tmp_path / "recipe.md")).returncode == 0  # without that row the same SIZE is fine


@pytest.mark.slow
@needs_shared
def test_the_central_benchmark_trains_each_method_on_one_client_and_tables_the_gain_over_the_probe(tmp_path):
    doc = tmp_path / "central.md"
    done = run_benchmark("central.sh", tmp_path, SEEDS="0 1", DATASETS="fashion-mnist", SIZES="28", DOC=str(doc),
                         ROWS="probe prompts-10", SIZE="--train-samples 40 --test-samples 20 --rounds 1")
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/central.sh`")
    rows = [line for line in text.splitlines() if line.startswith("| fashion-mnist-28px")]
    assert len(rows) == 2 and "points" in rows[1] and "±" in rows[0]
    config = json.loads((tmp_path / "runs" / "fashion-mnist-28px" / "prompts-10" / "seed-0" / "config.json").read_text())
    assert (config["method"], config["clients"], config["split_epochs"]) == ("fl-prompt", 1, 1)


@pytest.mark.slow
@needs_shared
def test_the_probe_fit_study_writes_every_fit_for_both_partitions(tmp_path):
    done = run_python_benchmark("probe_fit.py", "--datasets", "fashion-mnist", "--seeds", "0", "--train-samples",
                                "200", "--test-samples", "40", "--image-size", "28", "--out", str(tmp_path),
                                "--doc", str(tmp_path / "probe-fit.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["fashion-mnist"]["0"]
    assert set(results) == {"central", "iid", "dirichlet-0.5"}
    assert all(len(curve) == 5 for curve in results["iid"].values())
    assert "closed form, accumulated (linear-probe)" in (tmp_path / "probe-fit.md").read_text()


def test_the_wire_probe_benchmark_fits_the_probe_in_every_format(tmp_path):
    """`python benchmarks/wire_probe.py` at a tiny size (a random ViT): every format up and down, a row each."""
    doc = tmp_path / "wire-probe.md"
    done = run_python_benchmark("wire_probe.py", "--out", str(tmp_path / "out"), "--doc", str(doc), "--options",
                                "--model test_vit --weights none --train-samples 60 --test-samples 20 --image-size 32")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 14 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert {(r["up"], r["down"]) for r in rows} >= {("float32", "int8"), ("int8", "float32"), ("float32", "float32")}
    assert doc.read_text().startswith("Command: `python benchmarks/wire_probe.py`")


def test_the_probe_precision_study_fits_each_prompt_count_three_ways(imagefolder, tmp_path):
    doc = tmp_path / "probe-precision.md"
    options = {"dataset": "imagefolder", "data_dir": str(imagefolder), "model": "test_vit", "weights": "none",
               "image_size": 32, "clients": 3, "clients_per_round": 2}
    done = run_python_benchmark("probe_precision.py", "--prompts", "0", "2", "--options", json.dumps(options),
                                "--markdown", str(doc))
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `python benchmarks/probe_precision.py`")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 0 |", "| 2 |"))]
    assert len(rows) == 2 and all(0 <= float(value.strip(" |")) <= 1 for row in rows for value in row[1:4])
    assert all(0 <= float(low) <= float(high.strip(" |")) <= 1 for low, high in (row[4].split(" to ") for row in rows))
