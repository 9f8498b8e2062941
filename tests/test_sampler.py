"""The KV-cache sampler (minivl/sampler.py) on tiny transformers checkpoints, float32, on the CPU.

Greedy answers equal transformers' `generate`; the logits of every cached decode step equal a full forward over
the whole sequence; the returned log-probs are those of the support distribution the tokens were drawn from;
n answers per prompt share one vision pass; top-k, top-p, eos, seeds and banned vision tokens behave. The first
two hold for every build of the decode step (sampler.DecodeOptions); fused weights skip LoRA layers and follow
weight updates between calls.
Prompts are built by hand (vision blocks of the right length between random text), left-padded.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import minivl
from helpers import IDS, import_interpreted, left_pad, mm_token_type_ids, pixels, qwen3_video_tokens, save_hf, text, vision_block
from minivl import sampler

import_interpreted("kernels.decode_attention", "_split_kernel")  # before anything imports triton (helpers.py)
import_interpreted("kernels.decode_layer", "_norm_matvec_kernel")
import_interpreted("kernels.decode_rows", "_add_norm_kernel")
import_interpreted("kernels.lora", "_lora_fwd_kernel")  # the LoRA layers of a test run through it too
BANNED = [IDS["vision_start_token_id"], IDS["vision_end_token_id"], IDS["image_token_id"], IDS["video_token_id"]]
TOL = 1e-4
FUSE = ("qkv", "gate_up")
DECODE = {"sdpa": sampler.DecodeOptions(attention="sdpa", fuse=(), coordinate_descent=False, layer="compiled"),
          "math": sampler.DecodeOptions(attention="math", fuse=(), coordinate_descent=False, layer="compiled"),
          "fused": sampler.DecodeOptions(attention="sdpa", fuse=FUSE, coordinate_descent=False, layer="compiled"),
          "all": sampler.DecodeOptions(attention="math", fuse=FUSE, coordinate_descent=True, layer="compiled"),
          "triton": sampler.DecodeOptions(attention="triton", fuse=FUSE, coordinate_descent=False, layer="compiled"),
          "rows": sampler.DecodeOptions(coordinate_descent=False, layer="kernels")}  # q/k/v fused whatever `fuse` says


def use_decode(name, monkeypatch):
    """DECODE[name]; the split-KV attention kernel and the row kernels run on the CPU through Triton's interpreter."""
    if DECODE[name].attention == "triton" or DECODE[name].layer == "kernels":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("MINIVL_KERNELS", "triton")
    return DECODE[name]


def make_batch(family, repeat=1):
    """Three prompts of different lengths: text + image + text, text + video + text, short text only.
    repeat > 1 repeats each prompt (and its pixels) in place, as the sampler orders its n answers."""
    image, video = (1, 8, 8), (2, 4, 8)
    vtokens = qwen3_video_tokens(video) if family.startswith("qwen3") else vision_block(video, video=True)
    rows = [text(4, 1) + vision_block(image) + text(6, 2), text(2, 3) + vtokens + text(3, 4), text(5, 5)]
    pv, thw = pixels(family, [image])
    pvv, vthw = pixels(family, [video], seed=1)
    rows = [r for r in rows for _ in range(repeat)]
    ids, mask = left_pad(rows)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv.repeat(repeat, 1), image_grid_thw=thw.repeat(
        repeat, 1), pixel_values_videos=pvv.repeat(repeat, 1), video_grid_thw=vthw.repeat(repeat, 1))
    if family == "qwen2_5_vl":
        batch["second_per_grid_ts"] = torch.ones(repeat)  # whole seconds: transformers 5 agrees (rope.py)
    return batch


def hf_generate(hf, batch, max_new_tokens, **kw):
    with torch.no_grad():
        out = hf.generate(**batch, mm_token_type_ids=mm_token_type_ids(batch["input_ids"]), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=0, suppress_tokens=BANNED, **kw)
    return out[:, batch["input_ids"].shape[1]:]


