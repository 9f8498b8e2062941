"""The sampler's fast decode steps: backends that plug in beside its reference step (minivl/sampler.py).

    step = kernels.decode.prepare(name, model, state, sampling, parts)   # once per generate call; None: no backend
    step(state)                                                           # one decode step, in place

A backend runs the reference step's work as Triton kernels where it can, and the reference's own pieces `parts`
(the sampler's PARTS: inputs, layer, head, sample; compiled on CUDA) where it cannot: a MoE layer, a projection that
is neither nn.Linear nor a LoRA layer, a head dim the attention's dots do not take, top-k or top-p sampling. Each
backend's logits and tokens are tested against the reference step (tests/test_sampler.py).

    one_row  one row: each decoder layer six launches (one_row.py), the step's inputs one, the final norm + lm_head
             one, the greedy tail two
    rows     several rows: each layer cuBLAS's q/k/v product and rows.py's launches, the tail without top-k / top-p
             three

`prepare` reads each layer's weights once per call, as the step reads them (`layer_weights`): q, k and v stacked
into one weight, and a LoRA layer's adapter folded into its weight (W + scale B A, the adapter's output without
dropout), so a model being trained with LoRA (GRPO rollouts) decodes on the same kernels. The folded weights are
copies for the call: with adapters on every projection, about the decoder's weights once more.

They run on CUDA tensors with Triton, or on the CPU under TRITON_INTERPRET=1 with MINIVL_KERNELS=triton (tests).
kernels/ imports nothing from minivl/: a backend sees the model through its module names (the checkpoint's) and the
sampler's state through its fields (DecodeState).
Legend: N rows, D model width, H query heads, K key/value heads, Dh head dim, I MLP width, V vocabulary.
"""
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triton_available

BACKENDS = ("one_row", "rows")


class LayerWeights(NamedTuple):
    """One decoder layer's weights as a backend's step reads them."""
    qkv: torch.Tensor  # ((H + 2K) * Dh, D): q_proj, k_proj, v_proj stacked in that order
    qkv_bias: torch.Tensor  # ((H + 2K) * Dh,) Qwen2/2.5's biases, or None
    o: torch.Tensor  # (D, H * Dh)
    gate: torch.Tensor  # (I, D)
    up: torch.Tensor  # (I, D)
    down: torch.Tensor  # (D, I)


def projection_weight(module):
    """The weight a step reads for a linear layer: an nn.Linear's own; a LoRA layer's (minivl.lora.LoRALinear) with
    its adapter folded in, made for this call; None for anything else."""
    if type(module) is nn.Linear:
        return module.weight
    merged = getattr(module, "merged_weight", None)
    return merged() if merged is not None else None


