"""The KV-cache sampler: chat answers and GRPO rollouts, greedy or sampled, as gpt-fast decodes.

    out = minivl.generate(model, batch, max_new_tokens=64, temperature=0.0)       # greedy
    out = minivl.generate(model, batch, 256, temperature=1.0, top_p=0.95, num_return_sequences=8, seed=0)
    out.tokens (B*n, L) right-padded, out.lengths (B*n,), out.logprobs (B*n, L) float32, out.truncated (B*n,)

`batch` is the processor's output (left-padded input_ids, attention_mask and the vision tensors). Rows
b*n .. b*n+n-1 of the output are the n answers to prompt b.

How it runs:
  1. Prefill: one forward over the prompts (the vision tower runs once per prompt) into a prompt-sized cache;
     the first token of every answer is sampled from the last position. The 3-D positions and rope deltas are
     computed here from this batch, every call: nothing is kept on the model (transformers #43952).
  2. The prompt's keys and values are copied n times into the decode cache of B*n rows and
     S = prompt + max_new_tokens slots (rounded up to 16), allocated once.
  3. Decode: each step feeds every row's last token at slot s, position s + (the row's rope delta), and
     samples the next one. All state (cache, last token, slot, finished rows, outputs) lives in tensors updated
     in place, so on CUDA the step is captured once as a CUDA graph: a step is one graph replay, with no host
     work and no sync. Its layers are hand-written Triton kernels (one row) or cuBLAS's products with Triton
     kernels between them (several rows); what is left (the step's inputs, the sampling) is compiled by
     torch.compile, which fuses the small ops. The host only asks "all rows finished?"
     every `check_every` steps. On the CPU the same step runs eagerly. How the step is built (SDPA or written-out
     attention, fused projections, inductor's tuning) is a DecodeOptions; benchmarks/profile_decode.py times each.
  4. Sampling without a host sync: Gumbel-max (argmax of the support's logits + Gumbel noise, the exponential
     race of gpt-fast). The noise is a counter-based hash of (seed, step, row, token), so a seed gives the same tokens
     on every device, eager or compiled, and the CUDA graph needs no generator state.

Rows that produced an eos keep running (shapes are static) but their later tokens are padding with log-prob 0.
Vision tokens (<|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>, <|vision_pad|>) are never sampled
(trl #3847).

What it simplifies: on the CPU (and with DecodeOptions attention "sdpa" or "math") attention reads the whole static
cache every step, masked, rather than only the slots written so far (the Triton attention of CUDA's default reads
the written ones only); for GRPO batches (64 rows of ~800 slots) the whole cache adds about 8% (3B) to 12% (8B) to a
step's bytes (facts/performance.md §2, static-cache caveat). Qwen3-VL-MoE decodes without a CUDA graph (its routing
has data-dependent shapes). No beam search, no repetition penalty, no stop strings.

Shapes: B prompts, n answers per prompt, N = B*n rows, T0 prompt length (padding included), S cache slots,
V vocabulary, L generated length.
"""

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .rope import get_rope_index
from .text import MLP, KVCache, attention, decode_attention, mrope_cos_sin

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1 = all tokens


