"""Attention of one new token per row over a static KV cache (split-KV, "flash-decoding"), for the sampler.

    decode_attention(q, k, v, mask) -> out
    q (N, H, 1, Dh); k, v (N, K, S, Dh): the whole static cache of one layer; mask (N, 1, 1, S) bool: the slots
    each row may read (its prompt without the left padding, and the answer so far); out (N, H, 1, Dh), v's dtype.

Why a kernel: at one row the work is tiny (Qwen2.5-VL-3B: 2 key/value heads x ~600 slots x 128 dims) and latency
decides; at 64 rows most of the cache is not written yet. SDPA runs N*K thread blocks that each walk all S slots,
the unwritten tail included. Here the slots are cut into NS ranges and one program takes (row, key/value head,
range), with all G = H/K query heads of that key/value head in one tile (padded to 16 rows for the tensor-core
dot). A block of slots whose mask is all False (the static cache's tail not written yet, or left padding) reads no
k or v bytes: the loop runs from a range's first readable block to its last (or, with CONFIG["skip"], branches over
dead blocks), so a step reads only the written slots. Each program keeps an online softmax over its range and
writes its partial output and log-sum-exp; `_merge_kernel` weights the ranges by their log-sum-exps (one program
per head). With rows enough to fill the GPU there is one range per (row, key/value head), and no merge.
The one-row and several-row decode layers (one_row.py, rows.py) run this same range loop with the rotary and the
cache write folded in.

Numerics: the dots run in the cache's dtype with float32 accumulation, as flash attention does (bf16 on the GPU,
softmax weights rounded to bf16 for the second dot; float32 caches use IEEE float32 dots). The softmax is in
float32, in base 2.

Legend: N rows, H query heads, K key/value heads, G = H // K, GP = G padded to a power of two >= 16, S slots,
Dh head dim, BS slots per block, NS number of slot ranges.
Tests (CPU, Triton interpreter): python -m pytest tests/test_kernels_decode_attention.py
Benchmark (GPU): python benchmarks/bench_decode_kernels.py attention; measurements: benchmarks/NOTES_sampler.md
"""
import math

import torch

from kernels import triton_available, use_triton

# About 128 programs: from 128 (row, key/value head) pairs on, one range per pair fills the GPU with no merge.
# Blocks of 32 slots and 3 pipeline stages: the fastest bounded loop at 64 rows of Qwen3-VL-8B. Blocks of
# BS_few = 128 when there are no more pairs than programs: fewer, longer ranges, each program keeping more bytes in
# flight (256 do not fit in shared memory at 3 stages). The mask is scanned `scan` slots a load to bound the loop.
# Measurements: benchmarks/NOTES_sampler.md, "Attention".
CONFIG = {"BS": 32, "BS_few": 128, "num_warps": 4, "programs": 128, "skip": False, "stages": 3, "scan": 1024}
INTERPRET_CONFIG = {"BS": 16, "BS_few": 16, "num_warps": 4, "programs": 8, "skip": False, "stages": 1,
                    "scan": 32}  # small: the CPU tests cover several ranges, blocks and scans


def decode_attention_reference(q, k, v, mask):
    """The same attention in plain PyTorch, float32: q (N, H, 1, Dh) over k, v (N, K, S, Dh) -> (N, H, 1, Dh)."""
    N, H, _, Dh = q.shape
    K = k.shape[1]
    q = q.reshape(N, K, H // K, Dh).float() * Dh**-0.5  # (N, K, G, Dh): the G query heads of each key/value head
    scores = q @ k.float().transpose(-1, -2)  # (N, K, G, S)
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, 0.0)  # a row with no readable slot gets 0, as the kernel's
    return (p @ v.float()).to(v.dtype).view(N, H, 1, Dh)  # (N, K, G, Dh) -> (N, H, 1, Dh)


