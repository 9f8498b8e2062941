"""One LoRA SFT step: minivl (train_sft.py's loss path) vs transformers + peft, in one process, identical inputs.

The setting of facts/performance.md §8: random bf16 weights of the Qwen2.5-VL-3B shape (tests/configs), created
once by transformers and shared with minivl (the same tensors: the in-memory names are identical). LoRA r 8,
alpha 32, no dropout, on q/k/v/o/gate/up/down of every LLM layer, adapters in float32 on both sides (PEFT's
autocast_adapter_dtype; minivl keeps float32 masters too) and the same initial values. Batch 8 x 1024 tokens:
each row one 448x448 image (32x32 patches = 256 merged tokens) inside 768 text tokens, labels on every text token.
AdamW over the adapters. transformers: SDPA, its own loss (float32 logits over the full vocabulary). minivl: the
trainer's TokenLogprobs (fused lm_head + log-prob kernel) under bf16 autocast, the fused LoRA kernels, once
without and once with (non-reentrant) gradient checkpointing.

    python benchmarks/bench_sft.py                 # on a GPU: prints the table
    python benchmarks/bench_sft.py --smoke         # CPU, 1 layer, 2 short rows: checks the script end to end

Timing: CUDA events around whole steps (forward, backward, optimizer step, zero_grad) after --warmup steps,
median of --repeats. Peak memory: torch.cuda.max_memory_allocated over the timed steps (the shared weights
count once, for both). Agreement: the first step's loss of minivl (first row) and of transformers, both from the
same initial adapters (later minivl rows start from adapters the earlier rows trained).
"""

import argparse
import gc
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from minivl import lora  # noqa: E402
from common import median_ms, published_config, shared_models  # noqa: E402
from train_sft import TokenLogprobs  # noqa: E402

LLM_TARGETS = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


def build(layers, device, dtype):
    cfg, hf, ours = shared_models(published_config("qwen2_5_vl_3b", layers), device, dtype)
    hf.train()
    return cfg, hf, ours.train()


def same_adapters(hf, ours, device, b_std=0.0):
    """LoRA r 8, alpha 32 on the LLM's 7 projections of both models, with the same values (PEFT makes them, minivl
    copies them; b_std > 0 draws B too, so the adapters are not the identity), and an AdamW over each side's
    adapters -> (the PEFT model, its optimizer, minivl's optimizer)."""
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LLM_TARGETS)
    hf = peft.get_peft_model(hf, config)
    names = lora.select_linear(ours, ("llm",))
    lora.inject(ours, names, r=8, alpha=32)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours):
            b = theirs[f"base_model.model.{name}.lora_B.default.weight"]
            if b_std:
                b.normal_(0, b_std)
            layer.lora_A.weight.copy_(theirs[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B.weight.copy_(b)
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    our_params = [p for n, p in ours.named_parameters() if p.requires_grad]
    assert len(hf_params) == len(our_params) == 2 * len(names), (len(hf_params), len(our_params), len(names))
    return (hf, torch.optim.AdamW(hf_params, lr=1e-4, fused=device == "cuda"),
            torch.optim.AdamW(our_params, lr=1e-4, fused=device == "cuda"))


def inputs(cfg, batch, seq, side, device, dtype):
    """Rows of `seq` tokens: text, one image of side x side pixels, text; labels on the text tokens."""
    g = torch.Generator().manual_seed(1)
    patch = cfg.vision.patch_size
    h = w = side // patch
    n_img = h * w // 4
    before = (seq - n_img - 2) // 2
    rows = []
    for _ in range(batch):
        text = torch.randint(0, 150000, (seq - n_img - 2,), generator=g).tolist()
        rows.append(text[:before] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                    + [cfg.vision_end_token_id] + text[before:])
    ids = torch.tensor(rows)  # (B, T)
    labels = ids.clone()
    vision = (ids == cfg.image_token_id) | (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
    labels[vision] = -100
    pixels = torch.randn(batch * h * w, 3 * 2 * patch * patch, generator=g)  # (N, C*T*P*P)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype),
            "image_grid_thw": torch.tensor([[1, h, w]] * batch).to(device),
            "labels": labels.to(device)}


def timed_steps(step, device, warmup, repeats):
    """(first loss, median ms per step, peak bytes over the timed steps)."""
    first = float(step())
    for _ in range(warmup - 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return first, ms, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: 1 layer, 2 rows of 160 tokens")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_hf", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.batch, args.seq, args.image, args.warmup, args.repeats = 2, 160, 112, 1, 2
    import peft
    import transformers

    cfg, hf, ours = build(1 if args.smoke else 0, device, dtype)
    batch = inputs(cfg, args.batch, args.seq, args.image, device, dtype)
    tokens = args.batch * args.seq

    hf, hf_opt, our_opt = same_adapters(hf, ours, device)
    mm_types = (batch["input_ids"] == cfg.image_token_id).int()

    def hf_step():
        loss = hf(**batch, mm_token_type_ids=mm_types).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.detach()

    step_module = TokenLogprobs(ours, dtype)
    autocast = torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def our_step():
        with autocast:
            logp, _, targets = step_module(**batch)  # (B, T) float32
            loss = -logp.sum() / (targets != -100).sum()  # train_sft.py's loss, one micro-batch
        loss.backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)
        return loss.detach()

    rows = []
    for label, ckpt in (("minivl", False), ("minivl + grad ckpt", True)):
        ours.model.language_model.gradient_checkpointing = ckpt
        rows.append((label, *timed_steps(our_step, device, args.warmup, args.repeats)))
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    if not args.skip_hf:
        try:
            rows.append(("transformers + peft", *timed_steps(hf_step, device, args.warmup, args.repeats)))
        except torch.OutOfMemoryError as e:
            print(f"transformers + peft: out of memory ({str(e).splitlines()[0]})")

    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {dev}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; Qwen2.5-VL-3B shape{' (1 layer: smoke)' if args.smoke else ''}, "
          f"{dtype}, LoRA r 8 alpha 32 on the LLM's 7 projections, batch {args.batch} x {args.seq} tokens "
          f"({args.image}px image each), AdamW, median of {args.repeats} steps")
    ref = next((r for r in rows if r[0].startswith("transformers")), None)
    print("| run | first loss | ms / step | tokens/s | peak GB | tokens/s vs HF | peak vs HF |")
    print("|---|---|---|---|---|---|---|")
    for i, (label, loss, ms, peak) in enumerate(rows):
        loss = f"{loss:.4f}" if i == 0 or label.startswith("transformers") else "-"  # later rows start trained
        speed = f"{ref[2] / ms:.2f}x" if ref else "-"
        mem = f"{peak / ref[3]:.2f}x" if ref and ref[3] else "-"
        print(f"| {label} | {loss} | {ms:.0f} | {tokens / ms * 1e3:,.0f} | {peak / 1e9:.1f} | {speed} | {mem} |")


if __name__ == "__main__":
    main()
