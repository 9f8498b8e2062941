"""benchmarks/bench_scaling.py on the CPU: the summary's arithmetic on canned results, the plan's commands, the
search's record of a run that fails, and (slow) the smoke run: every workload in 1 and 2 processes (gloo)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_scaling  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "bench_scaling.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def result(workload, gpus, tokens_per_s, setting="batch 8 x 1024 tokens", shape="qwen2_5_vl_3b", **extra):
    return {"workload": workload, "shape": shape, "gpus": gpus, "setting": setting, "fits": True,
            "tokens_per_s_per_gpu": tokens_per_s, "peak_gib": 10.0 + gpus, "step_s": 8192 / tokens_per_s,
            "exposed_comm_s": 0.01 * gpus, "device": "GPU", "date": "2026-12-05", **extra}


def rows_of(table):
    """{(run, GPUs): [cells]} of the first table."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[3].isdigit() and cells[0] != "full SFT" and len(cells) == 10:
            out[(cells[0], cells[2], int(cells[3]))] = cells
    return out


def test_the_summary_compares_each_run_with_its_smallest_gpu_count_that_fits(tmp_path):
    full = dict(shape="qwen3_vl_8b", setting="batch 1 x 4096 tokens", seq=4096)
    lines = [result("sft-lora", 4, 100.0),  # replaced by the later run of the same setting
             result("sft-lora", 1, 1000.0), result("sft-lora", 2, 950.0), result("sft-lora", 4, 900.0),
             result("sft-lora", 8, 850.0),
             {"workload": "sft-full", "shape": "qwen3_vl_8b", "gpus": 1, "setting": "batch 1 x 1024 tokens",
              "seq": 1024, "fits": False, "error": "out of memory", "date": "2026-12-05"},
             {"workload": "sft-full", "shape": "qwen3_vl_8b", "gpus": 1, "setting": "batch 1 x 4096 tokens",
              "seq": 4096, "fits": False, "error": "out of memory", "date": "2026-12-05"},
             result("sft-full", 2, 500.0, **full), result("sft-full", 4, 480.0, **full),
             result("sft-full", 8, 400.0, **full),
             result("sft-full", 2, 300.0, **{**full, "setting": "batch 1 x 8192 tokens", "seq": 8192}),
             {"workload": "sft-full", "shape": "qwen3_vl_8b", "gpus": 2, "setting": "batch 1 x 16384 tokens",
              "seq": 16384, "fits": False, "error": "exit status 1", "date": "2026-12-05"},
             result("grpo", 2, 2000.0, setting="8 prompts x 8 x 512 tokens",
                    phases_s={"rollout": 10.0, "log-probs": 1.0, "fwd+bwd": 4.0, "exposed_comm": 0.5}),
             result("grpo", 4, 1500.0, setting="8 prompts x 8 x 512 tokens",
                    phases_s={"rollout": 10.0, "log-probs": 1.0, "fwd+bwd": 5.0, "exposed_comm": 1.5})]
    path = tmp_path / "scaling.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = bench_scaling.summarize([path])
    rows = rows_of(table)
    lora = "batch 8 x 1024 tokens"
    assert [rows[("sft-lora", lora, n)][5] for n in (1, 2, 4, 8)] == ["100.0%", "95.0%", "90.0%", "85.0%"]
    assert rows[("sft-lora", lora, 4)][4] == "900"  # the later line of a repeated run
    assert rows[("sft-lora", lora, 8)][6] == "18.0"  # peak GiB per GPU
    length = "batch 1 x 4096 tokens"  # full SFT: one length; against 2 GPUs, the fewest it fits on
    assert rows[("sft-full", length, 1)][4] == "does not fit"
    assert [rows[("sft-full", length, n)][5] for n in (2, 4, 8)] == ["100.0%", "96.0%", "80.0%"]
    assert not any(key[1] == "batch 1 x 8192 tokens" for key in rows)
    grpo = rows[("grpo", "8 prompts x 8 x 512 tokens", 4)]
    assert grpo[5] == "75.0%" and grpo[8] == "10.00 / 1.00 / 5.00" and grpo[9] == "0.040"
    assert "| qwen3_vl_8b | 1 | none | 1024 (out of memory), 4096 (out of memory) |" in table
    assert "| qwen3_vl_8b | 2 | 8192 | 4096, 8192, 16384 (failed: see its line) |" in table
    assert "| qwen3_vl_8b | 8 | 4096 | 4096 |" in table


def test_the_plan_runs_every_workload_on_each_gpu_count():
    done = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--out", "r.jsonl"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for n in (1, 2, 4, 8):
        runs = [x for x in lines if x.startswith(f"torchrun --standalone --nproc_per_node {n} ")]
        assert sorted(x.split()[5:8:2] for x in runs) == sorted(
            [w, s] for w, s in bench_scaling.RUNS if w != "sft-full"), runs
        assert f"python benchmarks/bench_scaling.py search --nproc {n} --out r.jsonl" in lines
    assert lines[-1] == "python benchmarks/bench_scaling.py --summarize r.jsonl"


def test_the_search_records_a_run_that_fails_and_stops(tmp_path):
    """A run that gives no result in time is ended with its processes, written as not fitting, and no longer
    length is tried."""
    out = tmp_path / "r.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), "search", "--nproc", "1", "--lengths", "64", "128",
                           "--run_timeout", "1", "--tiny", "--out", str(out)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(10)  # a worker left running (torchrun's run in sessions of their own) would write its line by now
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert (line["seq"], line["fits"], line["gpus"]) == (64, False, 1)
    assert line["error"] == "no result after 1 s"
    assert "--seq 128" not in done.stdout


@pytest.mark.slow
def test_smoke_runs_every_workload_in_one_and_two_processes():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = Path(done.stdout.split("lines in ")[-1].strip())
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((x["workload"], x["gpus"]) for x in lines) == sorted(
        (w, n) for w in ("sft-lora", "grpo", "dpo", "sft-full") for n in (1, 2))
    for x in lines:
        assert x["fits"] and x["tiny"] and x["step_s"] > 0
        assert x["tokens_per_s_per_gpu"] == pytest.approx(x["tokens"] / x["step_s"])
        if x["workload"] == "sft-full" and x["gpus"] == 2:  # FSDP2: no switch to turn its communication off
            assert x["exposed_comm_s"] is None
        else:
            assert x["exposed_comm_s"] >= 0 and (x["gpus"] == 2 or x["exposed_comm_s"] == 0)
        if x["workload"] in ("sft-lora", "sft-full"):
            assert x["tokens"] == (2 if x["workload"] == "sft-lora" else 1) * 64
        if x["workload"] == "grpo":
            phases = x["phases_s"]
            assert x["step_s"] == pytest.approx(phases["rollout"] + phases["log-probs"] + phases["fwd+bwd"])
            assert x["tokens"] > 2 * 2 * 8  # prompts and completions
    rows = rows_of(done.stdout)
    assert {key[0] for key in rows} == {"sft-lora", "grpo", "dpo", "sft-full"}
