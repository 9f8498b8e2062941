"""The CHORD guide's experiment in miniature, on the demo task and a CPU: from one start, SFT only, GRPO only and
CHORD, each over several seeds, compared by held-out accuracy.

    python benchmarks/chord_experiment.py                       # 200 steps a run, seeds 0 1 2: 3 min on 2 cores
    python benchmarks/chord_experiment.py --expert_rows 128 --teacher_accuracy 0.9   # the guide's setting
    python benchmarks/chord_experiment.py --steps 50 --seeds 0  # a quick look

The start: the demo model after --warm_steps steps of train_sft.py at its demo settings (lr 1e-3, batch 16, the
whole model), which answers with a colour word but is right about as often as chance (4 colours). From there, at
one learning rate (5e-4, constant), the LLM trained in full and the vision tower frozen (ms-swift's default):
  SFT    train_sft.py on the expert rows, batch 16
  GRPO   train_grpo.py on the 1024 training images, 8 images x 8 answers a step at temperature 1, the accuracy
         reward (the answer against the image's colour), beta 0
  CHORD  GRPO as above plus the SFT term on 16 expert rows a step, mu as the users' command schedules it: peak
         0.9, valley 0.05, no warmup, the cosine decay over the whole run
The expert rows are the first --expert_rows training rows answered by a teacher right --teacher_accuracy of the
time (by default all 1024, all right). The guide distils a larger model (right 92% of the time) into a data set
that SFT alone over-fits; --expert_rows 128 --teacher_accuracy 0.9 is that setting in miniature.
Each for --steps optimizer steps per seed (the seed orders the data and draws the samples). Held-out accuracy: the
greedy answer equals the colour, on the 128 held-out rows. Prints a table: mean, spread (sample standard deviation
and range over the seeds), each seed, the seconds of a run.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from minivl import checkpoint, data, demo  # noqa: E402
from minivl.processor import Processor  # noqa: E402

USERS_MU = dict(peak=0.9, valley=0.05, warmup=0)  # the users' CHORD command; the decay spans the run


def expert_rows(train, out, n_rows, accuracy):
    """The expert data: the first n_rows training rows, each answer kept with probability `accuracy`, else another
    colour: a teacher that is sometimes wrong, as a data set distilled from a larger model is. Image paths made
    absolute, so the file may live in `out`."""
    rng, rows = random.Random(0), []
    for line in Path(train).read_text().splitlines()[:n_rows]:
        row = json.loads(line)
        if rng.random() >= accuracy:
            row["response"] = rng.choice([c for c in demo.COLOURS if c != row["response"]])
        rows.append({**row, "images": [str(Path(train).parent / p) for p in row["images"]]})
    path = out / f"experts_{n_rows}_{accuracy}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_accuracy(model, processor, rows):
    return train_sft.exact_match(model, processor, rows, batch_size=128)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warm_steps", type=int, default=100, help="SFT steps of the common start")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--out", default="output/chord_experiment")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    p.add_argument("--expert_rows", type=int, default=1024, help="training rows the expert answered (SFT's data)")
    p.add_argument("--teacher_accuracy", type=float, default=1.0, help="share of the expert's answers right")
    args = p.parse_args(argv)
    # one thread: a model this small gains nothing from two, and loses several times over when other processes
    # share the cores
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    paths = demo.make_demo(demo.DEFAULT_DIR)
    train, test = str(paths["train"]), str(paths["test"])
    processor = Processor.from_pretrained(paths["model"])
    out.mkdir(parents=True, exist_ok=True)
    experts = str(expert_rows(train, out, args.expert_rows, args.teacher_accuracy))
    held_out = data.load_rows([test], shuffle=False)

    warm = out / "start" / f"checkpoint-{args.warm_steps}"
    if not (warm / "config.json").is_file():
        train_sft.main([str(a) for a in ["--max_steps", args.warm_steps, "--save_steps", args.warm_steps,
                                         "--logging_steps", 50, "--eval_exact_match", 0, "--report_to", "none",
                                         "--output_dir", out / "start", "--overwrite_output_dir", "true"]])
    start = held_out_accuracy(checkpoint.load(warm), processor, held_out)

    common = ["--model", warm, "--train_type", "full", "--learning_rate", args.learning_rate,
              "--lr_scheduler_type", "constant", "--warmup_ratio", 0, "--weight_decay", 0,
              "--gradient_checkpointing", "false", "--max_steps", args.steps, "--save_strategy", "no",
              "--logging_steps", max(1, args.steps // 4), "--report_to", "none", "--overwrite_output_dir", "true"]
    grpo = ["--reward_funcs", "accuracy", "--num_generations", 8, "--per_device_train_batch_size", 64,
            "--temperature", 1.0, "--top_k", 0, "--top_p", 1.0, "--max_completion_length", 8, "--beta", 0,
            "--dataset", train]  # the prompts: every training image, rewarded against its true colour
    chord = ["--chord_sft_dataset", experts, "--chord_sft_per_device_train_batch_size", 16,
             "--chord_mu_peak", USERS_MU["peak"], "--chord_mu_valley", USERS_MU["valley"],
             "--chord_mu_warmup_steps", USERS_MU["warmup"], "--chord_mu_decay_steps", args.steps]
    methods = {
        "SFT": (train_sft.main, ["--dataset", experts, "--per_device_train_batch_size", 16,
                                 "--eval_exact_match", 0]),
        "GRPO": (train_grpo.main, grpo),
        "CHORD": (train_grpo.main, grpo + chord),
    }
    results = {name: [] for name in methods}
    seconds = {name: [] for name in methods}
    for seed in args.seeds:
        for name, (run, extra) in methods.items():
            started = time.time()
            argv = common + extra + ["--seed", seed, "--output_dir", out / f"{name.lower()}_seed{seed}"]
            model, _ = run([str(a) for a in argv])
            seconds[name].append(time.time() - started)
            results[name].append(held_out_accuracy(model, processor, held_out))
            print(f"seed {seed} {name}: held-out accuracy {100 * results[name][-1]:.1f}%", flush=True)

    print(f"\nheld-out greedy accuracy on {len(held_out)} rows; start ({args.warm_steps} SFT steps): "
          f"{100 * start:.1f}%; {args.steps} steps a run, seeds {' '.join(map(str, args.seeds))}, "
          f"{torch.get_num_threads()} threads; expert rows {args.expert_rows}, right {args.teacher_accuracy:.0%}\n")
    print("| method | mean | std | range | per seed | s a run |")
    print("|---|---|---|---|---|---|")
    for name, accs in results.items():
        pct = [100 * a for a in accs]
        std = statistics.stdev(pct) if len(pct) > 1 else 0.0
        print(f"| {name} | {statistics.mean(pct):.1f}% | {std:.1f} | {min(pct):.1f}-{max(pct):.1f}% | "
              f"{', '.join(f'{x:.1f}' for x in pct)} | {statistics.mean(seconds[name]):.0f} |")
    return start, results


if __name__ == "__main__":
    main()