def layer_weights(layer):
    """LayerWeights of a decoder layer, or None where a backend cannot take it: a MoE block, an MLP activation other
    than SiLU (the kernels compute SiLU), a projection that is neither nn.Linear nor LoRA, biases on o / gate / up /
    down, a head dim that is not a power of two >= 16."""
    attn, mlp, head_dim = layer.self_attn, layer.mlp, layer.self_attn.head_dim
    if not hasattr(mlp, "gate_proj") or getattr(mlp, "hidden_act", "silu") not in ("silu", "swish"):
        return None
    if head_dim < 16 or head_dim & (head_dim - 1):
        return None
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    rest = (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    weights = [projection_weight(m) for m in qkv + rest]
    if any(w is None for w in weights) or any(m.bias is not None for m in rest):
        return None
    bias = torch.cat([m.bias for m in qkv]) if attn.q_proj.bias is not None else None
    return LayerWeights(torch.cat(weights[:3]), bias, *weights[3:])


def runs_here(device):
    """Whether the backends' kernels run on `device`: CUDA with Triton, or the interpreter when MINIVL_KERNELS=triton
    (kernels.use_triton checks TRITON_INTERPRET); never with MINIVL_KERNELS=reference."""
    mode = os.environ.get("MINIVL_KERNELS", "").strip().lower()
    return mode == "triton" or mode != "reference" and device.type == "cuda" and triton_available()


def prepare(name, model, state, sampling, parts):
    """The decode step of this generate call as a function of the state, from backend `name`, or "auto": the
    backend for this many rows, None where it cannot run."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"decode={name!r}: want 'auto', 'reference' or one of {BACKENDS}")
    rows = state.token.shape[0]
    if not runs_here(state.token.device):
        if name == "auto":
            return None
        raise RuntimeError(f"decode={name!r} needs CUDA tensors and Triton (or, on the CPU, MINIVL_KERNELS=triton "
                           "and TRITON_INTERPRET=1)")
    if name == "one_row" and rows != 1:
        raise ValueError(f"decode='one_row' takes one row, not {rows}")
    weights = [layer_weights(layer) for layer in model.model.language_model.layers]
    if name == "one_row" or name == "auto" and rows == 1:
        return one_row_step(model, sampling, parts, weights)
    return rows_step(model, sampling, parts, weights)


def one_row_step(model, sampling, parts, weights):
    """The one_row backend: every small op of a layer rides in a matrix-vector product's prologue or epilogue."""
    from kernels.decode.one_row import attend, greedy_record, matvec_residual, norm_matvec, step_inputs

    text = model.model.language_model
    plain_embedding = type(text.embed_tokens) is nn.Embedding
    plain_head = type(model.lm_head) is nn.Linear and model.lm_head.bias is None
    greedy = sampling.temperature == 0 and sampling.top_k == 0 and sampling.top_p == 1.0

    def layer_step(layer, w, x, cos, sin, mask, cache):  # x (1, 1, D)
        attn, norm, post = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        qkv = norm_matvec(x, norm.weight, norm.eps, w.qkv, w.qkv_bias)  # (1, 1, (H + 2K) * Dh)
        qn, kn, eps = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else (None, None, 0.0)
        a = attend(qkv, cos, sin, qn, kn, eps, cache.k, cache.v, cache.positions, mask)  # (1, H, 1, Dh)
        x = matvec_residual(a, w.o, x)
        act = norm_matvec(x, post.weight, post.eps, w.gate, up_weight=w.up)  # (1, 1, I)
        return matvec_residual(act, w.down, x)

    def step(state):
        if plain_embedding:
            x, cos, sin, mask = step_inputs(state.token, text.embed_tokens.weight, state.slot, state.rotary[0][0],
                                            state.rotary[1][0], state.key_valid)
        else:
            x, cos, sin, mask = parts.inputs(text, state)
        for layer, w, cache in zip(text.layers, weights, state.cache):
            x = layer_step(layer, w, x, cos, sin, mask, cache) if w else parts.layer(layer, x, cos, sin, mask, cache)
        if plain_head:
            logits = norm_matvec(x, text.norm.weight, text.norm.eps, model.lm_head.weight)[:, 0]  # (1, V)
        else:
            logits = parts.head(model, x)
        if state.on_logits:
            state.on_logits(logits.float())
        if greedy:
            greedy_record(logits, state.banned, state.eos, state.pad_id, state.token, state.step, state.done,
                          state.lengths, state.tokens, state.logprobs, state.slot)
        else:
            parts.sample(state, logits, sampling)
    return step


def rows_step(model, sampling, parts, weights):
    """The rows backend: a layer's MLP output is left as split-K partials that the next layer's first norm adds."""
    from kernels.decode.rows import add_norm, add_partials, attend, gated_linear, sample_record, split_linear

    text = model.model.language_model
    plain = sampling.top_k == 0 and sampling.top_p == 1.0

    def layer_step(layer, w, x, delta, cos, sin, mask, cache, shared):
        """x (N, 1, D) the residual stream without `delta`, the last layer's MLP output as partial sums (P, N, 1, D)
        (None at the first layer) -> (x, delta) for the next layer."""
        attn, norm, post = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        x, h = add_norm(x, delta, norm.weight, norm.eps)
        qkv = F.linear(h, w.qkv, w.qkv_bias)  # (N, 1, (H + 2K) * Dh)
        qn, kn, eps = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.qk_norm else (None, None, 0.0)
        a = attend(qkv, cos, sin, qn, kn, eps, cache.k, cache.v, cache.positions, mask, shared)  # (N, H, 1, Dh)
        x, h = add_norm(x, split_linear(a.view(x.shape[0], 1, -1), w.o), post.weight, post.eps)
        return x, split_linear(gated_linear(h, w.gate, w.up), w.down)  # (N, 1, D), (P, N, 1, D)

    def step(state):
        x, cos, sin, mask = parts.inputs(text, state)
        delta = None
        for layer, w, cache in zip(text.layers, weights, state.cache):
            if w:
                x, delta = layer_step(layer, w, x, delta, cos, sin, mask, cache, state.shared)
            else:  # a layer the kernels cannot take, maybe after one they took
                x, delta = add_partials(x, delta), None
                x = parts.layer(layer, x, cos, sin, mask, cache)
        if delta is not None:  # the final norm adds it
            logits = model.lm_head(add_norm(x, delta, text.norm.weight, text.norm.eps)[1][:, 0])  # (N, V)
        else:
            logits = parts.head(model, x)
        if state.on_logits:
            state.on_logits(logits.float())
        if plain:
            sample_record(logits, sampling.temperature, state.banned, state.eos, state.pad_id, state.seed,
                          state.first_row, state.token, state.step, state.done, state.lengths, state.tokens,
                          state.logprobs, state.slot)
        else:
            parts.sample(state, logits, sampling)
    return step
