"""The docs say what the code does: the README's recipe is the shipped file, and its exit-code
table is the CLI's."""

from __future__ import annotations

import re
from pathlib import Path

from qcompile.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_shipped_w8a8_recipe_verbatim():
    shown = re.search(r"The built-in `w8a8`, as shipped.*?```yaml\n(.*?)```", README, re.S)
    assert shown, "README lost its w8a8 recipe block"
    assert shown.group(1) == (ROOT / "compiler" / "recipes" / "w8a8.yaml").read_text()


def test_readme_exit_code_table_has_every_code_the_cli_uses():
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README, re.M))
    assert sorted(map(int, table)) == sorted(EXIT_CODES)
