"""Per-token log-probabilities of target tokens, without a (tokens x vocabulary) tensor in memory.

RL and preference losses (GRPO, DPO) need log p(target) for every token. With Qwen's 151,936-word vocabulary the
logits dominate memory: float32 log_softmax + gather over 8k tokens takes ~14 GiB with backward. Here:

    token_logprobs(logits, targets, temperature=1.0)                         (..., V) -> (...) float32
    linear_token_logprobs(hidden, weight, targets, temperature=1.0,          (..., H), (V, H) -> (...) float32
                          return_entropy=False)                              (and the entropy, (...) float32)

    z = logits / temperature,   logp = z[target] - logsumexp(z),   entropy = logsumexp(z) - sum(softmax(z) * z)

Targets equal to -100 give logp 0 (entropy 0) and no gradient. logp is clamped at 0: rounding can push it a
hair above, and a positive log-prob poisons importance ratios (verl issue #2656, rewards collapsed).

Triton path (the `*_reference` twins below are the plain-PyTorch definition, used on the CPU):
- token_logprobs: one program per row streams the row once with an online max / sum-exp in float32 (base 2,
  so exp2 and the 1/T scale fold into one multiply) and saves only the row's log-sum-exp. Backward reads the
  logits once more and writes dlogits = g * (onehot - softmax) / T from that saved log-sum-exp.
- linear_token_logprobs has two forwards, picked by what the caller will differentiate:
  * no gradient, or a trained head (full fine-tuning): one kernel tiles (BM tokens) x (BV vocab); each logit
    tile is a matmul of a hidden block and a weight block held in registers, folded into running (max,
    sum-exp, sum p*z, target z) per row, and dropped. Programs split the vocabulary; their per-row stats
    (S x N) are merged in PyTorch. Saved for backward: hidden, weight, targets and two floats per token.
    Backward, per chunk of C tokens: a kernel recomputes each logit tile and writes dlogits (C x V in the
    weight dtype, ~150 MB), then cuBLAS does grad_hidden[chunk] = dlogits @ weight and, if the head trains,
    grad_weight += dlogits^T @ hidden[chunk]. 6NHV of matmul work.
  * hidden requires grad and the head is frozen (LoRA, GRPO, DPO: the usual case): a log-prob is one number
    per token, so its gradient is grad_logp * J with J = d logp / d hidden = ((onehot - p) / T) @ weight,
    (N, H), computable in the forward. Per chunk of C tokens: cuBLAS writes the logits (C x V) in float32, a
    row kernel (the token_logprobs one) takes lse, another writes (onehot - p) / T, cuBLAS multiplies by the
    weight. Backward scales J's rows. 4NHV of cuBLAS GEMMs; memory: the chunk (C x V, float32 + bf16) and J.
    If the entropy's gradient is asked for after all, backward falls back to the recompute above.
  A fully fused backward would need a (BM x H) gradient accumulator per program, too large for registers at
  H = 2048..3584; cuBLAS on one chunk keeps the reduction over the vocabulary inside one float32 GEMM.

Measured (N = 8192, V = 151,936, bf16; the GPU in benchmarks/NOTES_kernels.md): fwd+bwd with a frozen head takes
255 / 279 MiB extra (1.5-1.7% of the naive path's 16.2 GiB) and 0.67x / 0.81x the naive time at H = 2048 / 3584;
the no-grad forward 5 MiB and 0.56x / 0.75x; token_logprobs' forward runs at the speed of one read of the logits.

Legend: N tokens (leading dims flattened), V vocabulary, H hidden, C tokens per backward chunk, S vocab splits,
BM / BV / BK tile sizes over tokens / vocabulary / hidden.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_logprobs.py
Benchmark (GPU): python benchmarks/bench_kernels.py
"""
import math

import torch
import torch.nn.functional as F

from kernels import triton_available, use_triton

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
IGNORE = -100

