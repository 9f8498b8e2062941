"""What the trainers share besides their algorithm, as plain functions called from each train_*.py's main(): the
options (ms-swift's spelling, or a LLaMA-Factory YAML as the single argument), the processes (one per GPU under
torchrun: FSDP2 shards the model, or DDP replicates it), the model with its LoRA / freezing, the data set's rows,
the order of micro-batches with its exact position for resume, the optimizer and schedule, checkpoints, and what a
run reports (logging.jsonl, TensorBoard, wandb, SwanLab, the progress bar). A trainer's main() reads:

    args = training.parse_args(build_parser(), argv, "sft", ENGINES, HARMLESS)  # or argv == ["config.yaml"]
    proc = training.init_process(args)                     # rank, world, device, dtype, engine; process group
    resume, output_dir = training.prepare_output(args, proc)
    model, processor = training.load_model(args, proc, resume)
    trainable, modules_to_save = training.make_trainable(model, args, proc)   # LoRA / full, freezing; FSDP2
    step_module = training.wrap_ddp(MyForward(model), proc)                   # DDP when replicated
    rows, val_rows = training.load_data(args, data.load_rows)                 # or data_rl.load_preference_rows
    micro_per_epoch, steps_per_epoch, total_steps = training.count_steps(len(rows), bs, accum, proc, args)
    optimizer, scheduler = training.make_optimizer(trainable, args, total_steps, proc)
    state = training.start_state(resume, model, optimizer, scheduler, args, proc)
    log = training.RunLog(args, output_dir, proc, state, total_steps, resume)
    steps = training.step_batches(dataset, collate, bs, accum, proc, state, args)
    while state["global_step"] < total_steps:
        micro = next(steps)                                    # [(batch, weight)]: this step's micro-batches
        for i, (batch, weight) in enumerate(micro):
            with training.grad_sync(step_module, i == len(micro) - 1), proc.autocast():
                loss = ...                                     # the algorithm, written out in the trainer
                loss.backward()
        grad_norm, lr = training.optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        state["global_step"] += 1
        log.step(state["global_step"], training.reduce_means({"loss": (loss_sum, count)}, proc))
        ... log.write(entry), evaluate, training.save_checkpoint(...) when training.due(...)
    log.close(plot=["loss", "eval_loss"])
    training.finish(proc)

The unit of data is whatever the trainer's data set yields and its collate makes of a list of them: SFT samples,
preference pairs, GRPO prompts.

Several processes, what a trainer keeps to: under FSDP2 every forward and backward gathers weights from all
processes, so each process runs the same ones in the same order (step_batches and eval_batches(stand_ins=True)
give each the same number of batches; the model runs its vision tower in every forward). A weight read outside a
forward is whole only for the model's own (lm_head, embeddings) after model.hidden_states or model(...); work that
differs between processes (the sampler) runs on whole_model(model, proc). Sums over processes go through
reduce_means or proc.all_sum. Tests: tests/test_sft_cli.py, tests/test_training.py, tests/test_distributed.py.
"""

import argparse
import contextlib
import datetime
import difflib
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, lora
from .data import split_rows
from .model import VLModel
from .processor import PROCESSOR_FILES, Processor

# ----------------------------------------------------------------------------------------------- options

# ms-swift options of engines minivl does not use, and what minivl does instead (a trainer adds its own)
ENGINES = {
    "infer_backend": "minivl has no inference engines: minivl.generate is its sampler",
    "megatron": "minivl has no Megatron: FSDP2 or DDP through torchrun (--deepspeed says which)",
    "attn_impl": "minivl always uses PyTorch SDPA (flash kernels when a batch has no padding)",
    "use_liger_kernel": "the loss already goes through minivl's fused lm_head + log-prob kernel: no logits exist",
    "packing": "minivl pads each micro-batch (right padding); there is no packing or padding-free mode",
    "padding_free": "minivl pads each micro-batch (right padding); there is no packing or padding-free mode",
    "quant_bits": "minivl trains no quantized models (no QLoRA)",
    "quant_method": "minivl trains no quantized models (no QLoRA)",
}
# accepted and without effect here, with the reason
HARMLESS = {
    "model_author": "used by ms-swift's self-cognition data only",
    "model_name": "used by ms-swift's self-cognition data only",
    "dataset_num_proc": "samples are encoded by the DataLoader (--dataloader_num_workers)",
    "lazy_tokenize": "minivl always encodes samples when they are batched",
    "logging_first_step": "minivl logs every --logging_steps steps",
}


def boolean(text):
    if str(text).lower() in ("true", "1", "yes"):
        return True
    if str(text).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(description):
    """The options every trainer has, spelled as ms-swift spells them; a trainer adds its own with add_argument,
    changes a default with set_defaults, then calls show_defaults."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    a = p.add_argument
    flag = dict(type=boolean, nargs="?", const=True)  # `--opt`, `--opt true` or `--opt false`
    # model and data (no --model and no --dataset: the embedded demo)
    a("--model", help="checkpoint directory or hub id (default: the embedded demo model)")
    a("--template", help="checked against the model's family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_nothink); "
                         "conversations are formatted with the checkpoint's own chat template")
    a("--dataset", nargs="+", help="jsonl / json / parquet files, folders or hub ids, NAME#N for N rows")
    a("--val_dataset", nargs="*", default=[])
    a("--split_dataset_ratio", type=float, default=0.0,
      help="share of --dataset held out for eval (1 or more: a number of rows)")
    a("--dataset_dir", help="LLaMA-Factory: --dataset names entries of DATASET_DIR/dataset_info.json")
    a("--max_samples", type=int, help="the first N rows of each data set (LLaMA-Factory's max_samples)")
    a("--system", help="default system prompt, or a path to a file holding it")
    a("--max_length", type=int, help="tokens a sample may have (see --truncation_strategy; default: no limit)")
    a("--truncation_strategy", choices=["delete", "right"], default="delete",
      help="a sample longer than --max_length: delete drops it (ms-swift's default), right cuts its text")
    a("--max_pixels", type=int, help="per image (default: MAX_PIXELS, else preprocessor_config.json)")
    a("--min_pixels", type=int)
    a("--video_max_pixels", type=int, help="per video frame (default: video_preprocessor_config.json)")
    a("--video_min_pixels", type=int)
    a("--video_fps", type=float, help="frames sampled per second of video (default: 2)")
    a("--video_maxlen", type=int, help="frames a video may have at most (default: 768)")
    # what trains
    a("--train_type", "--sft_type", "--tuner_type", dest="train_type", choices=["lora", "lora_llm", "full"],
      default="lora")
    a("--freeze_llm", **flag, default=False)
    a("--freeze_vit", **flag, default=True)
    a("--freeze_aligner", **flag, default=True)
    a("--lora_rank", type=int, default=8)
    a("--lora_alpha", type=int, default=32)
    a("--lora_dropout", type=float, default=0.05)
    a("--target_modules", nargs="+", default=["all-linear"])
    a("--target_regex")
    a("--modules_to_save", nargs="*", default=[], help="module names trained in full next to LoRA")
    a("--init_weights", type=lambda s: "gaussian" if s == "gaussian" else boolean(s), default=True)
    a("--use_rslora", **flag, default=False)
    a("--lorap_lr_ratio", type=float, help="LoRA+: the B matrices get learning_rate x this")
    a("--vit_lr", type=float, help="learning rate of the vision tower's parameters (default: --learning_rate)")
    a("--aligner_lr", type=float, help="learning rate of the merger(s) (default: --learning_rate)")
    # batches and schedule
    a("--per_device_train_batch_size", type=int, default=1)
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
    # several GPUs (torchrun): full fine-tuning shards the model (FSDP2), LoRA replicates it (DDP); see engine()
    a("--deepspeed", help="zero0, zero1, zero2, zero2_offload, zero3, zero3_offload, or a DeepSpeed config "
                          ".json: runs as the FSDP2 setting that matches (default: zero3 for full, zero0 for LoRA)")
    a("--fsdp", nargs="+", help="transformers' words: full_shard, shard_grad_op, offload, no_shard (auto_wrap: "
                                "one unit per layer is what minivl always does)")
    a("--ddp_timeout", type=int, default=1800, help="seconds a process waits for the others in a collective")
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
    a("--plot_loss", **flag, default=False, help="PNG curves of the logged metrics in the output directory "
                                                  "(needs matplotlib)")
    a("--swanlab_project")
    a("--swanlab_workspace")
    a("--swanlab_exp_name", help="default: the output directory")
    a("--swanlab_mode", choices=["cloud", "local", "offline", "disabled"])
    a("--swanlab_token")
    return p


def show_defaults(parser):
    """--help gives each option's default (argparse prints it only for options that already have help text)."""
    for action in parser._actions:
        shown = action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
        if shown and action.help != argparse.SUPPRESS and "default:" not in (action.help or ""):
            default = action.default
            default = " ".join(map(str, default)) if isinstance(default, list) else default
            action.help = ((action.help or "") + f" (default: {default})").strip().replace("%", "%%")


