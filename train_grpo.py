"""GRPO of Qwen2-VL / Qwen2.5-VL / Qwen3-VL with minivl's own sampler, with ms-swift's options and reward plugins.

    python train_grpo.py                          # the demo: a short SFT warm start, then GRPO raises its accuracy
    python train_grpo.py --rlhf_type grpo --model Qwen/Qwen2.5-VL-3B-Instruct --dataset train_grpo.jsonl \\
        --reward_funcs accuracy my_reward --external_plugins plugin.py --train_type lora --output_dir output/grpo
    NPROC_PER_NODE=4 python train_grpo.py ...     # 4 GPUs: LoRA under DDP, full under FSDP2 (train_sft.py)

A `swift rlhf --rlhf_type grpo` command runs with `swift rlhf` replaced by `python train_grpo.py`; its vLLM options
are accepted with one note, since rollouts come from minivl's KV-cache sampler in this process (minivl/rollouts.py).
Data: ms-swift's GRPO jsonl, whose columns (`solution`, ...) reach the reward functions by name (minivl/rewards.py).
CHORD with --chord_sft_dataset: loss = (1 - mu) GRPO + mu SFT on a micro-batch of expert rows each micro-step, mu
scheduled by the four --chord_mu_* options (minivl/chord.py: the schedule, phi weights, the expert stream).
Batches as trl counts them: --per_device_train_batch_size counts completions; a generation round samples
--generation_batch_size completions (default: per-device batch x accumulation x processes), whole groups of
--num_generations answers to a prompt, each process its own groups, and feeds --steps_per_generation micro-batches
(default: accumulation) --num_iterations times. Where a round's passes fit one optimizer step (the default) the
policy that sampled is the one training; else its log-probs come from a forward right after sampling. Log-probs are
at the sampling temperature, from hidden states (no tokens x vocabulary logits); the reference is the model with its
adapters off (LoRA) or a frozen --ref_model / --model (full, sharded as the model), none with --beta 0. Each
process samples its groups from the weights gathered whole, a completion's noise keyed by its row in the
round of all processes, so that any number of processes draws the same completions.

Reads top to bottom: arguments, the loss (each formula beside its line), the loop; the rest is minivl/training.py's
(checkpoints, resume, LoRA, logging, the progress bar). A run resumed inside a round (a round longer than a step)
samples that round's prompts afresh. Simplified against ms-swift: no vLLM, reward models, multi-turn, dynamic
sampling or entropy masking; --max_length drops longer prompts. Tests: tests/test_grpo.py, tests/test_chord.py.
Shapes: N completions of a round, B of a micro-batch, L completion tokens, F reward functions, G per prompt.
"""

import collections
import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

import train_sft
from minivl import chord, data_rl, lora, rewards, rollouts, training
from minivl.processor import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------- arguments

ENGINES = {"reward_model": "minivl has no reward models: reward functions (--reward_funcs, --external_plugins)",
           "repetition_penalty": "minivl's sampler has no repetition penalty"}  # besides training.ENGINES
