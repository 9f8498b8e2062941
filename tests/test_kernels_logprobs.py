"""Fused log-prob kernels (kernels/logprobs.py) against float64 math, on the CPU under the Triton interpreter.

Every test draws fresh random inputs from a generator seeded by os.urandom; the seed is in every failure
message so a failure can be replayed. Sizes are odd on purpose: vocabularies that are not a multiple of the
interpreter's tiles (BV = 32, BLOCK_V = 64), several vocab splits and backward chunks, one token, all targets
masked, temperatures 0.7 and 1.3, float32 and bfloat16 inputs.

Tolerances (what the dtype allows):
- log-probs / entropies are float32 outputs computed in float32 from the exact input values (bf16 inputs are
  upcast, bf16 x bf16 products are exact in float32), so both dtypes are held to float32 accuracy against
  float64 math: |err| <= 2e-5 + 2e-6 |ref| (logits / T up to ~30 and sums of ~200 exp terms, each rounded at
  2^-24 relative: errors of a few 1e-6).
- gradients come out in the input dtype. float32: rel. error <= 1e-4 (softmax recomputed as exp2 of base-2
  logits up to ~40 in size, each with ~40 * 2^-24 = 2.4e-6 of absolute error, then onehot - p cancels near
  p = 1: ~1e-5 seen). bfloat16: each element is rounded to bf16 once (2^-9 relative; the interpreter
  truncates instead of rounding: 2^-8), and the hidden gradient is a sum over the vocabulary of bf16-rounded
  dlogits, so we allow 1e-2 relative in norm and 2^-6 of the largest element anywhere. A wrong formula (sign, temperature, a missing term) misses these by orders of magnitude:
  `test_a_wrong_kernel_fails_the_checks` shows that the checks fail then.
Run: python -m pytest tests/test_kernels_logprobs.py -q
"""

import pytest
import torch

import kernels
from helpers import fresh_generator, import_interpreted

KL = import_interpreted("kernels.logprobs", "_rows_fwd_kernel")


