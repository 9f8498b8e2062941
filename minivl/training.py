"""What the trainers share besides their algorithm: ms-swift's command-line habits, the NPROC_PER_NODE launcher,
the output directory, resume checks, metric logging (logging.jsonl, TensorBoard, wandb, SwanLab) and the
progress bar. Plain functions and two small classes, called from each trainer's main():

    args = training.parse_options(parser, argv, ENGINES, HARMLESS)  # unknown options: noted, explained or refused
    training.relaunch_under_torchrun(__file__, argv)   # NPROC_PER_NODE=4 python train_sft.py ... -> torchrun
    output_dir = training.prepare_output_dir(args.output_dir, args.add_version, args.overwrite_output_dir, resume)
    metrics = training.MetricsLog(output_dir, ["tensorboard"], config=vars(args))
    bar = training.Progress(total_steps)               # a bar on a terminal, plain lines in logs and CI

Tests: tests/test_sft_cli.py.
"""

import argparse
import difflib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

# ----------------------------------------------------------------------------------------------- options


def boolean(text):
    if str(text).lower() in ("true", "1", "yes"):
        return True
    if str(text).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def show_defaults(parser):
    """--help gives each option's default (argparse prints it only for options that already have help text)."""
    for action in parser._actions:
        shown = action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
        if shown and action.help != argparse.SUPPRESS and "default:" not in (action.help or ""):
            default = action.default
            default = " ".join(map(str, default)) if isinstance(default, list) else default
            action.help = ((action.help or "") + f" (default: {default})").strip().replace("%", "%%")


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


# -------------------------------------------------------------------------------- output directory, resume

# what a run writes into its output directory; --overwrite_output_dir removes these and nothing else
RUN_OUTPUTS = ("checkpoint-*", ".checkpoint-*", "logging.jsonl", "args.json", "runs", "wandb", "swanlog")


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
                  if is_model else "give a checkpoint-N directory written by train_sft.py")
        raise SystemExit(f"--resume_from_checkpoint {path} holds {what} and this run is --train_type "
                         f"{train_type}: {advice}")
    if not (path / "training_state.pt").is_file() or not (path / "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from_checkpoint {path} has no training_state.pt / trainer_state.json (saved "
                         "with --save_only_model true?): it cannot continue a run exactly. Train from its weights "
                         "instead: --model it (a full model), or merge a LoRA adapter first (python -m "
                         "minivl.export)")


# ----------------------------------------------------------------------------------------------- logging

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

    def update(self, step, loss=None):
        self.step = step
        self.loss = loss if loss is not None else self.loss
        if self.tty and (time.time() - self.drawn >= self.min_interval or step >= self.total):
            self.draw()

    def draw(self):
        width = shutil.get_terminal_size((100, 24)).columns - 1
        fill = round(20 * self.step / max(1, self.total))
        parts = self.status().split(", ")
        line = f"step {parts[0]} |{self.cells[0] * fill}{self.cells[1] * (20 - fill)}| " + " | ".join(
            ([f"loss {self.loss:.4g}"] if self.loss is not None else []) + parts[1:])
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