def parse_args(parser, argv, stage, engines=None, harmless=None):
    """The options of a `stage` trainer ("sft", "dpo", "grpo"): argv as ms-swift writes it, or a LLaMA-Factory
    YAML file (with `key=value` overrides after it) translated into it. `engines` / `harmless` add the
    trainer's own entries to ENGINES / HARMLESS. Checks that need no model: trackers installed, --system read
    from a file, --model and --dataset given together (neither: the embedded demo)."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = from_llamafactory(argv[0], stage, argv[1:])
    args = parse_options(parser, argv, {**ENGINES, **(engines or {})}, {**HARMLESS, **(harmless or {})})
    if "none" in (args.report_to or []) and len(args.report_to) > 1:
        parser.error(f"--report_to {' '.join(args.report_to)}: none goes alone")
    check_trackers(args.report_to or [])  # a missing package is an error now, not after loading
    if args.system and os.path.isfile(args.system):
        args.system = Path(args.system).read_text().strip()  # ms-swift: --system takes text or a file
    if (args.model is None) != (args.dataset is None):
        parser.error("give both --model and --dataset, or neither (for the embedded demo)")
    return args


def parse_options(parser, argv, engines, harmless):
    """parse_known_args, then each option the parser does not know: one of `harmless` is noted and skipped with
    its values (`--model_name swift-robot`, `--model_name a b` or `--model_name=a`), one of `engines` says what
    minivl does instead, anything else is refused with the closest option's name."""
    args, unknown = parser.parse_known_args(argv)
    problems, stray, i = [], [], 0
    options = [o.lstrip("-") for o in parser._option_string_actions]
    while i < len(unknown):
        token = unknown[i]
        i += 1
        if not token.startswith("--"):
            stray.append(token)
            continue
        while "=" not in token and i < len(unknown) and not unknown[i].startswith("--"):
            i += 1  # the option's values, written after it
        name = token[2:].split("=")[0]
        engine = next((why for key, why in engines.items() if name.startswith(key)), None)
        if name in harmless:
            print(f"note: --{name} ignored ({harmless[name]})")
        elif engine:
            problems.append(f"--{name}: {engine}")
        else:
            close = difflib.get_close_matches(name, options, 1)
            problems.append(f"--{name}: not an option minivl supports"
                            + (f" (did you mean --{close[0]}?)" if close else ""))
    if stray:
        problems.append(f"unexpected arguments {stray}")
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args


def check_trackers(report_to):
    """An error now, before anything loads, for a --report_to tracker whose package is not installed."""
    for name in report_to:
        if name != "none" and importlib.util.find_spec(name) is None:
            raise SystemExit(f"--report_to {name} needs the {name} package: pip install {name} (or leave it "
                             "out of --report_to)")


def apply_defaults(args, argv, defaults):
    """Each of `defaults` ({option: value}) not given on the command line `argv` set in args: a trainer's
    embedded demo, where the options a user adds still win."""
    given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
    given |= {"train_type"} if {"sft_type", "tuner_type"} & given else set()
    for key, value in defaults.items():
        if key not in given:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------- LLaMA-Factory's YAML

STAGES = {"sft": "train_sft.py", "dpo": "train_dpo.py"}
OTHER_STAGES = {"pt": "pre-training on raw text", "rm": "reward-model training", "ppo": "PPO with a reward model",
                "kto": "KTO"}
# LLaMA-Factory keys that set one ms-swift option, value unchanged
LF_OPTIONS = {
    "model_name_or_path": "model", "template": "template", "dataset_dir": "dataset_dir",
    "max_samples": "max_samples", "val_size": "split_dataset_ratio", "default_system": "system",
    "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "loraplus_lr_ratio": "lorap_lr_ratio", "use_rslora": "use_rslora",
    "freeze_vision_tower": "freeze_vit", "freeze_multi_modal_projector": "freeze_aligner",
    "freeze_language_model": "freeze_llm", "image_max_pixels": "max_pixels", "image_min_pixels": "min_pixels",
    "video_max_pixels": "video_max_pixels", "video_min_pixels": "video_min_pixels", "video_fps": "video_fps",
    "video_maxlen": "video_maxlen", "per_device_train_batch_size": "per_device_train_batch_size",
    "per_device_eval_batch_size": "per_device_eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "learning_rate": "learning_rate",
    "num_train_epochs": "num_train_epochs", "max_steps": "max_steps", "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_ratio", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon", "seed": "seed", "gradient_checkpointing": "gradient_checkpointing",
    "dataloader_num_workers": "dataloader_num_workers", "output_dir": "output_dir",
    "overwrite_output_dir": "overwrite_output_dir", "logging_steps": "logging_steps", "logging_dir": "logging_dir",
    "save_strategy": "save_strategy", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "save_only_model": "save_only_model", "eval_strategy": "eval_strategy",
    "evaluation_strategy": "eval_strategy", "eval_steps": "eval_steps", "plot_loss": "plot_loss",
    "resume_from_checkpoint": "resume_from_checkpoint", "report_to": "report_to", "deepspeed": "deepspeed",
    "fsdp": "fsdp", "ddp_timeout": "ddp_timeout",
}
# LLaMA-Factory's defaults (and those of transformers' TrainingArguments) where minivl's, which are ms-swift's,
# differ: a YAML that leaves a key out trains as LLaMA-Factory would
LF_DEFAULTS = {
    "stage": "sft", "finetuning_type": "lora", "lora_dropout": 0.0, "lora_target": "all", "dataset_dir": "data",
    "cutoff_len": 2048, "image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32, "video_max_pixels": 256 * 256,
    "video_min_pixels": 16 * 16, "video_fps": 2.0, "video_maxlen": 128, "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8, "learning_rate": 5e-5, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
    "weight_decay": 0.0, "adam_beta2": 0.999, "logging_steps": 500, "eval_strategy": "no",
}
# DPO keys (stage: dpo) and their defaults
LF_DPO = {"pref_beta": 0.1, "pref_loss": "sigmoid", "pref_ftx": 0.0, "simpo_gamma": 0.5,
          "dpo_label_smoothing": 0.0, "pref_bco_weight": 0.0, "ld_alpha": None}
# keys every LLaMA-Factory example carries, without effect here, with the reason
LF_HARMLESS = {
    "do_train": "minivl's trainers train", "do_eval": "minivl evaluates on val_size / eval_dataset rows",
    "trust_remote_code": "minivl runs its own model code", "overwrite_cache": "minivl keeps no data cache",
    "preprocessing_num_workers": "samples are encoded by the DataLoader (dataloader_num_workers)",
    "use_fast_tokenizer": "tokenizer.json "
    "is read with the tokenizers library", "low_cpu_mem_usage": "weights load straight into the model",
    "logging_first_step": "minivl logs every logging_steps steps", "run_name": "trackers name the run after "
    "output_dir", "save_safetensors": "minivl always writes safetensors", "remove_unused_columns": "minivl "
    "keeps the columns it reads", "ddp_find_unused_parameters": "DDP runs without unused parameters here",
    "dataloader_pin_memory": "batches are copied to the GPU without pinning", "print_param_status": "the "
    "trainable parameter count is printed", "include_num_input_tokens_seen": "num_tokens is always logged",
    "compute_accuracy": "mean_token_accuracy is always logged", "use_reentrant_gc": "gradient checkpointing is "
    "non-reentrant here", "tf32": "matmuls run in bf16 (or float32 on the CPU)",
}
# keys of engines minivl does not use: accepted at the values that leave them off, else what minivl does instead
LF_ENGINES = {
    "flash_attn": (("auto", "sdpa", "disabled"), ENGINES["attn_impl"]),
    "enable_liger_kernel": ((False,), ENGINES["use_liger_kernel"]),
    "use_unsloth": ((False,), "minivl has no Unsloth: its own kernels and gradient checkpointing"),
    "use_unsloth_gc": ((False,), "minivl has no Unsloth: its own kernels and gradient checkpointing"),
    "quantization_bit": ((), ENGINES["quant_bits"]), "packing": ((False,), ENGINES["packing"]),
    "neat_packing": ((False,), ENGINES["packing"]),
    "infer_backend": (("huggingface", "hf"), ENGINES["infer_backend"]),
    "use_kt": ((False,), "minivl has no KTransformers: FSDP2 or DDP through torchrun"),
    "use_mca": ((False,), ENGINES["megatron"]), "use_megatron_bridge": ((False,), ENGINES["megatron"]),
}
# keys whose other values minivl does not implement: accepted at the value given here
LF_FIXED = {"optim": ("adamw_torch", "adamw_torch_fused", "adamw_hf"), "train_on_prompt": (False,),
            "mask_history": (False,), "streaming": (False,), "mix_strategy": ("concat",),
            "predict_with_generate": (False,), "do_predict": (False,), "use_dora": (False,),
            "pissa_init": (False,), "use_galore": (False,), "use_apollo": (False,), "use_badam": (False,),
            "use_llama_pro": (False,), "resize_vocab": (False,), "upcast_layernorm": (False,)}


