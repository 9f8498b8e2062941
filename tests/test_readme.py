"""The README stays true: CI runs its test command, and its file tree has the current line counts."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(pip install -e \S+ && python -m pytest.*)$", readme, flags=re.M)
    assert len(commands) == 1, commands
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_line_counts_are_current():
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        return  # not a git checkout (an sdist): nothing to count against
    check = subprocess.run([sys.executable, "scripts/linecount.py", "--check"], cwd=ROOT)
    assert check.returncode == 0, "README.md line counts are stale: run python scripts/linecount.py"
