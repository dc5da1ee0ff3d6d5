"""Run folders: a run, comparison, audit or export whose `--out` is not given gets a folder of its own under
`runs/`, named by what it is and when it started (`runs/sfprompt-20261204-153012`), and `runs/latest` is a
link to the newest. So nothing is overwritten unless `--out` names a folder, every result stays findable, and
`--from runs/latest` still reads the run just made."""

from __future__ import annotations

import os
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


def own_folder(config, kind: str | None = None):
    """`config` itself when it names its folder (`out`); else `config` writing to a new folder under runs/ named
    by `kind` (default: the method), with runs/latest pointing at it."""
    if config.out:
        return config
    folder = new_folder(kind or config.method)
    point_latest(folder)
    return config.replace(out=str(folder))