def check(actual, expected, what, seed, dtype, kind):
    """kind 'logp': float32 outputs; kind 'grad': outputs in `dtype` (see the module docstring)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (seed {seed})"
    a, e = actual.double(), expected.double()
    if kind == "logp":
        bad = (a - e).abs() > 2e-5 + 2e-6 * e.abs()
        assert not bad.any(), f"{what}: max err {(a - e).abs().max():.3g} (seed {seed})"
        return
    rel_norm, rel_max = (1e-4, 1e-4) if dtype == torch.float32 else (1e-2, 2.0**-6)
    scale = e.abs().max().clamp_min(1e-30)
    err_norm = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    err_max = ((a - e).abs().max() / scale).item()
    assert err_norm <= rel_norm and err_max <= rel_max, \
        f"{what}: rel err {err_norm:.3g} (norm), {err_max:.3g} (max) (seed {seed})"


def make_targets(shape, V, g, masked):
    t = torch.randint(0, V, shape, generator=g)
    if masked == "all":
        t.fill_(-100)
    elif masked == "some":
        t[torch.rand(shape, generator=g) < 0.3] = -100
    return t


# float64 math, written independently of kernels.logprobs
def logprobs_f64(z, t, temperature):
    lsm = torch.log_softmax(z.double() / temperature, dim=-1)
    active = t != -100
    logp = lsm.gather(-1, torch.where(active, t, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    return torch.where(active, logp, 0.0), torch.where(active, entropy, 0.0)


CASES = {  # name: (leading shape, V, H, masking)
    "odd": ((2, 9), 203, 40, "some"),
    "single": ((1,), 131, 48, "none"),
    "all_masked": ((5,), 70, 24, "all"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_float64(triton_cpu, case, temperature, dtype):
    g, seed = fresh_generator()
    lead, V, _, masked = CASES[case]
    logits = (torch.randn(*lead, V, generator=g) * 4).to(dtype).requires_grad_(True)
    t = make_targets(lead, V, g, masked)
    upstream = torch.randn(lead, generator=g)

    logp = KL.token_logprobs(logits, t, temperature)
    (logp * upstream).sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref, _ = logprobs_f64(x64, t, temperature)
    (ref * upstream.double()).sum().backward()

    assert logp.shape == lead and logp.dtype == torch.float32
    assert (logp <= 0).all(), f"log-prob above 0 (seed {seed})"
    check(logp, ref, "logp", seed, dtype, "logp")
    assert logits.grad.dtype == dtype
    check(logits.grad, x64.grad, "dlogits", seed, dtype, "grad")
    assert (logp[t == -100] == 0).all() and (logits.grad[t == -100] == 0).all()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_matches_float64(triton_cpu, case, temperature, dtype):
    g, seed = fresh_generator()
    lead, V, H, masked = CASES[case]
    hidden = torch.randn(*lead, H, generator=g).to(dtype).requires_grad_(True)
    train_head = case != "odd"  # the usual case is a frozen head (LoRA): no weight gradient at all
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype).requires_grad_(train_head)
    t = make_targets(lead, V, g, masked)
    up_logp, up_ent = torch.randn(lead, generator=g), torch.randn(lead, generator=g)

    logp, ent = KL.linear_token_logprobs(hidden, weight, t, temperature, return_entropy=True)
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref_logp, ref_ent = logprobs_f64(h64 @ w64.t(), t, temperature)
    ((ref_logp * up_logp.double()).sum() + (ref_ent * up_ent.double()).sum()).backward()

    assert logp.shape == lead and logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert (logp <= 0).all(), f"log-prob above 0 (seed {seed})"
    check(logp, ref_logp, "logp", seed, dtype, "logp")
    check(ent, ref_ent, "entropy", seed, dtype, "logp")
    assert hidden.grad.dtype == dtype and hidden.grad.shape == hidden.shape
    check(hidden.grad, h64.grad, "dhidden", seed, dtype, "grad")
    if train_head:
        check(weight.grad, w64.grad, "dweight", seed, dtype, "grad")
    else:
        assert weight.grad is None
    assert (logp[t == -100] == 0).all() and (hidden.grad[t == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_token_logprobs_frozen_head(triton_cpu, dtype, entropy):
    # the GRPO/DPO hot path: a frozen head, hidden (B, T, H), gradient of logp only (the entropy, if asked
    # for, is logged): the forward takes d logp / d hidden across several chunks, backward scales its rows
    g, seed = fresh_generator()
    hidden = torch.randn(3, 7, 56, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(157, 56, generator=g) * 0.3).to(dtype)
    t = make_targets((3, 7), 157, g, "some")
    up = torch.randn(3, 7, generator=g)
    out = KL.linear_token_logprobs(hidden, weight, t, 1.3, return_entropy=entropy)
    logp = out[0] if entropy else out
    (logp * up).sum().backward()
    h64 = hidden.detach().double().requires_grad_(True)
    ref, ref_ent = logprobs_f64(h64 @ weight.double().t(), t, 1.3)
    (ref * up.double()).sum().backward()
    assert (logp <= 0).all()
    check(logp, ref, "logp", seed, dtype, "logp")
    if entropy:
        check(out[1], ref_ent, "entropy", seed, dtype, "logp")
    check(hidden.grad, h64.grad, "dhidden", seed, dtype, "grad")
    with torch.no_grad():  # the no-grad forward is the other kernel (no logits at all): same values
        check(KL.linear_token_logprobs(hidden, weight, t, 1.3), ref, "logp no-grad", seed, dtype, "logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_twins_match_float64(monkeypatch, dtype):
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    g, seed = fresh_generator()
    logits = (torch.randn(4, 6, 97, generator=g) * 4).to(dtype)
    hidden = torch.randn(4, 6, 32, generator=g).to(dtype)
    weight = (torch.randn(97, 32, generator=g) * 0.4).to(dtype)
    t = make_targets((4, 6), 97, g, "some")
    for T in (0.7, 1.3):
        ref, _ = logprobs_f64(logits, t, T)
        check(KL.token_logprobs_reference(logits, t, T), ref, "token ref", seed, dtype, "logp")
        check(KL.token_logprobs(logits, t, T), ref, "token dispatch", seed, dtype, "logp")
        ref, ref_ent = logprobs_f64(hidden.double() @ weight.double().t(), t, T)
        logp, ent = KL.linear_token_logprobs_reference(hidden, weight, t, T, return_entropy=True)
        check(logp, ref, "linear ref", seed, dtype, "logp")
        check(ent, ref_ent, "linear ref entropy", seed, dtype, "logp")
        assert logp.dtype == torch.float32 and (logp <= 0).all()


def test_logp_is_clamped_at_zero(triton_cpu):
    # one logit far above the rest: float32 rounding alone could give +1e-7 (verl #2656); we return exactly 0
    logits = torch.full((3, 100), -30.0)
    t = torch.tensor([5, 17, 99])
    logits[torch.arange(3), t] = 60.0
    for fn in (KL.token_logprobs, KL.token_logprobs_reference):
        logp = fn(logits, t, 1.0)
        assert (logp <= 0).all() and (logp > -1e-6).all()
    hidden = torch.eye(3, 16)  # token i reads feature i, and only its target row has that feature
    weight = torch.zeros(100, 16)
    weight[t, torch.arange(3)] = 80.0
    for fn in (KL.linear_token_logprobs, KL.linear_token_logprobs_reference):
        logp = fn(hidden, weight, t, 1.0)
        assert (logp <= 0).all() and (logp > -1e-6).all()


def test_a_wrong_kernel_fails_the_checks(triton_cpu):
    # the tolerances above must catch real mistakes: a 5% temperature error, a dropped entropy term
    g, seed = fresh_generator()
    logits = torch.randn(6, 203, generator=g) * 4
    hidden = torch.randn(6, 40, generator=g, requires_grad=True)
    weight = torch.randn(203, 40, generator=g) * 0.4
    t = make_targets((6,), 203, g, "none")
    ref, _ = logprobs_f64(logits, t, 1.0)
    with pytest.raises(AssertionError):
        check(KL.token_logprobs(logits, t, 1.05), ref, "logp", seed, torch.float32, "logp")
    logp, ent = KL.linear_token_logprobs(hidden, weight, t, 1.0, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    h64 = hidden.detach().double().requires_grad_(True)
    ref_logp, _ = logprobs_f64(h64 @ weight.double().t(), t, 1.0)
    ref_logp.sum().backward()  # gradient without the entropy term
    with pytest.raises(AssertionError):
        check(hidden.grad, h64.grad, "dhidden", seed, torch.bfloat16, "grad")


def test_dispatch(monkeypatch):
    logits = torch.randn(2, 10)
    t = torch.tensor([1, 2])
    monkeypatch.setenv("MINIVL_KERNELS", "bogus")
    with pytest.raises(ValueError):
        KL.token_logprobs(logits, t)
    monkeypatch.setenv("MINIVL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        KL.token_logprobs(logits, t)
    monkeypatch.delenv("MINIVL_KERNELS")
    monkeypatch.setattr(kernels, "_warned", False)
    with pytest.warns(UserWarning, match="reference"):
        KL.token_logprobs(logits, t)  # CPU tensors: the reference, with one warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KL.token_logprobs(logits, t)  # ... and only one


def test_kernels_package_is_ours_and_transformers_unaffected():
    # Hugging Face's hub `kernels` package has the same import name; check_ours() must say what to do
    import types
    assert kernels.check_ours() is kernels
    impostor = types.ModuleType("kernels")
    impostor.__file__ = "/site-packages/kernels/__init__.py"
    with pytest.raises(ImportError, match="pip uninstall kernels"):
        kernels.check_ours(impostor)
    # transformers decides from package metadata / kernels.__version__ whether hub kernels exist; ours must
    # not look like them, and a transformers Qwen model must still run with our package importable
    transformers = pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_kernels_available
    assert not is_kernels_available()
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 64, (1, 5))).logits
    assert out.shape == (1, 5, 64) and torch.isfinite(out).all()
