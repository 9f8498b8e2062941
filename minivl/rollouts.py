"""Rollouts for RL trainers (train_grpo.py): prompts encoded, completions sampled and decoded, each prompt joined to
its completions as a training batch, and the completion tokens' log-probs at the sampling temperature.

    prompts = rollouts.encode_prompts(processor, rows)                 # [(PromptRow, encoded prompt)]
    gen, texts = rollouts.rollout(model, processor, prompts, n=8, max_new_tokens=512, temperature=0.9, seed=0)
    batch, starts, targets = rollouts.completion_inputs(processor, prompts, gen, range(8), n=8)
    logp, entropy = rollouts.CompletionLogprobs(model, temperature=0.9)(batch, starts, targets)   # (B, L) each

The sampler is minivl.generate: the vision tower once per prompt, on CUDA the fast decode backends (with LoRA
adapters folded into the weights they read), vision tokens banned; it runs with the model in eval mode, so no
dropout. Log-probs are trl's: log-softmax of logits / temperature at the completion tokens, computed from the final
hidden states through the fused lm_head + log-softmax kernel (kernels/logprobs.py), so no (tokens x vocabulary)
logits exist; the hidden states are gathered at the completion positions first. Tests: tests/test_grpo.py.
Shapes: N completions (n per prompt), L completion tokens, B completions of a batch, T tokens, D model width.
"""

import json
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from kernels.logprobs import linear_token_logprobs

from .processor import IGNORE_INDEX
from .sampler import generate


def encode_prompts(processor, rows):
    """[(row, its prompt encoded with the generation prompt: unpadded input_ids and vision tensors)]; a DataLoader's
    collate for data_rl.PromptRow rows."""
    return [(r, processor.encode(r.prompt, images=r.images, videos=r.videos, add_generation_prompt=True))
            for r in rows]


def drop_long(rows, processor, max_length):
    """The rows whose prompt has at most max_length tokens (ms-swift's truncation_strategy delete; image headers
    read, no pixels)."""
    return [r for r in rows if len(processor.encode(r.prompt, r.images, r.videos, True, pixels=False)["input_ids"])
            <= max_length]


@torch.no_grad()
def rollout(model, processor, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=0,
            first_row=0):
    """(Generation on the CPU: rows p*n .. p*n+n-1 answer prompt p, completion texts without the eos tokens).
    first_row: the index of row 0 in the whole round of all processes, which keys the sampling noise, so that a
    process sampling its share of the prompts draws what one process sampling all of them draws."""
    batch = processor.pad([p for _, p in prompts], "left")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    gen = generate(model, batch, max_new_tokens, temperature, top_p, top_k, n, processor.eos_token_ids, seed,
                   first_row=first_row)
    model.train(was_training)
    gen = replace(gen, **{k: getattr(gen, k).cpu() for k in ("tokens", "lengths", "logprobs", "truncated")})
    eos = set(processor.eos_token_ids)
    texts = [processor.decode([t for t in row[:k] if t not in eos])
             for row, k in zip(gen.tokens.tolist(), gen.lengths.tolist())]
    return gen, texts


def eval_shares(rows, batch_size, proc):
    """[(index of the first row, rows)]: this process's eval prompts in batches, a contiguous share of the rows per
    process, so that completion j of prompt i is row i x n + j of the noise however many processes sample."""
    share = -(-len(rows) // proc.world)  # ceil
    mine = range(proc.rank * share, min(len(rows), (proc.rank + 1) * share))
    return [(i, rows[i:min(i + batch_size, mine.stop)]) for i in mine[::batch_size]]


def length_metrics(lengths, truncated):
    """trl's completion metrics of completion lengths (N,) and whether each was truncated (N,)."""
    lengths = lengths.float()
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.float().mean())}


def completion_inputs(processor, prompts, gen, idx, n, device="cpu"):
    """(batch, starts (B,), targets (B, L)) of completions idx: each one's prompt followed by it, right-padded;
    where each completion starts; its tokens, -100 past its end (the eos is a target: the policy chose to stop)."""
    lengths = gen.lengths[idx]
    encoded = [prompts[i // n][1] for i in idx]
    samples = [{**p, "input_ids": torch.cat([p["input_ids"], gen.tokens[i, :int(k)]])}
               for p, i, k in zip(encoded, idx, lengths)]
    starts = torch.tensor([len(p["input_ids"]) for p in encoded])
    L = int(lengths.max())
    targets = gen.tokens[idx, :L].masked_fill(torch.arange(L) >= lengths[:, None], IGNORE_INDEX)  # (B, L)
    batch = {k: v.to(device) for k, v in processor.pad(samples, "right").items()}
    return batch, starts.to(device), targets.to(device)


class CompletionLogprobs(nn.Module):
    """The model up to the completion tokens' log-probs and entropies (B, L) float32 at `temperature`: what DDP
    wraps in a trainer. compute_dtype: the dtype of the lm_head product (the trainer's autocast dtype)."""

    def __init__(self, model, temperature, compute_dtype=None):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.compute_dtype = compute_dtype or model.dtype

    def forward(self, batch, starts, targets):
        hidden = self.model.hidden_states(**batch)  # (B, T, D)
        # completion token j of row b sits at starts[b] + j and is predicted at the position before it
        at = starts[:, None] - 1 + torch.arange(targets.shape[1], device=hidden.device)  # (B, L)
        h = hidden.gather(1, at.clamp(max=hidden.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        weight = self.model.lm_head.weight.to(self.compute_dtype)  # (V, D)
        return linear_token_logprobs(h.to(self.compute_dtype), weight, targets, self.temperature,
                                     return_entropy=True)


def write_completions(path, proc, lines, keep_until=None):
    """Append every process's `lines` (JSON objects), in rank order, to the jsonl file at `path`, from the first
    process. keep_until: first drop the lines of later steps (a resumed run's file keeps what led to it)."""
    if proc.world > 1:
        parts = [None] * proc.world
        dist.all_gather_object(parts, lines)
        lines = [line for part in parts for line in part]
    if not proc.main:
        return
    if keep_until is not None and path.is_file():
        kept = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= keep_until]
        path.write_text("".join(x + "\n" for x in kept))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(line, default=str) + "\n" for line in lines))
