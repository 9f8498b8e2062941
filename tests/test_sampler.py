"""The KV-cache sampler (minivl/sampler.py) and its fast backends (kernels/decode/) on tiny transformers checkpoints,
float32, on the CPU (the backends' Triton kernels through Triton's interpreter).

Greedy answers equal transformers' `generate`; the logits of every cached decode step equal a full forward over
the whole sequence; every backend's logits and tokens equal the reference step's; the returned log-probs are those of
the support distribution the tokens were drawn from; n answers per prompt share one vision pass; top-k, top-p, eos,
seeds and banned vision tokens behave. The backends read weights made for each call (weight updates between calls
followed), fold LoRA adapters into them, and hand the layers they cannot take to the reference step.
Prompts are built by hand (vision blocks of the right length between random text), left-padded.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import minivl
from helpers import (IDS, import_interpreted, left_pad, mm_token_type_ids, pixels, qwen3_video_tokens, save_hf, text,
                     vision_block)
from minivl import sampler

import_interpreted("kernels.decode.attention", "_split_kernel")  # before anything imports triton (helpers.py)
import_interpreted("kernels.decode.one_row", "_norm_matvec_kernel")
import_interpreted("kernels.decode.rows", "_add_norm_kernel")
import_interpreted("kernels.lora", "_lora_fwd_kernel")  # the LoRA layers of a test run through it too
import kernels.decode  # noqa: E402
import kernels.decode.one_row  # noqa: E402
import kernels.decode.rows  # noqa: E402

BANNED = [IDS["vision_start_token_id"], IDS["vision_end_token_id"], IDS["image_token_id"], IDS["video_token_id"]]
TOL = 1e-4
DECODE = ["reference", "kernels"]  # the reference step; "auto" with the Triton backends (one_row or rows by rows)


def use_decode(name, monkeypatch):
    """generate's decode= for DECODE's `name`; the backends run on the CPU through Triton's interpreter."""
    if name == "kernels":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("MINIVL_KERNELS", "triton")
        return "auto"
    return name


def make_step(model, state, sampling, decode):
    """The step generate would run (without a CUDA graph) as a function of no argument."""
    step = sampler.backend_step(decode, model, state, sampling, sampler.PARTS) or (
        lambda s: sampler.decode_step(model, s, sampling))
    return lambda: step(state)


def run_steps(model, batch, n, steps, sampling, decode, seed):
    """Prefill and steps - 1 decode steps through `decode` -> (every step's logits (N, steps, V), the state)."""
    logits = []
    with torch.no_grad():
        state = sampler.prefill(model, batch, n, steps, sampling, eos=[], pad_id=0, seed=seed, on_logits=logits.append)
        step = make_step(model, state, sampling, decode)
        for _ in range(steps - 1):
            step()
    return torch.stack(logits, dim=1), state


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
    # sampled answers, two per prompt: every step's logits (the debug hook) against one forward over the sequence
    family, hf, ours = pair
    batch, n, steps = make_batch(family), 2, 7
    s = sampler.Sampling(temperature=0.9, top_k=40, top_p=0.95)
    logits, state = run_steps(ours, batch, n, steps, s, use_decode(decode, monkeypatch), seed=5)
    ref = full_logits(ours, dict(batch, family=family), state.tokens, n)
    assert logits.shape[1] == steps and (logits - ref).abs().max() <= TOL


