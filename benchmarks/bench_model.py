"""Vision tower and prefill: minivl vs transformers (SDPA), side by side in one process, same weights.

Random bf16 weights with the published shapes (tests/configs/*.json) are created once by transformers and shared
with minivl (same tensors, no copy: the in-memory names are identical). Inputs: one 448x448 image, and four
1024x1024 images, each with ~64 text tokens around it; the grids are what the official processor gives for
those sizes (Qwen2.5: 448 -> 32x32 patches of 14 px, 1024 -> 1036 -> 74x74; Qwen3: 448 -> 28x28 patches of
16 px, 1024 -> 64x64).

    python benchmarks/bench_model.py                       # on a GPU: both models, prints a table
    python benchmarks/bench_model.py --device cpu --layers 1 --configs qwen2_5_vl_3b   # smoke test

Timing: CUDA events around each call after warm-up, median of --repeats. The "compiled" columns time minivl again
with `model.model.visual.compile_blocks()` (torch.compile of each vision block, dynamic shapes; the compile happens
in the warm-up). Agreement: bf16 logits of the whole
prefill, max |minivl - transformers| and the share of positions whose argmax agrees.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import median_ms, published_config, shared_models  # noqa: E402



def grids_for(family, size):
    patch = 16 if family == "qwen3_vl" else 14
    factor = patch * 2
    side = round(size / factor) * factor  # smart_resize keeps these sizes within the pixel limits
    return (1, side // patch, side // patch)


def prompt(cfg, grids, text_tokens=64):
    ids = list(range(1000, 1000 + text_tokens // 2))
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
    ids += list(range(2000, 2000 + text_tokens // 2))
    return torch.tensor([ids])


def build(name, device, layers):
    return shared_models(published_config(name, layers), device)


CASES = {"448": ("1 x 448^2", [448]), "4x1024": ("4 x 1024^2", [1024] * 4)}


def against_float32(name, hf, ours, ids, pv, thw, mm, out, ref):
    """Both bf16 models against transformers in float32 on the same weights: is minivl's bf16 as close to the
    exact answer as transformers' own bf16? (Two bf16 models of random weights disagree on many argmaxes.)"""
    hf32 = hf.float()  # in place: the shared tensors become float32 for this comparison only
    with torch.no_grad():
        exact = hf32(input_ids=ids, pixel_values=pv.float(), image_grid_thw=thw, mm_token_type_ids=mm).logits.float()
    hf.to(torch.bfloat16)
    ours.tie_weights()
    row = [name]
    for logits in (out, ref):
        row += [(logits - exact).abs().max().item(), (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()]
    return row


def profile_vision(ours, pv, thw):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        ours.model.visual(pv, thw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def inputs(cfg, sizes, device):
    grids = [grids_for(cfg.family, s) for s in sizes]
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator(device="cpu").manual_seed(1)
    patch = 16 if cfg.family == "qwen3_vl" else 14
    pv = torch.randn(n, 3 * 2 * patch**2, generator=g).to(device, torch.bfloat16)
    ids = prompt(cfg, grids).to(device)
    return pv, torch.tensor(grids, device=device), ids, (ids == cfg.image_token_id).int()


def run(name, device, repeats, layers, cases, precision=False, profile=False, precision_rows=None):
    """Per case: transformers and eager minivl; then the same cases with minivl's vision blocks compiled."""
    cfg, hf, ours = build(name, device, layers)
    params = sum(p.numel() for p in ours.parameters()) / 1e9
    rows = []
    for label, sizes in (CASES[c] for c in cases):
        pv, thw, ids, mm = inputs(cfg, sizes, device)
        with torch.no_grad():
            t_vis_hf = median_ms(lambda: hf.model.visual(pv, grid_thw=thw), device, repeats, warmup=2)
            t_vis = median_ms(lambda: ours.model.visual(pv, thw), device, repeats, warmup=2)
            t_pre_hf = median_ms(lambda: hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm),
                                 device, repeats, warmup=2)
            t_pre = median_ms(lambda: ours(ids, pixel_values=pv, image_grid_thw=thw), device, repeats, warmup=2)
            ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm).logits.float()
            out = ours(ids, pixel_values=pv, image_grid_thw=thw).float()
        diff = (out - ref).abs().max().item()
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append([name, f"{params:.2f}B", label, pv.shape[0], ids.shape[1], t_vis_hf, t_vis, t_pre_hf, t_pre, diff, top1])
        if precision and label == CASES["448"][0]:
            precision_rows.append(against_float32(name, hf, ours, ids, pv, thw, mm, out, ref))
        if profile and label == CASES["4x1024"][0]:
            profile_vision(ours, pv, thw)
    ours.model.visual.compile_blocks()
    for row, (label, sizes) in zip(rows, (CASES[c] for c in cases)):
        pv, thw, ids, mm = inputs(cfg, sizes, device)
        with torch.no_grad():
            row += [median_ms(lambda: ours.model.visual(pv, thw), device, repeats, warmup=3),
                    median_ms(lambda: ours(ids, pixel_values=pv, image_grid_thw=thw), device, repeats, warmup=2)]
    del hf, ours
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--precision", action="store_true", help="also compare both bf16 models with float32")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of minivl's vision tower")
    ap.add_argument("--layers", type=int, default=0, help="cut both towers to about this many layers (smoke tests)")
    args = ap.parse_args()
    import transformers

    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {dev}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, bf16, median of {args.repeats}")
    precision_rows = []
    rows = [r for name in args.configs for r in run(name, args.device, args.repeats, args.layers, args.cases,
                                                    args.precision, args.profile, precision_rows)]
    head = ("model", "params", "images", "patches", "tokens", "vision HF ms", "vision ours ms", "speedup",
            "compiled ms", "speedup", "prefill HF ms", "prefill ours ms", "speedup", "compiled ms", "speedup",
            "max|dlogit|", "top-1 agree")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (name, params, label, n, T, vh, vo, ph, po, diff, top1, vc, pc) in rows:
        print(f"| {name} | {params} | {label} | {n} | {T} | {vh:.1f} | {vo:.1f} | {vh / vo:.2f}x | {vc:.1f} | "
              f"{vh / vc:.2f}x | {ph:.1f} | {po:.1f} | {ph / po:.2f}x | {pc:.1f} | {ph / pc:.2f}x | {diff:.3f} | "
              f"{top1 * 100:.1f}% |")
    if precision_rows:
        print("\nbf16 logits against transformers in float32, one 448x448 image:")
        print("| model | minivl max abs err | minivl top-1 = fp32 | transformers max abs err | transformers top-1 = fp32 |")
        print("|---|---|---|---|---|")
        for name, e1, a1, e2, a2 in precision_rows:
            print(f"| {name} | {e1:.3f} | {a1 * 100:.1f}% | {e2:.3f} | {a2 * 100:.1f}% |")


if __name__ == "__main__":
    main()
