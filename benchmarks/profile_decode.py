"""Where the time of a batch-1 decode step goes: each way of building it (sampler.DecodeOptions) timed and
profiled per kernel on the GPU, against the weight-bandwidth floor.

    python benchmarks/profile_decode.py --out DIR                 # GPU: Qwen2.5-VL-3B and Qwen3-VL-8B shapes
    python benchmarks/profile_decode.py --configs qwen2_5_vl_3b   # one shape
    python benchmarks/profile_decode.py --smoke                   # anywhere: tiny widths, 2 layers, eager steps

Random bf16 weights of the published shapes (minivl's model alone, no transformers), one prompt with one 448x448
image (bench_sampler.make_batch), greedy, a cache for --tokens new tokens. Per variant: a fresh prefill, then the
decode step compiled and captured as a CUDA graph (sampler.cuda_graph_step; each variant compiles afresh), and
  step      median over --replays graph replays, each timed with CUDA events, after --warmup replays
  kernels   torch.profiler over --profile replays: the top kernels by GPU time, per step (us, launches)
  floor     bytes of decoder weights one step reads (lm_head once) / device-to-device copy bandwidth;
            "% floor" = floor / step, the issue's target is >= 75%
  agreement the first decode step's logits against the baseline's (max |diff|), and how many greedy tokens
            equal the baseline's (bf16: random weights give near-ties, so long answers may part)
Variants: baseline (session 1's step: SDPA, no fusion, no tuning), cd (coordinate_descent), all (cd + fused + math), cd+fused, math
(attention="math"), fused (q/k/v and gate/up), in that order: what each option adds under coordinate-descent
tuning, then each of the two others alone; then triton (all, with kernels/decode_attention.py's split-KV attention
instead of the written-out one); then kernels (each decoder layer as kernels/decode_layer.py's hand-written
launches, at one row).
At the end, for the shapes in --b64: the baseline and the fastest variant (also without its written-out
attention, if it has it), or the --b64-variants, at 64 rows (8 prompts x 8 answers, temperature 1, a cache for 512 new tokens as in
bench_sampler), so that a batch-1 win does not cost GRPO rollouts.
--budget: seconds after which no further variant or b=64 check starts (a baseline always runs), so that both
shapes fit in one GPU call of about 6 minutes.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_sampler import copy_bandwidth, decoder_bytes, load_raw, make_batch  # noqa: E402
from common import median_ms  # noqa: E402
from minivl import sampler  # noqa: E402
from minivl.config import Config  # noqa: E402
from minivl.model import VLModel  # noqa: E402

FUSE = ("qkv", "gate_up")
VARIANTS = {  # the most telling first: a variant that would start after the time budget is skipped
    "baseline": sampler.DecodeOptions(attention="sdpa", fuse=(), coordinate_descent=False, layer="compiled"),
    "cd": sampler.DecodeOptions(attention="sdpa", fuse=(), coordinate_descent=True, layer="compiled"),
    "all": sampler.DecodeOptions(attention="math", fuse=FUSE, coordinate_descent=True, layer="compiled"),
    "cd+fused": sampler.DecodeOptions(attention="sdpa", fuse=FUSE, coordinate_descent=True, layer="compiled"),
    "math": sampler.DecodeOptions(attention="math", fuse=(), coordinate_descent=False, layer="compiled"),
    "fused": sampler.DecodeOptions(attention="sdpa", fuse=FUSE, coordinate_descent=False, layer="compiled"),
    "triton": sampler.DecodeOptions(attention="triton", fuse=FUSE, coordinate_descent=True, layer="compiled"),  # split-KV kernel
    # one-row layers as kernels/decode_layer.py's six launches (the rest of the step compiled as in "triton")
    "kernels": sampler.DecodeOptions(attention="triton", fuse=("qkv",), coordinate_descent=True, layer="kernels"),
}
LOG = []


def say(*parts):
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def build_model(name, device, smoke):
    """minivl's model with random bf16 weights (transformers' init: normal(0, 0.02), unit norms), made on the
    meta device and materialised once in bf16 on the device."""
    raw = load_raw(name, layers=2 if smoke else 0, tiny=smoke)
    cfg = Config.from_dict(raw)
    with torch.device("meta"):
        model = VLModel(cfg, init=False).to(torch.bfloat16)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.tie_weights()  # to_empty made the tied lm_head a tensor of its own
    return cfg, model.eval()


# ---------------------------------------------------------------------------------------------- measuring

class Decoder:
    """One variant's decode state and step: a CUDA graph replay on the GPU, the eager step on the CPU."""

    def __init__(self, model, batch, n, new_tokens, sampling, decode, device, share_prompt=True):
        self.state = sampler.prefill(model, batch, n, new_tokens, sampling, [], 0, 0, decode=decode)
        if not share_prompt:  # every row reads its own copy of the prompt (as before KVCache.shared)
            self.state.cache.shared = (1, 0)
        fused = [t for f in self.state.fused for t in f if t is not None]
        self.fused_bytes = sum(t.numel() * t.element_size() for t in fused)
        start = time.perf_counter()
        if device == "cuda":
            self.step = sampler.cuda_graph_step(model, self.state, sampling)
            torch.cuda.synchronize()
        else:  # --smoke: the eager step, what the CPU runs
            self.step = lambda: sampler.decode_step(model, self.state, sampling)
        self.build_s = time.perf_counter() - start