@pytest.mark.parametrize("backend,n", [("one_row", 1), ("rows", 2)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_backend_equals_the_reference_step(pair, backend, n, temperature, monkeypatch):
    """From the same prefill, each step of a backend gives the reference step's logits and tokens (each backend with
    the tail it runs by itself: greedy or temperature, no top-k / top-p)."""
    family, hf, ours = pair
    batch = make_batch(family) if n > 1 else {k: v[-1:] for k, v in make_batch(family).items()
                                              if k in ("input_ids", "attention_mask")}  # the text-only prompt
    use_decode("kernels", monkeypatch)
    s, steps = sampler.Sampling(temperature), 6
    (ref, ref_state), (got, got_state) = (run_steps(ours, batch, n, steps, s, decode, seed=4)
                                          for decode in ("reference", backend))
    assert (got - ref).abs().max() <= TOL
    assert torch.equal(got_state.tokens, ref_state.tokens) and torch.equal(got_state.lengths, ref_state.lengths)
    assert (got_state.logprobs - ref_state.logprobs).abs().max() <= TOL
    assert int(got_state.slot) == int(ref_state.slot) == batch["input_ids"].shape[1] + steps - 1


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
                          num_return_sequences=n, seed=3, eos_token_id=[])  # no row ends: every token counts
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


def test_backend_weights_follow_updates_and_fold_lora(pair, monkeypatch):
    """The backends read weights made at every call from the live parameters (a trainer changes them between calls),
    q/k/v stacked, gate and up where they are; a LoRA layer's adapter folded in (W + scale B A), so that the kernels
    take it too and give the reference step's tokens."""
    from minivl import lora

    family, hf, ours = pair
    model, batch = copy.deepcopy(ours), make_batch(family)  # a copy: this test changes it
    kernels_decode = use_decode("kernels", monkeypatch)

    def greedy(decode="reference"):
        return minivl.generate(model, batch, max_new_tokens=8, temperature=0.0, decode=decode).tokens

    layers = model.model.language_model.layers
    weights = [kernels.decode.layer_weights(layer) for layer in layers]
    assert all((w is None) == (family == "qwen3_vl_moe") for w in weights)  # MoE layers: the reference's
    if family != "qwen3_vl_moe":
        attn, mlp = layers[0].self_attn, layers[0].mlp
        assert torch.equal(weights[0].qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert (weights[0].qkv_bias is None) == family.startswith("qwen3")
        assert weights[0].gate is mlp.gate_proj.weight and weights[0].down is mlp.down_proj.weight  # no copies
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight.mul_(1.5)  # a trainer's update between calls
    before = greedy()
    assert torch.equal(greedy(kernels_decode), before)
    torch.manual_seed(0)
    names = [n for n in lora.select_linear(model) if ".layers.0." in n]
    lora.inject(model, names, r=4, alpha=8, init_weights=False)  # B random too: the adapter changes the answers
    if family != "qwen3_vl_moe":
        folded = kernels.decode.layer_weights(layers[0])
        attn = layers[0].self_attn
        want = attn.q_proj.weight + attn.q_proj.scale * attn.q_proj.lora_B.weight @ attn.q_proj.lora_A.weight
        assert torch.allclose(folded.qkv[: want.shape[0]], want, atol=1e-6)
        assert not torch.equal(want, attn.q_proj.weight)
    adapted = greedy()
    assert not torch.equal(adapted, before) and torch.equal(greedy(kernels_decode), adapted)


class Unknown(torch.nn.Module):
    """A projection the backends do not know (neither nn.Linear nor LoRA): its layer goes to the reference step."""

    def __init__(self, base):
        super().__init__()
        self.base, self.bias = base, base.bias

    def forward(self, x):
        return self.base(x)


def layer_falls_back(ours, batch, layer, decode, **kw):
    """Generate through `decode` with decoder layer `layer` of a copy of the model holding a projection the kernels
    cannot take: the tokens equal the reference step's."""
    model = copy.deepcopy(ours)
    attn = model.model.language_model.layers[layer].self_attn
    attn.o_proj = Unknown(attn.o_proj)
    assert kernels.decode.layer_weights(model.model.language_model.layers[layer]) is None
    out = minivl.generate(model, batch, decode=decode, **kw)
    assert torch.equal(out.tokens, minivl.generate(model, batch, decode="reference", **kw).tokens)


def count_calls(monkeypatch, module, name, calls, key=None):
    """Record a call of module.name in `calls` (as `key`, default 1) each time it runs."""
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(key or 1) or fn(*a, **k))


def test_one_row_backend(pair, monkeypatch):
    """A one-row step on the one_row backend: each plain layer as one_row.py's kernels (Triton's interpreter here), the
    step's inputs, the final norm + lm_head and the greedy tail too. Greedy tokens equal transformers', every step's
    logits equal a full forward, a layer the kernels cannot take falls back to the reference layer."""
    family, hf, ours = pair
    image = (1, 8, 8)
    ids, mask = left_pad([text(4, 1) + vision_block(image) + text(6, 2)])
    pv, thw = pixels(family, [image])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    decode = use_decode("kernels", monkeypatch)
    calls, heads, ends = [], [], []
    one_row = kernels.decode.one_row
    count_calls(monkeypatch, one_row, "attend", calls)  # one a layer
    norm_matvec = one_row.norm_matvec
    head = ours.lm_head.weight
    monkeypatch.setattr(one_row, "norm_matvec", lambda x, nw, eps, w, *a, **k: (
        heads.append(1) if w is head else None) or norm_matvec(x, nw, eps, w, *a, **k))
    count_calls(monkeypatch, one_row, "step_inputs", ends, "inputs")
    count_calls(monkeypatch, one_row, "greedy_record", ends, "greedy")
    steps, layers = 10, len(ours.model.language_model.layers)
    out = minivl.generate(ours, batch, max_new_tokens=steps, temperature=0.0, decode=decode)
    assert torch.equal(out.tokens, hf_generate(hf, batch, steps))
    assert len(calls) == (0 if family == "qwen3_vl_moe" else layers * (steps - 1))  # MoE layers: the reference's
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

    logits, state = run_steps(ours, batch, 1, steps, sampler.Sampling(temperature=0.9), decode, seed=2)
    with torch.no_grad():
        full = ours(torch.cat([ids, state.tokens], 1), attention_mask=torch.cat(
            [mask, torch.ones_like(state.tokens)], 1), pixel_values=pv, image_grid_thw=thw)
    assert (logits - full[:, ids.shape[1] - 1 : -1].float()).abs().max() <= TOL

    if family != "qwen3_vl_moe":
        calls.clear()
        layer_falls_back(ours, batch, 0, decode, max_new_tokens=steps, temperature=0.0)
        assert len(calls) == (layers - 1) * (steps - 1)  # layer 0 runs the reference layer


def test_rows_backend(pair, monkeypatch):
    """Several rows on the rows backend: each plain layer as cuBLAS's q/k/v product and rows.py's launches
    (Triton's interpreter here). Sampled tokens and log-probs equal the reference step's, and a layer the kernels
    cannot take falls back to the reference layer."""
    family, hf, ours = pair
    batch, n, steps, layers = make_batch(family), 2, 6, len(ours.model.language_model.layers)
    decode = use_decode("kernels", monkeypatch)
    calls, tails = [], []
    count_calls(monkeypatch, kernels.decode.rows, "attend", calls)  # one a layer
    count_calls(monkeypatch, kernels.decode.rows, "sample_record", tails)
    kw = dict(max_new_tokens=steps, temperature=0.9, num_return_sequences=n, seed=3)
    for top_k, kernel_tails in ((50, 0), (0, steps - 1)):  # top-k: the reference tail; else the sampling kernels
        tails.clear()
        out = minivl.generate(ours, batch, decode=decode, top_k=top_k, **kw)
        ref = minivl.generate(ours, batch, decode="reference", top_k=top_k, **kw)
        assert torch.equal(out.tokens, ref.tokens) and (out.logprobs - ref.logprobs).abs().max() <= TOL
        assert len(tails) == kernel_tails  # MoE too: the sampling kernels take any logits
    assert len(calls) == (0 if family == "qwen3_vl_moe" else 2 * layers * (steps - 1))  # MoE layers: the reference
    eos = int(out.tokens[0, 2])  # rows that draw it end there, and pad after, as in the reference tail
    ended = minivl.generate(ours, batch, decode=decode, eos_token_id=eos, **kw)
    ref = minivl.generate(ours, batch, decode="reference", eos_token_id=eos, **kw)
    assert torch.equal(ended.tokens, ref.tokens) and torch.equal(ended.lengths, ref.lengths)
    assert torch.equal(ended.truncated, ref.truncated) and int(ended.lengths[0]) <= 3 and not ended.truncated[0]
    if family != "qwen3_vl_moe":
        calls.clear()
        layer_falls_back(ours, batch, 1, decode, **kw)
        assert len(calls) == (layers - 1) * (steps - 1)  # layer 1 falls back: the one before hands it x + delta


def test_decode_choices_are_checked(monkeypatch):
    """decode="reference", or "auto" off CUDA, runs the reference step; "auto" with the kernels
    takes the one_row backend for one row and rows for several; an unknown name, or one_row for several rows, is an
    error naming it."""
    from types import SimpleNamespace

    monkeypatch.delenv("MINIVL_KERNELS", raising=False)
    cpu = SimpleNamespace(token=torch.zeros(3, dtype=torch.long))
    assert sampler.backend_step("reference", None, cpu, None, None) is None
    assert sampler.backend_step("auto", None, cpu, None, None) is None
    with pytest.raises(RuntimeError, match="one_row"):
        sampler.backend_step("one_row", None, cpu, None, None)  # asked for, cannot run here
    with pytest.raises(ValueError, match="flash"):
        sampler.backend_step("flash", None, cpu, None, None)
    use_decode("kernels", monkeypatch)
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(layers=[], embed_tokens=None)),
                            lm_head=None)
    s = sampler.Sampling()
    assert "rows_step" in sampler.backend_step("auto", model, cpu, s, None).__qualname__
    one = SimpleNamespace(token=torch.zeros(1, dtype=torch.long))
    assert "one_row_step" in sampler.backend_step("auto", model, one, s, None).__qualname__
    with pytest.raises(ValueError, match="one_row"):
        sampler.backend_step("one_row", model, cpu, s, None)


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


