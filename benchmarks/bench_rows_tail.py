"""The small kernels of a 64-row decode step (kernels/decode_rows.py), per launch setting: the sampling pass over
(rows, 151,936) bf16 logits (`_sample_chunks_kernel`: chunk size and warps) and add + rms-norm over the rows with
the split-K partials of the product before it (`_add_norm_kernel`: warps).

    python benchmarks/bench_rows_tail.py     # GPU

Each timing: the launch captured 20 times in one CUDA graph; µs per launch, median of 10 replays. The sampling
pass's chunk maxima must not depend on the setting: each setting's row maxima are checked against the first's.
"""
import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import bench_graph  # noqa: E402

from kernels import decode_rows  # noqa: E402


def sampling(args):
    N, V = args.rows, 151936
    logits = torch.randn(N, V, device="cuda").mul(3).bfloat16()
    banned = torch.tensor([151652, 151653, 151654, 151655, 151656], device="cuda")
    seed, step = torch.tensor(7, device="cuda"), torch.tensor(3, device="cuda")
    out = torch.empty(N, V, device="cuda")
    want = None
    print(f"sampling pass, {N} x {V} logits, temperature 1 (float32 copy, banned ids, max / sum of exp / Gumbel "
          "draw a chunk):")
    for block, warps in itertools.product(args.blocks, args.warps):
        chunks = triton.cdiv(V, block)
        f = torch.empty(3, N, chunks, device="cuda")
        at = torch.empty(N, chunks, dtype=torch.int32, device="cuda")

        def run():
            decode_rows._sample_chunks_kernel[(N, chunks)](
                logits, banned, seed, step, out, f, at, V, banned.numel(), 1.0, BLOCK=block, NBP=8, GREEDY=False,
                num_warps=warps)
        run()
        row_max = f[0].amax(1), f[2].amax(1)  # (N,) each: the rows' maxima, whatever the chunks
        want = want or row_max
        same = all(torch.equal(a, b) for a, b in zip(row_max, want))
        us = bench_graph(run) * 1e3
        print(f"   chunk {block:5d} warps {warps}: {us:6.1f} us ({N * V * 6 / us / 1e6:.2f} TB/s of logits read + "
              f"copy written){'' if same else '  ROW MAXIMA DIFFER'}")


def add_norm(args):
    for D in (2048, 4096):
        for parts in (0, 4):
            x = torch.randn(args.rows, 1, D, device="cuda").bfloat16()
            d = torch.randn(parts, args.rows, 1, D, device="cuda") if parts else x
            w = torch.rand(D, device="cuda").bfloat16()
            out, h = torch.empty_like(x), torch.empty_like(x)
            line = []
            for warps in args.warps + [16]:
                def run():
                    decode_rows._add_norm_kernel[(args.rows,)](x, d, w, out if parts else x, h, D, x.numel(), 1e-6,
                                                               BLOCK=triton.next_power_of_2(D), PARTS=parts,
                                                               num_warps=warps)
                line.append(f"warps {warps} {bench_graph(run) * 1e3:.1f}")
            print(f"add + norm, {args.rows} x {D}, {parts} partials: " + ", ".join(line) + " us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--blocks", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    args = ap.parse_args()
    print(f"# bench_rows_tail: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    sampling(args)
    add_norm(args)


if __name__ == "__main__":
    main()
