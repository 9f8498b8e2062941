"""Scaling over 1 to 8 GPUs of one host: LoRA SFT, GRPO, full SFT and DPO steps on random bf16 weights of the
published shapes, through the trainers' own code for several processes (minivl/training.py: init_process, engine,
make_trainable, which shards with FSDP2 for full fine-tuning, wrap_ddp and grad_sync, which replicate LoRA runs
with DDP), under torchrun.

    python benchmarks/bench_scaling.py --plan                      # the commands for 1, 2, 4 and 8 GPUs
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_scaling.py grpo --shape qwen3_vl_8b
    python benchmarks/bench_scaling.py search --nproc 4            # the longest sequence full SFT fits on 4 GPUs
    python benchmarks/bench_scaling.py --summarize scaling.jsonl   # the table: tokens/s, efficiency, memory
    python benchmarks/bench_scaling.py --smoke                     # CPU, tiny shapes, 1 and 2 processes (gloo)

The runs (per GPU; the global batch grows with the GPU count, so a GPU's work stays the same):
  sft-lora  Qwen2.5-VL-3B or Qwen3-VL-8B shape, LoRA r 8 alpha 32 on the LLM's linear layers (no dropout),
            batch 8 x 1024 tokens (one 448x448 image each), gradient checkpointing: train_sft.py's loss (DDP)
  grpo      the same LoRA, 8 prompts (one 448x448 image each) x 8 completions of 512 tokens (no eos: all run to the
            end), micro-batches of 8, beta 0.04: bench_grpo.grpo_step, the policy forward through DDP (grad_sync)
  dpo       Qwen3-VL-8B shape, the same LoRA, 4 pairs of 1024-token answers: train_dpo.py's pair_step (DDP), the
            reference the model with its adapters off
  sft-full  Qwen3-VL-8B shape, the LLM trained in full (vision tower and merger frozen, as ms-swift's default),
            float32 master weights, batch 1 x --seq tokens, gradient checkpointing (FSDP2 from 2 GPUs)
The weights are made on each GPU (a trainer loads them on the CPU before sharding; the shards are the same).

Measured: each step's time after --warmup steps, the median of --repeats (GRPO: one step after one warm-up step,
which compiles the sampler's decode step), on each process; the slowest process's is reported. Tokens per GPU:
every token of the step's sequences on one GPU (GRPO: prompts and completions, as train_grpo.py counts them).
Peak memory: torch.cuda.max_memory_allocated over the timed steps, the largest of the processes; each process's
memory is capped at --max_memory_gib, so that cards with more memory give the same limits. Exposed communication
(DDP runs): the step's time minus the time of the same step with every micro-batch under DDP's no_sync (no gradient
all-reduce): the all-reduce time that the backward does not hide, plus the waits for the slowest process. For GRPO
it is taken from the forward+backward phase; the phases are timed with the GPU synchronised around each. Full SFT
(FSDP2) gathers weights in every forward and has no such switch: not measured.
The longest sequence of full SFT: `search` runs sft-full in a fresh torchrun for each of --lengths in increasing
order until one fails (out of memory: a process that runs out stops the others, where an attempt inside one
process could leave the others waiting in a collective).

Each run appends one JSON line to --out (default scaling.jsonl); `--summarize` keeps the last line of each run and
GPU count and gives the scaling efficiency: tokens/s per GPU over that of the smallest GPU count the run fits on.
"""

import argparse
import gc
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_dpo  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from minivl import rollouts, training  # noqa: E402
from bench_dpo import collated, pairs  # noqa: E402
from bench_grpo import config, grpo_step, minivl_functions  # noqa: E402
from bench_sft import inputs, timed_steps  # noqa: E402
from common import build_model, make_batch  # noqa: E402

GiB = 2**30
RUNS = [("sft-lora", "qwen2_5_vl_3b"), ("sft-lora", "qwen3_vl_8b"), ("grpo", "qwen2_5_vl_3b"),
        ("grpo", "qwen3_vl_8b"), ("dpo", "qwen3_vl_8b"), ("sft-full", "qwen3_vl_8b")]
