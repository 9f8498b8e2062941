"""train_sft.py as an ms-swift user meets it: options written as ms-swift writes them, --max_length checked before
training, output directories that never mix two runs, trackers, clear errors for wrong paths and checkpoints,
the NPROC_PER_NODE launcher and the progress bar (minivl/training.py).

Runs use the 32-row slice of the demo data of tests/test_sft.py and one to four steps.
"""

import json
import os
import pty
import re
import socket
import subprocess
import sys

import pytest

import minivl
from minivl import checkpoint, data, training
from test_sft import ROOT, logged, made, run, train_sft  # noqa: F401  (made is a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference", "PYTHONPATH": str(ROOT)}


def short(made, out, *extra):
    return run(made, out, "--train_type", "lora", "--max_steps", 2, "--learning_rate", 1e-2, *extra)


# ----------------------------------------------------------------------------------------------- options

def test_ms_swift_options_with_separate_values(capsys):
    base = ["--model", "m", "--dataset", "d.jsonl"]
    # ms-swift's self-cognition examples: values after the option, one or several
    args = train_sft.parse_args(base + ["--model_author", "swift", "--model_name", "swift-robot",
                                        "--lazy_tokenize", "true", "--dataset_num_proc", "4",
                                        "--logging_first_step", "true", "--learning_rate", "1e-4"])
    assert args.learning_rate == 1e-4
    assert train_sft.parse_args(base + ["--model_name", "小黄", "Xiao Huang", "--model_author=魔搭"]).model == "m"
    out = capsys.readouterr().out
    assert "note: --model_author ignored" in out and "note: --dataset_num_proc ignored" in out
    with pytest.raises(SystemExit):
        train_sft.parse_args(["stray", *base])
    assert "unexpected arguments ['stray']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sft.parse_args(base + ["--rlhf_type", "grpo"])
    err = capsys.readouterr().err
    assert "train_grpo.py" in err and "--sft_type" not in err
    # ms-swift's default truncation; boolean options also as bare flags, as transformers' parser takes them
    args = train_sft.parse_args(base + ["--overwrite_output_dir", "--freeze_vit", "false"])
    assert args.truncation_strategy == "delete" and args.overwrite_output_dir is True and args.freeze_vit is False
    text = " ".join(train_sft.build_parser().format_help().split())
    for shown in ("--warmup_ratio WARMUP_RATIO (default: 0.05)", "right cuts its text (default: delete)",
                  "--lora_alpha LORA_ALPHA (default: 32)", "--freeze_vit [FREEZE_VIT] (default: True)"):
        assert shown in text, shown


