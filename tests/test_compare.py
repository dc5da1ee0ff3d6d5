import csv
import json

import pytest

from sfprompt.cli import main
from sfprompt.compare import parse_methods
from sfprompt.config import ConfigError


def test_compare_writes_table_and_plots_from_the_runs_own_numbers(imagefolder, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fl,sfprompt,sfprompt-no-pruning", "--target-accuracy", "0.3",
            "--dataset", "imagefolder", "--data-dir", str(imagefolder), "--model", "test_vit", "--weights", "none",
            "--image-size", "32", "--prompt-tokens", "2", "--clients", "3", "--clients-per-round", "2",
            "--rounds", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("comparison.csv", "comparison.md", "accuracy_per_round.png", "accuracy_vs_bytes.png", "client_flops.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {row["method"]: row for row in csv.DictReader(open(out / "comparison.csv"))}
    assert list(rows) == ["fl", "sfprompt", "sfprompt-no-pruning"]
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in rows}
    assert summaries["sfprompt-no-pruning"]["config"]["keep_ratio"] == 1.0
    for name, row in rows.items():
        for key in ("bytes_up", "client_flops", "client_peak_memory_bytes"):
            assert int(row[key]) == summaries[name][key]
            assert float(row[f"{key}_vs_fl"]) == pytest.approx(summaries[name][key] / summaries["fl"][key])
        history = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        reached = next((i for i, r in enumerate(history) if r["accuracy"] >= 0.3), None)
        if reached is None:
            assert row["bytes_to_target"] == ""
        else:
            spent = sum(r["bytes_up"] + r["bytes_down"] for r in history[: reached + 1])
            assert int(row["bytes_to_target"]) == spent and int(row["round_to_target"]) == reached + 1
    assert float(rows["sfprompt"]["bytes_up_vs_fl"]) < 1  # prompts, tail and pruned activations vs the model
    assert "| sfprompt |" in (out / "comparison.md").read_text()


def test_unknown_methods_are_named():
    assert parse_methods("sfprompt, fl") == ["sfprompt", "fl"]
    with pytest.raises(ConfigError, match="unknown fedprox"):
        parse_methods("sfprompt,fedprox")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("fl,fl")