@dataclass(frozen=True)
class DecodeOptions:
    """How the decode step is built. Each is timed against the weight-bandwidth floor, with a per-kernel profile,
    by benchmarks/profile_decode.py (results: benchmarks/NOTES_sampler.md). The defaults are the fastest measured
    (H100, Qwen2.5-VL-3B / Qwen3-VL-8B shapes): at one row the kernel layers, 2.89 / 6.00 ms per step against 3.38 /
    6.92 ms for the best compiled layer in the same process (session 1's step: 4.39 / 7.45 ms); at 64 rows, the cache
    half written, the row kernels' first version, 3.38 / 6.39 ms against 3.69 / 6.60 ms for the compiled layer with
    fused weights and the split-KV attention (H200, profile_rollout.py; the row kernels now: 3.08 / 6.20 ms). For the
    compiled layer, fuse=() saves the fused copies' memory (3.4 / 8.4 GiB during a call of several rows); the kernel
    layers fuse q/k/v only (0.35 / 1.69 GiB)."""
    attention: str = "auto"  # "sdpa"; "math": text.decode_attention, the T = 1 attention written out for
    # inductor; "triton": kernels/decode_attention.py, split-KV over the written slots only (CUDA, or the CPU under
    # TRITON_INTERPRET=1); "auto": math for a single row (3.36 vs 3.65 ms); for more, triton on CUDA when Triton
    # imports (64 rows, the cache half written, H200: 0.76x SDPA's time a layer at 3B, 0.60x at 8B; SDPA reads the
    # unwritten cache too), else SDPA (64 rows: 4.92 vs 9.15 ms for math)
    fuse: tuple = ("qkv", "gate_up")  # projections the compiled step reads as one matmul each (fuse_weights)
    coordinate_descent: bool = True  # inductor's coordinate_descent_tuning (gpt-fast): one-row matmuls become
    # tuned Triton reductions instead of cuBLAS calls (torch/_inductor/decomposition.py, mm); compiles ~25 s
    layer: str = "kernels"  # a step of one row on CUDA runs each plain decoder layer as the six hand-written
    # Triton launches of kernels/decode_layer.py (run_layer_kernels, with its own fused q/k/v weight whatever
    # `fuse` says); a step of several rows as cuBLAS's q/k/v product and kernels/decode_rows.py's launches
    # (run_layer_rows, likewise); "compiled": through run_layer and inductor

    def __post_init__(self):
        if self.attention not in ("auto", "sdpa", "math", "triton") or not set(self.fuse) <= {"qkv", "gate_up"} \
                or self.layer not in ("compiled", "kernels"):
            raise ValueError(f"unknown decode options {self}")

    def kernel_layers(self, token):
        """Whether a step over rows `token` (N,) runs its plain layers as run_layer_kernels: one row, on CUDA (or
        on the CPU through Triton's interpreter when MINIVL_KERNELS=triton, for tests)."""
        return self.layer == "kernels" and token.shape[0] == 1 and (
            token.is_cuda or os.environ.get("MINIVL_KERNELS") == "triton")

    def row_kernels(self, token):
        """Whether a step over rows `token` (N,) runs its plain layers as run_layer_rows: several rows, on CUDA (or
        on the CPU through Triton's interpreter when MINIVL_KERNELS=triton, for tests)."""
        return self.layer == "kernels" and token.shape[0] > 1 and (
            token.is_cuda or os.environ.get("MINIVL_KERNELS") == "triton")

    def attention_fn(self, token):
        """The attention of a compiled step over rows `token` (N,)."""
        rows = token.shape[0]
        if self.attention == "triton" or (self.attention == "auto" and rows > 1 and token.is_cuda and
                                          kernels_importable()):
            import kernels  # imported when first used: Triton with it
            kernels.check_ours()
            from kernels.decode_attention import decode_attention as split_kv
            return split_kv
        math = self.attention == "math" or (self.attention == "auto" and rows == 1)
        return decode_attention if math else attention


def kernels_importable():
    """Whether minivl's Triton kernels can run here: `import triton` works, and `kernels` is minivl's package (not
    Hugging Face's of the same name, see kernels/__init__.py; with that one, "auto" stays with SDPA)."""
    try:
        import kernels
    except ImportError:
        return False
    return getattr(kernels, "MINIVL_KERNELS", False) is True and kernels.triton_available()


DECODE = DecodeOptions()  # what generate uses unless given decode=


class Fused(NamedTuple):
    """One decoder layer's projections that read the same input, as one weight each (None: not fused)."""
    qkv: torch.Tensor = None  # ((H + 2K) * Dh, D): q_proj, k_proj, v_proj weights stacked in that order
    qkv_bias: torch.Tensor = None  # ((H + 2K) * Dh,): Qwen2/2.5's biases
    gate_up: torch.Tensor = None  # (2I, D): gate_proj over up_proj


@dataclass
class Generation:
    tokens: torch.Tensor  # (N, L) right-padded with the pad id
    lengths: torch.Tensor  # (N,) generated tokens, the eos included
    logprobs: torch.Tensor  # (N, L) float32, 0 on padding
    truncated: torch.Tensor  # (N,) True where max_new_tokens was reached without an eos


