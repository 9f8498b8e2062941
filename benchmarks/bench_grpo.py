"""One GRPO step: minivl (train_grpo.py's path) against transformers.generate + full-vocabulary log-softmax, side by
side in one process on the same weights; and the longest completion whose GRPO step fits in 78 GiB.

    python benchmarks/bench_grpo.py                                      # on a GPU: the Qwen2.5-VL-3B step, a table
    python benchmarks/bench_grpo.py --mode max_length --shape qwen2_5_vl_7b
    python benchmarks/bench_grpo.py --mode max_length --shape qwen3_vl_8b
    python benchmarks/bench_grpo.py --smoke [--mode max_length]          # CPU, tiny widths: the script runs

The step (--mode step): random bf16 weights of the Qwen2.5-VL-3B shape (tests/configs), made once by transformers
and shared with minivl (the same tensors); LoRA r 8, alpha 32 on the LLM's seven projections, the same initial
adapters on both sides (PEFT's); 8 prompts (one 448x448 image each, 256 image tokens) x 8 completions of 512 tokens
(no eos: every row runs to the end) at train_grpo.py's sampling defaults (temperature 0.9, top-k 50, top-p 0.9);
random rewards; beta 0.04; micro-batches of 8 completions, gradient checkpointing, AdamW. Phases, each timed with
the GPU synchronised around it:
  rollout     minivl: minivl.generate (rollouts.rollout's call: compiled decode step in a CUDA graph, LoRA folded
              into the weights it reads); transformers: generate(do_sample=True) on the PEFT model
  log-probs   the reference's log-probs of every completion (adapters off), no gradient; minivl: hidden states
              through the fused lm_head + log-prob kernel at the completion positions; transformers: the logits of
              the whole sequence, then log_softmax(logits / T) over the full vocabulary in float32, gathered
  fwd+bwd     the policy's log-probs as above, train_grpo.grpo_loss (the same function for both), backward, for
              each micro-batch; then the optimizer step
minivl runs one warm-up step first (torch.compile, autotuning); transformers' step is timed once (its generate
alone takes about a minute). Peak memory: torch.cuda.max_memory_allocated over each phase, weights included.

--mode max_length: minivl alone, random bf16 weights of Qwen2.5-VL-7B (the 3B config at the 7B widths of the
published config.json) or Qwen3-VL-8B, LoRA r 8, 8 prompts x 8 completions of L tokens, micro-batches of
--micro_batch completions, gradient checkpointing, beta 0.04, memory capped at 78 GiB
(torch.cuda.set_per_process_memory_fraction), lengths tried in increasing order in one process (expandable
segments, the cache emptied between lengths) until one runs out of memory. For each L the step's memory peaks are
measured on its two largest parts: the rollout (the sampler allocates its whole KV cache, S = prompt + L slots, and
the LoRA-folded weights before the first token: the bench runs prefill and a few decode steps of generate's code)
and one micro-batch of full-length completions (reference log-probs, forward, backward, optimizer step); the other
micro-batches repeat that one. --lengths runs chosen lengths (e.g. one, to confirm a limit in a fresh process).
"""

import argparse
import contextlib
import functools
import gc
import os
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from minivl import lora, rollouts, sampler  # noqa: E402
from minivl.processor import Processor  # noqa: E402
from common import build_model, load_raw, make_batch, shared_models, sync  # noqa: E402
from train_grpo import grpo_loss, group_advantages  # noqa: E402

LLM_TARGETS = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
# Qwen2.5-VL-7B-Instruct's config.json where it differs from the 3B's
QWEN2_5_VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28)
GiB = 2**30


def config(shape, smoke):
    raw = load_raw("qwen2_5_vl_3b" if shape == "qwen2_5_vl_7b" else shape, layers=1 if smoke else 0, tiny=smoke)
    if shape == "qwen2_5_vl_7b" and not smoke:
        raw.update(QWEN2_5_VL_7B)
        raw["vision_config"]["out_hidden_size"] = 3584
    return raw


def prompts_of(cfg, batch):
    """The left-padded batch as rollouts.encode_prompts gives it: [(row, unpadded prompt tensors)] per prompt."""
    per_image = batch["pixel_values"].shape[0] // batch["image_grid_thw"].shape[0]
    out = []
    for p, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        out.append((None, {"input_ids": ids[mask.bool()].cpu(), "image_grid_thw": batch["image_grid_thw"][p:p + 1],
                           "pixel_values": batch["pixel_values"][p * per_image:(p + 1) * per_image]}))
    return out


# a stand-in for the processor where only its padding is used (random weights, no tokenizer)
PAD = SimpleNamespace(pad=functools.partial(Processor.pad, SimpleNamespace(pad_token_id=0)))


