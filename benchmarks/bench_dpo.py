"""One LoRA DPO step: minivl (train_dpo.py's path) vs transformers + peft, in one process, identical inputs.

Random bf16 weights of the Qwen2.5-VL-3B shape (tests/configs), created once by transformers and shared with minivl
(the same tensors), LoRA r 8, alpha 32 on the LLM's 7 projections with the same values on both sides (B drawn
too, so the policy is not its reference and the first losses say something). 4 pairs: each a prompt of one
448x448 image (256 merged tokens) and 32 text tokens, a chosen and a rejected answer of 1024 tokens each. The
sigmoid loss, beta 0.1, reference = the model with its adapters off; AdamW over the adapters.

  minivl                train_dpo.py's pair_step: the 8 rows in one forward, each image encoded once, answer
                        log-probs from the hidden states through the fused lm_head + log-softmax kernel, the
                        reference one no-grad forward under lora.disabled
  transformers + peft   what a trl-style loop does without trl: a no-grad forward of the chosen rows and one of
                        the rejected rows under `disable_adapter()`, then the two policy forwards, full-vocabulary
                        logits, log_softmax one row at a time in float32 (trl's selective_log_softmax), one backward

Each with and without (non-reentrant) gradient checkpointing; each minivl row is compared with the transformers row
of the same setting. A row that runs out of GPU memory says so and the others go on (transformers without
checkpointing holds the graphs of both policy forwards and their full logits).

    python benchmarks/bench_dpo.py                 # on a GPU: prints the table
    python benchmarks/bench_dpo.py --smoke         # CPU, 1 layer, 2 short pairs: checks the script end to end

Timing: CUDA events around whole steps (reference, forward, backward, optimizer step) after --warmup steps, median of
--repeats. Peak memory: torch.cuda.max_memory_allocated over the timed steps (the shared weights count once, for
both). Agreement: the first loss of each side from the same initial adapters.
"""

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from minivl import training  # noqa: E402
from bench_sft import build, same_adapters, timed_steps  # noqa: E402
import train_dpo  # noqa: E402


def pairs(cfg, n, prompt, answer, side, device, dtype):
    """(chosen rows, rejected rows): n rows each of [text, image, text] prompt + an answer of `answer` random
    tokens, labels on the answer; the images of the n prompts as pixel rows."""
    g = torch.Generator().manual_seed(1)
    patch = cfg.vision.patch_size
    h = w = side // patch
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    prompts = [torch.randint(0, 150000, (prompt,), generator=g).tolist() for _ in range(n)]
    prompts = [p[:prompt // 2] + image + p[prompt // 2:] for p in prompts]
    sides = []
    for _ in ("chosen", "rejected"):
        ids = torch.tensor([p + torch.randint(0, 150000, (answer,), generator=g).tolist() for p in prompts])
        labels = ids.clone()
        labels[:, :len(prompts[0])] = -100  # (n, T)
        sides.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                      "labels": labels.to(device)})
    vision = {"pixel_values": torch.randn(n * h * w, 3 * 2 * patch * patch, generator=g).to(device, dtype),
              "image_grid_thw": torch.tensor([[1, h, w]] * n).to(device)}
    return sides, vision


def collated(chosen, rejected, vision, device):
    """The batch train_dpo.py's collate makes of the pairs: (2n, T), chosen rows first, each image once."""
    n = len(chosen["input_ids"])
    batch = {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}  # (2n, T)
    batch.update(vision, image_index=torch.arange(n, device=device).repeat(2), index=torch.arange(n))
    return batch


