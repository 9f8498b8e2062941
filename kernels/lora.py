"""LoRA linear layer with the low-rank update fused into the frozen base matmuls, forward and backward.

    lora_linear(x, weight, bias, lora_a, lora_b, scale) = x W^T + b + scale * (x A^T) B^T

PEFT's layout: W (out, in) frozen, b (out,) frozen or None, A (r, in), B (out, r). Gradients for x, A and B
(and for W / b only if they require grad, through plain PyTorch). `lora_linear_reference` is PEFT's formula
under autograd; `lora_linear_addmm` is the pure-PyTorch version of what the kernels do (Unsloth's approach:
cuBLAS base products, low-rank terms accumulated in place with addmm, gradients for A and B by hand).

Why kernels: with N = 8192 tokens and in = out = 2048 the base products take ~0.18 ms on a GPU of ~3 TB/s, while one
extra pass over an (N, 2048) bf16 tensor takes ~0.011 ms. The unfused LoRA makes about eight such passes
(y, dY and dX read and written again for the low-rank terms). The Triton path makes the low-rank terms ride
on the base GEMM tiles instead:
- forward kernel: y tile = x W^T over the K loop, xa = x A^T accumulated in the same loop from the same x tile
  (or read, when precomputing it is cheaper, see `_in_loop`), epilogue y += (scale xa) B^T + b. Stores y and,
  from the first column block, xa (N, r): the only extra thing saved for backward.
- dX kernel: dX tile = dY W over the K loop, dYB = dY B accumulated in the same loop, epilogue
  dX += (scale dYB) A. The same programs also produce the LoRA gradients without another pass over
  dY or x: dA += scale dYB^T x[tile] in the epilogue (the x tile is (BM, BN), read once over the whole
  grid) and, in the first column block's K loop, dB += scale dY[tile]^T xa; both added atomically in
  float32 ((r, in) and (out, r): small).
What we measured (benchmarks/NOTES_kernels.md): this Triton GEMM main loop (no TMA, no warp
specialisation) runs at ~540 TFLOP/s where cuBLAS runs the same product at ~700, so the fused kernels only win
where the base product is thin (k/v: 2048 -> 256, 2.0x the base vs 2.9x for addmm and 3.6x for PEFT). For the
large shapes the addmm path is faster (1.30-1.78x the base vs PEFT's 1.40-2.19x). `lora_linear` picks per
shape (CONFIG["backend"] = "auto"); neither path reaches the 1.10x target.

Legend: N tokens (leading dims flattened), K reduction dim, r rank, RP rank padded to a power of two >= 16
(tensor-core dots need 16), BM / BN / BK tile sizes.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_lora.py
Benchmark (GPU): python benchmarks/bench_kernels.py
"""
import torch
import torch.nn.functional as F

from kernels import triton_available, use_triton

CONFIG = {
    # which implementation lora_linear uses on CUDA: "triton", "addmm", or "auto": Triton when the smaller
    # of in / out is below `triton_below` (thin products: skipping passes beats cuBLAS's faster main loop)
    "backend": "auto", "triton_below": 1024,
    # (BM, BN) candidates, largest first; the first that gives at least `min_programs` programs is used
    "tiles": [(128, 256), (128, 128), (64, 128)],
    "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "min_programs": 132,
    # FLOP per byte where a thin dot inside the K loop costs as much as one extra pass over its input
    # (~800 TFLOP/s bf16 over ~3 TB/s, measured: benchmarks/NOTES_kernels.md); see `_in_loop`
    "ridge": 267.0,
    "in_loop": None,  # True / False forces the choice (the benchmark compares both)
    "db_in_loop": True,  # dB from the dX kernel's first column block (False: one more cuBLAS pass over dY)
}
INTERPRET_CONFIG = {
    "tiles": [(16, 32), (16, 16)], "BK": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1, "min_programs": 4,
    "ridge": 267.0, "in_loop": None, "db_in_loop": True, "backend": "triton",
}


def _config(device):
    return CONFIG if device.type == "cuda" else INTERPRET_CONFIG


# --------------------------------------------------------------------------------------------------
# PyTorch references

def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale):
    # peft.tuners.lora.layer.Linear.forward (dropout 0): base(x) + lora_B(lora_A(x)) * scaling
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


