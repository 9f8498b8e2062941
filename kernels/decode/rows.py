"""The several-row decode step's kernels (the rows backend of kernels/decode/__init__.py): one decoder layer is
cuBLAS's q/k/v product and six Triton launches (seven with the attention's merge), no inductor.

    x, h = add_norm(x, delta, input_norm_weight, eps)     # x += delta (the last layer's MLP), h = rmsnorm(x)
    qkv = F.linear(h, qkv_weight, qkv_bias)                # cuBLAS
    a = attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask, (n, T0))  # rotary, cache write
    x, h = add_norm(x, split_linear(a, o_weight), post_norm_weight, eps)          # o-proj as split-K partials
    act = gated_linear(h, gate_weight, up_weight)                                 # SiLU(gate) * up in one product
    delta = split_linear(act, down_weight)                                        # summed by the next add_norm

Why: at 64 rows q/k/v is a matrix product that cuBLAS streams near copy speed (inductor's Triton templates were
slower at every shape). o and down, whose output goes to a residual add, are split-K products here whose float32
partials that add sums (see split_linear); gate/up is one Triton product that reads both weights where they are and
writes SiLU(gate) * up (see gated_linear). Around the products, inductor's compiled layer makes its own small
kernels (norms, the residual adds, rotary, the two cache writes, SiLU-mul), whose speed moves between builds of the
same code, and it compiles again for every new cache length. Here the residual add rides in the next norm, and the
rotary and the cache write ride in the attention: each program (row, key/value head, slot range) rotates its query
heads itself, and the program whose range holds the new slot rotates the key and writes it and the value into the
cache before it reads its range. The attention is attention.py's split-KV loop (its CONFIG), so it reads only the
written slots; the n answers of a prompt read the prompt's slots from its first copy (see attend).

Numerics follow the PyTorch layer op by op in the activation dtype (transformers' roundings): the residual sum is
rounded before the norm, the normed input before and after the norm weight, SiLU before the product with up.

Shapes: N rows, D model width, I MLP width, H query heads, K key/value heads, G = H // K, GP = G padded to a power
of two >= 16, Dh head dim, S cache slots, BS slots per block, NS slot ranges.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_decode_rows.py
Benchmarks (GPU): python benchmarks/bench_decode_kernels.py gemm|gated|tail, python benchmarks/bench_decode.py
profile --rows 64; measurements: benchmarks/NOTES_sampler.md
"""
import math

import torch
import torch.nn.functional as F

from kernels import triton_available, use_triton
from kernels.decode.one_row import attend_reference, rms_norm_reference


# ----------------------------------------------------------------------------------------- references

def add_partials(x, delta):
    """x + the sum of delta's partials (P, *x.shape), the sum rounded to x's dtype first (a product's output)."""
    return x if delta is None else x + delta.float().sum(0).to(x.dtype)


def add_norm_reference(x, delta, weight, eps):
    x = add_partials(x, delta)
    return x, rms_norm_reference(x, weight, eps)


def split_linear_reference(x, weight):
    return F.linear(x, weight)[None]  # one partial, the whole product


def gated_linear_reference(x, gate_weight, up_weight):
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)


def attend_rows_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask):
    """one_row.attend_reference, row by row: qkv (N, 1, (H + 2K) Dh), cos and sin (N, 1, Dh), caches
    (N, K, S, Dh), mask (N, 1, 1, S) -> (N, H, 1, Dh). Each row reads its own cache (copies of a prompt are alike)."""
    return torch.cat([attend_reference(qkv[n:n + 1], cos[n:n + 1], sin[n:n + 1], q_norm, k_norm, eps,
                                       k_cache[n:n + 1], v_cache[n:n + 1], slot, mask[n:n + 1])
                      for n in range(qkv.shape[0])])


# ----------------------------------------------------------------------------------------- dispatch

def _check(name, cond, message):
    if not cond:
        raise ValueError(f"{name}: {message}")


