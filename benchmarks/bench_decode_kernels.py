"""The decode backends' kernels alone (kernels/decode/), per shape and tile setting, on the GPU.

    python benchmarks/bench_decode_kernels.py gemv [--sweep]   # one-row projections: cuBLAS, inductor, one_row.py's
    python benchmarks/bench_decode_kernels.py gemm             # 64-row o / down: cuBLAS vs rows.split_linear's tiles
    python benchmarks/bench_decode_kernels.py gated            # 64-row gate/up + SiLU-mul: cuBLAS on a fused copy vs
                                                               # rows.gated_linear's tiles
    python benchmarks/bench_decode_kernels.py attention        # the split-KV attention's settings vs SDPA
    TRITON_INTERPRET=1 MINIVL_KERNELS=triton python benchmarks/bench_decode_kernels.py attention --smoke   # a CPU
    python benchmarks/bench_decode_kernels.py tail             # the 64-row sampling pass and add + norm per launch

gemv: each projection of a one-row step timed inside a CUDA graph of calls that cycle over enough weight copies
(>= 256 MB) that no weight is in L2 when read, as in a step where every layer has its own: cuBLAS, inductor's tuned
reduction (coordinate-descent tuning) and one_row.py's kernels with what the step fuses into them (the rms-norm
before qkv and gate/up, SiLU-mul after gate/up, the residual add after o and down); for `down` also inductor with
the SiLU-mul fused into its loads and apart. --sweep times a grid of the one-row kernels' blocks per shape first.
gemm / gated: M = --rows rows, 8 weight copies (more than L2 holds) called in turn inside one CUDA graph, us a call.
attention: the middle step of a 64-row rollout: a static cache of prompt + 512 slots with prompt + 256 written, rows
left-padded by 0-15 slots; each call walks --layers distinct caches (more than L2) in one CUDA graph. Columns: us a
layer (median of --repeat interleaved timings), GB/s of written k/v read, that as a share of the copy bandwidth,
the largest difference from SDPA's output.
tail: each launch captured 20 times in one CUDA graph, us a launch (median of 10 replays); the sampling pass's row
maxima are checked against the first setting's.
Measurements: benchmarks/NOTES_sampler.md.
"""
import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import bench_graph  # noqa: E402
from common import copy_bandwidth, median_ms, published_config  # noqa: E402

from kernels.decode import attention as split_kv  # noqa: E402
from kernels.decode import rows  # noqa: E402

CONFIGS = ["qwen2_5_vl_3b", "qwen3_vl_8b"]
CD = {"coordinate_descent_tuning": True}


# ----------------------------------------------------------------------------------------------------- gemv

