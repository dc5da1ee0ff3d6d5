"""Many concurrent clients on the body channel (the load benchmark's driver, run small)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned processes inherit it
import body_load  # noqa: E402


def test_32_concurrent_clients_get_every_batch_answered_once_and_only_their_own():
    result = body_load.run_load(clients=32, batches=10)
    assert result["errors"] == []
    assert result["answered"] == [10] * 32
    assert result["server_after"]["pending"] == 0  # nothing held once every backward came
