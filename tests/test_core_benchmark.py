"""`bash benchmarks/core.sh`, docs/results.md and the benchmarks page's ablations, end to end at a
tiny size: runs for every seed, a finished run not redone, an interrupted one continued from its
checkpoint, the table of means and spreads, the document; and compare.sh, precision.sh, heterogeneous.sh,
wire.sh, pruning.sh, clientapp.py, scale.py, runtime.py and flower_scale.py at a small size."""

import json

import pytest

from conftest import SHARED, TINY_AUDIT, needs_shared, run_benchmark, run_python_benchmark


def run_report(script: str, tmp_path, rows: str, **variables: str) -> tuple[str, dict[str, list[str]]]:
    """`bash benchmarks/SCRIPT` on seed 0 of `rows` (core.sh rows), checked: its report, which names its
    command, and the report's table as each row's cells by row name, in the order given."""
    report = tmp_path / "report.md"
    done = run_benchmark(script, tmp_path, SEEDS="0", ROWS=rows, REPORT=str(report), **variables)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert text.startswith(f"Command: `bash benchmarks/{script}`")
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith(("| iid", "| dirichlet"))]
    table = {row[0].removeprefix("| "): row for row in cells}
    assert list(table) == rows.split()
    return text, table


def saved_config(tmp_path, row: str) -> dict:
    """The config a benchmark's run of `row` (seed 0) saved."""
    return json.loads((tmp_path / "runs" / row / "seed-0" / "config.json").read_text())


@pytest.mark.slow
@needs_shared
def test_the_ablation_benchmark_reruns_and_writes_its_table(tmp_path):
    document = tmp_path / "index.md"
    document.write_text("# Benchmarks\n\n## iid\n\nthe comparison\n\n## Ablations\n\nstale\n")
    variables = dict(DOC=str(document), TABLE=str(tmp_path / "ablations.md"), ROWS="iid-sgd", SEEDS="0 1")
    done = run_benchmark("core.sh", tmp_path, **variables)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "ablations.md").read_text()
    assert table.startswith("Command: `bash benchmarks/core.sh`; ") and " a run, torch " in table.splitlines()[0]
    rows = [line for line in table.splitlines() if line.startswith("| iid")]
    assert [row.split(" | ")[1] for row in rows] == ["0,1"] and all("±" in row for row in rows)
    text = document.read_text()
    assert text.startswith("# Benchmarks\n\n## iid\n\nthe comparison\n\n## ") and "stale" not in text  # the reports follow
    assert "\n## Ablations\n" in text
    assert rows[0] in text
    again = run_benchmark("core.sh", tmp_path, **variables)
    assert again.returncode == 0 and again.stdout.count("done before") == 2  # nothing redone
    summary = tmp_path / "runs" / "iid-sgd" / "seed-1" / "summary.json"
    finished = json.loads(summary.read_text())
    summary.unlink()  # as if killed after its last checkpoint
    resumed = run_benchmark("core.sh", tmp_path, **variables)
    assert resumed.returncode == 0 and resumed.stdout.count("done before") == 1 and "seed-1: continuing" in resumed.stdout
    assert json.loads(summary.read_text())["final_accuracy"] == finished["final_accuracy"]


