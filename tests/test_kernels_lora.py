"""Fused LoRA linear (kernels/lora.py) against float64 math, on the CPU under the Triton interpreter.

Fresh random inputs per test (generator seeded by os.urandom, seed in every failure message); odd sizes that
are not multiples of the interpreter's tiles (BM 16, BN 16/32, BK 16), ranks 4, 8, 16 and 20 (not a power of
two: the kernels pad the rank to RP), one token, leading shape (B, T, in), with and without bias, the
low-rank products computed inside the GEMM loop and outside it.

Tolerances: outputs and gradients are in the input dtype. float32: relative error <= 1e-5 in norm (sums of
<= 100 float32 products). bfloat16: each output is rounded to bf16 once (2^-9 relative; the interpreter
truncates: 2^-8) and so are the rank-r intermediates x A^T and dY B, as in PEFT; 1e-2 relative in norm and
2^-5 of the largest element anywhere. `test_a_wrong_kernel_fails_the_checks` shows the checks catch a
wrong scale, a dropped term or a transposed B.
Run: python -m pytest tests/test_kernels_lora.py -q
"""

import pytest
import torch

from helpers import fresh_generator, import_interpreted

KL = import_interpreted("kernels.lora", "_lora_fwd_kernel")


def check(actual, expected, what, seed, dtype):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (seed {seed})"
    a, e = actual.double(), expected.double()
    rel_norm, rel_max = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2.0**-5)
    err_norm = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    err_max = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
    assert err_norm <= rel_norm and err_max <= rel_max, \
        f"{what}: rel err {err_norm:.3g} (norm), {err_max:.3g} (max) (seed {seed})"


def make(lead, d_in, d_out, r, bias, dtype, g):
    x = torch.randn(*lead, d_in, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)       # frozen
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype).requires_grad_(True)
    lb = torch.randn(d_out, r, generator=g).to(dtype).requires_grad_(True)  # non-zero, unlike a fresh LoRA
    return x, w, b, a, lb


def float64_grads(x, w, b, a, lb, scale, up):
    # PEFT's formula in float64 on the same (rounded) input values
    x64, a64, lb64 = (t.detach().double().requires_grad_(True) for t in (x, a, lb))
    y = x64 @ w.double().t() + scale * (x64 @ a64.t()) @ lb64.t()
    if b is not None:
        y = y + b.double()
    (y * up.double()).sum().backward()
    return y.detach(), x64.grad, a64.grad, lb64.grad


SHAPES = {  # name: (leading shape, in, out, r, bias)
    "odd": ((37,), 40, 72, 8, True),
    "rank20_3d": ((2, 11), 64, 48, 20, False),
    "single_token": ((1,), 48, 40, 16, True),
    "wide_out": ((23,), 24, 100, 4, False),
    "narrow_out": ((29,), 40, 16, 8, True),  # one column block, like the k/v projections
}