class _LoRALinearAddmm(torch.autograd.Function):
    # cuBLAS products, low-rank terms accumulated in place (addmm), A/B gradients written out by hand
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])                                    # (N, in)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # LoRA weights may be kept in float32
        xa = x2 @ a.t()                                                    # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())   # (N, out)
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, bias, a, b)
        ctx.scale, ctx.x_shape, ctx.ab_dtypes = scale, x.shape, (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, bias, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])                                 # (N, out)
        dyb = dy2 @ lora_b                                                 # (N, r)
        dx = dy2 @ weight                                                  # (N, in)
        dx.addmm_(dyb, lora_a, alpha=s)
        da = (dyb.t() @ x2).mul_(s)                                        # (r, in)
        db = (dy2.t() @ xa).mul_(s)                                        # (out, r)
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        dbias = dy2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx.view(ctx.x_shape), dw, dbias, da.to(ctx.ab_dtypes[0]), db.to(ctx.ab_dtypes[1]), None


def lora_linear_addmm(x, weight, bias, lora_a, lora_b, scale):
    return _LoRALinearAddmm.apply(x, weight, bias, lora_a, lora_b, float(scale))


# --------------------------------------------------------------------------------------------------
# Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        # GROUP_M row blocks side by side over the same columns: their weight tiles are shared through L2
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size, (pid % width) // size

    @triton.jit
    def _f32(t, DOT_F32: tl.constexpr):
        # the CPU interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in float32
        if DOT_F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _lora_fwd_kernel(x_ptr, w_ptr, b_ptr, a_ptr, lb_ptr, xa_ptr, y_ptr, N, D_IN, D_OUT, R, scale,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                         GROUP_M: tl.constexpr, XA_IN_LOOP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
        # y[rows, cols] = x W^T + bias + scale * (x A^T) B^T; x (N, in), W (out, in), A (r, in), B (out, r)
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(D_OUT, BN), GROUP_M)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        ranks = tl.arange(0, RP)
        ks = tl.arange(0, BK)
        rmask = rows < N
        cmask = cols < D_OUT
        qmask = ranks < R
        x_blk = x_ptr + rows[:, None] * D_IN + ks[None, :]                 # (BM, BK)
        w_blk = w_ptr + cols[:, None] * D_IN + ks[None, :]                 # (BN, BK)
        a_blk = a_ptr + ranks[:, None] * D_IN + ks[None, :]                # (RP, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        xa = tl.zeros([BM, RP], tl.float32)
        for k in range(0, D_IN, BK):
            kmask = (k + ks) < D_IN
            if EVEN_K:  # no mask along K: lets the loads vectorise
                xt = tl.load(x_blk, mask=rmask[:, None], other=0.0)
                wt = tl.load(w_blk, mask=cmask[:, None], other=0.0)
            else:
                xt = tl.load(x_blk, mask=rmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w_blk, mask=cmask[:, None] & kmask[None, :], other=0.0)
            xt = _f32(xt, DOT_F32)
            acc = tl.dot(xt, tl.trans(_f32(wt, DOT_F32)), acc)
            if XA_IN_LOOP:
                at = _f32(tl.load(a_blk, mask=qmask[:, None] & kmask[None, :], other=0.0), DOT_F32)
                xa = tl.dot(xt, tl.trans(at), xa)
            x_blk += BK
            w_blk += BK
            a_blk += BK
        xa_blk = xa_ptr + rows[:, None] * R + ranks[None, :]               # (BM, RP) in xa (N, r)
        if XA_IN_LOOP:
            xa = xa.to(xa_ptr.dtype.element_ty)  # rounded like a cuBLAS x A^T would be
            if pid_n == 0:
                tl.store(xa_blk, xa, mask=rmask[:, None] & qmask[None, :])
        else:
            xa = tl.load(xa_blk, mask=rmask[:, None] & qmask[None, :], other=0.0)
        lb = tl.load(lb_ptr + cols[:, None] * R + ranks[None, :],
                     mask=cmask[:, None] & qmask[None, :], other=0.0)                # (BN, RP) of B
        # scale folded into the thin operand, and the product accumulated into acc: no second (BM, BN) tile
        xs = (xa.to(tl.float32) * scale).to(lb.dtype)
        acc = tl.dot(_f32(xs, DOT_F32), tl.trans(_f32(lb, DOT_F32)), acc)  # (BM, RP) @ (RP, BN)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * D_OUT + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _lora_dx_kernel(dy_ptr, w_ptr, a_ptr, lb_ptr, x_ptr, xa_ptr, dyb_ptr, dx_ptr, da_ptr, db_ptr,
                        N, D_IN, D_OUT, R, scale,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                        GROUP_M: tl.constexpr, DYB_IN_LOOP: tl.constexpr, DB_IN_LOOP: tl.constexpr,
                        EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
        # dX[rows, cols] = dY W + scale (dY B) A, plus the float32 dA (r, in) and dB (out, r) parts, added
        # atomically. K loop over `out`; W (out, in), B (out, r), A (r, in), x (N, in), xa (N, r).
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(D_IN, BN), GROUP_M)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        ranks = tl.arange(0, RP)
        ks = tl.arange(0, BK)
        rmask = rows < N
        cmask = cols < D_IN
        qmask = ranks < R
        dy_blk = dy_ptr + rows[:, None] * D_OUT + ks[None, :]              # (BM, BK)
        w_blk = w_ptr + ks[:, None] * D_IN + cols[None, :]                 # (BK, BN)
        lb_blk = lb_ptr + ks[:, None] * R + ranks[None, :]                 # (BK, RP)
        acc = tl.zeros([BM, BN], tl.float32)
        dyb = tl.zeros([BM, RP], tl.float32)
        xa = _f32(tl.load(xa_ptr + rows[:, None] * R + ranks[None, :],
                          mask=rmask[:, None] & qmask[None, :], other=0.0), DOT_F32)        # (BM, RP)
        for k in range(0, D_OUT, BK):
            kmask = (k + ks) < D_OUT
            if EVEN_K:
                dyt = tl.load(dy_blk, mask=rmask[:, None], other=0.0)
                wt = tl.load(w_blk, mask=cmask[None, :], other=0.0)
            else:
                dyt = tl.load(dy_blk, mask=rmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w_blk, mask=kmask[:, None] & cmask[None, :], other=0.0)
            dyt = _f32(dyt, DOT_F32)
            acc = tl.dot(dyt, _f32(wt, DOT_F32), acc)
            if DYB_IN_LOOP:
                lbt = _f32(tl.load(lb_blk, mask=kmask[:, None] & qmask[None, :], other=0.0), DOT_F32)
                dyb = tl.dot(dyt, lbt, dyb)
            if DB_IN_LOOP:
                # dB needs every column of dY once per row block: the first column block adds it while it
                # streams dY anyway, so dY is read once for dX, dY B and dB together
                if pid_n == 0:
                    part = tl.dot(tl.trans(dyt), xa)                       # (BK, BM) @ (BM, RP) -> (BK, RP)
                    tl.atomic_add(db_ptr + (k + ks)[:, None] * R + ranks[None, :], part * scale,
                                  mask=kmask[:, None] & qmask[None, :], sem="relaxed")
            dy_blk += BK
            w_blk += BK * D_IN
            lb_blk += BK * R
        dyb_blk = dyb_ptr + rows[:, None] * R + ranks[None, :]
        if DYB_IN_LOOP:
            dyb = dyb.to(dyb_ptr.dtype.element_ty)  # rounded like a cuBLAS dY B would be
        else:
            dyb = tl.load(dyb_blk, mask=rmask[:, None] & qmask[None, :], other=0.0)
        dys = _f32((dyb.to(tl.float32) * scale).to(dx_ptr.dtype.element_ty), DOT_F32)  # scale folded in
        at = _f32(tl.load(a_ptr + ranks[:, None] * D_IN + cols[None, :],
                          mask=qmask[:, None] & cmask[None, :], other=0.0), DOT_F32)   # (RP, BN) of A
        acc = tl.dot(dys, at, acc)
        tile = rmask[:, None] & cmask[None, :]
        tl.store(dx_ptr + rows[:, None] * D_IN + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tile)
        xt = _f32(tl.load(x_ptr + rows[:, None] * D_IN + cols[None, :], mask=tile, other=0.0), DOT_F32)
        part = tl.dot(tl.trans(dys), xt)                                   # (RP, BM) @ (BM, BN) -> (RP, BN)
        # relaxed: plain float adds, no ordering needed (the default acq_rel adds a fence to every atomic)
        tl.atomic_add(da_ptr + ranks[:, None] * D_IN + cols[None, :], part,
                      mask=qmask[:, None] & cmask[None, :], sem="relaxed")


