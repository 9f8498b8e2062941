"""Rewrites the file tree with line counts (of the Python files git tracks) between the markers in README.md.

    python scripts/linecount.py          # update README.md
    python scripts/linecount.py --check  # exit 1 if README.md is out of date
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- linecount:start -->", "<!-- linecount:end -->"


def tree():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    lines = []
    total = 0
    for f in sorted(files, key=lambda p: (p.count("/") > 0, p)):
        n = len((ROOT / f).read_text().splitlines())
        total += n
        lines.append(f"{f:<40} {n:>5}")
    lines.append(f"{'total':<40} {total:>5}")
    return "```\n" + "\n".join(lines) + "\n```"


def main():
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + tree() + "\n" + END + tail
    if "--check" in sys.argv:
        sys.exit(0 if new == readme else 1)
    (ROOT / "README.md").write_text(new)


if __name__ == "__main__":
    main()