def from_llamafactory(path, stage, overrides=()):
    """A LLaMA-Factory YAML (`llamafactory-cli train config.yaml`; `key=value` after it overrides a key, as
    LLaMA-Factory reads them) -> the ms-swift options that train the same way here. A key minivl does not
    implement is an error naming it; LLaMA-Factory's defaults fill the keys left out (LF_DEFAULTS).

    The translation: finetuning_type lora / full -> --train_type (freeze, which trains the last layers only,
    and oft are refused); lora_target all -> all-linear, a comma list -> --target_modules; lora_alpha defaults
    to 2 x lora_rank; dataset / eval_dataset (comma lists of dataset_info.json names in dataset_dir) ->
    --dataset / --val_dataset with --dataset_dir; cutoff_len -> --max_length with --truncation_strategy right
    (LLaMA-Factory cuts a long sample rather than dropping it; a cut through image tokens drops it here);
    val_size -> --split_dataset_ratio (a count when >= 1); bf16 / pure_bf16 -> --torch_dtype bfloat16 (the
    trained parameters keep float32 master weights either way); image_max_pixels / image_min_pixels ->
    --max_pixels / --min_pixels, the bounds of Qwen's smart_resize (LLaMA-Factory scales the image into them
    first); freeze_vision_tower / freeze_multi_modal_projector / freeze_language_model -> --freeze_vit /
    --freeze_aligner / --freeze_llm (with LoRA an unfrozen projector gets adapters, as in ms-swift);
    eval_strategy steps without eval_steps evaluates every logging_steps, as transformers does; template is
    checked against the model's family. An output_dir holding a run is refused unless overwrite_output_dir or
    resume_from_checkpoint says what to do with it (LLaMA-Factory would resume from its last checkpoint).

    stage: dpo (train_dpo.py): pref_loss sigmoid / hinge / ipo -> --rlhf_type dpo --loss_type, orpo and simpo
    -> --rlhf_type orpo / simpo; pref_beta -> --beta; dpo_label_smoothing -> --label_smoothing (sigmoid only,
    as LLaMA-Factory checks); simpo_gamma -> --simpo_gamma (LLaMA-Factory's default 0.5). pref_ftx adds
    pref_ftx x the NLL of the chosen answer: --rpo_alpha for dpo, --cpo_alpha for simpo (which otherwise gets
    --cpo_alpha 0: LLaMA-Factory's SimPO has no NLL term). LLaMA-Factory averages that NLL over each chosen
    answer's tokens, then over the pairs; trl and ms-swift over all chosen tokens of the batch: the two agree
    when the chosen answers are equally long."""
    if stage not in STAGES:
        raise SystemExit(f"{path}: LLaMA-Factory has no {stage} stage; give this trainer ms-swift's options")
    try:
        import yaml
    except ImportError:
        raise SystemExit(f"{path}: reading a LLaMA-Factory YAML needs PyYAML: pip install pyyaml (or give the "
                         "options on the command line, as ms-swift spells them)") from None
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: a LLaMA-Factory config is a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise SystemExit(f"{item!r} after {path}: overrides are written key=value (LLaMA-Factory's way); "
                             "ms-swift options go without a YAML file")
        config[key] = yaml.safe_load(value)
    config = {k: v for k, v in config.items() if v is not None}  # null: LLaMA-Factory's default
    given = set(config)
    alpha = 2 * int(config.get("lora_rank", 8))  # LLaMA-Factory's default lora_alpha
    config = {**LF_DEFAULTS, **(LF_DPO if stage == "dpo" else {}), "lora_alpha": alpha, **config}

    problems, argv = [], []

    def put(option, value):
        values = value if isinstance(value, (list, tuple)) else [value]
        argv.extend([f"--{option}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)])

    if config["stage"] != stage:
        other = config["stage"]
        problems.append(
            f"stage: {other} is run by {STAGES[other]}, not {STAGES[stage]}" if other in STAGES else
            f"stage: {other} ({OTHER_STAGES[other]}) is not implemented in minivl: its trainers run stage: sft "
            "(train_sft.py) and stage: dpo (train_dpo.py), and GRPO (train_grpo.py, ms-swift's options)"
            if other in OTHER_STAGES else f"stage: {other} is not a LLaMA-Factory stage")
    kind = config["finetuning_type"]
    if kind in ("lora", "full"):
        put("train_type", kind)
    else:
        problems.append(f"finetuning_type: {kind} is not implemented in minivl: use lora or full "
                        "(freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model choose the "
                        "parts that train)" if kind == "freeze" else f"finetuning_type: {kind}: use lora or full")
    targets = config["lora_target"]
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    put("target_modules", ["all-linear"] if targets == ["all"] else targets)
    for key, option in (("dataset", "dataset"), ("eval_dataset", "val_dataset")):
        if key in config:
            names = config[key]
            put(option, [n.strip() for n in names.split(",")] if isinstance(names, str) else names)
    put("max_length", config["cutoff_len"])
    put("truncation_strategy", "right")
    if config.get("additional_target"):
        put("modules_to_save", [t.strip() for t in str(config["additional_target"]).split(",")])
    if config.get("bf16") or config.get("pure_bf16"):
        put("torch_dtype", "bfloat16")
    if config.get("fp16"):
        problems.append("fp16: minivl trains in bf16 (bf16: true) or float32; float16 training needs loss "
                        "scaling, which it does not do")
    if config.get("disable_gradient_checkpointing"):
        put("gradient_checkpointing", False)
    if config.get("do_train") is False:
        problems.append("do_train: false: evaluation or prediction alone is not what minivl's trainers do")
    if config["eval_strategy"] == "steps" and "eval_steps" not in config:
        put("eval_steps", config["logging_steps"])
    if stage == "dpo":
        argv += dpo_options(config, problems)
    special = {"stage", "finetuning_type", "lora_target", "dataset", "eval_dataset", "cutoff_len",
               "additional_target", "bf16", "pure_bf16", "fp16", "disable_gradient_checkpointing"}
    known = set(LF_OPTIONS) | special | set(LF_DPO) | set(LF_HARMLESS) | set(LF_ENGINES) | set(LF_FIXED)
    for key, value in config.items():
        if key in LF_OPTIONS:
            put(LF_OPTIONS[key], value)
        elif key in LF_DPO:
            if stage != "dpo" and key in given:
                problems.append(f"{key}: a DPO key (stage: dpo, train_dpo.py); this is stage: {stage}")
        elif key in LF_HARMLESS:
            note(f"note: {key} ignored ({LF_HARMLESS[key]})")
        elif key in LF_ENGINES:
            inert, why = LF_ENGINES[key]
            if value not in inert and value is not False:
                problems.append(f"{key}: {why}")
        elif key in LF_FIXED:
            if value not in LF_FIXED[key]:
                problems.append(f"{key}: {value!r} is not implemented in minivl (it takes {LF_FIXED[key][0]!r})")
        elif key not in special:
            close = difflib.get_close_matches(key, sorted(known), 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{key}: not a key minivl supports{hint}")
    if problems:
        raise SystemExit(f"{path}:\n  " + "\n  ".join(problems))
    note(f"{path} (LLaMA-Factory) runs as: python {STAGES[stage]} {shlex.join(argv)}")
    return argv


def dpo_options(config, problems):
    """The ms-swift options of LLaMA-Factory's DPO keys (see from_llamafactory)."""
    loss, beta, ftx = config["pref_loss"], config["pref_beta"], config["pref_ftx"]
    if config["dpo_label_smoothing"] and loss != "sigmoid":
        problems.append(f"dpo_label_smoothing: only for pref_loss sigmoid (this is {loss}), as in LLaMA-Factory")
    if config["pref_bco_weight"] or config["ld_alpha"] is not None:
        problems.append("pref_bco_weight / ld_alpha: BCO and LD-DPO are not implemented in minivl")
    if loss in ("sigmoid", "hinge", "ipo"):
        argv = ["--rlhf_type", "dpo", "--loss_type", loss, "--beta", str(beta)]
        argv += ["--label_smoothing", str(config["dpo_label_smoothing"])] if config["dpo_label_smoothing"] else []
        return argv + (["--rpo_alpha", str(ftx)] if ftx else [])
    if loss == "simpo":
        return ["--rlhf_type", "simpo", "--beta", str(beta), "--simpo_gamma", str(config["simpo_gamma"]),
                "--cpo_alpha", str(ftx)]
    if loss == "orpo":
        if ftx:
            problems.append("pref_ftx with pref_loss orpo: ORPO's loss already holds the chosen answer's NLL; "
                            "minivl adds no second one")
        return ["--rlhf_type", "orpo", "--beta", str(beta)]
    problems.append(f"pref_loss: {loss} is not implemented in minivl (sigmoid, hinge, ipo, orpo, simpo are)")
    return []


def note(text):
    """A line printed by the first process only (options are parsed in every process under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


# ---------------------------------------------------------------------------------- processes, FSDP2, DDP

@dataclass
class Process:
    """This process: its rank among `world` processes (one per GPU under torchrun), its device, the dtype the
    matmuls run in, and how the model is spread over the processes: `fsdp` holds FSDP2's settings
    {"reshard_after_forward", "offload"} when it is sharded, None when each process holds all of it (DDP)."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    fsdp: dict | None = None

    @property
    def main(self):
        return self.rank == 0

    def print(self, *text, **kwargs):
        if self.main:
            print(*text, **kwargs, flush=True)

    def autocast(self):
        """bf16 autocast on the GPU (the float32 master weights are cast per matmul); nothing on the CPU."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def all_sum(self, *values):
        """The values summed over all processes (float64), as a list."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, t):
        """t (n, ...) of every process (each the same shape), concatenated in rank order, on the CPU."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, t.to(self.device))
        return torch.cat(parts).cpu()


def init_process(args):
    """One process per GPU under torchrun (the NCCL process group; gloo on the CPU), else one process on GPU 0
    or the CPU. Seeds torch and random with --seed; --torch_dtype (default bf16 on a GPU, float32 on the CPU);
    the engine (engine()), said in one line. A collective waits --ddp_timeout seconds for the other processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.torch_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if dtype == torch.float16:
        raise SystemExit("--torch_dtype float16 is not supported for training (no loss scaling): use bfloat16")
    fsdp, line = engine(args.train_type, args.deepspeed, args.fsdp, world)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.ddp_timeout))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    proc = Process(device, dtype, rank, local_rank, world, fsdp)
    if line:
        proc.print(line)
    return proc


def engine(train_type, deepspeed=None, fsdp=None, world=1):
    """(FSDP2's settings or None, the line that says what runs). The rule: over several processes, full
    fine-tuning shards the model with FSDP2 (zero3: parameters, gradients and optimizer state, each decoder
    layer and vision block gathered for its forward and backward); LoRA replicates the frozen model with DDP
    (zero0). ms-swift's --deepspeed (a name or a DeepSpeed config file) and transformers' --fsdp choose
    otherwise, as the FSDP2 setting that matches: zero1 / zero2 / shard_grad_op keep each gathered layer until
    its backward (reshard_after_forward=False; FSDP2 always shards gradients too); _offload / offload keep the
    shards and the optimizer step on the CPU (CPUOffloadPolicy)."""
    stage, offload, asked = (3 if train_type == "full" else 0), False, None
    if deepspeed:
        asked = f"--deepspeed {deepspeed}"
        stage, offload = deepspeed_stage(deepspeed)
    if fsdp and any(fsdp):
        if deepspeed:
            raise SystemExit(f"--deepspeed {deepspeed} and --fsdp {' '.join(fsdp)}: give one of them")
        words = " ".join(fsdp).replace(",", " ").split()
        unknown = sorted(set(words) - set(FSDP_WORDS))
        if unknown:
            raise SystemExit(f"--fsdp {' '.join(fsdp)}: {', '.join(unknown)} is not one of "
                             f"{', '.join(FSDP_WORDS)}")
        asked = f"--fsdp {' '.join(fsdp)}"
        stage = min([FSDP_WORDS[w] for w in words if FSDP_WORDS[w] is not None] or [3])
        offload = "offload" in words
    if world == 1:
        return None, (f"{asked}: one process, nothing to shard" if asked else None)
    settings = {"reshard_after_forward": stage == 3, "offload": offload} if stage else None
    what = (f"FSDP2 over {world} processes: parameters, gradients and optimizer state sharded"
            + ("; each layer gathered for its forward and again for its backward" if stage == 3 else
               "; each layer kept gathered from its forward to its backward (reshard_after_forward=False)")
            + ("; shards and the optimizer step on the CPU (CPUOffloadPolicy)" if offload else "")
            if settings else f"DDP over {world} processes: each holds the whole model, gradients averaged")
    return settings, f"{asked or '--train_type ' + train_type}: {what}"


# transformers' --fsdp words and the ZeRO stage each matches (None: no say on the stage)
FSDP_WORDS = {"full_shard": 3, "hybrid_shard": 3, "shard_grad_op": 2, "hybrid_shard_zero2": 2, "no_shard": 0,
              "offload": None, "auto_wrap": None}


def deepspeed_stage(value):
    """(ZeRO stage, offload) of ms-swift's --deepspeed: a DeepSpeed config file (its zero_optimization stage and
    offload_* devices), or a name such as zero3_offload, default-zero2 or ds_z3_config.json."""
    if Path(value).is_file():
        try:
            zero = json.loads(Path(value).read_text()).get("zero_optimization", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise SystemExit(f"--deepspeed {value}: not a DeepSpeed JSON config ({e})") from None
        offload = any((zero.get(k) or {}).get("device") in ("cpu", "nvme")
                      for k in ("offload_param", "offload_optimizer"))
        return int(zero.get("stage", 0)), offload
    found = re.search(r"z(?:ero)?[-_]?([0-3])", Path(value).name)
    if not found:
        raise SystemExit(f"--deepspeed {value}: no such file, and not a name minivl reads (zero0, zero1, zero2, "
                         "zero2_offload, zero3, zero3_offload, or a DeepSpeed config .json)")
    return int(found.group(1)), "offload" in value


def shard(model, proc):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over all processes: one unit per vision block and per decoder
    layer, then the whole model for the rest (embeddings, norms, mergers, lm_head). Each unit's weights are
    gathered for its forward (and again for its backward with reshard_after_forward) and its gradients
    reduce-scattered, so each process keeps 1/world of the weights, gradients and optimizer state. On the GPU
    they are gathered in bf16 and the gradients reduced in float32 (MixedPrecisionPolicy); on the CPU all is
    float32. The whole model's unit is the root: it is not resharded after a forward, so after
    model.hidden_states (made an FSDP forward here) model.lm_head.weight is the whole weight, for the fused
    log-prob kernel. Every process then runs the vision tower in every forward (vision_in_every_forward).
    The parameters become DTensors: the optimizer takes them from the model afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    low = proc.dtype if proc.dtype != torch.float32 else None
    settings = dict(mesh=init_device_mesh(proc.device.type, (proc.world,)),
                    mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None),
                    offload_policy=CPUOffloadPolicy(pin_memory=proc.device.type == "cuda") if proc.fsdp["offload"]
                    else OffloadPolicy())
    for unit in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(unit, reshard_after_forward=proc.fsdp["reshard_after_forward"], **settings)
    fully_shard(model, **settings)  # the root: FSDP2 keeps it gathered from its forward to its backward
    register_fsdp_forward_method(model, "hidden_states")  # the trainers' forward: gathers the root's weights
    model.vision_in_every_forward = True
    return model


@contextlib.contextmanager
def whole_model(model, proc):
    """Inside: the model whole on every process, for work that runs other forwards in each process, or in one
    only: the sampler, whose decode loop stops when its rows are done and reads weights outside the forward
    (kernels/decode). A sharded model yields a plain copy in the compute dtype (LoRA folded into the weights),
    built from its gathered shards and freed at the end: FSDP2's own forward would gather weights from all
    processes at every step. A model that is not sharded is itself. Every process enters it."""
    if not proc.fsdp:
        yield model
        return
    # each gather a collective, in the same order everywhere
    state = {name: whole_tensor(t).detach().to(proc.dtype) for name, t in model.state_dict().items()}
    for name, layer in lora.lora_layers(model):  # W + scale B A, as lora.merge computes it
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        state[f"{name}.weight"] = lora.fold(state[f"{name}.weight"], a, b, layer.scale)
    with torch.device("meta"):
        whole = VLModel(model.cfg, init=False)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    whole.eos_token_ids = model.eos_token_ids
    try:
        yield whole.eval().requires_grad_(False)
    finally:
        del whole, state


def wrap_ddp(module, proc):
    """What the optimizer step's gradients flow through: DDP over the processes when each holds the whole model
    (gradients averaged in the backward of the last micro-batch of a step; the vision tower then runs in every
    forward if it trains, so each trained parameter gets a gradient everywhere), else the module itself (one
    process, or a model that make_trainable sharded with FSDP2)."""
    if proc.world == 1 or proc.fsdp:
        return module
    for m in module.modules():
        if isinstance(m, VLModel):
            m.vision_in_every_forward = any(p.requires_grad for p in m.model.visual.parameters())
    return nn.parallel.DistributedDataParallel(module, device_ids=[proc.local_rank]
                                               if proc.device.type == "cuda" else None)


def grad_sync(module, sync):
    """Around a micro-batch's forward and backward: DDP's no_sync unless `sync` (the step's last micro-batch),
    so gradients are all-reduced once per optimizer step. FSDP2 reduce-scatters after every micro-batch: a
    whole gradient kept across micro-batches would cost every process the whole model's gradients."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def finish(proc):
    if proc.world > 1:
        dist.destroy_process_group()


def relaunch_under_torchrun(script, argv):
    """ms-swift's launcher: `NPROC_PER_NODE=4 python train_sft.py ...` runs the script again through
    `python -m torch.distributed.run --nproc_per_node 4 ...` (NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT
    are passed on too), waits, and exits with its status. Already under torchrun (WORLD_SIZE set), or one
    process in all: nothing happens."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    settings = {key: os.environ[key] for key in ("NPROC_PER_NODE", "MASTER_PORT", "NNODES", "NODE_RANK",
                                                 "MASTER_ADDR") if os.environ.get(key)}
    for key in ("NPROC_PER_NODE", "NNODES"):
        if not settings.get(key, "1").isdigit():
            raise SystemExit(f"{key}={settings[key]!r} in the environment: expected a number of processes")
    if int(settings.get("NPROC_PER_NODE", 1)) * int(settings.get("NNODES", 1)) <= 1:
        return
    command = [sys.executable, "-m", "torch.distributed.run"]
    for key, value in settings.items():
        command += [f"--{key.lower()}", value]
    command += [str(script), *argv]
    print(f"run: {shlex.join(command)}", flush=True)
    raise SystemExit(subprocess.run(command).returncode)


