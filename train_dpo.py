"""Preference tuning (DPO, ORPO, SimPO; LoRA or full) of Qwen2-VL / 2.5-VL / 3-VL, with ms-swift's options.

    python train_dpo.py                           # the embedded demo: right colour chosen, a wrong one rejected
    python train_dpo.py --model demo_data_qwen3_vl/model   # the same on the Qwen3-VL demo (python -m minivl.demo)
    python train_dpo.py --rlhf_type dpo --model Qwen/Qwen2-VL-7B-Instruct --dataset llamafactory/RLHF-V \\
        --train_type lora --beta 0.1 --learning_rate 5e-6 --gradient_accumulation_steps 8 --output_dir output
    python train_dpo.py qwen2vl_lora_dpo.yaml     # a LLaMA-Factory config (stage: dpo); then key=value overrides
    NPROC_PER_NODE=4 python train_dpo.py ...      # 4 GPUs: LoRA under DDP, full under FSDP2 (train_sft.py)

`swift rlhf --rlhf_type dpo|orpo|simpo` runs with `swift rlhf` replaced by `python train_dpo.py`; the shared
options, outputs and exact resume are train_sft.py's (minivl/training.py), the data formats minivl/data_rl.py's.
A pair is two conversations sharing the prompt, labels on the final answer only. The B pairs of a micro-batch go
through one forward as 2B rows (chosen answers first), each image encoded once by the vision tower and placed in
both rows (`image_index`). Token log-probs come from the hidden states through the fused lm_head + log-softmax
kernel, summed over each answer (ipo, orpo, simpo: averaged, as trl and LLaMA-Factory do). The loss is the mean
over the step's pairs (all micro-batches, all GPUs) plus alpha x the NLL of the chosen answers, a mean over all
chosen tokens of the step (ms-swift's and trl's normalisation; LLaMA-Factory's pref_ftx averages per answer first,
the same when the chosen answers are equally long): however the batch is split, the loss and gradient agree.
Alpha: --rpo_alpha (dpo; default none), 1 (orpo), --cpo_alpha (simpo: ms-swift runs it as trl's CPO).
Reference (dpo): with LoRA the model with its adapters off (lora.disabled, no second copy); with full training a
frozen copy of --model (or --ref_model), sharded as the model is; --precompute_ref_log_probs: its log-probs of
every pair once, before training (no copy stays); --reference_free: a uniform reference. A LoRA run that trains
modules in full (modules_to_save: lora_llm with the vision unfrozen) keeps no original of them: it needs those.

Metrics, trl's names and signs: rewards/chosen = beta (log pi(y+) - log ref(y+)) (orpo, simpo: beta log pi(y+)),
rewards/rejected, /accuracies (a tie counts 0), /margins, logps/*, logits/*, nll_loss, loss; eval_* of each.
Simplified: each side of a pair is cut to --max_length as train_sft.py cuts a sample (a side it cannot cut drops
the pair); no other trl loss types, LD-DPO or mixed losses. Tests: tests/test_dpo.py. Shapes: B pairs, T tokens,
D LLM width.
"""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minivl import data, data_rl, demo, lora, training  # noqa: I001  (minivl first: checks `kernels`)
from kernels.logprobs import linear_token_logprobs
from minivl.processor import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------- arguments

RLHF_TYPES = ("dpo", "orpo", "simpo")
OTHER_TYPES = {"grpo": "GRPO is train_grpo.py (python train_grpo.py with the same options)", "kto": "KTO",
               "cpo": "CPO (simpo is implemented)", "rm": "reward-model training", "gkd": "GKD", "ppo": "PPO"}
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
ENGINES = {"ref_adapters": "the LoRA reference is the model with its adapters switched off (no other adapter)"}


