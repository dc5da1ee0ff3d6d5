"""The table of benchmarks/forward_only_audit.sh: what each row's audits infer of the labels.

    python benchmarks/forward_only_audit_table.py [--uploads aggregated] [--sends run] results/forward-only-audit ...

Every audit read must have been made with the given --uploads and --sends (an audit from before an option was made
with its default), so a table never mixes what a server holds under secure aggregation with what it holds without,
nor one round's sends with a whole run's.
"""

import argparse
import json
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
HELD = {  # where an audit has them: the guess of the model the server holds (a whole run's final model, one round's
    # broadcast model), the attacks with it as their prior, and the trajectory through the tails the server replays
    # (audits made before these lack them)
    "final_model": "final model's guess",
    "broadcast_model": "broadcast model's guess",
    "gradient_final_prior": "gradient attack, final model elsewhere",
    "gradient_broadcast_prior": "gradient attack, broadcast model elsewhere",
    "trajectory_final_prior": "trajectory from the final model's guess",
    "trajectory_broadcast_prior": "trajectory from the broadcast model's guess",
    "trajectory_replayed_tail": "trajectory, replayed tails",
}


def corrected(audits: list[dict], attack: str, guess: str = "label_free") -> str:
    """How many of the `guess`'s wrong labels `attack` names right, pooled over the seeds (a seed whose guess is
    nearly always right has too few for a share of its own); net of the right ones it makes wrong."""
    if not all(attack in audit for audit in audits):
        return ""
    guesses = [audit.get(guess, audit["label_free"]) for audit in audits]  # (one from before the held model's)
    wrong = sum(round((1 - of) * audit["samples"]) for of, audit in zip(guesses, audits))
    right = sum(round((audit[attack] - of) * audit["samples"]) for of, audit in zip(guesses, audits))
    return f"{right} of {wrong}" + (f" ({right / wrong:.0%})" if wrong else "")


def read(out: Path, rows: list[str], uploads: str, sends: str) -> dict[str, list[dict]]:
    """Each row's audits' label figures, refusing an audit made with other --uploads or --sends."""
    found = {}
    for name in rows:
        found[name] = []
        for path in sorted((out / name).glob("seed-*/audit.json")):
            audit = json.loads(path.read_text())
            for option, wanted, default in (("uploads", uploads, "seen"), ("sends", sends, "round")):
                made = audit["audit"].get(option, default)
                if made != wanted:
                    raise SystemExit(f"{path} was audited with --{option} {made}, not {wanted}: remove it or audit "
                                     "into another folder (OUT)")
            found[name].append(audit["labels"])
    return found


def main(out: Path, rows: list[str], uploads: str, sends: str) -> None:
    found = read(out, rows, uploads, sends)
    held = {key for audits in found.values() for audit in audits for key in audit}  # the figures some audit has
    columns = COLUMNS | (UPLOAD if "upload_alone" in held else {}) | {k: v for k, v in HELD.items() if k in held}
    broadcast = "the same, broadcast tail"
    if held & {"final_model", "broadcast_model"}:  # the advantage over the better of the two guesses: last
        columns["advantage"] = columns.pop("advantage").replace("label-free", "best label-free")
        if uploads == "seen":  # (aggregated, the label-free guess is the broadcast tail's already)
            broadcast = "broadcast tail's, against the uploaded tail's guess"
    print("| row | seeds | samples sent | steps read | " + " | ".join(columns.values())
          + f" | guess's errors corrected, best attack | {broadcast} | one step: label-free | one step: trajectory |")
    print("|---" * (len(columns) + 8) + "|")
    for name, audits in found.items():
        if not audits:
            continue

        def cell(get, digits: int = 3) -> str:  # the seeds' mean and spread, blank where no audit has the figure
            values = [value for audit in audits if (value := get(audit)) is not None]
            return spread(values, digits) if values else ""

        cells = [cell(lambda a, key=key: a.get(key)) for key in columns]
        cells += [corrected(audits, "best_attack", "best_label_free"),  # and what the tail it holds anyway gives
                  corrected(audits, "trajectory_broadcast_tail") or corrected(audits, "gradient_broadcast_tail")]
        cells += [cell(lambda a, key=key: a.get("one_step", {}).get(key)) for key in ("label_free", "trajectory")]
        print(f"| {name} | {len(audits)} | {cell(lambda a: a['samples'], 0)} | {cell(lambda a: a.get('steps_read'), 0)} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", choices=("seen", "aggregated"), default="seen")
    parser.add_argument("--sends", choices=("round", "run"), default="round")
    parser.add_argument("out", type=Path)
    parser.add_argument("rows", nargs="+")
    arguments = parser.parse_args()
    main(arguments.out, arguments.rows, arguments.uploads, arguments.sends)
