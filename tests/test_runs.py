"""Run folders: without --out every run, comparison and audit writes to a new folder under runs/ and runs/latest
points at the newest, so that nothing is overwritten unless --out names a folder."""

import json
import os

from sfprompt import runs
from sfprompt.cli import main
from sfprompt.config import Config

from conftest import TINY_AUDIT, TINY_RUN

TINY = [*TINY_RUN, "--no-progress"]


def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY]) == 0
    assert main(["run", *TINY, "--method", "sfl"]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(folders) == 2 and folders[0].startswith("sfl-") and folders[1].startswith("sfprompt-")
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == folders[0]  # relative: the folder can move
    assert json.loads((latest / "summary.json").read_text())["method"] == "sfl"
    for folder in folders:  # both kept whole
        assert (tmp_path / "runs" / folder / "summary.json").is_file()
    saved = json.loads((latest / "config.json").read_text())["out"]
    assert saved == str(runs.ROOT / folders[0])  # the config printed and saved names the folder taken
    assert main(["audit", *TINY, *TINY_AUDIT]) == 0  # an audit of the defaults: a folder of its own too,
    audits = list((tmp_path / "runs").glob("audit-*"))  # and runs/latest stays on the newest run
    assert len(audits) == 1 and (audits[0] / "audit.json").is_file() and os.readlink(latest) == folders[0]


def test_out_names_a_folder_and_a_real_latest_folder_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY, "--out", "runs/latest"]) == 0  # an older version's default, or a chosen name
    first = (tmp_path / "runs" / "latest" / "summary.json").read_text()
    assert main(["run", *TINY]) == 0
    assert not (tmp_path / "runs" / "latest").is_symlink()
    assert (tmp_path / "runs" / "latest" / "summary.json").read_text() == first  # not overwritten, not relinked
    assert len(list((tmp_path / "runs").glob("sfprompt-*"))) == 1


def test_two_folders_made_in_one_second_differ(tmp_path):
    made = {runs.new_folder("sfprompt", tmp_path) for _ in range(3)}
    assert len(made) == 3 and all(folder.is_dir() for folder in made)
    assert runs.own_folder(Config(out="mine")).out == "mine"


def test_resuming_with_no_folder_named_continues_the_latest_run(tmp_path, monkeypatch):
    from sfprompt.runner import run

    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY]) == 0
    finished = json.loads((tmp_path / "runs" / "latest" / "summary.json").read_text())
    config = Config.from_saved(json.loads((tmp_path / "runs" / "latest" / "config.json").read_text()) | {"out": ""})
    again = run(config.replace(rounds=2), progress=False, log=lambda _: None, resume=True)
    assert again["rounds"] == 2 and len(list((tmp_path / "runs").glob("sfprompt-*"))) == 1
    assert finished["rounds"] == 1
