"""benchmarks/bench_grpo.py --smoke on the CPU: both modes run, minivl trains only its adapters (the script asserts
it: a base left trainable makes the step train the whole model and its memory and time meaningless), and the
tables carry every phase."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_grpo.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference", "CUDA_VISIBLE_DEVICES": ""}


def run(*args):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("| ")]


def test_the_step_table_has_each_phase_for_both_sides():
    rows = {r.split("|")[1].strip(): r for r in run()}
    assert list(rows)[1:] == ["rollout", "log-probs", "fwd+bwd", "whole step"]
    for phase in ["rollout", "log-probs", "fwd+bwd", "whole step"]:
        cells = [c.strip() for c in rows[phase].strip("|").split("|")]
        assert len(cells) == 6 and float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")


def test_the_max_length_search_tries_each_length():
    rows = run("--mode", "max_length")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["8", "16"]
    assert all(r.rstrip(" |").endswith("yes") for r in rows[1:])
