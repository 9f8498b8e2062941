"""The sampler: minivl.generate against transformers' generate, side by side in one process, same weights.

    python benchmarks/bench_sampler.py                  # on a GPU: Qwen2.5-VL-3B and Qwen3-VL-8B shapes, a table
    python benchmarks/bench_sampler.py --smoke          # anywhere: tiny widths, few tokens: the script runs
    python benchmarks/bench_sampler.py --out DIR        # also writes DIR/bench_sampler.json and a log

Random bf16 weights of the published shapes (tests/configs/*.json) are made once by transformers and shared with
minivl (the same tensors). A prompt is one 448x448 image (Qwen2.5: 32x32 patches -> 256 tokens; Qwen3: 28x28
-> 196) between two short texts whose lengths differ from prompt to prompt, so batches are left-padded.

Runs, per model:
  b=1   greedy, 256 new tokens. transformers: min_new_tokens = max_new_tokens; minivl: no eos. Same count.
  b=64  8 prompts x 8 answers, temperature 1, 512 new tokens. transformers is timed on --hf-tokens new tokens
        (all 512 by default; with fewer, its time for 512 is its prefill (TTFT) plus 511 of its measured decode
        steps, extrapolated, and the table says so); the fastest of --hf-repeats runs. --decode-64 auto reference:
        minivl's rows once per generate(decode=...), against the same transformers run.
Columns:
  tok/s          rows x new tokens / wall time of one generate call (prefill, vision tower, compile cache
                 lookups and the CUDA-graph capture included), median of --repeats calls after a warm-up call.
  decode tok/s   minivl's graph replays alone: rows / step time.
  floor tok/s    rows x copy bandwidth / bytes one step must read: decoder weights (lm_head once, the
                 embedding row ignored) plus, at b=64, the whole static KV cache (what the sampler reads).
                 The copy bandwidth (read + write) is measured in the same run.
  TTFT           generate with max_new_tokens=1.
  peak           max_memory_allocated during the call minus what was allocated before it (the weights).
Checks: greedy tokens equal transformers' in float32 on 2-layer cuts of both shapes, 2 prompts (1 and 4 answers
each) and 1 (the compiled, graph-captured path, on the GPU); with the bf16 full models, the length of the common
greedy prefix (bf16 rounding differs between the two implementations, so long answers may part).
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch._inductor.config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minivl import sampler  # noqa: E402
from common import (copy_bandwidth, decoder_bytes, kv_bytes, load_raw, make_batch, shared_models,  # noqa: E402
                    sync)

LOG = []
ARGS = None
COMPILE = True


def say(*parts):
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


# ------------------------------------------------------------------------------------------ models, inputs

def hf_generate(hf, cfg, batch, new_tokens, **kw):
    ids = batch["input_ids"]
    out = hf.generate(**batch, mm_token_type_ids=(ids == cfg.image_token_id).int(), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0, suppress_tokens=sampler.vision_token_ids(cfg),
                      **kw)
    return out[:, ids.shape[1]:]


# ------------------------------------------------------------------------------------------------ measuring

def measure(fn, device):
    """(result, seconds, peak bytes above the memory allocated before the call)."""
    sync(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
    return result, seconds, peak


def median_run(fn, device, repeats):
    runs = [measure(fn, device) for _ in range(repeats)]
    return runs[0][0], statistics.median(r[1] for r in runs), max(r[2] for r in runs)


def decode_time(model, batch, n, new_tokens, temperature, device, compile=None, decode="auto"):
    """Seconds per decode step of the captured graph (all max_new_tokens - 1 steps of one answer), as generate
    builds it."""
    s = sampler.Sampling(temperature)
    compile = COMPILE if compile is None else compile
    with torch.no_grad():
        state = sampler.prefill(model, batch, n, new_tokens, s, eos=[], pad_id=0, seed=0)
        parts = sampler.compiled_parts() if compile and device == "cuda" else sampler.PARTS
        step = sampler.backend_step(decode, model, state, s, parts) or (
            lambda st: sampler.decode_step(model, st, s, parts))
        step = sampler.cuda_graph(step, state) if device == "cuda" else (lambda f=step: f(state))
        _, seconds, _ = measure(lambda: [step() for _ in range(new_tokens - 1)], device)
    return seconds / (new_tokens - 1), state.key_valid.shape[1]


def forget_compiled():
    """Drop compiled code: the next step compiles afresh with static shapes (code compiled before for other shapes
    would be recompiled with dynamic ones, which is slower)."""
    torch._dynamo.reset()
    sampler.compiled_parts.cache_clear()


def common_prefix(a, b):
    diff = (a != b).nonzero()
    return a.numel() if diff.numel() == 0 else int(diff[0, 0])


# ---------------------------------------------------------------------------------------------------- runs

def check_float32(name, device, new_tokens):
    """Greedy tokens of minivl (compiled + CUDA graph on a GPU) and transformers, float32, 2 layers."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    cfg, hf, ours = shared_models(load_raw(name, layers=2, tiny=ARGS.smoke), device, torch.float32)
    batch = make_batch(cfg, 2, device, torch.float32, seed=1)
    with torch.no_grad():
        ref = hf_generate(hf, cfg, batch, new_tokens, do_sample=False)
        out = minivl_generate(ours, batch, new_tokens, temperature=0.0)
        # 4 answers a prompt: 8 rows, which read each prompt from its first copy (DecodeState.shared)
        out_n = minivl_generate(ours, batch, new_tokens, temperature=0.0, num_return_sequences=4)
        one = make_batch(cfg, 1, device, torch.float32, seed=2)  # one row: the one_row backend
        ref_one = hf_generate(hf, cfg, one, new_tokens, do_sample=False)
        out_one = minivl_generate(ours, one, new_tokens, temperature=0.0)
    equal = (torch.equal(out.tokens, ref) and torch.equal(out_n.tokens, ref.repeat_interleave(4, 0))
             and torch.equal(out_one.tokens, ref_one))
    say(f"check {name} float32 2 layers, 2 prompts (1 and 4 answers each) x {new_tokens} greedy tokens, then 1: "
        f"{'EQUAL' if equal else 'DIFFERENT'} (common prefix {common_prefix(out.tokens[0], ref[0])}, "
        f"{common_prefix(out.tokens[1], ref[1])}; {common_prefix(out_one.tokens[0], ref_one[0])})")
    del hf, ours
    return equal