@pytest.mark.slow
@needs_shared
def test_the_comparison_benchmark_runs_both_partitions_at_once_and_writes_its_document(tmp_path):
    document, rounds = tmp_path / "docs" / "benchmarks" / "index.md", tmp_path / "rounds.toml"
    rounds.write_text("[fl]\nrounds = 2\n")  # OPTIONS add to the tuned options: fl runs a round more than SIZE
    done = run_benchmark("compare.sh", tmp_path, METHODS="fl,sfprompt", SEEDS="0 1", JOBS="2", OMP_NUM_THREADS="1",
                         OPTIONS=str(rounds), DOC=str(document))
    assert done.returncode == 0, done.stderr[-3000:]
    text = document.read_text()
    assert text.startswith('# Benchmarks\n\nCommand: `bash benchmarks/compare.sh (ROUNDS=5 SEEDS="0 1" METHODS=fl,sfprompt '
                           f'OPTIONS={rounds})`')
    config = json.loads((tmp_path / "runs" / "iid" / "seed-0" / "fl" / "config.json").read_text())
    assert config["rounds"] == 2 and config["lr"] == 0.001  # OPTIONS' rounds over tuned.toml's learning rate
    assert ", 1 thread a run, " in text and "1 to 2 rounds (each method's in its row), seeds 0, 1." in text
    for partition in ("iid", "dirichlet-0.5"):
        for seed in (0, 1):
            assert (tmp_path / "runs" / partition / f"seed-{seed}" / "sfprompt" / "summary.json").is_file()
        section = text.split(f"## {partition}\n")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith(("| fl ", "| sfprompt "))]
        assert len(rows) == 2 and all("±" in row for row in rows)  # the mean over both seeds, with its spread
        assert rows[0] in (tmp_path / "runs" / partition / "comparison.md").read_text()
        assert f"({partition}-accuracy_vs_bytes.png)" in section
        assert (tmp_path / "docs" / "benchmarks" / f"{partition}-accuracy_vs_bytes.png").is_file()  # beside DOC
        goal = next(line for line in text.splitlines() if line.startswith(f"| {partition} | final accuracy ≥ fl's | "))
        sfprompt, fl = (float(row.split(" | ")[1].split(" ± ")[0]) for row in rows[::-1])
        assert goal.endswith("| yes |" if sfprompt >= fl else f"| no: {(fl - sfprompt) * 100:.1f} points short |")
        assert f"| {partition} | MB to 0.70 ≤ 0.1 × fl's | " in text  # compare.sh's target, from comparison.csv
    assert "\n## Runtime\n" in text  # the index page holds the other benchmarks' reports too
    choice = tmp_path / "choose.md"  # the "which method" table from these runs, with a variant's audit beside
    chosen = run_benchmark("choose.sh", tmp_path, OUT_COMPARE=str(tmp_path / "runs"), OUT=str(tmp_path / "choose"),
                           AUDITED="sfprompt sfprompt-probe-refit", DOC=str(choice),
                           AUDIT_SIZE=" ".join([*TINY_AUDIT, "--train-samples", "40", "--test-samples", "40",
                                                "--image-size", "28", "--clients", "2", "--clients-per-round", "2"]))
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    refit = json.loads((tmp_path / "choose" / "sfprompt-probe-refit" / "audit.json").read_text())["config"]
    assert (refit["method"], refit["probe_rounds"], refit["refit_rounds"], refit["prompt_lr"]) == ("sfprompt", 1, 1, 0.01)
    rows = {line.split(" | ")[0]: line for line in choice.read_text().splitlines() if line.startswith("| ")}
    assert "re-identified" in rows["| sfprompt"] and "not audited here" in rows["| fl"]
    second, notes = tmp_path / "docs" / "long.md", tmp_path / "docs" / "long-notes.md"
    notes.write_text("Why, written by hand.\n")
    again = run_python_benchmark("write_benchmarks.py", str(tmp_path / "runs"), "bash benchmarks/compare.sh (long)",
                                 str(second))
    assert again.returncode == 0, again.stderr[-3000:]
    text = second.read_text()  # only its comparison: plots beside it, named after it, and its own notes
    assert text.startswith("# Benchmarks: long\n\nCommand: `bash benchmarks/compare.sh (long)`")
    assert "(long-iid-accuracy_vs_bytes.png)" in text and (tmp_path / "docs" / "long-iid-accuracy_vs_bytes.png").is_file()
    assert "\n## Goals\n" in text and "Why, written by hand." in text
    assert "\n## Runtime\n" not in text and "\n## Tuning\n" not in text


