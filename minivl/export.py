"""Merge a LoRA checkpoint into a full model in the official layout, as `swift export --merge_lora true` does.

    python -m minivl.export --adapters output/checkpoint-100 --merge_lora true
    -> output/checkpoint-100-merged/   config.json, model*.safetensors, tokenizer and processor files

The base model is the adapter's `base_model_name_or_path` (or `--model`). The merged model is the base with
every adapter folded in (W += (alpha / r) B A, in float32, then cast to the base dtype) and with the modules that
were trained in full next to LoRA (PEFT's modules_to_save, e.g. a vision tower) copied in: ms-swift #9187 lost
those. Before writing, the merged model's logits are compared with the unmerged adapter model's on a short
prompt with one small random image, and the largest difference is printed. `transformers` and `minivl.load`
open the result.

Simplified: LoRA adapters only (no DoRA), written in the base checkpoint's dtype unless `--torch_dtype` says
otherwise. Tests: tests/test_lora.py.
"""

import argparse
import shutil
from pathlib import Path

import torch

from . import lora
from .checkpoint import load, resolve
from .processor import PROCESSOR_FILES


def tiny_batch(model, seed=0):
    """16 text tokens around one 56x56-pixel image (4 merged tokens): enough to touch every adapter."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    patch = cfg.vision.patch_size
    grid = torch.tensor([[1, 4, 4]])  # (t, h, w) in patches
    pixels = torch.randn(16, 3 * cfg.vision.temporal_patch_size * patch * patch, generator=g)  # (N, C*T*P*P)
    special = (cfg.bos_token_id, cfg.eos_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
               cfg.image_token_id, cfg.video_token_id)
    text = torch.randint(0, min(cfg.text.vocab_size, *special), (16,), generator=g).tolist()  # plain text ids
    ids = text[:8] + [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id] + text[8:]
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_grid_thw": grid}


def merge_checkpoint(adapters, output_dir=None, model=None, dtype=None, check=True, device="cpu"):
    """Write the merged model of an adapter directory; returns (output directory, max |logit difference|)."""
    adapters = Path(adapters)
    base = lora.base_model(adapters, model)
    output_dir = Path(output_dir) if output_dir else adapters.with_name(adapters.name + "-merged")
    merged = load(base, dtype=dtype, device=device)
    lora.load_adapter(merged, adapters)
    diff = None
    if check:
        batch = {k: v.to(device) for k, v in tiny_batch(merged).items()}
        with torch.no_grad():
            before = merged(**batch).float()
            lora.merge(merged)
            diff = float((merged(**batch).float() - before).abs().max())
    else:
        lora.merge(merged)
    merged.save_pretrained(output_dir)
    # tokenizer and processor files: from the adapter directory when the trainer put them there, else the base
    sources = [adapters, resolve(base)]
    for name in PROCESSOR_FILES:
        if name == "config.json":
            continue  # save_pretrained wrote it
        src = next((s / name for s in sources if (s / name).is_file()), None)
        if src is not None:
            shutil.copy(src, output_dir / name)
    return output_dir, diff


def main(argv=None):
    p = argparse.ArgumentParser(description="merge a LoRA checkpoint into a full model (swift export)")
    p.add_argument("--adapters", required=True, help="checkpoint directory holding adapter_config.json")
    p.add_argument("--merge_lora", default="true", choices=["true", "false"],
                   help="minivl's export only merges: must be true")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output_dir", help="default: <adapters>-merged")
    p.add_argument("--torch_dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the merged files (default: the base checkpoint's)")
    p.add_argument("--check", default="true", choices=["true", "false"],
                   help="compare merged and adapter logits on a tiny input before writing")
    args = p.parse_args(argv)
    if args.merge_lora != "true":
        p.error("--merge_lora false: nothing else to export (the adapter directory is already PEFT's format)")
    dtype = getattr(torch, args.torch_dtype) if args.torch_dtype else None
    out, diff = merge_checkpoint(args.adapters, args.output_dir, args.model, dtype, args.check == "true")
    if diff is not None:
        print(f"max |logit difference| merged vs adapter: {diff:.3g}")
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
