"""sfprompt: split federated prompt fine-tuning of pre-trained Vision Transformers.

Flags are generated from `Config`, so the CLI, TOML files and the docs never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from .compare import VARIANTS  # light: the config and run folders only
from .config import RECIPES, Config, ConfigError, default_text, recipe_options, toml_options
from .data import DATASETS


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, help="start from a named set of options (`paper`: the SFPrompt "
                        "paper's recipe, as first implemented here); --config and flags override it")
    parser.add_argument("--config", help="TOML file of options (flags override it)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        shown = "off" if f.default is False else "on" if f.default is True else default_text(f.name)
        common: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {shown})", "default": argparse.SUPPRESS}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            caster = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(flag, type=caster, choices=f.metadata.get("choices"), **common)


_AUDIT_HELP = {
    "victim": "the client whose messages are attacked",
    "images": "how many of the images it sends are reconstructed and scored",
    "aux_samples": "auxiliary images of the test split the attacker learns from (no client holds them)",
    "gallery": "re-identification candidates per image: the original and others of its class (chance 1/N)",
    "steps": "steps of the white-box optimisation attack",
    "inversion_epochs": "training epochs of the learned inversion network",
    "seed": "the attacker's own randomness and the choice of gallery",
    "sends": "which of the victim's sends are attacked: round, those of one round (the method's first own round, "
             "after any probe rounds; with --from, a further round from that run's final params), or run, every "
             "send it makes in the whole run (replayed from its start, each with the params it was made with)",
    "uploads": "what the server holds of the victim's uploads: seen, each one (no secure aggregation), or "
               "aggregated, only their sum with the other clients' (secure aggregation): its own guesses then read "
               "the tail it broadcast, and the audit says what the upload alone would have named",
}


def _add_audit_flags(parser: argparse.ArgumentParser) -> None:
    from .audit import AuditOptions

    for f in dataclasses.fields(AuditOptions):
        flag = "--" + ("attack-seed" if f.name == "seed" else f.name.replace("_", "-"))
        choices = {"sends": ["round", "run"], "uploads": ["seen", "aggregated"]}
        kind = {"type": str, "choices": choices[f.name]} if f.name in choices else {"type": int, "metavar": "N"}
        parser.add_argument(flag, dest=f"audit_{f.name}", default=f.default, **kind,
                            help=f"{_AUDIT_HELP[f.name]} (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfprompt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune over a simulated federation (one method)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last complete round, with its "
                     "saved options (only --rounds and --device may be given, e.g. --rounds 10 to extend a run that "
                     "does not close with refit rounds)")
    _add_config_flags(run)
    compare = commands.add_parser("compare", help="run several methods on the same partition and seed, then "
                                  "write comparison.csv, comparison.md and plots to --out")
    compare.add_argument("--methods", default="fl,fl-prompt,sl,sfl,sfprompt,linear-probe",
                         help=f"comma-separated methods or variants ({', '.join(VARIANTS)}) "
                              "(default: %(default)s)")
    compare.add_argument("--target-accuracy", type=float,
                         help="also report the bytes and client FLOPs each method spent to first reach it")
    compare.add_argument("--seeds", metavar="LIST",
                         help="run the whole comparison once per seed (comma-separated, each into --out/seed-S) and "
                              "report the mean and spread (default: --seed alone)")
    compare.add_argument("--method-options", metavar="FILE", nargs="+",
                         help="TOML files of options per method or variant, e.g. each one's tuned learning rates "
                              "(`[fl]` then `backbone_lr = 3e-5`; a variant also takes its method's), as "
                              "benchmarks/tune.py writes them; a later file adds to or overrides an earlier one")
    _add_config_flags(compare)
    cost = commands.add_parser("cost", help="per-client, per-round compute and communication of every method for "
                               "an architecture (its rounds run on fake weights: seconds; --out FILE.json to save)")
    cost.add_argument("--samples-per-client", type=int, default=500, help="local samples (default: %(default)s)")
    cost.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default: %(default)s)")
    cost.add_argument("--probe-samples", type=int,
                      help="samples run through the model by each method, then scaled (default: enough for a "
                           "full --batch-size batch in every phase, so peak memory is the run's)")
    cost.add_argument("--methods", default="fl,fl-prompt,sl,sfl,sfprompt,linear-probe",
                      help="comma-separated methods or variants, as compare takes them (default: %(default)s)")
    _add_config_flags(cost)
    predict = commands.add_parser("predict", help="apply a finished run's model to an image folder or the run's "
                                  "own test (or train) split; write the top-1 class and probabilities to CSV")
    predict.add_argument("--from", dest="from_dir", metavar="DIR", required=True,
                         help="the run folder (or its global.safetensors)")
    predict.add_argument("--images", metavar="FOLDER", help="predict every image under FOLDER (recursively)")
    predict.add_argument("--split", choices=("test", "train"), default="test",
                         help="without --images: the run's own split, labelled, so the accuracy is printed "
                              "(default: %(default)s)")
    predict.add_argument("--out", metavar="FILE", help="the CSV (default: DIR/predictions.csv)")
    predict.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    audit = commands.add_parser("audit", help="attack one client's real messages as an honest-but-curious server "
                                "would; write audit.json and audit.png to --out (or to the run folder of --from)")
    audit.add_argument("--from", dest="from_dir", metavar="DIR",
                       help="attack with the global params of the finished run in DIR, with its options "
                            "(only --device, and --out for the audit's own folder, may be given); with --sends "
                            "run, that run replayed")
    _add_audit_flags(audit)
    _add_config_flags(audit)
    export = commands.add_parser("export-clients", help="write each client's partition of the run's training data "
                                 "(--dataset, --train-samples, --clients, --alpha, --seed) as its own image folder, "
                                 "--out/client-K: a SuperNode's data-folder")
    _add_config_flags(export)
    partition = commands.add_parser("partition", help="show how the run's training set is split across its clients "
                                    "(--partition, --alpha, --clients, --seed): counts per class as CSV and a picture")
    _add_config_flags(partition)
    plot = commands.add_parser("plot", help="draw runs' accuracy against rounds, bytes and client FLOPs, side by side")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run folders (finished or still going)")
    plot.add_argument("--out", metavar="DIR", help="where the pictures go (default: the run's folder for one run, "
                      "else a new folder runs/plot-DATE-TIME)")
    commands.add_parser("datasets", help="list the dataset names --dataset accepts")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The recipe first, then the TOML file, then the flags given on the command line (only those given)."""
    names = {f.name for f in dataclasses.fields(Config)}
    flags = {name: value for name, value in vars(args).items() if name in names}
    if args.command in ("export-clients", "partition") and "clients" in flags:  # no rounds: sampling must not refuse few clients
        flags.setdefault("clients_per_round", min(flags["clients"], Config.clients_per_round))
    if getattr(args, "resume", None):
        return _resumed_config(Path(args.resume), flags, args.config)
    if getattr(args, "from_dir", None):
        from .audit import run_from

        others = sorted(set(flags) - {"device", "out"}) + (["config"] if args.config else [])
        if others:
            raise ConfigError(f"--from audits a finished run with its saved options; only --device and --out may be "
                              f"given, not {', '.join('--' + name.replace('_', '-') for name in others)}")
        replayed = getattr(args, "audit_sends", "round") == "run"  # needs the run's options alone
        return run_from(Path(args.from_dir), flags.get("device"), params=not replayed, out=flags.get("out"))
    recipe = recipe_options(args.recipe) if getattr(args, "recipe", None) else {}
    return Config.from_dict({**recipe, **(toml_options(args.config) if args.config else {}), **flags})