@dataclass
class DecodeState:
    """Everything a decode step reads and writes: tensors updated in place, which a CUDA graph replays on."""
    cache: KVCache  # (N, K, S, Dh) per layer; cache.positions (1,) is the slot of the token fed next
    key_valid: torch.Tensor  # (N, S) bool: False on the prompt's left padding
    delta: torch.Tensor  # (N,) rope delta: the token in slot s has position s + delta
    token: torch.Tensor  # (N,) the last sampled token, fed at the next step
    step: torch.Tensor  # () index of the next token to sample
    done: torch.Tensor  # (N,) bool: an eos was sampled
    lengths: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, max_new_tokens)
    logprobs: torch.Tensor  # (N, max_new_tokens) float32
    logits: torch.Tensor  # (N, V) float32 logits of the last step, for tests
    banned: torch.Tensor  # (nb,) token ids never sampled
    eos: torch.Tensor  # (ne,) token ids that end a row
    seed: torch.Tensor  # () int64
    pad_id: int
    decode: DecodeOptions
    fused: list  # one Fused per decoder layer, made for this call from the live weights
    rotary: tuple = None  # one row through the kernel layers: cos and signed sin (S, Dh) of every slot's position

    def small_tensors(self):
        return [self.cache.positions, self.token, self.step, self.done, self.lengths, self.tokens, self.logprobs]


def vision_token_ids(cfg):
    """Token ids an answer may never contain. Every Qwen-VL tokenizer puts <|vision_pad|> right after
    <|vision_end|> (151652 start, 151653 end, 151654 pad); config.json names the other four."""
    ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
           cfg.vision_end_token_id + 1}
    return sorted(i for i in ids if i < cfg.text.vocab_size)


# ---------------------------------------------------------------------------------------------- sampling

def _mul32(x, c):
    # (x * c) mod 2**32 for 0 <= x < 2**32, in two halves of c so that int64 never overflows
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & 0xFFFFFFFF


def _hash32(x):
    # "lowbias32" (C. Wellons, hash-prospector): a bijection of 32-bit integers with good avalanche
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed, step, rows, vocab_size):
    """Gumbel(0, 1) noise (rows, V), float32, a pure function of (seed, step, row, token)."""
    device = step.device
    key = _hash32(_hash32((seed & 0xFFFFFFFF) ^ step) ^ torch.arange(rows, device=device))  # (rows,)
    bits = _hash32(torch.arange(vocab_size, device=device) ^ key[:, None]) >> 8  # (rows, V) 24 random bits
    u = (bits.float() + 0.5) * 2.0**-24  # uniform in (0, 1), exactly representable in float32
    return -torch.log(-torch.log(u))


