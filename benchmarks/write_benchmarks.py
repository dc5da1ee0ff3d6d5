"""Write docs/benchmarks/index.md from the outputs of benchmarks/compare.sh (tables, plots, command, machine,
SFPrompt's goals met or missed), followed by the reports other benchmarks keep in docs/benchmarks when they have
been run: the tuning of benchmarks/tune.py, the ablations of benchmarks/core.sh, pruning.sh's choice of samples,
heterogeneous.sh's split points, wire.sh's wire formats, and the runtime reports of benchmarks/runtime.py,
body_load.py, body_batching.py, precision.sh, clientapp.py, scale.py and flower_scale.py. A DOC of another name
than index.md holds only its comparison (a second one, as the 20-round docs/benchmarks/comparison-long.md): its plots beside it,
named after it, and its notes from DOC-STEM-notes.md beside it.

    python benchmarks/write_benchmarks.py results/compare "bash benchmarks/compare.sh" [DOC]  # docs/benchmarks/index.md
    python benchmarks/write_benchmarks.py --update-reports [DOC [ABLATIONS]]   # replace those sections only
    python benchmarks/write_benchmarks.py --machine   # the line naming the machine, for a report
"""

import contextlib
import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

from sfprompt.machine import cpu_name, processor

MAIN = Path("docs/benchmarks/index.md")  # the benchmarks' page: the comparison, then every report