def launch(main, script):
    """A trainer's `if __name__ == "__main__"`: under torchrun when NPROC_PER_NODE asks for it, then main().
    Under torchrun, a process that fails prints `rank R: <the error>` and exits at once with a non-zero status:
    torchrun then stops the other processes of its node, and those of other nodes fail in their next collective
    (at the latest after --ddp_timeout). Checkpoints are renamed into place only once whole, so the last good
    one stays."""
    relaunch_under_torchrun(script, sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return main()
    from torch.distributed.elastic.multiprocessing.errors import record

    status, rank = 0, os.environ.get("RANK", "0")
    try:
        record(main)()  # the traceback also goes to torchrun's error file: its summary names the root cause
    except SystemExit as e:  # a clear error (or argparse's, already printed with its status)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
        if e.code is not None and not isinstance(e.code, int):
            print(f"rank {rank}: {e.code}", file=sys.stderr)
    except BaseException as e:
        status = 1
        traceback.print_exc()
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
    # DDP's reducer keeps the process group, and its gloo/NCCL threads, alive after destroy_process_group
    # (torch 2.13: the threads are still there after `del` and gc). A thread that touches Python while the
    # interpreter shuts down aborts the process now and then ("terminate called without an active
    # exception", about 1 run in 100 here); a failed process may be stuck in a collective's thread.
    # Everything is written and closed by now: skip the shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def on_rank0(fn, *args):
    """fn(*args) run on rank 0 only, its result (or its SystemExit) the same on every rank."""
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            result = e
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, SystemExit):
        raise result
    return result