def minivl_generate(model, batch, new_tokens, **kw):
    return sampler.generate(model, batch, new_tokens, compile=COMPILE, **kw)


def first_call(gen, device):
    """The first (compiling) call; if compiling fails, say why and go on with the eager step in the graph."""
    global COMPILE
    try:
        return measure(gen, device)
    except Exception:
        if not COMPILE:
            raise
        say(traceback.format_exc() + "\nCOMPILE FAILED: going on with --no-compile")
        COMPILE = False
        return measure(gen, device)


def bench_batch1(name, cfg, hf, ours, weights, bandwidth, device, args):
    """One prompt, greedy, args.tokens_1 new tokens."""
    new = args.tokens_1
    batch = make_batch(cfg, 1, device, torch.bfloat16)
    hf_generate(hf, cfg, batch, 4, do_sample=False)  # warm-up
    hf_tokens, t_hf, peak_hf = median_run(lambda: hf_generate(hf, cfg, batch, new, do_sample=False), device, 1)
    _, ttft_hf, _ = median_run(lambda: hf_generate(hf, cfg, batch, 1, do_sample=False), device, 3)
    say(f"b=1  transformers: {new / t_hf:.1f} tok/s, TTFT {ttft_hf * 1e3:.1f} ms, peak {peak_hf / 2**30:.2f} GiB")
    gen = lambda: minivl_generate(ours, batch, new, temperature=0.0)  # noqa: E731
    _, t_first, _ = first_call(gen, device)
    out, t_ours, peak = median_run(gen, device, args.repeats)
    _, ttft, _ = median_run(lambda: minivl_generate(ours, batch, 1, temperature=0.0), device, 3)
    step, S = decode_time(ours, batch, 1, new, 0.0, device)
    if COMPILE:  # what compiling buys: the same step, eager kernels in the graph
        eager, _ = decode_time(ours, batch, 1, new, 0.0, device, compile=False)
        say(f"b=1  minivl decode without torch.compile (eager step in a CUDA graph): {1 / eager:.1f} tok/s")
    if args.hf_recheck:  # transformers again, now that this process has compiled: does that slow it down?
        _, t, _ = measure(lambda: hf_generate(hf, cfg, batch, args.hf_recheck, do_sample=False), device)
        say(f"b=1  transformers again after minivl ran: {args.hf_recheck / t:.1f} tok/s over {args.hf_recheck}")
    prefix = common_prefix(out.tokens[0], hf_tokens[0])
    say(f"b=1  minivl: {new / t_ours:.1f} tok/s (first call, compiling: {t_first:.1f} s), decode {1 / step:.1f} "
        f"tok/s (step {step * 1e3:.2f} ms), TTFT {ttft * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB, greedy = "
        f"transformers for {prefix}/{new} tokens")
    return dict(model=name, rows=1, prompt=batch["input_ids"].shape[1], new=new, hf=new / t_hf, ours=new / t_ours,
                decode=1 / step, floor_weights=bandwidth / weights,
                floor=bandwidth / (weights + kv_bytes(cfg, 1, S)),
                ttft_hf=ttft_hf, ttft=ttft, peak_hf=peak_hf, peak=peak, greedy=f"{prefix}/{new}", hf_note="",
                compile_s=t_first - t_ours)