def support_logits(logits, sampling, banned):
    """logits (N, V) float32 -> the logits sampling draws from: temperature-scaled, -inf outside the support
    (banned tokens, then top-k, then top-p, the order of transformers' logits warpers). Greedy keeps the
    temperature at 1 here, so that its log-probs are those of the model."""
    x = logits / sampling.temperature if sampling.temperature > 0 else logits
    x = x.index_fill(1, banned, float("-inf"))
    if sampling.top_k > 0:
        kth = x.topk(min(sampling.top_k, x.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th value stay, as in transformers
    if sampling.top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p (transformers' TopPLogitsWarper)
        sorted_x, order = x.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_x.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= sampling.top_p  # the mass before it already reaches top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    return x


def pick(logits, sampling, banned, seed, step):
    """Next token (N,) and its log-prob (N,) float32 under the support distribution, without a host sync."""
    x = support_logits(logits, sampling, banned)  # (N, V)
    if sampling.temperature > 0:
        token = argmax_rows(x + gumbel_noise(seed, step, *x.shape))  # Gumbel-max: a draw from softmax(x)
    else:
        token = argmax_rows(x)
    return token, x.log_softmax(dim=-1).gather(1, token[:, None])[:, 0]


def argmax_rows(x, chunk=1024):
    """x (N, V) -> (N,): the index of each row's first maximum, found in two levels, because inductor does not
    split an argmax: over one row of V = 151,936 it was one program's work, 23 us a step (H200, session 6)."""
    N, V = x.shape
    x = F.pad(x, (0, -V % chunk), value=float("-inf")).view(N, -1, chunk)  # (N, C, chunk)
    best, at = x.max(dim=-1)  # (N, C) each chunk's first maximum
    c = best.argmax(dim=-1, keepdim=True)  # (N, 1) the first chunk holding the row's maximum
    return c[:, 0] * chunk + at.gather(1, c)[:, 0]


def record(state, logits, sampling):
    """Sample every row's next token from logits (N, V) and write it at output column state.step."""
    token, logprob = pick(logits, sampling, state.banned, state.seed, state.step)
    active = ~state.done
    token = torch.where(active, token, state.pad_id)  # finished rows only pad
    logprob = torch.where(active, logprob, 0.0)
    column = state.step.view(1)
    state.tokens.index_copy_(1, column, token[:, None])
    state.logprobs.index_copy_(1, column, logprob[:, None])
    state.lengths.add_(active.long())
    state.done.logical_or_((token[:, None] == state.eos).any(dim=-1) & active)
    state.token.copy_(token)
    state.logits.copy_(logits)
    state.step.add_(1)


# --------------------------------------------------------------------------------------- prefill, decode

def fuse_weights(model, groups):
    """One Fused per decoder layer: the groups named in `groups` ("qkv", "gate_up") stacked into one weight.

    At one token per row each projection is a matrix-vector product, bound by latency more than by bandwidth
    when small (k and v are 2048 x 256 at Qwen2.5-VL-3B): fewer, larger ones stream closer to the bandwidth.
    The copies are made from the live parameters at every generate call, since a trainer changes them between
    calls; they cost memory for that call (both groups: about the decoder's weights once more). A group stays
    unfused where its projections are not plain nn.Linear (LoRA adapters) or the MLP is a MoE block.
    """
    fused = []
    for layer in model.model.language_model.layers:
        attn, mlp, parts = layer.self_attn, layer.mlp, {}
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        if "qkv" in groups and all(type(m) is nn.Linear for m in qkv):
            parts["qkv"] = torch.cat([m.weight for m in qkv])  # ((H + 2K) * Dh, D)
            if attn.q_proj.bias is not None:
                parts["qkv_bias"] = torch.cat([m.bias for m in qkv])
        gate_up = (mlp.gate_proj, mlp.up_proj) if type(mlp) is MLP else ()
        if "gate_up" in groups and gate_up and all(type(m) is nn.Linear for m in gate_up):
            parts["gate_up"] = torch.cat([m.weight for m in gate_up])  # (2I, D)
        fused.append(Fused(**parts))
    return fused


def prefill(model, batch, num_return_sequences, max_new_tokens, sampling, eos, pad_id, seed, decode=DECODE):
    """Run the prompts once, copy their cache n times, sample the first token -> DecodeState (which also holds
    the decode options and the fused weights they ask for)."""
    cfg, text_cfg, device, n = model.cfg, model.cfg.text, model.device, num_return_sequences
    input_ids = batch["input_ids"].to(device)
    B, T0 = input_ids.shape
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    vision = {k: batch[k].to(device) for k in VISION_KEYS if batch.get(k) is not None}
    position_ids, deltas = get_rope_index(cfg, input_ids, attention_mask, vision.get("image_grid_thw"),
                                          vision.get("video_grid_thw"), vision.get("second_per_grid_ts"))
    layers, kv_heads, head_dim = text_cfg.num_hidden_layers, text_cfg.num_key_value_heads, text_cfg.head_dim

    prompt_cache = KVCache(layers, B, kv_heads, T0, head_dim, model.dtype, device)
    prompt_cache.positions = torch.arange(T0, device=device)
    hidden = model.hidden_states(input_ids, attention_mask, position_ids=position_ids, cache=prompt_cache,
                                 **vision)  # (B, T0, D)
    logits = model.lm_head(hidden[:, -1]).float()  # (B, V): left padding puts every prompt's last token last

    N, S = B * n, -(-(T0 + max_new_tokens) // 16) * 16  # slots rounded up for aligned attention masks
    cache = KVCache(layers, N, kv_heads, S, head_dim, model.dtype, device)
    for k, v, pk, pv in zip(cache.k, cache.v, prompt_cache.k, prompt_cache.v):
        k[:, :, :T0] = pk.repeat_interleave(n, dim=0)  # (N, K, T0, Dh): the n answers of a prompt share it
        v[:, :, :T0] = pv.repeat_interleave(n, dim=0)
    del prompt_cache
    cache.positions = torch.full((1,), T0, device=device)
    cache.shared = (n, T0)  # the row kernels read a prompt's slots from its first copy
    key_valid = torch.ones(N, S, dtype=torch.bool, device=device)
    key_valid[:, :T0] = attention_mask.bool().repeat_interleave(n, dim=0)
    i64 = dict(dtype=torch.long, device=device)
    state = DecodeState(
        cache=cache, key_valid=key_valid, delta=deltas[:, 0].repeat_interleave(n), token=torch.zeros(N, **i64),
        step=torch.zeros((), **i64), done=torch.zeros(N, dtype=torch.bool, device=device),
        lengths=torch.zeros(N, **i64), tokens=torch.full((N, max_new_tokens), pad_id, **i64),
        logprobs=torch.zeros(N, max_new_tokens, device=device),
        logits=torch.zeros(N, text_cfg.vocab_size, device=device),
        banned=torch.tensor(vision_token_ids(cfg), **i64), eos=torch.tensor(eos, **i64),
        seed=torch.tensor(seed, **i64), pad_id=pad_id, decode=decode, fused=[])
    kernel_layers = decode.kernel_layers(state.token)
    # run_layer_kernels and run_layer_rows read gate and up from their own weights: no fused copy for them
    state.fused = fuse_weights(model, ("qkv",) if kernel_layers or decode.row_kernels(state.token) else decode.fuse)
    if kernel_layers and type(model.model.language_model.embed_tokens) is nn.Embedding:
        slots = (torch.arange(S, device=device) + state.delta).view(1, 1, S).expand(3, 1, S)  # text: t = h = w
        cos, sin = mrope_cos_sin(slots, text_cfg.head_dim, text_cfg.rope_theta, text_cfg.mrope_section,
                                 text_cfg.mrope_interleaved, model.dtype)
        state.rotary = (cos[0], sin[0])  # (S, Dh) each, read by kernels/decode_layer.step_inputs
    record(state, logits.repeat_interleave(n, dim=0), sampling)
    return state


class LayerCache:
    """The cache of one layer, as Attention sees it. update() ignores the layer index, so that one compiled
    layer function serves every layer (torch.compile specialises on integers and would compile 36 copies)."""

    def __init__(self, cache, layer):
        self.k, self.v, self.positions = cache.k[layer], cache.v[layer], cache.positions
        self.shared = cache.shared

    def update(self, layer, k, v):
        self.k.index_copy_(2, self.positions, k)  # (N, K, S, Dh) written at the current slot
        self.v.index_copy_(2, self.positions, v)
        return self.k, self.v


def step_inputs(text, state):
    """Embeddings (N, 1, D), rotary tables (N, 1, Dh) and mask (N, 1, 1, S) of the tokens fed this step."""
    c, (N, S) = text.cfg, state.key_valid.shape
    slot = state.cache.positions  # (1,)
    x = text.embed_tokens(state.token[:, None])  # (N, 1, D)
    position_ids = (slot + state.delta).view(1, N, 1).expand(3, N, 1)  # a text token: t = h = w
    cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved, x.dtype)
    mask = state.key_valid & (torch.arange(S, device=slot.device) <= slot)  # (N, S): the prompt, answers so far
    return x, cos, sin, mask[:, None, None, :]


def linear(x, weight, bias=None):
    # the bias added apart: under coordinate-descent tuning inductor turns a one-row mm into a Triton reduction
    # (and fuses this add into it), but it leaves addmm, the linear with a bias, to cuBLAS
    y = F.linear(x, weight)
    return y if bias is None else y + bias


def run_layer(layer, x, cos, sin, mask, layer_cache, fused, attention_fn):
    """DecoderLayer.forward for the decode step: with `fused` weights, q/k/v and gate/up are one matmul each."""
    attn, mlp = layer.self_attn, layer.mlp
    h = layer.input_layernorm(x)  # (N, 1, D)
    if fused.qkv is None:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    else:
        sizes = [attn.num_heads * attn.head_dim] + [attn.num_kv_heads * attn.head_dim] * 2
        q, k, v = linear(h, fused.qkv, fused.qkv_bias).split(sizes, dim=-1)  # (N, 1, H*Dh), (N, 1, K*Dh) x 2
    x = x + attn.attend(q, k, v, cos, sin, mask, layer_cache, attention_fn)
    h = layer.post_attention_layernorm(x)
    if fused.gate_up is None:
        return x + mlp(h)
    gate, up = linear(h, fused.gate_up).chunk(2, dim=-1)  # (N, 1, I) each
    return x + mlp.down_proj(F.silu(gate) * up)


def kernels_can_run(layer, fused):
    """Whether run_layer_kernels can take this layer: plain linear projections (no LoRA adapter), a dense MLP."""
    attn, mlp = layer.self_attn, layer.mlp
    power_of_two = attn.head_dim >= 16 and attn.head_dim & (attn.head_dim - 1) == 0  # the attention's dots
    return fused.qkv is not None and type(mlp) is MLP and power_of_two and all(
        type(m) is nn.Linear for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def run_layer_kernels(layer, x, cos, sin, mask, layer_cache, fused):
    """run_layer for one row in six hand-written Triton launches (kernels/decode_layer.py): every small op rides
    in a matrix-vector product's prologue or epilogue. x (1, 1, D)."""
    from kernels.decode_layer import attend, matvec_residual, norm_matvec

    attn, mlp, norm, post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    qkv = norm_matvec(x, norm.weight, norm.eps, fused.qkv, fused.qkv_bias)  # (1, 1, (H + 2K) * Dh)
    qn, kn, eps = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else (None, None, 0.0)
    a = attend(qkv, cos, sin, qn, kn, eps, layer_cache.k, layer_cache.v, layer_cache.positions, mask)  # (1,H,1,Dh)
    x = matvec_residual(a, attn.o_proj.weight, x)
    act = norm_matvec(x, post.weight, post.eps, mlp.gate_proj.weight, up_weight=mlp.up_proj.weight)  # (1, 1, I)
    return matvec_residual(act, mlp.down_proj.weight, x)


def rows_can_run(layer, fused):
    """Whether run_layer_rows can take this layer: fused q/k/v weights, plain o, gate, up and down projections (no
    LoRA adapter, a dense MLP), a head dim the attention's dots take."""
    attn, mlp, head_dim = layer.self_attn, layer.mlp, layer.self_attn.head_dim
    return fused.qkv is not None and type(mlp) is MLP and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and all(
        type(m) is nn.Linear and m.bias is None for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def run_layer_rows(layer, x, delta, cos, sin, mask, layer_cache, fused):
    """run_layer for several rows: cuBLAS's q/k/v product and kernels/decode_rows.py's launches. x (N, 1, D)
    is the residual stream without `delta`, the previous layer's MLP output as partial sums (P, N, 1, D) (None at the
    first layer), which this layer's first norm adds -> (x, delta) for the next layer."""
    from kernels.decode_rows import add_norm, attend, gated_linear, split_linear

    attn, mlp, norm, post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    x, h = add_norm(x, delta, norm.weight, norm.eps)
    qkv = F.linear(h, fused.qkv, fused.qkv_bias)  # (N, 1, (H + 2K) * Dh)
    qn, kn, eps = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else (None, None, 0.0)
    a = attend(qkv, cos, sin, qn, kn, eps, layer_cache.k, layer_cache.v, layer_cache.positions, mask,
               layer_cache.shared)  # (N, H, 1, Dh)
    x, h = add_norm(x, split_linear(a.view(x.shape[0], 1, -1), attn.o_proj.weight), post.weight, post.eps)
    act = gated_linear(h, mlp.gate_proj.weight, mlp.up_proj.weight)  # (N, 1, I)
    return x, split_linear(act, mlp.down_proj.weight)  # (N, 1, D), (P, N, 1, D)


def step_outputs(model, state, x, sampling):
    """Final norm, lm_head, sample; then move to the next slot."""
    step_sample(state, model.lm_head(model.model.language_model.norm(x)[:, 0]), sampling)


def step_sample(state, logits, sampling):
    """Sample from logits (N, V) in the model's dtype; then move to the next slot."""
    record(state, logits.float(), sampling)
    state.cache.positions.add_(1)


def head_kernel_can_run(model):
    return type(model.lm_head) is nn.Linear and model.lm_head.bias is None


def head_logits_kernel(model, x):
    """Final norm + lm_head for one row as kernels/decode_layer.py's norm_matvec -> logits (1, V). Inductor's
    tuned reduction for it read the 0.62 GB head of Qwen2.5-VL-3B in 160 to 258 us depending on the build
    (H200, session 6); the kernel streams it the same way in every process."""
    from kernels.decode_layer import norm_matvec

    norm = model.model.language_model.norm
    return norm_matvec(x, norm.weight, norm.eps, model.lm_head.weight)[:, 0]


def step_inputs_kernel(text, state):
    """step_inputs for one row in one launch (kernels/decode_layer.py), from the rotary tables of prefill: inductor
    made four kernels of it (embedding, rotary, mask, slot); 0.997x the Qwen2.5-VL-3B step (H200, session 8)."""
    from kernels.decode_layer import step_inputs as gather

    return gather(state.token, text.embed_tokens.weight, state.cache.positions, *state.rotary, state.key_valid)


def greedy_record_kernel(state, logits):
    """step_sample for one row and greedy sampling in two launches (kernels/decode_layer.py): banned ids, the
    first maximum and its log-prob, the outputs, the next slot. Compiled, that tail was ~9 small kernels; this is
    0.996x the Qwen2.5-VL-3B step (H200, benchmarks/NOTES_sampler.md, session 8). Sampling keeps the compiled tail."""
    from kernels.decode_layer import greedy_record

    greedy_record(logits, state.banned, state.eos, state.pad_id, state.token, state.step, state.done,
                  state.lengths, state.tokens, state.logprobs, state.cache.positions, state.logits)


def sample_record_kernel(state, logits, sampling):
    """step_sample for several rows and no top-k or top-p in three launches (kernels/decode_rows.py): inductor made
    ~10 kernels of it, ~130 us of a 64-row step, against ~92 (H200, benchmarks/NOTES_sampler.md, session 10)."""
    from kernels.decode_rows import sample_record

    sample_record(logits, sampling.temperature, state.banned, state.eos, state.pad_id, state.seed, state.token,
                  state.step, state.done, state.lengths, state.tokens, state.logprobs, state.cache.positions,
                  state.logits)


PARTS = (step_inputs, run_layer, step_outputs, step_sample)


def decode_step(model, state, sampling, parts=PARTS):
    """Feed every row's last token at slot cache.positions and sample the next one, in place: TextModel.forward
    for one text token per row. parts: PARTS, or their compiled versions."""
    begin, layer_fn, end, sample = parts
    text = model.model.language_model
    attention_fn = state.decode.attention_fn(state.token)
    kernel_layers, row_kernels = state.decode.kernel_layers(state.token), state.decode.row_kernels(state.token)
    if kernel_layers or row_kernels:
        import kernels  # imported when first used: Triton with it
        kernels.check_ours()
    if kernel_layers and state.rotary is not None:
        x, cos, sin, mask = step_inputs_kernel(text, state)
    else:
        x, cos, sin, mask = begin(text, state)
    delta = None  # run_layer_rows leaves its MLP output to be added by the next norm
    if row_kernels:
        from kernels.decode_rows import add_norm, add_partials
    for i, layer in enumerate(text.layers):
        if kernel_layers and kernels_can_run(layer, state.fused[i]):
            x = run_layer_kernels(layer, x, cos, sin, mask, LayerCache(state.cache, i), state.fused[i])
        elif row_kernels and rows_can_run(layer, state.fused[i]):
            x, delta = run_layer_rows(layer, x, delta, cos, sin, mask, LayerCache(state.cache, i), state.fused[i])
        else:
            if delta is not None:  # a layer the row kernels cannot take (LoRA) after one they took
                x, delta = add_partials(x, delta), None
            x = layer_fn(layer, x, cos, sin, mask, LayerCache(state.cache, i), state.fused[i], attention_fn)
    if delta is not None:  # the final norm adds it
        norm = text.norm
        logits = model.lm_head(add_norm(x, delta, norm.weight, norm.eps)[1][:, 0])  # (N, V)
        if sampling.top_k == 0 and sampling.top_p == 1.0:
            sample_record_kernel(state, logits, sampling)
        else:
            sample(state, logits, sampling)
    elif kernel_layers and head_kernel_can_run(model):
        logits = head_logits_kernel(model, x)  # (1, V)
        if sampling == Sampling(0.0):
            greedy_record_kernel(state, logits)
        else:
            sample(state, logits, sampling)
    else:
        end(model, state, x, sampling)  # x: (N, 1, D)


_compiled_parts = {}  # inductor options -> PARTS through torch.compile with them


def compiled_parts(decode):
    """PARTS through torch.compile, once per process and set of inductor options. One decoder layer is compiled
    and serves all layers ("regional compilation"): compile time does not grow with depth."""
    options = {"coordinate_descent_tuning": True} if decode.coordinate_descent else {}
    key = tuple(sorted(options.items()))
    if key not in _compiled_parts:
        _compiled_parts[key] = tuple(torch.compile(f, fullgraph=True, options=options) for f in PARTS)
    return _compiled_parts[key]


def forget_compiled():
    """Drop every compiled step: the next one compiles afresh, with static shapes. A step compiled before for
    other shapes would otherwise be recompiled with dynamic ones (dynamo's automatic_dynamic_shapes), which was
    measured 1.39x slower at Qwen2.5-VL-3B (benchmarks/NOTES_sampler.md, session 5)."""
    torch._dynamo.reset()
    _compiled_parts.clear()


def cuda_graph_step(model, state, sampling, compile=True):
    """The decode step captured once as a CUDA graph: calling the result replays it.

    With compile, its parts (PARTS) go through torch.compile first (with the inductor options of state.decode),
    so that inductor fuses the many small ops (norms, rotary, masks, sampling) that would otherwise cost a
    kernel each.
    """
    parts = compiled_parts(state.decode) if compile else PARTS
    saved = [t.clone() for t in state.small_tensors()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune and warm the allocator outside the capture
        for _ in range(2):
            decode_step(model, state, sampling, parts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(model, state, sampling, parts)
    # the warm-up steps advanced the state; the cache slots they wrote are masked until rewritten
    for t, s in zip(state.small_tensors(), saved):
        t.copy_(s)
    return graph.replay


# ------------------------------------------------------------------------------------------------ generate

@torch.no_grad()
def generate(model, batch, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=1,
             eos_token_id=None, seed=None, pad_token_id=None, stream=None, check_every=None, compile=True,
             decode=None):
    """Sample max_new_tokens (fewer if every row ends with an eos) for every prompt of `batch` -> Generation.

    temperature 0 is greedy. eos_token_id: an id or a list of ids. pad_token_id fills the tokens after an eos
    (default: the first eos, else 0). stream(tokens (N, i), lengths (N,)) is called every check_every steps
    (default 16 on CUDA, 1 on the CPU) and at the end. compile=False captures the eager step (CUDA only).
    decode: DecodeOptions for the decode step (default: the module's DECODE).
    """
    if max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("max_new_tokens and num_return_sequences must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, got {temperature}, {top_p}, "
                         f"{top_k}")
    if eos_token_id is None:  # transformers' default: the checkpoint's generation_config.json ([] never stops)
        eos_token_id = model.eos_token_ids
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if seed is None:
        seed = int(torch.randint(2**31, ()))  # torch.manual_seed decides it
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    decode = decode or DECODE
    state = prefill(model, batch, num_return_sequences, max_new_tokens, sampling, eos, pad_id, seed, decode)

    # Qwen3-VL-MoE routes tokens with data-dependent shapes (a host sync per layer), which a CUDA graph cannot
    # hold: it decodes eagerly, like the CPU
    graphed = state.token.device.type == "cuda" and model.cfg.text.num_experts == 0
    check_every = check_every or (16 if graphed else 1)
    step = None
    for i in range(1, max_new_tokens):
        if i % check_every == 0:
            if stream:
                stream(state.tokens[:, :i], state.lengths)
            if eos and bool(state.done.all()):  # the only host sync of the loop
                break
        if step is None:  # made here: with max_new_tokens = 1 there is nothing to compile or capture
            step = cuda_graph_step(model, state, sampling, compile) if graphed else (
                lambda: decode_step(model, state, sampling))
        step()
    L = int(state.lengths.max())
    if stream:
        stream(state.tokens[:, :L], state.lengths)
    return Generation(tokens=state.tokens[:, :L], lengths=state.lengths, logprobs=state.logprobs[:, :L],
                      truncated=~state.done)
