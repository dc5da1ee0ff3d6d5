"""The deployment guide as written (docs/flower.md, "A real deployment, step by step"), on loopback: certificates
made here, a SuperLink and two SuperNodes as separate processes with TLS, each SuperNode holding only
its own folder of images, and `flwr run .` against that federation with the body channel on TLS too.
The run equals the in-process run of the same configuration on the same samples, bytes included."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.federation import prepare
from sfprompt.seeds import private_seed
from sfprompt.flower.settings import as_run_config
from sfprompt.runner import run

from conftest import ROOT, certificates, client_folders
from test_runner import tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value) -> str:
    return json.dumps("" if value is None else value)  # JSON strings, numbers and booleans are TOML too


def run_status(env: dict) -> str:
    """The submitted run's status as the SuperLink reports it (`flwr ls`), e.g. 'running', 'finished:failed'."""
    listed = subprocess.run(["flwr", "ls", "loopback", "--format", "json"], env=env, capture_output=True, text=True,
                            timeout=60)
    runs = json.loads(listed.stdout).get("runs", []) if listed.returncode == 0 and listed.stdout.strip() else []
    return runs[0]["status"] if runs else "unknown"


def wait_for(path: Path, processes: list[subprocess.Popen], seconds: float, status, logs: Path) -> None:
    """Until `path` exists; fails early, with the federation's logs, if one of its processes died or the
    run finished without writing `path` (a failed ServerApp), and at the deadline."""
    deadline, checked = time.monotonic() + seconds, time.monotonic()
    while not path.exists():
        dead = [p.args[0] for p in processes if p.poll() is not None]
        finished = ""
        if time.monotonic() - checked > 10:
            checked, finished = time.monotonic(), status()
        failed = dead or (finished.startswith("finished") and not path.exists() and f"the run is {finished}")
        if failed or time.monotonic() > deadline:
            tail = "\n".join(log.read_text()[-1500:] for log in sorted(logs.glob("*.log")))
            raise AssertionError(f"{failed or 'timed out'} before {path.name} appeared; logs:\n{tail}")
        time.sleep(1)


def listening(port: int, timeout_s: float) -> None:
    """Return once something accepts connections on `port` on loopback."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_the_deployment_guide_on_loopback_gives_the_in_process_run(imagefolder, tmp_path, weights_file):
    config = tiny_config(imagefolder, tmp_path, weights=str(weights_file), clients=2, clients_per_round=2, rounds=2)
    folders = client_folders(prepare(config), tmp_path / "nodes")
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)

    # 1. certificates; the SuperLink and the body server share the server's
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, pem in zip(("ca.crt", "server.crt", "server.key"), certificates()):
        (tls / name).write_bytes(pem)
    env = os.environ | {"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *command: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    processes = []
    try:
        # 2. the SuperLink, 3. a SuperNode per client, each with only its own folder
        processes.append(start("superlink", "flower-superlink", "--ssl-ca-certfile", str(tls / "ca.crt"),
                               "--ssl-certfile", str(tls / "server.crt"), "--ssl-keyfile", str(tls / "server.key"),
                               "--port", str(port)))
        for k, folder in enumerate(folders):
            node_config = (f"partition-id={k} num-partitions=2 data-folder='{folder}' state-dir='{tmp_path}/state-{k}' "
                           f"data-dir='{tmp_path}/no-dataset-on-the-node' "
                           f"private-seed={private_seed(config.seed, k)}")  # the in-process run's private seeds
            processes.append(start(f"supernode-{k}", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                                   "--root-certificates", str(tls / "ca.crt"), "--port", str(free_port()),
                                   "--node-config", node_config))
        listening(port, 60)  # the SuperLink takes a few seconds to listen; `flwr run` does not retry
        # 4. the connection, 5. the run, with the body channel on TLS
        (tmp_path / "flwr-home").mkdir(exist_ok=True)  # the SuperLink may have made it already
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{tls / "ca.crt"}"\n')
        values = as_run_config(config) | {"out": str(tmp_path / "flower"), "body-certificate": str(tls / "server.crt"),
                   "body-private-key": str(tls / "server.key"), "body-root-certificate": str(tls / "ca.crt"),
                   "wait-for-nodes-s": 120.0}
        (tmp_path / "run.toml").write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        submitted = subprocess.run(["flwr", "run", str(ROOT), "loopback", "--run-config", str(tmp_path / "run.toml")],
                                   env=env, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        wait_for(tmp_path / "flower" / "summary.json", processes, 600, lambda: run_status(env), logs)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)

    log = "\n".join(path.read_text() for path in sorted(logs.glob("*.log")))
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local), log[-3000:]
    a, b = ([json.loads(line) for line in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()]
            for run_name in ("local", "flower"))
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [(r["bytes_up"], r["bytes_down"]) for r in a] == [(r["bytes_up"], r["bytes_down"]) for r in b]