SHAPES = {  # name: (out, in) of the weight, for one decoder layer
    "qwen2_5_vl_3b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008)},
    "qwen3_vl_8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}


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
    """minivl's kernel for one projection, as the one_row backend calls it: fn(x, weight, blocks), and its float32
    reference (the kernels' PyTorch twins)."""
    from kernels.decode import one_row as dl

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


def gemv(args):
    """The one-row projections (see the module docstring)."""
    os.environ.setdefault("MINIVL_KERNELS", "triton")
    bw = copy_bandwidth("cuda")
    print(f"# gemv: {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    linear_cd = torch.compile(F.linear, fullgraph=True, options=CD)
    silu_mul_cd = torch.compile(silu_mul, fullgraph=True, options=CD)
    fused_down_cd = torch.compile(lambda gu, w: F.linear(silu_mul(gu), w), fullgraph=True, options=CD)
    table = []
    for name in args.configs or list(SHAPES):
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
                table.append((name, proj, f"{out}x{inp}", label, us, nbytes / (us / 1e6) / 1e12, err))
                print(f"{name} {proj} {label}: {us:.2f} us, {table[-1][5]:.2f} TB/s", flush=True)
            del weights
            torch.cuda.empty_cache()
    print("\n| model | proj | weight | variant | us | TB/s | of copy bw | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, proj, shape, label, us, tbs, err in table:
        print(f"| {name} | {proj} | {shape} | {label} | {us:.2f} | {tbs:.2f} | {100 * tbs * 1e12 / bw:.0f}% | "
              f"{err:.1e} |")


# ------------------------------------------------------------------------------------------------ gemm, gated

ROW_SHAPES = {name: [(proj, out, inp) for proj, (out, inp) in shapes.items()] for name, shapes in SHAPES.items()}


def partial(x, w, part, splits, BN, BK, stages, warps):
    M, K = x.shape
    N = w.shape[0]
    per = -(-K // splits // BK) * BK
    rows._partial_matmul_kernel[(-(-N // BN), -(-K // per))](x, w, part, M, N, K, per, BM=64, BN=BN, BK=BK,
                                                                    STAGES=stages, num_warps=warps)


def gated(args):
    """gate/up + SiLU-mul: cuBLAS's product over a fused (2I, D) copy then the SiLU-mul compiled by inductor (one
    kernel), against rows._gated_matmul_kernel reading gate and up where they are, per tile setting."""
    silu_mul = torch.compile(lambda gu: F.silu(gu.chunk(2, dim=-1)[0]) * gu.chunk(2, dim=-1)[1])
    for model, shapes in ROW_SHAPES.items():
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
                rows._gated_matmul_kernel[(-(-N2 // 2 // BN), -(-args.rows // 64))](
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


def gemm(args):
    """The split-K partial products against cuBLAS, per tile setting."""
    print(f"# gemm: {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.rows}")
    for model, shapes in ROW_SHAPES.items():
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


# -------------------------------------------------------------------------------------------------- attention

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


def attention(args):
    """The split-KV attention per tile setting against SDPA (see the module docstring)."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.rows, args.prompt, args.new, args.layers = 2, 20, 16, 1
        args.programs, args.bs, args.warps, args.loops = [8], [16], [4], ["skip", "scan2"]
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    print(f"# attention: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, copy "
          f"{bandwidth / 1e12:.2f} TB/s")
    timer = (lambda fn: bench_graph(fn)) if device == "cuda" else (lambda fn: (fn(), 0.0)[1])
    default = dict(split_kv.CONFIG)
    config_name = "CONFIG" if device == "cuda" else "INTERPRET_CONFIG"
    for name in args.configs or CONFIGS:
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


# ------------------------------------------------------------------------------------------------------- tail

def tail(args):
    """The sampling pass and add + norm of the rows backend, per launch setting."""
    print(f"# tail: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    sampling_pass(args)
    add_norm(args)


def sampling_pass(args):
    N, V = args.rows, 151936
    logits = torch.randn(N, V, device="cuda").mul(3).bfloat16()
    banned = torch.tensor([151652, 151653, 151654, 151655, 151656], device="cuda")
    seed, step = torch.tensor(7, device="cuda"), torch.tensor(3, device="cuda")
    want = None
    print(f"sampling pass, {N} x {V} logits, temperature 1 (banned ids, max / sum of exp / Gumbel draw a chunk):")
    for block, warps in itertools.product(args.blocks, args.warps):
        chunks = triton.cdiv(V, block)
        f = torch.empty(3, N, chunks, device="cuda")
        at = torch.empty(N, chunks, dtype=torch.int32, device="cuda")

        def run():
            rows._sample_chunks_kernel[(N, chunks)](
                logits, banned, seed, step, f, at, V, banned.numel(), 1.0, BLOCK=block, NBP=8, GREEDY=False,
                num_warps=warps)
        run()
        row_max = f[0].amax(1), f[2].amax(1)  # (N,) each: the rows' maxima, whatever the chunks
        want = want or row_max
        same = all(torch.equal(a, b) for a, b in zip(row_max, want))
        us = bench_graph(run) * 1e3
        print(f"   chunk {block:5d} warps {warps}: {us:6.1f} us ({N * V * 2 / us / 1e6:.2f} TB/s of logits read)"
              f"{'' if same else '  ROW MAXIMA DIFFER'}")


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
                    rows._add_norm_kernel[(args.rows,)](x, d, w, out if parts else x, h, D, x.numel(), 1e-6,
                                                        BLOCK=triton.next_power_of_2(D), PARTS=parts, num_warps=warps)
                line.append(f"warps {warps} {bench_graph(run) * 1e3:.1f}")
            print(f"add + norm, {args.rows} x {D}, {parts} partials: " + ", ".join(line) + " us")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gemv", help="one-row projections")
    g.add_argument("--configs", nargs="+")
    g.add_argument("--sweep", action="store_true", help="sweep the one-row kernels' block sizes per shape")
    for name in ("gemm", "gated"):
        m = sub.add_parser(name, help="64-row products per tile setting")
        m.add_argument("--rows", type=int, default=64)
        m.add_argument("--bn", nargs="+", type=int, default=[32, 64, 128])
        m.add_argument("--bk", nargs="+", type=int, default=[64, 128, 256])
        m.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8, 16])
        m.add_argument("--stages", nargs="+", type=int, default=[3, 4])
        m.add_argument("--warps", nargs="+", type=int, default=[4])
        m.add_argument("--top", type=int, default=4)
    a = sub.add_parser("attention", help="split-KV attention settings vs SDPA")
    a.add_argument("--configs", nargs="+")
    a.add_argument("--rows", type=int, default=64)
    a.add_argument("--prompt", type=int, default=280, help="prompt slots (bench_sampler's 3B prompt: ~280)")
    a.add_argument("--new", type=int, default=512)
    a.add_argument("--layers", type=int, default=8)
    a.add_argument("--programs", nargs="+", type=int, default=[64, 128, 264, 528])
    a.add_argument("--bs", nargs="+", type=int, default=[32, 64, 128])
    a.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    a.add_argument("--loops", nargs="+", type=loop_kind, default=["skip", "scan2", "scan3"],
                   help="skip: branch over dead blocks; scanN: no branch, pipelined N stages, over the blocks from "
                        "the first readable to the last")
    a.add_argument("--settings", nargs="+", type=setting, default=[],
                   help="PROGRAMS,BS,WARPS,LOOP each (e.g. 128,32,4,scan3): these instead of the grid above")
    a.add_argument("--repeat", type=int, default=1, help="time the settings this many times, interleaved: medians")
    a.add_argument("--smoke", action="store_true", help="tiny shapes, one setting, the interpreter on a CPU")
    t = sub.add_parser("tail", help="64-row sampling pass and add + norm per launch setting")
    t.add_argument("--rows", type=int, default=64)
    t.add_argument("--blocks", nargs="+", type=int, default=[256, 512, 1024, 2048])
    t.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    args = ap.parse_args()
    {"gemv": gemv, "gemm": gemm, "gated": gated, "attention": attention, "tail": tail}[args.command](args)


if __name__ == "__main__":
    main()
