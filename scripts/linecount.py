"""Prints the Python files git tracks with their line counts, the top-level files first.

    python scripts/linecount.py
"""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    total = 0
    for f in sorted(files, key=lambda p: (p.count("/") > 0, p)):
        n = len((ROOT / f).read_text().splitlines())
        total += n
        print(f"{f:<40} {n:>5}")
    print(f"{'total':<40} {total:>5}")


if __name__ == "__main__":
    main()