def _resumed_config(folder: Path, flags: dict[str, Any], config_file: str | None) -> Config:
    """The config a run in `folder` was started with, with --rounds / --device changed if given."""
    allowed = {"rounds", "device"}
    others = sorted(set(flags) - allowed) + (["config"] if config_file else [])
    if others:
        raise ConfigError(f"--resume continues a run with its saved options; only --rounds and --device may be "
                          f"given, not {', '.join('--' + name.replace('_', '-') for name in others)}")
    saved = folder / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume {folder}: no config.json there (is it a run folder?)")
    import json

    try:
        values = json.loads(saved.read_text())
    except ValueError as err:
        raise ConfigError(f"--resume {folder}: config.json is not valid JSON ({err})") from None
    return Config.from_saved({**values, **flags, "out": str(folder)})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "datasets":
        print("\n".join(DATASETS))
        return 0
    if args.command == "plot":
        return _plot(args)
    if args.command == "predict":
        from .predict import predict

        try:
            predict(Path(args.from_dir), Path(args.images) if args.images else None, args.split,
                    Path(args.out) if args.out else None, args.device, not args.no_progress)
        except ConfigError as err:
            return _error(err, 2)
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as err:
        return _error(err, 2)
    from . import runner  # heavy imports only once the arguments are known to be good

    config = _with_own_folder(args, config)

    try:
        _dispatch(args, config)
    except ConfigError as err:  # also a damaged checkpoint given to --resume
        return _error(err, 2)
    except runner.RoundFailed as err:
        return _error(err, 1)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .compare import plot_runs
    from .runs import new_folder

    folders = [Path(run) for run in args.runs]
    out = Path(args.out) if args.out else folders[0] if len(folders) == 1 else new_folder("plot")
    try:
        pictures = plot_runs(folders, out)
    except ConfigError as err:
        return _error(err, 2)
    print("wrote " + ", ".join(str(picture) for picture in pictures))
    return 0


