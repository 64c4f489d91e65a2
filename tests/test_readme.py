"""README.md's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_test_command() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# >>> test command.*?\n(.*?)\n# <<< test command", text, re.S)
    assert block, ".ci/run lost its marked test command"
    return block.group(1).strip()


def test_readme_gives_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = _ci_test_command()
    assert "pytest" in command
    assert f"bash scripts/setup.sh && {command}" in readme