def kernel_profile(step, steps, device):
    """torch.profiler over `steps` calls -> rows (name, us per step, launches per step), longest first. On the
    GPU the rows are the kernels (and copies) the device ran; on the CPU, operators by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
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
    rows = [(name, total / steps, count / steps) for name, (total, count) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def say_profile(rows, ms, top):
    busy, launches = sum(r[1] for r in rows), sum(r[2] for r in rows)
    say(f"  {launches:.0f} kernels per step, {busy:.0f} us busy of {ms * 1e3:.0f} us per step")
    say(f"  {'kernel':60s} {'us/step':>8s} {'count':>6s}")
    for name, us, count in rows[:top]:
        say(f"  {name[:60]:60s} {us:8.1f} {count:6.0f}")


# -------------------------------------------------------------------------------------------------- runs

def run_variant(label, decode, model, batch, floor_ms, device, args, reference):
    """Build, time and profile one variant at batch 1 -> its result dict."""
    sampler.forget_compiled()
    greedy = sampler.Sampling(0.0)
    with torch.no_grad():
        dec = Decoder(model, batch, 1, args.tokens, greedy, decode, device)
        dec.step()
        logits = dec.state.logits.clone()  # the first decode step's
        for _ in range(args.warmup):
            dec.step()
        ms = median_ms(dec.step, device, args.replays)
        rows = kernel_profile(dec.step, args.profile, device)
        if device == "cuda" and not rows:  # the profiler saw no kernel inside the graph: profile without it
            say("  (no kernels recorded inside the CUDA graph: profiling the compiled step launched one by one)")
            state, parts = dec.state, sampler.compiled_parts(decode)
            rows = kernel_profile(lambda: sampler.decode_step(model, state, greedy, parts), args.profile, device)
    steps = int(dec.state.step)
    tokens = dec.state.tokens[0, :steps].cpu()
    result = dict(variant=label, options=repr(decode), ms=ms, floor_pct=100 * floor_ms / ms,
                  compile_s=dec.build_s, fused_gib=dec.fused_bytes / 2**30, kernels=rows[:40],
                  kernels_per_step=sum(r[2] for r in rows), busy_us=sum(r[1] for r in rows))
    if reference is not None:
        same = (tokens != reference["tokens"]).nonzero()
        result["greedy_equal"] = f"{steps if same.numel() == 0 else int(same[0, 0])}/{steps}"
        result["logits_diff"] = float((logits - reference["logits"]).abs().max())
    notes = [f"step {ms:.3f} ms = {result['floor_pct']:.0f}% of the floor {floor_ms:.3f} ms",
             f"graph built in {dec.build_s:.1f} s (compile included)",
             f"fused weights {result['fused_gib']:.2f} GiB"]
    if reference is not None:
        notes.append(f"first-step logits max |diff| vs baseline {result['logits_diff']:.3g}, "
                     f"greedy tokens equal {result['greedy_equal']}")
    say(f"\n### {label}: {decode}\n  " + "; ".join(notes))
    say_profile(rows, ms, args.top)
    del dec
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, dict(tokens=tokens, logits=logits)


def profile_shape(name, device, bandwidth, args, deadline):
    cfg, model = build_model(name, device, args.smoke)
    weights = decoder_bytes(model)
    floor_ms = weights / bandwidth * 1e3
    batch = make_batch(cfg, 1, device, torch.bfloat16)
    say(f"\n## {name}: decoder weights read per token {weights / 1e9:.3f} GB, floor {floor_ms:.3f} ms/step at "
        f"{bandwidth / 1e12:.2f} TB/s (target, 75% of it: {floor_ms / 0.75:.2f} ms); prompt "
        f"{batch['input_ids'].shape[1]} tokens, cache for {args.tokens} new")
    results, reference = {}, None
    from kernels import decode_layer
    runs = []  # (label, settings of kernels/decode_layer.py for it)
    for label in args.variants:
        if label != "kernels":
            runs.append((label, {}))
            continue
        for pdl in args.pdl or [decode_layer.PDL]:
            runs.append((f"kernels pdl={pdl}", dict(PDL=pdl)))
    for label, settings in runs:
        decode = VARIANTS[label.split()[0]]
        for k, v in settings.items():
            setattr(decode_layer, k, v)
        if label != "baseline" and time.time() > deadline:
            say(f"\n### {label}: skipped, over the time budget")
            continue
        try:
            results[label], ref = run_variant(label, decode, model, batch, floor_ms, device, args, reference)
            reference = reference or ref
        except Exception:
            say(f"\n### {label}: FAILED\n" + traceback.format_exc())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(model=name, weights=weights, floor_ms=floor_ms, variants=results)


def rollout_check(name, variants, device, args):
    """Step time at 64 rows (args.prompts x args.samples, temperature 1) of each {label: DecodeOptions}."""
    cfg, model = build_model(name, device, args.smoke)
    batch = make_batch(cfg, args.prompts, device, torch.bfloat16, seed=2)
    out = {}
    for label, decode in variants.items():
        sampler.forget_compiled()
        try:
            with torch.no_grad():
                dec = Decoder(model, batch, args.samples, args.tokens_64, sampler.Sampling(1.0), decode, device)
                for _ in range(args.warmup):
                    dec.step()
                out[label] = median_ms(dec.step, device, args.replays_64)
        except Exception:
            say(f"b=64 {label}: FAILED\n" + traceback.format_exc())
            continue
        ratio = out[label] / out.get("baseline", next(iter(out.values())))
        say(f"b={args.prompts * args.samples} {name} {label} {decode}: step {out[label]:.3f} ms ({ratio:.2f}x "
            f"the first; graph built in {dec.build_s:.1f} s), cache {dec.state.key_valid.shape[1]} slots")
        del dec
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def table(shapes):
    head = ("model", "variant", "ms/step", "% of floor", "compile s", "fused GiB", "kernels/step",
            "greedy = baseline")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        for label, r in shape["variants"].items():
            lines.append(f"| {shape['model']} | {label} | {r['ms']:.3f} | {r['floor_pct']:.0f}% | "
                         f"{r['compile_s']:.0f} | {r['fused_gib']:.2f} | {r['kernels_per_step']:.0f} | "
                         f"{r.get('greedy_equal', '')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens the batch-1 cache is made for")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--replays", type=int, default=100)
    ap.add_argument("--profile", type=int, default=10, help="replays under torch.profiler")
    ap.add_argument("--top", type=int, default=12, help="kernels printed per variant")
    ap.add_argument("--b64", nargs="*", default=["qwen2_5_vl_3b"], help="shapes checked at 64 rows")
    ap.add_argument("--b64-variants", nargs="+", choices=list(VARIANTS),
                    help="variants timed at 64 rows (default: the baseline, the fastest at one row, and that one "
                         "with SDPA)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens-64", type=int, default=512)
    ap.add_argument("--replays-64", type=int, default=30)
    ap.add_argument("--budget", type=float, default=270,
                    help="seconds after which no variant (but a baseline) or b=64 check starts")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, eager steps: does it run?")
    ap.add_argument("--kernel-blocks", nargs=3, type=int, metavar=("BLOCK_N", "BLOCK_K", "WARPS"),
                    help="block sizes of kernels/decode_layer.py's products (its BLOCKS) for this run")
    ap.add_argument("--pdl", nargs="+", type=int, choices=(0, 1), default=[],
                    help="run the kernels variant with kernels/decode_layer.py's PDL (programmatic dependent "
                         "launch) off (0) and / or on (1)")
    ap.add_argument("--out", help="directory for profile_decode.json and profile_decode.log")
    args = ap.parse_args()
    if args.kernel_blocks:
        from kernels import decode_layer
        decode_layer.BLOCKS = tuple(args.kernel_blocks)
        say(f"kernels/decode_layer.py BLOCKS = {decode_layer.BLOCKS}")
    if args.smoke:
        args.tokens, args.warmup, args.replays, args.profile, args.top = 24, 2, 5, 2, 6
        args.prompts, args.samples, args.tokens_64, args.replays_64 = 2, 2, 12, 3
    if 2 + args.warmup + args.replays + 2 * args.profile >= args.tokens:
        ap.error("--tokens must exceed warmup + replays + 2 x profile + 2: each step writes one more token")
    start = time.time()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    say(f"# profile_decode: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth(args.device)
    say(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    results = dict(device=dev, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), copy_bandwidth=bandwidth,
                   shapes=[], b64={})

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            json.dump(results, open(os.path.join(args.out, "profile_decode.json"), "w"), indent=1)
            open(os.path.join(args.out, "profile_decode.log"), "w").write("\n".join(LOG) + "\n")

    for i, name in enumerate(args.configs):
        deadline = start + args.budget * (i + 1) / len(args.configs)  # each shape its share of the budget
        try:
            results["shapes"].append(profile_shape(name, args.device, bandwidth, args, deadline))
        except Exception:
            say(traceback.format_exc())
        say(f"(elapsed {time.time() - start:.0f} s)")
        save()
    for shape in results["shapes"]:
        if shape["model"] not in args.b64 or not shape["variants"]:
            continue
        if time.time() > start + args.budget:
            say(f"b=64 check of {shape['model']}: skipped, over the time budget")
            continue
        if args.b64_variants:
            variants = {k: VARIANTS[k] for k in args.b64_variants}
        else:  # the baseline, the fastest variant at b=1 and, if it has the written-out attention, the same
            # without it (which reads each key G times, where SDPA reads it once: the suspect at 64 rows)
            fastest = min(shape["variants"], key=lambda k: shape["variants"][k]["ms"])
            twin = dataclasses.replace(VARIANTS[fastest.split()[0]], attention="sdpa")  # "kernels pdl=1"
            twin_label = next((k for k, v in VARIANTS.items() if v == twin), f"{fastest} with sdpa")
            variants = {"baseline": VARIANTS["baseline"], fastest: VARIANTS[fastest.split()[0]], twin_label: twin}
            variants = {k: v for i, (k, v) in enumerate(variants.items()) if v not in list(variants.values())[:i]}
        try:
            results["b64"][shape["model"]] = rollout_check(shape["model"], variants, args.device, args)
        except Exception:
            say(traceback.format_exc())
        save()
    say("\n" + table(results["shapes"]))
    for name, steps in results["b64"].items():
        base = steps.get("baseline", next(iter(steps.values()), float("nan")))
        say(f"b={args.prompts * args.samples} {name}: "
            + ", ".join(f"{k} {ms:.3f} ms ({ms / base:.2f}x the first)" for k, ms in steps.items()))
    say(f"(total {time.time() - start:.0f} s)")
    save()


if __name__ == "__main__":
    main()