@pytest.mark.parametrize("in_loop", [None, True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_matches_float64(triton_cpu, monkeypatch, dtype, shape, in_loop):
    monkeypatch.setitem(KL.INTERPRET_CONFIG, "in_loop", in_loop)
    g, seed = fresh_generator()
    lead, d_in, d_out, r, bias = SHAPES[shape]
    x, w, b, a, lb = make(lead, d_in, d_out, r, bias, dtype, g)
    scale = 2.0 if r != 16 else 0.5
    up = torch.randn(*lead, d_out, generator=g)
    y = KL.lora_linear(x, w, b, a, lb, scale)
    (y * up).sum().backward()
    y64, dx64, da64, db64 = float64_grads(x, w, b, a, lb, scale, up)
    assert y.shape == (*lead, d_out)
    check(y, y64, "y", seed, dtype)
    check(x.grad, dx64, "dx", seed, dtype)
    check(a.grad, da64, "dA", seed, dtype)
    check(lb.grad, db64, "dB", seed, dtype)
    assert not w.requires_grad and w.grad is None


@pytest.mark.parametrize("shape", ["odd", "narrow_out"])
def test_lora_linear_db_by_cublas(triton_cpu, monkeypatch, shape):
    # the variant that leaves dB to one more GEMM instead of the dX kernel's first column block
    monkeypatch.setitem(KL.INTERPRET_CONFIG, "db_in_loop", False)
    g, seed = fresh_generator()
    lead, d_in, d_out, r, bias = SHAPES[shape]
    x, w, b, a, lb = make(lead, d_in, d_out, r, bias, torch.bfloat16, g)
    up = torch.randn(*lead, d_out, generator=g)
    (KL.lora_linear(x, w, b, a, lb, 2.0) * up).sum().backward()
    _, dx64, da64, db64 = float64_grads(x, w, b, a, lb, 2.0, up)
    check(x.grad, dx64, "dx", seed, torch.bfloat16)
    check(a.grad, da64, "dA", seed, torch.bfloat16)
    check(lb.grad, db64, "dB", seed, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addmm_path_and_reference_match_float64(monkeypatch, dtype):
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    g, seed = fresh_generator()
    x, w, b, a, lb = make((3, 9), 40, 56, 8, True, dtype, g)
    up = torch.randn(3, 9, 56, generator=g)
    y64, dx64, da64, db64 = float64_grads(x, w, b, a, lb, 1.5, up)
    for fn in (KL.lora_linear_reference, KL.lora_linear_addmm, KL.lora_linear):
        x.grad = a.grad = lb.grad = None
        y = fn(x, w, b, a, lb, 1.5)
        (y * up).sum().backward()
        name = fn.__name__
        check(y, y64, f"{name} y", seed, dtype)
        check(x.grad, dx64, f"{name} dx", seed, dtype)
        check(a.grad, da64, f"{name} dA", seed, dtype)
        check(lb.grad, db64, f"{name} dB", seed, dtype)


def test_float32_lora_weights_on_a_bf16_base(triton_cpu):
    # LoRA weights are often kept in float32 while the frozen base is bf16; both paths accept that
    g, seed = fresh_generator()
    x, w, b, a, lb = make((17,), 32, 48, 8, True, torch.bfloat16, g)
    a32, lb32 = (t.detach().float().requires_grad_(True) for t in (a, lb))
    up = torch.randn(17, 48, generator=g)
    _, dx64, da64, db64 = float64_grads(x, w, b, a, lb, 2.0, up)
    for fn in (KL.lora_linear, KL.lora_linear_addmm):
        x.grad = a32.grad = lb32.grad = None
        (fn(x, w, b, a32, lb32, 2.0) * up).sum().backward()
        check(x.grad, dx64, f"{fn.__name__} dx", seed, torch.bfloat16)
        assert a32.grad.dtype == lb32.grad.dtype == torch.float32
        check(a32.grad.bfloat16(), da64, f"{fn.__name__} dA", seed, torch.bfloat16)
        check(lb32.grad.bfloat16(), db64, f"{fn.__name__} dB", seed, torch.bfloat16)


def test_trainable_base_gets_gradients(triton_cpu):
    # W and b are frozen under LoRA; if a caller unfreezes them they still get correct gradients
    g, seed = fresh_generator()
    x, w, b, a, lb = make((19,), 32, 40, 8, True, torch.float32, g)
    w.requires_grad_(True)
    b.requires_grad_(True)
    up = torch.randn(19, 40, generator=g)
    (KL.lora_linear(x, w, b, a, lb, 1.0) * up).sum().backward()
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    x64, a64, lb64 = (t.detach().double() for t in (x, a, lb))
    y = x64 @ w64.t() + b64 + (x64 @ a64.t()) @ lb64.t()
    (y * up.double()).sum().backward()
    check(w.grad, w64.grad, "dW", seed, torch.float32)
    check(b.grad, b64.grad, "db", seed, torch.float32)


def test_reference_is_peft():
    peft = pytest.importorskip("peft")
    g, seed = fresh_generator()
    base = torch.nn.Sequential(torch.nn.Linear(24, 40))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=32, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, generator=g)  # PEFT starts B at zero
    x = torch.randn(5, 24, generator=g)
    ours = KL.lora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias,
                                    layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                    layer.scaling["default"])
    torch.testing.assert_close(ours, model(x), msg=f"seed {seed}")


def test_a_wrong_kernel_fails_the_checks(triton_cpu):
    g, seed = fresh_generator()
    x, w, b, a, lb = make((21,), 40, 72, 8, True, torch.bfloat16, g)
    up = torch.randn(21, 72, generator=g)
    y = KL.lora_linear(x, w, b, a, lb, 2.0)
    (y * up).sum().backward()
    y64, dx64, da64, db64 = float64_grads(x, w, b, a, lb, 2.2, up)   # 10% off in scale
    with pytest.raises(AssertionError):
        check(y, y64, "y", seed, torch.bfloat16)
    y64, dx64, da64, db64 = float64_grads(x, w, b, a, lb, 2.0, up)
    with pytest.raises(AssertionError):  # dx without the low-rank term
        check(x.grad, (up.double() @ w.double()), "dx", seed, torch.bfloat16)
    with pytest.raises(AssertionError):  # dB built from the wrong side
        check(lb.grad, db64.flip(0), "dB", seed, torch.bfloat16)