SHAPE = {"sft-lora": "qwen2_5_vl_3b", "grpo": "qwen2_5_vl_3b", "dpo": "qwen3_vl_8b", "sft-full": "qwen3_vl_8b"}
GPU_COUNTS = (1, 2, 4, 8)
FULL_SEQ = 4096  # the length full SFT is compared at across GPU counts: the 8B shape's target on 4 GPUs
MAX_MEMORY_GIB = 78.0  # what an 80 GB card gives a process
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
SMOKE = dict(batch=2, seq=64, image=64, prompts=2, generations=2, tokens=8, micro_batch=2, pairs=2, answer=24,
             prompt=8, warmup=0, repeats=1)


# ------------------------------------------------------------------------------------------------ one run

def trainer_args(trainer, train_type, *extra):
    """A trainer's options (its defaults, ms-swift's spelling) for a model that is made here, not loaded."""
    return trainer.parse_args(["--model", "random", "--dataset", "none", "--train_type", train_type,
                               "--lora_dropout", "0", "--report_to", "none", *map(str, extra)])


def prepare(proc, trainer, train_type, shape, o, *extra):
    """(options, this run's Process, Config, the model made trainable, its [(name, parameter)] that train, the
    optimizer, the schedule) as the trainer makes them: over several processes LoRA is replicated (DDP), full
    fine-tuning sharded (FSDP2)."""
    args = trainer_args(trainer, train_type, *extra)
    settings, line = training.engine(args.train_type, world=proc.world)
    if settings != proc.fsdp:  # init_process said the engine of the first run
        proc.print(line)
    proc = replace(proc, fsdp=settings)
    cfg, model = build_model(config(shape, o.tiny), proc.device, proc.dtype)
    trainable, _ = training.make_trainable(model, args, proc)
    optimizer, scheduler = training.make_optimizer(trainable, args, 1000, proc)
    return args, proc, cfg, model, trainable, optimizer, scheduler


def slowest(proc, *values):
    """Each value's largest over the processes."""
    t = torch.tensor(values, dtype=torch.float64, device=proc.device)
    if proc.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def timed(step, proc, o):
    """(median seconds of step(True), peak bytes, exposed communication seconds: None under FSDP2), the slowest
    process's each. step(sync): one step, its gradients all-reduced (DDP) only if sync."""
    ddp = proc.world > 1 and not proc.fsdp
    _, ms, peak = timed_steps(lambda: step(True), proc.device.type, o.warmup, o.repeats)
    quiet = timed_steps(lambda: step(False), proc.device.type, 0, o.repeats)[1] if ddp else ms
    ms, quiet, peak = slowest(proc, ms, quiet, peak)
    return ms / 1e3, peak, max(0.0, ms - quiet) / 1e3 if proc.world == 1 or ddp else None


def run_sft(proc, shape, o, full=False):
    args, proc, cfg, model, trainable, optimizer, scheduler = prepare(proc, train_sft, "full" if full else "lora",
                                                                      shape, o)
    module = training.wrap_ddp(train_sft.TokenLogprobs(model, proc.dtype), proc)
    batch, seq = (1, o.seq or FULL_SEQ) if full else (o.batch, o.seq or 1024)
    data = inputs(cfg, batch, seq, o.image, proc.device, proc.dtype)
    n_tokens = proc.all_sum(int((data["labels"] != -100).sum()))[0]

    def step(sync):
        with training.grad_sync(module, sync), proc.autocast():
            logp, _, _ = module(**data)
            loss = -logp.sum() * proc.world / n_tokens  # train_sft.py's: the mean over the step's label tokens
            loss.backward()
        training.optimizer_step(optimizer, scheduler, [p for _, p in trainable], args.max_grad_norm)
        return loss.detach()
    seconds, peak, exposed = timed(step, proc, o)
    return dict(setting=f"batch {batch} x {seq} tokens", seq=seq, tokens=batch * seq, step_s=seconds,
                peak=peak, exposed_comm_s=exposed)


