"""Write docs/privacy.md's measured table from the runs and audits of benchmarks/privacy.sh.

    python benchmarks/privacy_table.py results/privacy docs/privacy.md none shuffle ...

The names are the table's rows in order; each is a folder of OUT holding `seed-K/` runs
(summary.json) and, in `seed-0/`, the audit of that run (audit.json, audit.png); `OUT/fl` is the
`fl` run whose client FLOPs are the reference.
The table replaces what lies between the `<!-- privacy-table -->` markers of the document, and the
audit pictures are copied to privacy/ beside the document.
"""

import json
import shutil
import sys
from pathlib import Path

from table import spread  # the script's folder is on sys.path

from sfprompt.config import Config

START, END = "<!-- privacy-table -->", "<!-- /privacy-table -->"
OPTIONS = ("client_blocks", "pool_tokens", "shuffle_tokens", "clip_norm", "noise_multiplier", "label_epsilon")
FORWARD_ONLY = ("prompt_updates", "directions", "shared_rows")  # shown where prompts step without a gradient
DEFAULT_ESTIMATE = {name: getattr(Config(), name) for name in ("estimator", "perturbation")}  # and these where not


def options(config: dict) -> str:
    """The privacy options a row was run with, as flags (and its method, when it is not SFPrompt)."""
    flags = [] if config["method"] == "sfprompt" else [f"--method {config['method']}"]
    forward_only = config.get("prompt_updates") == "forward-only"  # runs before the option have no key
    for name in OPTIONS + (FORWARD_ONLY + tuple(DEFAULT_ESTIMATE) if forward_only else ()):
        value = config[name]
        if value in (None, False, 0, 0.0) or (name in DEFAULT_ESTIMATE and value == DEFAULT_ESTIMATE[name]):
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        else:
            flags.append(f"{flag} {value if isinstance(value, str) else format(value, 'g')}")
    return " ".join(flags) or "(none)"


def accuracy(row: Path) -> str:
    """The mean final accuracy over the row's seeds and its spread, as every table here writes it."""
    finals = [json.loads(s.read_text())["final_accuracy"] for s in sorted(row.glob("seed-*/summary.json"))]
    return f"{spread(finals, 3)} ({len(finals)} seed{'s' * (len(finals) != 1)})"


def line(row: Path, audit: dict, fl_flops: float, document: Path) -> str:
    summary = json.loads((row / "seed-0" / "summary.json").read_text())
    best, mean, labels = audit["reconstruction"]["best"], audit["reconstruction"]["class_mean"], audit["labels"]
    guess = labels.get("best_label_free", labels["label_free"])  # the better guess, where a whole run gives two
    epsilon = audit["activation_privacy"]["epsilon"]
    picture = Path("privacy", f"{row.name}.png")  # relative to the document
    (document.parent / picture).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(row / "seed-0" / "audit.png", document.parent / picture)
    return (f"| {row.name} | `{options(audit['config'])}` | {best['reidentified']:.0%} | {best['psnr']:.1f} "
            f"| {best['ssim']:.2f} | {mean['psnr']:.1f} / {mean['ssim']:.2f} "
            f"| {labels['best_attack']:.0%} / {guess:.0%} | {accuracy(row)} "
            f"| {(summary['bytes_up'] + summary['bytes_down']) / 1e6:.0f} "
            f"| {100 * summary['client_flops'] / fl_flops:.2f} % "
            f"| {'—' if epsilon is None else f'{epsilon:.3g}'} | [grid]({picture.as_posix()}) |")


def sends(audits: dict[Path, dict]) -> str:
    """Which of its victim's sends each row's audit attacked (`sfprompt audit --sends`; an audit made before the
    option attacked a round's)."""
    kinds = {row.name: audit["audit"].get("sends", "round") for row, audit in audits.items()}
    whole = [name for name, kind in kinds.items() if kind == "run"]
    if not whole:
        return "Each audit attacks its victim's sends of one round (`sfprompt audit --sends round`)."
    if len(whole) == len(kinds):
        return "Each audit attacks every send its victim makes over the whole run (`sfprompt audit --sends run`)."
    return (f"The audits of {', '.join(whole)} attack every send their victim makes over the whole run "
            "(`--sends run`); the others, one round's.")


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit("usage: privacy_table.py OUT_DIR DOCUMENT.md ROW...")
    root, document, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    fl_flops = json.loads((root / "fl" / "summary.json").read_text())["client_flops"]
    audits = {root / name: json.loads((root / name / "seed-0" / "audit.json").read_text())  # the audited rows
              for name in names if (root / name / "seed-0" / "audit.json").is_file()}
    table = [
        "| configuration | privacy options | re-identified by the best attack (chance 1 %) | best PSNR dB | best SSIM "
        "| class-mean image PSNR / SSIM | labels: inferred / label-free | final accuracy | MB up + down "
        "| client FLOPs / `fl` | activation ε (δ = 1e-5) | reconstructions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(line(row, audit, fl_flops, document) for row, audit in audits.items()),
        "",
        sends(audits),
    ]
    text = document.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    document.write_text(head + START + "\n" + "\n".join(table) + "\n" + END + tail)
    print("\n".join(table))


if __name__ == "__main__":
    main()
