"""Run folders: a run, comparison, audit, export or partition picture whose `--out` is not given gets a folder of
its own under `runs/`, named by what it is and when it started (`runs/sfprompt-20261204-153012`), and
`runs/latest` is a link to the newest run (only a run's: `--from runs/latest` reads it). So nothing is
overwritten unless `--out` names a folder, and every result stays findable."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path("runs")
LATEST = "latest"


def new_folder(kind: str, root: Path = ROOT) -> Path:
    """A folder under `root` that does not exist yet, named by `kind` and the local time (made, empty, so that
    two runs started in the same second get two folders)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        folder = root / (f"{kind}-{stamp}" + (f"-{attempt + 1}" if attempt else ""))
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free folder name for {kind}-{stamp} under {root}")


def point_latest(folder: Path, root: Path = ROOT) -> bool:
    """Make `root/latest` a link to `folder` (replaced atomically). A real folder named `latest` (an older
    version's default, or one `--out` named) is left alone: returns False then."""
    latest = root / LATEST
    if latest.exists() and not latest.is_symlink():
        return False
    target = os.path.relpath(folder.resolve(), root.resolve())
    staging = root / f".{LATEST}-{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(target, target_is_directory=True)
    os.replace(staging, latest)
    return True


def latest(root: Path = ROOT) -> Path | None:
    """The folder `root/latest` points at (or is), if there is one."""
    path = root / LATEST
    return path.resolve() if path.is_dir() else None


def own_folder(config, kind: str | None = None, resume: bool = False):
    """`config` itself when it names its folder (`out`); else, to resume, `config` in the run runs/latest points
    at; else `config` writing to a new folder under runs/ named by `kind`, or for a run (no `kind`) by its method,
    with runs/latest then pointing at it."""
    from .config import ConfigError

    if config.out:
        return config
    if resume:
        if (folder := latest()) is None:
            raise ConfigError("nothing to resume: no output folder given, and runs/latest names no run")
        return config.replace(out=str(folder))
    folder = new_folder(kind or config.method)
    if kind is None and not point_latest(folder):
        print(f"sfprompt: {ROOT / LATEST} is a folder, not a link, so it still holds the run it held; this run is in "
              f"{folder}", file=sys.stderr)
    return config.replace(out=str(folder))
