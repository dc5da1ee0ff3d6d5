"""Issue 34's table: does each conclusion the docs drew at 56 px (a 4 x 4 grid of patches) hold at 112 px (8 x 8)?
Each conclusion compares two rows; at 56 px they are the runs the docs cite (core.sh's ablations, recipe.sh's
Fashion-MNIST rows, compare.sh's methods), at 112 px scale112.sh's (its grid and its ABLATIONS=1 rows). A row's
difference is the mean over the seeds both rows ran of the per-seed difference (the same seed: the same data and
partition), with its standard deviation. Each cell names the rounds, clients and images its runs ran, read from their
configs, so a row that changes more than the image size (the rounds, the data) shows it.

A conclusion of the kind "above" (the docs keep A as the default, or choose it, because it ends above B) holds
where the mean difference is positive, beyond the seeds' spread or within it (said so; with one seed there is no
spread, said so too), and does not hold where it is not; "level" (A and B end alike, so the docs take the one with
fewer bytes) holds where the difference is within the conclusion's tolerance. Where a conclusion also names the
bytes A saves (half, a quarter), a size at which A saves less than four fifths of that is said to hold for the
accuracy only (the rows every image shares, say, are a smaller part of a sample's rows at a finer grid).

    python benchmarks/scale_conclusions.py > docs/benchmarks/scale-112-conclusions.md
    python benchmarks/scale_conclusions.py --results DIR   # another results folder (a test's)
"""

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

CORE, LARGE = "core/{row}/seed-*", "scale-112/iid/{row}/seed-*"


@dataclass(frozen=True)
class Conclusion:
    says: str  # the docs' conclusion at 56 px, and where they draw it
    kind: str  # "above": A ends above B; "level": A and B end within `tolerance` points
    small: tuple[str, str]  # A's and B's runs at 56 px: glob patterns under the results folder
    large: tuple[str, str]  # the same at 112 px
    tolerance: float = 0.0
    saves: float | None = None  # B's bytes over A's that the conclusion names (2: "for half the bytes")


def _core(a: str, b: str) -> tuple[str, str]:
    return CORE.format(row=a), CORE.format(row=b)


def _large(a: str, b: str) -> tuple[str, str]:
    return LARGE.format(row=a), LARGE.format(row=b)


CONCLUSIONS = (
    Conclusion("The separate local classifier stays the default: it ends above the shared one (results.md, core.sh)",
               "above", _core("iid", "iid-shared-local-classifier"), _large("paper", "paper-shared-local-classifier")),
    Conclusion("Pruning per class stays the default: it ends above global top-k (results.md, core.sh)",
               "above", _core("iid", "iid-global-pruning"), _large("paper", "paper-global-pruning")),
    Conclusion("Two split epochs stay the default: they end above one (results.md, core.sh)",
               "above", _core("iid", "iid-split-epochs-1"), _large("paper", "paper-split-epochs-1")),
    Conclusion("Adam stays the default: it ends above SGD with momentum 0.9 at the same rate (results.md, core.sh)",
               "above", _core("iid", "iid-sgd"), _large("paper", "paper-sgd")),
    Conclusion("The rows every image shares, sent once a batch, change no accuracy beyond float rounding (within "
               "0.5 points) for half the bytes (method.md, wire.sh)",
               "level", _core("iid-shared-once", "iid"), _large("paper-shared-once", "paper"), tolerance=0.5,
               saves=2.0),
    Conclusion("int8 on the wire costs about half a point (within 1) for a quarter of the bytes (method.md, wire.sh)",
               "level", _core("iid-wire-int8", "iid-shared-once"), _large("paper-wire-int8", "paper-shared-once"),
               tolerance=1.0, saves=4.0),
    Conclusion("SFPrompt's default recipe ends above the federated linear probe (results.md, recipe.sh's "
               "Fashion-MNIST rows: the probe in the paper's wire format, which changes no accuracy)",
               "above", ("recipe/fashion-iid/default/seed-*", "recipe/fashion-iid/linear-probe-float32/seed-*"),
               _large("sfprompt", "linear-probe")),
    Conclusion("The linear probe ends above SplitFed with the body frozen (comparing.md)",
               "above", ("compare/iid/seed-*/linear-probe", "compare/iid/seed-*/sfl"), _large("linear-probe", "sfl")),
    Conclusion("SFPrompt's default recipe ends above SplitFed with the body frozen (comparing.md)",
               "above", ("compare/iid/seed-*/sfprompt-probe-refit", "compare/iid/seed-*/sfl"),
               _large("sfprompt", "sfl")),
)


def seed_of(run: Path) -> str:
    """The seed of a run folder: its own name (core.sh's seed-N) or its parent's (compare.sh's seed-N/METHOD)."""
    return next(part for part in reversed(run.parts) if part.startswith("seed-"))


