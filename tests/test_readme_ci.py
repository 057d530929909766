"""CI must run exactly the README's quick-start install and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    commands = quick_start_commands()
    venv, install, test = commands[0], commands[1], commands[-1]
    assert install.startswith("pip install") and test.startswith("python -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in (venv, install, test):
        assert command in ci_lines, f".ci/run does not run the README command {command!r}"
    assert ci_lines.index(venv) < ci_lines.index(install) < ci_lines.index(test)
