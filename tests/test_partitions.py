"""--partition: flwr-datasets' partitioners beside the project's own split, and `sfprompt partition`'s picture."""

import numpy as np
import pytest

from sfprompt.cli import main
from sfprompt.config import Config, ConfigError
from sfprompt.partitions import label_counts, split

from conftest import TINY_RUN

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 30 a class


def test_pathological_gives_each_client_its_classes_and_uses_every_class():
    parts = split(LABELS, 10, "pathological:2", None, seed=0)
    counts = label_counts(LABELS, parts, 10)
    assert ((counts > 0).sum(1) <= 2).all() and (counts.sum(0) > 0).all()
    assert len(np.concatenate(parts)) == len(np.unique(np.concatenate(parts)))  # no sample in two clients
    assert all(np.array_equal(a, b) for a, b in zip(parts, split(LABELS, 10, "pathological:2", None, seed=0)))


def test_shards_and_size_skew():
    shards = label_counts(LABELS, split(LABELS, 10, "shard:2", None, seed=1), 10)
    assert ((shards > 0).sum(1) <= 4).all() and shards.sum() <= len(LABELS)  # two label-sorted shards: few classes
    sizes = [len(part) for part in split(LABELS, 5, "linear", None, seed=0)]
    assert sizes == sorted(sizes) and sizes[-1] >= 4 * sizes[0]  # client k's share grows with k + 1


def test_the_option_is_checked():
    for bad in ("pathological", "shard:0", "linear:3", "dirichlet", "pathological:x"):
        with pytest.raises(ConfigError, match="--partition must be"):
            Config(partition=bad)
    with pytest.raises(ConfigError, match="--alpha is the Dirichlet of --partition auto"):
        Config(partition="shard:2", alpha=0.5)
    with pytest.raises(ConfigError, match="--partition linear over 10 clients and 12 samples"):
        split(LABELS[:12], 10, "linear", None, seed=0)


def test_sfprompt_partition_draws_the_split_a_run_uses_and_a_run_trains_on_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    options = ["--partition", "pathological:1", "--train-samples", "40", "--clients", "4", "--clients-per-round", "2"]
    assert main(["partition", *options, "--out", "split"]) == 0
    assert (tmp_path / "split" / "partition.png").is_file()
    rows = (tmp_path / "split" / "partition.csv").read_text().splitlines()
    assert rows[0].startswith("client,") and len(rows) == 5
    assert all(sum(int(v) > 0 for v in row.split(",")[1:]) == 1 for row in rows[1:])  # one class a client
    assert "4 clients" in capsys.readouterr().out
    assert main(["run", *TINY_RUN, "--partition", "pathological:1", "--no-progress"]) == 0
