"""The Qwen2 / Qwen3 text decoder with multimodal rotary positions (M-RoPE).

One file for the decoder of all three families. The differences are two switches read from the config:
  * `attention_bias`: Qwen2/2.5 have biases on q/k/v; Qwen3 has none.
  * `qk_norm`: Qwen3 normalises q and k per head (RMSNorm over head_dim) before the rotary.
and the way M-RoPE spreads the three position rows (temporal, height, width) over the frequencies:
chunked for Qwen2/2.5, interleaved for Qwen3 (see `mrope_cos_sin`). Qwen3-VL-MoE swaps the MLP of a layer for
`SparseMoE`.

Simplified: no sliding window (off in every published config), no dropout. A static KV cache (`KVCache`) is
written by position, so the same forward serves training, prefill and CUDA-graph decoding.

Shapes: B batch, T tokens in this call, S cached tokens, D model width, H query heads, K key/value heads,
Dh head dim, E experts.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The activation names of transformers' ACT2FN, each computed as transformers computes it. Every MLP of every
# family (vision and text, dense and MoE) takes its `hidden_act` from this table. prelu and xielu are missing on
# purpose: they carry learned parameters that no Qwen-VL checkpoint stores.
TANH_GELU_SCALE = math.sqrt(2.0 / math.pi)
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact, with erf
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(TANH_GELU_SCALE * (x + 0.044715 * x**3.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(TANH_GELU_SCALE * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_accurate": lambda x: 0.5 * x * (1 + torch.tanh(TANH_GELU_SCALE * (x + 0.044715 * torch.pow(x, 3)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


def activation(name, field="hidden_act"):
    """The function of an activation name; `field` names where the name came from, for the error."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is an activation minivl does not implement; it knows "
                         f"{', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    # transformers' Qwen2RMSNorm: variance in float32, cast back to the input dtype before the weight
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def signed_sin(sin):
    """sin with its first half negated. With rotate_half(x) = [-x2, x1]: x * cos + rotate_half(x) * sin equals
    x * cos + [x2, x1] * signed_sin, three kernels (mul, flip, addcmul) instead of six."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x, cos, sin_signed):
    """The rotate-half rotary (transformers' apply_rotary_pos_emb) on the last dim of x; sin_signed from
    `signed_sin`. Computed in the dtype of x."""
    shape = x.shape
    swapped = x.unflatten(-1, (2, shape[-1] // 2)).flip(-2).flatten(-2)  # (..., Dh): [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_signed)


def mrope_cos_sin(position_ids, head_dim, theta, mrope_section, interleaved, dtype):
    """cos and signed sin tables (B, T, Dh) for 3-row positions (3, B, T): row 0 time, row 1 height, row 2 width.

    Each of the Dh/2 rotary frequencies takes its angle from one of the three rows. Qwen2/2.5 (transformers'
    `apply_multimodal_rotary_pos_emb`) give contiguous chunks: the first mrope_section[0] frequencies to time,
    the next [1] to height, the last [2] to width. Qwen3 (`apply_interleaved_mrope`) interleaves them
    T H W T H W ... and leaves the tail to time. Angles are computed in float32 and only the final tables are
    cast: bf16 angles lose long positions (a bf16 number near 8192 is a multiple of 64: an angle off by up to 32).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, T, Dh/2)
    owner = torch.zeros(head_dim // 2, dtype=torch.long, device=position_ids.device)  # which row owns a frequency
    if interleaved:
        owner[1 : 3 * mrope_section[1] : 3] = 1
        owner[2 : 3 * mrope_section[2] : 3] = 2
    else:
        # slice fills: repeat_interleave has a data-dependent size that breaks a compiled graph, and
        # torch.tensor(list, device=...) is a host-to-device copy that a CUDA graph cannot capture
        t, h = mrope_section[0], mrope_section[1]
        owner[t : t + h] = 1
        owner[t + h :] = 2
    freqs = freqs.gather(0, owner.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]  # (B, T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, Dh)
    return emb.cos().to(dtype), signed_sin(emb.sin().to(dtype))


def attention(q, k, v, mask):
    """Scaled dot-product attention for (B, H, T, Dh) queries over (B, K, S, Dh) keys and values.

    mask None means plain causal (flash kernels, grouped heads handled by SDPA). With a boolean mask
    (B, 1, T, S) the key/value heads are expanded first, because SDPA's memory-efficient kernel, the one that
    takes a mask, does not group heads. Decoding (T = 1) avoids that copy of the whole cache: the G query heads
    that share a key/value head become G queries of that head, which all see the same keys.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    B, H, T, Dh = q.shape
    if T == 1:
        q = q.reshape(B, k.shape[1], H // k.shape[1], Dh)  # (B, K, G, Dh)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, H, 1, Dh)
    groups = H // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
    v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class KVCache:
    """One decoder layer's static cache of keys and values, allocated once and written by position.

    k, v: (B, K, S_max, Dh). `positions` (T,) are the slots the current tokens go to: one tensor that the caches of
    all layers share, moved on in place. The caller's boolean mask (B, 1, T, S_max) says which slots each query may
    read. Shapes never change, so a decode step can be captured as a CUDA graph.
    """
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def empty(cls, shape, positions, dtype):
        return cls(*(torch.zeros(shape, dtype=dtype, device=positions.device) for _ in "kv"), positions)

    def update(self, k, v):
        self.k.index_copy_(2, self.positions, k)  # (B, K, S_max, Dh) written at T slots
        self.v.index_copy_(2, self.positions, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, D) -> (B, T, D); with a KVCache, this layer's keys and values are written at cache.positions and
        the attention reads the whole cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, K, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, Dh), (B, K, T, Dh)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S_max, Dh)
        out = attention(q, k, v, mask)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    # Gated: down(act(gate(x)) * up(x)), SwiGLU with every published hidden_act (silu); the Qwen2.5-VL vision
    # blocks use the same module with biases
    def __init__(self, dim, hidden, bias=False, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.hidden_act, self.act = act, activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The expert weights of Qwen3-VL-MoE, kept in the checkpoint's layout [E, in, out] (no transpose at load).

    gate_up_proj: (E, D, 2I), gate in the first I columns; down_proj: (E, I, D).
    """

    def __init__(self, num_experts, dim, inter):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, dim))


class SparseMoE(nn.Module):
    # transformers' Qwen3VLMoeTextSparseMoeBlock: softmax router in float32, top-k, weights renormalised to sum
    # to 1 always (transformers reads no norm_topk_prob for this family; config.py refuses false)
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # loop over the experts that received tokens; tokens of one expert are one dense matmul
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            gate, up = (x[token] @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = (self.act(gate) * up) @ self.experts.down_proj[e]  # (n_e, D)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (SparseMoE(cfg) if cfg.is_sparse_layer(layer_idx) else
                    MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act))

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, position_ids, mask=None, deepstack=None, cache=None, trace=None):
        """x: input embeddings (B, T, D); position_ids: (3, B, T); cache: one KVCache per layer, or None. Returns the
        final normed hidden (B, T, D).

        deepstack: (visual_mask (B, T), [features (n_visual, D), ...]) for Qwen3-VL: feature l is added to the
        output of layer l at the visual positions (transformers' `_deepstack_process`).
        """
        c = self.cfg
        cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved,
                                 x.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache)
            if deepstack is not None and i < len(deepstack[1]):
                visual_mask, features = deepstack
                x = x.index_put((visual_mask,), x[visual_mask] + features[i].to(x.dtype))
            if trace is not None:
                trace(f"text.layers.{i}", x)
        return self.norm(x)
