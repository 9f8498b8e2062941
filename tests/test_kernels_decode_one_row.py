"""kernels.decode.one_row (the one-row decode step's kernels) against float64 references, under TRITON_INTERPRET=1.

The references here are written independently of kernels/decode/one_row.py's PyTorch twins, in float64 with the
rounding points of the bf16 layer made explicit (`rnd`), so a kernel that skips a rounding, a bias, the norm
weight, the SiLU or a residual fails.
"""
import pytest
import torch

from helpers import compile_for_h100, fresh_generator, import_interpreted

import_interpreted("kernels.decode.attention", "_split_kernel")  # first: one_row imports its functions
dl = import_interpreted("kernels.decode.one_row", "_norm_matvec_kernel")  # first (see helpers.import_interpreted)


def rnd(t, dtype):
    """float64 -> rounded to dtype -> float64: where the PyTorch layer stores an intermediate in its dtype."""
    return t.to(dtype).double()


def rms64(x, w, eps, dtype):
    x = x.double()
    normed = rnd(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), dtype)
    return rnd(normed * w.double(), dtype)


# bf16: products of 2^-9-relative inputs summed in float32 over up to 100 terms of size ~1: outputs ~10 are
# rounded to bf16 (2^-8 * 10 ~ 0.04 absolute step); the float64 reference rounds at the same points, so the two
# differ by at most one bf16 step where a float32 sum lands near a rounding boundary.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=2e-2)}

# (D, O): neither a multiple of the interpreter's blocks (16 rows, 32 columns); one smaller than a block
SHAPES = [(100, 37), (64, 16), (20, 5)]


# (dl.PRELOAD_WHOLE, dl.PRELOAD_PART): the columns loaded before the wait at D = 100 (a 128-column tile; blocks of
# 32) with one weight / with gate and up: 32 / 32, 64 then the loop / 32, 128 whole / 64 then the loop, 128 / 128
PRELOADS = [(0, 0), (0, 64), (0, 128), (256, 0)]


@pytest.mark.parametrize("preload", PRELOADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,O", SHAPES)
@pytest.mark.parametrize("kind", ["plain", "bias", "gated"])
def test_norm_matvec(kind, D, O, dtype, preload, triton_cpu, monkeypatch):
    monkeypatch.setattr(dl, "PRELOAD_WHOLE", preload[0])
    monkeypatch.setattr(dl, "PRELOAD_PART", preload[1])
    gen, seed = fresh_generator()
    x = torch.randn(1, 1, D, generator=gen).mul(3).to(dtype)
    nw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype)
    w = (torch.randn(O, D, generator=gen) / D**0.5).to(dtype)
    b = torch.randn(O, generator=gen).to(dtype) if kind == "bias" else None
    u = (torch.randn(O, D, generator=gen) / D**0.5).to(dtype) if kind == "gated" else None
    got = dl.norm_matvec(x, nw, 1e-6, w, b, u)
    h = rms64(x, nw, 1e-6, dtype)
    want = rnd(h @ w.double().T, dtype)
    if kind == "bias":
        want = want + b.double()
    if kind == "gated":
        want = rnd(torch.nn.functional.silu(want), dtype) * rnd(h @ u.double().T, dtype)
    assert got.shape == (1, 1, O) and got.dtype == dtype
    torch.testing.assert_close(got.double(), rnd(want, dtype), **TOL[dtype], msg=f"seed {seed}")


@pytest.mark.parametrize("preload", PRELOADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,O", SHAPES)
def test_matvec_residual(D, O, dtype, preload, triton_cpu, monkeypatch):
    monkeypatch.setattr(dl, "PRELOAD_WHOLE", preload[0])
    monkeypatch.setattr(dl, "PRELOAD_PART", preload[1])
    gen, seed = fresh_generator()
    a = torch.randn(1, 1, D, generator=gen).to(dtype)
    w = (torch.randn(O, D, generator=gen) / D**0.5).to(dtype)
    r = torch.randn(1, 1, O, generator=gen).mul(4).to(dtype)
    got = dl.matvec_residual(a, w, r)
    want = rnd(r.double() + rnd(a.reshape(1, 1, D).double() @ w.double().T, dtype), dtype)
    assert got.shape == (1, 1, O) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=f"seed {seed}")