def build_parser():
    p = training.build_parser("DPO / ORPO / SimPO of Qwen-VL models with ms-swift's options (see the docstring)")
    a, flag = p.add_argument, dict(type=training.boolean, nargs="?", const=True)
    a("--rlhf_type", default="dpo", help="dpo, orpo or simpo (ms-swift's swift rlhf --rlhf_type)")
    a("--loss_type", choices=LOSS_TYPES, default="sigmoid", help="the dpo loss")
    a("--beta", type=float, help="default: 0.1, 2.0 with simpo")
    a("--label_smoothing", type=float, default=0.0, help="eps of sigmoid (cDPO), robust and simpo")
    a("--rpo_alpha", type=float, help="dpo: add rpo_alpha x the NLL of the chosen answers")
    a("--cpo_alpha", type=float, default=1.0, help="simpo: add cpo_alpha x the NLL of the chosen answers")
    a("--simpo_gamma", type=float, default=1.0, help="simpo's target margin")
    a("--reference_free", **flag, default=False, help="dpo against a uniform reference (no reference model)")
    a("--precompute_ref_log_probs", **flag, default=False, help="the reference's log-probs once, before training")
    a("--ref_model", help="full training: the frozen reference (default: --model)")
    training.show_defaults(p)
    return p


def parse_args(argv=None):
    args = training.parse_args(build_parser(), argv, "dpo", ENGINES)
    kind = args.rlhf_type
    if kind not in RLHF_TYPES:
        why = OTHER_TYPES.get(kind, "this type") + ("" if kind == "grpo" else " is not implemented in minivl")
        raise SystemExit(f"--rlhf_type {kind}: {why}; train_dpo.py runs {', '.join(RLHF_TYPES)}")
    args.beta = args.beta if args.beta is not None else 2.0 if kind == "simpo" else 0.1
    smoothed = (kind == "dpo" and args.loss_type in ("sigmoid", "robust")) or kind == "simpo"
    if args.label_smoothing and not (smoothed and 0 <= args.label_smoothing < 0.5):
        raise SystemExit(f"--label_smoothing {args.label_smoothing}: in [0, 0.5), for dpo's sigmoid / robust "
                         "or simpo")
    if kind != "dpo" and (args.reference_free or args.precompute_ref_log_probs or args.ref_model):
        raise SystemExit(f"--rlhf_type {kind} has no reference model: drop --reference_free, "
                         "--precompute_ref_log_probs, --ref_model")
    return args


# the demo: full training (a frozen copy is the reference) of every part, what the task was measured to learn with
DEMO = dict(train_type="full", freeze_vit=False, freeze_aligner=False, learning_rate=1e-3, beta=0.5,
            per_device_train_batch_size=16, per_device_eval_batch_size=64, max_steps=200, warmup_ratio=0.05,
            weight_decay=0.0, gradient_checkpointing=False, eval_steps=50, save_steps=200, save_total_limit=1,
            logging_steps=25, output_dir="output/demo_dpo")


def demo_argv(argv):
    """No --dataset and no YAML: the demo task as preference pairs (the right colour chosen, another rejected),
    on the default demo, or on the demo whose model --model names. Returns argv with them, or None."""
    given = build_parser().parse_known_args(argv)[0]
    model = given.model
    if (argv and argv[0].endswith((".yaml", ".yml"))) or given.dataset or (
            model and not (Path(model).parent / "demo.json").is_file()):
        return None  # not the demo (without --dataset, parse_args says what is missing)
    paths = demo.make_demo(demo.DEFAULT_DIR) if model is None else demo.demo_paths(Path(model).parent)
    pairs = demo.make_preference_pairs(paths)
    return argv + ["--model", str(paths["model"])] * (model is None) + ["--dataset", str(pairs["train"])] + [
        "--val_dataset", str(pairs["test"])] * (not given.val_dataset)


# ------------------------------------------------------------------------------------ pairs and batches

def final_answer(sample):
    """Labels on the conversation's last answer only: an earlier assistant turn is context, not preference."""
    labels = sample["labels"]
    gaps = (labels[:int((labels != IGNORE_INDEX).nonzero()[-1])] == IGNORE_INDEX).nonzero()  # before its end
    labels[:int(gaps[-1]) + 1 if len(gaps) else 0] = IGNORE_INDEX
    return sample