# ms-swift's options for vLLM and its colocation: accepted, without effect here (one note)
ROLLOUT_ENGINE = ("use_vllm", "vllm_", "async_generate", "offload_model", "offload_optimizer", "sleep_level",
                  "move_model_batches")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def build_parser():
    p = training.build_parser("GRPO with ms-swift's options and minivl's sampler (see the docstring)")
    a = p.add_argument
    flag = dict(type=training.boolean, nargs="?", const=True)
    a("--rlhf_type", default="grpo", help="grpo (DPO, SimPO and ORPO are train_dpo.py)")
    a("--reward_funcs", nargs="+", default=[], help="accuracy, format, random, or functions of --external_plugins")
    a("--reward_weights", nargs="+", type=float, help="one per reward function (default: 1 each)")
    a("--external_plugins", nargs="+", default=[], help="Python files registering reward functions (ms-swift's)")
    a("--num_generations", type=int, default=8, help="G: completions per prompt, one group")
    a("--num_generations_eval", type=int, help="completions per eval prompt (default: --num_generations)")
    a("--generation_batch_size", type=int, help="completions per generation round, all processes (default: "
                                                "per-device batch x accumulation x processes)")
    a("--steps_per_generation", type=int, help="micro-batches one round feeds (default: accumulation)")
    a("--num_iterations", type=int, default=1, help="passes over each round (the GRPO paper's mu)")
    a("--max_completion_length", "--max_new_tokens", dest="max_completion_length", type=int, default=512)
    a("--temperature", type=float, default=0.9)
    a("--top_k", type=int, default=50, help="0: all tokens")
    a("--top_p", type=float, default=0.9)
    a("--beta", type=float, default=0.04, help="weight of the KL to the reference; 0 loads no reference")
    a("--ref_model", help="the reference of a full fine-tune (default: --model)")
    a("--epsilon", type=float, default=0.2)
    a("--epsilon_high", type=float, help="upper clip (default: --epsilon; DAPO uses 0.28)")
    a("--delta", type=float, help="two-sided clipping: the unclipped ratio capped at delta (INTELLECT-2)")
    a("--loss_type", choices=LOSS_TYPES, default="grpo")
    a("--scale_rewards", type=lambda t: {"true": "group", "false": "none"}.get(t.lower(), t.lower()),
      choices=["group", "batch", "none"], default="group", help="(ms-swift < 3.10: true = group, false = none)")
    a("--importance_sampling_level", choices=["token", "sequence"], default="token", help="sequence: GSPO")
    a("--overlong_filter", **flag, default=False, help="truncated completions carry no loss")
    a("--log_completions", **flag, default=False, help="every completion and its rewards to completions.jsonl")
    a("--eval_on_start", **flag, default=False, help="evaluate before the first step")
    a("--chord_sft_dataset", nargs="*", help="CHORD's expert rows: SFT rows, or GRPO rows (`solution`: the answer)")
    a("--chord_sft_per_device_train_batch_size", type=int, help="expert rows a micro-step (default: the GRPO one)")
    a("--chord_mu_warmup_steps", type=int, help="steps of mu's linear rise from 0 to its peak")
    a("--chord_mu_decay_steps", type=int, help="steps of mu's cosine decay from its peak to its valley")
    a("--chord_mu_peak", type=float, help="mu at the end of the warmup")
    a("--chord_mu_valley", type=float, help="mu after the decay (= --chord_mu_peak: a constant mu)")
    a("--chord_enable_phi_function", **flag, default=False, help="weight each expert token by p (1 - p)")
    training.show_defaults(p)
    return p


def parse_args(argv=None):
    argv, ignored, i = list(argv or []), [], 0
    while i < len(argv):  # ms-swift's vLLM options, with their values, are set aside
        j = i + 1
        if argv[i].startswith("--") and argv[i][2:].startswith(ROLLOUT_ENGINE):
            while "=" not in argv[i] and j < len(argv) and not argv[j].startswith("--"):
                j += 1
            ignored, argv, j = ignored + argv[i:j], argv[:i] + argv[j:], i
        i = j
    if argv and argv[0].endswith((".yaml", ".yml")):
        raise SystemExit("LLaMA-Factory has no GRPO stage: give train_grpo.py ms-swift's options")
    args = training.parse_args(build_parser(), argv, "grpo", ENGINES)
    if args.rlhf_type != "grpo":
        other = "train_dpo.py" if args.rlhf_type in ("dpo", "simpo", "orpo", "cpo") else "not in minivl"
        raise SystemExit(f"--rlhf_type {args.rlhf_type}: train_grpo.py runs GRPO; {args.rlhf_type} is {other}")
    if ignored:
        training.note(f"note: {' '.join(ignored)} ignored: minivl samples with its own KV-cache sampler "
                      "(minivl.generate) in this process, on the model being trained; there is no vLLM")
    args.ignored_rollout_options = ignored  # in args.json: what the command asked of vLLM
    chord.check_args(args)
    return args


