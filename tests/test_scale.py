"""Many simulated clients in one process: a client that was never sampled holds nothing but its sample
indices, checkpoints keep only the clients that hold state, and Dirichlet partitions work for
thousands of clients."""

import numpy as np

from sfprompt import checkpoint
from sfprompt.data import partition
from sfprompt.federation import prepare
from sfprompt.runner import run

from test_runner import tiny_config


def test_an_idle_client_holds_nothing_and_a_checkpoint_keeps_only_clients_with_state(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, clients=12, clients_per_round=2, rounds=2)
    assert not any(client.has_state for client in prepare(config).clients)
    run(config, progress=False, log=lambda _: None)
    saved = checkpoint.load(tmp_path / "run").clients
    sampled = {c for record in checkpoint.load(tmp_path / "run").history for c in record["clients"]}
    assert set(saved) == sampled and len(sampled) < 12


def test_a_local_classifier_made_late_is_the_one_made_early(imagefolder, tmp_path):
    first, second = prepare(tiny_config(imagefolder, tmp_path)).clients[1], prepare(tiny_config(imagefolder, tmp_path)).clients[1]
    early = first.local_head.state_dict()
    prepare(tiny_config(imagefolder, tmp_path)).clients[0].local_head  # other clients' heads change nothing
    assert all(np.array_equal(early[k], v) for k, v in second.local_head.state_dict().items())


def test_a_dirichlet_partition_of_ten_thousand_clients_keeps_every_sample_once_and_the_skew():
    labels = np.repeat(np.arange(10), 6000)
    parts = partition(labels, 10000, alpha=0.5, seed=0)
    assert min(len(p) for p in parts) == 6 and np.array_equal(np.sort(np.concatenate(parts)), np.arange(60000))
    majority = np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])
    iid = np.mean([np.bincount(labels[p]).max() / len(p) for p in partition(labels, 10000, None, seed=0)])
    assert majority > iid + 0.1  # still skewed after topping up the small clients (0.50 against 0.34)