# ------------------------------------------------------------------------------------------------- model

# the chat template names (ms-swift's and LLaMA-Factory's) of each family
TEMPLATES = {"qwen2_vl": ("qwen2_vl",), "qwen2_5_vl": ("qwen2_5_vl", "qwen2_vl"),
             "qwen3_vl": ("qwen3_vl", "qwen3_vl_nothink"), "qwen3_vl_moe": ("qwen3_vl", "qwen3_vl_nothink")}


def load_model(args, proc, resume=None):
    """(model, processor) of --model on this process's device in its dtype; a full fine-tune resumes from the
    checkpoint's own weights (float32 masters, saved as they were). The processor takes the pixel options, and
    --template is checked against the model's family before any weight loads."""
    processor = Processor.from_pretrained(
        args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        video_settings=dict(fps=args.video_fps, max_frames=args.video_maxlen, min_pixels=args.video_min_pixels,
                            max_pixels=args.video_max_pixels))
    names = TEMPLATES.get(processor.model_type, ())
    if args.template is not None and args.template not in names:
        raise SystemExit(f"template {args.template} does not fit {args.model}, a {processor.model_type} model: "
                         f"its template is {' or '.join(names)} (minivl formats conversations with the "
                         "checkpoint's own chat template and only checks the name)")
    full_resume = resume is not None and args.train_type == "full"
    # a model to shard loads on the CPU: each GPU then receives only its shard (shard())
    model = checkpoint.load(resume if full_resume else args.model, dtype=None if full_resume else proc.dtype,
                            device=torch.device("cpu") if proc.fsdp else proc.device)
    return model, processor


def load_reference(path, proc):
    """The frozen reference of a full fine-tune (DPO, GRPO): the model at `path` in the compute dtype, in eval
    mode, spread over the processes as the trained model is: sharded by FSDP2 when it is (each process holds
    1/world of it, and every process runs its forwards), else whole in each."""
    frozen = checkpoint.load(path, dtype=proc.dtype, device=torch.device("cpu") if proc.fsdp else proc.device)
    frozen.requires_grad_(False).eval()
    return shard(frozen, proc) if proc.fsdp else frozen


def reference_call(module, frozen, proc):
    """module (a log-prob wrapper of the reference `frozen`) as a function that, under FSDP2, reshards the root
    after each call: FSDP2 reshards a root after its backward, and a reference has none, so its embeddings and
    lm_head (about 2.5 GB at 8B) would stay whole on every process from the first call on."""
    if not proc.fsdp:
        return module

    def call(*args, **kwargs):
        out = module(*args, **kwargs)
        frozen.reshard()
        return out
    return call


def make_trainable(model, args, proc):
    """What trains, ms-swift's way: --train_type full unfreezes the parts not frozen (--freeze_llm/vit/aligner);
    lora puts adapters on their linear layers (--target_modules / --target_regex); lora_llm puts them on the
    LLM and trains the unfrozen vision parts in full (PEFT's modules_to_save). Trained parameters become
    float32 master weights; gradient checkpointing is set per tower (a frozen vision tower runs under no_grad
    and needs none); under FSDP2 the model is then sharded (shard()). Returns ([(name, parameter)] that train,
    the module names trained in full next to LoRA)."""
    unfrozen = [part for part, frozen in (("llm", args.freeze_llm), ("vit", args.freeze_vit),
                                          ("aligner", args.freeze_aligner)) if not frozen]
    for p in model.parameters():
        p.requires_grad_(False)
    modules_to_save = list(args.modules_to_save)
    if args.train_type == "full":
        for name, p in model.named_parameters():
            part = lora.part_of(name)
            if (part if part != "lm_head" else "llm") in unfrozen:
                p.requires_grad_(True)
    else:
        lora_parts = ["llm"] if args.train_type == "lora_llm" else unfrozen
        if args.train_type == "lora_llm":
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
        p.data = p.data.float()  # float32 master weights; the matmuls run in proc.dtype (autocast on the GPU)
    trains_vision = any(n.startswith("model.visual.") for n, _ in trainable)
    model.model.language_model.gradient_checkpointing = args.gradient_checkpointing
    vit_ckpt = args.vit_gradient_checkpointing
    model.model.visual.gradient_checkpointing = trains_vision and (args.gradient_checkpointing if vit_ckpt is None
                                                                    else vit_ckpt)
    model.train()
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    if proc.fsdp:  # --- distributed: the parameters become this process's shards (DTensors)
        shard(model, proc)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    proc.print(f"model {args.model} ({model.cfg.model_type}), {args.train_type}, trainable {n_train / 1e6:.3f} M "
               f"of {n_all / 1e6:.3f} M parameters ({100 * n_train / n_all:.2f}%), {proc.dtype}, {proc.device}, "
               f"world {proc.world}")
    return trainable, modules_to_save


# -------------------------------------------------------------------------------------------------- data

def load_data(args, load):
    """(train rows, eval rows) of --dataset / --val_dataset through `load(specs, system, **source)`
    (data.load_rows, data_rl.load_preference_rows, data_rl.load_prompt_rows...); with no --val_dataset,
    --split_dataset_ratio holds rows out. --val_dataset #N takes the first N rows (ms-swift does not shuffle
    it)."""
    source = dict(dataset_dir=args.dataset_dir, max_samples=args.max_samples)
    rows = load(args.dataset, args.system, **source)
    val_rows = load(args.val_dataset, args.system, shuffle=False, **source) if args.val_dataset else []
    if args.split_dataset_ratio and not val_rows:
        rows, val_rows = split_rows(rows, args.split_dataset_ratio, args.seed)
    return rows, val_rows