class PairDataset(torch.utils.data.Dataset):
    """PreferenceRows encoded on demand -> (row index, chosen sample, rejected sample), or None when a side does
    not fit max_length (cut or dropped as train_sft.py does; dropped too when the cut leaves no answer). The
    rejected side reads its images only when it has its own (rejected_images). `ref`: precomputed reference
    log-probs of the rows (n, 2), put into each batch."""

    def __init__(self, rows, processor, max_length=None, truncation_strategy="delete"):
        self.rows, self.processor, self.ref = rows, processor, None
        self.cut = data.SFTDataset([], processor, max_length, truncation_strategy).fit

    def __len__(self):
        return len(self.rows)

    def encode(self, i, pixels=True):
        row, own = self.rows[i], self.rows[i].rejected_images is not None
        try:
            sides = [self.processor.encode(row.chosen_conversation, row.images, row.videos, return_labels=True,
                                           pixels=pixels),
                     self.processor.encode(row.rejected_conversation, row.rejected_images if own else row.images,
                                           row.videos, return_labels=True, pixels=pixels and own)]
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise type(e)(f"{row.source}: {e}") from None
        sides[1].pop("pixel_values_videos", None)  # the pair's videos are the chosen side's
        sides = [self.cut(final_answer(s)) for s in sides]
        return None if None in sides or min(data.count_label_tokens(s["labels"][None]) for s in sides) == 0 \
            else (i, *sides)

    __getitem__ = encode

    def collate(self, pairs):
        """B kept pairs -> 2B rows, the chosen answers then the rejected ones (right padding), each image and
        video once in pixel_values (image_index / video_index place them), "index" the rows, "num_dropped"."""
        kept = [p for p in pairs if p is not None]
        if not kept:
            return {"num_dropped": len(pairs)}
        B, samples = len(kept), [c for _, c, _ in kept] + [r for _, _, r in kept]
        batch = self.processor.pad(samples, padding_side="right")
        for grid, pixels, extra in (("image_grid_thw", "pixel_values", []),
                                    ("video_grid_thw", "pixel_values_videos", ["second_per_grid_ts"])):
            if grid not in batch:
                continue
            # the sample whose pixels each sample's items are: its own, or the chosen side's of its pair
            owner = [j if j < B or pixels in s else j - B for j, s in enumerate(samples)]
            first, n = {}, 0  # the owners in order (as pad concatenated their pixels), with their first item
            for j, s in enumerate(samples):
                if owner[j] == j and grid in s:
                    first[j], n = n, n + len(s[grid])
            batch[grid.split("_")[0] + "_index"] = torch.tensor(
                [first[owner[j]] + k for j, s in enumerate(samples) for k in range(len(s.get(grid, [])))])
            for key in [grid] + [k for k in extra if k in batch]:
                batch[key] = torch.cat([samples[j][key] for j in first])
        batch["index"] = torch.tensor([i for i, _, _ in kept])
        if self.ref is not None:
            batch["ref_logps"] = self.ref[batch["index"]].t().flatten()  # (2B,): chosen, then rejected
        batch["num_dropped"] = len(pairs) - B
        return batch


def fit_max_length(rows, processor, args, proc, name="training"):
    """The pairs that train under --max_length, each measured now (image headers only)."""
    dataset = PairDataset(rows, processor, args.max_length, args.truncation_strategy)
    kept = [row for i, row in enumerate(rows) if dataset.encode(i, pixels=False) is not None]
    proc.print(f"--max_length {args.max_length}, --truncation_strategy {args.truncation_strategy}: "
               f"{len(rows) - len(kept)} of {len(rows)} {name} pairs left out (a side too long, or answerless)")
    if not kept and name == "training":
        raise SystemExit(f"nothing to train on: no pair fits --max_length {args.max_length}: raise it, use "
                         "--truncation_strategy right, or lower --max_pixels")
    return kept


# --------------------------------------------------------------------------------------------- the trainer

