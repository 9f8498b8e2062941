"""The one-row projections of a batch-1 decode step, each timed alone: how close to the copy bandwidth does
cuBLAS, and inductor's tuned reduction (coordinate-descent tuning, what the sampler's compiled step uses), get?

For `down` it also times the SiLU-mul of gate and up fused into the reduction's loads (what inductor does in the
decode step) against the same reduction on a ready activation: fused, every program of the reduction recomputes
SiLU(gate) * up for its rows, and reads the (2, I) input again.

Each call is timed inside a CUDA graph of calls that cycle over enough weight copies (>= 256 MB) that no weight
is in L2 when read, as in a decode step where every layer has its own.

It also times minivl's own one-row kernels (kernels/decode_layer.py) on the same shapes, with what the decode
step fuses into them: the rms-norm before qkv and gate/up (and SiLU-mul after gate/up), the residual add after o
and down. `--sweep` times a grid of their block sizes per shape first and uses the fastest for each.

    python benchmarks/bench_gemv.py            # Qwen2.5-VL-3B and Qwen3-VL-8B shapes, bf16
    python benchmarks/bench_gemv.py --sweep    # and sweep the one-row kernels' (BLOCK_N, BLOCK_K, warps)
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sampler import copy_bandwidth  # noqa: E402
from common import median_ms  # noqa: E402

SHAPES = {  # name: (out, in) of the weight, for one decoder layer
    "qwen2_5_vl_3b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008)},
    "qwen3_vl_8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}
CD = {"coordinate_descent_tuning": True}


def graph_us(fn, inputs, weights):
    """Microseconds per call of fn(input, weight), replayed in a CUDA graph over all weight copies."""
    for w in weights[:2]:
        fn(inputs, w)  # compile and tune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(inputs, w)
    return median_ms(graph.replay, "cuda", 20, warmup=3) * 1e3 / len(weights)


def silu_mul(gu):
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def ours(proj, out, inp):
    """minivl's kernel for one projection, as run_layer_kernels calls it: fn(x, weight, blocks), and its float32
    reference (the kernels' PyTorch twins)."""
    from kernels import decode_layer as dl

    nw = torch.ones(inp, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(out, device="cuda", dtype=torch.bfloat16) * 0.02
    res = torch.randn(1, 1, out // 2 if proj == "gate_up" else out, device="cuda", dtype=torch.bfloat16)
    if proj == "qkv":
        return (lambda x, w, b=None: dl.norm_matvec(x, nw, 1e-6, w, bias, blocks=b),
                lambda x, w: dl.norm_matvec_reference(x.float(), nw.float(), 1e-6, w.float(), bias.float()))
    if proj == "gate_up":
        half = out // 2  # gate and up read from their own halves, no fused copy
        return (lambda x, w, b=None: dl.norm_matvec(x, nw, 1e-6, w[:half], up_weight=w[half:], blocks=b),
                lambda x, w: dl.norm_matvec_reference(x.float(), nw.float(), 1e-6, w[:half].float(),
                                                      up_weight=w[half:].float()))
    return (lambda x, w, b=None: dl.matvec_residual(x, w, res, blocks=b),
            lambda x, w: dl.matvec_residual_reference(x.float(), w.float(), res.float()))


def sweep(proj, fn, x, weights, out, inp):
    """Time fn over a grid of (BLOCK_N, BLOCK_K, num_warps); print the five fastest, return the fastest."""
    timed = []
    for bn in (2, 4, 8, 16):
        for bk in (256, 512, 1024, 2048):
            for warps in (4, 8):
                if bk > max(256, inp) or bn * bk > 32768 or bn * bk < 32 * warps * 8:
                    continue  # wider than the row, too many registers, or under 8 elements a thread
                try:
                    timed.append((graph_us(lambda x, w: fn(x, w, (bn, bk, warps)), x, weights), (bn, bk, warps)))
                except Exception as e:  # e.g. out of shared memory / registers: skip that point
                    print(f"  {proj} {(bn, bk, warps)} failed: {type(e).__name__}: {str(e)[:120]}")
    timed.sort()
    print(f"  sweep {proj} {out}x{inp}: " + ", ".join(f"{b} {us:.2f} us" for us, b in timed[:5]), flush=True)
    return timed[0][1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="sweep the one-row kernels' block sizes per shape")
    args = ap.parse_args()
    os.environ.setdefault("MINIVL_KERNELS", "triton")
    bw = copy_bandwidth("cuda")
    print(f"# bench_gemv: {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    linear_cd = torch.compile(F.linear, fullgraph=True, options=CD)
    silu_mul_cd = torch.compile(silu_mul, fullgraph=True, options=CD)
    fused_down_cd = torch.compile(lambda gu, w: F.linear(silu_mul(gu), w), fullgraph=True, options=CD)
    rows = []
    for name in args.configs:
        for proj, (out, inp) in SHAPES[name].items():
            nbytes = out * inp * 2
            weights = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * 0.02
                       for _ in range(max(2, -(-256 * 2**20 // nbytes)))]
            x = torch.randn(1, 1, inp, device="cuda", dtype=torch.bfloat16)
            variants = {"cublas": lambda x, w: F.linear(x, w), "inductor cd": linear_cd}
            if proj == "down":
                gu = torch.randn(1, 1, 2 * inp, device="cuda", dtype=torch.bfloat16)
                variants["inductor cd, silu-mul fused"] = lambda _, w: fused_down_cd(gu, w)
                variants["inductor cd, silu-mul apart"] = lambda _, w: linear_cd(silu_mul_cd(gu), w)
            kernel, kernel_ref = ours(proj, out, inp)
            blocks = sweep(proj, kernel, x, weights, out, inp) if args.sweep else None
            variants[f"minivl kernel {blocks or 'default'}" + ("" if proj in ("qkv", "gate_up") else " + residual")
                     + (" + norm" if proj in ("qkv", "gate_up") else "") + (" + silu-mul" if proj == "gate_up" else "")
                     ] = lambda x, w: kernel(x, w, blocks)
            ref = F.linear(x.float(), weights[0].float())
            for label, fn in variants.items():
                if label.startswith("minivl"):  # against its float32 twin
                    want = kernel_ref(x, weights[0])
                    err = float((fn(x, weights[0]).float() - want).abs().max() / want.abs().max())
                elif "silu" not in label:  # same numbers as cuBLAS in float32 (the fused ones take another input)
                    err = float((fn(x, weights[0]).float() - ref).abs().max() / ref.abs().max())
                else:
                    err = float("nan")
                us = graph_us(fn, x, weights)
                rows.append((name, proj, f"{out}x{inp}", label, us, nbytes / (us / 1e6) / 1e12, err))
                print(f"{name} {proj} {label}: {us:.2f} us, {rows[-1][5]:.2f} TB/s", flush=True)
            del weights
            torch.cuda.empty_cache()
    print("\n| model | proj | weight | variant | us | TB/s | of copy bw | rel. error |\n|---|---|---|---|---|---|---|---|")
    for name, proj, shape, label, us, tbs, err in rows:
        print(f"| {name} | {proj} | {shape} | {label} | {us:.2f} | {tbs:.2f} | {100 * tbs * 1e12 / bw:.0f}% | "
              f"{err:.1e} |")


if __name__ == "__main__":
    main()