def full_logits(model, batch, tokens, repeat):
    """Logits (N, L, V) predicting each generated token, from one forward over prompt + answer."""
    full = make_batch(batch["family"], repeat)
    del full["input_ids"], full["attention_mask"]
    ids = torch.cat([batch["input_ids"].repeat_interleave(repeat, 0), tokens], dim=1)
    mask = torch.cat([batch["attention_mask"].repeat_interleave(repeat, 0), torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **full)
    T0 = batch["input_ids"].shape[1]
    return logits[:, T0 - 1 : -1].float()


@pytest.mark.parametrize("decode", DECODE)
def test_greedy_equals_transformers(pair, decode, monkeypatch):
    family, hf, ours = pair
    batch = make_batch(family)
    out = minivl.generate(ours, batch, max_new_tokens=12, temperature=0.0, decode=use_decode(decode, monkeypatch))
    assert torch.equal(out.tokens, hf_generate(hf, batch, 12))
    assert out.lengths.tolist() == [12, 12, 12] and out.truncated.all()
    assert out.logprobs.dtype == torch.float32 and (out.logprobs <= 0).all()


@pytest.mark.parametrize("decode", DECODE)
def test_cached_logits_equal_full_forward(pair, decode, monkeypatch):
    # sampled answers, two per prompt: every step's logits against one forward over the whole sequence
    family, hf, ours = pair
    batch, n, steps = make_batch(family), 2, 7
    s = sampler.Sampling(temperature=0.9, top_k=40, top_p=0.95)
    with torch.no_grad():
        state = sampler.prefill(ours, batch, n, steps, s, eos=[], pad_id=0, seed=5,
                                decode=use_decode(decode, monkeypatch))
        logits = [state.logits.clone()]
        for _ in range(steps - 1):
            sampler.decode_step(ours, state, s)
            logits.append(state.logits.clone())
    ref = full_logits(ours, dict(batch, family=family), state.tokens, n)
    assert (torch.stack(logits, dim=1) - ref).abs().max() <= TOL


def reference_logprob(logits, token, temperature, top_k, top_p):
    """log p(token) for one row (V,), the support written out token by token."""
    x = logits / temperature
    x[BANNED] = float("-inf")
    x[x < x.sort(descending=True).values[top_k - 1]] = float("-inf")  # top-k, ties with the k-th kept
    probs = x.softmax(-1)
    keep, mass = [], 0.0
    for i in probs.argsort(descending=True).tolist():  # top-p: the most likely until their mass reaches top_p
        if mass >= top_p:
            break
        keep.append(i)
        mass += float(probs[i])
    assert token in keep, "a token was drawn from outside the support"
    y = torch.full_like(x, float("-inf"))
    y[keep] = x[keep]
    return y.log_softmax(-1)[token]


def test_logprobs_are_those_of_the_support(pair):
    family, hf, ours = pair
    batch, n = make_batch(family), 2
    out = minivl.generate(ours, batch, max_new_tokens=6, temperature=0.7, top_k=30, top_p=0.8,
                          num_return_sequences=n, seed=3)
    ref = full_logits(ours, dict(batch, family=family), out.tokens, n)
    for r in range(out.tokens.shape[0]):
        for i in range(out.tokens.shape[1]):
            expected = reference_logprob(ref[r, i], int(out.tokens[r, i]), 0.7, 30, 0.8)
            assert abs(out.logprobs[r, i] - expected) <= TOL


def test_return_sequences_share_one_vision_pass(pair, monkeypatch):
    family, hf, ours = pair
    batch = make_batch(family)
    calls = []
    forward = type(ours.model.visual).forward

    def counted(self, pixels, *args, **kw):
        calls.append(pixels.shape[0])
        return forward(self, pixels, *args, **kw)

    monkeypatch.setattr(type(ours.model.visual), "forward", counted)
    greedy = minivl.generate(ours, batch, max_new_tokens=5, temperature=0.0, num_return_sequences=4)
    assert calls == [batch["pixel_values"].shape[0], batch["pixel_values_videos"].shape[0]]  # images, videos
    one = minivl.generate(ours, batch, max_new_tokens=5, temperature=0.0)
    assert torch.equal(greedy.tokens, one.tokens.repeat_interleave(4, 0))  # the copied cache rows are right
    sampled = minivl.generate(ours, batch, max_new_tokens=5, temperature=1.0, num_return_sequences=4, seed=0)
    assert len({tuple(t) for t in sampled.tokens[:4].tolist()}) > 1


def test_fused_weights_skip_lora_and_follow_updates(pair):
    from minivl import lora

    family, hf, ours = pair
    model, batch, fused = copy.deepcopy(ours), make_batch(family), DECODE["fused"]  # a copy: this test changes it

    def greedy(decode=None):
        return minivl.generate(model, batch, max_new_tokens=8, temperature=0.0, decode=decode).tokens

    state = sampler.prefill(model, batch, 1, 2, sampler.Sampling(0.0), [], 0, 0, decode=fused)
    assert all(f.qkv is not None and (f.gate_up is None) == (family == "qwen3_vl_moe") for f in state.fused)
    assert (state.fused[0].qkv_bias is None) == family.startswith("qwen3")
    with torch.no_grad():
        model.model.language_model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # a trainer's update between calls
    before = greedy()
    assert torch.equal(greedy(fused), before)
    torch.manual_seed(0)
    names = [n for n in lora.select_linear(model) if ".layers.0." in n]
    lora.inject(model, names, r=4, alpha=8, init_weights=False)  # B random too: the adapter changes the answers
    state = sampler.prefill(model, batch, 1, 2, sampler.Sampling(0.0), [], 0, 0, decode=fused)
    assert all(t is None for t in state.fused[0]) and state.fused[1].qkv is not None  # layer 0 has LoRA
    adapted = greedy()
    assert not torch.equal(adapted, before) and torch.equal(greedy(fused), adapted)


def lora_layer_falls_back(ours, batch, layer, decode, **kw):
    """Generate with a LoRA adapter on decoder layer `layer` of a copy of the model, through `decode` (whose kernel
    layers cannot take that layer): the tokens equal the compiled SDPA layer's."""
    from minivl import lora

    model = copy.deepcopy(ours)
    torch.manual_seed(0)
    lora.inject(model, [n for n in lora.select_linear(model) if f".layers.{layer}." in n], r=4, alpha=8,
                init_weights=False)
    adapted = minivl.generate(model, batch, decode=decode, **kw)
    assert torch.equal(adapted.tokens, minivl.generate(model, batch, decode=DECODE["sdpa"], **kw).tokens)


def test_kernel_layers_on_one_row(pair, monkeypatch):
    """DecodeOptions(layer="kernels"): a one-row step runs each plain layer as kernels/decode_layer.py's kernels
    (Triton's interpreter here). Greedy tokens equal transformers', every step's logits equal a full forward, a
    layer with a LoRA adapter falls back to the compiled layer function."""
    family, hf, ours = pair
    image = (1, 8, 8)
    ids, mask = left_pad([text(4, 1) + vision_block(image) + text(6, 2)])
    pv, thw = pixels(family, [image])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    decode = sampler.DecodeOptions(fuse=(), coordinate_descent=False, layer="kernels")  # q/k/v fused all the same
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MINIVL_KERNELS", "triton")
    calls, heads, ends = [], [], []
    run, head = sampler.run_layer_kernels, sampler.head_logits_kernel
    begin, tail = sampler.step_inputs_kernel, sampler.greedy_record_kernel
    monkeypatch.setattr(sampler, "run_layer_kernels", lambda *a: calls.append(1) or run(*a))
    monkeypatch.setattr(sampler, "head_logits_kernel", lambda *a: heads.append(1) or head(*a))
    monkeypatch.setattr(sampler, "step_inputs_kernel", lambda *a: ends.append("inputs") or begin(*a))
    monkeypatch.setattr(sampler, "greedy_record_kernel", lambda *a: ends.append("greedy") or tail(*a))
    steps, layers = 10, len(ours.model.language_model.layers)
    out = minivl.generate(ours, batch, max_new_tokens=steps, temperature=0.0, decode=decode)
    assert torch.equal(out.tokens, hf_generate(hf, batch, steps))
    assert len(calls) == (0 if family == "qwen3_vl_moe" else layers * (steps - 1))  # MoE layers: compiled path
    assert len(heads) == steps - 1  # the final norm + lm_head through the kernel at every decode step
    assert ends == ["inputs", "greedy"] * (steps - 1)  # and the step's inputs and greedy tail
    with torch.no_grad():
        full = ours(torch.cat([ids, out.tokens], 1), attention_mask=torch.cat([mask, torch.ones_like(out.tokens)], 1),
                    pixel_values=pv, image_grid_thw=thw)[0, ids.shape[1] - 1 : -1].float()  # (steps, V)
    full[:, BANNED] = float("-inf")
    want = full.log_softmax(-1).gather(1, out.tokens[0][:, None])[:, 0]
    assert (out.logprobs[0] - want).abs().max() <= TOL  # the greedy tail's log-probs are the model's
    eos = int(out.tokens[0, 3])
    first = out.tokens[0].tolist().index(eos)
    ended = minivl.generate(ours, batch, max_new_tokens=steps, temperature=0.0, decode=decode, eos_token_id=eos)
    assert ended.tokens[0].tolist() == out.tokens[0, : first + 1].tolist() and int(ended.lengths[0]) == first + 1
    assert not ended.truncated[0]

    s = sampler.Sampling(temperature=0.9)
    with torch.no_grad():
        state = sampler.prefill(ours, batch, 1, steps, s, eos=[], pad_id=0, seed=2, decode=decode)
        logits = [state.logits.clone()]
        for _ in range(steps - 1):
            sampler.decode_step(ours, state, s)
            logits.append(state.logits.clone())
        full = ours(torch.cat([ids, state.tokens], 1), attention_mask=torch.cat(
            [mask, torch.ones_like(state.tokens)], 1), pixel_values=pv, image_grid_thw=thw)
    assert (torch.stack(logits, 1) - full[:, ids.shape[1] - 1 : -1].float()).abs().max() <= TOL

    if family != "qwen3_vl_moe":
        calls.clear()
        lora_layer_falls_back(ours, batch, 0, decode, max_new_tokens=steps, temperature=0.0)
        assert len(calls) == (layers - 1) * (steps - 1)  # layer 0 has LoRA


def test_row_kernels_on_several_rows(pair, monkeypatch):
    """DecodeOptions(layer="kernels") with several rows: each plain layer runs as run_layer_rows (cuBLAS's q/k/v product
    and kernels/decode_rows.py's launches; Triton's interpreter here). Sampled tokens and log-probs equal the compiled
    layer's, and a layer with a LoRA adapter falls back to the compiled layer function."""
    family, hf, ours = pair
    batch, n, steps, layers = make_batch(family), 2, 6, len(ours.model.language_model.layers)
    decode = use_decode("rows", monkeypatch)
    calls, tails = [], []
    run, tail = sampler.run_layer_rows, sampler.sample_record_kernel
    monkeypatch.setattr(sampler, "run_layer_rows", lambda *a: calls.append(1) or run(*a))
    monkeypatch.setattr(sampler, "sample_record_kernel", lambda *a: tails.append(1) or tail(*a))
    kw = dict(max_new_tokens=steps, temperature=0.9, num_return_sequences=n, seed=3)
    for top_k, kernel_tails in ((50, 0), (0, steps - 1)):  # top-k: the compiled tail; else the sampling kernels
        tails.clear()
        out = minivl.generate(ours, batch, decode=decode, top_k=top_k, **kw)
        ref = minivl.generate(ours, batch, decode=DECODE["fused"], top_k=top_k, **kw)
        assert torch.equal(out.tokens, ref.tokens) and (out.logprobs - ref.logprobs).abs().max() <= TOL
        assert len(tails) == (0 if family == "qwen3_vl_moe" else kernel_tails)
    assert len(calls) == (0 if family == "qwen3_vl_moe" else 2 * layers * (steps - 1))  # MoE layers: compiled path
    with torch.no_grad():  # the row kernels read gate and up where they are: no fused copy of them for the call
        state = sampler.prefill(ours, batch, n, steps, sampler.Sampling(0.9), [], 0, 3, decode=decode)
    assert all(f.gate_up is None and f.qkv is not None for f in state.fused)
    eos = int(out.tokens[0, 2])  # rows that draw it end there, and pad after, as in the compiled tail
    ended = minivl.generate(ours, batch, decode=decode, eos_token_id=eos, **kw)
    ref = minivl.generate(ours, batch, decode=DECODE["fused"], eos_token_id=eos, **kw)
    assert torch.equal(ended.tokens, ref.tokens) and torch.equal(ended.lengths, ref.lengths)
    assert torch.equal(ended.truncated, ref.truncated) and int(ended.lengths[0]) <= 3 and not ended.truncated[0]
    if family != "qwen3_vl_moe":
        calls.clear()
        lora_layer_falls_back(ours, batch, 1, decode, **kw)
        assert len(calls) == (layers - 1) * (steps - 1)  # layer 1 has LoRA: the one before hands it x + delta


def test_decode_options_are_checked():
    with pytest.raises(ValueError):
        sampler.DecodeOptions(attention="flash")
    with pytest.raises(ValueError):
        sampler.DecodeOptions(fuse=("qkv", "o"))
    with pytest.raises(ValueError):
        sampler.DecodeOptions(layer="eager")
    # "auto" (the default) writes attention out for a single row only: at 64 rows SDPA was 1.9x faster; several
    # rows on CUDA take the split-KV kernel, which skips the cache's unwritten slots
    from types import SimpleNamespace

    from kernels.decode_attention import decode_attention as split_kv
    auto = sampler.DecodeOptions()
    one, two = torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    assert auto.attention_fn(one) is sampler.decode_attention and auto.attention_fn(two) is sampler.attention
    cuda_rows, cuda_row = SimpleNamespace(shape=(64,), is_cuda=True), SimpleNamespace(shape=(1,), is_cuda=True)
    assert auto.attention_fn(cuda_rows) is split_kv and auto.attention_fn(cuda_row) is sampler.decode_attention
    assert sampler.DecodeOptions(attention="sdpa").attention_fn(cuda_rows) is sampler.attention


def test_top_k_one_is_greedy(pair):
    family, hf, ours = pair
    batch = make_batch(family)
    greedy = minivl.generate(ours, batch, max_new_tokens=6, temperature=0.0)
    top1 = minivl.generate(ours, batch, max_new_tokens=6, temperature=1.3, top_k=1, seed=1)
    assert torch.equal(top1.tokens, greedy.tokens)
    assert torch.allclose(top1.logprobs, torch.zeros_like(top1.logprobs))  # one token left in the support


def test_eos_ends_rows_like_transformers(pair):
    family, hf, ours = pair
    batch = make_batch(family)
    free = minivl.generate(ours, batch, max_new_tokens=10, temperature=0.0).tokens
    first = next(i for i in range(2, 10) if int(free[0, i]) not in free[0, :i].tolist())
    eos = int(free[0, first])  # row 0 ends after first + 1 tokens, the others when (if) they meet it
    out = minivl.generate(ours, batch, max_new_tokens=10, temperature=0.0, eos_token_id=[eos], pad_token_id=0)
    ref = hf_generate(hf, batch, 10, eos_token_id=eos)
    assert torch.equal(out.tokens, ref[:, : out.tokens.shape[1]])
    assert out.lengths[0] == first + 1 and not out.truncated[0]
    for r in range(3):
        n = int(out.lengths[r])
        assert (out.tokens[r, n:] == 0).all() and (out.logprobs[r, n:] == 0).all()
        assert out.truncated[r] == (eos not in out.tokens[r].tolist())


def test_all_rows_finished_stops_early(pair):
    family, hf, ours = pair
    batch = make_batch(family)
    first = minivl.generate(ours, batch, max_new_tokens=1, temperature=0.0).tokens[:, 0].tolist()
    out = minivl.generate(ours, batch, max_new_tokens=40, temperature=0.0, eos_token_id=first)  # all end at once
    assert out.tokens.shape[1] == 1 and out.lengths.tolist() == [1, 1, 1] and not out.truncated.any()


def test_seeds_reproduce(pair):
    family, hf, ours = pair
    batch = make_batch(family)
    kw = dict(max_new_tokens=6, temperature=1.0, num_return_sequences=2)
    a, b, c = (minivl.generate(ours, batch, seed=s, **kw) for s in (7, 7, 8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    torch.manual_seed(0)
    d = minivl.generate(ours, batch, **kw)
    torch.manual_seed(0)
    assert torch.equal(d.tokens, minivl.generate(ours, batch, **kw).tokens)


def test_positions_are_recomputed_every_call(pair):
    # transformers #43952: a rope delta kept from the previous batch shifts the next one's positions
    family, hf, ours = pair
    text_only = {"input_ids": torch.tensor([text(9, 20)])}
    before = minivl.generate(ours, text_only, max_new_tokens=6, temperature=0.0)
    minivl.generate(ours, make_batch(family), max_new_tokens=3, temperature=0.0)
    after = minivl.generate(ours, text_only, max_new_tokens=6, temperature=0.0)
    assert torch.equal(before.tokens, after.tokens)
    text_only["attention_mask"] = torch.ones(1, 9, dtype=torch.long)
    assert torch.equal(after.tokens, hf_generate(hf, text_only, 6))


def test_sampling_follows_the_support_distribution():
    # 20,000 draws from one row: frequencies match the renormalised support, nothing outside it is drawn
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 9.0, 8.0]])  # ids 6 and 7 are banned below
    s = sampler.Sampling(temperature=0.8, top_k=4, top_p=0.9)
    banned = torch.tensor([6, 7])
    N = 20000
    token, logp = sampler.pick(logits.expand(N, -1), s, banned, torch.tensor(1), torch.tensor(0))
    support = sampler.support_logits(logits, s, banned)[0]
    p = support.softmax(-1)
    assert torch.isinf(support[[4, 5, 6, 7]]).all()  # top-k drops 4 and 5 (and the banned 6, 7)
    assert torch.isfinite(support[:3]).all()  # top-p: 0.8 of the top-4 mass is reached by ids 0..2
    freq = torch.bincount(token, minlength=8).float() / N
    assert (freq - p).abs().max() < 0.015
    assert torch.allclose(logp, p.log()[token])
    greedy, _ = sampler.pick(logits, sampler.Sampling(temperature=0.0), banned, torch.tensor(1), torch.tensor(0))
    assert greedy.item() == 0