class AnswerLogprobs(nn.Module):
    """What DDP wraps: the model up to, for each row, the summed log-prob of its answer tokens (2B,), their
    count (2B,), and the sum of their mean logits (2B,); no (B, T, V) logits exist."""

    def __init__(self, model, compute_dtype):
        super().__init__()
        self.model, self.compute_dtype = model, compute_dtype

    def forward(self, labels, index=None, ref_logps=None, **batch):  # index, ref_logps: the trainer's
        hidden = self.model.hidden_states(**batch)  # (2B, T, D)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (2B, T): position t predicts t + 1
        weight = self.model.lm_head.weight
        logp = linear_token_logprobs(hidden.to(self.compute_dtype), weight.to(self.compute_dtype), targets)
        answer = targets != IGNORE_INDEX  # (2B, T)
        with torch.no_grad():  # trl's logits/*: the mean of a token's logits is hidden . (the mean row of W)
            mean_logit = (hidden.float() * weight.mean(0, dtype=torch.float32)).sum(-1)  # (2B, T), float32
        return logp.sum(-1), answer.sum(-1), (mean_logit * answer).sum(-1)


def make_reference(args, model, modules_to_save, proc):
    """batch -> the reference's summed answer log-probs (2B,), or None (orpo, simpo, --reference_free)."""
    if args.rlhf_type != "dpo" or args.reference_free:
        return None
    if args.train_type == "full":
        frozen = training.load_reference(args.ref_model or args.model, proc)  # FSDP2: sharded as the model is
        logprobs = training.reference_call(AnswerLogprobs(frozen, proc.dtype), frozen, proc)
        return lambda batch: logprobs(**batch)[0]
    if modules_to_save and not args.precompute_ref_log_probs:
        raise SystemExit(f"the reference of a LoRA run is the model with its adapters off, but {modules_to_save} "
                         "train in full and minivl keeps no original copy of them: add --precompute_ref_log_probs "
                         "true (the reference taken before training), or freeze them")
    base = AnswerLogprobs(model, proc.dtype)

    def reference(batch):
        with lora.disabled(model):
            return base(**batch)[0]
    return reference


@torch.no_grad()
def precompute(dataset, reference, model, args, proc):
    """dataset.ref: the reference log-probs (n, 2) of every pair (chosen, rejected), each process its share."""
    model.eval()
    table = torch.zeros(len(dataset), 2, device=proc.device)
    batches = training.eval_batches(dataset, dataset.collate, args.per_device_eval_batch_size, proc, True)
    for batch, weight in batches:  # FSDP2: as many forwards in every process (stand-ins of weight 0)
        with proc.autocast():
            table[batch["index"]] += reference(batch).view(2, -1).t() * weight  # (B, 2)
    if proc.world > 1:
        dist.all_reduce(table)  # each row was computed by one process
    model.train()
    dataset.ref = table.cpu()


