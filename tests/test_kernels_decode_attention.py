"""kernels.decode.attention (split-KV decode attention) against a float64 reference, under TRITON_INTERPRET=1."""
import itertools
import pytest
import torch

from helpers import fresh_generator, import_interpreted

# first: Triton's own helpers (tl.zeros...) must also be decorated under TRITON_INTERPRET=1 when triton is imported
da = import_interpreted("kernels.decode.attention", "_split_kernel")


def reference64(q, k, v, mask):
    N, H, _, Dh = q.shape
    K = k.shape[1]
    scores = q.double().view(N, K, H // K, Dh) @ k.double().transpose(-1, -2) * Dh**-0.5  # (N, K, G, S)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v.double()).view(N, H, 1, Dh)


def decode_mask(N, S, slot, pad, gen):
    """Rows see slots 0..slot except their left padding (pad[n] slots); slots after `slot` are unwritten."""
    valid = torch.arange(S)[None, :] >= torch.tensor(pad)[:, None]
    valid &= torch.arange(S)[None, :] <= slot
    return valid.view(N, 1, 1, S)


# (N, H, K, S, slot, left padding per row): G = 1, 2, 3 (padded to 16), 8; S not a multiple of the block;
# a row whose padding covers whole blocks; a single readable slot; a full cache; N * K >= the interpreter's
# 8 programs: one range each, written without the merge
CASES = [(1, 4, 2, 37, 20, [0]), (2, 8, 2, 70, 69, [0, 33]), (3, 6, 2, 50, 5, [0, 5, 2]),
         (1, 8, 1, 100, 64, [40]), (2, 2, 2, 16, 0, [0, 0]), (2, 4, 4, 33, 32, [1, 0]),
         (4, 8, 2, 70, 50, [0, 17, 33, 3])]


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "bounded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64(case, dtype, skip, triton_cpu, monkeypatch):
    """Both block loops: dead blocks branched over, or outside the bounds a scan of the mask found (32 slots at a
    time in the interpreter: ranges of several scans)."""
    monkeypatch.setitem(da.INTERPRET_CONFIG, "skip", skip)
    N, H, K, S, slot, pad = case
    gen, seed = fresh_generator()
    Dh = 16
    q = torch.randn(N, H, 1, Dh, generator=gen).to(dtype)
    k = torch.randn(N, K, S, Dh, generator=gen).mul(2).to(dtype)  # larger scores: a peaked softmax
    v = torch.randn(N, K, S, Dh, generator=gen).to(dtype)
    # the unwritten tail holds garbage: the kernel must never read it (a NaN there would show)
    k[:, :, slot + 1:], v[:, :, slot + 1:] = float("nan"), float("nan")
    mask = decode_mask(N, S, slot, pad, gen)
    k[~mask.view(N, 1, S).expand(N, K, S)] = float("nan")  # left padding too
    got = da.decode_attention(q, k, v, mask)
    want = reference64(q, k.nan_to_num(), v.nan_to_num(), mask)
    assert got.dtype == dtype and got.shape == (N, H, 1, Dh)
    # float32: IEEE dots, errors ~1e-6. bf16: the output is rounded to bf16 (2^-9 relative) and p to bf16 in
    # the p.v dot (2^-9 relative per term); |out| <= ~3, so 2e-2 absolute covers both with margin.
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{m}\nseed {seed}")


def test_several_ranges_are_merged(triton_cpu):
    """More slots than one program's range: the merge of partial results must weight them by their mass."""
    N, H, K, S, Dh = 1, 4, 2, 200, 32
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(N, H, 1, Dh, generator=gen), torch.randn(N, K, S, Dh, generator=gen), torch.randn(
        N, K, S, Dh, generator=gen)
    k[:, :, 150] = q[0].view(K, 2, Dh).sum(1) * 3  # one slot far heavier than the rest: one range dominates
    mask = torch.ones(N, 1, 1, S, dtype=torch.bool)
    cfg = da.INTERPRET_CONFIG
    assert -(-S // cfg["BS"]) > 1 and N * K < cfg["programs"]  # so the slots are cut into several ranges
    torch.testing.assert_close(da.decode_attention(q, k, v, mask).double(), reference64(q, k, v, mask),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [3, 4], ids=["merged", "one-range"])  # N * K below / at the interpreter's 8 programs
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "bounded"])
def test_mask_with_holes(skip, N, triton_cpu, monkeypatch):
    """Any bool mask, not only the sampler's one readable stretch per row: whole dead blocks between live ones, a
    row whose only live slot is the last, a row with none (its output is 0)."""
    monkeypatch.setitem(da.INTERPRET_CONFIG, "skip", skip)
    H, K, S, Dh = 4, 2, 90, 16
    gen, seed = fresh_generator()
    q, k, v = (torch.randn(N, H, 1, Dh, generator=gen), torch.randn(N, K, S, Dh, generator=gen),
               torch.randn(N, K, S, Dh, generator=gen))
    mask = torch.rand(N, 1, 1, S, generator=gen) < 0.3
    mask[0, ..., 20:60] = False  # 16-slot blocks with nothing readable, between readable ones
    mask[1], mask[2] = False, False
    mask[1, ..., S - 1] = True
    got = da.decode_attention(q, k, v, mask)
    want = reference64(q, k, v, mask)
    say = lambda m: f"{m}\nseed {seed}"  # noqa: E731
    torch.testing.assert_close(got[:2].double(), want[:2], atol=2e-5, rtol=1e-5, msg=say)
    torch.testing.assert_close(got[3:].double(), want[3:], atol=2e-5, rtol=1e-5, msg=say)
    assert torch.equal(got[2], torch.zeros_like(got[2])), seed


def test_reference_twin_and_bad_shapes(triton_cpu, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 2, 24, 16, generator=gen), torch.randn(
        2, 2, 24, 16, generator=gen)
    mask = decode_mask(2, 24, 17, [0, 3], gen)
    monkeypatch.setenv("MINIVL_KERNELS", "reference")
    torch.testing.assert_close(da.decode_attention(q, k, v, mask).double(), reference64(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("MINIVL_KERNELS", "triton")
    with pytest.raises(ValueError, match="decode_attention"):
        da.decode_attention(q, k[:, :, :20], v, mask)  # k and v of different lengths
    with pytest.raises(ValueError, match="decode_attention"):
        da.decode_attention(torch.randn(2, 3, 1, 16), k, v, mask)  # 3 query heads over 2 key/value heads


@pytest.mark.parametrize("cfg", ["CONFIG", "INTERPRET_CONFIG"])
def test_ranges_cover_the_slots_once(cfg):
    """attention.ranges: every slot in exactly one range, no empty range; about cfg["programs"] programs, one
    range per pair once the pairs reach that; the wider blocks only while the pairs are no more than that."""
    cfg = getattr(da, cfg)
    for pairs in (1, 2, 7, cfg["programs"], cfg["programs"] + 1, 4 * cfg["programs"]):
        for S, itemsize in itertools.product((1, 15, 16, 100, 848, 5000), (2, 4)):
            BS, per, NS = da.ranges(pairs, S, cfg, itemsize)
            assert BS == (cfg["BS"] if pairs > cfg["programs"] else max(cfg["BS"], cfg["BS_few"] * 2 // itemsize))
            assert (NS - 1) * per * BS < S <= NS * per * BS, (pairs, S)
            assert NS == 1 or pairs * NS <= cfg["programs"] + pairs, (pairs, S)  # no more ranges than asked for
            if pairs >= cfg["programs"]:
                assert NS == 1