@pytest.mark.parametrize("decode", DECODE)
def test_a_slice_of_a_batch_draws_its_rows_tokens(pair, decode, monkeypatch):
    """GRPO over N processes: each samples its own prompts of the round, numbering its rows as they are numbered in
    the whole round (first_row), and so draws the tokens one process draws for them. Without first_row it would not."""
    family, hf, ours = pair
    batch = {"input_ids": torch.tensor([text(7, 1), text(7, 2), text(7, 3)])}  # no padding: a slice is alike
    kw = dict(max_new_tokens=6, temperature=1.0, num_return_sequences=2, seed=11, eos_token_id=[],
              decode=use_decode(decode, monkeypatch))
    whole = minivl.generate(ours, batch, **kw)
    part = minivl.generate(ours, {"input_ids": batch["input_ids"][1:]}, first_row=2, **kw)
    assert torch.equal(part.tokens, whole.tokens[2:]) and torch.allclose(part.logprobs, whole.logprobs[2:])
    unnumbered = minivl.generate(ours, {"input_ids": batch["input_ids"][1:]}, **kw)
    assert not torch.equal(unnumbered.tokens, whole.tokens[2:])


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


def test_stream_sees_every_token_and_ends_with_the_answer(pair):
    """The stream's calls grow one token at a time (check_every 1) and the last one is the whole answer, also when
    the answer is cut at max_new_tokens (the final call comes after the loop, not inside it)."""
    family, hf, ours = pair
    seen = []
    out = minivl.generate(ours, make_batch(family), max_new_tokens=7, temperature=1.0, seed=3, eos_token_id=[],
                          check_every=1, stream=lambda tokens, lengths: seen.append(tokens.clone()))
    assert out.truncated.all() and out.tokens.shape[1] == 7
    assert [t.shape[1] for t in seen] == [1, 2, 3, 4, 5, 6, 7]
    for partial in seen:
        assert torch.equal(partial, out.tokens[:, :partial.shape[1]])


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