def bench_rollouts(name, cfg, hf, ours, weights, bandwidth, device, args):
    """args.prompts prompts x args.samples answers, temperature 1, args.tokens_64 new tokens."""
    prompts, n, new, hf_new = args.prompts, args.samples, args.tokens_64, args.hf_tokens
    N = prompts * n
    batch = make_batch(cfg, prompts, device, torch.bfloat16, seed=2)
    T0 = batch["input_ids"].shape[1]
    sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n)
    hf_generate(hf, cfg, batch, 2, **sample)  # warm-up
    # transformers' step is bound by its host work and moved 1.6x between runs (357 vs 592 tok/s, 8B): its
    # fastest of --hf-repeats runs, the baseline least favourable to us
    runs = [measure(lambda: hf_generate(hf, cfg, batch, hf_new, **sample), device) for _ in range(args.hf_repeats)]
    say(f"b={N} transformers, {hf_new} tokens, {len(runs)} runs: " + ", ".join(f"{r[1]:.2f} s" for r in runs))
    t_hf, peak_hf = min(r[1] for r in runs), max(r[2] for r in runs)
    _, ttft_hf, _ = median_run(lambda: hf_generate(hf, cfg, batch, 1, **sample), device, 1)
    hf_step = (t_hf - ttft_hf) / (hf_new - 1)
    t_hf_full = ttft_hf + (new - 1) * hf_step
    say(f"b={N} transformers: {N * hf_new / t_hf:.0f} tok/s over {hf_new} tokens, step {hf_step * 1e3:.1f} ms, "
        f"TTFT {ttft_hf * 1e3:.0f} ms, peak {peak_hf / 2**30:.2f} GiB; {new} tokens extrapolated: "
        f"{N * new / t_hf_full:.0f} tok/s")
    rows = []
    for decode in args.decode_64:  # each a row, against the same transformers run
        forget_compiled()
        gen = lambda: minivl_generate(ours, batch, new, temperature=1.0, num_return_sequences=n, seed=0,  # noqa
                                      decode=decode)
        _, t_first, _ = first_call(gen, device)
        out, t_ours, peak = median_run(gen, device, args.repeats)
        _, ttft, _ = median_run(lambda: minivl_generate(ours, batch, 1, temperature=1.0, num_return_sequences=n,
                                                        decode=decode), device, 3)
        step, S = decode_time(ours, batch, n, new, 1.0, device, decode=decode)
        kv_full, kv_live = kv_bytes(cfg, N, S), kv_bytes(cfg, N, T0 + new / 2)
        say(f"b={N} minivl (decode {decode}): {N * new / t_ours:.0f} tok/s (first call, "
            f"compiling: "
            f"{t_first:.1f} s), decode {N / step:.0f} tok/s (step {step * 1e3:.2f} ms), TTFT {ttft * 1e3:.0f} ms, "
            f"peak {peak / 2**30:.2f} GiB; a step reads {weights / 1e9:.2f} GB weights + {kv_full / 1e9:.2f} GB "
            f"cache ({kv_live / 1e9:.2f} GB written so far, on average)")
        label = name if decode == "auto" else f"{name} ({decode})"
        rows.append(dict(model=label, rows=N, prompt=T0, new=new, hf=N * new / t_hf_full, ours=N * new / t_ours,
                         decode=N / step, floor_weights=N * bandwidth / weights,
                         floor=N * bandwidth / (weights + kv_full), ttft_hf=ttft_hf, ttft=ttft, peak_hf=peak_hf,
                         peak=peak, greedy="", hf_note=f"timed on {hf_new}, extrapolated" if hf_new < new else "",
                         compile_s=t_first - t_ours))
    return rows


