"""kernels/decode_attention.py (split-KV attention of one new token per row) at the rollout shapes, per tile
setting, against SDPA over the whole static cache and the bytes the written slots hold.

    python benchmarks/bench_decode_attention.py                      # GPU: both shapes, the default sweep
    TRITON_INTERPRET=1 MINIVL_KERNELS=triton python benchmarks/bench_decode_attention.py --smoke   # a CPU

The shape is the middle step of a GRPO-like rollout (bench_sampler.py's b=64): 64 rows, a static cache of
prompt + 512 slots with prompt + 256 written, rows left-padded by 0-15 slots. A step reads every decoder layer's
cache once, so the timed call walks --layers distinct caches (more bytes than L2 holds) inside one CUDA graph.
Columns: µs per layer (median of --repeat interleaved timings); GB/s of written k/v bytes read; that as a share of
the copy bandwidth (read + write) of bench_sampler.copy_bandwidth; the largest difference from SDPA's output.
"""

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import bench_graph  # noqa: E402
from bench_sampler import copy_bandwidth  # noqa: E402
from common import published_config  # noqa: E402

from kernels import decode_attention as split_kv  # noqa: E402


def caches(layers, N, K, S, Dh, prompt, written, device):
    """`layers` (k, v) caches (N, K, S, Dh) and the mask (N, 1, 1, S) of slots each row may read."""
    gen = torch.Generator(device).manual_seed(0)
    pad = torch.randint(0, 16, (N,), generator=gen, device=device)
    slots = torch.arange(S, device=device)
    mask = (slots[None, :] >= pad[:, None]) & (slots[None, :] < prompt + written)
    kv = [(torch.randn(N, K, S, Dh, generator=gen, device=device, dtype=torch.bfloat16),
           torch.randn(N, K, S, Dh, generator=gen, device=device, dtype=torch.bfloat16)) for _ in range(layers)]
    return kv, mask.view(N, 1, 1, S)


def loop_kind(text):
    """"skip" or "scanN" (N pipeline stages), for argparse."""
    if text != "skip" and not (text.startswith("scan") and text[4:].isdigit() and int(text[4:]) > 0):
        raise argparse.ArgumentTypeError(f"loop {text!r}: want skip or scanN, N a number of stages (scan3)")
    return text


def setting(text):
    """PROGRAMS,BS,WARPS,LOOP -> (int, int, int, loop), for argparse."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        raise argparse.ArgumentTypeError(f"setting {text!r}: want PROGRAMS,BS,WARPS,LOOP (264,32,4,scan3)")
    return int(parts[0]), int(parts[1]), int(parts[2]), loop_kind(parts[3])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=280, help="prompt slots (bench_sampler's 3B prompt: ~280)")
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--programs", nargs="+", type=int, default=[264, 528, 1056, 2112])
    ap.add_argument("--bs", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--loops", nargs="+", type=loop_kind, default=["skip", "scan2", "scan3"],
                    help="skip: branch over dead blocks; scanN: no branch, pipelined N stages, over the blocks from "
                         "the first readable to the last")
    ap.add_argument("--settings", nargs="+", type=setting, default=[],
                    help="PROGRAMS,BS,WARPS,LOOP each (e.g. 264,32,4,scan3): these instead of the grid above")
    ap.add_argument("--repeat", type=int, default=1, help="time the settings this many times, interleaved: medians")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one setting, the interpreter on a CPU")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.rows, args.prompt, args.new, args.layers = 2, 20, 16, 1
        args.programs, args.bs, args.warps, args.loops = [8], [16], [4], ["skip", "scan2"]
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    print(f"# bench_decode_attention: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, copy "
          f"{bandwidth / 1e12:.2f} TB/s")
    timer = (lambda fn: bench_graph(fn)) if device == "cuda" else (lambda fn: (fn(), 0.0)[1])
    default = dict(split_kv.CONFIG)
    config_name = "CONFIG" if device == "cuda" else "INTERPRET_CONFIG"
    for name in args.configs:
        raw = published_config(name)
        text = raw.get("text_config", raw)
        H, K = text["num_attention_heads"], text["num_key_value_heads"]
        Dh = text.get("head_dim") or text["hidden_size"] // H
        if args.smoke:
            H, K, Dh = 4, 2, 16
        N, S, written = args.rows, args.prompt + args.new, args.new // 2
        kv, mask = caches(args.layers, N, K, S, Dh, args.prompt, written, device)
        q = torch.randn(N, H, 1, Dh, device=device, dtype=torch.bfloat16)
        live_bytes = 2 * int(mask.sum()) * K * Dh * 2  # k and v of the readable slots, per layer
        print(f"\n## {name}: {N} rows, H {H}, K {K}, Dh {Dh}, {S} slots, {args.prompt + written} written; "
              f"{live_bytes / 1e6:.1f} MB of k/v per layer, {args.layers} layers a call")
        want = F.scaled_dot_product_attention(q, kv[0][0], kv[0][1], attn_mask=mask, enable_gqa=True)
        sdpa_us = timer(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                                 for k, v in kv]) * 1e3 / args.layers
        print(f"SDPA (whole cache): {sdpa_us:.1f} µs per layer")
        print("| programs | BS | warps | loop | µs/layer | GB/s | % copy | vs SDPA | max diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        settings = args.settings or list(itertools.product(args.programs, args.bs, args.warps, args.loops))
        times, diffs = {}, {}
        for _ in range(args.repeat):
            for one in settings:
                if one in diffs and diffs[one] is None:
                    continue  # failed before
                programs, bs, warps, loop = one
                cfg = getattr(split_kv, config_name)
                saved = dict(cfg)
                cfg.update(programs=programs, BS=bs, num_warps=warps, skip=loop == "skip",
                           stages=1 if loop == "skip" else int(loop[4:]))
                try:
                    got = split_kv.decode_attention(q, kv[0][0], kv[0][1], mask)
                    diffs[one] = (got.float() - want.float()).abs().max().item()
                    us = timer(lambda: [split_kv.decode_attention(q, k, v, mask) for k, v in kv]) * 1e3 / args.layers
                    times.setdefault(one, []).append(us)
                except Exception as e:  # a setting that does not compile (shared memory, registers): say so, go on
                    print(f"| {programs} | {bs} | {warps} | {loop} | failed: {type(e).__name__}: {str(e)[:80]} |")
                    diffs[one] = None
                finally:
                    cfg.clear()
                    cfg.update(saved)
        results = []
        for one, ts in times.items():
            us = statistics.median(ts)
            gbs = live_bytes / us / 1e3 if us else 0.0
            results.append((us, *one))
            print(f"| {' | '.join(map(str, one))} | {us:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bandwidth:.0f} | "
                  f"{us / sdpa_us if us else 0:.2f}x | {diffs[one]:.1e} |", flush=True)
        if device == "cuda" and results:
            best = min(results)
            print(f"fastest: programs {best[1]}, BS {best[2]}, warps {best[3]}, {best[4]}: {best[0]:.1f} µs/layer "
                  f"(CONFIG {default})")
        del kv


if __name__ == "__main__":
    main()