@pytest.mark.parametrize("V", [3000, 151936])
def test_top_p_over_many_blocks(V):
    """The sampler sums the sorted mass in blocks of 1024 tokens. Against the rule in float64 (a token goes when the
    mass before it reaches top_p) and transformers' top-k then top-p warpers: the same support, up to tokens whose
    mass before lies within float32 rounding (1e-5) of top_p; rows whose boundary lies past the first block."""
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(4, V, generator=g) * torch.tensor([[0.5], [2.0], [4.0], [0.1]])
    banned = torch.tensor([0, 1])
    for top_k, top_p in [(0, 0.9), (0, 0.3), (2000, 0.95), (50, 0.9)]:
        ours = sampler.support_logits(logits, sampler.Sampling(1.0, top_k, top_p), banned).isinf()
        x = logits.double().index_fill(1, banned, float("-inf"))
        if top_k:
            x = tf.TopKLogitsWarper(top_k)(None, x)
        hf = tf.TopPLogitsWarper(top_p)(None, x.float()).isinf()
        sorted_x, order = x.sort(dim=-1, descending=True)
        p = sorted_x.softmax(-1)
        before = torch.zeros_like(p).scatter(1, order, p.cumsum(-1) - p)  # (4, V) float64, in vocabulary order
        exact = before >= top_p
        near = (before - top_p).abs() < 1e-5
        assert not ((ours != exact) & ~near).any() and not ((hf != exact) & ~near).any(), (top_k, top_p)
        assert (ours != exact).sum() <= 2
        if top_p == 0.9 and top_k == 0:
            assert (~exact).sum(1).max() > 1024  # the kept tokens span several blocks


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
    assert torch.equal(g[10:], sampler.gumbel_noise(torch.tensor(3), torch.tensor(4), 54, 1000, first_row=10))


