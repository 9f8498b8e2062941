"""The one-row decode step's kernels (the one_row backend of kernels/decode/__init__.py): a decoder layer in six
Triton launches, and the step's two ends: its inputs (`step_inputs`, one launch) and, when greedy, its tail
(`greedy_record`, two).

    qkv = norm_matvec(x, input_norm_weight, eps, qkv_weight, qkv_bias)          # rms-norm + q/k/v + bias
    a = attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask)  # rotary, cache write, split-KV
                                                                                  # attention, merge (two launches)
    x = matvec_residual(a, o_weight, x)                                           # o-proj + residual
    act = norm_matvec(x, post_norm_weight, eps, gate_weight, up_weight=up_weight)  # rms-norm + SiLU(gate) * up
    x = matvec_residual(act, down_weight, x)                                      # down-proj + residual

Why: at one row a decode step is matrix-vector products. Their bytes are the weights (154 MB per layer at
Qwen2.5-VL-3B) and everything else is latency: each extra kernel costs a few us of launch, ramp and drain, and
inductor makes ~12 kernels of a compiled layer. Here every small op rides in a product's prologue or epilogue: each
program recomputes the rms of the input row (4 KB, from L2) before its dot, SiLU-mul and residual adds sit in the
epilogues, and gate and up are read from their own weights (no fused copy). Each program owns BLOCK_N output rows:
it loads a first tile of FIRST_K columns (the whole rows where they fit, see PRELOAD_WHOLE), then walks the rest of
the input in BLOCK_K chunks, accumulating a (BLOCK_N, BLOCK_K) float32 tile that is summed once at the end.
`attend` is attention.py's split-KV attention with the rotary and the cache write folded in: each program rotates
its query heads itself (and normalises them, Qwen3), and the program whose slot range holds the new token writes
its rotated key and its value into the cache (and into the range's first block, which it read before the wait);
the ranges are merged by attention.py's merge kernel, a launch of its own: merging in the split kernel, by the last
range to finish, leaves one program walking the ranges alone, which is slower.

Numerics follow the PyTorch layer op by op in the activation dtype: the normed input is rounded to the dtype
before and after the norm weight (transformers' Qwen2RMSNorm), a projection's output is rounded before its bias,
SiLU and residual adds are rounded where PyTorch rounds them; only the order of each dot's float32 sum differs.

One row only: x (1, 1, D), the cache (1, K, S, Dh). Legend: D model width, O output rows of a product, I the
MLP width, H query heads, K key/value heads, G = H // K, GP = G padded to a power of two >= 16, Dh head dim,
S cache slots, BS slots per block, NS slot ranges.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_decode_one_row.py
Benchmarks (GPU): python benchmarks/bench_decode_kernels.py gemv (the products alone), python benchmarks/bench_decode.py
(the step); measurements: benchmarks/NOTES_sampler.md
"""
import functools
import math

import torch
import torch.nn.functional as F

from kernels import triton_available, use_triton
from kernels.decode.attention import decode_attention_reference

# (BLOCK_N, BLOCK_K, num_warps): output rows per program, input columns per step, warps; `blocks=` overrides them
# per call. Two rows per program (many programs, so that many loads are in flight) and about 2048 weight elements a
# step were within a few percent of the fastest of 26 settings on every Qwen2.5-VL-3B shape; the gated product
# reads two weights, so half the columns.
BLOCKS = (2, 1024, 4)
INTERPRET_BLOCKS = (16, 32, 4)  # small, so that the CPU tests cover several programs and steps


def _blocks(device, blocks):
    return blocks or (BLOCKS if device.type == "cuda" else INTERPRET_BLOCKS)


# Programmatic dependent launch (sm_90 and later): each kernel of the layer is launched while the one before still
# runs, so that its programs are on the SMs with their first weight tiles loading when that one ends (each kernel
# loads its first tile, then waits: attention._wait_for_previous_kernel); about 5% off the Qwen2.5-VL-3B step.
PDL = True