@pytest.mark.parametrize("V,chunk", [(37, 8), (64, 8), (5, 8), (1000, 1024)])
def test_two_level_argmax_is_argmax(V, chunk):
    """sampler.argmax_rows equals torch.argmax, the first maximum of each row: rows with ties inside a chunk and
    across chunks, a vocabulary that is not a multiple of the chunk (padding), one shorter than a chunk."""
    gen = torch.Generator().manual_seed(V)
    x = torch.randn(6, V, generator=gen).mul(2).round()  # many ties
    x[1] = 3.0  # all tied: index 0
    x[2, V // 2:] = 9.0  # ties from the middle on, across chunks
    x[3, -1] = 9.0  # the maximum in the padded last chunk
    x[4] = float("-inf")
    x[4, V - 2] = 0.0  # one finite value (banned tokens are -inf)
    got = sampler.argmax_rows(x, chunk)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[1] == 0 and got[2] == V // 2 and got[3] == V - 1 and got[4] == V - 2


def test_noise_is_uniform_and_seeded():
    g = sampler.gumbel_noise(torch.tensor(3), torch.tensor(4), 64, 1000)
    u = torch.exp(-torch.exp(-g))  # back to uniforms
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert torch.equal(g, sampler.gumbel_noise(torch.tensor(3), torch.tensor(4), 64, 1000))
    assert not torch.equal(g[0], g[1])  # rows draw differently
    assert not torch.equal(g, sampler.gumbel_noise(torch.tensor(3), torch.tensor(5), 64, 1000))


class FavourVisionTokens(torch.nn.Module):
    # an lm_head whose favourite tokens are the vision tokens, by far
    def __init__(self, head):
        super().__init__()
        self.head, self.weight = head, head.weight

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., BANNED] += 100.0
        return logits


