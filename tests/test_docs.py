"""The README documents every option the code has, and its quick start runs the main job and the tests."""

import dataclasses
import re
from pathlib import Path

from sfprompt.config import DERIVED_DEFAULTS, Config, default_text

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_option_is_documented_with_its_default():
    table = {row.split("|")[1]: row.split("|")[2].strip() for row in README.splitlines() if row.startswith("| `--")}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        rows = [(names, default) for names, default in table.items() if f"`{flag}`" in names or f"`{flag} " in names]
        assert rows, f"{flag} is missing from the README's option table"
        default = rows[0][1].strip("`")
        if f.name in DERIVED_DEFAULTS:  # it follows the recipe: "1 for sfprompt (0 in a one-round run), else 0"
            assert default == default_text(f.name), f"{flag}: README says {default}, code says {default_text(f.name)}"
        elif f.default is None:
            assert default in ("all", "IID", "none"), flag
        elif isinstance(f.default, bool):
            assert default == ("on" if f.default else "off"), flag
        else:
            documented = [part.strip().strip("`") for part in default.split(",")]
            assert any(_same(value, f.default) for value in documented), f"{flag}: README says {default}, code says {f.default}"


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
        assert f"`{f.name.replace('_', '-')}`" in README, f"run-config key {f.name} is missing from the README"