# How much of its weight rows each program of a product kernel loads before that wait: the whole rows if they have at
# most PRELOAD_WHOLE columns (gate and up counted both), else the first PRELOAD_PART columns (likewise). What is
# loaded before the wait is not a memory round trip after it; but it is held in registers (BLOCK_N x 4096 bf16
# values take ~130 registers a thread, so fewer programs fit on an SM), which pays only when no loop over the rest
# of the row follows: partial rows of 4096 values were slower. The attention likewise reads its first block of keys
# and values before the wait.
PRELOAD_WHOLE = 4096
PRELOAD_PART = 2048


def _first_columns(K, block_k, weights):
    """Columns of the first, preloaded tile of a product over K inputs that reads `weights` weights (1, or 2: gate
    and up): a power of two, at least one block_k."""
    _check("PRELOAD_PART", PRELOAD_PART & (PRELOAD_PART - 1) == 0, f"{PRELOAD_PART} is not 0 or a power of two")
    row = triton.next_power_of_2(K)
    first = row if row * weights <= PRELOAD_WHOLE else min(row, PRELOAD_PART // weights)
    return max(block_k, first)


@functools.lru_cache
def _sm90(index):
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(device):
    return bool(PDL) and device.type == "cuda" and _sm90(device.index)


# ----------------------------------------------------------------------------------------- references

def rms_norm_reference(x, weight, eps):
    # transformers' Qwen2RMSNorm (= minivl.text.RMSNorm)
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def norm_matvec_reference(x, norm_weight, eps, weight, bias=None, up_weight=None):
    """W rmsnorm(x) (+ bias); with up_weight: SiLU(W h) * (U h), the gated MLP's first half."""
    h = rms_norm_reference(x, norm_weight, eps)
    y = F.linear(h, weight)
    if up_weight is not None:
        return F.silu(y) * F.linear(h, up_weight)
    return y if bias is None else y + bias


def matvec_residual_reference(a, weight, residual):
    return residual + F.linear(a, weight)


def rotate_reference(x, cos, sin):
    """The rotate-half rotary (transformers' apply_rotary_pos_emb) with sin signed as [-sin1, sin2]:
    x * cos + [x2, x1] * sin, in the dtype of x."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


def attend_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask):
    """qkv (1, 1, (H + 2K) Dh) -> attention output (1, H, 1, Dh). Rotates q and k (cos and sin (1, 1, Dh), sin
    signed as in rotate_reference; Qwen3 first normalises each head with q_norm / k_norm (Dh,)), writes k and v
    into the caches (1, K, S, Dh) at `slot` (1,), then attends over the slots `mask` (1, 1, 1, S) allows."""
    K, Dh = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.view(-1, Dh).split([qkv.shape[-1] // Dh - 2 * K, K, K])  # (H, Dh), (K, Dh), (K, Dh)
    if q_norm is not None:
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    q, k = rotate_reference(q, cos[0], sin[0]), rotate_reference(k, cos[0], sin[0])
    k_cache.index_copy_(2, slot, k[None, :, None])
    v_cache.index_copy_(2, slot, v[None, :, None])
    return decode_attention_reference(q[None, :, None], k_cache, v_cache, mask)


def step_inputs_reference(token, embed_weight, slot, cos_table, sin_table, key_valid):
    """The sampler's step inputs for one row, from the tables of its rotary (S, Dh), row s = slot s's."""
    S = key_valid.shape[-1]
    mask = key_valid.view(1, S) & (torch.arange(S, device=slot.device) <= slot)  # (1, S)
    return (embed_weight[token].view(1, 1, -1), cos_table[slot].view(1, 1, -1), sin_table[slot].view(1, 1, -1),
            mask.view(1, 1, 1, S))


def greedy_record_reference(logits, banned, eos, pad_id, token, step, done, lengths, tokens, logprobs, positions):
    """The sampler's record for one row and greedy sampling, then the next slot: the row's token is the first maximum
    of its logits (1, V) outside `banned`, its log-prob the log-softmax there; a finished row (done) only pads."""
    x = logits.float().view(1, -1)
    x = x.index_fill(1, banned, float("-inf"))
    best = x.argmax(dim=-1)  # (1,)
    logprob = x.gather(1, best[:, None])[:, 0] - x.logsumexp(dim=-1)
    active = ~done
    best = torch.where(active, best, pad_id)
    tokens.index_copy_(1, step.view(1), best[:, None])
    logprobs.index_copy_(1, step.view(1), torch.where(active, logprob, 0.0)[:, None])
    lengths.add_(active.long())
    done.logical_or_((best[:, None] == eos).any(dim=-1) & active)
    token.copy_(best)
    step.add_(1)
    positions.add_(1)


# ----------------------------------------------------------------------------------------- dispatch

def _check(name, cond, message):
    if not cond:
        raise ValueError(f"{name}: {message}")


def norm_matvec(x, norm_weight, eps, weight, bias=None, up_weight=None, blocks=None):
    """x (1, 1, D) -> (1, 1, O): W rmsnorm(x) + bias, or SiLU(W h) * (U h) with up_weight (U: (O, D))."""
    if not use_triton(x, weight):
        return norm_matvec_reference(x, norm_weight, eps, weight, bias, up_weight)
    D, O = x.shape[-1], weight.shape[0]
    _check("norm_matvec", x.numel() == D and weight.shape == (O, D) and norm_weight.shape == (D,)
           and (bias is None or bias.shape == (O,)) and (up_weight is None or up_weight.shape == (O, D)),
           f"x {tuple(x.shape)}, norm {tuple(norm_weight.shape)}, weight {tuple(weight.shape)}, bias "
           f"{None if bias is None else tuple(bias.shape)}, up {None if up_weight is None else tuple(up_weight.shape)}"
           ": want one row x (D,), norm (D,), weight and up (O, D), bias (O,)")
    _check("norm_matvec", weight.is_contiguous() and (up_weight is None or up_weight.is_contiguous()),
           "weights must be contiguous")
    BN, BK, warps = _blocks(x.device, blocks)
    if blocks is None and up_weight is not None and x.is_cuda:
        BK //= 2
    y = torch.empty(x.shape[:-1] + (O,), dtype=x.dtype, device=x.device)
    pdl = _pdl(x.device)
    dummy = weight  # pointer arguments a branch never reads
    first = _first_columns(D, BK, 1 if up_weight is None else 2)
    _norm_matvec_kernel[(triton.cdiv(O, BN),)](
        x.contiguous(), norm_weight, weight, dummy if up_weight is None else up_weight,
        dummy if bias is None else bias, y, O, D, eps, BLOCK_N=BN, BLOCK_K=BK, FIRST_K=first,
        GATED=up_weight is not None, HAS_BIAS=bias is not None, PDL=pdl, WHOLE_ROW=first >= D,
        num_warps=warps, launch_pdl=pdl)
    return y


def matvec_residual(a, weight, residual, blocks=None):
    """a (1, 1, K) or any shape of K elements, residual (1, 1, O) -> residual + W a, (1, 1, O)."""
    if not use_triton(a, weight, residual):
        return matvec_residual_reference(a.reshape(residual.shape[:-1] + (-1,)), weight, residual)
    O, K = weight.shape
    _check("matvec_residual", a.numel() == K and residual.numel() == O and weight.is_contiguous(),
           f"a {tuple(a.shape)}, weight {tuple(weight.shape)}, residual {tuple(residual.shape)}: want K = "
           "a.numel(), O = residual.numel() and a contiguous (O, K) weight")
    BN, BK, warps = _blocks(a.device, blocks)
    y = torch.empty_like(residual)
    pdl = _pdl(a.device)
    _matvec_residual_kernel[(triton.cdiv(O, BN),)](
        a.contiguous(), weight, residual.contiguous(), y, O, K, BLOCK_N=BN, BLOCK_K=BK,
        FIRST_K=_first_columns(K, BK, 1), PDL=pdl,
        num_warps=warps, launch_pdl=pdl)
    return y


def attend(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask):
    if not use_triton(qkv, k_cache):
        return attend_reference(qkv, cos, sin, q_norm, k_norm, eps, k_cache, v_cache, slot, mask)
    from kernels.decode.attention import CONFIG as SPLIT_CONFIG, INTERPRET_CONFIG as SPLIT_INTERPRET, _merge_kernel

    _, K, S, Dh = k_cache.shape
    H = qkv.shape[-1] // Dh - 2 * K
    _check("attend", k_cache.shape[0] == 1 and v_cache.shape == k_cache.shape and H > 0 and H % K == 0
           and qkv.numel() == (H + 2 * K) * Dh and cos.numel() == Dh and sin.numel() == Dh
           and mask.shape == (1, 1, 1, S) and mask.dtype == torch.bool
           and k_cache.is_contiguous() and v_cache.is_contiguous(),
           f"qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, caches {tuple(k_cache.shape)} / "
           f"{tuple(v_cache.shape)}, mask {tuple(mask.shape)} {mask.dtype}: want one row, contiguous (1, K, S, Dh) "
           "caches, (H + 2K) * Dh projections with K dividing H, a bool mask (1, 1, 1, S)")
    _check("attend", Dh >= 16 and Dh & (Dh - 1) == 0, f"head dim {Dh} must be a power of two >= 16")
    cfg = SPLIT_CONFIG if qkv.is_cuda else SPLIT_INTERPRET
    G, BS = H // K, cfg["BS"]
    blocks = triton.cdiv(S, BS)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(cfg["programs"], K))))  # blocks per range
    NS = triton.cdiv(blocks, per_split)
    part = torch.empty(K, NS, G, Dh, dtype=torch.float32, device=qkv.device)  # each range's normalised output
    lse = torch.empty(K, NS, G, dtype=torch.float32, device=qkv.device)  # and its log2-sum-exp2
    pdl = _pdl(qkv.device)
    _attend_kernel[(K, NS)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos, k_cache, v_cache, slot, mask.view(S).contiguous(), part, lse,
        S, eps, Dh**-0.5 * math.log2(math.e), H=H, K=K, G=G, GP=max(16, triton.next_power_of_2(G)), DH=Dh,
        BS=BS, PER_SPLIT=per_split, NS=NS, QK_NORM=q_norm is not None,
        F32=k_cache.dtype == torch.float32 or not qkv.is_cuda, PDL=pdl, num_warps=cfg["num_warps"],
        launch_pdl=pdl)
    out = torch.empty(1, H, 1, Dh, dtype=qkv.dtype, device=qkv.device)
    _merge_kernel[(H,)](part, lse, out, H=H, G=G, DH=Dh, NS=NS, NSP=triton.next_power_of_2(NS),
                        PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def step_inputs(token, embed_weight, slot, cos_table, sin_table, key_valid):
    """The inputs of a one-row step in one launch: token (1,) -> its embedding x (1, 1, D), row `slot` (1,) of the
    rotary tables (S, Dh) -> cos, sin (1, 1, Dh), and the mask (1, 1, 1, S): key_valid (1, S) up to the slot.
    Launched without PDL, so that the layer kernels after it, which read the mask before their wait, see it."""
    if not use_triton(token, embed_weight, cos_table):
        return step_inputs_reference(token, embed_weight, slot, cos_table, sin_table, key_valid)
    (V, D), (S, Dh) = embed_weight.shape, cos_table.shape
    _check("step_inputs", token.numel() == 1 and slot.numel() == 1 and sin_table.shape == (S, Dh)
           and key_valid.numel() == S and key_valid.dtype == torch.bool and Dh & (Dh - 1) == 0
           and embed_weight.is_contiguous() and cos_table.is_contiguous() and sin_table.is_contiguous(),
           f"token {tuple(token.shape)}, embedding {tuple(embed_weight.shape)}, rotary tables {tuple(cos_table.shape)}"
           f" / {tuple(sin_table.shape)}, key_valid {tuple(key_valid.shape)} {key_valid.dtype}: want one token, "
           "contiguous (S, Dh) tables with Dh a power of two, a bool key_valid of S slots")
    block = 1024 if token.is_cuda else 32
    x = torch.empty(1, 1, D, dtype=embed_weight.dtype, device=token.device)
    cos = torch.empty(1, 1, Dh, dtype=cos_table.dtype, device=token.device)
    sin = torch.empty_like(cos)
    mask = torch.empty(1, 1, 1, S, dtype=torch.bool, device=token.device)
    _step_inputs_kernel[(triton.cdiv(max(D, S), block),)](
        token, embed_weight, slot, cos_table, sin_table, key_valid.contiguous(), x, cos, sin, mask, D, S,
        BLOCK=block, DH=Dh)
    return x, cos, sin, mask


def greedy_record(logits, banned, eos, pad_id, token, step, done, lengths, tokens, logprobs, positions):
    """The greedy tail of a one-row step in two launches (greedy_record_reference says what it does): each program
    of the first takes a chunk of the logits (1, V) and leaves the chunk's maximum outside `banned`, where it first
    occurs, and its sum of exp(x - max); one program then combines the chunks (the log-sum-exp, the first maximum)
    and records the token: column `step` of tokens and logprobs (1, L), lengths, done (an id of `eos`), token; then
    step and positions move on. Why: compiled by inductor the same tail is ~9 small kernels that programmatic
    dependent launch does not overlap."""
    if not use_triton(logits, tokens):
        return greedy_record_reference(logits, banned, eos, pad_id, token, step, done, lengths, tokens, logprobs,
                                       positions)
    V, L = logits.shape[-1], tokens.shape[-1]
    _check("greedy_record", logits.numel() == V and tokens.shape == (1, L) and logprobs.shape == (1, L)
           and token.numel() == 1 and done.numel() == 1 and lengths.numel() == 1 and step.numel() == 1
           and positions.numel() == 1 and tokens.is_contiguous() and logprobs.is_contiguous()
           and logits.is_contiguous(),
           f"logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, logprobs {tuple(logprobs.shape)}: want one "
           "row of V logits, (1, L) contiguous outputs and one-element state")
    block = 1024 if logits.is_cuda else 64
    chunks = triton.cdiv(V, block)
    chunk_max = torch.empty(2, chunks, dtype=torch.float32, device=logits.device)  # max, sum of exp(x - max)
    chunk_at = torch.empty(chunks, dtype=torch.int32, device=logits.device)  # where the max first occurs
    pdl = _pdl(logits.device)
    _greedy_chunks_kernel[(chunks,)](
        logits, banned if banned.numel() else token, chunk_max, chunk_at, V, banned.numel(),
        BLOCK=block, NBP=max(2, triton.next_power_of_2(banned.numel())), PDL=pdl, num_warps=4, launch_pdl=pdl)
    _greedy_record_kernel[(1,)](
        chunk_max, chunk_at, eos if eos.numel() else token, token, step, done, lengths, tokens, logprobs, positions,
        chunks, eos.numel(), pad_id, CP=max(2, triton.next_power_of_2(chunks)),
        NEP=max(2, triton.next_power_of_2(eos.numel())), PDL=pdl, num_warps=4, launch_pdl=pdl)


# ----------------------------------------------------------------------------------------- kernels

if triton_available():
    import triton
    import triton.language as tl

    from kernels.decode.attention import _attend_block, _attend_blocks, _store_range, _wait_for_previous_kernel

    @triton.jit
    def _normed(x_ptr, nw_ptr, cols, rstd, D, dtype: tl.constexpr):
        """rmsnorm(x)[cols] in float32, with RMSNorm's two roundings to the activation dtype."""
        x = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        return _normed_values(x, nw_ptr, cols, rstd, D, dtype)

    @triton.jit
    def _normed_values(x, nw_ptr, cols, rstd, D, dtype: tl.constexpr):
        """The same from x[cols] already loaded (float32)."""
        nw = tl.load(nw_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        return ((x * rstd).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)

    @triton.jit
    def _norm_matvec_kernel(x_ptr, nw_ptr, w_ptr, u_ptr, b_ptr, y_ptr, O, D, eps,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIRST_K: tl.constexpr, GATED: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PDL: tl.constexpr, WHOLE_ROW: tl.constexpr):
        dtype = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output rows of this program
        rf, rk = tl.arange(0, FIRST_K), tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * D  # (BLOCK_N, 1)
        u_rows = u_ptr + rows.to(tl.int64)[:, None] * D
        # the first FIRST_K columns of the weights are read before anything else: their loads are in flight during
        # the wait for the previous kernel and the rms below
        first_ok = (rows < O)[:, None] & (rf < D)[None, :]
        w0 = tl.load(w_rows + rf[None, :], mask=first_ok, other=0.0)  # (BLOCK_N, FIRST_K)
        u0 = w0
        if GATED:
            u0 = tl.load(u_rows + rf[None, :], mask=first_ok, other=0.0)
        _wait_for_previous_kernel(PDL)
        if WHOLE_ROW:  # the first tile is the whole row: read the input once, for the rms and the dot
            x0 = tl.load(x_ptr + rf, mask=rf < D, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x0 * x0, axis=0) / D + eps)
            h0 = _normed_values(x0, nw_ptr, rf, rstd, D, dtype)
        else:
            sq = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, D, BLOCK_K):  # the row's mean square: every program redoes it (D values, from L2)
                x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < D, other=0.0).to(tl.float32)
                sq += x * x
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
            h0 = _normed(x_ptr, nw_ptr, rf, rstd, D, dtype)  # (FIRST_K,)
        y = tl.sum(w0.to(tl.float32) * h0[None, :], axis=1)  # (BLOCK_N,)
        up = tl.sum(u0.to(tl.float32) * h0[None, :], axis=1)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(FIRST_K, D, BLOCK_K):
            cols = k0 + rk
            h = _normed(x_ptr, nw_ptr, cols, rstd, D, dtype)
            tile_ok = (rows < O)[:, None] & (cols < D)[None, :]
            acc += tl.load(w_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32) * h[None, :]
            if GATED:
                acc_up += tl.load(u_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32) * h[None, :]
        y = (y + tl.sum(acc, axis=1)).to(dtype).to(tl.float32)  # rounded as F.linear's output
        if GATED:
            up = (up + tl.sum(acc_up, axis=1)).to(dtype).to(tl.float32)
            silu = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32)
            y = silu * up
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < O, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dtype), mask=rows < O)

    @triton.jit
    def _matvec_residual_kernel(a_ptr, w_ptr, r_ptr, y_ptr, O, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                FIRST_K: tl.constexpr, PDL: tl.constexpr):
        dtype = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rf, rk = tl.arange(0, FIRST_K), tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        w0 = tl.load(w_rows + rf[None, :], mask=(rows < O)[:, None] & (rf < K)[None, :], other=0.0)  # as above
        _wait_for_previous_kernel(PDL)
        a0 = tl.load(a_ptr + rf, mask=rf < K, other=0.0).to(tl.float32)
        y = tl.sum(w0.to(tl.float32) * a0[None, :], axis=1)  # (BLOCK_N,)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(FIRST_K, K, BLOCK_K):
            cols = k0 + rk
            a = tl.load(a_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=(rows < O)[:, None] & (cols < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
        y = (y + tl.sum(acc, axis=1)).to(dtype).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rows < O, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, (r + y).to(dtype), mask=rows < O)

    @triton.jit
    def _rope_heads(ptr, row_ok, rd, swap, cos, sin, nw_ptr, eps, DH: tl.constexpr, QK_NORM: tl.constexpr):
        """Rows of heads at ptr (row r at ptr + r * DH; row_ok (R, 1)) -> rotated (R, DH) in the cache dtype, with
        text.apply_rotary's roundings (and Qwen3's per-head RMSNorm first)."""
        dtype = ptr.dtype.element_ty
        x = tl.load(ptr + rd[None, :], mask=row_ok, other=0.0).to(tl.float32)  # (R, DH)
        xs = tl.load(ptr + swap[None, :], mask=row_ok, other=0.0).to(tl.float32)  # rotate-half partner [x2, x1]
        if QK_NORM:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DH + eps)[:, None]
            x = ((x * rstd).to(dtype).to(tl.float32) * tl.load(nw_ptr + rd)[None, :].to(tl.float32)).to(dtype)
            xs = ((xs * rstd).to(dtype).to(tl.float32) * tl.load(nw_ptr + swap)[None, :].to(tl.float32)).to(dtype)
            x, xs = x.to(tl.float32), xs.to(tl.float32)
        return ((x * cos[None, :]).to(dtype).to(tl.float32) + xs * sin[None, :]).to(dtype)  # mul, then addcmul

    @triton.jit
    def _attend_kernel(qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, kc_ptr, vc_ptr, slot_ptr, mask_ptr, part_ptr,
                       lse_ptr, S, eps, qk_scale, H: tl.constexpr, K: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                       PER_SPLIT: tl.constexpr, NS: tl.constexpr, QK_NORM: tl.constexpr, F32: tl.constexpr,
                       PDL: tl.constexpr):
        kh, split = tl.program_id(0), tl.program_id(1)  # key/value head, slot range
        rg, rd, rs = tl.arange(0, GP), tl.arange(0, DH), tl.arange(0, BS)
        kv = kh * S * DH
        first = split * PER_SPLIT * BS
        # the range's first block of keys and values is read before the wait: the cache and the mask were written
        # by earlier steps (the mask at this step's start, before the first layer's kernels), all finished; only
        # the new token's slot is stale, and it is replaced below
        slots = first + rs  # (BS,)
        live = tl.load(mask_ptr + slots, mask=slots < S, other=0).to(tl.int1)
        offs = kv + slots[:, None] * DH + rd[None, :]  # (BS, DH)
        k = tl.load(kc_ptr + offs, mask=live[:, None], other=0.0)
        v = tl.load(vc_ptr + offs, mask=live[:, None], other=0.0)
        _wait_for_previous_kernel(PDL)
        swap = (rd + DH // 2) % DH
        cos = tl.load(cos_ptr + rd).to(tl.float32)
        sin = tl.load(sin_ptr + rd).to(tl.float32)
        slot = tl.load(slot_ptr)
        # the G query heads of this key/value head, rotated: q is qkv's first H * DH
        q = _rope_heads(qkv_ptr + (kh * G + rg)[:, None] * DH, (rg < G)[:, None], rd, swap, cos, sin, qn_ptr,
                        eps, DH, QK_NORM)  # (GP, DH)
        if (slot >= first) & (slot < first + PER_SPLIT * BS):  # the new token's slot is in this range
            k_new = _rope_heads(qkv_ptr + (H + kh) * DH + rg[:, None] * 0, (rg < 1)[:, None], rd, swap, cos, sin,
                                kn_ptr, eps, DH, QK_NORM)  # (GP, DH), row 0 is the key
            v_new = tl.load(qkv_ptr + (H + K + kh) * DH + rd)
            tl.store(kc_ptr + kv + slot * DH + rg[:, None] * 0 + rd[None, :], k_new, mask=(rg < 1)[:, None])
            tl.store(vc_ptr + kv + slot * DH + rd, v_new)
            tl.debug_barrier()  # the block loads below, by other threads, must see them
            is_new = (slots == slot)[:, None]  # (BS, 1): the slot's row of the block read before the wait
            k = tl.where(is_new, tl.sum(k_new.to(tl.float32), axis=0).to(k.dtype)[None, :], k)  # rows 1.. are 0
            v = tl.where(is_new, v_new[None, :], v)
        m_i = tl.zeros([GP], tl.float32) - float("inf")  # the online softmax of attention._split_kernel
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DH], tl.float32)
        if tl.max(live.to(tl.int32), axis=0) > 0:
            m_i, l_i, acc = _attend_block(q, k, v, live, m_i, l_i, acc, qk_scale, F32)
        m_i, l_i, acc = _attend_blocks(q, kc_ptr, vc_ptr, mask_ptr, kv, kv, 0, first, S, DH, qk_scale, m_i, l_i, acc,
                                       1, PER_SPLIT, DH, BS, F32, True, 1, BS)  # the branching loop, tuned here
        _store_range(acc, l_i, m_i, part_ptr, lse_ptr, kh * NS + split, G, GP, DH)

    @triton.jit
    def _step_inputs_kernel(token_ptr, embed_ptr, slot_ptr, cos_t_ptr, sin_t_ptr, valid_ptr, x_ptr, cos_ptr,
                            sin_ptr, mask_ptr, D, S, BLOCK: tl.constexpr, DH: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) columns of x and slots of the mask
        token = tl.load(token_ptr).to(tl.int64)
        slot = tl.load(slot_ptr)
        tl.store(x_ptr + r, tl.load(embed_ptr + token * D + r, mask=r < D), mask=r < D)
        valid = tl.load(valid_ptr + r, mask=r < S, other=0).to(tl.int1)
        tl.store(mask_ptr + r, valid & (r <= slot), mask=r < S)
        if tl.program_id(0) == 0:
            rd = tl.arange(0, DH)
            tl.store(cos_ptr + rd, tl.load(cos_t_ptr + slot * DH + rd))
            tl.store(sin_ptr + rd, tl.load(sin_t_ptr + slot * DH + rd))

    @triton.jit
    def _greedy_chunks_kernel(logits_ptr, banned_ptr, max_ptr, at_ptr, V, NB, BLOCK: tl.constexpr,
                              NBP: tl.constexpr, PDL: tl.constexpr):
        c = tl.program_id(0)
        cols = c * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) token ids of this chunk
        rb = tl.arange(0, NBP)
        banned = tl.load(banned_ptr + rb, mask=rb < NB, other=-1)  # (NBP,)
        _wait_for_previous_kernel(PDL)
        x = tl.load(logits_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        hit = tl.sum((cols[:, None] == banned[None, :]).to(tl.int32), axis=1) > 0  # (BLOCK,)
        x = tl.where(hit | (cols >= V), float("-inf"), x)
        m = tl.max(x, axis=0)
        at = tl.min(tl.where(x == m, cols, V), axis=0)  # the first maximum, as torch.argmax
        shift = tl.where(m == float("-inf"), 0.0, m)  # a chunk of banned ids only: sum 0, not NaN
        tl.store(max_ptr + c, m)
        tl.store(max_ptr + tl.num_programs(0) + c, tl.sum(tl.exp(x - shift), axis=0))
        tl.store(at_ptr + c, at)

    @triton.jit
    def _greedy_record_kernel(max_ptr, at_ptr, eos_ptr, token_ptr, step_ptr, done_ptr, lengths_ptr, tokens_ptr,
                              logprobs_ptr, positions_ptr, C, NE, pad_id, CP: tl.constexpr, NEP: tl.constexpr,
                              PDL: tl.constexpr):
        rc, re = tl.arange(0, CP), tl.arange(0, NEP)
        eos = tl.load(eos_ptr + re, mask=re < NE, other=-1)  # (NEP,)
        _wait_for_previous_kernel(PDL)
        m = tl.load(max_ptr + rc, mask=rc < C, other=float("-inf"))  # (CP,) each chunk's max
        total = tl.load(max_ptr + C + rc, mask=rc < C, other=0.0)  # and sum of exp(x - max)
        top = tl.max(m, axis=0)
        lse = top + tl.log(tl.sum(total * tl.exp(m - top), axis=0))
        best = tl.min(tl.where(m == top, tl.load(at_ptr + rc, mask=rc < C, other=0), 2**30), axis=0).to(tl.int64)
        step = tl.load(step_ptr)
        active = tl.load(done_ptr).to(tl.int1) == 0
        best = tl.where(active, best, pad_id)
        tl.store(tokens_ptr + step, best)
        tl.store(logprobs_ptr + step, tl.where(active, top - lse, 0.0))
        tl.store(lengths_ptr, tl.load(lengths_ptr) + active.to(tl.int64))
        ends = tl.sum((eos == best).to(tl.int32), axis=0) > 0
        tl.store(done_ptr, (active == 0) | ends)  # a finished row stays finished
        tl.store(token_ptr, best)
        tl.store(step_ptr, step + 1)
        tl.store(positions_ptr, tl.load(positions_ptr) + 1)
