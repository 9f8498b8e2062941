"""Tiny checkpoints written by transformers' own Qwen classes, and inputs that exercise them.

The checkpoints carry the tensor names transformers writes, so loading them is the same code path as loading a
downloaded model. Token ids are kept small (a 256-token vocabulary) so the checkpoints build in milliseconds.
"""

import contextlib
import importlib
import os
import re

import torch

IDS = dict(vision_start_token_id=200, vision_end_token_id=201, image_token_id=202, video_token_id=203,
           bos_token_id=204, eos_token_id=205)
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}


def hf_config(family, tie=False, rope_format="rope_parameters", text_extra=None, vision_extra=None):
    """A tiny transformers config of one family. rope_format "rope_scaling" gives the flat transformers-4 style;
    text_extra / vision_extra override fields of the text / vision config."""
    import transformers as tf

    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 1e4}
    else:
        rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 1e4}
    text = dict(TEXT, **{rope_format: rope}, tie_word_embeddings=tie, **IDS)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
        cls = tf.Qwen2VLConfig
    elif family == "qwen2_5_vl":
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
        cls = tf.Qwen2_5_VLConfig
    else:
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
        text.update(head_dim=16)
        cls = tf.Qwen3VLConfig
        if family == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1)
            cls = tf.Qwen3VLMoeConfig
    text.update(text_extra or {})
    vision.update(vision_extra or {})
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **IDS)


def hf_model(family, **kw):
    import transformers as tf

    torch.manual_seed(0)
    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
           "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration}[family]
    model = cls(hf_config(family, **kw)).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if re.search(r"(q_proj|k_proj|qkv)\.weight", name):
                p.mul_(8)  # sharper attention, so that positions and masks change the logits visibly
            if "pos_embed" in name:
                p.mul_(25)  # as large as the patch embedding, so that its resampling shows in the logits
    return model


def save_hf(family, directory, **kw):
    model = hf_model(family, **kw)
    model.save_pretrained(directory)
    return model


def vision_block(grid, merge=2, video=False):
    t, h, w = grid
    pad = IDS["video_token_id"] if video else IDS["image_token_id"]
    return [IDS["vision_start_token_id"]] + [pad] * (t * h * w // merge**2) + [IDS["vision_end_token_id"]]


def qwen3_video_tokens(grid, merge=2):
    """Qwen3-VL puts a timestamp before each temporal patch; random text tokens stand in for "<0.5 seconds>"."""
    t, h, w = grid
    out = []
    for k in range(t):
        out += [10 + k, 11 + k, 12] + vision_block((1, h, w), merge, video=True)
    return out


def text(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 190, (n,), generator=g).tolist()


def pixels(family, grids, seed=0):
    P = PATCH[family]
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3 * 2 * P * P, generator=g), torch.tensor(grids)


def left_pad(rows, pad_id=0):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def mm_token_type_ids(input_ids):
    """transformers 5 computes positions from token types (0 text, 1 image, 2 video)."""
    return (input_ids == IDS["image_token_id"]).int() + 2 * (input_ids == IDS["video_token_id"]).int()


@contextlib.contextmanager
def interpreter_flag():
    """TRITON_INTERPRET=1 while the block runs (imports decorating @triton.jit functions then make them run on the
    CPU), restored afterwards: the tests that launch kernels set it again through the `triton_cpu` fixture."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def import_interpreted(module_name, kernel_name):
    """A kernels module whose @triton.jit functions were decorated under TRITON_INTERPRET=1 (the flag must be set
    when the decorators run), so they run on CPU tensors."""
    with interpreter_flag():
        module = importlib.import_module(module_name)
        if type(getattr(module, kernel_name)).__name__ != "InterpretedFunction":  # imported earlier without it
            module = importlib.reload(module)
    round_bf16_to_nearest_in_the_interpreter()
    return module


def round_bf16_to_nearest_in_the_interpreter():
    """Triton's interpreter (3.9) casts float32 to bfloat16 by dropping the low 16 bits (round toward zero), where
    the GPU rounds to nearest even, as PyTorch does. A kernel that rounds a product to bf16 before its next op then
    drifts by a step per rounding on the CPU only; one seed in a few hundred pushed a gated product past its
    tolerance. Cast through PyTorch instead, so that the interpreter rounds as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    truncating = InterpreterBuilder.cast_impl
    if getattr(truncating, "rounds_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return TensorHandle(bits, dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl.rounds_to_nearest = True
    InterpreterBuilder.cast_impl = cast_impl


def fresh_generator():
    """A generator with a fresh seed from the OS, returned too so that a failure can print it."""
    seed = int.from_bytes(os.urandom(6), "little")
    return torch.Generator().manual_seed(seed), seed


# What a compile script (compile_for_h100) starts with: build(kernel, pointer types, scalar types, constexprs)
COMPILE_HEADER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, pointers, scalars, constexprs):
    sig = dict(pointers, **scalars, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))

bf = "*bf16"
"""


def compile_for_h100(script):
    """Run COMPILE_HEADER + script (build(...) calls) in a fresh interpreter without TRITON_INTERPRET, so that the
    kernels are compiled for sm_90 (no GPU needed): the interpreter runs what the GPU compiler rejects. Skips where
    Triton's bundled ptxas is missing."""
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", COMPILE_HEADER + script + '\nprint("compiled")\n'], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