def epoch_batches(n_rows, batch_size, proc, seed, epoch):
    """This process's micro-batches (lists of row indices) of an epoch: a seeded permutation cut into
    micro-batches of batch_size x world, each process taking its batch_size. Over several processes the
    incomplete last one is dropped, so every process runs the same number of forward and backward passes."""
    per_micro = batch_size * proc.world  # rows in one micro-batch over all processes
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    usable = len(order) if proc.world == 1 else len(order) // per_micro * per_micro
    micro = [order[i:i + per_micro] for i in range(0, usable, per_micro)]
    return [m[proc.rank * batch_size:(proc.rank + 1) * batch_size] for m in micro]


def count_steps(n_rows, batch_size, accumulation, proc, args):
    """(micro-batches per epoch, optimizer steps per epoch, steps of the run: --max_steps, else
    --num_train_epochs epochs)."""
    micro_per_epoch = len(epoch_batches(n_rows, batch_size, proc, args.seed, 0))
    if micro_per_epoch == 0:
        raise SystemExit(f"{n_rows} training rows make no micro-batch of {batch_size * proc.world} ({batch_size} "
                         f"x {proc.world} processes)")
    steps_per_epoch = math.ceil(micro_per_epoch / accumulation)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return micro_per_epoch, steps_per_epoch, total


def step_batches(dataset, collate, batch_size, accumulation, proc, state, args):
    """Yields, step after step, this process's micro-batches of the next optimizer step as [(batch, weight)]:
    at most `accumulation` of them, never across an epoch's end. state["epoch"] / state["micro_batch"] give the
    exact data position after what was yielded, and state["epoch_samples"] the same position in rows of the
    epoch over all processes, from which a run with another number of processes (or per-device batch)
    resumes; state["num_dropped"] counts the samples a collate left out (its batch's "num_dropped", removed).
    `state` is the run's state or a dict of those keys inside it (a second data stream). A batch is whatever
    collate makes of a list of dataset items: a dict of tensors (SFT, DPO), or a list of prompts that the
    trainer turns into rollouts (GRPO, with accumulation 1: one micro-batch of prompts per step). A micro-batch
    with nothing left is skipped in one process; over several processes it is replaced by the last micro-batch
    this process ran, with weight 0, so every process runs the same forward and backward passes. Each epoch
    has its own DataLoader with its own seeded generator: creating one draws nothing from the global RNG, so a
    resumed run stays in step."""
    micro_per_epoch = len(epoch_batches(len(dataset), batch_size, proc, args.seed, 0))
    per_micro = batch_size * proc.world  # rows of one micro-batch over all processes
    done = state.setdefault("epoch_samples", state["micro_batch"] * per_micro)
    if done % per_micro:
        raise SystemExit(f"the checkpoint stopped after {done} rows of epoch {state['epoch']}, which micro-"
                         f"batches of {per_micro} rows ({batch_size} per device x {proc.world} processes) do "
                         "not reach: resume with a per-device batch and number of processes whose product "
                         "divides it")
    state["micro_batch"] = done // per_micro

    def loader(epoch, start):
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=epoch_batches(len(dataset), batch_size, proc, args.seed, epoch)[start:],
            collate_fn=collate, num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed + epoch)))

    batches, fallback = loader(state["epoch"], state["micro_batch"]), None
    while True:
        micro = []
        while len(micro) < accumulation:
            batch = next(batches, None)
            if batch is None:
                if micro:
                    break
                state["epoch"], state["micro_batch"], state["epoch_samples"] = state["epoch"] + 1, 0, 0
                batches = loader(state["epoch"], 0)
                continue
            state["micro_batch"] += 1
            state["epoch_samples"] += per_micro
            if isinstance(batch, dict):
                state["num_dropped"] += batch.pop("num_dropped", 0)
            micro.append(batch)
        if state["micro_batch"] >= micro_per_epoch:
            state["epoch"], state["micro_batch"], state["epoch_samples"] = state["epoch"] + 1, 0, 0
            batches = loader(state["epoch"], 0)
        weighted = []
        for batch in micro:
            weight = 1.0
            if not batch:
                if proc.world == 1:
                    continue
                if fallback is None:
                    raise RuntimeError("a micro-batch was dropped whole before any batch was seen in this process")
                batch, weight = fallback, 0.0
            fallback = batch
            weighted.append((batch, weight))
        yield weighted


def eval_batches(dataset, collate, batch_size, proc, stand_ins=False):
    """This process's share of the eval rows (every world-th), collated batch_size at a time, on its device;
    batches with nothing left (all samples dropped) are skipped. stand_ins=True yields (batch, weight) pairs,
    the same number in every process: a batch with nothing left, and each batch a process has fewer than the
    others, is a stand-in of weight 0 (its last batch, or one of the first rows), as FSDP2 needs: there every
    forward gathers weights from all processes."""
    mine = list(range(len(dataset)))[proc.rank::proc.world]
    rounds = math.ceil(math.ceil(len(dataset) / proc.world) / batch_size)  # the most any process has
    last = None
    for i in range(0, rounds * batch_size if stand_ins else len(mine), batch_size):
        rows = mine[i:i + batch_size]
        batch = collate([dataset[j] for j in rows]) if rows else {}
        if isinstance(batch, dict):
            batch.pop("num_dropped", None)
        if batch:
            last = batch = to_device(batch, proc.device)
            yield (batch, 1.0) if stand_ins else batch
        elif stand_ins:
            if last is None:  # nothing of its own yet: the first batch of the data set, uncounted
                last = next(eval_batches(dataset, collate, batch_size, Process(proc.device, proc.dtype)))
            yield last, 0.0


def to_device(batch, device):
    """A batch's tensors (a dict's values) on the device; anything else as it is."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------- optimizer and schedule

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


def make_optimizer(trainable, args, total_steps, proc):
    """AdamW over param_groups (fused on the GPU) at --learning_rate (default 1e-4 with LoRA, 1e-5 full) and
    the schedule of --lr_scheduler_type with --warmup_steps, else --warmup_ratio of the run's steps."""
    lr = args.learning_rate or (1e-5 if args.train_type == "full" else 1e-4)
    optimizer = torch.optim.AdamW(param_groups(trainable, lr, args), lr=lr,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                  fused=all(p.is_cuda for _, p in trainable))  # CPU offload: on the CPU
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, args.lr_scheduler_type))
    return optimizer, scheduler


def optimizer_step(optimizer, scheduler, params, max_grad_norm):
    """Clip the gradients of `params` to max_grad_norm, step the optimizer and the schedule, clear the
    gradients. Returns (the norm before clipping, the learning rate this step used: --learning_rate x the
    schedule's factor)."""
    lr = optimizer.defaults["lr"] * scheduler.lr_lambdas[0](scheduler.last_epoch)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def reduce_means(sums, proc):
    """{name: (sum, count)} of this process -> {name: the sums over all processes / the counts over all
    processes} (None where the count is 0), in one all-reduce. What a count counts is the trainer's: tokens
    for SFT's loss, pairs for DPO's, completions or tokens for GRPO's."""
    names = list(sums)
    totals = proc.all_sum(*[x for name in names for x in sums[name]])
    return {name: totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] else None for i, name in enumerate(names)}


# ------------------------------------------------------------------ output directory, checkpoints, resume

# what a run writes into its output directory; --overwrite_output_dir removes these and nothing else
RUN_OUTPUTS = ("checkpoint-*", ".checkpoint-*", "logging.jsonl", "args.json", "runs", "wandb", "swanlog",
               "training_*.png", "completions.jsonl")


def prepare_output(args, proc):
    """(the checkpoint to resume or None, the directory this run writes to), checked before anything loads;
    args.output_dir becomes that directory (a versioned subdirectory with --add_version)."""
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None:
        check_resume(resume, args.train_type)
    output_dir = on_rank0(prepare_output_dir, args.output_dir, args.add_version, args.overwrite_output_dir, resume)
    args.output_dir = str(output_dir)
    return resume, output_dir