def generation_plan(args, world, n_prompts=None):
    """trl's batch arithmetic, checked: (completions per round over all processes, micro-batches per round, prompts
    per round per process) and, given the number of prompts, (rounds per epoch, steps per epoch, steps in all)."""
    bs, G = args.per_device_train_batch_size, args.num_generations
    if args.generation_batch_size and args.steps_per_generation:
        raise SystemExit("--generation_batch_size and --steps_per_generation say the same thing: give one")
    if G < 2 or args.temperature <= 0:
        raise SystemExit(f"--num_generations {G}, --temperature {args.temperature}: a group needs 2 or more "
                         "completions, sampled at a temperature above 0, to compare")
    per_micro = bs * world  # completions in one micro-batch, all processes
    size = args.generation_batch_size or per_micro * (args.steps_per_generation or args.gradient_accumulation_steps)
    if size % per_micro:
        raise SystemExit(f"--generation_batch_size {size} is not a multiple of --per_device_train_batch_size x "
                         f"processes = {per_micro}")
    if size % G:
        raise SystemExit(f"--generation_batch_size {size} is not a multiple of --num_generations {G}: a round "
                         f"samples whole groups of {G} completions of one prompt (set --generation_batch_size, or "
                         "raise --per_device_train_batch_size or --gradient_accumulation_steps)")
    if size // G % world:
        raise SystemExit(f"--generation_batch_size {size} makes {size // G} groups for {world} processes: each "
                         "process samples whole groups, so they must share them evenly")
    if n_prompts is None:
        return size, size // per_micro, size // G // world
    rounds = n_prompts // (size // G)  # a short last batch of an epoch makes no round
    if rounds == 0:
        raise SystemExit(f"{n_prompts} prompts make no generation round of {size // G} prompts")
    steps = math.ceil(rounds * size // per_micro * args.num_iterations / args.gradient_accumulation_steps)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps)
    return size, size // per_micro, size // G // world, rounds, steps, total


def demo_defaults(args, argv):
    """No --model and no --dataset: 100 SFT steps of train_sft.py's demo (kept in <output_dir>_sft) teach the demo
    model to answer with a colour, right about 25% of the time at temperature 1; then 200 GRPO steps, 8 images x 8
    answers, the accuracy reward, the LLM trained in full (the vision tower frozen, as in ms-swift). Options given
    on the command line still win."""
    from minivl import demo

    paths = demo.make_demo(demo.DEFAULT_DIR)
    given = any(a.split("=")[0] == "--output_dir" for a in argv)
    out = Path(args.output_dir if given else "output/demo_grpo")
    warm = out.with_name(out.name + "_sft")
    if not (warm / "checkpoint-100" / "config.json").is_file():
        train_sft.main(["--max_steps", "100", "--save_steps", "100", "--eval_steps", "100", "--logging_steps", "50",
                        "--eval_exact_match", "0", "--output_dir", str(warm), "--overwrite_output_dir", "true"])
    return training.apply_defaults(args, argv, dict(
        model=str(warm / "checkpoint-100"), dataset=[str(paths["train"])], val_dataset=[str(paths["test"])],
        reward_funcs=["accuracy"], train_type="full", learning_rate=5e-4, lr_scheduler_type="constant",
        per_device_train_batch_size=64, per_device_eval_batch_size=128, temperature=1.0, top_k=0, top_p=1.0,
        max_completion_length=8, beta=0.0, max_steps=200, weight_decay=0.0, gradient_checkpointing=False,
        eval_steps=50, save_steps=200, save_total_limit=1, logging_steps=10, eval_on_start=True,
        output_dir=str(out), overwrite_output_dir=not given))


# ------------------------------------------------------------------------------------------------ the loss

def group_advantages(reward, G, scale):
    """reward (N,) of N / G groups in order (NaN: no function scored it) -> advantages (N,): A_i = (R_i - mean of
    its group) / (std + 1e-4), the std (Bessel-corrected, as trl's) of its group ("group"), of the whole batch
    ("batch"), or no division ("none": Dr. GRPO). A completion no function scored gets 0."""
    r = reward.view(-1, G)  # (N / G, G)
    n = (~r.isnan()).sum(1, keepdim=True)
    centred = r - r.nansum(1, keepdim=True) / n.clamp(min=1)
    std = (centred.nan_to_num() ** 2).sum(1, keepdim=True).div((n - 1).clamp(min=1)).sqrt()  # (N / G, 1)
    if scale == "group":
        centred = centred / (std + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.nanstd(reward) + 1e-4)
    return centred.nan_to_num(0.0).flatten()


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, args, step_tokens=1.0, entropy=None):
    """This micro-batch's share of the step's loss, and metric sums {name: (sum, count)}. logp (B, L) float32 with
    gradients; old_logp (B, L) or None (the old policy is this one, detached); ref_logp (B, L) or None (no KL);
    advantages (B,); mask (B, L) bool, the tokens that count; step_tokens: dapo's denominator; entropy (B, L)."""
    m = mask.float()
    counted = m.sum(-1).clamp(min=1)  # (B,) |y_i|
    # the ratio r_it = pi(y_it) / pi_old(y_it); with pi_old = stop-grad(pi), r = 1 and grad r = grad log pi: the
    # gradient is REINFORCE's, A grad log pi, though the loss value is about 0
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)  # (B, L)
    if args.importance_sampling_level == "sequence":
        # GSPO: one ratio per completion, s_i = exp((1/|y_i|) sum_t log r_it), the same on each of its tokens
        log_ratio = ((log_ratio * m).sum(-1) / counted)[:, None]  # (B, 1)
    ratio = torch.exp(log_ratio)
    A = advantages[:, None]  # (B, 1): a completion's advantage on each of its tokens
    low, high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    # the clipped surrogate: l_it = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    clipped = ratio.clamp(1 - low, 1 + high)
    unclipped = ratio if args.delta is None else ratio.clamp(max=args.delta)  # two-sided: r capped at delta
    per_token = -torch.min(unclipped * A, clipped * A).expand_as(m)  # (B, L)
    sums = {"clip_ratio/low_mean": (((ratio < 1 - low) & (A < 0)).expand_as(m) * m).sum(),
            "clip_ratio/high_mean": (((ratio > 1 + high) & (A > 0)).expand_as(m) * m).sum()}
    sums["clip_ratio/region_mean"] = sums["clip_ratio/low_mean"] + sums["clip_ratio/high_mean"]
    sums["entropy"] = (entropy.detach() * m).sum() if entropy is not None else 0.0
    if ref_logp is not None:
        # the KL to the reference, k3 estimate (Schulman): exp(d) - d - 1 >= 0 with d = log pi_ref - log pi;
        # l_it += beta k3
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + args.beta * kl
        sums["kl"] = (kl.detach() * m).sum()
    total = (per_token * m).sum()
    accum = args.gradient_accumulation_steps  # the step's loss is the mean over its micro-batches (and processes)
    if args.loss_type == "grpo":  # each completion's mean over its tokens, then the mean over completions
        loss = ((per_token * m).sum(-1) / counted).mean() / accum
    elif args.loss_type == "bnpo":  # the mean over this micro-batch's tokens
        loss = total / m.sum().clamp(min=1) / accum
    elif args.loss_type == "dr_grpo":  # a constant denominator: B x max_completion_length
        loss = total / (m.shape[0] * args.max_completion_length) / accum
    else:  # dapo: the mean over every counted token of the step (all micro-batches, all processes)
        loss = total / step_tokens
    return loss, {k: (float(v), float(m.sum())) for k, v in sums.items()}