def ranges(pairs, S, cfg, itemsize=2):
    """(BS, blocks per range, NS) for `pairs` (row, key/value head) pairs over S slots: about cfg["programs"] programs
    in all, one range per pair once there are that many pairs. With no more pairs than that, blocks of
    cfg["BS_few"] slots (see CONFIG); a cache of `itemsize`-byte elements wider than 2 takes as many bytes a block,
    not slots (shared memory)."""
    BS = cfg["BS"] if pairs > cfg["programs"] else max(cfg["BS"], cfg["BS_few"] * 2 // itemsize)
    blocks = triton.cdiv(S, BS)
    per_split = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(cfg["programs"], pairs))))
    return BS, per_split, triton.cdiv(blocks, per_split)


def decode_attention(q, k, v, mask):
    if not use_triton(q, k, v):
        return decode_attention_reference(q, k, v, mask)
    N, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    if T != 1 or H % K or k.shape != v.shape or mask.shape != (N, 1, 1, S) or mask.dtype != torch.bool:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"mask {tuple(mask.shape)} {mask.dtype}: want q (N, H, 1, Dh), k = v (N, K, S, Dh) "
                         "with K dividing H, and a bool mask (N, 1, 1, S)")
    if Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"decode_attention: head dim {Dh} must be a power of two >= 16 (tensor-core dots)")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        raise ValueError("decode_attention: k and v must share strides, with contiguous head dims")
    cfg = CONFIG if q.is_cuda else INTERPRET_CONFIG
    G = H // K
    BS, per_split, NS = ranges(N * K, S, cfg, k.element_size())
    q = q.contiguous().to(k.dtype)
    mask = mask.view(N, S).contiguous()
    out = torch.empty(N, H, 1, Dh, dtype=v.dtype, device=q.device)
    # each range's normalised output and its log2-sum-exp2; one range (many rows) writes `out` itself
    part = torch.empty(N, K, NS, G, Dh, dtype=torch.float32, device=q.device) if NS > 1 else out
    lse = torch.empty(N, K, NS, G, dtype=torch.float32, device=q.device) if NS > 1 else out
    _split_kernel[(N * K, NS)](
        q, k, v, mask, part, lse, out, S, k.stride(0), k.stride(1), k.stride(2), Dh**-0.5 * math.log2(math.e),
        K=K, G=G, GP=max(16, triton.next_power_of_2(G)), DH=Dh, BS=BS, PER_SPLIT=per_split, NS=NS,
        F32=k.dtype == torch.float32 or not q.is_cuda, SKIP=cfg["skip"], STAGES=cfg["stages"], SCAN=cfg["scan"],
        num_warps=cfg["num_warps"])
    if NS > 1:
        # PDL passed although it is the default: inductor (torch 2.11), launching this kernel inside a compiled
        # step, counted the defaulted constexpr as a launch argument and failed ("missing ... '_grid_2'")
        _merge_kernel[(N * H,)](part, lse, out, H=H, G=G, DH=Dh, NS=NS, NSP=triton.next_power_of_2(NS), PDL=False,
                                num_warps=4)
    return out


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr, out_ptr, S, s_n, s_k, s_s, qk_scale,
                      K: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                      PER_SPLIT: tl.constexpr, NS: tl.constexpr, F32: tl.constexpr, SKIP: tl.constexpr,
                      STAGES: tl.constexpr, SCAN: tl.constexpr):
        """q's G heads of one key/value head over the PER_SPLIT blocks of slots of one range: that range's
        normalised output and log2-sum-exp2 at partial row (row, kv head, range); with one range, the output."""
        nk, split = tl.program_id(0), tl.program_id(1)
        n, kh = nk // K, nk % K
        rg, rd = tl.arange(0, GP), tl.arange(0, DH)
        # the G query heads of key/value head kh: q is (N, K*G, 1, DH) contiguous
        q = tl.load(q_ptr + (nk * G + rg)[:, None] * DH + rd[None, :], mask=(rg < G)[:, None], other=0.0)  # (GP, DH)
        kv = n.to(tl.int64) * s_n + kh * s_k
        _attend_range(q, k_ptr, v_ptr, mask_ptr + n * S, kv, kv, 0, split * PER_SPLIT * BS, S, s_s, qk_scale, out_ptr,
                      part_ptr, lse_ptr, nk, split, G, GP, DH, BS, PER_SPLIT, NS, F32, SKIP, STAGES, SCAN)

    @triton.jit
    def _attend_range(q, k_ptr, v_ptr, mask_ptr, kv, kv_lead, shared, first, S, s_s, qk_scale, out_ptr, part_ptr,
                      lse_ptr, nk, split, G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                      PER_SPLIT: tl.constexpr, NS: tl.constexpr, F32: tl.constexpr, SKIP: tl.constexpr,
                      STAGES: tl.constexpr, SCAN: tl.constexpr):
        """q (GP, DH), the G query heads of (row, key/value head) nk, over the range `split` of slots from `first`:
        with one range, the output out (N, H, 1, DH) in its dtype; else the range's partial and log-sum-exp. Slots
        below `shared` are read at offset kv_lead instead of kv (see _attend_blocks)."""
        rg, rd = tl.arange(0, GP), tl.arange(0, DH)
        m_i = tl.zeros([GP], tl.float32) - float("inf")  # running max of the base-2 scores
        l_i = tl.zeros([GP], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([GP, DH], tl.float32)
        m_i, l_i, acc = _attend_blocks(q, k_ptr, v_ptr, mask_ptr, kv, kv_lead, shared, first, S, s_s, qk_scale, m_i,
                                       l_i, acc, 0, PER_SPLIT, DH, BS, F32, SKIP, STAGES, SCAN)
        if NS == 1:  # no merge; a row with no readable slot gets 0
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (nk * G + rg)[:, None] * DH + rd[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=(rg < G)[:, None])
        else:
            _store_range(acc, l_i, m_i, part_ptr, lse_ptr, nk * NS + split, G, GP, DH)

    @triton.jit
    def _attend_blocks(q, k_ptr, v_ptr, mask_ptr, kv, kv_lead, shared, first, S, s_s, qk_scale, m_i, l_i, acc,
                       START: tl.constexpr, PER_SPLIT: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr,
                       F32: tl.constexpr, SKIP: tl.constexpr, STAGES: tl.constexpr, SCAN: tl.constexpr):
        """The online softmax (m_i, l_i, acc) carried over blocks START..PER_SPLIT-1 of the range. Also
        one_row.py's attention, which does block 0 itself. SKIP: a block nobody may read is
        branched over. Else the loop has no branch, so Triton pipelines it STAGES deep, and runs from the
        range's first readable block to its last, found by reading the mask SCAN slots at a time (a dead slot
        between them is loaded under its mask: no bytes). Slots below `shared` are read at offset kv_lead, not kv:
        rows that hold copies of one prompt read that prompt from the first copy, so the copies' reads hit L2."""
        rd, rs = tl.arange(0, DH), tl.arange(0, BS)
        if SKIP:
            for b in range(START, PER_SPLIT):
                slots = first + b * BS + rs  # (BS,)
                live = tl.load(mask_ptr + slots, mask=slots < S, other=0).to(tl.int1)  # (BS,)
                if tl.max(live.to(tl.int32), axis=0) > 0:  # skip blocks nobody may read: no k/v bytes for them
                    base = tl.where(slots < shared, kv_lead, kv)  # (BS,)
                    offs = base[:, None] + slots[:, None] * s_s + rd[None, :]  # (BS, DH)
                    k = tl.load(k_ptr + offs, mask=live[:, None], other=0.0)
                    v = tl.load(v_ptr + offs, mask=live[:, None], other=0.0)
                    m_i, l_i, acc = _attend_block(q, k, v, live, m_i, l_i, acc, qk_scale, F32)
        else:
            lo, hi = _readable_blocks(mask_ptr, first, S, START, PER_SPLIT, BS, SCAN)
            for b in tl.range(lo, hi, num_stages=STAGES):
                slots = first + b * BS + rs  # (BS,)
                live = tl.load(mask_ptr + slots, mask=slots < S, other=0).to(tl.int1)  # (BS,)
                base = tl.where(slots < shared, kv_lead, kv)  # (BS,): a shared prompt's slots from its first copy
                offs = base[:, None] + slots[:, None] * s_s + rd[None, :]  # (BS, DH)
                k = tl.load(k_ptr + offs, mask=live[:, None], other=0.0)
                v = tl.load(v_ptr + offs, mask=live[:, None], other=0.0)
                m_i, l_i, acc = _attend_block(q, k, v, live, m_i, l_i, acc, qk_scale, F32)
        return m_i, l_i, acc

    @triton.jit
    def _readable_blocks(mask_ptr, first, S, START: tl.constexpr, PER_SPLIT: tl.constexpr, BS: tl.constexpr,
                         SCAN: tl.constexpr):
        """(lo, hi): blocks lo..hi-1 of the range's START..PER_SPLIT-1 hold all its readable slots; hi <= lo when
        it has none."""
        rc = tl.arange(0, SCAN)
        lo = tl.full([], PER_SPLIT * BS, tl.int32)  # first readable slot, from `first`
        hi = tl.full([], 0, tl.int32)  # one past the last
        for c in range(START * BS, PER_SPLIT * BS, SCAN):
            offs = c + rc  # (SCAN,)
            live = tl.load(mask_ptr + first + offs, mask=(offs < PER_SPLIT * BS) & (first + offs < S),
                           other=0).to(tl.int1)
            lo = tl.minimum(lo, tl.min(tl.where(live, offs, PER_SPLIT * BS), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(live, offs + 1, 0), axis=0))
        return lo // BS, (hi + BS - 1) // BS

    @triton.jit
    def _attend_block(q, k, v, live, m_i, l_i, acc, qk_scale, F32: tl.constexpr):
        """One block of slots, k and v (BS, DH), into the online softmax of q (GP, DH); live (BS,) says which
        slots count. A block with none comes only after one with some (m_i finite)."""
        if F32:  # float32 caches; and the CPU interpreter, whose bf16 dot is wrong (triton 3.9)
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))  # (GP, BS), float32 accumulation
        scores = (scores * qk_scale).to(tl.float32)  # (inductor passes a float argument as fp64)
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: this block or an earlier one has a live slot
        p = tl.exp2(scores - m_new[:, None])  # (GP, BS), 0 on dead slots
        alpha = tl.exp2(m_i - m_new)  # 0 on the first live block (m_i = -inf)
        p_v = p.to(v.dtype)  # rounded to the cache dtype for the dot, as flash attention does
        if F32:
            pv = tl.dot(p_v.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_v, v)  # (GP, DH)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv

    @triton.jit
    def _store_range(acc, l_i, m_i, part_ptr, lse_ptr, row, G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr):
        rg, rd = tl.arange(0, GP), tl.arange(0, DH)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a range with no live slot: 0, weight 0 in the merge
        tl.store(part_ptr + (row * G + rg)[:, None] * DH + rd[None, :], out, mask=(rg < G)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))  # -inf: no live slot here
        tl.store(lse_ptr + row * G + rg, lse, mask=rg < G)

    @triton.jit
    def _wait_for_previous_kernel(PDL: tl.constexpr):
        """Under programmatic dependent launch a kernel is started while the previous one still runs: let the next
        one start as well, then wait until the previous one has finished and its writes are visible. Before this
        call a kernel reads only weights (no kernel writes them) and writes nothing."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, H: tl.constexpr, G: tl.constexpr, DH: tl.constexpr,
                      NS: tl.constexpr, NSP: tl.constexpr, PDL: tl.constexpr = False):
        _wait_for_previous_kernel(PDL)  # one_row.py launches it so
        nh = tl.program_id(0)  # row n, query head h = kh * G + g
        nk, g = nh // G, nh % G
        rs, rd = tl.arange(0, NSP), tl.arange(0, DH)
        lse = tl.load(lse_ptr + (nk * NS + rs) * G + g, mask=rs < NS, other=float("-inf"))  # (NSP,)
        top = tl.max(lse, axis=0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # (NSP,): each range's share, unnormalised
        part = tl.load(part_ptr + ((nk * NS + rs) * G + g)[:, None] * DH + rd[None, :], mask=(rs < NS)[:, None],
                       other=0.0)  # (NSP, DH)
        total = tl.sum(w, axis=0)
        out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # no readable slot at all: 0
        tl.store(out_ptr + nh * DH + rd, out.to(out_ptr.dtype.element_ty))
