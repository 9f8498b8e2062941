"""The decode step alone, on random bf16 weights of the published shapes (minivl's model, no transformers): each
backend held to the reference step, step times side by side with another checkout, per-kernel profiles, and kernel
settings A/B.

    python benchmarks/bench_decode.py check                     # GPU: backends vs the reference, then step times
    python benchmarks/bench_decode.py check --against .old      # and the same times of the code in .old, interleaved
    python benchmarks/bench_decode.py profile --rows 64         # where a step's time goes, per kernel
    python benchmarks/bench_decode.py ab --settings one_row.PDL=0 one_row.PDL=1 --rows 1
    python benchmarks/bench_decode.py check --smoke             # anywhere: tiny widths, 2 layers, eager steps

check: (1) on this checkout, for each shape and each backend (one_row at 1 row, rows at 8 = 2 prompts x 4 answers),
from the same prefill, the backend's step against the reference step (decode="reference"): float32 on a 2-layer cut
(TF32 off) the logits of --steps steps within 1e-3 and the tokens equal, greedy and at temperature 1; bf16 at full
depth the first step's logits (max |diff|) and the common prefix of the greedy tokens (random weights give
near-ties). Then generate with 2 and 3 new tokens (the CUDA graph's warm-up) equals the reference's tokens.
(2) the default path's step (what generate runs: decode="auto", compiled, a CUDA graph) at 1 row (greedy) and 64
rows (8 prompts x 8 answers, temperature 1, the cache half written), median of --replays replays timed with CUDA
events, in a fresh process per checkout and round, rounds interleaved (--rounds): this checkout and, with
--against DIR, the minivl/ and kernels/ in DIR (e.g. `git archive 2f9890f minivl kernels | tar -x -C .old`, an
ignored folder: pass it to the device in `carry`). Ratios are what to compare: step times move 10-20% between
machines of one kind.
profile: one step built as generate builds it (--decode), torch.profiler over --profile replays: the top kernels by
GPU time a step, against the floor of the bytes the step reads (weights and the written cache) at the copy bandwidth.
ab: one step per setting in one process, timed in interleaved rounds (clock and thermal drift fall on all alike). A
setting is MODULE.NAME=INT[,INT...] of a constant of kernels/decode/MODULE.py, or MODULE.DICT.KEY=INT for an entry of
one (attention.CONFIG.BS_few=64); several joined by "+"; the first setting is the reference, and whether each gives
its first step's logits and greedy tokens bit for bit is printed (launch settings such as PDL must).
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if "--impl" in sys.argv:  # a child of `check`: import the minivl/ and kernels/ of that directory
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--impl") + 1]))
else:
    sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(1, HERE)

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from common import build_model, copy_bandwidth, decoder_bytes, kv_bytes, load_raw, make_batch, median_ms  # noqa
from minivl import sampler  # noqa: E402

CONFIGS = ["qwen2_5_vl_3b", "qwen3_vl_8b"]


def say(*parts):
    print(" ".join(str(p) for p in parts), flush=True)


def forget_compiled():
    torch._dynamo.reset()
    if hasattr(sampler, "compiled_parts") and hasattr(sampler.compiled_parts, "cache_clear"):
        sampler.compiled_parts.cache_clear()
    elif hasattr(sampler, "forget_compiled"):  # before the backends (2f9890f)
        sampler.forget_compiled()


def graph_step(model, state, sampling, decode="auto", graphed=True):
    """The decode step as generate builds it, of the minivl imported (this checkout's, or one from before the
    backends, whose decode options lived in the state): a CUDA-graph replay, or the eager step (no graph)."""
    if hasattr(sampler, "DecodeOptions"):
        return sampler.cuda_graph_step(model, state, sampling) if graphed else (
            lambda: sampler.decode_step(model, state, sampling))
    parts = sampler.compiled_parts() if graphed else sampler.PARTS
    step = sampler.backend_step(decode, model, state, sampling, parts) or (
        lambda s: sampler.decode_step(model, s, sampling, parts))
    return sampler.cuda_graph(step, state) if graphed else (lambda: step(state))


def prefill(model, batch, n, new_tokens, sampling, on_logits=None):
    with torch.no_grad():
        if on_logits is None:
            return sampler.prefill(model, batch, n, new_tokens, sampling, [], 0, 0)
        return sampler.prefill(model, batch, n, new_tokens, sampling, [], 0, 0, on_logits=on_logits)


def rollout_state(model, cfg, rows, tokens, device):
    """(batch, sampling, prefilled state) as bench_sampler runs them: one prompt greedy, or rows // 8 prompts x 8
    answers at temperature 1, a cache for `tokens` new tokens; compiled code dropped first."""
    forget_compiled()
    prompts, n = (1, 1) if rows == 1 else (rows // 8, 8)
    batch = make_batch(cfg, prompts, device, torch.bfloat16, seed=2)
    sampling = sampler.Sampling(0.0 if rows == 1 else 1.0)
    return batch, sampling, prefill(model, batch, n, tokens, sampling)


def middle_ms(step, device, tokens, replays):
    """Median ms of `replays` steps around the middle of a `tokens`-token answer (the cache half written)."""
    for _ in range(tokens // 2 - replays // 2 - 1):
        step()
    return median_ms(step, device, replays)


# ------------------------------------------------------------------------------------------------------- check

def backend_runs(model, batch, n, steps, temperature, backend):
    """(logits (N, steps, V), tokens) of the reference step and of `backend` from the same prefill."""
    s, runs = sampler.Sampling(temperature), []
    for decode in ("reference", backend):
        logits = []
        state = prefill(model, batch, n, steps, s, on_logits=logits.append)
        step = sampler.backend_step(decode, model, state, s, sampler.PARTS) or (
            lambda st: sampler.decode_step(model, st, s))
        with torch.no_grad():
            for _ in range(steps - 1):
                step(state)
        runs.append((torch.stack(logits, 1).float(), state.tokens.clone()))
    return runs


def common_prefix(a, b):
    diff = (a != b).nonzero()
    return a.shape[-1] if diff.numel() == 0 else int(diff[:, -1].min())


def check_backends(name, device, args):
    """Every backend against the reference step: float32 2-layer cut (equal), bf16 full depth (reported)."""
    ok = True
    for dtype, layers in ((torch.float32, 2), (torch.bfloat16, 0)):
        torch.backends.cuda.matmul.allow_tf32 = False
        cfg, model = build_model(load_raw(name, layers=2 if args.smoke else layers, tiny=args.smoke), device, dtype)
        for backend, prompts, n in (("one_row", 1, 1), ("rows", 2, 4)):
            batch = make_batch(cfg, prompts, device, dtype, seed=1)
            for temperature in (0.0, 1.0):
                (ref, ref_tokens), (got, tokens) = backend_runs(model, batch, n, args.steps, temperature, backend)
                diff = float((got - ref).abs().max())
                if dtype == torch.float32:
                    good = diff <= 1e-3 and torch.equal(tokens, ref_tokens)
                    ok &= good
                    say(f"check {name} float32 {cfg.text.num_hidden_layers} layers, {backend} ({prompts * n} rows), "
                        f"temperature {temperature}: logits max |diff| {diff:.2e} over {args.steps} steps, tokens "
                        f"{'EQUAL' if torch.equal(tokens, ref_tokens) else 'DIFFERENT'}: {'PASS' if good else 'FAIL'}")
                else:
                    first = float((got[:, 0] - ref[:, 0]).abs().max() / ref[:, 0].abs().max())
                    say(f"check {name} bf16 full depth, {backend} ({prompts * n} rows), temperature {temperature}: "
                        f"first step's logits max |diff| / max |logit| {first:.2e}; tokens equal for the first "
                        f"{common_prefix(tokens, ref_tokens)} of {args.steps} (near-ties part them)")
        if dtype == torch.float32 and device == "cuda":  # the CUDA graph's warm-up writes nothing the caller sees
            batch = make_batch(cfg, 2, device, dtype, seed=3)
            for new in (2, 3):
                out = sampler.generate(model, batch, new, temperature=0.0, num_return_sequences=2)
                ref = sampler.generate(model, batch, new, temperature=0.0, num_return_sequences=2, decode="reference",
                                       compile=False)
                good = torch.equal(out.tokens, ref.tokens) and out.tokens.shape[1] == new
                ok &= good
                say(f"check {name} generate {new} new tokens (graph warm-up): {'PASS' if good else 'FAIL'}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok


def time_steps(args):
    """(a child of check) The default path's step times of the minivl imported: one JSON line per (shape, rows)."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    for name in args.configs:
        cfg, model = build_model(load_raw(name, layers=2 if args.smoke else 0, tiny=args.smoke), device)
        for rows in args.rows:
            batch, sampling, state = rollout_state(model, cfg, rows, args.tokens, device)
            with torch.no_grad():
                step = graph_step(model, state, sampling, graphed=device == "cuda")
                ms = middle_ms(step, device, args.tokens, args.replays)
            print(json.dumps(dict(model=name, rows=rows, ms=ms)), flush=True)
            del state, step
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def check(args):
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    say(f"# bench_decode check: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if not args.skip_check:
        results = {}
        for name in args.configs:
            try:
                results[name] = check_backends(name, device, args)
            except Exception:
                say(traceback.format_exc())
                results[name] = False
        say(f"backends vs reference: {'PASS' if all(results.values()) else 'FAIL'} {results}")
    impls = [("this checkout", os.path.join(HERE, ".."))] + ([("against", args.against)] if args.against else [])
    times = {}
    for r in range(args.rounds):
        for label, impl in impls:
            command = [sys.executable, __file__, "time", "--impl", impl, "--configs", *args.configs, "--rows",
                       *map(str, args.rows), "--tokens", str(args.tokens), "--replays", str(args.replays)]
            run = subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
            if run.returncode:
                say(f"round {r + 1}, {label} ({impl}) FAILED:\n{run.stderr[-3000:]}")
                continue
            for line in run.stdout.splitlines():
                if line.startswith("{"):
                    t = json.loads(line)
                    times.setdefault((t["model"], t["rows"]), {}).setdefault(label, []).append(t["ms"])
    say(f"\nstep ms (median of {args.replays} replays at the middle of a {args.tokens}-token answer), {args.rounds} "
        "round(s), a fresh process each, interleaved" + (f"; against = {args.against}" if args.against else ""))
    say("| model | rows | this checkout ms | against ms | this / against |\n|---|---|---|---|---|")
    for (name, rows), by in times.items():
        ours, theirs = by.get("this checkout", []), by.get("against", [])
        ratio = f"{statistics.median(ours) / statistics.median(theirs):.3f}" if ours and theirs else ""
        say(f"| {name} | {rows} | {', '.join(f'{t:.3f}' for t in ours)} | {', '.join(f'{t:.3f}' for t in theirs)} "
            f"| {ratio} |")


# ----------------------------------------------------------------------------------------------------- profile

def kernel_profile(step, steps, device):
    """torch.profiler over `steps` calls -> rows (name, us per step, launches per step), longest first: on the GPU
    the kernels (and copies) the device ran, on the CPU operators by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if device == "cuda" and e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
        elif device == "cpu" and e.device_type == DeviceType.CPU:
            us = e.self_cpu_time_total
        else:
            continue
        total, count = totals.get(e.name, (0.0, 0))
        totals[e.name] = (total + us, count + 1)
    return sorted(((n, t / steps, c / steps) for n, (t, c) in totals.items()), key=lambda r: -r[1])


def profile(args):
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    say(f"# bench_decode profile: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth(device)
    for name in args.configs:
        cfg, model = build_model(load_raw(name, layers=2 if args.smoke else 0, tiny=args.smoke), device)
        for rows in args.rows:
            for decode in args.decode:
                batch, sampling, state = rollout_state(model, cfg, rows, args.tokens, device)
                if args.no_share:  # every row reads its own copy of the prompt
                    state.shared = (1, 0)
                start = time.perf_counter()
                with torch.no_grad():
                    step = graph_step(model, state, sampling, decode, graphed=device == "cuda")
                    built = time.perf_counter() - start
                    ms = middle_ms(step, device, args.tokens, args.replays)
                    kernels = kernel_profile(step, args.profile, device)
                T0, S = batch["input_ids"].shape[1], state.key_valid.shape[1]
                written = (decoder_bytes(model) + kv_bytes(cfg, rows, T0 + args.tokens // 2)) / bandwidth * 1e3
                busy, launches = sum(k[1] for k in kernels), sum(k[2] for k in kernels)
                say(f"\n## {name}, {rows} rows, decode {decode}{', prompt copies read apart' if args.no_share else ''}"
                    f": step {ms:.3f} ms at slot ~{T0 + args.tokens // 2} of {S}; floor {written:.3f} ms (weights and "
                    f"the written cache at {bandwidth / 1e12:.2f} TB/s: {100 * written / ms:.0f}%); graph built in "
                    f"{built:.1f} s; {launches:.0f} kernels, {busy:.0f} us busy a step")
                for kname, us, count in kernels[: args.top]:
                    say(f"  {kname[:70]:70s} {us:8.1f} us {count:5.0f}x")
                del state, step
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------- ab

def parse_setting(text):
    """"one_row.PDL=1+attention.CONFIG.BS_few=64" -> [(object, key, value)]: what to set, and how."""
    out = []
    for part in text.split("+"):
        path, _, value = part.partition("=")
        module, *names = path.split(".")
        if not names or not value.replace(",", "").isdigit():
            raise SystemExit(f"bench_decode ab: {part!r} is not MODULE.NAME=INT[,INT...] (or MODULE.DICT.KEY=INT)")
        target = importlib.import_module(f"kernels.decode.{module}")
        for n in names[:-1]:
            target = getattr(target, n)
        numbers = tuple(int(v) for v in value.split(","))
        out.append((target, names[-1], numbers if len(numbers) > 1 else numbers[0]))
    return out


def assign(target, key, value):
    if isinstance(target, dict):
        target[key] = value
    else:
        setattr(target, key, value)


def ab(args):
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    say(f"# bench_decode ab: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    settings = [(s, parse_setting(s)) for s in args.settings]
    defaults = {(id(t), k): (t, k, t[k] if isinstance(t, dict) else getattr(t, k))
                for _, changes in settings for t, k, _ in changes}
    tokens = 16 + args.rounds * args.replays
    bandwidth = copy_bandwidth(device)
    for name in args.configs:
        cfg, model = build_model(load_raw(name, layers=2 if args.smoke else 0, tiny=args.smoke), device)
        prompts, n = (1, 1) if args.rows == 1 else (args.rows // 8, 8)
        batch = make_batch(cfg, prompts, device, torch.bfloat16, seed=2)
        sampling = sampler.Sampling(0.0)
        floor_ms = (decoder_bytes(model) + kv_bytes(cfg, args.rows, batch["input_ids"].shape[1])) / bandwidth * 1e3
        steps = []
        for label, changes in settings:
            for t, k, v in defaults.values():
                assign(t, k, v)
            for t, k, v in changes:
                assign(t, k, v)
            forget_compiled()
            logits = []  # the first step's, eager (the debug hook stays out of the timed graph)
            first = prefill(model, batch, n, tokens, sampling, on_logits=logits.append)
            with torch.no_grad():
                graph_step(model, first, sampling, graphed=False)()
            del first
            state = prefill(model, batch, n, tokens, sampling)
            with torch.no_grad():
                step = graph_step(model, state, sampling, graphed=device == "cuda")
                step()
            steps.append((label, state, step, logits[-1]))
        rounds = {label: [] for label, _ in settings}
        with torch.no_grad():
            for _ in range(args.rounds):
                for label, _, step, _ in steps:
                    rounds[label].append(median_ms(lambda: [step() for _ in range(args.replays)], device, 1)
                                         / args.replays)
        ref_ms = statistics.median(rounds[settings[0][0]])
        ref_state, ref_logits = steps[0][1], steps[0][3]
        say(f"\n## {name}, {args.rows} rows: floor {floor_ms:.3f} ms/step; {args.rounds} rounds x {args.replays} "
            "replays per setting, interleaved")
        say("| setting | ms/step (median of rounds) | min-max | vs first | % of floor | first-step logits = first | "
            "greedy = first |\n|---|---|---|---|---|---|---|")
        for label, state, _, logits in steps:
            ms = statistics.median(rounds[label])
            diff = float((logits - ref_logits).abs().max())
            same = "yes" if diff == 0 else f"max diff {diff:.3g}"
            equal = int((state.tokens == ref_state.tokens).all(0).sum())
            say(f"| {label} | {ms:.3f} | {min(rounds[label]):.3f}-{max(rounds[label]):.3f} | {ms / ref_ms:.3f} | "
                f"{100 * floor_ms / ms:.0f}% | {same} | {equal}/{state.tokens.shape[1]} |")
        del steps, model
        if device == "cuda":
            torch.cuda.empty_cache()
    for t, k, v in defaults.values():
        assign(t, k, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configs", nargs="+", default=CONFIGS)
    common.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, the CPU, eager steps")
    c = sub.add_parser("check", parents=[common], help="backends vs the reference step; step times")
    c.add_argument("--against", help="a directory holding another checkout's minivl/ and kernels/ to time")
    c.add_argument("--rows", nargs="+", type=int, default=[1, 64])
    c.add_argument("--tokens", type=int, default=512, help="new tokens the cache is made for")
    c.add_argument("--replays", type=int, default=50)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--steps", type=int, default=16, help="decode steps compared with the reference")
    c.add_argument("--skip-check", action="store_true", help="only the step times")
    t = sub.add_parser("time", parents=[common], help="(check's child process) step times of --impl's code")
    t.add_argument("--impl", required=True)
    t.add_argument("--rows", nargs="+", type=int, default=[1, 64])
    t.add_argument("--tokens", type=int, default=512)
    t.add_argument("--replays", type=int, default=50)
    p = sub.add_parser("profile", parents=[common], help="per-kernel profile of a step")
    p.add_argument("--rows", nargs="+", type=int, default=[1])
    p.add_argument("--decode", nargs="+", default=["auto"], help="generate's decode=, a profile each")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--profile", type=int, default=5, help="replays under torch.profiler")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-share", action="store_true", help="each row reads its own copy of the prompt's cache")
    a = sub.add_parser("ab", parents=[common], help="kernel settings side by side, interleaved")
    a.add_argument("--settings", nargs="+", required=True)
    a.add_argument("--rows", type=int, default=1)
    a.add_argument("--rounds", type=int, default=10)
    a.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        for key, value in dict(tokens=24, replays=4, rounds=1, steps=4, profile=1).items():
            if hasattr(args, key):
                setattr(args, key, value)
        if args.command in ("check", "time", "profile"):
            args.rows = [r if r == 1 else 16 for r in args.rows]
        elif args.rows > 1:
            args.rows = 16
    {"check": check, "time": time_steps, "profile": profile, "ab": ab}[args.command](args)


if __name__ == "__main__":
    main()