# Tile configurations. The benchmark overrides these to try others; the interpreter gets small tiles so the
# CPU tests stay fast and still cover several tiles, masked edges and vocab splits.
CONFIG = {
    "rows_fwd": dict(BLOCK_V=4096, num_warps=8),
    "rows_bwd": dict(BLOCK_V=4096, num_warps=8),
    "linear_fwd": dict(BM=128, BV=256, BK=64, GROUP_M=16, num_warps=8, num_stages=3),
    "linear_bwd": dict(BM=128, BV=256, BK=64, GROUP_M=4, num_warps=8, num_stages=4),
    "bwd_chunk_bytes": 160 * 2**20,  # size of one dlogits chunk (C x V); C is a multiple of BM
    "jac_chunk_bytes": 224 * 2**20,  # float32 logits + dlogits of one forward chunk (C x V each), frozen head
    "waves": 16,  # forward programs = waves x SMs (when S allows): whole waves, so no SM idles in the tail
}
INTERPRET_CONFIG = {
    "rows_fwd": dict(BLOCK_V=64, num_warps=4),
    "rows_bwd": dict(BLOCK_V=64, num_warps=4),
    "linear_fwd": dict(BM=16, BV=32, BK=16, GROUP_M=2, num_warps=4, num_stages=1),
    "linear_bwd": dict(BM=16, BV=32, BK=16, GROUP_M=2, num_warps=4, num_stages=1),
    "bwd_chunk_bytes": 8 * 1024,  # a few rows per chunk, so the tests cross chunk boundaries
    "jac_chunk_bytes": 16 * 1024,
    "waves": 4,
}


def _config(device):
    return CONFIG if device.type == "cuda" else INTERPRET_CONFIG


# --------------------------------------------------------------------------------------------------
# PyTorch references (same signatures). Float32 math (float64 if given float64), no clever memory tricks.

def token_logprobs_reference(logits, targets, temperature=1.0):
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype) / temperature                                  # (..., V)
    active = targets != IGNORE
    safe = torch.where(active, targets, 0)
    z_t = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)                  # (...)
    logp = (z_t - torch.logsumexp(z, dim=-1)).clamp(max=0.0)
    return torch.where(active, logp, 0.0).float()


def linear_token_logprobs_reference(hidden, weight, targets, temperature=1.0, return_entropy=False):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    # logits in float32 from the (possibly bf16) inputs: the exact function the kernel computes
    z = F.linear(hidden.to(dtype), weight.to(dtype)) / temperature      # (..., V)
    active = targets != IGNORE
    safe = torch.where(active, targets, 0)
    lse = torch.logsumexp(z, dim=-1)                                    # (...)
    logp = (z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse).clamp(max=0.0)
    logp = torch.where(active, logp, 0.0).float()
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, torch.where(active, entropy, 0.0).float()