def test_vision_tokens_are_never_sampled(pair, monkeypatch):
    family, hf, ours = pair
    assert sampler.vision_token_ids(ours.cfg) == sorted(set(BANNED + [IDS["vision_end_token_id"] + 1]))
    monkeypatch.setattr(ours, "lm_head", FavourVisionTokens(ours.lm_head))
    for t in (0.0, 1.0):
        out = minivl.generate(ours, make_batch(family), max_new_tokens=6, temperature=t, seed=0)
        assert not torch.isin(out.tokens, torch.tensor(BANNED)).any()
        assert torch.isfinite(out.logprobs).all()


@pytest.mark.skipif(not os.environ.get("MINIVL_TEST_COMPILE"), reason="torch.compile on a CPU takes minutes; "
                    "set MINIVL_TEST_COMPILE=1")
@pytest.mark.parametrize("decode", [k for k in DECODE if k != "triton"])  # (the GPU benchmark checks that one)
def test_compiled_step_equals_eager(tmp_path, decode):
    save_hf("qwen2_vl", tmp_path)
    model = minivl.load(tmp_path)
    batch, s = make_batch("qwen2_vl"), sampler.Sampling(0.8, 20, 0.9)
    torch._dynamo.reset()
    states = []
    for parts in (sampler.PARTS, sampler.compiled_parts(DECODE[decode])):
        with torch.no_grad():
            state = sampler.prefill(model, batch, 2, 6, s, [], 0, 3, decode=DECODE[decode])
            for _ in range(5):
                sampler.decode_step(model, state, s, parts)
        states.append(state)
    assert torch.equal(states[0].tokens, states[1].tokens)
    assert (states[0].logprobs - states[1].logprobs).abs().max() < 1e-5


