"""The README stays true: CI runs its test command (its length is checked in test_layout.py)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(pip install -e \S+ && python -m pytest.*)$", readme, flags=re.M)
    assert len(commands) == 1, commands
    assert commands[0] in (ROOT / ".ci" / "run").read_text()