def rotate64(x, cos, sin_signed, dtype):
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return rnd(rnd(x * cos, dtype) + swapped * sin_signed, dtype)


def attention64(q, k, v, mask):
    """q (H, Dh), k and v (K, S, Dh), mask (S,) -> (H, Dh), float64."""
    H, Dh = q.shape
    K = k.shape[0]
    scores = q.view(K, H // K, Dh) @ k.transpose(-1, -2) * Dh**-0.5  # (K, G, S)
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).view(H, Dh)


# (H, K, Dh, S, slot, left padding): one range (S within a block), several ranges with the new slot in the first,
# a middle and the last one, padding covering whole blocks, a single readable slot (the new one)
ATTEND_CASES = [(4, 2, 16, 12, 11, 0), (4, 2, 16, 100, 3, 0), (8, 2, 32, 100, 57, 20), (6, 2, 16, 70, 69, 33),
                (2, 1, 16, 40, 0, 0), (4, 4, 16, 50, 30, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("case", ATTEND_CASES)
def test_attend(case, qk_norm, dtype, triton_cpu):
    H, K, Dh, S, slot, pad = case
    gen, seed = fresh_generator()
    qkv = torch.randn(1, 1, (H + 2 * K) * Dh, generator=gen).to(dtype)  # scores ~N(0, 1): see the tolerance
    angle = torch.randn(Dh // 2, generator=gen).repeat(2)
    cos, sin = angle.cos().to(dtype).view(1, 1, Dh), angle.sin().to(dtype)
    sin = torch.cat([-sin[: Dh // 2], sin[Dh // 2:]]).view(1, 1, Dh)  # signed, as text.signed_sin
    qn = (1 + 0.3 * torch.randn(Dh, generator=gen)).to(dtype) if qk_norm else None
    kn = (1 + 0.3 * torch.randn(Dh, generator=gen)).to(dtype) if qk_norm else None
    k_cache = torch.randn(1, K, S, Dh, generator=gen).to(dtype)
    v_cache = torch.randn(1, K, S, Dh, generator=gen).to(dtype)
    mask = (torch.arange(S) >= pad) & (torch.arange(S) <= slot)
    # slots nobody may read (left padding, the unwritten tail) and the new slot before it is written hold NaN:
    # the kernel must never read the first two, and must write the third before reading it
    k_cache[:, :, ~mask], v_cache[:, :, ~mask] = float("nan"), float("nan")
    k_cache[:, :, slot], v_cache[:, :, slot] = float("nan"), float("nan")
    before = k_cache.clone(), v_cache.clone()

    heads = qkv.double().view(H + 2 * K, Dh)
    q64, k64, v64 = heads[:H], heads[H : H + K], heads[H + K :]
    if qk_norm:
        q64, k64 = rms64(q64, qn, 1e-6, dtype), rms64(k64, kn, 1e-6, dtype)
    c, s = cos.double().view(Dh), sin.double().view(Dh)
    q64, k64 = rotate64(q64, c, s, dtype), rotate64(k64, c, s, dtype)
    k_want, v_want = before[0][0].double(), before[1][0].double()
    k_want[:, slot], v_want[:, slot] = k64, v64
    want = attention64(q64, k_want.nan_to_num(), v_want.nan_to_num(), mask)

    for call in range(2):  # twice: a second call over the cache it wrote gives the same
        out = dl.attend(qkv, cos, sin, qn, kn, 1e-6, k_cache, v_cache, torch.tensor([slot]), mask.view(1, 1, 1, S))
        assert out.shape == (1, H, 1, Dh) and out.dtype == dtype
        # bf16: the output is rounded (2^-9 relative), p is rounded to bf16 for the p.v dot, and a rotated q or k
        # element may differ from the float64 one by one bf16 step (float32 sums rounded twice); with scores ~N(0, 1)
        # that moves outputs of size <~1 by <~1e-2 (seen: 7e-3), so 3e-2 absolute. (Scores of ~10, from inputs
        # twice as large, made a one-step difference in q move a near-tie softmax by 0.17: seen once in CI.)
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(out.double().view(H, Dh), want, **tol, msg=f"seed {seed}, call {call}")
    torch.testing.assert_close(k_cache[0, :, slot].double(), k64, **TOL[dtype], msg=f"seed {seed}")
    assert torch.equal(v_cache[0, :, slot].double(), v64)
    others = [i for i in range(S) if i != slot]  # nothing else in the caches moved (NaN compared as equal)
    assert torch.equal(k_cache[:, :, others].nan_to_num(7), before[0][:, :, others].nan_to_num(7))
    assert torch.equal(v_cache[:, :, others].nan_to_num(7), before[1][:, :, others].nan_to_num(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 64, 50])  # several chunks of the interpreter's 64 ids and a partial one; one; less
def test_step_inputs(V, dtype, triton_cpu):
    gen, seed = fresh_generator()
    D, S, Dh = 40, 70, 16  # the mask spans two programs of 32 slots and a partial one; D does not fill its last
    embed = torch.randn(V, D, generator=gen).to(dtype)
    cos_t, sin_t = torch.randn(S, Dh, generator=gen).to(dtype), torch.randn(S, Dh, generator=gen).to(dtype)
    token, slot = torch.randint(V, (1,), generator=gen), torch.randint(S, (1,), generator=gen)
    key_valid = torch.rand(1, S, generator=gen) > 0.3
    x, cos, sin, mask = dl.step_inputs(token, embed, slot, cos_t, sin_t, key_valid)
    assert torch.equal(x, embed[int(token)].view(1, 1, D)), f"seed {seed}"
    assert torch.equal(cos, cos_t[int(slot)].view(1, 1, Dh)) and torch.equal(sin, sin_t[int(slot)].view(1, 1, Dh))
    want = [bool(key_valid[0, s]) and s <= int(slot) for s in range(S)]
    assert mask.shape == (1, 1, 1, S) and mask.view(S).tolist() == want, f"seed {seed}"


def greedy_state(L, step, done):
    return dict(token=torch.tensor([5]), step=torch.tensor(step), done=torch.tensor([done]),
                lengths=torch.tensor([step]), tokens=torch.full((1, L), 9), logprobs=torch.full((1, L), 7.0),
                positions=torch.tensor([40]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 64, 50])
@pytest.mark.parametrize("case", ["plain", "banned max", "tie", "eos", "done"])
def test_greedy_record(case, V, dtype, triton_cpu):
    gen, seed = fresh_generator()
    logits = torch.randn(1, V, generator=gen).mul(3).to(dtype)
    top = int(logits.float().argmax())
    banned = torch.tensor([3, V - 1]) if case != "banned max" else torch.tensor([top, 3, V - 1])
    if case == "tie":  # two equal maxima in different chunks: the first one wins, as torch.argmax
        logits[0, 1], logits[0, V - 2] = 50.0, 50.0
    x = logits.double().view(V)
    x[banned] = float("-inf")
    best = int(x.argmax())  # the first maximum
    logprob = float(x[best] - x.logsumexp(0))
    other = (best + 1) % V  # an eos id that is not the token
    eos = torch.tensor([other, best]) if case == "eos" else torch.tensor([other])
    state = greedy_state(L=6, step=2, done=case == "done")
    dl.greedy_record(logits, banned, eos, 0, **state)

    if case == "done":  # a finished row writes padding, log-prob 0, and stays finished
        token, logprob, length, done = 0, 0.0, 2, True
    else:
        token, length, done = best, 3, case == "eos"
    assert state["tokens"].tolist() == [[9, 9, token, 9, 9, 9]] and int(state["token"]) == token, f"seed {seed}"
    assert state["logprobs"][0, [0, 1, 3]].tolist() == [7.0] * 3
    assert abs(float(state["logprobs"][0, 2]) - logprob) <= 1e-5 * max(1.0, abs(logprob)), f"seed {seed}"
    assert int(state["lengths"]) == length and bool(state["done"]) == done
    assert int(state["step"]) == 3 and int(state["positions"]) == 41


def test_bad_shapes_are_named(triton_cpu):
    x, w = torch.randn(1, 1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="norm_matvec"):
        dl.norm_matvec(x, torch.ones(8), 1e-6, torch.randn(4, 6))
    with pytest.raises(ValueError, match="norm_matvec"):
        dl.norm_matvec(torch.randn(2, 1, 8), torch.ones(8), 1e-6, w)  # two rows
    with pytest.raises(ValueError, match="matvec_residual"):
        dl.matvec_residual(torch.randn(1, 1, 7), w, torch.randn(1, 1, 4))
    cache = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="attend"):  # two rows
        dl.attend(torch.randn(1, 1, 48), torch.ones(1, 1, 16), torch.ones(1, 1, 16), None, None, 1e-6,
                  torch.zeros(2, 1, 4, 16), torch.zeros(2, 1, 4, 16), torch.tensor([0]), torch.ones(1, 1, 1, 4) > 0)
    with pytest.raises(ValueError, match="attend"):  # a mask of the wrong length
        dl.attend(torch.randn(1, 1, 48), torch.ones(1, 1, 16), torch.ones(1, 1, 16), None, None, 1e-6, cache,
                  cache.clone(), torch.tensor([0]), torch.ones(1, 1, 1, 5) > 0)
    with pytest.raises(ValueError, match="head dim"):
        dl.attend(torch.randn(1, 1, 36), torch.ones(1, 1, 12), torch.ones(1, 1, 12), None, None, 1e-6,
                  torch.zeros(1, 1, 4, 12), torch.zeros(1, 1, 4, 12), torch.tensor([0]), torch.ones(1, 1, 1, 4) > 0)


def test_twins_agree(triton_cpu, monkeypatch):
    """The PyTorch twins that the CPU path runs give what the kernels give (float32)."""
    gen, seed = fresh_generator()
    D, O = 48, 24
    x, nw = torch.randn(1, 1, D, generator=gen), 1 + 0.1 * torch.randn(D, generator=gen)
    w, u, b = torch.randn(O, D, generator=gen), torch.randn(O, D, generator=gen), torch.randn(O, generator=gen)
    r = torch.randn(1, 1, O, generator=gen)
    got = [dl.norm_matvec(x, nw, 1e-6, w, b), dl.norm_matvec(x, nw, 1e-6, w, up_weight=u),
           dl.matvec_residual(x, w, r)]
    logits, banned, eos = torch.randn(1, 200, generator=gen), torch.tensor([4, 7]), torch.tensor([1])
    tails = [greedy_state(L=5, step=1, done=done) for done in (False, True)]
    for state in tails:
        dl.greedy_record(logits, banned, eos, 0, **state)
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    want = [dl.norm_matvec(x, nw, 1e-6, w, b), dl.norm_matvec(x, nw, 1e-6, w, up_weight=u),
            dl.matvec_residual(x, w, r)]
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, atol=1e-4, rtol=1e-5, msg=f"seed {seed}")
    for state, done in zip(tails, (False, True)):
        ref = greedy_state(L=5, step=1, done=done)
        dl.greedy_record(logits, banned, eos, 0, **ref)
        assert torch.allclose(ref["logprobs"], state["logprobs"], atol=1e-6)
        assert all(torch.equal(ref[k], state[k]) for k in ref if k != "logprobs"), f"seed {seed}, done {done}"
    table = torch.randn(20, 16, generator=gen)
    args = (torch.tensor([3]), torch.randn(10, 8, generator=gen), torch.tensor([6]), table, -table,
            torch.rand(1, 20, generator=gen) > 0.2)
    monkeypatch.setenv("MINIVL_KERNELS", "triton")
    got = dl.step_inputs(*args)
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    assert all(torch.equal(g, w) for g, w in zip(got, dl.step_inputs(*args)))


COMPILE_FOR_H100 = """
import kernels.decode.one_row as dl
for gated in (False, True):
    build(dl._norm_matvec_kernel, {n: bf for n in ("x_ptr", "nw_ptr", "w_ptr", "u_ptr", "b_ptr", "y_ptr")},
          dict(O="i32", D="i32", eps="fp32"),
          dict(BLOCK_N=2, BLOCK_K=512, FIRST_K=2048, GATED=gated, HAS_BIAS=not gated, PDL=True, WHOLE_ROW=gated))
build(dl._matvec_residual_kernel, {n: bf for n in ("a_ptr", "w_ptr", "r_ptr", "y_ptr")}, dict(O="i32", K="i32"),
      dict(BLOCK_N=2, BLOCK_K=1024, FIRST_K=4096, PDL=True))
for qk_norm in (False, True):
    pointers = {n: bf for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "qn_ptr", "kn_ptr", "kc_ptr", "vc_ptr")}
    pointers.update(slot_ptr="*i64", mask_ptr="*i1", part_ptr="*fp32", lse_ptr="*fp32")
    build(dl._attend_kernel, pointers, dict(S="i32", eps="fp32", qk_scale="fp32"),
          dict(H=16, K=2, G=8, GP=16, DH=128, BS=64, PER_SPLIT=2, NS=9, QK_NORM=qk_norm, F32=False, PDL=True))
build(dl._step_inputs_kernel, dict(token_ptr="*i64", embed_ptr=bf, slot_ptr="*i64", cos_t_ptr=bf, sin_t_ptr=bf,
      valid_ptr="*i1", x_ptr=bf, cos_ptr=bf, sin_ptr=bf, mask_ptr="*i1"), dict(D="i32", S="i32"),
      dict(BLOCK=1024, DH=128))
build(dl._greedy_chunks_kernel, dict(logits_ptr=bf, banned_ptr="*i64", max_ptr="*fp32", at_ptr="*i32"),
      dict(V="i32", NB="i32"), dict(BLOCK=1024, NBP=8, PDL=True))
build(dl._greedy_record_kernel, dict(max_ptr="*fp32", at_ptr="*i32", eos_ptr="*i64", token_ptr="*i64",
      step_ptr="*i64", done_ptr="*i1", lengths_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32",
      positions_ptr="*i64"), dict(C="i32", NE="i32", pad_id="i32"), dict(CP=256, NEP=2, PDL=True))
import kernels.decode.attention as da
build(da._merge_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr=bf), {},
      dict(H=16, G=8, DH=128, NS=9, NSP=16, PDL=True))
for skip, stages, ns in ((True, 1, 9), (False, 3, 9), (True, 1, 1), (False, 3, 1)):
    build(da._split_kernel, dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, mask_ptr="*i1", part_ptr="*fp32", lse_ptr="*fp32",
          out_ptr=bf), dict(S="i32", s_n="i32", s_k="i32", s_s="i32", qk_scale="fp32"),
          dict(K=2, G=8, GP=16, DH=128, BS=64, PER_SPLIT=4, NS=ns, F32=False, SKIP=skip, STAGES=stages, SCAN=1024))
"""


def test_kernels_compile_for_an_h100():
    """The interpreter runs what the GPU compiler rejects (a variable that changes dtype inside an `if` did, once):
    compile every decode kernel (these and attention.py's split kernel, whose range loop they share) for sm_90
    with bf16 arguments, the sampler's case, without a GPU."""
    compile_for_h100(COMPILE_FOR_H100)