def test_malformed_json_file_names_the_file(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('[{"query": "q", "response": "r"},')
    with pytest.raises(ValueError, match=r"train\.json:1:34: not valid JSON"):
        data.load_rows(bad)


# ------------------------------------------------------------------------------------------- max_length

def test_max_length_that_leaves_nothing_stops_before_training(made, tmp_path):
    # every demo sample has 34 tokens: the image ends at position 19, the answer starts at 31
    with pytest.raises(SystemExit, match=r"none of the 32 training samples fits --max_length 33 \(32 longer and "
                                         r"dropped under --truncation_strategy delete, 0 whose answer"):
        short(made, tmp_path / "a", "--max_length", 33)
    with pytest.raises(SystemExit, match=r"--max_length 25 \(0 longer and dropped under --truncation_strategy "
                                         r"right, 32 whose answer lies wholly past the cut\).*has 34 tokens"):
        short(made, tmp_path / "b", "--max_length", 25, "--truncation_strategy", "right")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing ran, nothing written


def test_dropped_samples_are_counted_before_training(made, tmp_path, capsys):
    rows = made["small"].read_text().splitlines()
    long = [json.dumps({**json.loads(line), "response": "red " * 30}) for line in rows[:4]]
    mixed = made["small"].with_name("mixed.jsonl")
    mixed.write_text("\n".join(rows + long) + "\n")
    short(made, tmp_path, "--dataset", mixed, "--max_length", 40)
    out = capsys.readouterr().out
    first_step = out.index("step 1 ")
    assert out.index("of 36 training samples 4 dropped as too long") < first_step
    assert "data: 32 train rows" in out                                 # the schedule counts the kept rows
    assert "num_dropped_too_long" not in (tmp_path / "logging.jsonl").read_text()   # none dropped mid-run


def test_header_only_encoding_gives_the_same_tokens(made):
    processor = minivl.Processor.from_pretrained(made["model"])
    rows = data.load_rows(made["small"])[:3]
    for row in rows:
        full = processor.encode(row.conversation, images=row.images, return_labels=True)
        light = processor.encode(row.conversation, images=row.images, return_labels=True, pixels=False)
        assert (light["input_ids"] == full["input_ids"]).all() and (light["labels"] == full["labels"]).all()
        assert (light["image_grid_thw"] == full["image_grid_thw"]).all() and "pixel_values" not in light


# ------------------------------------------------------------------------------------- output directories

def test_a_second_run_into_the_same_directory(made, tmp_path):
    out = tmp_path / "out"
    run(made, out, "--train_type", "lora", "--max_steps", 4, "--save_steps", 2, "--learning_rate", 1e-2)
    first = logged(out)
    with pytest.raises(SystemExit, match="--overwrite_output_dir true.*--resume_from_checkpoint"):
        short(made, out)
    assert logged(out) == first                                          # refused: nothing touched
    # resuming into it keeps the log up to the checkpoint and replaces what came after
    run(made, out, "--train_type", "lora", "--max_steps", 4, "--save_steps", 2, "--learning_rate", 1e-2,
        "--resume_from_checkpoint", out / "checkpoint-2")
    assert logged(out, "step") == [1, 2, 3, 4] and logged(out) == pytest.approx(first)
    # replacing it: the earlier run's log and checkpoints are gone
    short(made, out, "--overwrite_output_dir", "true", "--save_steps", 1)
    assert logged(out, "step") == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_add_version_writes_a_new_subdirectory(made, tmp_path):
    short(made, tmp_path, "--add_version", "true", "--save_strategy", "no")
    short(made, tmp_path, "--add_version", "true", "--save_strategy", "no")
    versions = sorted(p.name for p in tmp_path.iterdir())
    assert [v[:3] for v in versions] == ["v0-", "v1-"], versions
    assert all(re.fullmatch(r"v\d+-\d{8}-\d{6}", v) for v in versions)   # ms-swift's v<N>-<YYYYMMDD>-<HHMMSS>
    assert all(logged(tmp_path / v, "step") == [1, 2] for v in versions)


# -------------------------------------------------------------------------------------------- trackers

def spy_on_log(monkeypatch, run_class):
    """The (step, values) of each call of run_class.log, which still runs."""
    seen, log = [], run_class.log
    monkeypatch.setattr(run_class, "log", lambda self, values, step=None, **kw: (
        seen.append((step, values)), log(self, values, step=step, **kw))[1])
    return seen


def test_report_to_wandb_logs_the_metrics(made, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = spy_on_log(monkeypatch, wandb.Run)
    short(made, tmp_path, "--report_to", "wandb", "--save_strategy", "no")
    assert [step for step, _ in seen] == [1, 2]
    assert [values["train/loss"] for _, values in seen] == logged(tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # wandb's own run file


def test_report_to_swanlab_logs_the_metrics(made, tmp_path, monkeypatch):
    swanlab = pytest.importorskip("swanlab")
    seen = spy_on_log(monkeypatch, swanlab.Run)
    short(made, tmp_path, "--report_to", "swanlab", "--swanlab_mode", "offline", "--save_strategy", "no")
    assert [step for step, _ in seen] == [1, 2]
    assert [values["train/loss"] for _, values in seen] == logged(tmp_path)
    assert list((tmp_path / "swanlog").glob("run-*"))


@pytest.mark.parametrize("tracker", ["wandb", "swanlab", "tensorboard"])
def test_a_missing_tracker_is_an_error_naming_it(tracker, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` fails, as when it is not installed
    with pytest.raises(SystemExit, match=f"--report_to {tracker} needs the {tracker} package: pip install"):
        train_sft.parse_args(["--model", "m", "--dataset", "d.jsonl", "--report_to", tracker])


# -------------------------------------------------------------------------------- paths and checkpoints

def test_a_mistyped_local_path_is_not_sent_to_the_hub(made, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(made["model"].parent.parent)                   # where demo_data/ is
    typo = f"{made['model'].parent.name}/modle"
    where = re.escape(str(made["model"].parent))
    with pytest.raises(FileNotFoundError, match=f"modle: not a checkpoint directory \\(looked for {where}/modle; "
                                                f"did you mean .*/model\\?\\)"):
        minivl.load(typo)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        minivl.Processor.from_pretrained(typo)
    with pytest.raises(FileNotFoundError, match=r"nobody/nothing: not a local directory \(looked for .*nobody/"
                                                r"nothing\) and not fetched from the Hugging Face hub \(OSError: "
                                                r"We couldn't connect.*cached files\.\)$"):
        checkpoint.resolve("nobody/nothing")


def test_resume_and_lora_as_model_errors_say_what_the_directory_is(made, tmp_path):
    run(made, tmp_path / "lora", "--train_type", "lora", "--max_steps", 1)
    run(made, tmp_path / "full", "--train_type", "full", "--max_steps", 1)
    adapter, full = tmp_path / "lora" / "checkpoint-1", tmp_path / "full" / "checkpoint-1"
    with pytest.raises(SystemExit, match=r"no such directory \(looked for .*checkpoint-7\); .* holds "
                                         r"checkpoint-1"):
        short(made, tmp_path / "a", "--resume_from_checkpoint", tmp_path / "lora" / "checkpoint-7")
    with pytest.raises(SystemExit, match="holds a full model and this run is --train_type lora: resume it with "
                                         "--train_type full"):
        short(made, tmp_path / "b", "--resume_from_checkpoint", full)
    with pytest.raises(SystemExit, match="holds a LoRA adapter and this run is --train_type full: resume it with "
                                         "--train_type lora"):
        run(made, tmp_path / "c", "--train_type", "full", "--max_steps", 2, "--resume_from_checkpoint", adapter)
    (full / "training_state.pt").unlink()                              # as --save_only_model true leaves it
    with pytest.raises(SystemExit, match="has no training_state.pt.*cannot continue a run exactly"):
        run(made, tmp_path / "d", "--train_type", "full", "--max_steps", 2, "--resume_from_checkpoint", full)
    # a LoRA checkpoint where a model is expected: what it is, its base, and what to do
    for attempt in (lambda: minivl.load(adapter), lambda: short(made, tmp_path / "e", "--model", adapter)):
        with pytest.raises(FileNotFoundError, match=f"is a LoRA adapter .*its base model: "
                                                    f"{re.escape(str(made['model']))}.*--adapters.*minivl.export"):
            attempt()


# ------------------------------------------------------------------------------------- launcher, progress

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nproc_per_node_relaunches_under_torchrun(made, tmp_path):
    argv = ["--model", made["model"], "--dataset", made["small"], "--train_type", "lora", "--max_steps", 1,
            "--per_device_train_batch_size", 2, "--save_strategy", "no", "--report_to", "none",
            "--gradient_checkpointing", "false", "--output_dir", tmp_path]
    env = {**ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *map(str, argv)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "-m torch.distributed.run --nproc_per_node 2 --master_port" in done.stdout
    assert "world 2" in done.stdout and logged(tmp_path, "step") == [1]


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere(made, tmp_path):
    argv = [sys.executable, str(ROOT / "train_sft.py"), "--model", made["model"], "--dataset", made["small"],
            "--train_type", "lora", "--max_steps", 3, "--logging_steps", 2, "--per_device_train_batch_size", 4,
            "--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "false"]
    # a terminal: one line redrawn in place with step, bar, loss, speed and time left
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*map(str, argv), "--output_dir", str(tmp_path / "tty")], stdout=follower,
                            stderr=subprocess.DEVNULL, env=ENV, cwd=tmp_path)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    screen = b"".join(chunks).decode()
    bar = re.compile(r"\rstep 3/3 \|█{20}\| loss [\d.]+ \| [\d.]+ (steps/s|s/step) \| \d+:\d\d elapsed "
                     r"\| 0:00 left")
    assert bar.search(screen), screen[-2000:]
    assert "\r\x1b[Kstep 2 loss" in screen                             # a log line printed above the bar
    # a pipe (a log file, CI): no bar, the log lines carry the progress
    done = subprocess.run([*map(str, argv), "--output_dir", str(tmp_path / "pipe")], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stdout and "█" not in done.stdout and "\x1b" not in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ") and " loss " in line]
    assert len(lines) == 2 and all(re.search(r"\| \d/3, .* elapsed, \d+:\d\d left$", line) for line in lines)


def test_progress_text():
    class Terminal:
        encoding, written = "utf-8", []

        def isatty(self):
            return True

        def write(self, text):
            self.written.append(text)

        def flush(self):
            pass

    screen = Terminal()
    bar = training.Progress(10, start=0, stream=screen, min_interval=0)
    bar.update(5, loss=1.5)
    assert screen.written[-1].startswith("\rstep 5/10 |██████████░░░░░░░░░░| loss 1.5 |")
    bar.print("a log line")
    assert screen.written[-2] == "\r\x1b[Ka log line\n" and screen.written[-1].startswith("\rstep 5/10")
    assert training.clock(3725) == "1:02:05" and training.clock(65) == "1:05"
