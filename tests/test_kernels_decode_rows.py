"""kernels.decode.rows (the small ops of a several-row decode step) against float64 references, under
TRITON_INTERPRET=1, with the rounding points of the bf16 layer made explicit as in test_kernels_decode_one_row.py."""
import pytest
import torch

from helpers import compile_for_h100, fresh_generator, import_interpreted

import_interpreted("kernels.decode.attention", "_split_kernel")  # first: the modules below import its functions
import_interpreted("kernels.decode.one_row", "_norm_matvec_kernel")
dr = import_interpreted("kernels.decode.rows", "_add_norm_kernel")

from test_kernels_decode_one_row import TOL, attention64, rms64, rnd, rotate64  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [100, 64])
@pytest.mark.parametrize("parts", [0, 1, 3])  # no delta; one partial in the activation dtype; three float32 ones
def test_add_norm(parts, D, dtype, triton_cpu):
    gen, seed = fresh_generator()
    x = torch.randn(5, 1, D, generator=gen).mul(3).to(dtype)
    delta = None if parts == 0 else torch.randn(parts, 5, 1, D, generator=gen).to(dtype if parts == 1 else
                                                                                     torch.float32)
    nw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype)
    before = x.clone()
    s, h = dr.add_norm(x, delta, nw, 1e-6)
    # the partials' sum is rounded once (a product's output), then the residual sum once
    want_s = x.double() if delta is None else rnd(x.double() + rnd(delta.double().sum(0), dtype), dtype)
    assert s.shape == h.shape == x.shape and s.dtype == h.dtype == dtype
    torch.testing.assert_close(s.double(), want_s, **TOL[dtype], msg=f"seed {seed}")
    assert torch.equal(x, before), f"seed {seed}"
    torch.testing.assert_close(h.double(), rms64(s, nw, 1e-6, dtype), **TOL[dtype], msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,O", [(5, 100, 37), (3, 32, 16), (70, 64, 20), (2, 20, 5)])
def test_split_linear(M, K, O, dtype, triton_cpu):
    """The float32 partials sum to x @ W.T; the ranges cover K once (the interpreter's tiles: 16 outputs, 32 inputs a
    step, ~8 programs; 70 rows: two blocks of 64)."""
    gen, seed = fresh_generator()
    x = torch.randn(M, 1, K, generator=gen).to(dtype)
    w = (torch.randn(O, K, generator=gen) / K**0.5).to(dtype)
    part = dr.split_linear(x, w)
    assert part.dtype == torch.float32 and part.shape[1:] == (M, 1, O) and part.shape[0] >= 1
    want = x.double().view(M, K) @ w.double().T
    torch.testing.assert_close(part.double().sum(0).view(M, O), want, atol=1e-4, rtol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,D,I", [(5, 100, 37), (70, 64, 20), (2, 20, 5)])  # 70 rows: two blocks of 64
def test_gated_linear(M, D, I, dtype, triton_cpu):
    gen, seed = fresh_generator()
    x = torch.randn(M, 1, D, generator=gen).mul(2).to(dtype)
    g = (torch.randn(I, D, generator=gen) / D**0.5).to(dtype)
    u = (torch.randn(I, D, generator=gen) / D**0.5).to(dtype)
    got = dr.gated_linear(x, g, u)
    gate, up = rnd(x.double() @ g.double().T, dtype), rnd(x.double() @ u.double().T, dtype)
    want = rnd(rnd(torch.nn.functional.silu(gate), dtype) * up, dtype)
    assert got.shape == (M, 1, I) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=f"seed {seed}")


# (rows, H, K, Dh, S, slot): the interpreter's CONFIG aims at 8 programs, so 2 rows x 2 heads of 100 slots take 2
# ranges each (merged), the new slot in the first; 4 rows x 2 heads one range (no merge); 3 rows x 1 head, 3 ranges
# with the slot in the last; one block; Qwen3's GQA of 4 query heads a key/value head
ROWS_CASES = [(2, 4, 2, 16, 100, 3), (4, 4, 2, 16, 100, 57), (3, 2, 1, 16, 70, 69), (2, 4, 2, 16, 12, 11),
              (3, 8, 2, 32, 90, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("case", ROWS_CASES)
def test_attend(case, qk_norm, dtype, triton_cpu):
    N, H, K, Dh, S, slot = case
    gen, seed = fresh_generator()
    qkv = torch.randn(N, 1, (H + 2 * K) * Dh, generator=gen).to(dtype)  # scores ~N(0, 1)
    angle = torch.randn(N, Dh // 2, generator=gen).repeat(1, 2)  # each row its own position
    cos, sin = angle.cos().to(dtype).view(N, 1, Dh), angle.sin().to(dtype)
    sin = torch.cat([-sin[:, : Dh // 2], sin[:, Dh // 2:]], dim=-1).view(N, 1, Dh)  # signed, as text.signed_sin
    qn = (1 + 0.3 * torch.randn(Dh, generator=gen)).to(dtype) if qk_norm else None
    kn = (1 + 0.3 * torch.randn(Dh, generator=gen)).to(dtype) if qk_norm else None
    k_cache = torch.randn(N, K, S, Dh, generator=gen).to(dtype)
    v_cache = torch.randn(N, K, S, Dh, generator=gen).to(dtype)
    # row n: left padding of a different length each (the last row's covers all but the new slot), holes for the
    # first row (slots a prompt may not read), nothing past the slot
    pads = [min(slot, (7 * n) % (slot + 1)) for n in range(N - 1)] + [slot]
    mask = torch.stack([(torch.arange(S) >= p) & (torch.arange(S) <= slot) for p in pads])  # (N, S)
    mask[0, 1:slot:3] = False
    # slots nobody may read and the new slot before it is written hold NaN: never read, written before read
    k_cache.masked_fill_(~mask[:, None, :, None], float("nan"))
    v_cache.masked_fill_(~mask[:, None, :, None], float("nan"))
    k_cache[:, :, slot], v_cache[:, :, slot] = float("nan"), float("nan")
    before = k_cache.clone(), v_cache.clone()

    out = dr.attend(qkv, cos, sin, qn, kn, 1e-6, k_cache, v_cache, torch.tensor([slot]), mask.view(N, 1, 1, S))
    assert out.shape == (N, H, 1, Dh) and out.dtype == dtype
    for n in range(N):
        heads = qkv[n].double().view(H + 2 * K, Dh)
        q64, k64, v64 = heads[:H], heads[H : H + K], heads[H + K :]
        if qk_norm:
            q64, k64 = rms64(q64, qn, 1e-6, dtype), rms64(k64, kn, 1e-6, dtype)
        c, s = cos[n].double().view(Dh), sin[n].double().view(Dh)
        q64, k64 = rotate64(q64, c, s, dtype), rotate64(k64, c, s, dtype)
        k_want, v_want = before[0][n].double(), before[1][n].double()
        k_want[:, slot], v_want[:, slot] = k64, v64
        want = attention64(q64, k_want.nan_to_num(), v_want.nan_to_num(), mask[n])
        # bf16: as test_kernels_decode_one_row.test_attend
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(out[n].double().view(H, Dh), want, **tol, msg=f"seed {seed}, row {n}")
        torch.testing.assert_close(k_cache[n, :, slot].double(), k64, **TOL[dtype], msg=f"seed {seed}, row {n}")
        assert torch.equal(v_cache[n, :, slot].double(), v64)
    others = [i for i in range(S) if i != slot]  # nothing else in the caches moved (NaN compared as equal)
    assert torch.equal(k_cache[:, :, others].nan_to_num(7), before[0][:, :, others].nan_to_num(7))
    assert torch.equal(v_cache[:, :, others].nan_to_num(7), before[1][:, :, others].nan_to_num(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(6, 3, 40, 70), (4, 2, 16, 16), (4, 4, 97, 99)])
def test_attend_reads_a_shared_prompt_from_its_first_copy(case, dtype, triton_cpu):
    """shared = (n, T0): each row reads slots below T0 from the first row of its run of n. The other rows' prompt
    slots hold NaN here, so reading them anywhere would show; the answer slots are each row's own."""
    N, n, T0, slot = case
    H, K, Dh, S = 4, 2, 16, 100
    gen, seed = fresh_generator()
    qkv = torch.randn(N, 1, (H + 2 * K) * Dh, generator=gen).to(dtype)
    angle = torch.randn(N, Dh // 2, generator=gen).repeat(1, 2)
    cos, sin = angle.cos().to(dtype).view(N, 1, Dh), angle.sin().to(dtype)
    sin = torch.cat([-sin[:, : Dh // 2], sin[:, Dh // 2:]], dim=-1).view(N, 1, Dh)
    k_cache = torch.randn(N, K, S, Dh, generator=gen).to(dtype)
    v_cache = torch.randn(N, K, S, Dh, generator=gen).to(dtype)
    pads = [(5 * (r // n)) % max(1, T0) for r in range(N)]  # a prompt's left padding, alike in its run
    mask = torch.stack([(torch.arange(S) >= p) & (torch.arange(S) <= slot) for p in pads])  # (N, S)
    copies = [r for r in range(N) if r % n]
    k_cache[copies, :, :T0], v_cache[copies, :, :T0] = float("nan"), float("nan")
    before = k_cache.clone(), v_cache.clone()
    want = [k_cache.clone(), v_cache.clone()]
    for r in copies:  # what the copies would hold
        for c in want:
            c[r, :, :T0] = c[r - r % n, :, :T0]

    out = dr.attend(qkv, cos, sin, None, None, 1e-6, k_cache, v_cache, torch.tensor([slot]), mask.view(N, 1, 1, S),
                    shared=(n, T0))
    ref = dr.attend_rows_reference(qkv, cos, sin, None, None, 1e-6, *want, torch.tensor([slot]),
                                   mask.view(N, 1, 1, S))
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref.double(), **tol, msg=f"seed {seed}")
    assert not out.isnan().any()
    others = [i for i in range(S) if i != slot]  # the copies' prompt slots are left as they were
    assert torch.equal(k_cache[:, :, others].nan_to_num(7), before[0][:, :, others].nan_to_num(7))
    with pytest.raises(ValueError, match="attend"):  # runs that do not divide the rows
        dr.attend(qkv, cos, sin, None, None, 1e-6, k_cache, v_cache, torch.tensor([slot]), mask.view(N, 1, 1, S),
                  shared=(N + 1, T0))


def test_bad_shapes_are_named(triton_cpu):
    with pytest.raises(ValueError, match="add_norm"):
        dr.add_norm(torch.randn(2, 1, 8), torch.randn(1, 2, 1, 6), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="add_norm"):  # a delta without its partials' dimension
        dr.add_norm(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gated_linear"):
        dr.gated_linear(torch.randn(2, 1, 8), torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="split_linear"):
        dr.split_linear(torch.randn(2, 1, 8), torch.randn(4, 6))
    cache = torch.zeros(2, 1, 4, 16)
    args = (torch.randn(2, 1, 48), torch.ones(2, 1, 16), torch.ones(2, 1, 16), None, None, 1e-6)
    with pytest.raises(ValueError, match="attend"):  # a mask of the wrong length
        dr.attend(*args, cache, cache.clone(), torch.tensor([0]), torch.ones(2, 1, 1, 5) > 0)
    with pytest.raises(ValueError, match="attend"):  # one cos row for two rows
        dr.attend(args[0], args[1][:1], *args[2:], cache, cache.clone(), torch.tensor([0]),
                  torch.ones(2, 1, 1, 4) > 0)


def test_twins_agree(triton_cpu, monkeypatch):
    """The PyTorch twins that the CPU path runs give what the kernels give (float32)."""
    gen, seed = fresh_generator()
    x, d, nw = torch.randn(3, 1, 40, generator=gen), torch.randn(3, 1, 40, generator=gen), torch.rand(40) + 0.5
    N, H, K, Dh, S = 3, 4, 2, 16, 30
    qkv, cos = torch.randn(N, 1, (H + 2 * K) * Dh, generator=gen), torch.randn(N, 1, Dh, generator=gen)
    caches = [torch.randn(N, K, S, Dh, generator=gen) for _ in range(2)]
    mask = torch.rand(N, 1, 1, S, generator=gen) > 0.3
    mask[..., 20] = True  # the new slot
    w = torch.randn(24, 40, generator=gen)
    got = [*dr.add_norm(x, d[None], nw, 1e-6), dr.split_linear(x, w).sum(0),
           dr.gated_linear(x, w, w.flip(0)),
           dr.attend(qkv, cos, -cos, None, None, 0.0, *[c.clone() for c in caches], torch.tensor([20]), mask)]
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    want = [*dr.add_norm(x, d[None], nw, 1e-6), dr.split_linear(x, w).sum(0),
            dr.gated_linear(x, w, w.flip(0)),
            dr.attend(qkv, cos, -cos, None, None, 0.0, *[c.clone() for c in caches], torch.tensor([20]), mask)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=f"seed {seed}")


COMPILE_FOR_H100 = """
import kernels.decode.rows as dr
for parts in (0, 4):
    build(dr._add_norm_kernel, dict(x_ptr=bf, d_ptr="*fp32", nw_ptr=bf, out_ptr=bf, h_ptr=bf),
          dict(D="i32", numel="i32", eps="fp32"), dict(BLOCK=2048, PARTS=parts))
for qk_norm, ns in ((False, 3), (True, 1)):
    pointers = {n: bf for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "qn_ptr", "kn_ptr", "kc_ptr", "vc_ptr", "out_ptr")}
    pointers.update(slot_ptr="*i64", mask_ptr="*i1", part_ptr="*fp32", lse_ptr="*fp32")
    build(dr._attend_rows_kernel, pointers, dict(S="i32", group="i32", prompt="i32", eps="fp32", qk_scale="fp32"),
          dict(H=16, K=2, G=8, GP=16, DH=128, BS=32, PER_SPLIT=9, NS=ns, QK_NORM=qk_norm, F32=False, STAGES=3,
               SCAN=1024))
build(dr._sample_chunks_kernel, dict(logits_ptr=bf, banned_ptr="*i64", seed_ptr="*i64", row0_ptr="*i64",
      step_ptr="*i64", f_ptr="*fp32", at_ptr="*i32"), dict(V="i32", NB="i32", temperature="fp32"),
      dict(BLOCK=4096, NBP=8, GREEDY=False))
build(dr._sample_record_kernel, dict(f_ptr="*fp32", at_ptr="*i32", logits_ptr=bf, eos_ptr="*i64", token_ptr="*i64",
      step_ptr="*i64", done_ptr="*i1", lengths_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32"),
      dict(N="i32", C="i32", V="i32", L="i32", NE="i32", pad_id="i32", temperature="fp32"),
      dict(RB=2, CP=64, NEP=2, GREEDY=False))
for f32 in (False, True):
    build(dr._gated_matmul_kernel, dict(x_ptr=bf, g_ptr=bf, u_ptr=bf, out_ptr=bf), dict(M="i32", N="i32", K="i32"),
          dict(BM=64, BN=64, BK=64, STAGES=4, F32=f32))
build(dr._advance_kernel, dict(step_ptr="*i64", positions_ptr="*i64"), {}, {})
build(dr._partial_matmul_kernel, dict(x_ptr=bf, w_ptr=bf, part_ptr="*fp32"),
      dict(M="i32", N="i32", K="i32", K_PER_SPLIT="i32"), dict(BM=64, BN=64, BK=128, STAGES=4, F32=False))
"""


def test_kernels_compile_for_an_h100():
    """The interpreter runs what the GPU compiler rejects: compile these kernels for sm_90 with bf16 arguments."""
    compile_for_h100(COMPILE_FOR_H100)


def rows_state(N, L, step, done):
    return dict(token=torch.zeros(N, dtype=torch.long), step=torch.tensor(step), done=done.clone(),
                lengths=torch.full((N,), step, dtype=torch.long), tokens=torch.full((N, L), 7, dtype=torch.long),
                logprobs=torch.full((N, L), 7.0), positions=torch.tensor([40]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 64, 50])  # several chunks of the interpreter's 64 ids and a partial one; one; less
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sample_record(temperature, V, dtype, triton_cpu):
    """Against the sampler's sample written out in float64: the token is the first maximum of logits / temperature +
    the sampler's Gumbel noise of rows first_row, ... (greedy: of the logits) outside the banned ids, its log-prob the
    log-softmax there; rows already done only pad; an eos ends a row."""
    from minivl.sampler import gumbel_noise

    gen, seed_ = fresh_generator()
    N, L, step = 5, 4, 2
    logits = torch.randn(N, V, generator=gen).mul(3).to(dtype)
    logits[1, 17] = logits[1, 40] = logits[1].max() + 20  # a tie: the first wins (greedy)
    banned = torch.tensor([3, 11, V - 1])
    logits[2, 11] = 1e4  # banned: never drawn
    done = torch.tensor([False, False, False, True, False])
    seed = torch.tensor(int(torch.randint(2**40, (), generator=gen)))
    first_row = torch.tensor(int(torch.randint(1000, (), generator=gen)))  # a slice of a larger batch
    x = logits.double()
    noise = gumbel_noise(seed, torch.tensor(step), N, V, first_row).double()
    if temperature > 0:
        x = x / temperature
    x[:, banned] = float("-inf")
    want = (x + noise if temperature > 0 else x).argmax(-1)
    eos = torch.tensor([int(want[4]), 999])  # row 4 draws an eos
    want_lp = x.log_softmax(-1).gather(1, want[:, None])[:, 0]
    state = rows_state(N, L, step, done)
    dr.sample_record(logits, temperature, banned, eos, 0, seed, first_row, **state)
    msg = f"seed {seed_}"
    active = ~done
    assert state["tokens"][:, step].tolist() == torch.where(active, want, 0).tolist(), msg
    assert torch.equal(state["token"], torch.where(active, want, 0)), msg
    torch.testing.assert_close(state["logprobs"][:, step].double(), torch.where(active, want_lp, 0.0), atol=1e-5,
                               rtol=1e-5, msg=msg)
    assert (state["tokens"][:, [0, 1, 3]] == 7).all() and (state["logprobs"][:, [0, 1, 3]] == 7.0).all()
    assert state["lengths"].tolist() == [step + int(a) for a in active]
    ends = active & torch.isin(want, eos)
    assert state["done"].tolist() == (done | ends).tolist() and bool(ends[4]), msg  # other rows may draw it too
    assert int(state["step"]) == step + 1 and int(state["positions"]) == 41


def test_sample_record_twin_agrees(triton_cpu):
    """The kernels and the sampler's sample (their twin: what the reference step and the CPU run) draw the same
    tokens and write the same state."""
    from types import SimpleNamespace

    from minivl.sampler import Sampling, sample

    gen, seed_ = fresh_generator()
    N, V = 6, 500
    logits, banned, eos = torch.randn(N, V, generator=gen), torch.tensor([4, 7]), torch.tensor([1])
    done = torch.zeros(N, dtype=torch.bool)
    a = rows_state(N, 3, 1, done)
    dr.sample_record(logits, 0.8, banned, eos, 0, torch.tensor(seed_), torch.tensor(12), **a)
    b = rows_state(N, 3, 1, done)
    state = SimpleNamespace(banned=banned, eos=eos, pad_id=0, seed=torch.tensor(seed_), first_row=torch.tensor(12),
                            slot=b["positions"], **{k: v for k, v in b.items() if k != "positions"})
    sample(state, logits, Sampling(0.8))
    assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "logprobs"), f"seed {seed_}"
