"""Supervised fine-tuning (LoRA or full) of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, with ms-swift's options.

    python train_sft.py                          # the embedded demo: a tiny model learns a colour task on the CPU
    python train_sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --dataset train.jsonl --train_type lora \\
        --lora_rank 8 --lora_alpha 32 --learning_rate 1e-4 --gradient_accumulation_steps 16 --output_dir output
    NPROC_PER_NODE=4 python train_sft.py ...      # several GPUs of one host (DDP), as ms-swift launches it
    torchrun --nproc_per_node 4 train_sft.py ...  # the same
    python -m minivl.export --adapters output/checkpoint-100 --merge_lora true   # -> checkpoint-100-merged

A `swift sft` command runs with `swift sft` replaced by `python train_sft.py`: options are spelled as in ms-swift
(`--train_type` or the older `--sft_type`/`--tuner_type`), `MAX_PIXELS`/`MIN_PIXELS` in the environment are
honoured, the data formats are ms-swift's (minivl/data.py). An ms-swift option minivl does not implement is an
error naming it; options of engines minivl does not use (DeepSpeed, FSDP, vLLM, Megatron, flash-attn, Liger) say
what minivl does instead.

The file reads top to bottom: arguments, model and weights, data, optimizer and schedule, the loop, saving.
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

What it simplifies, compared with ms-swift: no packing or padding-free batches, no DeepSpeed/FSDP sharding (each
GPU holds the whole model), no per-message loss scales, no versioned output
subdirectory unless --add_version true (ms-swift's default). Tests: tests/test_sft.py, tests/test_sft_cli.py.

Shapes: B batch, T tokens, D LLM width, V vocabulary.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import minivl
from minivl import chat, data, lora, training  # first: minivl.lora checks that `kernels` is minivl's
from kernels.logprobs import linear_token_logprobs  # noqa: I001
from minivl.processor import IGNORE_INDEX, PROCESSOR_FILES

# ----------------------------------------------------------------------------------------------- arguments

# ms-swift options of engines minivl does not use, and what minivl does instead
ENGINES = {
    "deepspeed": "minivl has no DeepSpeed: it trains on one GPU, or on several through torchrun (DDP), each GPU "
                 "holding the whole model; to fit, use --train_type lora, --gradient_checkpointing true, or a "
                 "smaller --per_device_train_batch_size",
    "fsdp": "minivl has no FSDP: DDP through torchrun, each GPU holding the whole model (see --deepspeed)",
    "vllm": "minivl has no vLLM: SFT generates nothing; the held-out exact-match check uses minivl.generate",
    "use_vllm": "minivl has no vLLM: SFT generates nothing; the held-out exact-match check uses minivl.generate",
    "infer_backend": "minivl has no inference engines: minivl.generate is its sampler",
    "megatron": "minivl has no Megatron: DDP through torchrun",
    "attn_impl": "minivl always uses PyTorch SDPA (flash kernels when a batch has no padding)",
    "use_liger_kernel": "the loss already goes through minivl's fused lm_head + log-prob kernel: no logits exist",
    "packing": "minivl pads each micro-batch (right padding); there is no packing or padding-free mode",
    "padding_free": "minivl pads each micro-batch (right padding); there is no packing or padding-free mode",
    "quant_bits": "minivl trains no quantized models (no QLoRA)",
    "quant_method": "minivl trains no quantized models (no QLoRA)",
    "rlhf_type": "train_sft.py runs SFT (swift sft); DPO and GRPO (swift rlhf --rlhf_type dpo|grpo) are the "
                 "scripts train_dpo.py and train_grpo.py",
}
# accepted and without effect here, with the reason
HARMLESS = {
    "model_author": "used by ms-swift's self-cognition data only",
    "model_name": "used by ms-swift's self-cognition data only",
    "dataset_num_proc": "samples are encoded by the DataLoader (--dataloader_num_workers)",
    "lazy_tokenize": "minivl always encodes samples when they are batched",
    "logging_first_step": "minivl logs every --logging_steps steps",
}


def build_parser():
    p = argparse.ArgumentParser(description="SFT of Qwen-VL models with ms-swift's options (see the docstring)",
                                allow_abbrev=False)
    a = p.add_argument
    flag = dict(type=training.boolean, nargs="?", const=True)  # `--opt`, `--opt true` or `--opt false`
    # model and data (no --model and no --dataset: the embedded demo)
    a("--model", help="checkpoint directory or hub id (default: the embedded demo model)")
    a("--dataset", nargs="+", help="jsonl / json / parquet files (ms-swift or ShareGPT format)")
    a("--val_dataset", nargs="*", default=[])
    a("--split_dataset_ratio", type=float, default=0.0, help="share of --dataset held out for eval")
    a("--system", help="default system prompt, or a path to a file holding it")
    a("--max_length", type=int, help="tokens a sample may have (see --truncation_strategy; default: no limit)")
    a("--truncation_strategy", choices=["delete", "right"], default="delete",
      help="a sample longer than --max_length: delete drops it (ms-swift's default), right cuts its text")
    a("--max_pixels", type=int, help="per image (default: MAX_PIXELS, else preprocessor_config.json)")
    a("--min_pixels", type=int)
    # what trains
    a("--train_type", "--sft_type", "--tuner_type", dest="train_type", choices=["lora", "lora_llm", "full"],
      help="default: lora (the demo: full)")
    a("--freeze_llm", **flag, default=False)
    a("--freeze_vit", **flag, default=True)
    a("--freeze_aligner", **flag, default=True)
    a("--lora_rank", type=int, default=8)
    a("--lora_alpha", type=int, default=32)
    a("--lora_dropout", type=float, default=0.05)
    a("--target_modules", nargs="+", default=["all-linear"])
    a("--target_regex")
    a("--modules_to_save", nargs="*", default=[], help="module names trained in full next to LoRA")
    a("--init_weights", type=lambda s: "gaussian" if s == "gaussian" else training.boolean(s), default=True)
    a("--use_rslora", **flag, default=False)
    a("--lorap_lr_ratio", type=float, help="LoRA+: the B matrices get learning_rate x this")
    a("--vit_lr", type=float, help="learning rate of the vision tower's parameters (default: --learning_rate)")
    a("--aligner_lr", type=float, help="learning rate of the merger(s) (default: --learning_rate)")
    # batches and schedule
    a("--per_device_train_batch_size", type=int, help="default: 1")
    a("--per_device_eval_batch_size", type=int, default=1)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--num_train_epochs", type=float, default=3.0)
    a("--max_steps", type=int, default=-1, help="overrides num_train_epochs when > 0")
    a("--learning_rate", type=float, help="default 1e-4 with LoRA, 1e-5 full")
    a("--lr_scheduler_type", choices=["cosine", "linear", "constant", "constant_with_warmup"], default="cosine")
    a("--warmup_ratio", type=float, default=0.05)
    a("--warmup_steps", type=int, default=0, help="overrides warmup_ratio when > 0")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.95)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--weight_decay", type=float, default=0.1)
    a("--max_grad_norm", type=float, default=1.0)
    a("--seed", type=int, default=42)
    # precision and memory
    a("--torch_dtype", choices=["bfloat16", "float16", "float32"],
      help="default: bfloat16 on a GPU, float32 on the CPU")
    a("--gradient_checkpointing", **flag, default=True)
    a("--vit_gradient_checkpointing", **flag, help="default: --gradient_checkpointing")
    a("--dataloader_num_workers", type=int, default=0)
    # evaluation, logging, saving
    a("--eval_strategy", "--evaluation_strategy", dest="eval_strategy", choices=["steps", "epoch", "no"],
      default="steps")
    a("--eval_steps", type=int, help="default: --save_steps")
    a("--save_strategy", choices=["steps", "epoch", "no"], default="steps")
    a("--save_steps", type=int, default=500)
    a("--save_total_limit", type=int, help="keep the best (lowest eval loss) and the latest, this many in all")
    a("--save_only_model", **flag, default=False, help="no optimizer state (no exact resume)")
    a("--logging_steps", type=int, default=5)
    a("--output_dir", default="output")
    a("--overwrite_output_dir", **flag, default=False, help="replace the run an earlier command wrote there")
    a("--add_version", **flag, default=False, help="write into a new <output_dir>/v<N>-<date>-<time>")
    a("--resume_from_checkpoint", help="a checkpoint-N directory: the run continues exactly where it was")
    a("--report_to", nargs="+", choices=["tensorboard", "wandb", "swanlab", "none"],
      help="default: tensorboard when it is installed")
    a("--logging_dir", help="TensorBoard directory (default: <output_dir>/runs)")
    a("--swanlab_project")
    a("--swanlab_workspace")
    a("--swanlab_exp_name", help="default: the output directory")
    a("--swanlab_mode", choices=["cloud", "local", "offline", "disabled"])
    a("--swanlab_token")
    a("--eval_exact_match", type=int, default=0,
      help="minivl: greedy-decode this many eval samples before and after training; print exact-match accuracy")
    training.show_defaults(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = training.parse_options(parser, argv, ENGINES, HARMLESS)
    if "none" in (args.report_to or []) and len(args.report_to) > 1:
        parser.error(f"--report_to {' '.join(args.report_to)}: none goes alone")
    training.check_trackers(args.report_to or [])  # a missing package is an error now, not after loading
    if args.system and os.path.isfile(args.system):
        args.system = Path(args.system).read_text().strip()  # ms-swift: --system takes text or a file
    if (args.model is None) != (args.dataset is None):
        parser.error("give both --model and --dataset, or neither (for the embedded demo)")
    return args


def demo_defaults(args, argv):
    """No --model and no --dataset: the demo model learns the demo task, options given on the command line still
    win. Full training at lr 1e-3 with batch 16: what the task was measured to learn with on a CPU."""
    from minivl import demo

    paths = demo.make_demo(demo.DEFAULT_DIR)
    given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
    given |= {"train_type"} if {"sft_type", "tuner_type"} & given else set()
    defaults = dict(model=str(paths["model"]), dataset=[str(paths["train"])], val_dataset=[str(paths["test"])],
                    train_type="full", freeze_vit=False, freeze_aligner=False, learning_rate=1e-3,
                    per_device_train_batch_size=16, per_device_eval_batch_size=64, max_steps=300,
                    warmup_ratio=0.05, weight_decay=0.0, lora_dropout=0.0, gradient_checkpointing=False,
                    eval_steps=100, save_steps=300, save_total_limit=1, logging_steps=25,
                    output_dir="output/demo", eval_exact_match=128,
                    overwrite_output_dir="output_dir" not in given)  # the demo replaces its own last run
    for key, value in defaults.items():
        if key not in given:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------- the trainer

class TokenLogprobs(nn.Module):
    """What DDP wraps: the model up to per-token log-probs of the next tokens. The vocabulary projection is
    fused with the log-softmax (kernels/logprobs.py), so the (B, T, V) logits never exist."""

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


def param_groups(named_trainable, lr, args):
    """AdamW parameter groups by (learning rate, weight decay). No decay on any 1-D parameter: every bias and
    every norm weight, whatever its name (transformers' Trainer decides by name and layer type, and so decays
    the RMSNorm weights of Qwen2.5-VL's vision tower). LoRA+ multiplies the lr of the B matrices by
    --lorap_lr_ratio; --vit_lr / --aligner_lr set the vision tower's and the merger's."""
    part_lr = {"vit": args.vit_lr, "aligner": args.aligner_lr}
    groups = {}
    for name, p in named_trainable:
        group_lr = part_lr.get(lora.part_of(name)) or lr
        if ".lora_B." in name and args.lorap_lr_ratio is not None:
            group_lr *= args.lorap_lr_ratio
        decay = args.weight_decay if p.ndim >= 2 else 0.0
        group = groups.setdefault((group_lr, decay), {"params": [], "names": [], "lr": group_lr,
                                                      "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)  # kept in the optimizer state: which parameters a group holds
    return list(groups.values())


def lr_factor(step, total, warmup, kind):
    """transformers' schedules: linear warmup, then cosine to 0, linear to 0, or constant."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0  # constant_with_warmup


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model is None:
        args = demo_defaults(args, argv)
    started = time.time()

    # --- devices: one process per GPU under torchrun, else one process (GPU 0 or the CPU)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # --- where the run writes: a directory holding another run is refused unless this one resumes it or
    # replaces it (--overwrite_output_dir), so two runs never mix
    train_type = args.train_type or "lora"
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None:
        training.check_resume(resume, train_type)
    output_dir = training.on_rank0(training.prepare_output_dir, args.output_dir, args.add_version,
                                   args.overwrite_output_dir, resume)
    args.output_dir = str(output_dir)

    # --- model and weights
    dtype = getattr(torch, args.torch_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if dtype == torch.float16:
        raise SystemExit("--torch_dtype float16 is not supported for training (no loss scaling): use bfloat16")
    full_resume = resume is not None and train_type == "full"
    # a full fine-tune resumes from the checkpoint's own weights (float32 masters, saved as they were)
    model = minivl.load(resume if full_resume else args.model, dtype=None if full_resume else dtype,
                        device=device)
    processor = minivl.Processor.from_pretrained(args.model, min_pixels=args.min_pixels,
                                                 max_pixels=args.max_pixels)
    unfrozen = [part for part, frozen in (("llm", args.freeze_llm), ("vit", args.freeze_vit),
                                          ("aligner", args.freeze_aligner)) if not frozen]
    for p in model.parameters():
        p.requires_grad_(False)
    modules_to_save = list(args.modules_to_save)
    if train_type == "full":
        for name, p in model.named_parameters():
            part = lora.part_of(name)
            if (part if part != "lm_head" else "llm") in unfrozen:
                p.requires_grad_(True)
    else:
        lora_parts = ["llm"] if train_type == "lora_llm" else unfrozen
        if train_type == "lora_llm":
            modules_to_save += lora.whole_modules(model, [p for p in unfrozen if p != "llm"])
        names = lora.select_linear(model, lora_parts, args.target_modules, args.target_regex)
        lora.inject(model, names, args.lora_rank, args.lora_alpha, args.lora_dropout, args.use_rslora,
                    args.init_weights)
        for name in modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit("nothing to train: every part is frozen (--freeze_llm/--freeze_vit/--freeze_aligner)")
    for _, p in trainable:
        p.data = p.data.float()  # float32 master weights; the matmuls run in `dtype` (autocast on the GPU)
    trains_vision = any(n.startswith("model.visual.") for n, _ in trainable)
    model.model.language_model.gradient_checkpointing = args.gradient_checkpointing
    vit_ckpt = args.vit_gradient_checkpointing
    model.model.visual.gradient_checkpointing = trains_vision and (args.gradient_checkpointing if vit_ckpt is None
                                                                    else vit_ckpt)
    model.train()
    step_module = TokenLogprobs(model, dtype)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[local_rank]
                                                          if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    say(f"model {args.model} ({model.cfg.model_type}), {train_type}, trainable {n_train / 1e6:.3f} M of "
        f"{n_all / 1e6:.3f} M parameters ({100 * n_train / n_all:.2f}%), {dtype}, {device}, world {world}")

    # --- data
    rows = data.load_rows(args.dataset, args.system)
    val_rows = data.load_rows(args.val_dataset, args.system) if args.val_dataset else []
    if args.split_dataset_ratio and not val_rows:
        rows, val_rows = data.split_rows(rows, args.split_dataset_ratio, args.seed)
    if args.max_length is not None:
        # every sample measured now (image headers only): what --max_length drops, cuts, or leaves answerless
        n_rows, n_val = len(rows), len(val_rows)
        rows, fit = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy).fitting_rows()
        val_rows, _ = data.SFTDataset(val_rows, processor, args.max_length,
                                      args.truncation_strategy).fitting_rows()
        say(f"--max_length {args.max_length}, --truncation_strategy {args.truncation_strategy}: of {n_rows} "
            f"training samples {fit['dropped']} dropped as too long, {fit['no_answer']} left out (the cut leaves "
            f"no answer), {fit['cut']} cut (longest: {fit['longest']} tokens); of {n_val} eval samples "
            f"{n_val - len(val_rows)} left out")
        if not rows:
            raise SystemExit(
                f"nothing to train on: none of the {n_rows} training samples fits --max_length {args.max_length} "
                f"({fit['dropped']} longer and dropped under --truncation_strategy {args.truncation_strategy}, "
                f"{fit['no_answer']} whose answer lies wholly past the cut); the longest sample has "
                f"{fit['longest']} tokens: raise --max_length, or lower --max_pixels")
    train_set = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy)
    val_set = data.SFTDataset(val_rows, processor, args.max_length, args.truncation_strategy)
    bs, accum = args.per_device_train_batch_size or 1, args.gradient_accumulation_steps
    per_micro = bs * world  # samples in one micro-batch over all GPUs

    def epoch_batches(epoch):
        """This rank's micro-batches (lists of row indices) of an epoch: a seeded permutation cut into
        micro-batches of bs x world, each GPU taking its bs. Under DDP the incomplete last one is dropped, so
        every GPU runs the same number of backward passes."""
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        usable = len(order) if world == 1 else len(order) // per_micro * per_micro
        micro = [order[i:i + per_micro] for i in range(0, usable, per_micro)]
        return [m[rank * bs:(rank + 1) * bs] for m in micro]

    micro_per_epoch = len(epoch_batches(0))
    if micro_per_epoch == 0:
        raise SystemExit(f"{len(rows)} training rows make no micro-batch of {per_micro} ({bs} x {world} GPUs)")
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    say(f"data: {len(rows)} train rows, {len(val_rows)} eval rows; {steps_per_epoch} steps per epoch of "
        f"{accum} x {per_micro} samples; {total_steps} steps")

    def loader(epoch, start):
        """A DataLoader over this rank's micro-batches of `epoch` from micro-batch `start` on. Its own seeded
        generator: creating it draws nothing from the global RNG, so a resumed run stays in step."""
        return iter(torch.utils.data.DataLoader(
            train_set, batch_sampler=epoch_batches(epoch)[start:], collate_fn=train_set.collate,
            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed + epoch)))

    # --- optimizer and schedule
    lr = args.learning_rate or (1e-5 if train_type == "full" else 1e-4)
    optimizer = torch.optim.AdamW(param_groups(trainable, lr, args), lr=lr,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                  fused=device.type == "cuda")
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, args.lr_scheduler_type))

    # --- resume: weights, optimizer, scheduler, RNG, data position
    state = {"global_step": 0, "epoch": 0, "micro_batch": 0, "num_tokens": 0, "best_eval_loss": None,
             "best_checkpoint": None, "num_dropped": 0}
    if resume is not None:
        if train_type != "full":
            lora.load_adapter_tensors(model, resume)
        saved = torch.load(resume / "training_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"][min(local_rank, len(saved["rng"]["cuda"]) - 1)])
        random.setstate(saved["rng"]["python"])
        state.update(json.loads((resume / "trainer_state.json").read_text()))
        say(f"resumed from {resume} at step {state['global_step']} (epoch {state['epoch']}, micro-batch "
            f"{state['micro_batch']})")
    public_args = {k: v for k, v in vars(args).items() if not k.endswith("_token")}  # no secrets in files
    metrics = None
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(public_args, indent=2) + "\n")
        metrics = training.MetricsLog(
            output_dir, args.report_to or ["tensorboard"], public_args,
            resumed_step=state["global_step"] if resume is not None else None, logging_dir=args.logging_dir,
            explicit=args.report_to is not None,
            swanlab={k: getattr(args, "swanlab_" + k)
                     for k in ("project", "workspace", "exp_name", "mode", "token")})

    def all_sum(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def log(entry):
        entry = {"step": state["global_step"], **entry}
        say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()),
            progress="loss" in entry)  # off a terminal, training lines carry the step, speed and time left
        if metrics:
            metrics.log(entry)

    @torch.no_grad()
    def evaluate():
        """Token-averaged loss and next-token accuracy on the eval rows, summed over all GPUs."""
        model.eval()
        ebs = args.per_device_eval_batch_size
        mine = list(range(len(val_rows)))[rank::world]
        loss_sum = correct = counted = 0.0
        for i in range(0, len(mine), ebs):
            batch = val_set.collate([val_set[j] for j in mine[i:i + ebs]])
            batch.pop("num_dropped")
            if not batch:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                logp, hidden, targets = step_module(**batch)
            loss_sum -= float(logp.sum())
            c, n = token_accuracy(hidden, model.lm_head.weight, targets)
            correct, counted = correct + c, counted + n
        model.train()
        loss_sum, correct, counted = all_sum(loss_sum, correct, counted)
        return loss_sum / max(1, counted), correct / max(1, counted)

    # --- saving: checkpoint-N written under a temporary name, then renamed into place
    def save_checkpoint():
        name = f"checkpoint-{state['global_step']}"
        final, tmp = output_dir / name, output_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        if train_type == "full":
            model.save_pretrained(tmp)
        else:
            config = lora.adapter_config(model, args.model, modules_to_save, args.init_weights, args.lora_dropout,
                                         args.use_rslora)
            lora.save_adapter(model, tmp, modules_to_save=modules_to_save, config=config)
        source = minivl.checkpoint.resolve(args.model)
        for f in PROCESSOR_FILES:  # the processor travels with the checkpoint (config.json only for full)
            if (source / f).is_file() and not (tmp / f).exists() and (f != "config.json" or train_type == "full"):
                shutil.copy(source / f, tmp / f)
        if not args.save_only_model:
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                   "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                       tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "args.json").write_text(json.dumps(public_args, indent=2) + "\n")
        old = None
        if final.exists():  # the same step saved before (a resumed run): keep it until the new one is in place
            old = output_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old)
        rotate_checkpoints(output_dir, args.save_total_limit, state["best_checkpoint"])
        say(f"saved {final}")

    # --- the loop
    if args.eval_exact_match and val_rows and main_process and resume is None:
        before = exact_match(model, processor, val_rows[:args.eval_exact_match], args.per_device_eval_batch_size)
        say(f"held-out exact-match accuracy before training: {100 * before:.1f}% "
            f"({min(len(val_rows), args.eval_exact_match)} samples)")
    epoch_steps = steps_per_epoch
    save_every = {"steps": args.save_steps, "epoch": epoch_steps, "no": 0}[args.save_strategy]
    eval_every = {"steps": args.eval_steps or args.save_steps, "epoch": epoch_steps, "no": 0}[args.eval_strategy]
    trainable_params = [p for _, p in trainable]
    bar = training.Progress(total_steps, start=state["global_step"]) if main_process else None
    say = bar.print if bar else say  # log lines go above the bar
    batches = loader(state["epoch"], state["micro_batch"])
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time(), "correct": 0, "counted": 0}
    fallback = None  # a batch to run with zero weight when a GPU's micro-batch was dropped whole (keeps DDP even)
    while state["global_step"] < total_steps:
        # gather this step's micro-batches (at most `accum`, never across an epoch's end)
        micro = []
        while len(micro) < accum:
            batch = next(batches, None)
            if batch is None:
                if micro:
                    break
                state["epoch"], state["micro_batch"] = state["epoch"] + 1, 0
                batches = loader(state["epoch"], 0)
                continue
            state["micro_batch"] += 1
            state["num_dropped"] += batch.pop("num_dropped")
            micro.append(batch)
        if state["micro_batch"] >= micro_per_epoch:
            state["epoch"], state["micro_batch"] = state["epoch"] + 1, 0
            batches = loader(state["epoch"], 0)

        # the loss: L = -(1/N) sum over assistant tokens t of log p(token t | tokens < t, images), where N counts
        # the assistant tokens of every micro-batch of this step on every GPU. DDP averages gradients over the
        # `world` GPUs, so each GPU scales its sum by world / N.
        n_tokens = sum(data.count_label_tokens(b["labels"]) for b in micro if b)
        n_input = sum(int(b["attention_mask"].sum()) for b in micro if b)
        n_tokens_all, n_input_all = all_sum(n_tokens, n_input)
        last = state["global_step"] + 1 == total_steps
        logging_step = (state["global_step"] + 1) % args.logging_steps == 0 or last
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            weight = 1.0
            if not batch:
                if world == 1:
                    continue
                if fallback is None:
                    raise RuntimeError("a micro-batch was dropped whole before any batch was seen on this GPU")
                batch, weight = fallback, 0.0
            fallback = batch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(micro) - 1 or world == 1
            with (contextlib.nullcontext() if sync else step_module.no_sync()), autocast:
                logp, hidden, targets = step_module(**batch)  # (B, T) float32, 0 where there is no label
                loss = -logp.sum() * (weight * world / max(1.0, n_tokens_all))
                if logging_step:
                    c, n = token_accuracy(hidden.detach(), model.lm_head.weight, targets)
                    window["correct"], window["counted"] = window["correct"] + c, window["counted"] + n
                loss.backward()
            loss_sum -= float(logp.detach().sum()) * weight
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_params, args.max_grad_norm))
        lr_now = lr * lr_factor(state["global_step"], total_steps, warmup, args.lr_scheduler_type)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["global_step"] += 1
        state["num_tokens"] += int(n_input_all)
        loss_all, = all_sum(loss_sum)
        window["loss"] += loss_all / max(1.0, n_tokens_all)
        window["steps"] += 1
        window["tokens"] += n_input_all
        step = state["global_step"]
        if bar:
            bar.update(step, loss_all / max(1.0, n_tokens_all))
        saving = main_process and args.save_strategy != "no" and (step % save_every == 0 or last)
        if logging_step:
            elapsed = time.time() - window["start"]
            correct, counted = all_sum(window["correct"], window["counted"])
            entry = {"loss": window["loss"] / window["steps"], "grad_norm": grad_norm, "learning_rate": lr_now,
                     "mean_token_accuracy": correct / counted if counted else None,
                     "num_tokens": state["num_tokens"], "tokens_per_second": window["tokens"] / elapsed,
                     "epoch": round(state["epoch"] + state["micro_batch"] / micro_per_epoch, 4)}
            if state["num_dropped"]:
                entry["num_dropped_too_long"] = state["num_dropped"]
            log(entry)
            window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time(), "correct": 0, "counted": 0}
        if val_rows and ((eval_every and step % eval_every == 0) or last):
            eval_loss, eval_acc = evaluate()
            log({"eval_loss": eval_loss, "eval_mean_token_accuracy": eval_acc})
            if saving and (state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]):
                state["best_eval_loss"], state["best_checkpoint"] = eval_loss, f"checkpoint-{step}"
        if saving:
            save_checkpoint()
        if world > 1:
            dist.barrier()  # nobody runs ahead while rank 0 writes
    if bar:
        bar.close()

    if state["num_dropped"]:
        say(f"dropped {state['num_dropped']} samples longer than --max_length {args.max_length} (cutting them "
            "would have cut through image tokens)")
    if args.eval_exact_match and val_rows and main_process:
        after = exact_match(model, processor, val_rows[:args.eval_exact_match], args.per_device_eval_batch_size)
        say(f"held-out exact-match accuracy after training: {100 * after:.1f}% "
            f"({min(len(val_rows), args.eval_exact_match)} samples, chance for the demo: 25%)")
    say(f"done in {time.time() - started:.0f} s; checkpoints in {output_dir}")
    if metrics:
        metrics.close()
    if world > 1:
        dist.destroy_process_group()
    return model, state


def rotate_checkpoints(output_dir, limit, best):
    """Keep `limit` checkpoints: the best one (lowest eval loss) and the most recent ones."""
    if not limit:
        return
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                   if p.name.split("-")[1].isdigit() else -1)
    found = [p for p in found if p.name.split("-")[1].isdigit() and p.is_dir()]
    keep = [p for p in found if p.name == best][:1]
    for p in reversed(found):
        if len(keep) >= limit:
            break
        if p not in keep:
            keep.append(p)
    for p in found:
        if p not in keep:
            shutil.rmtree(p)


if __name__ == "__main__":
    training.relaunch_under_torchrun(__file__, sys.argv[1:])  # NPROC_PER_NODE=N: run under torchrun instead
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # DDP's reducer keeps the process group, and its gloo/NCCL threads, alive after destroy_process_group
        # (torch 2.13: the threads are still there after `del` and gc). A thread that touches Python while the
        # interpreter shuts down aborts the process now and then ("terminate called without an active
        # exception", about 1 run in 100 here). Everything is written and closed by now: skip the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