def preference_loss(args, chosen, rejected, ref_chosen, ref_rejected):
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected answers (B,), from the answers'
    log-probs as pair_step compares them (the reference's are unused by orpo and simpo)."""
    beta, eps = args.beta, args.label_smoothing
    if args.rlhf_type == "orpo":
        # log odds(y) = log p - log(1 - p), p = exp(average log-prob), below 1 (a log-prob of 0 would be inf)
        odds = [x - torch.log(-torch.expm1(x.clamp(max=-1e-6))) for x in (chosen, rejected)]
        return -beta * F.logsigmoid(odds[0] - odds[1]), beta * chosen, beta * rejected
    if args.rlhf_type == "simpo":
        z = beta * (chosen - rejected) - args.simpo_gamma  # beta (avg log pi(y+) - avg log pi(y-) - gamma / beta)
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), beta * chosen, beta * rejected
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if args.loss_type == "sigmoid":  # -(1 - eps) log sig(beta h) - eps log sig(-beta h)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif args.loss_type == "robust":  # [-(1 - eps) log sig(beta h) + eps log sig(-beta h)] / (1 - 2 eps)
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif args.loss_type == "hinge":  # max(0, 1 - beta h)
        losses = torch.relu(1 - beta * h)
    else:  # ipo: (h - 1 / (2 beta))^2 on length-averaged log-probs
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def pair_step(module, reference, batch, args):
    """One micro-batch of B pairs: (per-pair losses (B,), the chosen answers' summed log-prob, {metric: (sum,
    count)})."""
    ref = batch.get("ref_logps")  # precomputed
    if ref is None and reference is not None:
        with torch.no_grad():
            ref = reference(batch)
    sums, counts, logit_sums = module(**batch)  # (2B,) each
    B = len(sums) // 2
    # what the loss compares: log-probs summed over the answer, or averaged (ipo, orpo, simpo: as trl does)
    per = counts if args.rlhf_type != "dpo" or args.loss_type == "ipo" else torch.ones_like(counts)
    logps, ref = sums / per, torch.zeros_like(sums) if ref is None else ref.to(sums) / per
    losses, chosen, rejected = preference_loss(args, logps[:B], logps[B:], ref[:B], ref[B:])
    chosen, rejected, logps = chosen.detach(), rejected.detach(), logps.detach()
    metrics = {"pair_loss": (losses.detach(), B), "rewards/chosen": (chosen, B),
               "rewards/rejected": (rejected, B), "rewards/accuracies": (chosen > rejected, B),
               "rewards/margins": (chosen - rejected, B),
               "logps/chosen": (logps[:B], B), "logps/rejected": (logps[B:], B),
               "logits/chosen": (logit_sums[:B], counts[:B]), "logits/rejected": (logit_sums[B:], counts[B:]),
               "nll_loss": (-sums[:B].detach(), counts[:B])}
    return losses, sums[:B].sum(), {k: torch.tensor([float(v.sum()), float(torch.as_tensor(n).sum())],
                                                    dtype=torch.float64) for k, (v, n) in metrics.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    demo_run = demo_argv(argv)
    args = parse_args(demo_run or argv)
    if demo_run:  # the demo's settings, unless given on the command line
        args = training.apply_defaults(args, argv, {**DEMO, "overwrite_output_dir": "--output_dir" not in
                                                    {a.split("=")[0] for a in argv}})
    started = time.time()
    proc = training.init_process(args)  # one process per GPU under torchrun, else GPU 0 or the CPU
    resume, output_dir = training.prepare_output(args, proc)  # refused if it holds another run

    # --- model, weights and the reference
    model, processor = training.load_model(args, proc, resume)
    trainable, modules_to_save = training.make_trainable(model, args, proc)
    step_module = training.wrap_ddp(AnswerLogprobs(model, proc.dtype), proc)
    reference = make_reference(args, model, modules_to_save, proc)

    # --- data
    rows, val_rows = training.load_data(args, data_rl.load_preference_rows)
    if args.max_length is not None:
        rows, val_rows = fit_max_length(rows, processor, args, proc), fit_max_length(val_rows, processor, args,
                                                                                      proc, "eval")
    train_set, val_set = (PairDataset(part, processor, args.max_length, args.truncation_strategy)
                          for part in (rows, val_rows))
    bs, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    micro_per_epoch, steps_per_epoch, total_steps = training.count_steps(len(rows), bs, accum, proc, args)
    proc.print(f"data: {len(rows)} train pairs, {len(val_rows)} eval pairs; {steps_per_epoch} steps per epoch of "
               f"{accum} x {bs * proc.world} pairs; {total_steps} steps of {args.rlhf_type}, beta {args.beta}")
    if args.precompute_ref_log_probs and reference:  # before a resumed run's adapters load: the base is original
        for dataset in (train_set, val_set):
            precompute(dataset, reference, model, args, proc)
        reference = None  # a full run's frozen copy goes

    # --- optimizer, schedule, and the state a resumed run continues from
    optimizer, scheduler = training.make_optimizer(trainable, args, total_steps, proc)
    state = training.start_state(resume, model, optimizer, scheduler, args, proc)
    alpha = {"dpo": args.rpo_alpha or 0.0, "orpo": 1.0, "simpo": args.cpo_alpha}[args.rlhf_type]  # of the NLL

    def means(sums, prefix=""):
        """{metric: mean over all processes}; the loss = the mean pair loss + alpha x the chosen tokens' NLL."""
        out = training.reduce_means({k: v.tolist() for k, v in sums.items()}, proc)
        out = {"loss": out.pop("pair_loss") + alpha * (out["nll_loss"] or 0.0), **out}
        return {prefix + k: v for k, v in out.items() if alpha or k != "nll_loss"}

    @torch.no_grad()
    def evaluate():
        model.eval()
        sums = {}
        batches = training.eval_batches(val_set, val_set.collate, args.per_device_eval_batch_size, proc, True)
        for batch, weight in batches:  # FSDP2: as many forwards in every process (stand-ins of weight 0)
            with proc.autocast():
                for k, v in pair_step(step_module, reference, batch, args)[2].items():
                    sums[k] = sums.get(k, 0) + v * weight
        model.train()
        return means(sums, "eval_")

    # --- the loop
    log = training.RunLog(args, output_dir, proc, state, total_steps, resume, shown=["rewards/accuracies"])
    eval_every, save_every = training.intervals(args, steps_per_epoch)
    params = [p for _, p in trainable]
    steps = training.step_batches(train_set, train_set.collate, bs, accum, proc, state, args)
    while state["global_step"] < total_steps:
        micro = next(steps)  # [(batch, weight)]: weight 0 for a stand-in of a micro-batch dropped whole (DDP)
        # the loss: the mean over the step's pairs (every micro-batch, every process) of the pair losses, plus
        # alpha x the mean over the step's chosen answer tokens of their NLL. DDP averages gradients over the
        # `world` processes, so each scales its sums by world / count.
        n_pairs, n_chosen, n_input = proc.all_sum(
            sum(len(b["index"]) for b, w in micro if w),
            sum(data.count_label_tokens(b["labels"][:len(b["index"])]) for b, w in micro if w),
            sum(int(b["attention_mask"].sum()) for b, w in micro if w))
        sums = {}
        for i, (batch, weight) in enumerate(micro):
            batch = training.to_device(batch, proc.device)
            with training.grad_sync(step_module, i == len(micro) - 1), proc.autocast():
                losses, chosen_logp, metrics = pair_step(step_module, reference, batch, args)
                loss = losses.sum() / max(1.0, n_pairs) - alpha * chosen_logp / max(1.0, n_chosen)
                (loss * weight * proc.world).backward()
            for k, v in metrics.items():  # (sum, count); weight 0 for a DDP stand-in
                sums[k] = sums.get(k, 0) + v * weight
        grad_norm, lr = training.optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        state["global_step"] += 1
        state["num_tokens"] += int(n_input)
        step = state["global_step"]
        log.step(step, {**means(sums), "tokens": n_input})
        if training.due(step, args.logging_steps, total_steps):
            window, totals, seconds = log.window()
            entry = {"loss": window.pop("loss"), "grad_norm": grad_norm, "learning_rate": lr,
                     **{k: v for k, v in window.items() if k != "tokens"}, "num_tokens": state["num_tokens"],
                     "tokens_per_second": totals["tokens"] / seconds,
                     "epoch": round(state["epoch"] + state["micro_batch"] / micro_per_epoch, 4)}
            dropped = {"num_dropped_too_long": state["num_dropped"]} if state["num_dropped"] else {}
            log.write({**entry, **dropped})
        result = evaluate() if val_rows and training.due(step, eval_every, total_steps) else {}
        if result:
            log.write(result)
        if training.due(step, save_every, total_steps):
            path = training.save_checkpoint(model, args, state, optimizer, scheduler, proc, output_dir,
                                            modules_to_save, metric=result.get("eval_loss"))
            log.say(f"saved {path}")
    log.close(plot=["loss", "eval_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                    "rewards/rejected"])
    proc.print(f"done in {time.time() - started:.0f} s; checkpoints in {output_dir}")
    training.finish(proc)
    return model, state


if __name__ == "__main__":
    training.launch(main, __file__)  # NPROC_PER_NODE=N: under torchrun