def hf_answer_logps(model, batch, labels):
    """Summed log-probs of the answer tokens (B,) from the full logits, one row at a time in float32."""
    logits = model(**batch).logits  # (B, T, V)
    targets = labels[:, 1:]
    rows = [torch.log_softmax(row.float(), -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
            for row, t in zip(logits[:, :-1], targets)]  # (T-1,) each
    return (torch.stack(rows) * (targets != -100)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: 1 layer, 2 pairs of short answers")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--answer", type=int, default=1024, help="tokens of each answer")
    ap.add_argument("--prompt", type=int, default=32, help="text tokens of each prompt, besides the image")
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_hf", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.pairs, args.answer, args.prompt, args.image, args.warmup, args.repeats = 2, 48, 8, 112, 1, 2
    import peft
    import transformers

    cfg, hf, ours = build(1 if args.smoke else 0, device, dtype)
    hf, hf_opt, our_opt = same_adapters(hf, ours, device, b_std=0.02)
    (chosen, rejected), vision = pairs(cfg, args.pairs, args.prompt, args.answer, args.image, device, dtype)
    beta, n = 0.1, args.pairs
    tokens = 2 * n * chosen["input_ids"].shape[1]

    # minivl: the batch train_dpo.py's collate makes, and its pair_step
    options = train_dpo.parse_args(["--model", "m", "--dataset", "d", "--beta", str(beta)])
    batch = collated(chosen, rejected, vision, device)
    policy = train_dpo.AnswerLogprobs(ours, dtype)
    reference = train_dpo.make_reference(options, ours, [], training.Process(torch.device(device), dtype))
    autocast = torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def our_loss():
        with autocast:
            return train_dpo.pair_step(policy, reference, batch, options)[0].mean()

    def free():
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None

    def hf_inputs(side):
        types = (side["input_ids"] == cfg.image_token_id).int()
        return {"input_ids": side["input_ids"], "attention_mask": side["attention_mask"], "mm_token_type_ids": types,
                **vision}

    def hf_loss():
        with torch.no_grad(), hf.disable_adapter():
            ref = [hf_answer_logps(hf, hf_inputs(s), s["labels"]) for s in (chosen, rejected)]
        logps = [hf_answer_logps(hf, hf_inputs(s), s["labels"]) for s in (chosen, rejected)]
        h = (logps[0] - ref[0]) - (logps[1] - ref[1])
        return -F.logsigmoid(beta * h).mean()

    def step(loss_of, optimizer):
        def run():
            loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return run

    with torch.no_grad():  # from the same initial adapters
        first = {"minivl": float(our_loss()), "transformers + peft": None if args.skip_hf else float(hf_loss())}
    free()
    rows = []
    for ckpt in (False, True):
        ours.model.language_model.gradient_checkpointing = ckpt
        rows.append(("minivl", ckpt, *timed_steps(step(our_loss, our_opt), device, args.warmup, args.repeats)[1:]))
        free()
        if args.skip_hf:
            continue
        if ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            rows.append(("transformers + peft", ckpt,
                         *timed_steps(step(hf_loss, hf_opt), device, args.warmup, args.repeats)[1:]))
        except torch.OutOfMemoryError as e:
            print(f"transformers + peft{', grad ckpt' if ckpt else ''}: out of memory ({str(e).splitlines()[0]})")
            hf_opt.zero_grad(set_to_none=True)  # what a backward cut short left behind
        free()

    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {dev}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; Qwen2.5-VL-3B shape{' (1 layer: smoke)' if args.smoke else ''}, {dtype}, "
          f"LoRA r 8 alpha 32 on the LLM's 7 projections, DPO sigmoid beta {beta}, {n} pairs x 2 answers of "
          f"{args.answer} tokens after a {args.image}px image + {args.prompt} text tokens ({tokens} tokens a step, "
          f"plus the reference's), AdamW, median of {args.repeats} steps")
    print(f"first loss (the same initial adapters): minivl {first['minivl']:.4f}, transformers + peft "
          + (f"{first['transformers + peft']:.4f}" if first["transformers + peft"] is not None else "-"))
    print("| run | grad ckpt | ms / step | tokens/s | peak GB | time vs HF | peak vs HF |")
    print("|---|---|---|---|---|---|---|")
    for label, ckpt, ms, peak in rows:
        ref = next((r for r in rows if r[0].startswith("transformers") and r[1] == ckpt), None)
        speed = f"{ref[2] / ms:.2f}x faster" if ref and label == "minivl" else "-"
        mem = f"{peak / ref[3]:.2f}x" if ref and ref[3] and label == "minivl" else "-"
        print(f"| {label} | {'yes' if ckpt else 'no'} | {ms:.0f} | {tokens / ms * 1e3:,.0f} | {peak / 1e9:.1f} | "
              f"{speed} | {mem} |")


if __name__ == "__main__":
    main()
