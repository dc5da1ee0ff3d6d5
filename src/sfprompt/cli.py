"""`sfprompt run`: flags are generated from `Config`, so the CLI, TOML files and docs never drift."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from .config import Config, ConfigError
from .data import DATASETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune with SFPrompt over a simulated federation",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--config", help="TOML file of options (flags override it)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        common: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if kind == "bool":
            run.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            caster = int if "int" in kind else float if "float" in kind else str
            run.add_argument(flag, type=caster, choices=f.metadata.get("choices"), **common)
    commands.add_parser("datasets", help="list the dataset names --dataset accepts")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """TOML file first, then the flags given on the command line (only those given)."""
    names = {f.name for f in dataclasses.fields(Config)}
    flags = {name: value for name, value in vars(args).items() if name in names}
    return Config.from_toml(args.config, **flags) if args.config else Config.from_dict(flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "datasets":
        print("\n".join(DATASETS))
        return 0
    try:
        config = config_from_args(args)
        from .runner import run  # heavy imports only once the arguments are known to be good

        run(config, progress=not args.no_progress)
    except ConfigError as err:
        print(f"sfprompt: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