def _with_own_folder(args: argparse.Namespace, config: Config) -> Config:
    """Without --out, a run, comparison, audit or export writes to a new folder of its own under runs/, and
    runs/latest points at it (sfprompt.runs)."""
    if args.command not in FOLDER_KINDS or getattr(args, "resume", None) or getattr(args, "from_dir", None):
        return config
    from .runs import own_folder

    return own_folder(config, FOLDER_KINDS[args.command])


FOLDER_KINDS = {"run": None, "compare": "compare", "audit": "audit", "export-clients": "clients",
                "partition": "partition"}  # folder names (a run's: its method; only a run moves runs/latest)


def _error(err: Exception, status: int) -> int:
    print(f"sfprompt: error: {err}", file=sys.stderr)
    return status


def _dispatch(args: argparse.Namespace, config: Config) -> None:
    from . import compare, runner

    if args.command == "run":
        runner.run(config, progress=not args.no_progress, resume=bool(args.resume))
    elif args.command == "export-clients":
        from .federation import export_clients

        folders = export_clients(config, Path(config.out), progress=not args.no_progress)
        print(f"wrote {len(folders)} client folders to {Path(config.out).resolve()} (client-0 ... client-{len(folders) - 1})")
    elif args.command == "partition":
        from .partitions import show

        counts, out = show(config)
        sizes = counts.sum(1)
        print(f"{len(counts)} clients, {sizes.min()} to {sizes.max()} samples, {(counts > 0).sum(1).min()} to "
              f"{(counts > 0).sum(1).max()} classes each; counts in {out / 'partition.csv'}, picture in "
              f"{out / 'partition.png'}")
    elif args.command == "audit":
        from .audit import AuditOptions, run_audit

        options = AuditOptions(**{name[len("audit_"):]: value for name, value in vars(args).items()
                                  if name.startswith("audit_")})
        run_audit(config, options, Path(args.from_dir) if args.from_dir else None, progress=not args.no_progress)
    elif args.command == "cost":
        _cost(args, config, compare.parse_methods(args.methods))
    else:
        if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
        names = compare.parse_methods(args.methods)
        options = compare.load_method_options(*args.method_options) if args.method_options else None
        seeds = compare.parse_seeds(args.seeds) if args.seeds else None
        rows = compare.compare(config, names, args.target_accuracy,
                               lambda c: runner.run_or_reuse(c, progress=not args.no_progress), options, seeds)
        compare.write(rows, Path(config.out), args.target_accuracy)
        print(compare.markdown(rows, args.target_accuracy))


def _cost(args: argparse.Namespace, config: Config, methods: list[str]) -> None:
    import json

    from . import cost

    for name in ("samples_per_client", "num_classes", "probe_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.client_budgets is not None:
        raise ConfigError("cost measures one split point: pass --client-blocks K for each split your budgets give "
                          "(`sfprompt run` prints which clients get which, with each head's GFLOP per sample)")
    results = cost.estimate(config, args.samples_per_client, args.num_classes, methods, args.probe_samples)
    print(f"{config.model} at {config.image_size}px, {args.samples_per_client} samples per client, "
          f"keep ratio {config.keep_ratio}, {config.prompt_tokens} prompts, {config.client_blocks} client blocks, "
          f"local epochs {config.local_epochs}, split epochs {config.split_epochs} (per client, per round)")
    print(cost.table(results))
    if "out" in vars(args):  # only when asked for: the run default (a folder) is not a JSON file
        inputs = {"samples_per_client": args.samples_per_client, "num_classes": args.num_classes,
                  "probe_samples": args.probe_samples, "config": config.to_dict()}
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps({"inputs": inputs, "per_client_per_round": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