def timed(fn, device):
    """(fn's result, seconds, peak bytes allocated while it ran: 0 off CUDA)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() if device == "cuda" else 0


def grpo_step(model, cfg, batch, args, device, rollout, logprobs, disabled, optimizer, micro_batches=None,
              sync=lambda last: contextlib.nullcontext()):
    """One GRPO step with the given rollout and log-prob functions (disabled(model): the reference) -> ({phase:
    seconds}, {phase: peak bytes}, loss). sync(last) is entered around each micro-batch's forward and backward
    (several processes: training.grad_sync, which all-reduces the gradients in the last one's backward only)."""
    G, N = args.generations, args.prompts * args.generations
    gen, t_rollout, m_rollout = timed(lambda: rollout(batch), device)
    prompts = prompts_of(cfg, batch)
    advantages = group_advantages(torch.rand(N, generator=torch.Generator().manual_seed(0)), G, "group")
    mask_all = torch.arange(gen.tokens.shape[1]) < gen.lengths[:, None]
    loss_args = SimpleNamespace(importance_sampling_level="token", epsilon=0.2, epsilon_high=None, delta=None,
                                beta=args.beta, loss_type="grpo", gradient_accumulation_steps=N // args.micro_batch,
                                max_completion_length=args.tokens)
    slices = [range(k, k + args.micro_batch) for k in range(0, N, args.micro_batch)][:micro_batches]
    inputs = [rollouts.completion_inputs(PAD, prompts, gen, idx, G, device) for idx in slices]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)

    def reference():
        with torch.no_grad(), autocast, disabled(model):
            return [logprobs(*x) for x in inputs]
    ref, t_ref, m_ref = timed(reference, device)

    def train():
        total = 0.0
        for k, (x, idx, r) in enumerate(zip(inputs, slices, ref)):
            with sync(k == len(inputs) - 1):
                with autocast:
                    logp = logprobs(*x)
                    loss, _ = grpo_loss(logp, None, r, advantages[idx].to(device), mask_all[idx, :logp.shape[1]].to(
                        device), loss_args)
                loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total
    loss, t_train, m_train = timed(train, device)
    return ({"rollout": t_rollout, "log-probs": t_ref, "fwd+bwd": t_train},
            {"rollout": m_rollout, "log-probs": m_ref, "fwd+bwd": m_train}, loss)


def minivl_functions(model, args):
    policy = rollouts.CompletionLogprobs(model, args.temperature, torch.bfloat16 if model.device.type == "cuda"
                                         else torch.float32)

    def rollout(batch):  # rollouts.rollout's call, without the decoding to text
        model.eval()
        out = sampler.generate(model, batch, args.tokens, args.temperature, args.top_p, args.top_k,
                               args.generations, eos_token_id=[], seed=0)
        model.train()
        return replace(out, tokens=out.tokens.cpu(), lengths=out.lengths.cpu())
    return rollout, lambda *x: policy(*x)[0], lora.disabled


@torch.no_grad()
def rollout_memory(model, batch, args, length):
    """What minivl.generate holds for L = length new tokens (its whole cache, the LoRA-folded weights, the graph),
    through the first decode steps of the same code."""
    model.eval()
    s = sampler.Sampling(args.temperature, args.top_k, args.top_p)
    state = sampler.prefill(model, batch, args.generations, length, s, eos=[], pad_id=0, seed=0)
    cuda = state.token.is_cuda
    parts = sampler.compiled_parts() if cuda else sampler.PARTS
    step = sampler.backend_step("auto", model, state, s, parts) or (
        lambda st: sampler.decode_step(model, st, s, parts))
    step = sampler.cuda_graph(step, state) if cuda else functools.partial(step, state)
    for _ in range(4):
        step()
    model.train()


def hf_functions(hf, cfg, args):
    def rollout(batch):
        ids = batch["input_ids"]
        hf.eval()  # in training mode transformers turns its KV cache off under gradient checkpointing
        out = hf.generate(**batch, mm_token_type_ids=(ids == cfg.image_token_id).int(), do_sample=True,
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                          num_return_sequences=args.generations, pad_token_id=0,
                          suppress_tokens=sampler.vision_token_ids(cfg))
        hf.train()
        tokens = out[:, ids.shape[1]:].cpu()
        return SimpleNamespace(tokens=tokens, lengths=torch.full((len(tokens),), tokens.shape[1]))

    def logprobs(batch, starts, targets):
        types = (batch["input_ids"] == cfg.image_token_id).int()
        logits = hf(**batch, mm_token_type_ids=types).logits  # (B, T, V)
        at = starts[:, None] - 1 + torch.arange(targets.shape[1], device=logits.device)  # (B, L)
        picked = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
        logp = torch.log_softmax(picked.float() / args.temperature, dim=-1)
        return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    return rollout, logprobs, lambda m: m.disable_adapter()