def run_dpo(proc, shape, o):
    args, proc, cfg, model, trainable, optimizer, scheduler = prepare(proc, train_dpo, "lora", shape, o, "--beta",
                                                                      0.1)
    module = training.wrap_ddp(train_dpo.AnswerLogprobs(model, proc.dtype), proc)
    reference = train_dpo.make_reference(args, model, [], proc)
    (chosen, rejected), vision = pairs(cfg, o.pairs, o.prompt, o.answer, o.image, proc.device, proc.dtype)
    batch = collated(chosen, rejected, vision, proc.device)

    def step(sync):
        with training.grad_sync(module, sync), proc.autocast():
            losses, _, _ = train_dpo.pair_step(module, reference, batch, args)
            loss = losses.mean()  # train_dpo.py's: the mean over the step's pairs, all processes alike
            loss.backward()
        training.optimizer_step(optimizer, scheduler, [p for _, p in trainable], args.max_grad_norm)
        return loss.detach()
    seconds, peak, exposed = timed(step, proc, o)
    return dict(setting=f"{o.pairs} pairs x 2 answers of {o.answer} tokens", tokens=batch["input_ids"].numel(),
                step_s=seconds, peak=peak, exposed_comm_s=exposed)


def run_grpo(proc, shape, o):
    args, proc, cfg, model, _, optimizer, _ = prepare(proc, train_grpo, "lora", shape, o)
    g = SimpleNamespace(prompts=o.prompts, generations=o.generations, tokens=o.tokens, micro_batch=o.micro_batch,
                        beta=args.beta, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    module = training.wrap_ddp(rollouts.CompletionLogprobs(model, g.temperature, proc.dtype), proc)
    rollout, _, disabled = minivl_functions(model, g)
    batch = make_batch(cfg, g.prompts, proc.device, proc.dtype)
    kept = {}

    def sampled(b):
        kept["gen"] = rollout(b)
        return kept["gen"]

    def step(roll, sync):  # the gradients all-reduced in the last micro-batch's backward, if sync
        return grpo_step(model, cfg, batch, g, proc.device.type, roll, lambda *x: module(*x)[0], disabled,
                         optimizer, sync=lambda last: training.grad_sync(module, sync and last))
    for _ in range(min(o.warmup, 1)):
        step(sampled, True)  # compiles the decode step, autotunes
    phases, peaks, _ = step(sampled, True)
    peak = max(peaks.values())
    names = list(phases)
    *times, peak = slowest(proc, *phases.values(), peak)
    phases = dict(zip(names, times))
    exposed = 0.0
    if proc.world > 1:  # the same step, its rollout reused, no all-reduce
        quiet = slowest(proc, step(lambda b: kept["gen"], False)[0]["fwd+bwd"])[0]
        exposed = max(0.0, phases["fwd+bwd"] - quiet)
    tokens = g.generations * int(batch["attention_mask"].sum()) + int(kept["gen"].lengths.sum())
    return dict(setting=f"{g.prompts} prompts x {g.generations} x {g.tokens} tokens", tokens=tokens,
                step_s=sum(phases.values()), peak=peak, exposed_comm_s=exposed,
                phases_s={**phases, "exposed_comm": exposed})


def measure(proc, workload, shape, o):
    """One run in these processes -> its JSON line (written by the first process)."""
    if workload == "grpo":
        result = run_grpo(proc, shape, o)
    elif workload == "dpo":
        result = run_dpo(proc, shape, o)
    else:
        result = run_sft(proc, shape, o, full=workload == "sft-full")
    peak = result.pop("peak")
    line = {"workload": workload, "shape": shape, "gpus": proc.world, **result, "fits": True,
            "tokens_per_s_per_gpu": result["tokens"] / result["step_s"], "peak_gib": peak / GiB,
            "device": torch.cuda.get_device_name() if proc.device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tiny": o.tiny}
    if proc.main:
        with open(o.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
    return line


def run_in_processes(o):
    """Under torchrun (or alone): the workloads of o, one after another."""
    proc = training.init_process(trainer_args(train_sft, "full" if o.workloads[0] == "sft-full" else "lora"))
    if proc.device.type == "cuda":
        total = torch.cuda.get_device_properties(proc.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, o.max_memory_gib * GiB / total))
    for workload in o.workloads:
        measure(proc, workload, o.shape or SHAPE[workload], o)
        gc.collect()
        torch.cuda.empty_cache() if proc.device.type == "cuda" else None
    training.finish(proc)


# ------------------------------------------------------------------------- search, plan, summary, smoke

def child_argv(o):
    """The options of o that a run started from here takes."""
    memory = ["--max_memory_gib", str(o.max_memory_gib)] if o.max_memory_gib != MAX_MEMORY_GIB else []
    return ["--out", o.out, *memory, *(["--tiny"] if o.tiny else [])]


def search(o):
    """sft-full at each of o.lengths in a fresh `torchrun --nproc_per_node o.nproc`, until one fails; a failure
    is written as a line with fits false (out of memory, or whatever else the error says)."""
    shape = o.shape or SHAPE["sft-full"]
    for seq in o.lengths:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(o.nproc),
                   str(Path(__file__).resolve()), "sft-full", "--shape", shape, "--seq", str(seq), *child_argv(o)]
        print(f"run: {shlex.join(command)}", flush=True)
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # its own process group: a stuck run is ended whole
        try:
            output, _ = child.communicate(timeout=o.run_timeout)
        except subprocess.TimeoutExpired:
            # torchrun's workers run in sessions of their own: a SIGTERM makes torchrun end them before it exits
            os.killpg(child.pid, signal.SIGTERM)
            try:
                output = child.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                output = child.communicate()[0]
            output += f"\nno result after {o.run_timeout} s"
        print(output, end="", flush=True)
        if child.returncode != 0:
            why = "out of memory" if "OutOfMemoryError" in output or "out of memory" in output else \
                output.strip().splitlines()[-1] if output.strip() else f"exit status {child.returncode}"
            line = {"workload": "sft-full", "shape": shape, "gpus": o.nproc,
                    "setting": f"batch 1 x {seq} tokens", "seq": seq, "fits": False, "error": why[-300:],
                    "date": time.strftime("%Y-%m-%d"), "tiny": o.tiny}
            with open(o.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"sft-full, {o.nproc} GPU(s): {seq} tokens do not fit ({why[-300:]})", flush=True)
            return


def plan(o):
    script = "benchmarks/bench_scaling.py"
    print(f"# the scaling runs, one block per GPU count; each appends to {o.out}")
    for n in o.gpus:
        print(f"# {n} GPU{'s' if n > 1 else ''}")
        for workload, shape in RUNS:
            if workload != "sft-full":
                print(shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(n), script, workload,
                                  "--shape", shape, *child_argv(o)]))
        print(shlex.join(["python", script, "search", "--nproc", str(n), *child_argv(o)]))
    print(shlex.join(["python", script, "--summarize", o.out]))