def machine(threads: int | None = None) -> str:
    """What ran a benchmark: the GPU, or the CPU, its cores, the threads a run uses (OMP_NUM_THREADS: the same
    seed gives slightly different numbers with another count; this process's unless the runs recorded theirs)
    and torch's version."""
    import torch

    name = processor(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads() if threads is None else threads
    return f"{name}, {os.cpu_count()} CPU cores, {threads} thread{'s' * (threads != 1)} a run, torch {torch.__version__}"


def command_line(command: str) -> str:
    """How a process benchmark's report opens: the command that re-runs it and the machine that ran it."""
    import torch

    return f"Command: `{command}`; {cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmHWM: unlike getrusage's maxrss, it does
    not inherit the parent's peak across fork and exec)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def in_fresh_process(script: str, spec: dict) -> dict:
    """Run `python SCRIPT --child SPEC` (a benchmark measuring one case in a process of its own) and
    return the JSON it prints last."""
    import subprocess

    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def publish(lines: list[str], path: Path) -> None:
    """Print a runtime report and keep it where docs/benchmarks/index.md picks it up (`runtime_reports`)."""
    text = "\n".join(lines) + "\n"
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    if sys.argv[1:] == ["--machine"]:  # for the shell benchmarks' reports
        print(machine())
        return
    if sys.argv[1:2] == ["--update-reports"]:
        path = Path(sys.argv[2]) if len(sys.argv) > 2 else MAIN
        ablations = Path(sys.argv[3]) if len(sys.argv) > 3 else ABLATIONS
        methods = path.read_text()
        for title in [title for title, _, _ in report_sections(ablations)] + ["Runtime"]:
            methods = methods.split(f"## {title}\n")[0]
        with contextlib.redirect_stdout(io.StringIO()) as sections:
            reports(ablations)
        path.write_text(methods + sections.getvalue())
        return
    root, command = Path(sys.argv[1]), sys.argv[2]
    document = Path(sys.argv[3]) if len(sys.argv) > 3 else MAIN
    with contextlib.redirect_stdout(io.StringIO()) as text:
        comparison(root, command, document)
        if is_main(document):
            reports(ABLATIONS)
    document.write_text(text.getvalue())


def is_main(document: Path) -> bool:
    """The benchmarks' index page holds the reports of every benchmark; another document only its comparison."""
    return document.name == MAIN.name


def comparison(root: Path, command: str, document: Path) -> None:
    """compare.sh's section: command, machine, setting, then each partition's table and plots (copied beside the
    `document` and linked from it: named after the partition for the index page, else after the document too)."""
    home = document.parent
    prefix = "" if is_main(document) else f"{document.stem}-"
    home.mkdir(parents=True, exist_ok=True)
    summaries = [json.loads(path.read_text()) for path in sorted(root.rglob("summary.json"))]
    summary = summaries[0]
    seeds, rounds = (sorted({run["config"][key] for run in summaries}) for key in ("seed", "rounds"))
    threads = {run.get("threads") for run in summaries}
    print("# Benchmarks\n" if is_main(document) else f"# Benchmarks: {document.stem}\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine(threads.pop() if len(threads) == 1 else None)}, {summary['versions']['platform']}; "
          f"timm {summary['versions']['timm']}, sfprompt {summary['versions']['sfprompt']}  ")
    config = summary["config"]
    print(f"Setting: {config['dataset']} ({config['train_samples']} train / {config['test_samples']} test samples), "
          f"{config['model']} at {config['image_size']} px from `{Path(config['weights']).name}`, "
          f"{config['clients']} clients, {config['clients_per_round']} a round, "
          + (f"{rounds[0]} rounds, " if len(rounds) == 1 else
             f"{rounds[0]} to {rounds[-1]} rounds (each method's in its row), ")
          + f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.\n")
    for partition in sorted(p for p in root.iterdir() if (p / "comparison.md").is_file()):
        print(f"## {partition.name}\n")
        print((partition / "comparison.md").read_text())
        for plot in ("accuracy_per_round", "accuracy_vs_bytes", "accuracy_vs_client_flops", "client_flops"):
            target = f"{prefix}{partition.name}-{plot}.png"
            shutil.copyfile(partition / f"{plot}.png", home / target)
            print(f"![{partition.name}: {plot.replace('_', ' ')}]({target})")
        print()
    goals(root, document.with_name("comparison-notes.md" if is_main(document) else f"{document.stem}-notes.md"))


def goals(root: Path, notes: Path) -> None:
    """SFPrompt's goals on this setting (issue 11), checked against each partition's table: how far each is met or
    missed, then why (the `notes`, written by hand from these tables, when they exist)."""
    lines = []
    for partition in sorted(p for p in root.iterdir() if (p / "comparison.csv").is_file()):
        with open(partition / "comparison.csv", newline="") as handle:
            rows = {row["method"]: row for row in csv.DictReader(handle)}
        target = next(iter(rows.values()))["target_accuracy"]  # empty when the comparison had none
        for check in goal_checks(rows, target and f"{float(target):.2f}"):
            lines.append(f"| {partition.name} | " + " | ".join(check) + " |")
    if not lines:
        return
    print("## Goals\n")
    print("SFPrompt against the goals set for it on this setting (the mean rows above): its final accuracy at least "
          "SplitFed's (sfl), fl-prompt's less half a point and tuned full fine-tuning's (fl); the bytes until it "
          "first reaches the target accuracy at most half SplitFed's and a tenth of fl's.\n")
    print("| partition | goal | sfprompt | bound | met |\n|---|---|---|---|---|")
    print("\n".join(lines) + "\n")
    if notes.is_file():
        print(notes.read_text())


def goal_checks(rows: dict[str, dict], target: str | None) -> list[tuple[str, str, str, str]]:
    """(goal, SFPrompt's figure, the bound, met or by how much not) for each goal whose baseline was run (the
    bytes to the `target` accuracy only when the comparison had one)."""
    def number(method, key):
        value = rows.get(method, {}).get(key)
        return float(value) if value else None

    checks = []
    ours = number("sfprompt", "final_accuracy")
    for method, slack in (("sfl", 0.0), ("fl-prompt", 0.005), ("fl", 0.0)):
        if ours is None or method not in rows:
            continue
        bound = number(method, "final_accuracy") - slack
        short = bound - ours
        checks.append((f"final accuracy ≥ {method}'s" + (f" − {slack * 100:g} points" if slack else ""),
                       f"{ours:.4f}", f"{bound:.4f}", "yes" if short <= 0 else f"no: {short * 100:.1f} points short"))
    ours = number("sfprompt", "bytes_to_target")
    for method, factor in (("sfl", 0.5), ("fl", 0.1)):
        if target is None or "sfprompt" not in rows or method not in rows:
            continue
        theirs = number(method, "bytes_to_target")
        bound = f"{factor:g} × {theirs / 1e6:,.1f} = {factor * theirs / 1e6:,.1f}" if theirs else f"{method} never reached it"
        if ours is None:
            met = "no: sfprompt never reached it"
        elif theirs is None:
            met = "yes"
        else:
            met = "yes" if ours <= factor * theirs else f"no: {ours / (factor * theirs):.2f}× the bound"
        checks.append((f"MB to {target} ≤ {factor:g} × {method}'s", "—" if ours is None else f"{ours / 1e6:,.1f}",
                       bound, met))
    return checks


ABLATIONS = Path("docs/benchmarks/ablations.md")


def reports(ablations: Path) -> None:
    """The sections after the comparison, each when its report exists, then the runtime's."""
    for title, report, intro in report_sections(ablations):
        if report.is_file():
            print(f"## {title}\n")
            print(intro + "\n")
            print(report.read_text())
    runtime_reports()


def report_sections(ablations: Path) -> list[tuple[str, Path, str]]:
    """(title, report, intro) of the sections after the comparison: the baselines' tuning, the ablations,
    pruning, heterogeneous clients and the wire format (--update-reports replaces these and the runtime's)."""
    return [
        ("Tuning", Path("docs/benchmarks/tuning.md"),
         "Every method's learning rates, tuned on validation samples held out of the clients' training data "
         "(`python benchmarks/tune.py`); compare.sh runs each method with its best, from benchmarks/tuned.toml."),
        ("Ablations", ablations,
         "SFPrompt under the paper's recipe (`--recipe paper`), each row changed in one thing, on Fashion-MNIST "
         "with the real ViT-S/14 (5,000 train / 2,000 test samples at 56 px, 10 clients, 5 a round): the mean ± standard deviation over the seeds "
         "listed (`bash benchmarks/core.sh`). Costs are the mean over the seeds (they differ only by the "
         "data each client happens to hold); wall seconds are not a speed benchmark (runs shared the cores)."),
        ("Pruning", Path("docs/benchmarks/pruning.md"),
         "Which half of each client's samples split training sees (`bash benchmarks/pruning.sh`; docs/method.md: "
         "choices where the paper is silent); mean ± standard deviation over the seeds listed, costs the mean over them."),
        ("Heterogeneous clients", Path("docs/benchmarks/heterogeneous.md"),
         "A split point per client, chosen by its compute budget (`bash benchmarks/heterogeneous.sh`; "
         "the method: clients of different strength), against federations where every head ends at the same "
         "block; mean ± standard deviation over the seeds listed, costs the mean over them."),
        ("Wire format", Path("docs/benchmarks/wire.md"),
         "What split training's activations and gradients cost on the wire, and what their number format keeps "
         "(`bash benchmarks/wire.sh`; the method: the wire format); mean ± standard deviation over the seeds listed, "
         "costs the mean over them."),
    ]


def runtime_reports() -> None:
    """The runtime's measurements, as benchmarks/runtime.py, body_load.py, body_batching.py, precision.sh,
    clientapp.py, scale.py and flower_scale.py last wrote them."""
    reports = [Path("docs/benchmarks") / name
               for name in ("runtime.md", "load.md", "batching-cpu.md", "batching-cuda.md", "precision.md",
                            "clientapp.md", "scale.md", "flower-scale.md")]
    if any(report.is_file() for report in reports):
        print("## Runtime\n")
        print("The Flower runtime and the body channel against the in-process runtime "
              "(`python benchmarks/runtime.py`), the body channel under load (`python benchmarks/body_load.py`), "
              "the body server's throughput with many concurrent clients, one request at a time or batched "
              "(`python benchmarks/body_batching.py`), and its precision (`bash benchmarks/precision.sh`), "
              "what a Flower ClientApp builds for a message (`python benchmarks/clientapp.py`), what many "
              "simulated clients cost in one process (`python benchmarks/scale.py`), and a Flower simulation of 100 "
              "SuperNodes against the in-process runtime (`python benchmarks/flower_scale.py`).\n")
    for report in reports:
        if report.is_file():
            print(report.read_text())


if __name__ == "__main__":
    main()
