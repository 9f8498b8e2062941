"""The small ops of a decode step of several rows, for the sampler (minivl/sampler.py): one decoder layer is cuBLAS's
four matrix products with three Triton launches (four with the merge) between them, no inductor.

    x, h = add_norm(x, delta, input_norm_weight, eps)     # x += delta (the last layer's MLP), h = rmsnorm(x)
    qkv = F.linear(h, qkv_weight, qkv_bias)                # cuBLAS
    a = attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask)  # rotary, cache write, split-KV
    x, h = add_norm(x, F.linear(a, o_weight), post_norm_weight, eps)
    delta = F.linear(silu_mul(F.linear(h, gate_up_weight)), down_weight)  # added by the next layer's add_norm

Why: at 64 rows a projection is a matrix product that cuBLAS streams near copy speed (benchmarks/NOTES_sampler.md,
session 9: inductor's Triton templates were slower at every shape). Around them, inductor's compiled layer made
its own small kernels (norms, the residual adds, rotary, the two cache writes, SiLU-mul), whose speed moved
between builds of the same code (the SiLU-mul kernel 70 or 192 us a step, H200), and it compiles again for every
new cache length. Here the residual add rides in the next norm, and the rotary and the cache write ride in the
attention: each program (row, key/value head, slot range) rotates its query heads itself, and the program whose
range holds the new slot rotates the key and writes it and the value into the cache before it reads its range.
The attention is kernels/decode_attention.py's split-KV loop (its CONFIG), so it reads only the written slots.

Numerics follow the PyTorch layer op by op in the activation dtype (transformers' roundings): the residual sum is
rounded before the norm, the normed input before and after the norm weight, SiLU before the product with up.

Shapes: N rows, D model width, I MLP width, H query heads, K key/value heads, G = H // K, GP = G padded to a power
of two >= 16, Dh head dim, S cache slots, BS slots per block, NS slot ranges.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_decode_rows.py
"""
import math

import torch
import torch.nn.functional as F

from kernels import triton_available, use_triton
from kernels.decode_layer import attend_reference, rms_norm_reference


# ----------------------------------------------------------------------------------------- references

def add_norm_reference(x, delta, weight, eps):
    x = x if delta is None else x + delta
    return x, rms_norm_reference(x, weight, eps)


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attend_rows_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask):
    """decode_layer.attend_reference, row by row: qkv (N, 1, (H + 2K) Dh), cos and sin (N, 1, Dh), caches
    (N, K, S, Dh), mask (N, 1, 1, S) -> (N, H, 1, Dh)."""
    return torch.cat([attend_reference(qkv[n:n + 1], cos[n:n + 1], sin[n:n + 1], q_norm, k_norm, eps,
                                       k_cache[n:n + 1], v_cache[n:n + 1], slot, mask[n:n + 1])
                      for n in range(qkv.shape[0])])


# ----------------------------------------------------------------------------------------- dispatch

def _check(name, cond, message):
    if not cond:
        raise ValueError(f"{name}: {message}")