def finished(results: Path, pattern: str) -> dict[str, dict]:
    """seed -> the summary of each finished run the pattern names."""
    return {seed_of(run): json.loads((run / "summary.json").read_text())
            for run in sorted(results.glob(pattern)) if (run / "summary.json").is_file()}


@dataclass(frozen=True)
class Measured:
    a: float  # A's and B's mean final accuracy over the seeds both ran
    b: float
    difference: float  # the mean of A - B per seed, in points, and its standard deviation (0 for one seed)
    spread: float
    seeds: int
    bytes_ratio: float  # B's bytes (up and down) over A's
    size: str  # the rounds, clients and images A's and B's runs ran, read from their configs

    def cell(self) -> str:
        pm = f" ± {self.spread:.1f}" if self.seeds > 1 else ""
        return (f"{self.a:.3f} vs {self.b:.3f}: {self.difference:+.1f}{pm} "
                f"({self.seeds} seed{'s' * (self.seeds > 1)}; {self.size})")


def size_of(summaries: list[dict]) -> str:
    """The rounds, clients and training / test images the runs ran, each size their configs hold, in order ("or"
    between several; a sample count left to the dataset's default reads "all")."""
    def size(config: dict) -> str:
        images = " / ".join("all" if config[key] is None else f"{config[key]:,}"
                            for key in ("train_samples", "test_samples"))
        clients = f"{config['clients_per_round']} of {config['clients']} clients"
        return f"{config['rounds']} rounds of {clients}, {images} images"
    return " or ".join(dict.fromkeys(size(s["config"]) for s in summaries))


def sizes_of(a: list[dict], b: list[dict]) -> str:
    """What A's and B's runs ran: once where they ran alike, else each named."""
    size_a, size_b = size_of(a), size_of(b)
    return size_a if size_a == size_b else f"A: {size_a}; B: {size_b}"


def measure(results: Path, patterns: tuple[str, str]) -> Measured | None:
    a, b = (finished(results, pattern) for pattern in patterns)
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    differences = [100 * (a[s]["final_accuracy"] - b[s]["final_accuracy"]) for s in seeds]
    sent = {name: statistics.fmean(runs[s]["bytes_up"] + runs[s]["bytes_down"] for s in seeds)
            for name, runs in (("a", a), ("b", b))}
    return Measured(statistics.fmean(a[s]["final_accuracy"] for s in seeds),
                    statistics.fmean(b[s]["final_accuracy"] for s in seeds), statistics.fmean(differences),
                    statistics.stdev(differences) if len(seeds) > 1 else 0.0, len(seeds), sent["b"] / sent["a"],
                    sizes_of([a[s] for s in seeds], [b[s] for s in seeds]))


def verdict(conclusion: Conclusion, measured: Measured | None) -> str:
    if measured is None:
        return "not measured"
    if conclusion.kind == "level":
        if abs(measured.difference) > conclusion.tolerance:
            return "does not hold"
        if conclusion.saves and measured.bytes_ratio < 0.8 * conclusion.saves:
            return (f"holds for the accuracy, not the bytes: {measured.bytes_ratio:.2f} times fewer, "
                    f"not {conclusion.saves:g}")
        return "holds"
    if measured.seeds < 2:
        return ("holds" if measured.difference > 0 else "does not hold") + " (one seed: no spread)"
    if measured.difference > 0:
        return "holds" if measured.difference > measured.spread else "holds, within the seeds' spread"
    return "does not hold" + (", within the seeds' spread" if -measured.difference <= measured.spread else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="the benchmarks' results folder")
    results = parser.parse_args().results
    print("Command: `python benchmarks/scale_conclusions.py`, from the runs under results/ (at 112 px "
          "`bash benchmarks/scale112.sh` and `ABLATIONS=1 bash benchmarks/scale112.sh`). Each cell: A's and B's mean "
          "final accuracy, then A - B in points, the mean of the per-seed differences ± their standard deviation; "
          "bytes: B's over A's (up and down, at 112 px). After the seeds, the rounds, clients and training / test "
          "images the runs ran, from their configs: a row whose two sizes differ in more than the image changes more "
          "than the image.\n")
    print("| the docs' conclusion at 56 px (A against B) | 56 px | holds there | 112 px | holds there | bytes B / A |")
    print("|---|---|---|---|---|---|")
    for conclusion in CONCLUSIONS:
        small, large = measure(results, conclusion.small), measure(results, conclusion.large)
        print(f"| {conclusion.says} | {small.cell() if small else '—'} | {verdict(conclusion, small)} "
              f"| {large.cell() if large else '—'} | {verdict(conclusion, large)} "
              f"| {f'{large.bytes_ratio:.2f}' if large else '—'} |")


if __name__ == "__main__":
    main()
