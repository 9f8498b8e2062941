"""The KV-cache sampler: chat answers and GRPO rollouts, greedy or sampled, as gpt-fast decodes.

    out = minivl.generate(model, batch, max_new_tokens=64, temperature=0.0)       # greedy
    out = minivl.generate(model, batch, 256, temperature=1.0, top_p=0.95, num_return_sequences=8, seed=0)
    out.tokens (B*n, L) right-padded, out.lengths (B*n,), out.logprobs (B*n, L) float32, out.truncated (B*n,)

`batch` is the processor's output (left-padded input_ids, attention_mask, the vision tensors); rows b*n .. b*n+n-1
are the n answers to prompt b. Read top to bottom: `prefill` runs the prompts once (the vision tower once per prompt;
positions and rope deltas from this batch, none kept on the model: transformers #43952) into a cache copied n times.
`decode_step` feeds every row's last token at slot s through the model's own decoder layers, which write the cache at
s and attend over the slots up to it. `sample` draws the next token with `pick`: banned ids, temperature, top-k,
top-p, then Gumbel-max (argmax of logits + Gumbel noise: a draw from their softmax without a host sync; the noise
hashes (seed, step, row, token), the same on every device). All state is tensors updated in place, so on CUDA a
step is one replay of a compiled CUDA graph (`cuda_graph`). With decode="auto", CUDA runs a kernels/decode/ backend
beside decode_step (the step as Triton kernels, calling PARTS for the rest), which tests hold to decode_step. Rows
that sampled an eos run on, padding with log-prob 0; vision tokens are never sampled (trl #3847). Simplified: the
reference attention reads the whole static cache, masked; Qwen3-VL-MoE decodes without a CUDA graph; no beam
search, repetition penalty or stop strings. Shapes: B prompts, n answers a prompt, N = B*n rows, T0 prompt length
(padding included), S cache slots, V vocabulary, L generated length, D width, K key/value heads, Dh head dim."""

import dataclasses
import functools
import os
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rope import get_rope_index
from .text import KVCache, mrope_cos_sin

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1 = all tokens


@dataclass
class Generation:
    tokens: torch.Tensor  # (N, L) right-padded with the pad id
    lengths: torch.Tensor  # (N,) generated tokens, the eos included
    logprobs: torch.Tensor  # (N, L) float32, 0 on padding
    truncated: torch.Tensor  # (N,) True where max_new_tokens was reached without an eos


@dataclass
class DecodeState:
    """Everything a decode step reads and writes: tensors updated in place, which a CUDA graph replays on."""
    cache: list  # one KVCache per decoder layer, k and v (N, K, S, Dh); each one's positions is `slot`
    slot: torch.Tensor  # (1,) the cache slot of the token fed next
    key_valid: torch.Tensor  # (N, S) bool: False on the prompt's left padding
    rotary: tuple  # cos, sin (N, S, Dh): the rotary tables of every row's slots
    shared: tuple  # (n, T0): slots 0..T0-1 are alike in each run of n rows (copies of one prompt)
    token: torch.Tensor  # (N,) the last sampled token, fed at the next step
    step: torch.Tensor  # () the output column of the next token
    done: torch.Tensor  # (N,) bool: an eos was sampled
    lengths: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, max_new_tokens)
    logprobs: torch.Tensor  # (N, max_new_tokens) float32
    banned: torch.Tensor  # (nb,) token ids never sampled
    eos: torch.Tensor  # (ne,) token ids that end a row
    seed: torch.Tensor  # () int64
    first_row: torch.Tensor  # () int64: the noise's index of row 0 (a slice of a larger batch: its row there)
    pad_id: int
    on_logits: object = None  # debug hook, off the hot path: called with every step's float32 logits (N, V)


def vision_token_ids(cfg):
    """Token ids an answer may never contain. Every Qwen-VL tokenizer puts <|vision_pad|> right after
    <|vision_end|> (151652 start, 151653 end, 151654 pad); config.json names the other four."""
    ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
           cfg.vision_end_token_id + 1}
    return sorted(i for i in ids if i < cfg.text.vocab_size)