def prepare_output_dir(output_dir, add_version=False, overwrite=False, resume=None):
    """The directory this run writes to. add_version: a new subdirectory `v<N>-<YYYYMMDD-HHMMSS>`, N one above
    the highest version there, as ms-swift names them. Else a directory that already holds files is refused,
    unless the run resumes (the log is kept up to the resumed step) or overwrite is set (the earlier run's
    files are removed first), so that two runs never mix."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"--output_dir {output_dir} is a file, not a directory")
    held = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if add_version:
        versions = [int(m.group(1)) for name in held if (m := re.match(r"v(\d+)", name))]
        return output_dir / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not held or resume is not None:
        return output_dir
    if not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise SystemExit(f"--output_dir {output_dir} is not empty ({shown}): pass --overwrite_output_dir true to "
                         f"replace the run there, --resume_from_checkpoint {output_dir}/checkpoint-N to continue "
                         "it, or --add_version true to write into a new versioned subdirectory (ms-swift's habit)")
    removed = [p for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern)]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    print(f"--overwrite_output_dir: removed {len(removed)} files and folders of the earlier run in {output_dir}")
    return output_dir


def check_resume(path, train_type):
    """A clear error unless `path` is a checkpoint that a run of `train_type` continues exactly."""
    path = Path(path)
    if not path.is_dir():
        near = sorted(p.name for p in path.parent.glob("checkpoint-*")) if path.parent.is_dir() else []
        raise SystemExit(f"--resume_from_checkpoint {path}: no such directory (looked for {path.absolute()})"
                         + (f"; {path.parent} holds {', '.join(near)}" if near else ""))
    is_adapter, is_model = (path / "adapter_config.json").is_file(), (path / "config.json").is_file()
    if (train_type == "full" and not is_model) or (train_type != "full" and not is_adapter):
        saved = json.loads((path / "args.json").read_text()) if (path / "args.json").is_file() else {}
        what = ("a LoRA adapter" if is_adapter else "a full model" if is_model else
                "neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
        advice = (f"resume it with --train_type {saved.get('train_type') or 'lora'}" if is_adapter else
                  f"resume it with --train_type full, or start a new LoRA run from its weights with --model {path}"
                  if is_model else "give a checkpoint-N directory written by a minivl trainer")
        raise SystemExit(f"--resume_from_checkpoint {path} holds {what} and this run is --train_type "
                         f"{train_type}: {advice}")
    if not (path / "training_state.pt").is_file() or not (path / "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from_checkpoint {path} has no training_state.pt / trainer_state.json (saved "
                         "with --save_only_model true?): it cannot continue a run exactly. Train from its weights "
                         "instead: --model it (a full model), or merge a LoRA adapter first (python -m "
                         "minivl.export)")


def start_state(resume, model, optimizer, scheduler, args, proc):
    """The run's position, saved in each checkpoint's trainer_state.json: a new one, or the resumed checkpoint's
    with its adapter weights (a full model's were loaded with it), optimizer, scheduler and RNG states. A
    trainer adds keys of its own with state.setdefault (a resumed value stays), e.g. a second data stream's
    position for step_batches: state.setdefault("expert", {"epoch": 0, "micro_batch": 0, "num_dropped": 0})."""
    state = {"global_step": 0, "epoch": 0, "micro_batch": 0, "num_tokens": 0, "num_dropped": 0,
             "best_metric": None, "best_checkpoint": None}
    if resume is None:
        return state
    if args.train_type != "full":
        lora.load_adapter_tensors(model, resume)
    # mmap: processes on one machine share the file's pages; each copies its shard only
    saved = torch.load(resume / "training_state.pt", map_location="cpu", weights_only=True, mmap=True)
    load_optimizer(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if proc.device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"][min(proc.local_rank, len(saved["rng"]["cuda"]) - 1)])
    random.setstate(saved["rng"]["python"])
    state.update(json.loads((resume / "trainer_state.json").read_text()))
    proc.print(f"resumed from {resume} at step {state['global_step']} (epoch {state['epoch']}, micro-batch "
               f"{state['micro_batch']})")
    return state


def intervals(args, steps_per_epoch):
    """(evaluate every, save every) in steps for --eval_strategy / --save_strategy; see due()."""
    eval_steps = args.eval_steps or args.save_steps
    eval_every = {"steps": eval_steps, "epoch": steps_per_epoch, "no": 0}[args.eval_strategy]
    save_every = {"steps": args.save_steps, "epoch": steps_per_epoch, "no": None}[args.save_strategy]
    return eval_every, save_every


def due(step, every, total):
    """Whether something done every `every` steps happens after `step`: at its multiples and after the last
    step of the run (every=0: after the last step only; None: never)."""
    return every is not None and (step == total or (every > 0 and step % every == 0))


def public_args(args):
    return {k: v for k, v in vars(args).items() if not k.endswith("_token")}  # no secrets in files


def save_checkpoint(model, args, state, optimizer, scheduler, proc, output_dir, modules_to_save, metric=None,
                    greater_is_better=False):
    """checkpoint-<step>: the adapter in PEFT's format (LoRA) or the whole model in the official layout (full),
    the processor files, training_state.pt (optimizer, scheduler, RNG: not with --save_only_model),
    trainer_state.json (the data position), args.json. Written by the first process under a temporary name,
    then renamed; `metric` (an eval result of this step) marks the best checkpoint, which --save_total_limit
    keeps. Every process calls it: a sharded model's weights and optimizer state are gathered whole (the same
    files as from one process), the others wait until it is written."""
    step = state["global_step"]
    best = state["best_metric"]
    if metric is not None and (best is None or (metric > best if greater_is_better else metric < best)):
        state["best_metric"], state["best_checkpoint"] = metric, f"checkpoint-{step}"
    full = args.train_type == "full"
    tensors = whole_tensors(model.state_dict() if full else
                            {n: p for n, p in model.named_parameters() if p.requires_grad}, proc)
    optimizer_state = None if args.save_only_model else whole_optimizer_state(model, optimizer)
    if proc.main:
        name = f"checkpoint-{step}"
        final, tmp = output_dir / name, output_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        if full:
            model.save_pretrained(tmp, tensors=tensors)
        else:
            config = lora.adapter_config(model, args.model, modules_to_save, args.init_weights, args.lora_dropout,
                                         args.use_rslora)
            lora.save_adapter(model, tmp, modules_to_save=modules_to_save, config=config, tensors=tensors)
        source = checkpoint.resolve(args.model)
        for f in PROCESSOR_FILES:  # the processor travels with the checkpoint (config.json only for full)
            wanted = f != "config.json" or args.train_type == "full"
            if wanted and (source / f).is_file() and not (tmp / f).exists():
                shutil.copy(source / f, tmp / f)
        if not args.save_only_model:
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                   "cuda": torch.cuda.get_rng_state_all() if proc.device.type == "cuda" else None}
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng},
                       tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / "args.json").write_text(json.dumps(public_args(args), indent=2) + "\n")
        old = None
        if final.exists():  # the same step saved before (a resumed run): keep it until the new one is in place
            old = output_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old)
        rotate_checkpoints(output_dir, args.save_total_limit, state["best_checkpoint"])
    if proc.world > 1:
        dist.barrier()  # nobody runs ahead while the first process writes
    return output_dir / f"checkpoint-{step}"


def whole_tensor(t):
    """A tensor, or an FSDP2 shard (DTensor) gathered whole from every process (a collective)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    return t.to(t.device_mesh.device_type).full_tensor()  # CPU offload: shards are gathered on the GPUs


def whole_tensors(tensors, proc):
    """{name: tensor} with each FSDP2 shard gathered whole, on the CPU, in the first process (the others get
    {}). Every process calls it: each gather is a collective, taken in the same order."""
    whole = {}
    for name, t in tensors.items():
        t = whole_tensor(t)
        if proc.main:
            whole[name] = t.detach().to("cpu")
    return whole