def bench_model(name, device, bandwidth, args):
    cfg, hf, ours = shared_models(load_raw(name, tiny=args.smoke), device, torch.bfloat16)
    weights = decoder_bytes(ours)
    params = sum(p.numel() for p in ours.parameters()) / 1e9
    say(f"\n## {name}: {params:.2f} B parameters, decoder weights read per token {weights / 1e9:.3f} GB, "
        f"floor at b=1 {bandwidth / weights:.0f} tok/s")
    rows = []
    # each configuration is compiled afresh for its shapes (torch.compile would otherwise make the shapes that
    # changed symbolic, as it does for a second call with other shapes)
    if "b1" in args.runs:
        torch._dynamo.reset()
        rows.append(bench_batch1(name, cfg, hf, ours, weights, bandwidth, device, args))
    if "b64" in args.runs:
        torch._dynamo.reset()
        rows += bench_rollouts(name, cfg, hf, ours, weights, bandwidth, device, args)
    del hf, ours
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows):
    head = ("model", "rows x new", "prompt", "HF tok/s", "minivl tok/s", "speedup", "minivl decode tok/s",
            "weight floor tok/s", "minivl / floor", "decode / floor", "floor with cache", "TTFT HF ms",
            "TTFT minivl ms", "peak HF GiB", "peak minivl GiB", "greedy = HF", "compile s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hf = f"{r['hf']:.0f}" + (" (a)" if r["hf_note"] else "")
        lines.append(
            f"| {r['model']} | {r['rows']} x {r['new']} | {r['prompt']} | {hf} | {r['ours']:.0f} | "
            f"{r['ours'] / r['hf']:.1f}x | {r['decode']:.0f} | {r['floor_weights']:.0f} | "
            f"{r['ours'] / r['floor_weights'] * 100:.0f}% | {r['decode'] / r['floor_weights'] * 100:.0f}% | "
            f"{r['floor']:.0f} | {r['ttft_hf'] * 1e3:.0f} | {r['ttft'] * 1e3:.0f} | {r['peak_hf'] / 2**30:.2f} | "
            f"{r['peak'] / 2**30:.2f} | {r['greedy']} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens-1", type=int, default=256)
    ap.add_argument("--tokens-64", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--hf-tokens", type=int, default=512,
                    help="new tokens transformers is timed on at b=64 (fewer: extrapolated to --tokens-64)")
    ap.add_argument("--check-tokens", type=int, default=24)
    ap.add_argument("--hf-repeats", type=int, default=3, help="b=64: transformers' fastest of this many runs")
    ap.add_argument("--hf-recheck", type=int, default=0, help="time transformers at b=1 again on this many tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--runs", nargs="+", default=["b1", "b64"], choices=["b1", "b64"])
    ap.add_argument("--decode-64", nargs="+", default=["auto"], choices=["auto", "reference"],
                    help="b=64: generate's decode=, a row each (auto: the rows backend; reference: the model's "
                         "layers, compiled)")
    ap.add_argument("--no-compile", action="store_true", help="capture the eager decode step (CUDA graph only)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings, e.g. coordinate_descent_tuning=True")
    ap.add_argument("--smoke", action="store_true", help="tiny widths and few tokens: does the script run?")
    ap.add_argument("--out", help="directory for bench_sampler.json and bench_sampler.log")
    args = ARGS = ap.parse_args()
    global COMPILE
    COMPILE = not args.no_compile
    for setting in args.inductor:
        key, value = setting.split("=", 1)
        setattr(torch._inductor.config, key, json.loads(value.lower()) if value.lower() in ("true", "false")
                else json.loads(value))
    if args.smoke:
        args.tokens_1, args.tokens_64, args.prompts, args.samples, args.hf_tokens = 12, 10, 2, 2, 5
        args.check_tokens, args.repeats = 6, 1
    import transformers

    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    say(f"# {dev}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth(args.device)
    say(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    results = {"device": dev, "date": time.strftime("%Y-%m-%d"), "copy_bandwidth": bandwidth, "checks": {},
               "rows": []}

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            json.dump(results, open(os.path.join(args.out, "bench_sampler.json"), "w"), indent=1)
            open(os.path.join(args.out, "bench_sampler.log"), "w").write("\n".join(LOG) + "\n")

    if not args.skip_checks:
        for name in args.configs:
            try:
                results["checks"][name] = check_float32(name, args.device, args.check_tokens)
            except Exception:
                say(traceback.format_exc())
            save()
    for name in args.configs:
        forget_compiled()  # each shape compiles afresh, as in a run that trains one model
        try:
            results["rows"] += bench_model(name, args.device, bandwidth, args)
        except Exception:
            say(traceback.format_exc())
        save()
        if results["rows"]:
            say("\n" + table(results["rows"]))
    say("(a) transformers timed on fewer new tokens; its time for the full count is its TTFT plus its measured "
        "step time per further token. Weight floor: rows x copy bandwidth / decoder weight bytes; with cache: "
        "the whole static KV cache read too, as the sampler does.")
    save()


if __name__ == "__main__":
    main()