def prefill(model, batch, n, max_new_tokens, sampling, eos, pad_id, seed, on_logits=None, first_row=0):
    """Run the prompts once, copy their cache n times, sample the first token -> DecodeState."""
    cfg, text, device, dtype = model.cfg, model.cfg.text, model.device, model.dtype
    input_ids = batch["input_ids"].to(device)
    (B, T0), K, Dh = input_ids.shape, text.num_key_value_heads, text.head_dim
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    vision = {k: batch[k].to(device) for k in VISION_KEYS if batch.get(k) is not None}
    position_ids, deltas = get_rope_index(cfg, input_ids, attention_mask, vision.get("image_grid_thw"),
                                          vision.get("video_grid_thw"), vision.get("second_per_grid_ts"))
    prompt_cache = [KVCache.empty((B, K, T0, Dh), torch.arange(T0, device=device), dtype)
                    for _ in range(text.num_hidden_layers)]
    hidden = model.hidden_states(input_ids, attention_mask, position_ids=position_ids, cache=prompt_cache,
                                 **vision)  # (B, T0, D)
    logits = model.lm_head(hidden[:, -1]).float().repeat_interleave(n, dim=0)  # (N, V): left padding, last = last

    N, S = B * n, -(-(T0 + max_new_tokens) // 16) * 16  # slots rounded up for aligned attention masks
    slot = torch.full((1,), T0 - 1, device=device)  # sampling the first token moves it to T0
    cache = [KVCache.empty((N, K, S, Dh), slot, dtype) for _ in prompt_cache]
    for layer, prompt in zip(cache, prompt_cache):  # the n answers of a prompt start from copies of its cache
        layer.k[:, :, :T0], layer.v[:, :, :T0] = prompt.k.repeat_interleave(n, 0), prompt.v.repeat_interleave(n, 0)
    key_valid = torch.ones(N, S, dtype=torch.bool, device=device)
    key_valid[:, :T0] = attention_mask.bool().repeat_interleave(n, dim=0)
    # slot s of a row holds position s + its rope delta, a text token's (t = h = w): the tables are made once
    positions = (torch.arange(S, device=device) + deltas.repeat_interleave(n, dim=0)).expand(3, N, S)  # (3, N, S)
    rotary = mrope_cos_sin(positions, Dh, text.rope_theta, text.mrope_section, text.mrope_interleaved, dtype)
    i64 = dict(dtype=torch.long, device=device)
    state = DecodeState(cache, slot, key_valid, rotary, (n, T0), token=torch.zeros(N, **i64), step=torch.zeros(
        (), **i64), done=torch.zeros(N, dtype=torch.bool, device=device), lengths=torch.zeros(N, **i64),
        tokens=torch.full((N, max_new_tokens), pad_id, **i64), logprobs=torch.zeros(N, max_new_tokens, device=device),
        banned=torch.tensor(vision_token_ids(cfg), **i64), eos=torch.tensor(eos, **i64),
        seed=torch.tensor(seed, **i64), first_row=torch.tensor(first_row, **i64), pad_id=pad_id, on_logits=on_logits)
    if on_logits:
        on_logits(logits)
    sample(state, logits, sampling)
    return state


def step_inputs(text, state):
    """Embeddings (N, 1, D), rotary tables (N, 1, Dh) and mask (N, 1, 1, S) of the tokens fed this step."""
    x = text.embed_tokens(state.token[:, None])  # (N, 1, D)
    cos, sin = (table.index_select(1, state.slot) for table in state.rotary)  # (N, 1, Dh) each
    mask = state.key_valid & (torch.arange(state.key_valid.shape[1], device=x.device) <= state.slot)  # (N, S)
    return x, cos, sin, mask[:, None, None, :]


def run_layer(layer, x, cos, sin, mask, cache):
    """The model's own DecoderLayer.forward; a function of the layer, so that one compiled function serves all."""
    return layer(x, cos, sin, mask, cache)


def head(model, x):
    """Final norm and lm_head: x (N, 1, D) -> logits (N, V) in the model's dtype."""
    return model.lm_head(model.model.language_model.norm(x)[:, 0])


def decode_step(model, state, sampling, parts=None):
    """Feed every row's last token at state.slot, sample the next, in place. parts: PARTS or compiled_parts()."""
    text, parts = model.model.language_model, parts or PARTS
    x, cos, sin, mask = parts.inputs(text, state)
    for layer, cache in zip(text.layers, state.cache):
        x = parts.layer(layer, x, cos, sin, mask, cache)
    logits = parts.head(model, x)
    if state.on_logits:
        state.on_logits(logits.float())
    parts.sample(state, logits, sampling)


def sample(state, logits, sampling):
    """Sample every row's next token from logits (N, V) at output column state.step; move to the next slot."""
    token, logprob = pick(logits.float(), sampling, state.banned, state.seed, state.step, state.first_row)
    active = ~state.done
    token = torch.where(active, token, state.pad_id)  # finished rows only pad
    state.tokens.index_copy_(1, state.step.view(1), token[:, None])
    state.logprobs.index_copy_(1, state.step.view(1), torch.where(active, logprob, 0.0)[:, None])
    state.lengths.add_(active.long())
    state.done.logical_or_((token[:, None] == state.eos).any(dim=-1) & active)
    state.token.copy_(token)
    state.step.add_(1)
    state.slot.add_(1)


def pick(logits, sampling, banned, seed, step, first_row=0):
    """Next token (N,) and its log-prob (N,) float32 under the support distribution, without a host sync."""
    x = support_logits(logits, sampling, banned)  # (N, V)
    noise = gumbel_noise(seed, step, *x.shape, first_row) if sampling.temperature > 0 else 0.0
    token = argmax_rows(x + noise)  # Gumbel-max: a draw from softmax(x); greedy without the noise
    return token, x.log_softmax(dim=-1).gather(1, token[:, None])[:, 0]


def support_logits(logits, sampling, banned):
    """logits (N, V) float32 -> the logits sampling draws from: temperature-scaled, -inf outside the support (banned
    tokens, then top-k, then top-p: transformers' order). Greedy keeps temperature 1: the model's log-probs."""
    x = logits / sampling.temperature if sampling.temperature > 0 else logits
    x = x.index_fill(1, banned, float("-inf"))
    if sampling.top_k > 0:
        kth = x.topk(min(sampling.top_k, x.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th value stay, as in transformers
    if sampling.top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p (transformers' TopPLogitsWarper)
        sorted_x, order = x.sort(dim=-1, descending=True)  # (N, V)
        probs, (N, V) = sorted_x.softmax(dim=-1), x.shape
        # cumsum as sums within blocks plus the blocks before: inductor fails to compile its split scan of one row
        within = F.pad(probs, (0, -V % 1024)).view(N, -1, 1024).cumsum(-1)  # (N, C, 1024), as argmax_rows
        cumsum = (within + (within[..., -1].cumsum(-1) - within[..., -1])[..., None]).flatten(1)[:, :V]  # (N, V)
        drop_sorted = cumsum - probs >= sampling.top_p  # the mass before it already reaches top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    return x


def gumbel_noise(seed, step, rows, vocab_size, first_row=0):
    """Gumbel(0, 1) noise (rows, V), float32, a pure function of (seed, step, row, token); rows first_row, ..."""
    key = _hash32(_hash32((seed & 0xFFFFFFFF) ^ step) ^ (torch.arange(rows, device=step.device) + first_row))
    bits = _hash32(torch.arange(vocab_size, device=step.device) ^ key[:, None]) >> 8  # (rows, V) 24 random bits
    u = (bits.float() + 0.5) * 2.0**-24  # uniform in (0, 1), exactly representable in float32
    return -torch.log(-torch.log(u))


def _hash32(x):
    # "lowbias32" (C. Wellons, hash-prospector): a bijection of 32-bit integers with good avalanche; each product is
    # taken mod 2**32 in two halves of the constant, so that int64 never overflows
    for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def argmax_rows(x, chunk=1024):
    """x (N, V) -> (N,): the index of each row's first maximum, found in two levels, because inductor does not
    split an argmax: over one row of V = 151,936 it would be one program's work."""
    N, V = x.shape
    x = F.pad(x, (0, -V % chunk), value=float("-inf")).view(N, -1, chunk)  # (N, C, chunk)
    best, at = x.max(dim=-1)  # (N, C) each chunk's first maximum
    c = best.argmax(dim=-1, keepdim=True)  # (N, 1) the first chunk holding the row's maximum
    return c[:, 0] * chunk + at.gather(1, c)[:, 0]


Parts = namedtuple("Parts", "inputs layer head sample")
PARTS = Parts(step_inputs, run_layer, head, sample)  # the reference step's pieces, which a backend calls too


@functools.cache
def compiled_parts():
    """PARTS through torch.compile, once per process (cache_clear() and torch._dynamo.reset() start afresh): inductor
    fuses each part's small ops; one compiled layer serves all ("regional compilation"), so compile time does not
    grow with depth. Coordinate-descent tuning (gpt-fast's) makes one-row matmuls tuned Triton reductions."""
    return Parts(*(torch.compile(f, fullgraph=True, options={"coordinate_descent_tuning": True}) for f in PARTS))


def backend_step(decode, model, state, sampling, parts):
    """A kernels/decode/ backend's step (a function of the state), or None where the reference step runs."""
    if decode == "reference" or decode == "auto" and not (state.token.is_cuda or os.environ.get("MINIVL_KERNELS")):
        return None
    import kernels
    kernels.check_ours()  # Hugging Face's hub package has the same import name: say so, loudly
    from kernels.decode import prepare
    return prepare(decode, model, state, sampling, parts)


def cuda_graph(step, state):
    """step(state) captured once as a CUDA graph: calling the result replays it. The warm-up calls (compiling,
    autotuning, the allocator) run on a scratch copy of the state's counters and outputs, so they write nothing the
    caller sees: only cache slots after the prompt, masked until the real steps rewrite them."""
    slot = state.slot.clone()
    scratch = dataclasses.replace(
        state, cache=[dataclasses.replace(c, positions=slot) for c in state.cache], slot=slot,
        token=state.token.clone(), step=torch.zeros_like(state.step), done=state.done.clone(),
        lengths=state.lengths.clone(), tokens=torch.empty_like(state.tokens), logprobs=torch.empty_like(state.logprobs))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(state)
    return graph.replay


@torch.no_grad()
def generate(model, batch, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=1,
             eos_token_id=None, seed=None, pad_token_id=None, stream=None, check_every=None, compile=True,
             decode="auto", first_row=0):
    """Sample max_new_tokens (fewer if every row ends with an eos) for every prompt of `batch` -> Generation.
    temperature 0 is greedy. eos_token_id: an id or a list of ids; pad_token_id fills the tokens after an eos
    (default: the first eos, else 0). stream(tokens (N, i), lengths (N,)) is called every check_every steps (default
    16 on CUDA, 1 on the CPU) and at the end. compile=False captures the eager step (CUDA). decode: "auto" (a
    kernels/decode/ backend where one takes the call), "reference" (decode_step), or a backend's name. first_row:
    the rows' noise is that of rows first_row, ... of a larger batch (a process's slice of it: GRPO's rollouts)."""
    if max_new_tokens < 1 or num_return_sequences < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need max_new_tokens, num_return_sequences >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= "
                         f"0; got {max_new_tokens}, {num_return_sequences}, {temperature}, {top_p}, {top_k}")
    if eos_token_id is None:  # transformers' default: the checkpoint's generation_config.json ([] never stops)
        eos_token_id = model.eos_token_ids
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    seed = int(torch.randint(2**31, ())) if seed is None else seed  # torch.manual_seed decides it
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    state = prefill(model, batch, num_return_sequences, max_new_tokens, sampling, eos, pad_id, seed, None, first_row)
    # Qwen3-VL-MoE routes with data-dependent shapes, which a CUDA graph cannot hold: it decodes eagerly, as the CPU
    graphed = state.token.device.type == "cuda" and model.cfg.text.num_experts == 0
    check_every, step = check_every or (16 if graphed else 1), None
    for i in range(1, max_new_tokens):
        if i % check_every == 0:
            if stream:
                stream(state.tokens[:, :i], state.lengths)
            if eos and bool(state.done.all()):  # the only host sync of the loop
                break
        if step is None:  # made here: with max_new_tokens = 1 there is nothing to compile or capture
            parts = compiled_parts() if graphed and compile else PARTS
            step = backend_step(decode, model, state, sampling, parts) or (
                lambda s: decode_step(model, s, sampling, parts))
            step = cuda_graph(step, state) if graphed else functools.partial(step, state)
        step()
    L = int(state.lengths.max())
    if stream:
        stream(state.tokens[:, :L], state.lengths)
    return Generation(tokens=state.tokens[:, :L], lengths=state.lengths, logprobs=state.logprobs[:, :L],
                      truncated=~state.done)
