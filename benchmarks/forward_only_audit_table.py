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
    "gradient_with_prior": "gradient attack with the guess",
    "trajectory": "trajectory, each step's tail",
    "trajectory_broadcast_tail": "trajectory, broadcast tail",
    "advantage": "best attack - label-free",
    "corrected": "label-free errors corrected",  # (best attack - label-free) / (1 - label-free)
}


def main(out: Path, rows: list[str]) -> None:
    print("| row | seeds | samples sent | steps read | " + " | ".join(COLUMNS.values())
          + " | one step: label-free | one step: trajectory |")
    print("|---" * (len(COLUMNS) + 6) + "|")
    for name in rows:
        audits = [json.loads(p.read_text())["labels"] for p in sorted((out / name).glob("seed-*/audit.json"))]
        if not audits:
            continue
        for audit in audits:  # what share of the guess's errors the messages put right (none when it made none)
            wrong = 1 - audit["label_free"]
            audit["corrected"] = (audit["best_attack"] - audit["label_free"]) / wrong if wrong > 0 else None
        def cell(get, digits: int = 3) -> str:  # the seeds' mean and spread, blank where no audit has the figure
            values = [value for audit in audits if (value := get(audit)) is not None]
            return spread(values, digits) if values else ""

        cells = [cell(lambda a, key=key: a.get(key)) for key in COLUMNS]
        steps = [cell(lambda a, key=key: a.get("one_step", {}).get(key)) for key in ("label_free", "trajectory")]
        print(f"| {name} | {len(audits)} | {cell(lambda a: a['samples'], 0)} | {cell(lambda a: a.get('steps_read'), 0)} | "
              + " | ".join(cells + steps) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
