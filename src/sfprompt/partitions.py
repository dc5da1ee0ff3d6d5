"""How the training set is split across clients, beyond the project's own IID and Dirichlet (`data.partition`,
which works at 10,000 clients, where flwr-datasets' Dirichlet gives up): flwr-datasets' partitioners, as an
optional extra, and a picture of any split's labels.

`--partition` names the scheme: `auto` (IID, or Dirichlet(--alpha)), `pathological:K` (each client holds K
classes: flwr-datasets' PathologicalPartitioner, every class used where clients x K reach the classes), `shard:S` (the labels sorted into shards, S
a client: its ShardPartitioner, McMahan et al.'s split) or `linear` (IID labels, client k holding a share of the
samples proportional to k + 1: its LinearPartitioner, size skew).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError, parse_partition
from .data import partition

def split(labels: np.ndarray, clients: int, scheme: str, alpha: float | None, seed: int) -> list[np.ndarray]:
    """Each client's positions in `labels` (every sample in at most one client) under `scheme`."""
    name, count = parse_partition(scheme)
    if name == "auto":
        return partition(labels, clients, alpha, seed)
    try:
        import datasets
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise ConfigError(f"--partition {scheme} uses flwr-datasets: pip install -e '.[partitions]'") from None
    if name == "pathological":
        chosen = fp.PathologicalPartitioner(clients, "label", count, class_assignment_mode="first-deterministic",
                                            seed=seed)
    elif name == "shard":
        chosen = fp.ShardPartitioner(clients, "label", num_shards_per_partition=count, seed=seed)
    else:
        chosen = fp.LinearPartitioner(clients)
    chosen.dataset = datasets.Dataset.from_dict({"label": labels.astype(np.int64), "position": np.arange(len(labels))})
    try:
        parts = [np.sort(np.asarray(chosen.load_partition(k)["position"], dtype=np.int64)) for k in range(clients)]
    except (ValueError, ZeroDivisionError) as err:  # flwr-datasets' own refusals (too few samples for the shards, ...)
        raise ConfigError(f"--partition {scheme} over {clients} clients and {len(labels)} samples: {err}") from None
    empty = [k for k, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(f"--partition {scheme} leaves client(s) {empty[:5]} without samples; use fewer clients")
    return parts


def describe(config) -> str:
    """The split a run's options ask for, as its log and pictures name it."""
    if config.partition != "auto":
        return config.partition
    return "IID" if config.alpha is None else f"Dirichlet({config.alpha})"


def label_counts(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> np.ndarray:
    """(clients, classes): how many samples of each class each client holds."""
    return np.stack([np.bincount(labels[part], minlength=classes) for part in parts])


def draw(counts: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    """The label distribution of a split: one stacked bar a client, a colour a class."""
    import matplotlib
    from matplotlib.figure import Figure

    clients, classes = counts.shape
    fig = Figure(figsize=(max(6, 0.25 * clients + 2), 4))
    ax = fig.subplots()
    bottom = np.zeros(clients)
    colours = matplotlib.colormaps["tab20" if classes > 10 else "tab10"]
    for c in range(classes):
        ax.bar(np.arange(clients), counts[:, c], bottom=bottom, color=colours(c % 20), label=class_names[c], width=0.9)
        bottom += counts[:, c]
    ax.set(xlabel="client", ylabel="training samples", title=title)
    if classes <= 20:
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def show(config) -> tuple[np.ndarray, Path]:
    """`sfprompt partition`: the run's split of its training set (as `prepare` draws it, so the same in every
    process), as counts per client and class in `out/partition.csv` and a picture in `out/partition.png`."""
    from .data import load_splits
    from .federation import train_partition

    splits = load_splits(config.dataset, config.data_dir, config.download)
    train_idx, parts = train_partition(config, splits)
    counts = label_counts(splits.train_labels[train_idx], parts, splits.num_classes)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    header = "client," + ",".join(splits.classes)
    np.savetxt(out / "partition.csv", np.column_stack([np.arange(len(parts)), counts]), fmt="%d", delimiter=",",
               header=header, comments="")
    draw(counts, splits.classes, f"{config.dataset}, {len(train_idx)} samples over {len(parts)} clients: "
         f"{describe(config)}",
         out / "partition.png")
    return counts, out
