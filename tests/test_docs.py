"""The docs state every option the code has with its default, the README's quick start runs the main job and the
tests, and the documentation site builds with no broken link, missing page or stale API reference."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from sfprompt.config import DERIVED_DEFAULTS, Config, default_text

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OPTIONS = (ROOT / "docs" / "options.md").read_text()
FLOWER = (ROOT / "docs" / "flower.md").read_text()


def test_every_option_is_documented_with_its_default():
    table = {row.split("|")[1]: row.split("|")[2].strip() for row in OPTIONS.splitlines() if row.startswith("| `--")}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        rows = [(names, default) for names, default in table.items() if f"`{flag}`" in names or f"`{flag} " in names]
        assert rows, f"{flag} is missing from docs/options.md"
        default = rows[0][1].strip("`")
        if f.name in DERIVED_DEFAULTS:  # it follows the recipe, as refit_rounds' "1 for sfprompt when it opens ..."
            assert default == default_text(f.name), f"{flag}: the docs say {default}, code says {default_text(f.name)}"
        elif f.name == "out":  # "" in the code: a new folder under runs/ (sfprompt.runs)
            assert f.default == "" and default.replace("`", "") == default_text(f.name), flag
        elif f.default is None:
            assert default in ("all", "IID", "none"), flag
        elif isinstance(f.default, bool):
            assert default == ("on" if f.default else "off"), flag
        else:
            documented = [part.strip().strip("`") for part in default.split(",")]
            assert any(_same(value, f.default) for value in documented), f"{flag}: the docs say {default}, code says {f.default}"


def _same(text: str, value) -> bool:
    if isinstance(value, (int, float)):
        try:
            return float(text) == value
        except ValueError:
            return False
    return text == str(value)


def test_quick_start_has_the_two_commands():
    commands = re.findall(r"^pip install -e .+$", README, flags=re.M)
    assert commands[:2] == ['pip install -e ".[demo]" && sfprompt run', 'pip install -e ".[test]" && pytest']


def test_every_flower_runtime_key_is_documented():
    from sfprompt.flower.settings import FlowerOptions

    for f in dataclasses.fields(FlowerOptions):
        assert f"`{f.name.replace('_', '-')}`" in FLOWER, f"run-config key {f.name} is missing from docs/flower.md"


def test_the_documentation_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page left out of the navigation, or an API reference
    to a module that no longer exists fails it (mkdocs.yml turns each into a warning, and strict into an error)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "pip install -e" in home and "Quick start" in home  # the home page is the README
    assert "SplitViT" in (tmp_path / "site" / "reference" / "index.html").read_text()  # the docstrings are in