def whole_optimizer_state(model, optimizer):
    """The optimizer's state by parameter name, each tensor whole, on the CPU of the first process:
    torch.distributed.checkpoint's full state dict, which loads into any number of processes (load_optimizer).
    Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer(model, optimizer, saved):
    """An optimizer state saved by whole_optimizer_state (keys: parameter names) into this run's optimizer, each
    process taking its shard, whatever the number of processes that saved it. A state saved by
    optimizer.state_dict() (keys: positions; minivl before FSDP2) is renamed first: each group lists its
    parameters' names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    groups = saved["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
        if "names" not in groups[0]:  # no names to go by: only the same layout loads
            return optimizer.load_state_dict(saved)
        name = {i: n for g in groups for i, n in zip(g["params"], g["names"])}
        saved = {"state": {name[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": g["names"]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def rotate_checkpoints(output_dir, limit, best):
    """Keep `limit` checkpoints: the best one (by the eval metric) and the most recent ones."""
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


# ----------------------------------------------------------------------------------------------- logging

class RunLog:
    """What a run reports, from the first process only: args.json, log lines (above the progress bar on a
    terminal), logging.jsonl and the trackers (MetricsLog), the bar, and at the end PNG curves (--plot_loss).
    Between two log lines it keeps each step's values: window() gives their means over the steps that had
    them, their totals, and the seconds since the last window. `shown`: values the bar shows beside the loss."""

    def __init__(self, args, output_dir, proc, state, total_steps, resume=None, shown=()):
        self.proc, self.state, self.args, self.output_dir = proc, state, args, Path(output_dir)
        self.shown = shown
        self.metrics = self.bar = None
        self.steps, self.started = [], time.time()
        if not proc.main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = public_args(args)
        (self.output_dir / "args.json").write_text(json.dumps(config, indent=2) + "\n")
        self.metrics = MetricsLog(
            self.output_dir, args.report_to or ["tensorboard"], config,
            resumed_step=state["global_step"] if resume is not None else None, logging_dir=args.logging_dir,
            explicit=args.report_to is not None,
            swanlab={k: getattr(args, "swanlab_" + k)
                     for k in ("project", "workspace", "exp_name", "mode", "token")})
        if args.plot_loss and importlib.util.find_spec("matplotlib") is None:
            print("note: --plot_loss needs matplotlib (pip install matplotlib): no PNG curves this run; the "
                  "metrics are in logging.jsonl")
        self.bar = Progress(total_steps, start=state["global_step"])

    def say(self, text, progress=False):
        """A line from the first process: above the bar on a terminal; progress=True adds the bar's status in a
        log file."""
        if self.bar:
            self.bar.print(text, progress=progress)
        else:
            self.proc.print(text)

    def step(self, step, values):
        """After an optimizer step: its values {name: number or None} (all processes reduced) for the window;
        the bar shows values["loss"]."""
        self.steps.append(values)
        if self.bar:
            self.bar.update(step, values.get("loss"), {name: values.get(name) for name in self.shown})

    def window(self):
        """(means, totals, seconds) of the values since the last window; starts a new one."""
        means, totals = {}, {}
        for name in dict.fromkeys(k for values in self.steps for k in values):
            seen = [values[name] for values in self.steps if values.get(name) is not None]
            means[name] = sum(seen) / len(seen) if seen else None
            totals[name] = sum(seen)
        seconds, self.steps, self.started = time.time() - self.started, [], time.time()
        return means, totals, seconds

    def write(self, entry):
        """{metric: value} of this step to the log line, logging.jsonl and the trackers (trl's names; eval_*
        for evaluations)."""
        entry = {"step": self.state["global_step"], **entry}
        self.say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()),
                 progress="loss" in entry)  # off a terminal, training lines carry the step, speed and time left
        if self.metrics:
            self.metrics.log(entry)

    def close(self, plot=()):
        """Ends the bar and the trackers; with --plot_loss, a PNG curve of each metric named in `plot`."""
        if self.bar:
            self.bar.close()
            self.bar = None
        if self.metrics:
            self.metrics.close()
            if self.args.plot_loss and importlib.util.find_spec("matplotlib") is not None:
                for path in plot_curves(self.output_dir, plot):
                    self.proc.print(f"plotted {path}")
            self.metrics = None


def plot_curves(output_dir, names):
    """training_<name>.png for each metric of logging.jsonl named (LLaMA-Factory's plot_loss files; "/" in a
    name becomes "_"), the raw values and a smoothed line. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in (Path(output_dir) / "logging.jsonl").read_text().splitlines() if line]
    written = []
    for name in names:
        points = [(e["step"], e[name]) for e in entries if isinstance(e.get(name), (int, float))]
        if not points:
            continue
        steps, values = zip(*points)
        smooth, last = [], values[0]
        for v in values:  # an exponential moving average, as TensorBoard smooths
            last = 0.9 * last + 0.1 * v if len(values) > 10 else v
            smooth.append(last)
        plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth, color="#1f77b4", label="smoothed")
        plt.title(f"{name} of {output_dir}")
        plt.xlabel("step")
        plt.ylabel(name)
        plt.legend()
        path = Path(output_dir) / f"training_{name.replace('/', '_')}.png"
        plt.savefig(path, format="png", dpi=100)
        plt.close()
        written.append(path)
    return written


class MetricsLog:
    """Each entry to `logging.jsonl` (trl's metric names, one JSON object a line) and to the trackers that
    report_to names: tensorboard, wandb, swanlab. A tracker whose package is missing is an error naming it,
    except TensorBoard when it is only the default (a note). A resumed run keeps the log's entries up to the
    resumed step and drops the later ones (they belong to the run that was interrupted)."""

    def __init__(self, output_dir, report_to, config, resumed_step=None, logging_dir=None, explicit=True,
                 swanlab=None):
        self.path = Path(output_dir) / "logging.jsonl"
        kept = []
        if resumed_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        self.file.write("".join(line + "\n" for line in kept))
        self.tensorboard = self.wandb = self.swanlab = None  # the trackers' run objects
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(logging_dir or str(Path(output_dir) / "runs"))
            except ImportError:
                if explicit:
                    raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install "
                                     "tensorboard (or --report_to none)") from None
                print("note: tensorboard is not installed; metrics go to logging.jsonl only")
        if "wandb" in report_to:
            # WANDB_PROJECT, WANDB_MODE (offline) and the API key come from the environment, as with transformers
            self.wandb = _import("wandb").init(project=os.environ.get("WANDB_PROJECT", "minivl"),
                                               name=str(output_dir), dir=str(output_dir), config=config)
        if "swanlab" in report_to:
            package, swanlab = _import("swanlab"), swanlab or {}
            if swanlab.get("token"):
                package.login(api_key=swanlab["token"])
            mode = {"cloud": "online"}.get(swanlab.get("mode"), swanlab.get("mode"))  # ms-swift says cloud
            self.swanlab = package.init(project=swanlab.get("project") or "minivl",
                                        workspace=swanlab.get("workspace"), config=config, mode=mode,
                                        name=swanlab.get("exp_name") or str(output_dir),
                                        log_dir=str(Path(output_dir) / "swanlog"))

    def log(self, entry):
        """entry: {"step": N, metric: value, ...}; eval metrics are named eval_*."""
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        scalars = {("eval/" + k[5:]) if k.startswith("eval_") else "train/" + k: v for k, v in entry.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, entry["step"])
        if self.wandb:
            self.wandb.log(scalars, step=entry["step"])
        if self.swanlab:
            self.swanlab.log(scalars, step=entry["step"])

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.swanlab:
            self.swanlab.finish()


def _import(package):
    try:
        return __import__(package)
    except ImportError:
        raise SystemExit(f"--report_to {package} needs the {package} package: pip install {package} "
                         "(or leave it out of --report_to)") from None


# ---------------------------------------------------------------------------------------------- progress

def clock(seconds):
    seconds = int(seconds)
    return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
            else f"{seconds // 60}:{seconds % 60:02d}")


class Progress:
    """On a terminal, one line redrawn in place (carriage return), log lines printed above it:
        step 120/300 |██████░░░░░░░░░| loss 0.532 | 7.12 steps/s | 0:16 elapsed | 0:25 left
    Off a terminal (a log file, CI, pytest) there is no bar: the trainer's periodic log lines carry the step,
    speed and time left instead."""

    def __init__(self, total, start=0, stream=None, min_interval=0.1):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.total, self.first, self.step = total, start, start
        self.started, self.drawn, self.loss, self.shown = time.time(), 0.0, None, False
        self.values = {}  # shown after the loss, e.g. a DPO run's rewards/accuracies
        self.min_interval = min_interval
        utf = "utf" in (getattr(self.stream, "encoding", "") or "").lower()
        self.cells = ("█", "░") if utf else ("#", "-")

    def status(self):
        """"120/300, 7.12 steps/s, 0:16 elapsed, 0:25 left" (speed and time left once a step is done)."""
        elapsed, done = time.time() - self.started, self.step - self.first
        if not done or elapsed <= 0:
            return f"{self.step}/{self.total}, {clock(elapsed)} elapsed"
        rate = done / elapsed
        speed = f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step"
        left = clock((self.total - self.step) / rate)
        return f"{self.step}/{self.total}, {speed}, {clock(elapsed)} elapsed, {left} left"

    def update(self, step, loss=None, values=None):
        self.step = step
        self.loss = loss if loss is not None else self.loss
        self.values.update({k: v for k, v in (values or {}).items() if v is not None})
        if self.tty and (time.time() - self.drawn >= self.min_interval or step >= self.total):
            self.draw()

    def draw(self):
        width = shutil.get_terminal_size((100, 24)).columns - 1
        fill = round(20 * self.step / max(1, self.total))
        parts = self.status().split(", ")
        line = f"step {parts[0]} |{self.cells[0] * fill}{self.cells[1] * (20 - fill)}| " + " | ".join(
            ([f"loss {self.loss:.4g}"] if self.loss is not None else [])
            + [f"{k} {v:.4g}" for k, v in self.values.items()] + parts[1:])
        self.stream.write("\r" + line[:width] + "\x1b[K")  # \x1b[K clears what a longer line left behind
        self.stream.flush()
        self.drawn, self.shown = time.time(), True

    def print(self, text, progress=False):
        """A log line. progress=True: off a terminal it ends with the status (the bar's text)."""
        if not self.tty:
            print(text + (f" | {self.status()}" if progress else ""), file=self.stream, flush=True)
            return
        self.stream.write("\r\x1b[K" + text + "\n")
        if self.shown:
            self.draw()
        self.stream.flush()

    def close(self):
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