def add_norm(x, delta, weight, eps):
    """x, delta (N, 1, D) or delta None -> (x + delta, rmsnorm(x + delta) * weight), both (N, 1, D)."""
    if not use_triton(x, weight):
        return add_norm_reference(x, delta, weight, eps)
    D = x.shape[-1]
    _check("add_norm", weight.shape == (D,) and (delta is None or delta.shape == x.shape),
           f"x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}, weight {tuple(weight.shape)}"
           ": want x and delta of one shape (..., D) and a weight (D,)")
    x = x.contiguous()
    out = x if delta is None else torch.empty_like(x)
    h = torch.empty_like(x)
    _add_norm_kernel[(x.numel() // D,)](x, x if delta is None else delta.contiguous(), weight, out, h, D, eps,
                                        BLOCK=triton.next_power_of_2(D), HAS_DELTA=delta is not None, num_warps=8)
    return out, h


def silu_mul(gate_up):
    """gate_up (..., 2I): gate then up -> SiLU(gate) * up (..., I)."""
    if not use_triton(gate_up):
        return silu_mul_reference(gate_up)
    I2 = gate_up.shape[-1]
    _check("silu_mul", I2 % 2 == 0, f"gate_up {tuple(gate_up.shape)}: want an even last dim (gate, then up)")
    gate_up = gate_up.contiguous()
    out = torch.empty(gate_up.shape[:-1] + (I2 // 2,), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024 if gate_up.is_cuda else 32
    _silu_mul_kernel[(gate_up.numel() // I2, triton.cdiv(I2 // 2, block))](gate_up, out, I2 // 2, BLOCK=block)
    return out


def attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask):
    """qkv (N, 1, (H + 2K) Dh) -> attention output (N, H, 1, Dh); writes the rotated key and the value of every row
    into the caches (N, K, S, Dh) at `slot` (1,). cos and sin (N, 1, Dh), sin signed as minivl.text.signed_sin;
    mask (N, 1, 1, S) bool, the slots each row may read (the new one included); q_norm and k_norm (Dh,) for Qwen3."""
    if not use_triton(qkv, k_cache):
        return attend_rows_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask)
    from kernels.decode_attention import CONFIG, INTERPRET_CONFIG, _merge_kernel

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
    G, BS = H // K, cfg["BS"]
    blocks = triton.cdiv(S, BS)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(cfg["programs"], N * K))))  # blocks per range
    NS = triton.cdiv(blocks, per_split)
    out = torch.empty(N, H, 1, Dh, dtype=qkv.dtype, device=qkv.device)
    # each range's normalised output and its log2-sum-exp2; one range (many rows) writes `out` itself
    part = torch.empty(N, K, NS, G, Dh, dtype=torch.float32, device=qkv.device) if NS > 1 else out
    lse = torch.empty(N, K, NS, G, dtype=torch.float32, device=qkv.device) if NS > 1 else out
    _attend_rows_kernel[(N * K, NS)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos, k_cache, v_cache, slot, mask.view(N, S).contiguous(), part, lse, out,
        S, eps, Dh**-0.5 * math.log2(math.e), H=H, K=K, G=G, GP=max(16, triton.next_power_of_2(G)), DH=Dh, BS=BS,
        PER_SPLIT=per_split, NS=NS, QK_NORM=q_norm is not None, F32=k_cache.dtype == torch.float32 or not qkv.is_cuda,
        STAGES=cfg["stages"], SCAN=cfg["scan"], num_warps=cfg["num_warps"])
    if NS > 1:
        _merge_kernel[(N * H,)](part, lse, out, H=H, G=G, DH=Dh, NS=NS, NSP=triton.next_power_of_2(NS), PDL=False,
                                num_warps=4)
    return out


# ----------------------------------------------------------------------------------------- kernels

if triton_available():
    import triton
    import triton.language as tl

    from kernels.decode_attention import _attend_blocks, _store_range
    from kernels.decode_layer import _normed_values, _rope_heads

    @triton.jit
    def _add_norm_kernel(x_ptr, d_ptr, nw_ptr, out_ptr, h_ptr, D, eps, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
        dtype = h_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row + cols, mask=cols < D, other=0.0)
        if HAS_DELTA:  # the residual sum, rounded to the activation dtype as PyTorch's add
            x = (x.to(tl.float32) + tl.load(d_ptr + row + cols, mask=cols < D, other=0.0).to(tl.float32)).to(dtype)
            tl.store(out_ptr + row + cols, x, mask=cols < D)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(h_ptr + row + cols, _normed_values(x, nw_ptr, cols, rstd, D, dtype).to(dtype), mask=cols < D)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        gate = tl.load(gu_ptr + row * 2 * I + cols, mask=cols < I, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * I + I + cols, mask=cols < I, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * I + cols, (silu * up).to(dtype), mask=cols < I)

    @triton.jit
    def _attend_rows_kernel(qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, kc_ptr, vc_ptr, slot_ptr, mask_ptr, part_ptr,
                            lse_ptr, out_ptr, S, eps, qk_scale, H: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                            GP: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr, PER_SPLIT: tl.constexpr,
                            NS: tl.constexpr, QK_NORM: tl.constexpr, F32: tl.constexpr, STAGES: tl.constexpr,
                            SCAN: tl.constexpr):
        nk, split = tl.program_id(0), tl.program_id(1)  # (row, key/value head), slot range
        n, kh = nk // K, nk % K
        rg, rd = tl.arange(0, GP), tl.arange(0, DH)
        swap = (rd + DH // 2) % DH
        row = qkv_ptr + n.to(tl.int64) * (H + 2 * K) * DH  # this row's q (H heads), k (K), v (K)
        cos = tl.load(cos_ptr + n * DH + rd).to(tl.float32)
        sin = tl.load(sin_ptr + n * DH + rd).to(tl.float32)
        kv = (n.to(tl.int64) * K + kh) * S * DH  # caches (N, K, S, DH) contiguous
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
        m_i = tl.zeros([GP], tl.float32) - float("inf")  # the online softmax of decode_attention._split_kernel
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DH], tl.float32)
        m_i, l_i, acc = _attend_blocks(q, kc_ptr, vc_ptr, mask_ptr + n * S, kv, first, S, DH, qk_scale, m_i, l_i,
                                       acc, 0, PER_SPLIT, DH, BS, F32, False, STAGES, SCAN)
        if NS == 1:  # no merge: out (N, H, 1, DH); a row with no readable slot gets 0
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (nk * G + rg)[:, None] * DH + rd[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=(rg < G)[:, None])
        else:
            _store_range(acc, l_i, m_i, part_ptr, lse_ptr, nk * NS + split, G, GP, DH)