def test_command_line_streams_the_answer_to_its_question(tmp_path, monkeypatch, capsys):
    """`python -m minivl.generate` (run as __main__ here, so the sampler can be watched): the sampler gets the
    processor's batch of the image and the prompt, and the options as given; every token is printed."""
    import runpy

    from minivl.demo import QUESTION, make_demo
    from minivl.processor import Processor

    paths = make_demo(tmp_path / "demo")
    image = str(sorted(paths["images"].iterdir())[0])
    calls, real = [], sampler.generate

    def watched(model, batch, *args, **kw):
        calls.append((batch, args, kw, real(model, batch, *args, **kw)))
        return calls[-1][-1]

    monkeypatch.setattr(sampler, "generate", watched)
    monkeypatch.setattr(sys, "argv", ["generate", "--model", str(paths["model"]), "--image", image, "--prompt",
                                      QUESTION, "--max-new-tokens", "12", "--temperature", "0.9", "--seed", "3"])
    runpy.run_module("minivl.generate", run_name="__main__")
    assert callable(minivl.generate)                  # run as a script, the module did not replace the function
    (batch, args, kw, out), = calls
    processor = Processor.from_pretrained(paths["model"])
    expected = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": QUESTION}]}])
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    assert args == (12,) and (kw["temperature"], kw["seed"]) == (0.9, 3)
    assert kw["eos_token_id"] == processor.eos_token_ids
    n = int(out.lengths[0])
    answer = processor.decode(out.tokens[0, :n])
    printed = capsys.readouterr()
    assert n >= 4 and len(answer.strip()) >= 4 and not answer.endswith("\ufffd")
    assert printed.out == answer + "\n"                                # streamed piece by piece, all of it
    assert f"[{n} tokens in " in printed.err                           # the summary line
