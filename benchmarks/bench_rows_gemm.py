"""The projections of a 64-row decode step (M = 64 rows, the official Qwen2.5-VL-3B / Qwen3-VL-8B shapes): cuBLAS's
F.linear against kernels/decode_rows.py's split-K partial products (float32 partials, summed by the next kernel),
per tile setting.

    python benchmarks/bench_rows_gemm.py          # GPU
    python benchmarks/bench_rows_gemm.py --gated  # gate/up + SiLU-mul: cuBLAS on a fused copy vs gated_linear

Each timing: 8 weight copies (more than L2 holds) called in turn inside one CUDA graph; µs per call, median.
"""
import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import bench_graph  # noqa: E402

from kernels import decode_rows  # noqa: E402

SHAPES = {"3B": [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 22016, 2048), ("down", 2048, 11008)],
          "8B": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 24576, 4096), ("down", 4096, 12288)]}


def partial(x, w, part, splits, BN, BK, stages, warps):
    M, K = x.shape
    N = w.shape[0]
    per = -(-K // splits // BK) * BK
    decode_rows._partial_matmul_kernel[(-(-N // BN), -(-K // per))](x, w, part, M, N, K, per, BM=64, BN=BN, BK=BK,
                                                                    STAGES=stages, num_warps=warps)


def gated(args):
    """gate/up + SiLU-mul: cuBLAS's product over a fused (2I, D) copy then the SiLU-mul compiled by inductor (one
    kernel), against decode_rows._gated_matmul_kernel reading gate and up where they are, per tile setting."""
    silu_mul = torch.compile(lambda gu: F.silu(gu.chunk(2, dim=-1)[0]) * gu.chunk(2, dim=-1)[1])
    for model, shapes in SHAPES.items():
        N2, K = next((N, K) for name, N, K in shapes if name == "gate_up")
        fused = [torch.randn(N2, K, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        halves = [w.chunk(2) for w in fused]
        halves = [(g.contiguous(), u.contiguous()) for g, u in halves]
        x = torch.randn(args.rows, 1, K, device="cuda", dtype=torch.bfloat16)
        want = silu_mul(F.linear(x, fused[0])).float()
        blas = bench_graph(lambda: [silu_mul(F.linear(x, w)) for w in fused]) / 8 * 1e3
        results = []
        for BN, BK, stages, warps in itertools.product(args.bn, args.bk, args.stages, args.warps):
            out = torch.empty(args.rows, 1, N2 // 2, device="cuda", dtype=torch.bfloat16)

            def run(g, u):
                decode_rows._gated_matmul_kernel[(-(-N2 // 2 // BN), -(-args.rows // 64))](
                    x, g, u, out, args.rows, N2 // 2, K, BM=64, BN=BN, BK=BK, STAGES=stages, F32=False,
                    num_warps=warps)
            try:
                run(*halves[0])
            except Exception as e:  # out of shared memory, say
                print(f"  {BN},{BK},{stages},{warps}: {type(e).__name__}")
                continue
            err = (out.float() - want).abs().max().item()
            us = bench_graph(lambda: [run(g, u) for g, u in halves]) / 8 * 1e3
            results.append((us, BN, BK, stages, warps, err))
        results.sort()
        best = results[0][0]
        print(f"{model} gate/up + SiLU-mul ({N2} x {K}): cuBLAS + SiLU-mul {blas:.1f} us; gated best {best:.1f} us "
              f"({best / blas:.2f}x)")
        for us, BN, BK, stages, warps, err in results[: args.top]:
            print(f"   BN {BN} BK {BK} stages {stages} warps {warps}: {us:.1f} us, max err {err:.1e}")
        del fused, halves


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--bn", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--bk", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--stages", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--warps", nargs="+", type=int, default=[4])
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--gated", action="store_true", help="gate/up + SiLU-mul instead of the split-K products")
    args = ap.parse_args()
    print(f"# bench_rows_gemm: {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.rows}")
    if args.gated:
        return gated(args)
    for model, shapes in SHAPES.items():
        for name, N, K in shapes:
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            x = torch.randn(args.rows, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0]).float()
            blas = bench_graph(lambda: [F.linear(x, w) for w in ws]) / 8 * 1e3
            results = []
            for BN, BK, splits, stages, warps in itertools.product(args.bn, args.bk, args.splits, args.stages,
                                                                  args.warps):
                if splits * BK > K or -(-N // BN) * splits > 4096:
                    continue
                part = torch.empty(splits, args.rows, N, device="cuda", dtype=torch.float32)
                try:
                    partial(x, ws[0], part, splits, BN, BK, stages, warps)
                except Exception as e:  # out of shared memory, say
                    print(f"  {BN},{BK},{splits},{stages},{warps}: {type(e).__name__}")
                    continue
                per = -(-K // splits // BK) * BK
                err = (part[: -(-K // per)].sum(0) - ref).abs().max().item()
                us = bench_graph(lambda: [partial(x, w, part, splits, BN, BK, stages, warps) for w in ws]) / 8 * 1e3
                results.append((us, BN, BK, splits, stages, warps, err))
            results.sort()
            gb = N * K * 2 / 1e9
            best = results[0][0]
            print(f"{model} {name} ({N} x {K}): cuBLAS {blas:.1f} us ({gb / blas * 1e6 / 1e3:.2f} TB/s); partial "
                  f"best {best:.1f} us ({gb / best * 1e6 / 1e3:.2f} TB/s, {best / blas:.2f}x)")
            for us, BN, BK, splits, stages, warps, err in results[: args.top]:
                print(f"   BN {BN} BK {BK} splits {splits} stages {stages} warps {warps}: {us:.1f} us, "
                      f"partials {splits * args.rows * N * 4 / 1e6:.1f} MB, max err {err:.1e}")
            del ws


if __name__ == "__main__":
    main()
