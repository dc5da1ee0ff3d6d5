import csv
import json

import pytest

from sfprompt.cli import main
from sfprompt.compare import (add_ratios, at_equal_cost, load_method_options, markdown, mean_row, parse_methods,
                              parse_seeds, variant_config)
from sfprompt.config import Config, ConfigError


def test_compare_writes_table_and_plots_from_the_runs_own_numbers(imagefolder, tmp_path, capsys):
    out = tmp_path / "cmp"
    tuned = tmp_path / "tuned.toml"
    tuned.write_text('[fl]\noptimizer = "sgd"\nbackbone_lr = 0.003\n\n[sfprompt]\nlr = 0.002\n')
    argv = ["compare", "--methods", "fl,sfprompt,sfprompt-no-pruning", "--target-accuracy", "0.3",
            "--method-options", str(tuned),
            "--dataset", "imagefolder", "--data-dir", str(imagefolder), "--model", "test_vit", "--weights", "none",
            "--image-size", "32", "--prompt-tokens", "2", "--clients", "3", "--clients-per-round", "2",
            "--rounds", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("comparison.csv", "comparison.md", "history.csv", "accuracy_per_round.png", "accuracy_vs_bytes.png",
                 "accuracy_vs_client_flops.png", "client_flops.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {row["method"]: row for row in csv.DictReader(open(out / "comparison.csv"))}
    assert list(rows) == ["fl", "sfprompt", "sfprompt-no-pruning"]
    assert {row["target_accuracy"] for row in rows.values()} == {"0.3"}
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in rows}
    assert summaries["sfprompt-no-pruning"]["config"]["keep_ratio"] == 1.0
    configs = {name: summaries[name]["config"] for name in rows}  # each method ran with its own options
    assert (configs["fl"]["optimizer"], configs["fl"]["backbone_lr"], configs["fl"]["lr"]) == ("sgd", 0.003, 0.01)
    assert configs["sfprompt"]["lr"] == configs["sfprompt-no-pruning"]["lr"] == 0.002  # a variant takes its method's
    assert configs["sfprompt"]["optimizer"] == "adam"
    cumulative = list(csv.DictReader(open(out / "history.csv")))
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
        mine = [r for r in cumulative if r["method"] == name]
        assert [int(r["cumulative_bytes"]) for r in mine] == [
            sum(h["bytes_up"] + h["bytes_down"] for h in history[: k + 1]) for k in range(len(history))]
        assert [int(r["cumulative_client_flops"]) for r in mine] == [
            sum(h["client_flops"] for h in history[: k + 1]) for k in range(len(history))]
    assert float(rows["sfprompt"]["bytes_up_vs_fl"]) < 1  # prompts, tail and pruned activations vs the model
    table = (out / "comparison.md").read_text()
    assert "| sfprompt |" in table
    # fl's own recipe (no probe round, 0.01) differs from SFPrompt's default one too, and is listed as such
    assert "fl: --probe-rounds 0, --optimizer sgd, --lr 0.01, --prompt-lr 0.01, --backbone-lr 0.003" in table
    assert "sfprompt-no-pruning: --keep-ratio 1.0, --lr 0.002." in table


def history_row(method: str, costs: list[float], accuracies: list[float]) -> dict:
    return {"method": method, "history": [{"round": k + 1, "accuracy": a, "bytes": c, "client_flops": c,
                                           "server_flops": c} for k, (c, a) in enumerate(zip(costs, accuracies))]}


def test_equal_cost_takes_each_methods_last_round_within_sfprompts_spend():
    rows = [history_row("sfprompt", [10 * k for k in range(1, 11)], [k / 10 for k in range(1, 11)]),
            history_row("fl", [400, 800], [0.5, 0.8]),  # one round costs more than sfprompt's first five
            history_row("sfl", [25, 50, 75], [0.3, 0.4, 0.6])]  # ends below sfprompt's spend after 10 rounds
    tables = at_equal_cost(rows, "bytes")
    assert [(n, budget) for n, budget, _ in tables] == [(5, 50), (10, 100)]  # 20 rounds: sfprompt ran only 10
    five, ten = tables[0][2], tables[1][2]
    assert five["sfprompt"]["accuracy"] == 0.5 and not five["sfprompt"]["ended"]
    assert five["fl"] is None and ten["fl"] is None
    assert (five["sfl"]["round"], five["sfl"]["accuracy"], five["sfl"]["ended"]) == (2, 0.4, False)
    assert (ten["sfl"]["round"], ten["sfl"]["ended"]) == (3, True)
    assert not ten["sfprompt"]["ended"]  # it spent exactly the budget
    assert at_equal_cost(rows[1:], "bytes") == []  # no sfprompt row, no table
    text = "\n".join(markdown_lines(rows))
    assert "| fl | — | — |" in text and "| sfl | 0.4000 (2) | ≤ 0.6000 (3) |" in text


def markdown_lines(rows):
    full = [{**r, "final_accuracy": 0, "best_accuracy": 0, "rounds": 1, "bytes_up": 1, "bytes_down": 1,
             "client_flops": 1, "server_flops": 1, "client_peak_memory_bytes": 1, "bytes_to_target": None,
             "client_flops_to_target": None, **{f"{k}_vs_fl": None for k in
                                               ("bytes_up", "bytes_down", "client_flops", "client_peak_memory_bytes")}}
            for r in rows]
    return markdown(full, None).splitlines()


def test_method_options_are_checked_before_anything_runs(tmp_path):
    path = tmp_path / "options.toml"
    for text, message in [("[fedprox]\nlr = 0.1\n", "holds 'fedprox'"), ("lr = 0.1\n", "holds 'lr'"),
                          ("[fl]\nseed = 3\n", "may not set method, out or seed"), ("[fl\n", "not valid TOML")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_method_options(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_method_options(tmp_path / "missing.toml")
    rounds = tmp_path / "rounds.toml"
    path.write_text('[fl]\nlr = 0.1\nrounds = 3\n\n[sl]\nlr = 0.2\n')
    rounds.write_text("[fl]\nrounds = 5\n\n[sfprompt]\nrounds = 20\n")  # a later file adds and overrides
    assert load_method_options(path, rounds) == {"fl": {"lr": 0.1, "rounds": 5}, "sl": {"lr": 0.2},
                                                 "sfprompt": {"rounds": 20}}
    base = Config(out=str(tmp_path / "cmp"))
    with pytest.raises(ConfigError, match="fl: unknown option 'learning_rate'"):
        variant_config(base, "fl", {"fl": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="sfl-train-body: --backbone-lr must be positive"):
        variant_config(base, "sfl-train-body", {"sfl-train-body": {"backbone_lr": 0.0}})
    variant = variant_config(base, "sfl-train-body", {"sfl": {"lr": 0.5}, "sfl-train-body": {"backbone_lr": 3e-5}})
    assert (variant.method, variant.train_body, variant.lr, variant.backbone_lr) == ("sfl", True, 0.5, 3e-5)


def test_unknown_methods_are_named():
    assert parse_methods("sfprompt, fl") == ["sfprompt", "fl"]
    with pytest.raises(ConfigError, match="unknown fedprox"):
        parse_methods("sfprompt,fedprox")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("fl,fl")


def test_several_seeds_give_each_seeds_comparison_and_their_mean_and_spread(imagefolder, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "sfl,sfprompt", "--seeds", "0,1", "--target-accuracy", "0.5",
            "--dataset", "imagefolder", "--data-dir", str(imagefolder), "--model", "test_vit", "--weights", "none",
            "--image-size", "32", "--prompt-tokens", "2", "--clients", "3", "--clients-per-round", "2",
            "--rounds", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summaries = {(seed, name): json.loads((out / f"seed-{seed}" / name / "summary.json").read_text())
                 for seed in (0, 1) for name in ("sfl", "sfprompt")}
    assert all(summary["config"]["seed"] == seed for (seed, _), summary in summaries.items())
    assert (out / "seed-1" / "comparison.md").is_file() and (out / "history.csv").is_file()
    rows = {row["method"]: row for row in csv.DictReader(open(out / "comparison.csv"))}
    for name, row in rows.items():
        finals = [summaries[seed, name]["final_accuracy"] for seed in (0, 1)]
        assert float(row["final_accuracy"]) == pytest.approx(sum(finals) / 2)
        assert float(row["final_accuracy_std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
        assert float(row["bytes_up"]) == pytest.approx(sum(summaries[seed, name]["bytes_up"] for seed in (0, 1)) / 2)
        assert row["seeds"] == "2"
    table = (out / "comparison.md").read_text()
    assert table.startswith("Mean over 2 seeds") and "±" in table


def test_a_cost_to_the_target_says_how_many_seeds_reached_it():
    rows = [history_row("sfprompt", [10, 20], accuracies) for accuracies in ([0.2, 0.6], [0.3, 0.4])]
    for row, reached in zip(rows, (2, None)):  # seed 0 reached 0.5 in round 2, seed 1 never did
        row.update(final_accuracy=row["history"][-1]["accuracy"], best_accuracy=0.6, rounds=2, bytes_up=1,
                   bytes_down=1, client_flops=1, server_flops=1, client_peak_memory_bytes=1, options={},
                   bytes_to_target=reached and 20, client_flops_to_target=reached and 20, round_to_target=reached)
    mean = mean_row(rows, 0.5)
    assert (mean["reached"], mean["seeds"], mean["bytes_to_target"]) == (1, 2, 20)
    assert mean["final_accuracy"] == pytest.approx(0.5) and mean["final_accuracy_std"] == pytest.approx(0.1 * 2 ** 0.5)
    assert [h["accuracy"] for h in mean["history"]] == pytest.approx([0.25, 0.5])
    assert [h["round"] for h in mean["history"]] == [1, 2] and all(type(h["round"]) is int for h in mean["history"])
    add_ratios([mean])
    text = markdown([mean], 0.5)
    assert "| sfprompt | 0.5000 ± 0.1414 |" in text and "| 0.0 (1 of 2 seeds) |" in text  # 20 bytes: 0.0 MB
    with pytest.raises(ConfigError, match="distinct"):
        parse_seeds("1,1")
    with pytest.raises(ConfigError, match="integers"):
        parse_seeds("0,x")


def test_equal_cost_and_means_follow_the_rounds_evaluated():
    """With --eval-every a history holds only the evaluated rounds: the budgets are those of SFPrompt's rounds 5,
    10 and 20 by number, and a mean over seeds keeps the rounds' numbers."""
    from sfprompt.compare import at_equal_cost, mean_row

    history = [{"round": r, "accuracy": r / 100, "bytes": 10 * r, "client_flops": r, "server_flops": r}
               for r in (5, 10, 15, 20)]
    rows = [{"method": "sfprompt", "history": history}, {"method": "sfl", "history": [
        {"round": r, "accuracy": r / 50, "bytes": 20 * r, "client_flops": r, "server_flops": r}
        for r in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]}]
    tables = at_equal_cost(rows, "bytes")
    assert [(n, budget) for n, budget, _ in tables] == [(5, 50), (10, 100), (20, 200)]
    assert tables[0][2]["sfl"]["round"] == 2 and tables[2][2]["sfl"]["round"] == 10
    seeds = [{"method": "sfprompt", "options": {}, "history": history, "round_to_target": None,
              **{key: 0.5 for key in ("final_accuracy", "best_accuracy")}} for _ in range(2)]
    assert [h["round"] for h in mean_row(seeds, None)["history"]] == [5, 10, 15, 20]


def test_drawing_a_comparisons_pictures_leaves_a_notebooks_pyplot_alone(tmp_path):
    """`compare.plot` draws on figures of its own: it neither closes the figures a notebook has open nor changes
    its backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    from sfprompt import compare

    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # a backend other than Agg, which plot must not switch to
    open_figure = plt.figure()
    try:
        history = [{"round": r, "accuracy": 0.1 * r, "bytes": 1e6 * r, "client_flops": 1e9 * r} for r in (1, 2)]
        compare.plot([{"method": "sfprompt", "history": history}], tmp_path)
        assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in compare.PICTURES)
        assert plt.fignum_exists(open_figure.number) and matplotlib.get_backend() == "svg"
    finally:
        plt.close(open_figure)
        plt.switch_backend(backend)