def _tiles(N, n_cols, cfg):
    for bm, bn in cfg["tiles"]:
        if triton.cdiv(N, bm) * triton.cdiv(n_cols, bn) >= cfg["min_programs"]:
            return bm, bn
    return cfg["tiles"][-1]


def _in_loop(rp, n_cols, bn, cfg):
    # A thin (BM, RP) dot inside the K loop adds RP / BN to that kernel's tensor-core work; computing the
    # same product beforehand costs one read of its (N, K) input. Per (N * K) element the first is
    # 2 * n_cols * RP / BN FLOP, the second 2 bytes: keep it in the loop while that is under the ridge.
    if cfg["in_loop"] is not None:
        return cfg["in_loop"]
    return rp * n_cols / bn < cfg["ridge"]


def _dot_f32(device):
    return device.type != "cuda"


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        D_IN, D_OUT, R = x.shape[-1], weight.shape[0], lora_a.shape[0]
        dt = weight.dtype
        x2 = x.reshape(-1, D_IN).to(dt).contiguous()                      # (N, in)
        a, b = lora_a.to(dt).contiguous(), lora_b.to(dt).contiguous()      # (r, in), (out, r)
        w = weight.contiguous()
        N = x2.shape[0]
        cfg = _config(x.device)
        rp = max(16, triton.next_power_of_2(R))
        bm, bn = _tiles(N, D_OUT, cfg)
        in_loop = _in_loop(rp, D_OUT, bn, cfg)
        y = torch.empty(N, D_OUT, device=x.device, dtype=dt)
        xa = torch.empty(N, R, device=x.device, dtype=dt) if in_loop else x2 @ a.t()    # (N, r)
        if N:
            grid = (triton.cdiv(N, bm) * triton.cdiv(D_OUT, bn),)
            bias_arg = bias if bias is not None else w  # any pointer; unused without HAS_BIAS
            _lora_fwd_kernel[grid](x2, w, bias_arg, a, b, xa, y, N, D_IN, D_OUT, R, scale,
                                   BM=bm, BN=bn, BK=cfg["BK"], RP=rp, GROUP_M=cfg["GROUP_M"],
                                   XA_IN_LOOP=in_loop, HAS_BIAS=bias is not None,
                                   EVEN_K=D_IN % cfg["BK"] == 0, DOT_F32=_dot_f32(x.device),
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.save_for_backward(x2, xa, w, bias, a, b)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], D_OUT)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, w, bias, a, b = ctx.saved_tensors
        N, D_IN = x2.shape
        D_OUT, R = b.shape
        dy2 = dy.reshape(-1, D_OUT).to(w.dtype).contiguous()              # (N, out)
        cfg = _config(x2.device)
        rp = max(16, triton.next_power_of_2(R))
        bm, bn = _tiles(N, D_IN, cfg)
        in_loop = _in_loop(rp, D_IN, bn, cfg)
        dx = torch.empty(N, D_IN, device=x2.device, dtype=w.dtype)
        da = torch.zeros(R, D_IN, device=x2.device, dtype=torch.float32)
        db = torch.zeros(D_OUT, R, device=x2.device, dtype=torch.float32)
        dyb = torch.empty(N, R, device=x2.device, dtype=w.dtype) if in_loop else dy2 @ b    # (N, r)
        db_in_loop = cfg["db_in_loop"]
        if N:
            grid = (triton.cdiv(N, bm) * triton.cdiv(D_IN, bn),)
            _lora_dx_kernel[grid](dy2, w, a, b, x2, xa, dyb, dx, da, db, N, D_IN, D_OUT, R, ctx.scale,
                                  BM=bm, BN=bn, BK=cfg["BK"], RP=rp, GROUP_M=cfg["GROUP_M"],
                                  DYB_IN_LOOP=in_loop, DB_IN_LOOP=db_in_loop, EVEN_K=D_OUT % cfg["BK"] == 0,
                                  DOT_F32=_dot_f32(x2.device),
                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if not db_in_loop:
            db = torch.mm(dy2.t(), xa).float().mul_(ctx.scale)                # (out, N) @ (N, r)
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None           # only if the base trains
        dbias = dy2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx.view(ctx.x_shape).to(ctx.x_dtype), dw, dbias,
                da.to(ctx.ab_dtypes[0]), db.to(ctx.ab_dtypes[1]), None)


def lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """x W^T + b + scale (x A^T) B^T with W, b frozen; PEFT layout A (r, in), B (out, r)."""
    if use_triton(x, weight):
        cfg = _config(x.device)
        triton_wins = min(weight.shape) < cfg.get("triton_below", 0)
        fused = cfg["backend"] == "triton" or (cfg["backend"] == "auto" and triton_wins)
        fn = _LoRALinear if fused else _LoRALinearAddmm
        return fn.apply(x, weight, bias, lora_a, lora_b, float(scale))
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)