class FavourVisionTokens(torch.nn.Module):
    # an lm_head whose favourite tokens are the vision tokens, by far
    def __init__(self, head):
        super().__init__()
        self.head, self.weight = head, head.weight

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., BANNED] += 100.0
        return logits


@pytest.mark.parametrize("decode", DECODE)  # the backends with an lm_head they do not know: the reference's head
def test_vision_tokens_are_never_sampled(pair, decode, monkeypatch):
    family, hf, ours = pair
    assert sampler.vision_token_ids(ours.cfg) == sorted(set(BANNED + [IDS["vision_end_token_id"] + 1]))
    monkeypatch.setattr(ours, "lm_head", FavourVisionTokens(ours.lm_head))
    decode = use_decode(decode, monkeypatch)
    for t in (0.0, 1.0):
        out = minivl.generate(ours, make_batch(family), max_new_tokens=6, temperature=t, seed=0, decode=decode)
        assert not torch.isin(out.tokens, torch.tensor(BANNED)).any()
        assert torch.isfinite(out.logprobs).all()


@pytest.mark.skipif(not os.environ.get("MINIVL_TEST_COMPILE"), reason="torch.compile on a CPU takes minutes; "
                    "set MINIVL_TEST_COMPILE=1")
def test_compiled_step_equals_eager(tmp_path):
    save_hf("qwen2_vl", tmp_path)
    model = minivl.load(tmp_path)
    batch, s = make_batch("qwen2_vl"), sampler.Sampling(0.8, 20, 0.9)
    torch._dynamo.reset()
    sampler.compiled_parts.cache_clear()
    states = []
    for parts in (sampler.PARTS, sampler.compiled_parts()):
        with torch.no_grad():
            state = sampler.prefill(model, batch, 2, 6, s, [], 0, 3)
            for _ in range(5):
                sampler.decode_step(model, state, s, parts)
        states.append(state)
    assert torch.equal(states[0].tokens, states[1].tokens)
    assert (states[0].logprobs - states[1].logprobs).abs().max() < 1e-5


def test_backends_leave_a_non_silu_mlp_to_the_reference_layer(pair, monkeypatch):
    """The kernels compute SiLU: a decoder MLP with another activation runs the reference layer, so the backend's
    logits still equal the reference step's (they would differ by ~1e-2 if the kernels took it)."""
    family, hf, ours = pair
    if family == "qwen3_vl_moe":
        pytest.skip("MoE layers never take the kernels")
    gelu = copy.deepcopy(ours)
    for layer in gelu.model.language_model.layers:
        layer.mlp.hidden_act, layer.mlp.act = "gelu_pytorch_tanh", lambda x: F.gelu(x, approximate="tanh")
    batch = make_batch(family)
    use_decode("kernels", monkeypatch)
    s = sampler.Sampling(0.0)
    (ref, _), (got, _) = (run_steps(gelu, batch, 2, 4, s, decode, seed=1) for decode in ("reference", "rows"))
    assert (got - ref).abs().max() <= TOL