# --------------------------------------------------------------------------------------------------
# Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rows_fwd_kernel(x_ptr, tgt_ptr, logp_ptr, lse_ptr, ez_ptr, V, stride_x, scale2,
                         BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
        # one row of logits per program; scale2 = log2(e) / T, so z2 = x * scale2 is z in base-2 units.
        # ENTROPY: also E_p[z / T] (natural units), from a running sum of p * z2 rescaled like s
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(tgt_ptr + row)
        active = tgt != -100
        x_row = x_ptr + row * stride_x
        v_end = tl.where(active, V, 0)  # masked rows load nothing; their result is discarded
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # running max (a scalar)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)                  # running sum of exp2(z2 - m)
        pz = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)                 # running sum of exp2(z2 - m) * z2
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            z = tl.load(x_row + cols, mask=cols < v_end, other=float("-inf")).to(tl.float32) * scale2
            z = tl.where(active, z, 0.0)
            m_new = tl.maximum(m, tl.max(z, 0))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(z - m_new)
            s = s * alpha + tl.sum(p, 0)
            if ENTROPY:
                pz = pz * alpha + tl.sum(p * tl.where(cols < v_end, z, 0.0), 0)  # no 0 * -inf
            m = m_new
        lse2 = m + tl.log2(s)
        z_t = tl.load(x_row + tl.where(active, tgt, 0)).to(tl.float32) * scale2
        logp = tl.minimum((z_t - lse2) * 0.6931471805599453, 0.0)
        tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
        tl.store(lse_ptr + row, lse2)
        if ENTROPY:
            tl.store(ez_ptr + row, pz / s * 0.6931471805599453)

    @triton.jit
    def _rows_bwd_kernel(x_ptr, tgt_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_x, stride_dx, scale2, inv_temp,
                         BLOCK_V: tl.constexpr):
        # dlogits = g * (onehot - softmax(z)) / T, softmax recomputed from the saved base-2 log-sum-exp
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(tgt_ptr + row)
        active = tgt != -100
        lse2 = tl.load(lse_ptr + row)
        coef = tl.where(active, tl.load(g_ptr + row), 0.0) * inv_temp
        x_row = x_ptr + row * stride_x
        dx_row = dx_ptr + row * stride_dx
        v_end = tl.where(active, V, 0)
        cols0 = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            z = tl.load(x_row + cols, mask=cols < v_end, other=0.0).to(tl.float32) * scale2
            p = tl.where(active, tl.exp2(z - lse2), 0.0)  # where, not a product: a masked row's exp2 may be inf
            d = (tl.where(cols == tgt, 1.0, 0.0) - p) * coef
            tl.store(dx_row + cols, d.to(dx_ptr.dtype.element_ty), mask=cols < V)

    @triton.jit
    def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
        # launch order: GROUP_M row blocks run side by side over the same columns, so the weight tiles they
        # read are shared through L2 instead of each coming from HBM
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size
        pid_n = (pid % width) // size
        return pid_m, pid_n

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                    PREC: tl.constexpr, DOT_F32: tl.constexpr):
        # (BM, BV) logits = hidden[rows] @ weight[cols]^T, float32 accumulation over H in steps of BK
        ks = tl.arange(0, BK)
        h_blk = h_ptr + rows[:, None] * stride_h + ks[None, :]             # (BM, BK) pointers
        w_blk = w_ptr + cols[:, None] * stride_w + ks[None, :]             # (BV, BK) pointers
        acc = tl.zeros([BM, BV], tl.float32)
        for k in range(0, H, BK):
            if EVEN_K:
                a = tl.load(h_blk, mask=rmask[:, None], other=0.0)
                b = tl.load(w_blk, mask=cmask[:, None], other=0.0)
            else:
                kmask = (k + ks) < H
                a = tl.load(h_blk, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_blk, mask=cmask[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:  # the CPU interpreter's bf16 dot is wrong (triton 3.9); bf16 products fit in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
            h_blk += BK
            w_blk += BK
        return acc

    @triton.jit
    def _linear_fwd_kernel(h_ptr, w_ptr, tgt_ptr, stats_ptr, N, V, H, stride_h, stride_w, scale2,
                           n_splits, tiles_per_split,
                           BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, ENTROPY: tl.constexpr, PREC: tl.constexpr,
                           DOT_F32: tl.constexpr):
        # program (row block, vocab split): online (max, sum-exp, sum p*z, target z) over the split's tiles
        pid_m, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BM), n_splits, GROUP_M)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-100)
        m = tl.full([BM], float("-inf"), tl.float32)
        s = tl.zeros([BM], tl.float32)
        pz = tl.zeros([BM], tl.float32)
        zt = tl.zeros([BM], tl.float32)
        if tl.sum((tgt != -100).to(tl.int32), 0) > 0:  # a block of padding only is skipped
            t1 = tl.minimum((pid_s + 1) * tiles_per_split, tl.cdiv(V, BV))
            for t in range(pid_s * tiles_per_split, t1):
                cols = t * BV + tl.arange(0, BV)
                cmask = cols < V
                acc = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                                  BM, BV, BK, EVEN_K, PREC, DOT_F32)
                z = tl.where(cmask[None, :], acc * scale2, float("-inf"))      # (BM, BV) base-2 z
                m_new = tl.maximum(m, tl.max(z, 1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(z - m_new[:, None])
                s = s * alpha + tl.sum(p, 1)
                if ENTROPY:
                    pz = pz * alpha + tl.sum(p * tl.where(cmask[None, :], z, 0.0), 1)  # no 0 * -inf
                zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
                m = m_new
        # stats: (4, S, N) float32
        out = stats_ptr + pid_s * N + rows
        tl.store(out, m, mask=rmask)
        tl.store(out + n_splits * N, s, mask=rmask)
        tl.store(out + 2 * n_splits * N, zt, mask=rmask)
        if ENTROPY:
            tl.store(out + 3 * n_splits * N, pz, mask=rmask)

    @triton.jit
    def _linear_bwd_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, ge_ptr, ez_ptr, d_ptr,
                           n_rows, V, H, stride_h, stride_w, stride_d, scale2, inv_temp,
                           BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, ENTROPY: tl.constexpr, PREC: tl.constexpr,
                           DOT_F32: tl.constexpr):
        # one (BM, BV) tile of dlogits for a chunk of rows: recompute the logits, then
        #   d logp / d z    = onehot - p
        #   d entropy / d z = p * (E_p[z] - z)          (z = logits / T; both divided by T for d / d logits)
        pid_m, pid_v = _grouped(tl.program_id(0), tl.cdiv(n_rows, BM), tl.cdiv(V, BV), GROUP_M)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        cols = pid_v * BV + tl.arange(0, BV)
        rmask = rows < n_rows
        cmask = cols < V
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-100)
        active = tgt != -100
        d = tl.zeros([BM, BV], tl.float32)
        if tl.sum(active.to(tl.int32), 0) > 0:
            lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
            g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
            acc = _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                              BM, BV, BK, EVEN_K, PREC, DOT_F32)
            z2 = acc * scale2
            p = tl.where(active[:, None], tl.exp2(z2 - lse2[:, None]), 0.0)
            d = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
            if ENTROPY:
                ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0)
                ez = tl.load(ez_ptr + rows, mask=rmask, other=0.0)
                d += ge[:, None] * p * (ez[:, None] - z2 * 0.6931471805599453)
            d = d * inv_temp
        d_blk = d_ptr + rows[:, None] * stride_d + cols[None, :]
        tl.store(d_blk, d.to(d_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _prec(dtype):
    # bf16/fp16 tiles run on tensor cores with float32 accumulation; float32 inputs get true float32 products
    # (tf32 would lose ~3 decimal digits of the logits)
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_f32(device):
    return device.type != "cuda"  # only the interpreter runs on CPU tensors


# --------------------------------------------------------------------------------------------------
# token_logprobs

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        V = logits.shape[-1]
        x = logits.reshape(-1, V)                                          # (N, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        t = targets.reshape(-1).contiguous()                               # (N,)
        N = x.shape[0]
        logp = torch.empty(N, device=x.device, dtype=torch.float32)
        lse2 = torch.empty(N, device=x.device, dtype=torch.float32)
        if N:
            cfg = _config(x.device)["rows_fwd"]
            _rows_fwd_kernel[(N,)](x, t, logp, lse2, lse2, V, x.stride(0), LOG2E / temperature,
                                   BLOCK_V=cfg["BLOCK_V"], ENTROPY=False, num_warps=cfg["num_warps"])
        ctx.save_for_backward(x, t, lse2)
        ctx.temperature = temperature
        ctx.shape = logits.shape
        return logp.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        x, t, lse2 = ctx.saved_tensors
        N, V = x.shape
        g = grad.reshape(-1).float().contiguous()                          # (N,)
        dx = torch.empty_like(x)                                           # (N, V)
        if N:
            cfg = _config(x.device)["rows_bwd"]
            T = ctx.temperature
            _rows_bwd_kernel[(N,)](x, t, lse2, g, dx, V, x.stride(0), dx.stride(0), LOG2E / T, 1.0 / T,
                                   BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"])
        return dx.view(ctx.shape), None, None


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[targets] per token, float32, <= 0; targets -100 give 0."""
    if use_triton(logits):
        return _TokenLogprobs.apply(logits, targets, float(temperature))
    return token_logprobs_reference(logits, targets, temperature)


# --------------------------------------------------------------------------------------------------
# linear_token_logprobs

_SMS = {}


def _splits(N, V, cfg, device):
    # vocab splits S: enough programs to fill the GPU in whole waves, few enough that the (4, S, N) stats
    # stay small (S x N floats; S = 33 at N = 8192 on a GPU of 132 SMs)
    if device.type == "cuda" and device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SMS.get(device.index, 2) if device.type == "cuda" else 2
    n_tiles = triton.cdiv(V, cfg["linear_fwd"]["BV"])
    num_m = triton.cdiv(N, cfg["linear_fwd"]["BM"])
    S = max(1, min(n_tiles, round(cfg["waves"] * sms / num_m)))
    per = triton.cdiv(n_tiles, S)
    return triton.cdiv(n_tiles, per), per


def _fused_stats(h, w, t, temperature, return_entropy):
    """The no-materialisation forward: (lse2, logp, E_p[z] or None) per row from the Triton tile kernel."""
    N, H = h.shape
    V = w.shape[0]
    cfg = _config(h.device)
    c = cfg["linear_fwd"]
    S, per = _splits(N, V, cfg, h.device)
    stats = torch.empty(4 if return_entropy else 3, S, N, device=h.device, dtype=torch.float32)
    if N:
        grid = (triton.cdiv(N, c["BM"]) * S,)
        _linear_fwd_kernel[grid](h, w, t, stats, N, V, H, h.stride(0), w.stride(0), LOG2E / temperature,
                                 S, per, BM=c["BM"], BV=c["BV"], BK=c["BK"], GROUP_M=c["GROUP_M"],
                                 EVEN_K=H % c["BK"] == 0, ENTROPY=return_entropy, PREC=_prec(h.dtype),
                                 DOT_F32=_dot_f32(h.device),
                                 num_warps=c["num_warps"], num_stages=c["num_stages"])
    # merge the S partial online-softmax states per row (all (S, N) -> (N,)); base-2 units until the end
    m = stats[0]
    M = m.max(0).values
    r = torch.exp2(m - M)                                                  # (S, N) rescale of each split
    sumexp = (stats[1] * r).sum(0)
    lse2 = M + torch.log2(sumexp)
    logp = ((stats[2].sum(0) - lse2) * LN2).clamp(max=0.0)
    ez = (stats[3] * r).sum(0) / sumexp * LN2 if return_entropy else None  # E_p[z] in natural units
    return lse2, logp, ez


def _logits_f32(h, w, out):
    # (C, H) @ (V, H)^T -> (C, V), accumulated and kept in float32 (bf16 logits would cost ~1e-2 of logp)
    if h.is_cuda:
        return torch.mm(h, w.t(), out_dtype=torch.float32, out=out)
    return torch.mm(h.float(), w.float().t(), out=out)  # the interpreter tests on the CPU


def _jacobian_stats(h, w, t, temperature, return_entropy):
    """The frozen-head training forward: statistics as above plus J = d logp / d hidden (N, H).

    logp of a token is a scalar, so its gradient is grad_logp * J: backward only scales rows. Per chunk of C
    tokens: cuBLAS writes the logits (C, V) in float32, one row kernel takes lse (and E_p[z]), another writes
    dlogits = (onehot - p) / T, cuBLAS multiplies by the weight. 4NHV of cuBLAS GEMMs instead of the 6NHV of
    forward + recompute + backward, for (C, V) of float32 + weight dtype and J (N, H) of memory."""
    N, H = h.shape
    V = w.shape[0]
    cfg = _config(h.device)
    C = max(16, min(N, cfg["jac_chunk_bytes"] // (V * (4 + w.element_size())) // 16 * 16))
    lse2 = torch.empty(N, device=h.device, dtype=torch.float32)
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    ez = torch.empty(N, device=h.device, dtype=torch.float32) if return_entropy else None
    jac = torch.empty(N, H, device=h.device, dtype=w.dtype)
    z = torch.empty(C, V, device=h.device, dtype=torch.float32)           # (C, V) logits of one chunk
    d = torch.empty(C, V, device=h.device, dtype=w.dtype)                 # (C, V) their dlogp / dlogits
    ones = torch.ones(C, device=h.device, dtype=torch.float32)
    rf, rb = cfg["rows_fwd"], cfg["rows_bwd"]
    for r0 in range(0, N, C):
        r1 = min(r0 + C, N)
        n = r1 - r0
        zc, dc = z[:n], d[:n]
        _logits_f32(h[r0:r1], w, zc)
        _rows_fwd_kernel[(n,)](zc, t[r0:r1], logp[r0:r1], lse2[r0:r1], ez[r0:r1] if return_entropy else logp,
                               V, zc.stride(0), LOG2E / temperature, BLOCK_V=rf["BLOCK_V"],
                               ENTROPY=return_entropy, num_warps=rf["num_warps"])
        _rows_bwd_kernel[(n,)](zc, t[r0:r1], lse2[r0:r1], ones, dc, V, zc.stride(0), dc.stride(0),
                               LOG2E / temperature, 1.0 / temperature, BLOCK_V=rb["BLOCK_V"],
                               num_warps=rb["num_warps"])
        torch.mm(dc, w, out=jac[r0:r1])                                    # (C, V) @ (V, H) -> (C, H)
    return lse2, logp, ez, jac


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, jacobian):
        H = hidden.shape[-1]
        h = hidden.reshape(-1, H)                                          # (N, H)
        if h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        h = h.contiguous()
        w = weight.contiguous()                                            # (V, H)
        t = targets.reshape(-1).contiguous()                               # (N,)
        if jacobian:
            lse2, logp, ez, jac = _jacobian_stats(h, w, t, temperature, return_entropy)
        else:
            (lse2, logp, ez), jac = _fused_stats(h, w, t, temperature, return_entropy), None
        active = t != IGNORE
        logp = torch.where(active, logp, 0.0)
        entropy = torch.where(active, lse2 * LN2 - ez, 0.0) if return_entropy else None
        ctx.save_for_backward(h, w, t, lse2, ez, jac)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.set_materialize_grads(False)
        lead = hidden.shape[:-1]
        if return_entropy:
            return logp.view(lead), entropy.view(lead)
        return logp.view(lead)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, w, t, lse2, ez, jac = ctx.saved_tensors
        N, H = h.shape
        V = w.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        active = t != IGNORE
        zeros = torch.zeros(N, device=h.device, dtype=torch.float32)
        g = zeros if grad_logp is None else torch.where(active, grad_logp.reshape(-1).float(), 0.0)
        entropy = ctx.return_entropy and grad_entropy is not None
        if jac is not None and not entropy and not need_w:
            # the forward kept d logp / d hidden: scale its rows (in float32, rounded once to jac's dtype)
            grad_h = torch.mul(jac, g[:, None], out=torch.empty_like(jac))   # (N, H)
            return grad_h.view(ctx.hidden_shape).to(ctx.hidden_dtype), None, None, None, None, None
        ge = torch.where(active, grad_entropy.reshape(-1).float(), 0.0) if entropy else zeros
        # lse2 of a skipped (all-padding) row block is NaN: the kernel masks those rows, keep it finite anyway
        lse2 = torch.nan_to_num(lse2)
        ez = torch.nan_to_num(ez) if entropy else zeros

        cfg = _config(h.device)
        c = cfg["linear_bwd"]
        C = max(c["BM"], cfg["bwd_chunk_bytes"] // (V * w.element_size()) // c["BM"] * c["BM"])
        grad_h = torch.empty(N, H, device=h.device, dtype=h.dtype) if need_h else None
        grad_w = torch.zeros(V, H, device=h.device, dtype=torch.float32) if need_w else None
        d = torch.empty(min(C, N), V, device=h.device, dtype=w.dtype)     # (C, V) the one dlogits chunk
        T = ctx.temperature
        for r0 in range(0, N, C):
            r1 = min(r0 + C, N)
            dc = d[: r1 - r0]
            grid = (triton.cdiv(r1 - r0, c["BM"]) * triton.cdiv(V, c["BV"]),)
            _linear_bwd_kernel[grid](h[r0:r1], w, t[r0:r1], lse2[r0:r1], g[r0:r1], ge[r0:r1], ez[r0:r1], dc,
                                     r1 - r0, V, H, h.stride(0), w.stride(0), dc.stride(0), LOG2E / T, 1.0 / T,
                                     BM=c["BM"], BV=c["BV"], BK=c["BK"], GROUP_M=c["GROUP_M"],
                                     EVEN_K=H % c["BK"] == 0, ENTROPY=entropy, PREC=_prec(h.dtype),
                                     DOT_F32=_dot_f32(h.device),
                                     num_warps=c["num_warps"], num_stages=c["num_stages"])
            if need_h:
                torch.mm(dc, w, out=grad_h[r0:r1])                         # (C, V) @ (V, H) -> (C, H)
            if need_w:
                # the head trains (full fine-tuning): accumulate in float32 across chunks
                grad_w += torch.mm(dc.t(), h[r0:r1]).float()              # (V, C) @ (C, H) -> (V, H)
        if need_h:
            grad_h = grad_h.view(ctx.hidden_shape).to(ctx.hidden_dtype)
        if need_w:
            grad_w = grad_w.to(w.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """Log-probs (and optionally entropies) of targets under softmax(hidden @ weight^T / temperature),
    without materialising the logits. float32, <= 0; targets -100 give 0 and no gradient."""
    if use_triton(hidden, weight):
        # a frozen head in training (LoRA, GRPO): take d logp / d hidden in the forward pass (4NHV, not 6NHV)
        jacobian = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
        return _LinearTokenLogprobs.apply(hidden, weight, targets, float(temperature), bool(return_entropy),
                                          jacobian)
    return linear_token_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