@pytest.mark.slow
@needs_shared
def test_the_clientapp_benchmark_measures_each_build_in_a_fresh_process(tmp_path):
    markdown = tmp_path / "clientapp.md"
    done = run_python_benchmark("clientapp.py", "--shared", str(SHARED), "--out", str(tmp_path / "runs"),
                                "--markdown", str(markdown), "--models", "ViT-S/14, 56 px", "--train-samples", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "clientapp.json").read_text())
    assert [r["build"] for r in rows] == ["before", "partition", "own folder"]
    before, own = rows[0], rows[2]
    assert own["build_peak_mib"] < before["build_peak_mib"] and own["again_s"] < 0.05  # kept, not rebuilt
    assert markdown.read_text().count("| ViT-S/14, 56 px |") == 3


@needs_shared
def test_the_scale_benchmark_measures_each_client_count_in_a_fresh_process(tmp_path):
    markdown = tmp_path / "scale.md"
    done = run_python_benchmark("scale.py", "--shared", str(SHARED), "--clients", "10", "400",
                                "--train-samples", "4000", "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in markdown.read_text().splitlines() if line.startswith(("| IID", "| Dirichlet"))]
    assert [row[1] for row in rows] == ["10", "400", "10", "400"]
    assert all(float(row[5].split()[0]) < 10 for row in rows if row[5] != "- |")  # KB per idle client


@pytest.mark.slow
@needs_shared
def test_the_precision_benchmark_runs_each_precision_and_writes_its_report(tmp_path):
    run_report("precision.sh", tmp_path, "iid iid-bf16", JOBS="2")
    assert saved_config(tmp_path, "iid-bf16")["precision"] == "bf16"


@pytest.mark.slow
@needs_shared
def test_the_runtime_benchmark_times_the_transports_and_one_round_in_both_runtimes(tmp_path):
    markdown = tmp_path / "runtime.md"
    done = run_python_benchmark("runtime.py", "--shared", str(SHARED), "--cases", "vit-s-56", "--repeats", "2",
                                "--train-samples", "20", "--test-samples", "10", "--out", str(tmp_path / "runs"),
                                "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr[-3000:]
    text = markdown.read_text()
    assert text.startswith("Command: `python benchmarks/runtime.py --repeats 2 --cases vit-s-56 --train-samples 20 "
                           "--test-samples 10`")
    exchange = next(line.split(" | ") for line in text.splitlines() if line.startswith("| ViT-S/14"))
    assert exchange[1] == "1.92 MB"  # bytes do not depend on the machine: the benchmarks page's figure
    rounds = {line.split(" | ")[0]: line.split(" | ")[3:] for line in text.splitlines()
              if line.startswith(("| in-process", "| flower"))}
    assert rounds["| flower"] == rounds["| in-process"]  # accuracy and bytes the same under Flower


@pytest.mark.slow
@needs_shared
def test_the_flower_scale_benchmark_compares_both_runtimes(tmp_path):
    markdown = tmp_path / "flower-scale.md"
    done = run_python_benchmark("flower_scale.py", "--shared", str(SHARED), "--nodes", "4", "--per-round", "2",
                                "--rounds", "1", "--train-samples", "80", "--test-samples", "40",
                                "--out", str(tmp_path / "runs"), "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in markdown.read_text().splitlines() if line.startswith(("| in-process", "| flower"))]
    assert [row[0] for row in rows] == ["| in-process", "| flower"]
    assert all(row[-1] == "yes |" for row in rows)  # the same accuracy and bytes under Flower


@pytest.mark.slow
@needs_shared
def test_the_wire_benchmark_runs_each_format_and_writes_its_report(tmp_path):
    _, rows = run_report("wire.sh", tmp_path, "iid iid-wire-int8 dirichlet-0.5-wire-int8")
    up = 6  # MB up: int8 with the shared rows once sends less than a third of float32's
    assert float(rows["iid-wire-int8"][up]) < float(rows["iid"][up]) / 3
    config = saved_config(tmp_path, "iid-wire-int8")
    assert (config["wire_dtype"], config["shared_rows"]) == ("int8", "once")
    config = saved_config(tmp_path, "dirichlet-0.5-wire-int8")
    assert (config["wire_dtype"], config["shared_rows"], config["alpha"]) == ("int8", "once", 0.5)


@pytest.mark.slow
@needs_shared
def test_the_pruning_benchmark_runs_each_band_and_writes_its_report(tmp_path):
    text, rows = run_report("pruning.sh", tmp_path, "iid iid-prune-random dirichlet-0.5-prune-by-size")
    assert "those rows send the same bytes" in text
    assert rows["iid-prune-random"][6] == rows["iid"][6]  # MB up: the same number of samples, other ones
    assert saved_config(tmp_path, "iid-prune-random")["prune_keep"] == "random"
    config = saved_config(tmp_path, "dirichlet-0.5-prune-by-size")
    assert (config["prune_keep"], config["alpha"]) == ("by-size", 0.5)


@pytest.mark.slow
@needs_shared
def test_the_heterogeneous_benchmark_runs_mixed_split_points_and_writes_its_report(tmp_path):
    text, _ = run_report("heterogeneous.sh", tmp_path, "iid iid-mixed-budgets")
    assert "- seed-0: split points (client blocks): " in text  # which clients got which head
    assert saved_config(tmp_path, "iid-mixed-budgets")["client_budgets"] == "0.05,0.5,1.0"


@pytest.mark.slow
@needs_shared
def test_the_224_px_benchmark_advances_in_short_invocations_and_writes_its_report(tmp_path):
    """benchmarks/scale224.sh (issue 34's GPU benchmark) at a tiny size on the CPU: an invocation whose DEADLINE has
    passed starts nothing and writes no report; the next runs what is left (a forward-only row in float32 beside a
    bf16 row), and the report follows."""
    doc = tmp_path / "scale.md"
    tiny = "--image-size 28 --train-samples 40 --test-samples 20 --clients 2 --clients-per-round 2 --rounds 1"
    rows = dict(SEEDS="0", SETTINGS="iid", ROWS="linear-probe sfprompt-forward-only", DOC=str(doc), SIZE=tiny)
    stopped = run_benchmark("scale224.sh", tmp_path, DEADLINE="1", **rows)
    assert stopped.returncode == 0 and "not started (DEADLINE passed)" in stopped.stdout, stopped.stderr[-2000:]
    assert "2 runs not finished" in stopped.stdout and not doc.exists()
    done = run_benchmark("scale224.sh", tmp_path, **rows)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/scale224.sh`") and "| sfprompt-forward-only | 0 |" in text
    configs = {row: json.loads((tmp_path / "runs" / "iid" / row / "seed-0" / "config.json").read_text())
               for row in ("linear-probe", "sfprompt-forward-only")}
    assert configs["linear-probe"]["precision"] == "bf16" and configs["sfprompt-forward-only"]["precision"] == "fp32"
    assert configs["linear-probe"]["clients"] == 2  # SIZE's options come after the setting's, and win


@pytest.mark.slow
@needs_shared
def test_the_112_px_benchmark_runs_its_grid_and_writes_its_report(tmp_path):
    """benchmarks/scale112.sh (issue 34's CPU benchmark) at a tiny size: its rows at 112 px unless SIZE says
    otherwise; the report once every run has finished."""
    doc = tmp_path / "scale.md"
    tiny = "--image-size 28 --train-samples 40 --test-samples 20 --clients 2 --clients-per-round 2 --rounds 1"
    done = run_benchmark("scale112.sh", tmp_path, SEEDS="0", ROWS="linear-probe", DOC=str(doc), SIZE=tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/scale112.sh`") and "| linear-probe | 0 |" in text
    config = json.loads((tmp_path / "runs" / "iid" / "linear-probe" / "seed-0" / "config.json").read_text())
    assert config["method"] == "linear-probe" and config["dataset"] == "fashion-mnist" and config["rounds"] == 1
    ablations = tmp_path / "ablations.md"  # ABLATIONS=1: core.sh's rows on the paper's recipe, their own report
    rows = ("paper", "paper-shared-local-classifier", "paper-global-pruning", "paper-split-epochs-1", "paper-sgd",
            "paper-shared-once", "paper-wire-int8")
    listed = run_benchmark("scale112.sh", tmp_path, ABLATIONS="1", SEEDS="0", DEADLINE="1", DOC=str(ablations))
    assert listed.returncode == 0 and "7 runs not finished" in listed.stdout, listed.stderr[-2000:]
    assert all(f"/iid/{row}/seed-0: not started" in listed.stdout for row in rows) and not ablations.exists()
    unknown = run_benchmark("scale112.sh", tmp_path, ABLATIONS="1", ROWS="paper-nonsense", DOC=str(ablations))
    assert unknown.returncode == 2 and unknown.stderr.strip() == "unknown row paper-nonsense"
    done = run_benchmark("scale112.sh", tmp_path, ABLATIONS="1", SEEDS="0", ROWS="paper paper-wire-int8",
                         DOC=str(ablations), SIZE=tiny)
    assert done.returncode == 0, done.stderr[-3000:]
    text = ablations.read_text()
    assert text.startswith("Command: `ABLATIONS=1 bash benchmarks/scale112.sh`") and "| paper-wire-int8 | 0 |" in text
    assert doc.read_text().startswith("Command: `bash")  # the grid's report untouched
    configs = {row: json.loads((tmp_path / "runs" / "iid" / row / "seed-0" / "config.json").read_text())
               for row in ("paper", "paper-wire-int8")}
    assert (configs["paper"]["shared_rows"], configs["paper"]["wire_dtype"]) == ("per-sample", "float32")  # the paper's
    assert (configs["paper-wire-int8"]["shared_rows"], configs["paper-wire-int8"]["wire_dtype"]) == ("once", "int8")


def test_the_scale_conclusions_mark_each_56_px_conclusion_at_112_px(tmp_path):
    """benchmarks/scale_conclusions.py on made-up runs: per-seed differences over the seeds both rows ran, and each
    verdict (beyond the spread, within it, reversed, level within its tolerance but for fewer bytes saved than the
    conclusion names, not measured)."""
    def runs(pattern: str, accuracies: list[float], sent: float = 100.0, rounds: int = 5,
             train: int | None = 5000) -> None:
        for seed, accuracy in enumerate(accuracies):
            run = tmp_path / pattern.format(seed=seed)
            run.mkdir(parents=True)
            config = {"rounds": rounds, "clients_per_round": 5, "clients": 10, "train_samples": train,
                      "test_samples": 2000}
            summary = {"final_accuracy": accuracy, "bytes_up": sent, "bytes_down": 0.0, "config": config}
            (run / "summary.json").write_text(json.dumps(summary))

    runs("core/iid/seed-{seed}", [0.80, 0.82, 0.81])
    runs("core/iid-shared-local-classifier/seed-{seed}", [0.79, 0.80, 0.80])  # +1.3 ± 0.6: beyond the spread
    runs("core/iid-global-pruning/seed-{seed}", [0.81, 0.80])  # +0.5 ± 2.1 over seeds 0 and 1: within it
    runs("core/iid-split-epochs-1/seed-{seed}", [0.81, 0.83, 0.80])  # -0.3 ± 1.2: reversed within the spread
    runs("core/iid-shared-once/seed-{seed}", [0.80, 0.82, 0.81], sent=50.0)  # level, for half the bytes
    runs("scale-112/iid/paper/seed-{seed}", [0.85, 0.86], sent=400.0)
    runs("scale-112/iid/paper-shared-local-classifier/seed-{seed}", [0.87, 0.88])  # -2.0 ± 0.0: reversed
    runs("scale-112/iid/paper-shared-once/seed-{seed}", [0.854, 0.858], sent=300.0)  # level, not half the bytes
    runs("scale-112/iid/paper-wire-int8/seed-{seed}", [0.83, 0.84], sent=50.0)  # -2.1: beyond int8's 1 point
    runs("compare/iid/seed-{seed}/linear-probe", [0.80], train=2500)  # compare.sh's layout: seed-N/METHOD
    runs("compare/iid/seed-{seed}/sfl", [0.75], rounds=10, train=None)  # a size A's run does not share: both named
    done = run_python_benchmark("scale_conclusions.py", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| the docs")}
    classifier, pruning, epochs, sgd, once, int8, _, probe_sfl, _ = rows.values()
    size = "5 rounds of 5 of 10 clients, 5,000 / 2,000 images"
    assert classifier == [f"0.810 vs 0.797: +1.3 ± 0.6 (3 seeds; {size})", "holds",
                          f"0.855 vs 0.875: -2.0 ± 0.0 (2 seeds; {size})", "does not hold", "0.25 |"]
    assert pruning[:2] == [f"0.810 vs 0.805: +0.5 ± 2.1 (2 seeds; {size})", "holds, within the seeds' spread"]
    assert epochs[:2] == [f"0.810 vs 0.813: -0.3 ± 1.2 (3 seeds; {size})", "does not hold, within the seeds' spread"]
    assert sgd == ["—", "not measured", "—", "not measured", "— |"]
    assert once[:2] == [f"0.810 vs 0.810: +0.0 ± 0.0 (3 seeds; {size})", "holds"]
    assert once[2:] == [f"0.856 vs 0.855: +0.1 ± 0.4 (2 seeds; {size})",
                        "holds for the accuracy, not the bytes: 1.33 times fewer, not 2", "1.33 |"]
    assert int8[2:] == [f"0.835 vs 0.856: -2.1 ± 0.4 (2 seeds; {size})", "does not hold", "6.00 |"]
    assert probe_sfl[:2] == ["0.800 vs 0.750: +5.0 (1 seed; A: 5 rounds of 5 of 10 clients, 2,500 / 2,000 images; "
                             "B: 10 rounds of 5 of 10 clients, all / 2,000 images)", "holds (one seed: no spread)"]


@pytest.mark.slow
def test_the_secure_aggregation_benchmark_runs_both_ways_under_flower(imagefolder, tmp_path):
    markdown = tmp_path / "secure-aggregation.md"
    options = json.dumps({"rounds": 1, "probe_rounds": 0, "dataset": "imagefolder", "data_dir": str(imagefolder),
                          "model": "test_vit", "weights": "none", "image_size": 32, "prompt_tokens": 2, "batch_size": 8})
    done = run_python_benchmark("secure_aggregation.py", "--nodes", "2", "--seeds", "0", "--options", options,
                                "--out", str(tmp_path / "runs"), "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in markdown.read_text().splitlines()
            if line.startswith(("| FedAvg", "| SecAgg+"))}
    assert rows.keys() == {"| FedAvg", "| SecAgg+"}
    assert float(rows["| FedAvg"][4]) == 0 < float(rows["| SecAgg+"][4])  # the keys and shares: only SecAgg+ sends them
    assert float(rows["| SecAgg+"][3]) > float(rows["| FedAvg"][3])  # a masked upload: 8 bytes a value
    assert "Largest gap between the two in any round's accuracy" in markdown.read_text()
    report = markdown.read_text()
    again = run_python_benchmark("secure_aggregation.py", "--nodes", "2", "--seeds", "0", "--options", options,
                                 "--out", str(tmp_path / "runs"), "--markdown", str(markdown))
    assert again.returncode == 0 and markdown.read_text().split("\n", 1)[1] == report.split("\n", 1)[1]  # reused
    assert "Simulation" not in again.stderr  # no Flower run started again
