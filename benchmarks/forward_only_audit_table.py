"""The table of benchmarks/forward_only_audit.sh: what each row's audits infer of the labels.

    python benchmarks/forward_only_audit_table.py results/forward-only-audit backprop forward-only-4 ...
"""

import json
import sys
from pathlib import Path

from table import spread  # the script's folder is on sys.path

COLUMNS = {  # audit.json's labels -> the column
    "label_free": "label-free guess",
    "gradient": "gradient attack",
    "gradient_broadcast_tail": "gradient attack, broadcast tail",
    "gradient_with_prior": "gradient attack with the guess",
    "trajectory": "trajectory, each step's tail",
    "trajectory_broadcast_tail": "trajectory, broadcast tail",
    "advantage": "best attack - label-free",
}
UPLOAD = {"upload_alone": "the upload alone"}  # audits with --uploads aggregated: what it would have named by itself


def corrected(audits: list[dict], attack: str) -> str:
    """How many of the label-free guess's wrong labels `attack` names right, pooled over the seeds (a seed whose
    guess is nearly always right has too few for a share of its own)."""
    if not all(attack in audit for audit in audits):
        return ""
    wrong = sum(round((1 - audit["label_free"]) * audit["samples"]) for audit in audits)
    right = sum(round((audit[attack] - audit["label_free"]) * audit["samples"]) for audit in audits)
    return f"{right} of {wrong}" + (f" ({right / wrong:.0%})" if wrong else "")


def main(out: Path, rows: list[str]) -> None:
    found = {name: [json.loads(p.read_text())["labels"] for p in sorted((out / name).glob("seed-*/audit.json"))]
             for name in rows}
    columns = COLUMNS | (UPLOAD if any("upload_alone" in a for audits in found.values() for a in audits) else {})
    print("| row | seeds | samples sent | steps read | " + " | ".join(columns.values())
          + " | guess's errors corrected, best attack | the same, broadcast tail"
          + " | one step: label-free | one step: trajectory |")
    print("|---" * (len(columns) + 8) + "|")
    for name, audits in found.items():
        if not audits:
            continue

        def cell(get, digits: int = 3) -> str:  # the seeds' mean and spread, blank where no audit has the figure
            values = [value for audit in audits if (value := get(audit)) is not None]
            return spread(values, digits) if values else ""

        cells = [cell(lambda a, key=key: a.get(key)) for key in columns]
        cells += [corrected(audits, "best_attack"),  # and what the tail it holds anyway gives
                  corrected(audits, "trajectory_broadcast_tail") or corrected(audits, "gradient_broadcast_tail")]
        cells += [cell(lambda a, key=key: a.get("one_step", {}).get(key)) for key in ("label_free", "trajectory")]
        print(f"| {name} | {len(audits)} | {cell(lambda a: a['samples'], 0)} | {cell(lambda a: a.get('steps_read'), 0)} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