def bench_step(args, device):
    import peft
    import transformers

    cfg, hf, ours = shared_models(config("qwen2_5_vl_3b", args.smoke), device,
                                  torch.bfloat16 if device == "cuda" else torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LLM_TARGETS))
    adapted = lora.select_linear(ours, ("llm",))
    lora.inject(ours, adapted, r=8, alpha=32)
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours):
            layer.lora_A.weight.copy_(theirs[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B.weight.copy_(theirs[f"base_model.model.{name}.lora_B.default.weight"])
    ours.model.language_model.gradient_checkpointing = True
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.enable_input_require_grads()
    batch = make_batch(cfg, args.prompts, device, torch.bfloat16 if device == "cuda" else torch.float32)
    rows = {}
    trained = [p for p in ours.parameters() if p.requires_grad]
    assert len(trained) == 2 * len(adapted), "minivl trains more than its adapters"
    opt = torch.optim.AdamW(trained, lr=1e-5)
    ours.train()
    grpo_step(ours, cfg, batch, args, device, *minivl_functions(ours, args), opt)  # warm-up: compiles
    rows["minivl"] = grpo_step(ours, cfg, batch, args, device, *minivl_functions(ours, args), opt)
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    hf.train()
    trained = [p for p in hf.parameters() if p.requires_grad]
    assert len(trained) == 2 * len(adapted), "transformers trains more than its adapters"
    opt = torch.optim.AdamW(trained, lr=1e-5)
    rows["transformers"] = grpo_step(hf, cfg, batch, args, device, *hf_functions(hf, cfg, args), opt)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; Qwen2.5-VL-3B shape{' (smoke: tiny)' if args.smoke else ''}, LoRA r 8, "
          f"{args.prompts} prompts x {args.generations} completions x {args.tokens} tokens, temperature "
          f"{args.temperature} top-k {args.top_k} top-p {args.top_p}, beta {args.beta}, micro-batches of "
          f"{args.micro_batch}")
    (ours_t, ours_m, _), (hf_t, hf_m, _) = rows["minivl"], rows["transformers"]
    print("| phase | minivl s | transformers s | speed-up | minivl peak GiB | transformers peak GiB |")
    print("|---|---|---|---|---|---|")
    for phase in ours_t:
        print(f"| {phase} | {ours_t[phase]:.2f} | {hf_t[phase]:.2f} | {hf_t[phase] / ours_t[phase]:.1f}x | "
              f"{ours_m[phase] / GiB:.1f} | {hf_m[phase] / GiB:.1f} |")
    total, hf_total = sum(ours_t.values()), sum(hf_t.values())
    ours_peak, hf_peak = max(ours_m.values()), max(hf_m.values())
    print(f"| whole step | {total:.2f} | {hf_total:.2f} | {hf_total / total:.1f}x | {ours_peak / GiB:.1f} | "
          f"{hf_peak / GiB:.1f} |")


def bench_max_length(args, device):
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 78 * GiB / total))
    cfg, model = build_model(config(args.shape, args.smoke), device, torch.bfloat16 if device == "cuda" else
                             torch.float32)
    model.requires_grad_(False)
    lora.inject(model, lora.select_linear(model, ("llm",)), r=8, alpha=32)
    model.model.language_model.gradient_checkpointing = True
    model.train()
    batch = make_batch(cfg, args.prompts, device, torch.bfloat16 if device == "cuda" else torch.float32)
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {args.shape} shape{' (smoke: tiny)' if args.smoke else ''}, LoRA r 8, "
          f"{args.prompts} x {args.generations} completions, micro-batch {args.micro_batch}, memory capped at "
          "78 GiB")
    print("| completion tokens | rollout peak GiB | train peak GiB | fits |")
    print("|---|---|---|---|")
    fits = None
    for length in args.lengths:
        args.tokens = length
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        rollout_peak = train_peak = None
        try:
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            _, logprobs, disabled = minivl_functions(model, args)
            rollout_memory(model, batch, args, length)
            rollout_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
            g = torch.Generator().manual_seed(1)  # full-length completions of random tokens

            def full_length(b):
                tokens = torch.randint(1000, 100000 if not args.smoke else cfg.text.vocab_size - 100,
                                       (args.prompts * args.generations, length), generator=g)
                return SimpleNamespace(tokens=tokens, lengths=torch.full((len(tokens),), length))
            _, peaks, _ = grpo_step(model, cfg, batch, args, device, full_length, logprobs, disabled, opt,
                                    micro_batches=1)
            train_peak = max(peaks["log-probs"], peaks["fwd+bwd"])
            fits = length
            verdict = "yes"
        except torch.OutOfMemoryError:
            verdict = "out of memory"
        print(f"| {length} | {rollout_peak / GiB if rollout_peak is not None else float('nan'):.1f} | "
              f"{train_peak / GiB if train_peak is not None else float('nan'):.1f} | {verdict} |", flush=True)
        del opt
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
        if verdict != "yes":
            break
    print(f"largest completion length that fits: {fits}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["step", "max_length"], default="step")
    ap.add_argument("--shape", choices=["qwen2_5_vl_7b", "qwen3_vl_8b"], default="qwen2_5_vl_7b")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny widths, 2 prompts x 2 completions x 8 tokens")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top_k", type=int, default=50)
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768])
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.prompts, args.generations, args.tokens, args.micro_batch = 2, 2, 8, 2
        args.lengths = [8, 16]
    (bench_step if args.mode == "step" else bench_max_length)(args, device)


if __name__ == "__main__":
    main()