def chord_loss(grpo, sft, mu, accum):
    """CHORD's loss of a micro-step: grpo, this micro-step's share of the step's GRPO loss (grpo_loss), mixed with
    sft, the expert batch's SFT loss (chord.sft_loss), which takes the same 1 / accum share of the step."""
    return (1 - mu) * grpo + mu * sft / accum  # L = (1 - mu) L_GRPO + mu L_SFT


# ------------------------------------------------------------------------------------------------- the loop

@dataclass
class Round:
    """One generation round of this process: G completions of each of its prompts, scored."""
    prompts: list  # [(PromptRow, encoded prompt)]; rows g*G .. g*G+G-1 of gen answer prompt g
    gen: object  # minivl.sampler.Generation on the CPU: tokens (N, L), lengths, logprobs, truncated
    mask: torch.Tensor  # (N, L) bool: the completion tokens the loss counts
    advantages: torch.Tensor  # (N,)
    old: list  # per micro-batch: (B, L) log-probs of the policy that sampled, or None: the one training is it
    ref: list  # per micro-batch: (B, L) log-probs of the reference, or None (--beta 0)
    step_tokens: float  # dapo's denominator: the counted tokens of a step, all processes, per process


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model is None:
        args = demo_defaults(args, argv)
    started = time.time()
    proc = training.init_process(args)
    generation_plan(args, proc.world)  # the batch options checked before anything loads
    resume, output_dir = training.prepare_output(args, proc)

    # --- model, reference, reward functions
    model, processor = training.load_model(args, proc, resume)
    trainable, modules_to_save = training.make_trainable(model, args, proc)
    policy = rollouts.CompletionLogprobs(model, args.temperature, proc.dtype)
    step_module = training.wrap_ddp(policy, proc)
    reference = None
    if args.beta and args.train_type == "full":  # LoRA's reference is the model with its adapters off
        frozen = training.load_reference(args.ref_model or args.model, proc)  # FSDP2: sharded as the model is
        reference = training.reference_call(rollouts.CompletionLogprobs(frozen, args.temperature, proc.dtype),
                                            frozen, proc)
    funcs = rewards.load_reward_funcs(args.reward_funcs, args.external_plugins, args.reward_weights, args,
                                      args.seed)

    # --- data: prompts, `prompts_per_round` of them a round in each process
    rows, val_rows = training.load_data(args, data_rl.load_prompt_rows)
    if args.max_length is not None:
        n_rows = len(rows)
        rows, val_rows = (rollouts.drop_long(r, processor, args.max_length) for r in (rows, val_rows))
        proc.print(f"--max_length {args.max_length}: {n_rows - len(rows)} of {n_rows} prompts dropped as longer")
    round_size, per_round, prompts_per_round, rounds_per_epoch, steps_per_epoch, total_steps = generation_plan(
        args, proc.world, len(rows))
    G, bs, accum, iters = (args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                           args.num_iterations)
    needs_old = accum % (per_round * iters) != 0  # trl: a round's passes do not fit one step, the policy moves
    collate = functools.partial(rollouts.encode_prompts, processor)
    proc.print(f"data: {len(rows)} prompts, {len(val_rows)} eval prompts; a round: {round_size // G} prompts x {G} "
               f"completions, {per_round} micro-batches of {bs} x {proc.world} processes, {iters} pass(es); "
               f"{steps_per_epoch} steps per epoch of {accum} micro-batches; {total_steps} steps")

    # --- optimizer, schedule, and the state a resumed run continues from
    optimizer, scheduler = training.make_optimizer(trainable, args, total_steps, proc)
    state = training.start_state(resume, model, optimizer, scheduler, args, proc)
    state.update({k: state.get(k, v) for k, v in (("rounds", 0), ("round_start", [0, 0]), ("round_used", 0))})
    skip = state["round_used"] if 0 < state["round_used"] < per_round * iters else 0
    if skip:  # saved inside a round: a fresh round of the same prompts, less the micro-batches trained on
        (state["epoch"], state["epoch_samples"]), state["rounds"] = state["round_start"], state["rounds"] - 1
    completions = output_dir / "completions.jsonl"
    if resume is not None:  # the interrupted run's later completions go
        rollouts.write_completions(completions, proc, [], keep_until=state["global_step"])

    def sample(whole, prompts, n, seed, first_row):
        """n completions of each prompt by `whole` (training.whole_model), numbered from first_row in the noise,
        scored -> (Generation, texts, (N, F) rewards, (N,) their weighted sum). A reward function that fails raises
        RewardFunctionError naming it: the saved checkpoints stay as they were."""
        gen, texts = rollouts.rollout(whole, processor, prompts, n, args.max_completion_length, args.temperature,
                                      args.top_p, args.top_k, seed, first_row)
        trainer_state = SimpleNamespace(global_step=state["global_step"], max_steps=total_steps)
        rows = [row for row, _ in prompts for _ in range(n)]
        return gen, texts, *rewards.score_rows(funcs, rows, texts, trainer_state=trainer_state)

    def make_round(prompts):
        """Sample, score and prepare one round of this process -> (Round, its metrics over all processes)."""
        seed = (args.seed * 1_000_003 + state["rounds"]) % 2**31  # a round's; its rows numbered over all processes
        with training.whole_model(model, proc) as whole:  # --- distributed: each process samples its own groups
            gen, texts, per_func, total = sample(whole, prompts, G, seed, proc.rank * len(prompts) * G)
        mask = torch.arange(gen.tokens.shape[1]) < gen.lengths[:, None]  # (N, L) the sampled tokens, eos included
        mask &= ~(gen.truncated[:, None] & args.overlong_filter)  # --overlong_filter: truncated ones count nothing
        n, F = len(texts), len(funcs)
        everyone = proc.gather(torch.cat([per_func, total[:, None], gen.lengths[:, None], gen.truncated[:, None],
                                          mask.sum(1, keepdim=True)], 1).float())  # (world * N, F + 4)
        advantages = group_advantages(everyone[:, F], G, args.scale_rewards)
        rnd = Round(prompts, gen, mask, advantages[proc.rank * n:(proc.rank + 1) * n], [], [],
                    float(everyone[:, F + 3].sum()) / proc.world * accum / per_round)
        with torch.no_grad(), proc.autocast():
            for k in range(per_round):
                inputs = rollouts.completion_inputs(processor, prompts, gen, range(k * bs, (k + 1) * bs), G,
                                                    proc.device)
                rnd.old.append(policy(*inputs)[0] if needs_old else None)
                with lora.disabled(model) if reference is None else contextlib.nullcontext():
                    rnd.ref.append((reference or policy)(*inputs)[0] if args.beta else None)
        metrics = {**rewards.reward_metrics(everyone[:, :F], everyone[:, F], funcs, G),
                   **rollouts.length_metrics(everyone[:, F + 1], everyone[:, F + 2])}
        state["num_tokens"] += int(proc.all_sum(sum(len(p["input_ids"]) for _, p in prompts) * G)[0]
                                   + everyone[:, F + 1].sum())  # prompts and completions, all processes
        if args.log_completions:
            rollouts.write_completions(completions, proc, [
                {"step": state["global_step"] + 1, "prompt": processor.decode(prompts[i // G][1]["input_ids"]),
                 "completion": text, **{f.name: float(per_func[i, j]) for j, f in enumerate(funcs)},
                 "reward": float(total[i]), "advantage": float(rnd.advantages[i]),
                 "images": prompts[i // G][0].images, "solution": prompts[i // G][0].columns.get("solution")}
                for i, text in enumerate(texts)])
        return rnd, metrics

    @torch.no_grad()
    def evaluate():
        """Mean rewards of completions sampled for the eval prompts (the same seed each time), all processes."""
        n, sums = args.num_generations_eval or G, collections.defaultdict(lambda: [0.0, 0])
        shares = rollouts.eval_shares(val_rows, max(1, args.per_device_eval_batch_size // n), proc)
        with training.whole_model(model, proc) as whole:  # every process, whatever its share
            scored = [sample(whole, collate(part), n, args.seed, first * n) for first, part in shares]
        for gen, _, per_func, total in scored:
            for key, x in {"eval_reward": total, "eval_completions/mean_length": gen.lengths.float(),
                           **{f"eval_rewards/{f.name}/mean": per_func[:, j] for j, f in enumerate(funcs)}}.items():
                sums[key] = [sums[key][0] + float(x.nansum()), sums[key][1] + int((~x.isnan()).sum())]
        return training.reduce_means(sums, proc)

    # --- the loop: a micro-step trains on the next micro-batch of the round, a new round when it is spent
    log = training.RunLog(args, output_dir, proc, state, total_steps, resume, shown=["reward"])
    eval_every, save_every = training.intervals(args, steps_per_epoch)
    params = [p for _, p in trainable]
    prompt_batches = training.step_batches(rows, collate, prompts_per_round, 1, proc, state, args)
    if args.chord_sft_dataset:  # CHORD's expert rows: a stream of micro-batches of their own
        experts = chord.expert_batches(args, processor, proc, state)
        expert_logprobs = train_sft.TokenLogprobs(model, proc.dtype)  # the model outside DDP: see the loop
    if args.eval_on_start and val_rows and resume is None:
        log.write(evaluate())
    queue, rnd = [], None
    while state["global_step"] < total_steps:
        sums, metrics, seconds = collections.defaultdict(lambda: [0.0, 0.0]), {}, {"time/rollout": 0.0}
        started_step = time.time()
        mu = chord.mu_at(state["global_step"], args.chord_mu_peak, args.chord_mu_valley, args.chord_mu_warmup_steps,
                         args.chord_mu_decay_steps) if args.chord_sft_dataset else 0.0
        for i in range(accum):
            if not queue:
                started_round, prompts = time.time(), []
                while len(prompts) < prompts_per_round:  # an epoch's short last batch makes no round
                    # the data position in rows (0 before the first round; step_batches keeps it after)
                    state["round_start"] = [state["epoch"], state.setdefault("epoch_samples", 0)]
                    prompts = next(prompt_batches)[0][0]
                rnd, metrics = make_round(prompts)
                state["rounds"], state["round_used"] = state["rounds"] + 1, 0
                queue, skip = [(k, it) for it in range(iters) for k in range(per_round)][skip:], 0
                seconds["time/rollout"] += time.time() - started_round
            k, it = queue.pop(0)
            state["round_used"] += 1
            idx = range(k * bs, (k + 1) * bs)
            inputs = rollouts.completion_inputs(processor, rnd.prompts, rnd.gen, idx, G, proc.device)
            mask = rnd.mask[idx, :inputs[2].shape[1]].to(proc.device)  # (B, L)
            with training.grad_sync(step_module, i == accum - 1), proc.autocast():
                logp, entropy = step_module(*inputs)  # (B, L) float32 each
                loss, loss_sums = grpo_loss(logp, rnd.old[k], rnd.ref[k], rnd.advantages[idx].to(proc.device),
                                            mask, args, rnd.step_tokens, entropy)
                if mu > 0:  # CHORD (mu = 0: no SFT forward). One backward through the two forwards syncs (DDP)
                    # the gradients of both terms
                    expert, weight = next(experts)  # weight 0: a stand-in where this process has no rows left
                    expert_logp, _, targets = expert_logprobs(**training.to_device(expert, proc.device))  # (B, T)
                    phi = args.chord_enable_phi_function  # each token weighted by its detached p (1 - p)
                    sft = weight * chord.sft_loss(expert_logp, targets != IGNORE_INDEX, phi)
                    loss = chord_loss(loss, sft, mu, accum)
                    loss_sums["expert/sft_loss"] = (float(sft.detach()), weight)
                loss.backward()
            loss_sums["loss"] = (float(loss.detach()), 1.0 / accum)
            if it == 0:  # the sampler's log-probs against the trainer's, of the policy that sampled
                sampled = logp.detach() if rnd.old[k] is None else rnd.old[k]
                gap = (sampled - rnd.gen.logprobs[idx, :logp.shape[1]].to(proc.device)).abs() * mask
                loss_sums["sampling/sampling_logp_difference/mean"] = (float(gap.sum()), float(mask.sum()))
            for key, (total, count) in loss_sums.items():
                sums[key] = [sums[key][0] + total, sums[key][1] + count]
        grad_norm, lr = training.optimizer_step(optimizer, scheduler, params, args.max_grad_norm)
        seconds["time/train"] = time.time() - started_step - seconds["time/rollout"]
        state["global_step"] = step = state["global_step"] + 1
        log.step(step, {**training.reduce_means(sums, proc), **metrics, **seconds,
                        **({"mu": mu} if args.chord_sft_dataset else {})})
        if training.due(step, args.logging_steps, total_steps):
            window, _, _ = log.window()
            log.write({"loss": window.pop("loss"), "grad_norm": grad_norm, "learning_rate": lr,
                       **{k: v for k, v in window.items() if v is not None}, "num_tokens": state["num_tokens"],
                       "epoch": round(state["epoch"] + state["micro_batch"] / rounds_per_epoch, 4)})
        result = evaluate() if val_rows and training.due(step, eval_every, total_steps) else {}
        if result:
            log.write(result)
        if training.due(step, save_every, total_steps):  # the best checkpoint: the highest eval reward
            path = training.save_checkpoint(model, args, state, optimizer, scheduler, proc, output_dir,
                                            modules_to_save, result.get("eval_reward"), greater_is_better=True)
            log.say(f"saved {path}")
    log.close(plot=["loss", "reward", "eval_reward"])
    proc.print(f"done in {time.time() - started:.0f} s; checkpoints in {output_dir}")
    training.finish(proc)
    return model, state


if __name__ == "__main__":
    training.launch(main, __file__)  # NPROC_PER_NODE=N: under torchrun
