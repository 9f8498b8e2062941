"""kernels.decode_rows (the small ops of a several-row decode step) against float64 references, under
TRITON_INTERPRET=1, with the rounding points of the bf16 layer made explicit as in test_kernels_decode_layer.py."""
import pytest
import torch

from helpers import fresh_generator, import_interpreted

import_interpreted("kernels.decode_attention", "_split_kernel")  # first: the modules below import its functions
import_interpreted("kernels.decode_layer", "_norm_matvec_kernel")
dr = import_interpreted("kernels.decode_rows", "_add_norm_kernel")

from test_kernels_decode_layer import TOL, attention64, rms64, rnd, rotate64  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [100, 64])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_norm(with_delta, D, dtype, triton_cpu):
    gen, seed = fresh_generator()
    x = torch.randn(5, 1, D, generator=gen).mul(3).to(dtype)
    delta = torch.randn(5, 1, D, generator=gen).to(dtype) if with_delta else None
    nw = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype)
    before = x.clone()
    s, h = dr.add_norm(x, delta, nw, 1e-6)
    want_s = rnd(x.double() + delta.double(), dtype) if with_delta else x.double()
    assert s.shape == h.shape == x.shape and s.dtype == h.dtype == dtype
    assert torch.equal(s.double(), want_s) and torch.equal(x, before), f"seed {seed}"  # the sum is rounded once
    torch.testing.assert_close(h.double(), rms64(want_s, nw, 1e-6, dtype), **TOL[dtype], msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I", [100, 32, 7])  # several blocks of the interpreter's 32 and a partial one; one; less
def test_silu_mul(I, dtype, triton_cpu):
    gen, seed = fresh_generator()
    gate_up = torch.randn(3, 1, 2 * I, generator=gen).mul(3).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = rnd(rnd(torch.nn.functional.silu(gate), dtype) * up, dtype)
    got = dr.silu_mul(gate_up)
    assert got.shape == (3, 1, I) and got.dtype == dtype
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
        # bf16: as test_kernels_decode_layer.test_attend
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(out[n].double().view(H, Dh), want, **tol, msg=f"seed {seed}, row {n}")
        torch.testing.assert_close(k_cache[n, :, slot].double(), k64, **TOL[dtype], msg=f"seed {seed}, row {n}")
        assert torch.equal(v_cache[n, :, slot].double(), v64)
    others = [i for i in range(S) if i != slot]  # nothing else in the caches moved (NaN compared as equal)
    assert torch.equal(k_cache[:, :, others].nan_to_num(7), before[0][:, :, others].nan_to_num(7))
    assert torch.equal(v_cache[:, :, others].nan_to_num(7), before[1][:, :, others].nan_to_num(7))


def test_bad_shapes_are_named(triton_cpu):
    with pytest.raises(ValueError, match="add_norm"):
        dr.add_norm(torch.randn(2, 1, 8), torch.randn(2, 1, 6), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="silu_mul"):
        dr.silu_mul(torch.randn(2, 1, 7))
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
    gate_up = torch.randn(3, 1, 60, generator=gen)
    N, H, K, Dh, S = 3, 4, 2, 16, 30
    qkv, cos = torch.randn(N, 1, (H + 2 * K) * Dh, generator=gen), torch.randn(N, 1, Dh, generator=gen)
    caches = [torch.randn(N, K, S, Dh, generator=gen) for _ in range(2)]
    mask = torch.rand(N, 1, 1, S, generator=gen) > 0.3
    mask[..., 20] = True  # the new slot
    got = [*dr.add_norm(x, d, nw, 1e-6), dr.silu_mul(gate_up),
           dr.attend(qkv, cos, -cos, None, None, 0.0, *[c.clone() for c in caches], torch.tensor([20]), mask)]
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    want = [*dr.add_norm(x, d, nw, 1e-6), dr.silu_mul(gate_up),
            dr.attend(qkv, cos, -cos, None, None, 0.0, *[c.clone() for c in caches], torch.tensor([20]), mask)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=f"seed {seed}")


COMPILE_FOR_H100 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
import kernels.decode_rows as dr

def build(fn, pointers, scalars, constexprs):
    sig = dict(pointers, **scalars, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))

bf = "*bf16"
for has_delta in (False, True):
    build(dr._add_norm_kernel, {n: bf for n in ("x_ptr", "d_ptr", "nw_ptr", "out_ptr", "h_ptr")},
          dict(D="i32", eps="fp32"), dict(BLOCK=2048, HAS_DELTA=has_delta))
build(dr._silu_mul_kernel, dict(gu_ptr=bf, out_ptr=bf), dict(I="i32"), dict(BLOCK=1024))
for qk_norm, ns in ((False, 3), (True, 1)):
    pointers = {n: bf for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "qn_ptr", "kn_ptr", "kc_ptr", "vc_ptr", "out_ptr")}
    pointers.update(slot_ptr="*i64", mask_ptr="*i1", part_ptr="*fp32", lse_ptr="*fp32")
    build(dr._attend_rows_kernel, pointers, dict(S="i32", eps="fp32", qk_scale="fp32"),
          dict(H=16, K=2, G=8, GP=16, DH=128, BS=32, PER_SPLIT=9, NS=ns, QK_NORM=qk_norm, F32=False, STAGES=3,
               SCAN=1024))
print("compiled")
"""


def test_kernels_compile_for_an_h100():
    """The interpreter runs what the GPU compiler rejects: compile these kernels for sm_90 with bf16 arguments."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