def add_norm(x, delta, weight, eps):
    """x (N, 1, D), delta (P, N, 1, D) partial sums of a product's output (split_linear) or None -> (x + the sum of
    delta, rmsnorm(that) * weight), both (N, 1, D)."""
    if not use_triton(x, weight):
        return add_norm_reference(x, delta, weight, eps)
    D = x.shape[-1]
    _check("add_norm", weight.shape == (D,) and (delta is None or delta.shape[1:] == x.shape),
           f"x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}, weight {tuple(weight.shape)}"
           ": want x (..., D), delta (P, ..., D) partials of x's shape, and a weight (D,)")
    x = x.contiguous()
    out = x if delta is None else torch.empty_like(x)
    h = torch.empty_like(x)
    _add_norm_kernel[(x.numel() // D,)](x, x if delta is None else delta.contiguous(), weight, out, h, D, x.numel(),
                                        eps, BLOCK=triton.next_power_of_2(D), PARTS=0 if delta is None else len(delta),
                                        num_warps=8)
    return out, h


# Tiles of split_linear's product at 64 rows: (BN, BK, stages, programs), about 128 programs (output blocks x ranges
# of K). Faster than cuBLAS's F.linear on o and down at both published shapes; not on the larger gate/up.
SPLIT_TILES = (64, 128, 4, 128)
INTERPRET_SPLIT_TILES = (16, 32, 1, 8)  # small, so that the CPU tests cover several blocks, ranges and steps


def split_linear(x, weight):
    """x (N, 1, K) -> (P, N, 1, O): x @ weight.T (weight (O, K)) as P float32 partial sums over ranges of K, which
    add_norm sums. Why: at 64 rows the o and down projections are latency-bound in cuBLAS, which reduces its own
    split-K ranges in a second kernel; here more programs stream the weight and the next kernel, which reads the
    output anyway, does that sum."""
    if not use_triton(x, weight):
        return split_linear_reference(x, weight)
    (O, K), M = weight.shape, x.numel() // x.shape[-1]
    _check("split_linear", x.shape[-1] == K and weight.is_contiguous(),
           f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: want x (..., K) and a contiguous weight (O, K)")
    BN, BK, stages, programs = SPLIT_TILES if x.is_cuda else INTERPRET_SPLIT_TILES
    BM = min(64, max(16, triton.next_power_of_2(M)))
    blocks = triton.cdiv(O, BN)
    per = triton.cdiv(triton.cdiv(K, max(1, programs // blocks)), BK) * BK  # inputs per range, whole BK steps
    P = triton.cdiv(K, per)
    part = torch.empty((P,) + x.shape[:-1] + (O,), dtype=torch.float32, device=x.device)
    f32 = weight.dtype == torch.float32 or not x.is_cuda
    _partial_matmul_kernel[(blocks, P, triton.cdiv(M, BM))](x.contiguous(), weight, part, M, O, K, per, BM=BM, BN=BN,
                                                           BK=BK, STAGES=stages, F32=f32, num_warps=4)
    return part


# (BN, BK, stages) of gated_linear: against cuBLAS over a fused gate/up copy and a SiLU-mul kernel, faster at
# Qwen2.5-VL-3B and level at Qwen3-VL-8B, without the copy (about a third of the decoder's weights, for the call).
GATED_TILES = (32, 64, 4)
INTERPRET_GATED_TILES = (16, 32, 1)


def gated_linear(x, gate_weight, up_weight):
    """x (N, 1, D) -> SiLU(x @ G.T) * (x @ U.T), (N, 1, I), for gate and up weights G, U (I, D) read where they are:
    no fused gate/up copy (3 GiB for the call at Qwen2.5-VL-3B, 6.8 at Qwen3-VL-8B). Each program
    takes BN outputs of both and all rows, and writes the gated product itself (the roundings of PyTorch's: gate,
    SiLU, up and the product each to the activation dtype)."""
    if not use_triton(x, gate_weight, up_weight):
        return gated_linear_reference(x, gate_weight, up_weight)
    (I, D), M = gate_weight.shape, x.numel() // x.shape[-1]
    _check("gated_linear", x.shape[-1] == D and up_weight.shape == (I, D) and gate_weight.is_contiguous()
           and up_weight.is_contiguous(),
           f"x {tuple(x.shape)}, gate {tuple(gate_weight.shape)}, up {tuple(up_weight.shape)}: want x (..., D) and "
           "contiguous gate and up weights (I, D)")
    BN, BK, stages = GATED_TILES if x.is_cuda else INTERPRET_GATED_TILES
    BM = min(64, max(16, triton.next_power_of_2(M)))
    out = torch.empty(x.shape[:-1] + (I,), dtype=x.dtype, device=x.device)
    _gated_matmul_kernel[(triton.cdiv(I, BN), triton.cdiv(M, BM))](
        x.contiguous(), gate_weight, up_weight, out, M, I, D, BM=BM, BN=BN, BK=BK, STAGES=stages,
        F32=gate_weight.dtype == torch.float32 or not x.is_cuda, num_warps=4)
    return out


def attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask, shared=(1, 0)):
    """qkv (N, 1, (H + 2K) Dh) -> attention output (N, H, 1, Dh); writes the rotated key and the value of every row
    into the caches (N, K, S, Dh) at `slot` (1,). cos and sin (N, 1, Dh), sin signed as minivl.text.signed_sin;
    mask (N, 1, 1, S) bool, the slots each row may read (the new one included); q_norm and k_norm (Dh,) for Qwen3.
    shared = (n, T0): the cache's first T0 slots are alike in each run of n rows (the n answers of one prompt,
    the sampler's prefill), so every row reads them from the first of its run. Why: at 64 rows of 8 answers the
    prompt is about half of the slots read; read once and then from L2, the step reads that much less from memory.
    Reading the prompt once for all n rows in one tile of their query heads, merged with each row's own slots, was
    slower (the merge)."""
    group, prompt = shared
    _check("attend", group >= 1 and k_cache.shape[0] % group == 0 and 0 <= prompt <= k_cache.shape[2],
           f"shared {shared}: want (n, T0) with n dividing the {k_cache.shape[0]} rows and T0 at most the "
           f"{k_cache.shape[2]} slots")
    if not use_triton(qkv, k_cache):
        return attend_rows_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask)
    from kernels.decode.attention import CONFIG, INTERPRET_CONFIG, _merge_kernel, ranges

    N, K, S, Dh = k_cache.shape
    H = qkv.shape[-1] // Dh - 2 * K
    _check("attend", v_cache.shape == k_cache.shape and H > 0 and H % K == 0 and qkv.numel() == N * (H + 2 * K) * Dh
           and cos.shape == (N, 1, Dh) and sin.shape == (N, 1, Dh) and mask.shape == (N, 1, 1, S)
           and mask.dtype == torch.bool and k_cache.is_contiguous() and v_cache.is_contiguous(),
           f"qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, caches {tuple(k_cache.shape)} / "
           f"{tuple(v_cache.shape)}, mask {tuple(mask.shape)} {mask.dtype}: want contiguous (N, K, S, Dh) caches, "
           "(N, 1, (H + 2K) * Dh) projections with K dividing H, cos and sin (N, 1, Dh), a bool mask (N, 1, 1, S)")
    _check("attend", Dh >= 16 and Dh & (Dh - 1) == 0, f"head dim {Dh} must be a power of two >= 16")
    cfg = CONFIG if qkv.is_cuda else INTERPRET_CONFIG
    G = H // K
    BS, per_split, NS = ranges(N * K, S, cfg, k_cache.element_size())
    out = torch.empty(N, H, 1, Dh, dtype=qkv.dtype, device=qkv.device)
    # each range's normalised output and its log2-sum-exp2; one range (many rows) writes `out` itself
    part = torch.empty(N, K, NS, G, Dh, dtype=torch.float32, device=qkv.device) if NS > 1 else out
    lse = torch.empty(N, K, NS, G, dtype=torch.float32, device=qkv.device) if NS > 1 else out
    _attend_rows_kernel[(N * K, NS)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos, k_cache, v_cache, slot, mask.view(N, S).contiguous(), part, lse, out,
        S, group, prompt, eps, Dh**-0.5 * math.log2(math.e), H=H, K=K, G=G, GP=max(16, triton.next_power_of_2(G)),
        DH=Dh, BS=BS, PER_SPLIT=per_split, NS=NS, QK_NORM=q_norm is not None,
        F32=k_cache.dtype == torch.float32 or not qkv.is_cuda, STAGES=cfg["stages"], SCAN=cfg["scan"],
        num_warps=cfg["num_warps"])
    if NS > 1:
        _merge_kernel[(N * H,)](part, lse, out, H=H, G=G, DH=Dh, NS=NS, NSP=triton.next_power_of_2(NS), PDL=False,
                                num_warps=4)
    return out


def sample_record(logits, temperature, banned, eos, pad_id, seed, first_row, token, step, done, lengths, tokens,
                  logprobs, positions):
    """The sampling tail of a step of N rows (no top-k, no top-p; temperature 0: greedy) in three launches: the
    sampler's record, then the next slot. Each program of the first takes a chunk of a row's logits (N, V): it
    divides them by the temperature and leaves the chunk's maximum outside `banned` and its sum of exp(x - max), and
    the maximum of x + Gumbel noise (the sampler's gumbel_noise of rows first_row, ...: the same uniforms) and where
    it first occurs. Each program of the second combines a few rows' chunks (the log-sum-exp, the draw) and records
    their tokens, as one_row.greedy_record does for one row; a third moves the step and the slot on. Why: compiled by
    inductor this tail is ~10 kernels. Triton only: its PyTorch twin is the sampler's own sampling (sampler.sample)."""
    if not use_triton(logits, tokens):
        raise RuntimeError("sample_record runs only as Triton kernels; the sampler's record is its PyTorch twin")
    (N, V), L = logits.shape, tokens.shape[-1]
    _check("sample_record", tokens.shape == (N, L) and logprobs.shape == (N, L) and token.shape == (N,)
           and done.shape == (N,) and lengths.shape == (N,) and step.numel() == 1 and positions.numel() == 1
           and logits.is_contiguous() and tokens.is_contiguous() and logprobs.is_contiguous() and temperature >= 0,
           f"logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, logprobs {tuple(logprobs.shape)}, token "
           f"{tuple(token.shape)}, temperature {temperature}: want (N, V) logits, (N, L) contiguous outputs, (N,) "
           "row state, one-element step and positions, a temperature >= 0")
    block = 1024 if logits.is_cuda else 64  # the per-id work decides the pass's time, not the tiling
    chunks = triton.cdiv(V, block)
    # per (row, chunk): max, sum of exp(x - max), max of x + noise; where that maximum first occurs
    chunk_f = torch.empty(3, N, chunks, dtype=torch.float32, device=logits.device)
    chunk_at = torch.empty(N, chunks, dtype=torch.int32, device=logits.device)
    greedy, t = temperature == 0, float(temperature) or 1.0
    _sample_chunks_kernel[(N, chunks)](
        logits, banned if banned.numel() else token, seed, first_row, step, chunk_f, chunk_at, V, banned.numel(), t,
        BLOCK=block, NBP=max(2, triton.next_power_of_2(banned.numel())), GREEDY=greedy, num_warps=4)
    rb = 2
    _sample_record_kernel[(triton.cdiv(N, rb),)](
        chunk_f, chunk_at, logits, eos if eos.numel() else token, token, step, done, lengths, tokens, logprobs, N,
        chunks, V, L, eos.numel(), pad_id, t, RB=rb, CP=max(2, triton.next_power_of_2(chunks)),
        NEP=max(2, triton.next_power_of_2(eos.numel())), GREEDY=greedy, num_warps=4)
    _advance_kernel[(1,)](step, positions)  # after every row has read the step


# ----------------------------------------------------------------------------------------- kernels

if triton_available():
    import triton
    import triton.language as tl

    from kernels.decode.attention import _attend_range
    from kernels.decode.one_row import _normed_values, _rope_heads

    @triton.jit
    def _add_norm_kernel(x_ptr, d_ptr, nw_ptr, out_ptr, h_ptr, D, numel, eps, BLOCK: tl.constexpr,
                         PARTS: tl.constexpr):
        dtype = h_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row + cols, mask=cols < D, other=0.0)
        if PARTS > 0:  # the product's output (its partials summed, rounded), then the residual sum, rounded
            d = tl.zeros([BLOCK], tl.float32)
            for p in range(PARTS):
                d += tl.load(d_ptr + p * numel + row + cols, mask=cols < D, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + d.to(dtype).to(tl.float32)).to(dtype)
            tl.store(out_ptr + row + cols, x, mask=cols < D)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(h_ptr + row + cols, _normed_values(x, nw_ptr, cols, rstd, D, dtype).to(dtype), mask=cols < D)

    @triton.jit
    def _attend_rows_kernel(qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, kc_ptr, vc_ptr, slot_ptr, mask_ptr, part_ptr,
                            lse_ptr, out_ptr, S, group, prompt, eps, qk_scale, H: tl.constexpr, K: tl.constexpr,
                            G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                            PER_SPLIT: tl.constexpr, NS: tl.constexpr, QK_NORM: tl.constexpr, F32: tl.constexpr,
                            STAGES: tl.constexpr, SCAN: tl.constexpr):
        nk, split = tl.program_id(0), tl.program_id(1)  # (row, key/value head), slot range
        n, kh = nk // K, nk % K
        rg, rd = tl.arange(0, GP), tl.arange(0, DH)
        swap = (rd + DH // 2) % DH
        row = qkv_ptr + n.to(tl.int64) * (H + 2 * K) * DH  # this row's q (H heads), k (K), v (K)
        cos = tl.load(cos_ptr + n * DH + rd).to(tl.float32)
        sin = tl.load(sin_ptr + n * DH + rd).to(tl.float32)
        kv = (n.to(tl.int64) * K + kh) * S * DH  # caches (N, K, S, DH) contiguous
        kv_lead = ((n // group * group).to(tl.int64) * K + kh) * S * DH  # the first row of n's run: its prompt
        first = split * PER_SPLIT * BS
        slot = tl.load(slot_ptr)
        # the G query heads of this key/value head, rotated
        q = _rope_heads(row + (kh * G + rg)[:, None] * DH, (rg < G)[:, None], rd, swap, cos, sin, qn_ptr, eps, DH,
                        QK_NORM)  # (GP, DH)
        if (slot >= first) & (slot < first + PER_SPLIT * BS):  # the new token's slot is in this range
            k_new = _rope_heads(row + (H + kh) * DH + rg[:, None] * 0, (rg < 1)[:, None], rd, swap, cos, sin, kn_ptr,
                                eps, DH, QK_NORM)  # (GP, DH): row 0 is the key
            tl.store(kc_ptr + kv + slot * DH + rg[:, None] * 0 + rd[None, :], k_new, mask=(rg < 1)[:, None])
            tl.store(vc_ptr + kv + slot * DH + rd, tl.load(row + (H + K + kh) * DH + rd))
            tl.debug_barrier()  # the block loads below, by other threads of the program, must see them
        _attend_range(q, kc_ptr, vc_ptr, mask_ptr + n * S, kv, kv_lead, prompt, first, S, DH, qk_scale, out_ptr,
                      part_ptr, lse_ptr, nk, split, G, GP, DH, BS, PER_SPLIT, NS, F32, False, STAGES,
                      SCAN)  # decode_attention's range

    @triton.jit
    def _hash32(x):
        """The sampler's _hash32 on uint32 (its products taken mod 2**32 by the hardware)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sample_chunks_kernel(logits_ptr, banned_ptr, seed_ptr, row0_ptr, step_ptr, f_ptr, at_ptr, V, NB,
                              temperature, BLOCK: tl.constexpr, NBP: tl.constexpr, GREEDY: tl.constexpr):
        n, c = tl.program_id(0), tl.program_id(1)
        NC = tl.num_programs(0) * tl.num_programs(1)
        cols = c * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) token ids of this chunk
        rb = tl.arange(0, NBP)
        banned = tl.load(banned_ptr + rb, mask=rb < NB, other=-1)  # (NBP,)
        x = tl.load(logits_ptr + n.to(tl.int64) * V + cols, mask=cols < V, other=0.0).to(tl.float32)
        if not GREEDY:
            x = tl.div_rn(x, temperature)  # IEEE division, as PyTorch's logits / temperature
        hit = tl.sum((cols[:, None] == banned[None, :]).to(tl.int32), axis=1) > 0  # (BLOCK,)
        x = tl.where(hit | (cols >= V), float("-inf"), x)
        m = tl.max(x, axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m)  # a chunk of banned ids only: sum 0, not NaN
        total = tl.sum(tl.exp(x - shift), axis=0)
        draw = x
        if not GREEDY:  # Gumbel noise of (seed, step, row, token): the sampler's uniforms
            seed = tl.load(seed_ptr)
            first = ((seed & 0xFFFFFFFF) ^ tl.load(step_ptr)).to(tl.uint32)
            key = _hash32(_hash32(first) ^ (tl.load(row0_ptr) + n).to(tl.uint32))  # global row
            bits = _hash32(cols.to(tl.uint32) ^ key) >> 8  # 24 random bits
            u = (bits.to(tl.float32) + 0.5) * 5.9604644775390625e-08  # * 2**-24: uniform in (0, 1)
            draw = x - tl.log(-tl.log(u))  # tl.log, as inductor's compiled tail computed it
        best = tl.max(draw, axis=0)
        base = n * tl.num_programs(1) + c
        tl.store(f_ptr + base, m)
        tl.store(f_ptr + NC + base, total)
        tl.store(f_ptr + 2 * NC + base, best)
        tl.store(at_ptr + base, tl.min(tl.where(draw == best, cols, V), axis=0))  # the first maximum, as argmax

    @triton.jit
    def _sample_record_kernel(f_ptr, at_ptr, logits_ptr, eos_ptr, token_ptr, step_ptr, done_ptr, lengths_ptr,
                              tokens_ptr, logprobs_ptr, N, C, V, L, NE, pad_id, temperature, RB: tl.constexpr,
                              CP: tl.constexpr, NEP: tl.constexpr, GREEDY: tl.constexpr):
        rows = tl.program_id(0) * RB + tl.arange(0, RB)  # (RB,) rows of this program
        rc, re = tl.arange(0, CP), tl.arange(0, NEP)
        eos = tl.load(eos_ptr + re, mask=re < NE, other=-1)  # (NEP,)
        step = tl.load(step_ptr)
        live = rows < N
        ok = live[:, None] & (rc < C)[None, :]
        offs = rows[:, None] * C + rc[None, :]  # (RB, CP): the rows' chunks
        m = tl.load(f_ptr + offs, mask=ok, other=float("-inf"))
        total = tl.load(f_ptr + N * C + offs, mask=ok, other=0.0)
        draw = tl.load(f_ptr + 2 * N * C + offs, mask=ok, other=float("-inf"))
        top = tl.max(m, axis=1)  # (RB,)
        lse = top + tl.log(tl.sum(total * tl.exp(m - tl.where(live, top, 0.0)[:, None]), axis=1))
        won = tl.max(draw, axis=1)
        # the first chunk holding the row's largest draw, and its first maximum there
        c_best = tl.min(tl.where(draw == won[:, None], rc[None, :], CP), axis=1)  # (RB,)
        best = tl.load(at_ptr + rows * C + c_best, mask=live, other=0).to(tl.int64)
        x_best = tl.load(logits_ptr + rows.to(tl.int64) * V + best, mask=live, other=0.0).to(tl.float32)
        if not GREEDY:
            x_best = tl.div_rn(x_best, temperature)
        active = tl.load(done_ptr + rows, mask=live, other=1).to(tl.int1) == 0
        best = tl.where(active, best, pad_id)
        tl.store(tokens_ptr + rows.to(tl.int64) * L + step, best, mask=live)
        tl.store(logprobs_ptr + rows.to(tl.int64) * L + step, tl.where(active, x_best - lse, 0.0), mask=live)
        tl.store(lengths_ptr + rows, tl.load(lengths_ptr + rows, mask=live, other=0) + active.to(tl.int64), mask=live)
        ends = tl.sum((best[:, None] == eos[None, :]).to(tl.int32), axis=1) > 0
        tl.store(done_ptr + rows, (active == 0) | ends, mask=live)  # a finished row stays finished
        tl.store(token_ptr + rows, best, mask=live)

    @triton.jit
    def _advance_kernel(step_ptr, positions_ptr):
        tl.store(step_ptr, tl.load(step_ptr) + 1)
        tl.store(positions_ptr, tl.load(positions_ptr) + 1)

    @triton.jit
    def _partial_matmul_kernel(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT, BM: tl.constexpr, BN: tl.constexpr,
                               BK: tl.constexpr, STAGES: tl.constexpr, F32: tl.constexpr):
        """part[s] = x[:, Ks] @ W[:, Ks]^T in float32 for the s-th range Ks of K_PER_SPLIT inputs: x (M, K), W (N, K),
        part (splits, M, N). Program (output block, range, block of rows)."""
        pn, ps = tl.program_id(0), tl.program_id(1)
        rm, rn, rk = tl.program_id(2) * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BK)
        k_first = ps * K_PER_SPLIT
        k_end = tl.minimum(k_first + K_PER_SPLIT, K)
        acc = tl.zeros([BM, BN], tl.float32)
        for k in tl.range(k_first, k_end, BK, num_stages=STAGES):
            cols = k + rk
            x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :],
                        mask=(rm < M)[:, None] & (cols < k_end)[None, :], other=0.0)  # (BM, BK)
            w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + cols[None, :],
                        mask=(rn < N)[:, None] & (cols < k_end)[None, :], other=0.0)  # (BN, BK)
            if F32:  # float32 weights: IEEE float32 dots (not TF32), as cuBLAS's; and the CPU interpreter (bf16 dots)
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(part_ptr + (ps * M + rm).to(tl.int64)[:, None] * N + rn[None, :], acc,
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _gated_matmul_kernel(x_ptr, g_ptr, u_ptr, out_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, STAGES: tl.constexpr, F32: tl.constexpr):
        """out = SiLU(x @ G^T) * (x @ U^T): x (M, K), G and U (N, K), out (M, N). Program (output block, row block)."""
        dtype = out_ptr.dtype.element_ty
        rm, rn = tl.program_id(1) * BM + tl.arange(0, BM), tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc_g = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        w_rows = rn.to(tl.int64)[:, None] * K
        for k in tl.range(0, K, BK, num_stages=STAGES):
            cols = k + rk
            x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :],
                        mask=(rm < M)[:, None] & (cols < K)[None, :], other=0.0)  # (BM, BK)
            w_ok = (rn < N)[:, None] & (cols < K)[None, :]
            g = tl.load(g_ptr + w_rows + cols[None, :], mask=w_ok, other=0.0)  # (BN, BK)
            u = tl.load(u_ptr + w_rows + cols[None, :], mask=w_ok, other=0.0)
            if F32:  # float32 weights: IEEE float32 dots; and the CPU interpreter (bf16 dots)
                acc_g += tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), input_precision="ieee")
                acc_u += tl.dot(x.to(tl.float32), tl.trans(u.to(tl.float32)), input_precision="ieee")
            else:
                acc_g += tl.dot(x, tl.trans(g))
                acc_u += tl.dot(x, tl.trans(u))
        gate = acc_g.to(dtype).to(tl.float32)  # each product's output rounded, as F.linear's
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out = silu * acc_u.to(dtype).to(tl.float32)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], out.to(dtype),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])
