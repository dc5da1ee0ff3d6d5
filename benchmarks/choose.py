"""The "which method to choose" table: every method of the comparison side by side, with what it costs and
what the server can recover from it.

    python benchmarks/choose.py results/compare results/choose > docs/benchmarks/choose.md

Accuracy is each method's final test accuracy on the comparison's setting (compare.sh's runs: the mean
and spread over their seeds, IID and Dirichlet(0.5)); the costs are the IID runs' means over the run;
what the server recovers comes from `sfprompt audit` of each split method on the same setting (choose.sh's
audits, in AUDITS/METHOD/audit.json). fl and fl-prompt send no activations: what the server holds of
them is their uploads, which no audit here inverts.
"""

import json
import statistics
import sys
from pathlib import Path

from table import spread

METHODS = ["linear-probe", "sfprompt", "sfprompt-probe-refit", "sfl", "sl", "sfl-train-body", "fl-prompt", "fl"]
UPLOADS = {  # what the server holds of the methods that send no activations or gradients
    "fl": "each client's whole fine-tuned model, every round (not audited here)",
    "fl-prompt": "each client's prompts and tail, every round (not audited here)",
}


def summaries(root: Path, partition: str, method: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((root / partition).glob(f"seed-*/{method}/summary.json"))]


def recovered(audits: Path, method: str) -> tuple[str, str]:
    """(images, labels): what the best attack recovered from the method's messages, or why there is no audit."""
    if method in UPLOADS:
        return UPLOADS[method], "as their uploads allow (not audited here)"
    path = audits / method / "audit.json"
    if not path.is_file():
        return "not audited yet", "not audited yet"
    audit = json.loads(path.read_text())
    best, labels = audit["reconstruction"]["best"], audit["labels"]
    images = f"{best['reidentified']:.0%} re-identified, PSNR {best['psnr']:.1f} dB"
    source = "statistics" if "statistics" in labels else "gradients"
    guess = labels.get("best_label_free", labels["label_free"])  # the better guess, where a whole run gives two
    return images, f"{labels['best_attack']:.0%} from its {source} (label-free: {guess:.0%})"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: choose.py COMPARE_RESULTS AUDITS")
    root, audits = Path(sys.argv[1]), Path(sys.argv[2])
    print("Command: `bash benchmarks/choose.sh`, from compare.sh's runs (Fashion-MNIST, 2,500 train / 1,000 test, 10 "
          "clients, 5 a round, 5 rounds, each method's tuned options) and an `sfprompt audit` of each split method on "
          "the same setting (client 0's first round, 100 images). Accuracy: mean ± standard deviation over the seeds; "
          "costs: the IID runs' means over the whole run.\n")
    print("| method | accuracy, IID | accuracy, Dirichlet(0.5) | MB up + down | client GFLOP | client peak MiB "
          "| server GFLOP | what the server recovers: images | labels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        iid, skewed = summaries(root, "iid", method), summaries(root, "dirichlet-0.5", method)
        if not iid:
            continue
        mean = lambda key: statistics.fmean(s[key] for s in iid)  # noqa: E731
        images, labels = recovered(audits, method)
        if method != "linear-probe" and any(iid[0]["config"].get(key) for key in ("probe_rounds", "refit_rounds")):
            labels += "; its probe rounds' statistics show each client's label counts"
        skewed_accuracy = spread([s["final_accuracy"] for s in skewed], 3) if skewed else "—"
        print(f"| {method} | {spread([s['final_accuracy'] for s in iid], 3)} | {skewed_accuracy} "
              f"| {(mean('bytes_up') + mean('bytes_down')) / 1e6:,.0f} | {mean('client_flops') / 1e9:,.1f} "
              f"| {max(s['client_peak_memory_bytes'] for s in iid) / 2**20:,.1f} | {mean('server_flops') / 1e9:,.0f} "
              f"| {images} | {labels} |")


if __name__ == "__main__":
    main()
