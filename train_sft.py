"""Supervised fine-tuning (LoRA or full) of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, with ms-swift's options.

    python train_sft.py                          # the embedded demo: a tiny model learns a colour task on the CPU
    python train_sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --dataset train.jsonl --train_type lora \\
        --lora_rank 8 --lora_alpha 32 --learning_rate 1e-4 --gradient_accumulation_steps 16 --output_dir output
    NPROC_PER_NODE=4 python train_sft.py ...      # 4 GPUs, as ms-swift launches it (hosts: NNODES, NODE_RANK..)
    torchrun --nproc_per_node 4 train_sft.py ...  # the same; 2 hosts: --nnodes 2 --node_rank R --rdzv_endpoint ..
    python train_sft.py qwen2vl_lora_sft.yaml     # a LLaMA-Factory config (stage: sft); then key=value overrides
    python -m minivl.export --adapters output/checkpoint-100 --merge_lora true   # -> checkpoint-100-merged

A `swift sft` command runs with `swift sft` replaced by `python train_sft.py`: options are spelled as in ms-swift
(`--train_type` or the older `--sft_type`/`--tuner_type`), `MAX_PIXELS`/`MIN_PIXELS` in the environment are
honoured, the data formats are ms-swift's (minivl/data.py). An ms-swift option minivl does not implement is an
error naming it; options of engines minivl does not use (vLLM, Megatron, flash-attn, Liger) say what minivl does
instead, and --deepspeed zero2|zero3|zero3_offload runs as the matching FSDP2 setting. A LLaMA-Factory YAML is
translated into those options (minivl/training.py says how).

The file reads top to bottom: arguments, model and weights, data, optimizer and schedule, the loop, saving; what
every trainer shares (options, processes, LoRA and freezing, micro-batch order, checkpoints, logging) is
minivl/training.py.
The loss is written out in the loop: per-token log-probs of the assistant tokens come from the final hidden
states through the fused lm_head + log-softmax kernel (kernels/logprobs.py), so no (tokens x vocabulary)
logits exist, and the sum is divided by the number of assistant tokens in the whole accumulated batch (all
micro-batches, all GPUs): every token weighs the same, however the batch is split.

Training modes (`--train_type`):
  lora      adapters on the linear layers of the unfrozen parts (`--freeze_llm/vit/aligner`; default: the LLM)
  lora_llm  adapters on the LLM, the unfrozen vision parts trained in full (saved as PEFT modules_to_save)
  full      every unfrozen parameter trains, in float32 master weights (bf16 autocast on the GPU)
A frozen vision tower runs under no_grad; gradient checkpointing is non-reentrant, so LoRA inside a
checkpointed vision tower gets its gradients (peft #2880).

Outputs in --output_dir (with `--add_version true`, in a new `v<N>-<YYYYMMDD>-<HHMMSS>` subdirectory of it, as
ms-swift writes; a directory holding another run is refused unless this run resumes it or
--overwrite_output_dir true replaces it): `checkpoint-N/` (the adapter in PEFT's format, or the full model in the
official layout, plus the processor files, optimizer / scheduler / RNG state and the data position, so
`--resume_from_checkpoint` continues exactly), `logging.jsonl` (trl's metric names), `args.json`, and
TensorBoard event files when tensorboard is installed (`--report_to wandb` / `swanlab` log there too).
Checkpoints are written under a temporary name and renamed. `--save_total_limit k` keeps the checkpoint with the
lowest eval loss and the latest ones, k in all. On a terminal a progress bar shows step, loss, speed and time
left; in a log file each log line carries them.

Several GPUs (torchrun): full fine-tuning shards the model with FSDP2, LoRA replicates it with DDP (--deepspeed
zero3 shards it too); each process reads its own rows, the global batch is per-device batch x accumulation x
processes; only the first process logs and saves, and a checkpoint is the same files however many processes wrote
it, so it resumes on any number of them (minivl/training.py: engine, shard).

What it simplifies, compared with ms-swift: no packing or padding-free batches, no DeepSpeed (PyTorch's FSDP2
instead), no per-message loss scales, no versioned output
subdirectory unless --add_version true (ms-swift's default). Tests: tests/test_sft.py, tests/test_sft_cli.py.

Shapes: B batch, T tokens, D LLM width, V vocabulary.
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from minivl import chat, data, training  # noqa: I001  (minivl first: it checks that `kernels` is minivl's)
from kernels.logprobs import linear_token_logprobs
from minivl.processor import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------- arguments

ENGINES = {  # besides the engines every trainer refuses (training.ENGINES)
    "vllm": "minivl has no vLLM: SFT generates nothing; the held-out exact-match check uses minivl.generate",
    "use_vllm": "minivl has no vLLM: SFT generates nothing; the held-out exact-match check uses minivl.generate",
    "rlhf_type": "train_sft.py runs SFT (swift sft); DPO and GRPO (swift rlhf --rlhf_type dpo|grpo) are the "
                 "scripts train_dpo.py and train_grpo.py",
}


def build_parser():
    p = training.build_parser("SFT of Qwen-VL models with ms-swift's options (see the docstring)")
    p.add_argument("--eval_exact_match", type=int, default=0, help="minivl: greedy-decode this many eval samples "
                   "before and after training; print exact-match accuracy")
    training.show_defaults(p)
    return p


def parse_args(argv=None):
    return training.parse_args(build_parser(), argv, "sft", ENGINES)


def demo_defaults(args, argv):
    """No --model and no --dataset: the demo model learns the demo task, options given on the command line still
    win. Full training at lr 1e-3 with batch 16: what the task was measured to learn with on a CPU."""
    from minivl import demo

    paths = demo.make_demo(demo.DEFAULT_DIR)
    return training.apply_defaults(args, argv, dict(
        model=str(paths["model"]), dataset=[str(paths["train"])], val_dataset=[str(paths["test"])],
        train_type="full", freeze_vit=False, freeze_aligner=False, learning_rate=1e-3,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, max_steps=300, warmup_ratio=0.05,
        weight_decay=0.0, lora_dropout=0.0, gradient_checkpointing=False, eval_steps=100, save_steps=300,
        save_total_limit=1, logging_steps=25, output_dir="output/demo", eval_exact_match=128,
        # the demo replaces its own last run
        overwrite_output_dir=not any(a.startswith("--output_dir") for a in argv)))


# --------------------------------------------------------------------------------------------- the trainer

class TokenLogprobs(nn.Module):
    """What DDP wraps (FSDP2 shards the model inside it): the model up to per-token log-probs of the next tokens.
    The vocabulary projection is fused with the log-softmax (kernels/logprobs.py), so the (B, T, V) logits never
    exist."""

    def __init__(self, model, compute_dtype):
        super().__init__()
        self.model, self.compute_dtype = model, compute_dtype

    def forward(self, labels, **batch):
        hidden = self.model.hidden_states(**batch)  # (B, T, D)
        # position t predicts token t+1: shift the labels left, -100 at the end (log-prob 0, no gradient)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        weight = self.model.lm_head.weight.to(self.compute_dtype)  # (V, D)
        logp = linear_token_logprobs(hidden.to(self.compute_dtype), weight, targets)  # (B, T) float32
        return logp, hidden, targets


@torch.no_grad()
def token_accuracy(hidden, weight, targets, chunk=1024):
    """(correct, counted) argmax predictions on the labelled positions, in chunks of rows (no (B, T, V))."""
    mask = targets != IGNORE_INDEX
    h, t = hidden[mask], targets[mask]  # (n, D), (n,)
    correct = sum(int(((h[i:i + chunk] @ weight.to(h.dtype).t()).argmax(-1) == t[i:i + chunk]).sum())
                  for i in range(0, len(t), chunk))
    return correct, len(t)


def exact_match(model, processor, rows, batch_size):
    """Share of rows whose greedy answer equals the reference answer (the last assistant turn)."""
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        refs = [r.conversation[-1]["content"].strip() for r in chunk]
        longest = max(len(processor.tokenizer.encode(ref).ids) for ref in refs)  # room for it and its eos
        # a fixed seed: sampling must not draw from the training RNG
        answers, _ = chat.answer(model, processor, [r.conversation[:-1] for r in chunk],
                                 images=[r.images for r in chunk], videos=[r.videos for r in chunk],
                                 max_new_tokens=longest + 1, temperature=0.0, seed=0)
        hits += sum(a == r for a, r in zip(answers, refs))
    model.train(was_training)
    return hits / max(1, len(rows))


def fit_max_length(rows, val_rows, processor, args, proc):
    """The rows that train under --max_length, every sample measured now (image headers only): what
    --truncation_strategy drops, cuts, or leaves answerless, said before training."""
    n_rows, n_val = len(rows), len(val_rows)
    rows, fit = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy).fitting_rows()
    val_rows, _ = data.SFTDataset(val_rows, processor, args.max_length, args.truncation_strategy).fitting_rows()
    proc.print(f"--max_length {args.max_length}, --truncation_strategy {args.truncation_strategy}: of {n_rows} "
               f"training samples {fit['dropped']} dropped as too long, {fit['no_answer']} left out (the cut "
               f"leaves no answer), {fit['cut']} cut (longest: {fit['longest']} tokens); of {n_val} eval samples "
               f"{n_val - len(val_rows)} left out")
    if not rows:
        raise SystemExit(
            f"nothing to train on: none of the {n_rows} training samples fits --max_length {args.max_length} "
            f"({fit['dropped']} longer and dropped under --truncation_strategy {args.truncation_strategy}, "
            f"{fit['no_answer']} whose answer lies wholly past the cut); the longest sample has "
            f"{fit['longest']} tokens: raise --max_length, or lower --max_pixels")
    return rows, val_rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model is None:
        args = demo_defaults(args, argv)
    started = time.time()
    proc = training.init_process(args)  # one process per GPU under torchrun, else GPU 0 or the CPU
    resume, output_dir = training.prepare_output(args, proc)  # refused if it holds another run

    # --- model and weights
    model, processor = training.load_model(args, proc, resume)
    trainable, modules_to_save = training.make_trainable(model, args, proc)  # FSDP2: sharded here
    step_module = training.wrap_ddp(TokenLogprobs(model, proc.dtype), proc)  # DDP when replicated

    # --- data
    rows, val_rows = training.load_data(args, data.load_rows)
    if args.max_length is not None:
        rows, val_rows = fit_max_length(rows, val_rows, processor, args, proc)
    train_set = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy)
    val_set = data.SFTDataset(val_rows, processor, args.max_length, args.truncation_strategy)
    bs, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    micro_per_epoch, steps_per_epoch, total_steps = training.count_steps(len(rows), bs, accum, proc, args)
    proc.print(f"data: {len(rows)} train rows, {len(val_rows)} eval rows; {steps_per_epoch} steps per epoch of "
               f"{accum} x {bs * proc.world} samples; {total_steps} steps")

    # --- optimizer, schedule, and the state a resumed run continues from
    optimizer, scheduler = training.make_optimizer(trainable, args, total_steps, proc)
    state = training.start_state(resume, model, optimizer, scheduler, args, proc)

    @torch.no_grad()
    def evaluate():
        """Token-averaged loss and next-token accuracy on the eval rows, over all processes."""
        model.eval()
        loss_sum = correct = counted = 0.0
        batches = training.eval_batches(val_set, val_set.collate, args.per_device_eval_batch_size, proc,
                                        stand_ins=True)  # FSDP2: as many forwards in every process
        for batch, weight in batches:
            with proc.autocast():
                logp, hidden, targets = step_module(**batch)
            c, n = token_accuracy(hidden, model.lm_head.weight, targets)
            loss_sum -= float(logp.sum()) * weight
            correct, counted = correct + c * weight, counted + n * weight
        model.train()
        return training.reduce_means({"eval_loss": (loss_sum, counted),
                                      "eval_mean_token_accuracy": (correct, counted)}, proc)

    def print_exact_match(when, note=""):
        """Greedy exact match on the first --eval_exact_match eval rows, decoded by the first process."""
        with training.whole_model(model, proc) as whole:  # FSDP2: a whole copy, for the sampler
            if proc.main:
                share = exact_match(whole, processor, val_rows[:args.eval_exact_match],
                                    args.per_device_eval_batch_size)
                proc.print(f"held-out exact-match accuracy {when} training: {100 * share:.1f}% "
                           f"({min(len(val_rows), args.eval_exact_match)} samples{note})")

    # --- the loop
    if args.eval_exact_match and val_rows and resume is None:
        print_exact_match("before")
    log = training.RunLog(args, output_dir, proc, state, total_steps, resume)
    eval_every, save_every = training.intervals(args, steps_per_epoch)
    params = [p for _, p in trainable]
    steps = training.step_batches(train_set, train_set.collate, bs, accum, proc, state, args)
    while state["global_step"] < total_steps:
        micro = next(steps)  # [(batch, weight)]: weight 0 for a stand-in of a micro-batch dropped whole
        # the loss: L = -(1/N) sum over assistant tokens t of log p(token t | tokens < t, images), where N counts
        # the assistant tokens of every micro-batch of this step in every process. DDP and FSDP2 average
        # gradients over the `world` processes, so each scales its sum by world / N.
        my_tokens = sum(data.count_label_tokens(b["labels"]) for b, w in micro if w)
        n_tokens, n_input = proc.all_sum(my_tokens, sum(int(b["attention_mask"].sum()) for b, w in micro if w))
        logging_step = training.due(state["global_step"] + 1, args.logging_steps, total_steps)
        loss_sum, correct, counted = 0.0, 0, 0
        for i, (batch, weight) in enumerate(micro):
            batch = training.to_device(batch, proc.device)
            with training.grad_sync(step_module, i == len(micro) - 1), proc.autocast():
                logp, hidden, targets = step_module(**batch)  # (B, T) float32, 0 where there is no label
                loss = -logp.sum() * (weight * proc.world / max(1.0, n_tokens))
                if logging_step:
                    c, n = token_accuracy(hidden.detach(), model.lm_head.weight, targets)
                    correct, counted = correct + c * weight, counted + n * weight
                loss.backward()
            loss_sum -= float(logp.detach().sum()) * weight
        grad_norm, lr = training.optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        state["global_step"] += 1
        state["num_tokens"] += int(n_input)
        step = state["global_step"]
        means = training.reduce_means({"loss": (loss_sum, my_tokens), "mean_token_accuracy": (correct, counted)},
                                      proc)
        log.step(step, {**means, "tokens": n_input})
        if logging_step:
            window, totals, seconds = log.window()
            entry = {"loss": window["loss"], "grad_norm": grad_norm, "learning_rate": lr,
                     "mean_token_accuracy": window["mean_token_accuracy"], "num_tokens": state["num_tokens"],
                     "tokens_per_second": totals["tokens"] / seconds,
                     "epoch": round(state["epoch"] + state["micro_batch"] / micro_per_epoch, 4)}
            if state["num_dropped"]:
                entry["num_dropped_too_long"] = state["num_dropped"]
            log.write(entry)
        eval_loss = None
        if val_rows and training.due(step, eval_every, total_steps):
            result = evaluate()
            eval_loss = result["eval_loss"]
            log.write(result)
        if training.due(step, save_every, total_steps):
            path = training.save_checkpoint(model, args, state, optimizer, scheduler, proc, output_dir,
                                            modules_to_save, metric=eval_loss)
            log.say(f"saved {path}")
    log.close(plot=["loss", "eval_loss"])

    if state["num_dropped"]:
        proc.print(f"dropped {state['num_dropped']} samples longer than --max_length {args.max_length} (cutting "
                   "them would have cut through image tokens)")
    if args.eval_exact_match and val_rows:
        print_exact_match("after", ", chance for the demo: 25%")
    proc.print(f"done in {time.time() - started:.0f} s; checkpoints in {output_dir}")
    training.finish(proc)
    return model, state


if __name__ == "__main__":
    training.launch(main, __file__)  # NPROC_PER_NODE=N: under torchrun
