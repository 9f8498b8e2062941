"""CHORD ("On-Policy RL Meets Off-Policy Experts", arXiv 2508.11408) as ms-swift runs it with --chord_sft_dataset:
the GRPO loss mixed with an SFT loss on expert answers, L = (1 - mu) L_GRPO + mu L_SFT. train_grpo.py writes the
mix out; this module holds the rest: mu's schedule over the global step, the SFT term with its optional phi token
weights, and the expert rows as an endless stream of micro-batches.

    chord.check_args(args)                                       # the five options, checked together
    batches = chord.expert_batches(args, processor, proc, state)  # next(batches) -> (batch dict, weight)
    mu = chord.mu_at(step, peak=0.9, valley=0.05, warmup=0, decay=200)
    sft = chord.sft_loss(logp, labelled, phi=False)               # logp (B, T) float32, labelled (B, T) bool

Simplified against ms-swift: no per-message `loss_scale`. Tests: tests/test_chord.py.
"""

import math

from . import data, data_rl, training

MU_OPTIONS = ("chord_mu_warmup_steps", "chord_mu_decay_steps", "chord_mu_peak", "chord_mu_valley")


def check_args(args):
    """--chord_sft_dataset needs files, and all four --chord_mu_* options (ms-swift gives them no defaults)."""
    mu = {name: getattr(args, name) for name in MU_OPTIONS}
    if args.chord_sft_dataset is None:
        if any(v is not None for v in mu.values()):
            raise SystemExit("the --chord_mu_* options schedule CHORD's SFT term: give --chord_sft_dataset too")
        return
    if not args.chord_sft_dataset:
        raise SystemExit("--chord_sft_dataset names no data set: give the files of CHORD's expert rows")
    missing = [f"--{name}" for name, v in mu.items() if v is None]
    if missing:
        raise SystemExit(f"CHORD (--chord_sft_dataset) needs {', '.join(missing)}: mu's schedule has no defaults "
                         "(a constant mu: --chord_mu_peak = --chord_mu_valley)")
    if mu["chord_mu_warmup_steps"] < 0 or mu["chord_mu_decay_steps"] < 0 or \
            not (0 <= mu["chord_mu_peak"] <= 1 and 0 <= mu["chord_mu_valley"] <= 1):
        raise SystemExit(f"CHORD's schedule takes steps >= 0 and mu in [0, 1]; got {mu}")


# ms-swift's mu_schedule_function (the same in Trinity-RFT): s the global step, W warmup, D decay steps
def mu_at(step, peak, valley, warmup, decay):
    if step < warmup:  # a linear rise from 0: mu = peak s / W
        return peak * step / warmup
    if step >= warmup + decay:  # after the decay, the valley for good
        return valley
    # a cosine decay from peak to valley: mu = valley + (peak - valley) (1 + cos(pi (s - W) / D)) / 2
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def phi_weights(logp):
    """CHORD-phi: phi_t = p_t (1 - p_t) of each expert token, p_t = exp(log p_t), detached (as both reference
    implementations): at most 1/4 at p = 1/2, near 0 for tokens already learned (p -> 1) or far off (p -> 0)."""
    p = logp.detach().exp()
    return p * (1 - p)


def sft_loss(logp, labelled, phi=False):
    """The SFT term of an expert batch, over its own label tokens N (as ms-swift):
    L_SFT = -(1/N) sum_t w_t log p_t, w_t = 1, or phi_t with --chord_enable_phi_function."""
    w = phi_weights(logp) if phi else 1.0
    return -(w * logp * labelled).sum() / labelled.sum().clamp(min=1)


def expert_batches(args, processor, proc, state):
    """CHORD's expert rows (--chord_sft_dataset: SFT rows ending with the answer, or GRPO rows whose `solution` is
    the answer) in micro-batches of --chord_sft_per_device_train_batch_size (default: --per_device_train_batch_size)
    collated for SFT, shuffled each epoch and cycled without end (ms-swift's cyclic loader). The position lives in
    state["expert"], saved with each checkpoint, so a resumed run draws the same next batch. Yields (batch, weight);
    weight 0 marks a stand-in where a process has no rows left (several processes)."""
    try:
        rows = data_rl.load_expert_rows(args.chord_sft_dataset, args.system, dataset_dir=args.dataset_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--chord_sft_dataset: {e}") from None
    dataset = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy)
    if args.max_length is not None:  # only rows whose answer survives --max_length: no batch comes out empty
        rows, fit = dataset.fitting_rows()
        if not rows:
            raise SystemExit(f"--chord_sft_dataset: none of its {len(dataset.rows)} rows keeps an answer under "
                             f"--max_length {args.max_length} (the longest has {fit['longest']} tokens)")
        dataset = data.SFTDataset(rows, processor, args.max_length, args.truncation_strategy)
    size = args.chord_sft_per_device_train_batch_size or args.per_device_train_batch_size
    position = state.setdefault("expert", {"epoch": 0, "micro_batch": 0, "num_dropped": 0})
    stream = training.step_batches(dataset, dataset.collate, size, 1, proc, position, args)
    return (micro[0] for micro in stream)  # one micro-batch a micro-step