def latest(lines):
    """The last line of each (workload, shape, setting, GPU count): a run repeated replaces the earlier."""
    out = {}
    for line in lines:
        out[(line["workload"], line["shape"], line["setting"], line["gpus"])] = line
    return list(out.values())


def summarize(paths, full_seq=FULL_SEQ):
    """The tables (a string) of the JSON lines in the files `paths`: every run, and of full SFT the length
    full_seq (its throughput compared across GPU counts at one length), then its longest length."""
    lines = latest([json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()])
    main = [x for x in lines if x["workload"] != "sft-full" or x["seq"] == full_seq]
    groups = {}
    for x in main:
        groups.setdefault((x["workload"], x["shape"], x["setting"]), []).append(x)
    devices = sorted({f"{x['device']} ({x['date']})" for x in lines if x.get("device")})
    out = [f"# {', '.join(devices)}; efficiency: tokens/s per GPU over that of the smallest GPU count that fits",
           "| run | shape | per GPU | GPUs | tokens/s per GPU | efficiency | peak GiB per GPU | step s | "
           "rollout / log-probs / fwd+bwd s | exposed comm s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (workload, shape, setting), rows in groups.items():
        rows.sort(key=lambda x: x["gpus"])
        base = next((x for x in rows if x["fits"]), None)
        for x in rows:
            if not x["fits"]:
                out.append(f"| {workload} | {shape} | {setting} | {x['gpus']} | does not fit | - | - | - | - | - |")
                continue
            phases = x.get("phases_s")
            split = " / ".join(f"{phases[k]:.2f}" for k in ("rollout", "log-probs", "fwd+bwd")) if phases else "-"
            comm = "-" if x.get("exposed_comm_s") is None else f"{x['exposed_comm_s']:.3f}"
            eff = x["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            out.append(f"| {workload} | {shape} | {setting} | {x['gpus']} | {x['tokens_per_s_per_gpu']:,.0f} | "
                       f"{100 * eff:.1f}% | {x['peak_gib']:.1f} | {x['step_s']:.3f} | {split} | {comm} |")
    full = sorted({(x["shape"], x["gpus"]) for x in lines if x["workload"] == "sft-full"})
    if full:
        out += ["", "| full SFT | GPUs | longest sequence that fits | lengths tried |", "|---|---|---|---|"]
        for shape, gpus in full:
            tried = sorted((x["seq"], x["fits"], "out of memory" if x.get("error") == "out of memory" else
                            "failed: see its line") for x in lines if x["workload"] == "sft-full"
                           and (x["shape"], x["gpus"]) == (shape, gpus))
            longest = max((seq for seq, fits, _ in tried if fits), default=None)
            out.append(f"| {shape} | {gpus} | {longest or 'none'} | "
                       f"{', '.join(f'{seq}' + ('' if fits else f' ({why})') for seq, fits, why in tried)} |")
    return "\n".join(out)


def smoke():
    """Each workload on a tiny shape on the CPU: in one process, then in 2 (gloo), full SFT through the search;
    the summary of what they wrote."""
    out = Path(tempfile.mkdtemp()) / "scaling.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    base = ["--out", str(out), "--tiny"]
    started = time.time()
    for command in ([sys.executable, __file__, *SHAPE, *base],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     __file__, "sft-lora", "grpo", "dpo", *base],
                    [sys.executable, __file__, "search", "--nproc", "2", "--lengths", "64", *base]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"smoke: {shlex.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    print(summarize([out], full_seq=64))
    print(f"smoke: done in {time.time() - started:.0f} s; lines in {out}")
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                    help=f"{', '.join(SHAPE)}: runs in these processes (under torchrun), one after another; or "
                         "search: full SFT's longest sequence, each length in a fresh torchrun")
    ap.add_argument("--plan", action="store_true", help="print the commands of every run for --gpus")
    ap.add_argument("--summarize", nargs="+", metavar="JSONL", help="the table of these result files")
    ap.add_argument("--full_seq", type=int, default=FULL_SEQ, help="--summarize: full SFT's length compared")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 1 and 2 processes: the script runs")
    ap.add_argument("--shape", choices=["qwen2_5_vl_3b", "qwen3_vl_8b"], help="default: SHAPE's")
    ap.add_argument("--out", default="scaling.jsonl", help="the JSON lines file results are appended to")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, 1 layer, short sequences (CPU)")
    ap.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS), help="--plan: the GPU counts")
    ap.add_argument("--nproc", type=int, default=1, help="search: processes (GPUs) per torchrun")
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="search: sequence lengths, in order")
    ap.add_argument("--run_timeout", type=int, default=1800, help="search: seconds a run may take")
    ap.add_argument("--max_memory_gib", type=float, default=MAX_MEMORY_GIB,
                    help="what a process may use of its GPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="tokens of an SFT row (default: 1024 LoRA, 4096 full)")
    ap.add_argument("--image", type=int, default=448, help="SFT and DPO: image side in pixels")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="GRPO: completion tokens")
    ap.add_argument("--micro_batch", type=int, default=8, help="GRPO: completions per micro-batch")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--answer", type=int, default=1024, help="DPO: tokens of each answer")
    ap.add_argument("--prompt", type=int, default=32, help="DPO: text tokens of each prompt, besides the image")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    o = ap.parse_args(argv)
    if o.tiny:
        given = {a.lstrip("-").split("=")[0] for a in argv or sys.argv[1:]}
        for k, v in SMOKE.items():
            if k not in given:
                setattr(o, k, v)
    if not (o.workloads or o.plan or o.summarize or o.smoke):
        ap.error("give a workload, search, --plan, --summarize or --smoke")
    unknown = [w for w in o.workloads if w not in [*SHAPE, "search"]]
    if unknown:
        ap.error(f"{', '.join(unknown)}: not a workload ({', '.join(SHAPE)}, search)")
    if "search" in o.workloads and len(o.workloads) > 1:
        ap.error("search runs alone")
    return o


def main():
    o = parse()
    if o.plan:
        plan(o)
    elif o.summarize:
        print(summarize(o.summarize, o.full_seq))
    elif o.smoke:
        smoke()
    elif o.workloads == ["search"]:
        search(o)
    else:
        run_in_processes(o)


if __name__ == "__main__":
    main()
