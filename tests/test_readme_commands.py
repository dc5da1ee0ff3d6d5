"""Every command in the code blocks of README.md and of the documentation site's pages runs, at a size CI can
afford, so that a change cannot silently break a documented command again (the README's `sfprompt cost` once
failed on its own message-size limit). Each command is run as written, with options appended that shrink the
data, the rounds and the probe (later flags override earlier ones); a command this test does not know fails
it, so a new command in the docs needs a rule here."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sfprompt.cli import main

from conftest import SHARED_DATA, SHARED_WEIGHTS, TINY_AUDIT, TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TINY = [*TINY_RUN, "--no-progress"]
TINY_COST = ["--batch-size", "2", "--probe-samples", "2"]
# Commands not run here as typed, and why (each is run elsewhere or needs what CI does not have).
NOT_RUN = {
    "pip install": "installation: CI itself runs the quick start's install",
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "an environment variable",
    "pytest": "the test suite itself",
    "bash benchmarks/": "a benchmark: each runs at a tiny size in its own test (tests/test_*benchmark*.py, test_audit.py)",
    "flwr run": "a federation: the simulation's apps run in tests/test_flower.py, and the deployment guide's "
                "`flwr run . prod` against a SuperLink and SuperNodes on loopback in tests/test_deployment.py",
}

# Commands another test runs as typed, at this size, and checks what they do besides.
RUN_ELSEWHERE = {f"sfprompt run --tracker {name}": "a tracker: tests/test_tracking.py runs it and checks what it shows"
                 for name in ("tensorboard", "wandb", "mlflow")}


def readme_commands() -> list[str]:
    """Each command of the documents' bash blocks, once: continuation lines joined, `a && b` as two commands,
    comments dropped."""
    commands = []
    blocks = [block for document in DOCUMENTS for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.sub(r"\s+#.*$", "", line).split(" && "):
                if command.strip() and not command.strip().startswith("#"):
                    commands.append(re.sub(r"\s+", " ", command.strip()))
    return list(dict.fromkeys(commands))


def test_the_readme_has_the_commands_this_test_knows():
    commands = readme_commands()
    assert any(c == "sfprompt run" for c in commands) and any(c.startswith("sfprompt cost") for c in commands)


@pytest.mark.parametrize("command", readme_commands(), ids=lambda command: command[:90])
def test_readme_command_runs(command, tmp_path, monkeypatch):
    for prefix, reason in NOT_RUN.items():
        if command.startswith(prefix):
            pytest.skip(reason)
    if command in RUN_ELSEWHERE:
        pytest.skip(RUN_ELSEWHERE[command])
    monkeypatch.chdir(tmp_path)  # what a command writes (runs/, data/, cost.json) stays in the test's folder
    argv = shlex.split(command.replace("[any option of run]", ""))
    if argv[:2] == ["python", "examples/export_digits.py"]:
        done = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert len(list((tmp_path / argv[2] / "train").rglob("*.png"))) > 1000
        return
    assert argv[0] == "sfprompt", f"README command with no rule in this test: {command}"
    if "../shared" in command and not (SHARED_DATA.is_dir() and SHARED_WEIGHTS.is_file()):
        pytest.skip("needs ../shared (the project's offline data and checkpoint)")
    argv = [arg.replace("../shared", str(SHARED_DATA.parent)) for arg in argv[1:]]
    subcommand = argv[0]
    if any(arg.startswith("data/digits") for arg in argv):
        subprocess.run([sys.executable, str(ROOT / "examples" / "export_digits.py"), "data/digits"], check=True)
    if subcommand == "cost":
        argv += TINY_COST
    elif subcommand == "plot":
        assert main(["run", *TINY]) == 0  # the run it draws: runs/latest points at it
    elif "--from" in argv:
        assert main(["run", *TINY]) == 0  # the finished run the command reads: runs/latest points at it
        argv += TINY_AUDIT if subcommand == "audit" else ["--no-progress"]
    else:
        argv += TINY + (TINY_AUDIT if subcommand == "audit" else []) + (["--seeds", "0"] if "--seeds" in argv else [])
    assert main(argv) == 0, command
