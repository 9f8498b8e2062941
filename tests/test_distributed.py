"""Several processes (minivl/training.py: engine, shard, whole_model, launch): CPU runs with the gloo backend on
the tiny demo model, two processes against one with the same global batch.

The data: 12 rows, a seeded permutation cut so that in every micro-batch one process gets a text-only row and
the other an image row (alternating), so the vision tower's stand-in pass (model.vision_in_every_forward) is
what keeps the processes' collectives in step. One process takes both rows of a micro-batch at once.

Float32 everywhere. The first step's loss agrees within 1e-5 (only the order of sums differs). Later steps are
held to 1e-3 relative: Adam divides each gradient by the root of its running square, so a gradient that is
rounding noise around zero moves its parameter by up to the learning rate, and the next losses inherit that.

Run as a script under torchrun, this file is the two-process check of FSDP2 itself on the Qwen3-VL demo
(check_sharded_qwen3): DeepStack's stand-in, gradients against one process, whole_model and decoding in one
process while the other waits.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402

import minivl  # noqa: E402
from minivl import demo, rollouts, training  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TEXT_ROWS = [("What is two plus three?", "five"), ("Say hello.", "hello"), ("Name a colour.", "blue"),
             ("Count to three.", "one two three"), ("What is the opposite of up?", "down"), ("Is ice cold?", "yes")]
MODES = {  # --train_type and what trains: the vision tower too, so its gradients cross the processes
    "lora": ["--train_type", "lora", "--freeze_vit", "false", "--learning_rate", 1e-2, "--lora_dropout", 0],
    "full": ["--train_type", "full", "--freeze_vit", "false", "--freeze_aligner", "false", "--learning_rate", 1e-3],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    made = demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")
    images = made["train"].read_text().splitlines()
    order = torch.randperm(12, generator=torch.Generator().manual_seed(42)).tolist()  # epoch_batches' order
    rows = [None] * 12
    for m in range(6):  # micro-batch m: rows order[2m] (first process) and order[2m + 1] (second)
        text = order[2 * m + m % 2]
        for i in order[2 * m:2 * m + 2]:
            query, response = TEXT_ROWS[m]
            rows[i] = json.dumps({"query": query, "response": response}) if i == text else images[i]
    mixed = made["train"].with_name("mixed.jsonl")  # beside train.jsonl: its image paths hold
    mixed.write_text("\n".join(rows) + "\n")
    val = made["train"].with_name("val3.jsonl")  # 3 rows: one process evaluates 2, the other 1
    val.write_text("\n".join(images[100:102] + [json.dumps({"query": "Say hi.", "response": "hi"})]) + "\n")
    (made["images"] / "broken.png").write_bytes(b"not an image")
    # micro-batch 2 (the first of step 2): order[5] is the second process's image row; make its image unreadable
    broken = {"query": "<image>What colour is the shape?", "response": "red", "images": ["images/broken.png"]}
    failing = rows[:order[5]] + [json.dumps(broken)] + rows[order[5] + 1:]
    made["failing"] = made["train"].with_name("failing.jsonl")
    made["failing"].write_text("\n".join(failing) + "\n")
    return {**made, "mixed": mixed, "val": val}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv(paths, out, mode, world, *extra):
    """3 steps of 4 rows: 2 per micro-batch (one process: 2 rows; two: 1 each) x 2 micro-batches."""
    return [str(a) for a in ["--model", paths["model"], "--dataset", paths["mixed"], "--val_dataset", paths["val"],
                             *MODES[mode], "--per_device_train_batch_size", 2 // world,
                             "--gradient_accumulation_steps", 2, "--max_steps", 3, "--logging_steps", 1,
                             "--save_steps", 2, "--eval_steps", 3, "--report_to", "none", "--warmup_ratio", 0,
                             "--output_dir", out, *extra]]


def torchrun(args, *launcher, timeout=300, script="train_sft.py"):
    """A trainer under torchrun (2 processes of this machine unless `launcher` says otherwise)."""
    launcher = launcher or ("--standalone", "--nproc_per_node", "2")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / script),
                           *map(str, args)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def logged(out):
    return [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]


def losses(out, key="loss"):
    return [e[key] for e in logged(out) if key in e]


def weights(checkpoint):
    files = list(Path(checkpoint).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def same_weights(got, expected, atol=1e-5):
    """The weights two checkpoints hold, tensor by tensor."""
    mine, theirs = weights(got), weights(expected)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], rtol=0, atol=atol), name


def assert_same_run(got, expected):
    """Two runs of the same 3 steps: losses, gradient norms, eval loss, and the weights they saved."""
    first, *later = losses(got)
    assert first == pytest.approx(losses(expected)[0], rel=1e-5)
    assert later == pytest.approx(losses(expected)[1:], rel=1e-3)
    assert losses(got, "grad_norm") == pytest.approx(losses(expected, "grad_norm"), rel=1e-3)
    assert losses(got, "eval_loss") == pytest.approx(losses(expected, "eval_loss"), rel=1e-5)
    same_weights(Path(got) / "checkpoint-3", Path(expected) / "checkpoint-3", atol=1e-4)  # 3 updates of ~lr


@pytest.fixture(scope="module")
def one_process(paths, tmp_path_factory):
    """The reference of each mode: one process, 2 rows per micro-batch, checkpoints after steps 2 and 3."""
    out = {}
    for mode in MODES:
        out[mode] = tmp_path_factory.mktemp(f"one-{mode}")
        train_sft.main(argv(paths, out[mode], mode, 1))
    return out


# ------------------------------------------------------------------------------------------------ the rule

def test_which_engine_runs():
    sharded3, sharded2 = {"reshard_after_forward": True, "offload": False}, {"reshard_after_forward": False,
                                                                             "offload": False}
    assert training.engine("full", world=4)[0] == sharded3
    assert training.engine("lora", world=4) == (None, "--train_type lora: DDP over 4 processes: each holds the "
                                                       "whole model, gradients averaged")
    assert training.engine("lora", "zero3", world=2)[0] == sharded3
    assert training.engine("full", "zero2", world=2)[0] == sharded2
    assert training.engine("full", "default-zero2", world=2)[0] == sharded2
    assert training.engine("full", "zero0", world=2)[0] is None
    settings, line = training.engine("lora", "zero3_offload", world=8)
    assert settings == {"reshard_after_forward": True, "offload": True}
    assert line.startswith("--deepspeed zero3_offload: FSDP2 over 8 processes") and "CPUOffloadPolicy" in line
    assert training.engine("lora", "examples/deepspeed/ds_z3_offload_config.json", world=2)[0]["offload"]
    assert training.engine("lora", fsdp=["full_shard auto_wrap"], world=2)[0] == sharded3
    assert training.engine("lora", fsdp=["shard_grad_op", "offload"], world=2)[0] == {**sharded2, "offload": True}
    assert training.engine("full", fsdp=["no_shard"], world=2)[0] is None
    assert training.engine("full", "zero3", world=1) == (None, "--deepspeed zero3: one process, nothing to shard")
    for refused, message in [(dict(deepspeed="zero9"), "not a name minivl reads"),
                             (dict(fsdp=["fully_shard"]), "fully_shard is not one of full_shard"),
                             (dict(deepspeed="zero3", fsdp=["full_shard"]), "give one of them")]:
        with pytest.raises(SystemExit, match=message):
            training.engine("full", world=2, **refused)


def test_a_deepspeed_config_file_and_the_yaml_key(tmp_path):
    config = tmp_path / "my_config.json"  # the file decides, not its name
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert training.engine("full", str(config), world=2)[0] == {"reshard_after_forward": False, "offload": True}
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(dict(model_name_or_path="m", dataset="d", deepspeed=str(config),
                                        ddp_timeout=600)))
    args = train_sft.parse_args([str(path)])
    assert (args.deepspeed, args.ddp_timeout) == (str(config), 600)


def test_each_process_the_same_number_of_eval_batches():
    """3 rows, batch 1, 2 processes: the second process gets a weight-0 stand-in for its missing batch."""
    rows = [{"x": torch.tensor([i])} for i in range(3)]

    def collate(items):
        return {"x": torch.cat([item["x"] for item in items])}

    procs = [training.Process(torch.device("cpu"), torch.float32, rank, rank, 2) for rank in (0, 1)]
    got = [[(b["x"].tolist(), w) for b, w in training.eval_batches(rows, collate, 1, p, stand_ins=True)]
           for p in procs]
    assert got == [[([0], 1.0), ([2], 1.0)], [([1], 1.0), ([1], 0.0)]]
    assert [b["x"].tolist() for b in training.eval_batches(rows, collate, 1, procs[1])] == [[1]]


def test_grpo_eval_prompts_are_a_contiguous_share_of_each_process():
    """5 prompts, 2 a batch, 2 processes: the first process takes prompts 0-2, the second 3-4, each batch with the
    index of its first prompt, from which its completions' rows in the sampling noise count."""
    from minivl import rollouts

    procs = [training.Process(torch.device("cpu"), torch.float32, rank, rank, 2) for rank in (0, 1)]
    assert [rollouts.eval_shares(list("abcde"), 2, p) for p in procs] == [[(0, ["a", "b"]), (2, ["c"])],
                                                                           [(3, ["d", "e"])]]
    assert rollouts.eval_shares(list("abc"), 2, training.Process(torch.device("cpu"), torch.float32)) == [
        (0, ["a", "b"]), (2, ["c"])]


def test_the_data_position_in_rows_moves_between_process_counts():
    """Saved by 2 processes of 1 row after 4 micro-batches (8 rows): one process of 2 rows continues at its
    micro-batch 4, one of 4 rows at its micro-batch 2; one of 3 rows cannot continue exactly."""
    args = train_sft.parse_args([])
    two = training.Process(torch.device("cpu"), torch.float32, 0, 0, 2)
    one = training.Process(torch.device("cpu"), torch.float32)
    state = {"epoch": 0, "micro_batch": 0, "num_dropped": 0}
    steps = training.step_batches(list(range(24)), list, 1, 2, two, state, args)
    seen = [i for _ in range(2) for b, _ in next(steps) for i in b]
    assert state["micro_batch"] == 4 and state["epoch_samples"] == 8
    everything = [i for m in training.epoch_batches(24, 1, one, args.seed, 0) for i in m]
    assert seen == everything[0:8:2]
    for batch, micro in ((2, 4), (4, 2)):
        resumed = {**state}
        nxt = next(training.step_batches(list(range(24)), list, batch, 1, one, resumed, args))
        assert nxt[0][0] == everything[8:8 + batch] and resumed["micro_batch"] == micro + 1
    with pytest.raises(SystemExit, match="after 8 rows of epoch 0, which micro-batches of 3 rows"):
        next(training.step_batches(list(range(24)), list, 3, 1, one, {**state}, args))


def test_an_optimizer_state_saved_by_position_still_loads(paths):
    """training_state.pt from before FSDP2 held optimizer.state_dict() (parameters by position): it loads."""
    args = train_sft.parse_args(["--model", str(paths["model"]), "--dataset", str(paths["mixed"]), *map(
        str, MODES["full"])])
    proc = training.init_process(args)
    model, _ = training.load_model(args, proc)
    trainable, _ = training.make_trainable(model, args, proc)
    optimizer, _ = training.make_optimizer(trainable, args, 10, proc)
    for _, p in trainable:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as at the start of a resumed run
    old = optimizer.state_dict()
    fresh, _ = training.make_optimizer(trainable, args, 10, proc)
    training.load_optimizer(model, fresh, old)
    for a, b in zip(old["state"].values(), fresh.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    assert len(fresh.state_dict()["state"]) == len(trainable)


# ------------------------------------------------------------------------------------ acceptance, slow

@pytest.mark.slow
@pytest.mark.parametrize("mode, engine", [("lora", []), ("lora", ["--deepspeed", "zero3"]), ("full", [])],
                         ids=["lora-ddp", "lora-zero3", "full-fsdp2"])
def test_two_processes_train_as_one(mode, engine, paths, one_process, tmp_path):
    """3 steps: LoRA replicated (DDP, the vision tower's adapters training), LoRA sharded, and full fine-tuning
    sharded (FSDP2, gradient checkpointing on), each process with a text-only micro-batch where the other has
    an image, equal to one process; the full run also decodes in one process (exact match) while the other
    waits."""
    extra = ["--eval_exact_match", 3] if mode == "full" else []
    done = torchrun(argv(paths, tmp_path, mode, 2, *engine, *extra, "--gradient_checkpointing", mode == "full"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("DDP over 2 processes" if mode == "lora" and not engine else "FSDP2 over 2 processes") in done.stdout
    assert_same_run(tmp_path, one_process[mode])
    if extra:
        assert "held-out exact-match accuracy after training" in done.stdout


@pytest.mark.slow
def test_two_nodes_on_one_machine(paths, one_process, tmp_path):
    """Node 0 as ms-swift starts it (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE), node 1 with
    torchrun --nnodes 2 --node_rank 1 --rdzv_endpoint: together, the same 3 steps as one process."""
    port = str(free_port())
    args = argv(paths, tmp_path, "full", 2)
    node0 = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *args], cwd=ROOT, text=True,
                             env={**ENV, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port, "NPROC_PER_NODE": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    node1 = torchrun(args, "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "1", "--rdzv_endpoint",
                     f"127.0.0.1:{port}")
    out, err = node0.communicate(timeout=300)
    assert node0.returncode == 0 and node1.returncode == 0, err[-2000:] + node1.stderr[-2000:]
    assert "--nnodes 2 --node_rank 0 --master_addr 127.0.0.1" in out and "FSDP2 over 2 processes" in out
    assert "step 1 loss" not in node1.stdout  # the first process of all logs
    assert_same_run(tmp_path, one_process["full"])


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_processes(paths, one_process, tmp_path):
    """FSDP2: the checkpoint of step 2 written by 2 processes continues in 1 (with 4 rows in one micro-batch,
    the same global batch) with the loss of step 3 of the 2-process run, and one written by 1 process
    continues in 2 with step 3 of the 1-process run: weights, optimizer state and data position. Also a
    LoRA checkpoint of 1 process into 2 that shard the adapters."""
    two = tmp_path / "two"
    done = torchrun(argv(paths, two, "full", 2))
    assert done.returncode == 0, done.stderr[-3000:]
    into_one = argv(paths, tmp_path / "into-one", "full", 1, "--resume_from_checkpoint", two / "checkpoint-2")
    into_one[into_one.index("--per_device_train_batch_size") + 1] = "4"
    into_one[into_one.index("--gradient_accumulation_steps") + 1] = "1"
    train_sft.main(into_one)
    assert losses(tmp_path / "into-one")[-1] == pytest.approx(losses(two)[-1], rel=1e-5)
    assert losses(tmp_path / "into-one", "grad_norm")[-1] == pytest.approx(losses(two, "grad_norm")[-1],
                                                                           rel=1e-5)
    same_weights(tmp_path / "into-one" / "checkpoint-3", two / "checkpoint-3")  # the update: Adam's state
    done = torchrun(argv(paths, tmp_path / "into-two", "full", 2, "--resume_from_checkpoint",
                         one_process["full"] / "checkpoint-2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "into-two")[-1] == pytest.approx(losses(one_process["full"])[-1], rel=1e-5)
    same_weights(tmp_path / "into-two" / "checkpoint-3", one_process["full"] / "checkpoint-3")
    # a LoRA adapter into sharded adapters (--deepspeed zero3): each process loads its slice
    done = torchrun(argv(paths, tmp_path / "lora", "lora", 2, "--deepspeed", "zero3", "--resume_from_checkpoint",
                         one_process["lora"] / "checkpoint-2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "lora")[-1] == pytest.approx(losses(one_process["lora"])[-1], rel=1e-5)
    same_weights(tmp_path / "lora" / "checkpoint-3", one_process["lora"] / "checkpoint-3")


@pytest.mark.slow
def test_a_failing_process_stops_all_and_keeps_the_last_checkpoint(paths, tmp_path):
    """The second process meets an unreadable image in step 2: every process exits non-zero, soon, with that
    process's rank and error; checkpoint-1 stays whole and nothing of step 2 is in place."""
    args = argv(paths, tmp_path, "full", 2, "--save_steps", 1)
    args[args.index("--dataset") + 1] = str(paths["failing"])
    started = time.time()
    done = torchrun(args, timeout=120)
    assert done.returncode != 0 and time.time() - started < 60
    assert f"rank 1: ValueError: {paths['failing']}:" in done.stderr and "broken.png" in done.stderr
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and (tmp_path / "checkpoint-1" / "training_state.pt").is_file()
    minivl.load(tmp_path / "checkpoint-1")


@pytest.mark.slow
def test_fsdp2_on_qwen3_vl(tmp_path):
    """check_sharded_qwen3, below, in two processes."""
    model = demo.make_demo(tmp_path / "demo_data", family="qwen3_vl")["model"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(model)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("sharded Qwen3-VL: ok") == 2


# ------------------------------------------------------------------------------------ DPO and GRPO, slow

REWARDS = """
import os

CALLS = []


def varied(completions, **kwargs):
    return [float(len(set(c)) % 3) for c in completions]


def fails_in_rank_1(completions, **kwargs):
    CALLS.append(1)
    if os.environ.get("RANK") == "1" and len(CALLS) == 2:
        raise ValueError("a bad sample")
    return varied(completions)
"""


@pytest.fixture(scope="module")
def rl_data(paths):
    """DPO's demo pairs, 3 of the eval pairs; the demo rows as GRPO prompts, 3 eval prompts; a reward plugin."""
    pairs = demo.make_preference_pairs(paths)
    folder = paths["train"].parent
    (folder / "pairs_val3.jsonl").write_text("".join(pairs["test"].read_text().splitlines(True)[:3]))
    (folder / "rewards.py").write_text(REWARDS)
    return {"dpo": pairs["train"], "dpo_val": folder / "pairs_val3.jsonl", "grpo": paths["train"],
            "grpo_val": paths["val"], "plugin": folder / "rewards.py"}


def rl_argv(script, paths, rl_data, out, mode, world, *extra):
    """3 steps of 4 samples: DPO 2 pairs per micro-batch (one process: 2; two: 1 each) x 2 micro-batches; GRPO
    2 prompts x 2 completions a round (two processes: a prompt each), sampled and trained on in one step. A
    reference in both (adapters off, or a frozen copy sharded as the model); 3 eval pairs or prompts, 2 in one
    process and 1 in the other."""
    task = ["--beta", 0.5] if script == "train_dpo.py" else [
        "--num_generations", 2, "--max_completion_length", 4, "--temperature", 1.0, "--top_k", 0, "--top_p", 1.0,
        "--beta", 0.1, "--external_plugins", rl_data["plugin"], "--reward_funcs", "varied"]
    kind = script.split("_")[1].split(".")[0]
    return [str(a) for a in ["--model", paths["model"], "--dataset", rl_data[kind], "--val_dataset",
                             rl_data[kind + "_val"], *MODES[mode], *task,
                             "--per_device_train_batch_size", 2 // world, "--per_device_eval_batch_size",
                             1 if kind == "dpo" else 2, "--gradient_accumulation_steps", 2, "--max_steps", 3,
                             "--logging_steps", 1, "--save_steps", 2, "--eval_steps", 3, "--report_to", "none",
                             "--warmup_ratio", 0, "--gradient_checkpointing", "false", "--output_dir", out,
                             *extra]]


def rl_run(script, args, world):
    """A DPO or GRPO run in this process (world 1) or under torchrun with 2 processes."""
    if world == 1:
        __import__(script[:-3]).main(args)
    else:
        done = torchrun(args, script=script)
        assert done.returncode == 0, done.stderr[-3000:]
        return done


@pytest.fixture(scope="module")
def rl_one_process(paths, rl_data, tmp_path_factory):
    """One process of each trainer and mode, made on first use."""
    made = {}

    def get(script, mode, *extra):
        key = (script, mode, *extra)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"one-{script[:-3]}-{mode}")
            rl_run(script, rl_argv(script, paths, rl_data, made[key], mode, 1, *extra), 1)
        return made[key]
    return get


def assert_same_rl_run(got, expected, eval_key):
    """assert_same_run's checks for DPO and GRPO: losses (GRPO's first is about 0: its old policy is the one
    training, so the ratio is 1), gradient norms, the eval metric, the weights of the last checkpoint."""
    first, *later = losses(got)
    assert first == pytest.approx(losses(expected)[0], rel=1e-5, abs=1e-7)
    assert later == pytest.approx(losses(expected)[1:], rel=1e-3, abs=1e-6)
    assert losses(got, "grad_norm") == pytest.approx(losses(expected, "grad_norm"), rel=1e-3)
    assert losses(got, eval_key) == pytest.approx(losses(expected, eval_key), rel=1e-5)
    assert losses(got, "num_tokens") == losses(expected, "num_tokens")
    same_weights(Path(got) / "checkpoint-3", Path(expected) / "checkpoint-3", atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("script, mode, extra", [
    ("train_dpo.py", "lora", []), ("train_dpo.py", "full", []),
    ("train_dpo.py", "full", ["--precompute_ref_log_probs", "true"]), ("train_grpo.py", "lora", []),
    ("train_grpo.py", "lora", ["--deepspeed", "zero3"]), ("train_grpo.py", "full", [])],
    ids=["dpo-lora-ddp", "dpo-full-fsdp2", "dpo-full-fsdp2-precomputed", "grpo-lora-ddp", "grpo-lora-zero3",
         "grpo-full-fsdp2"])
def test_dpo_and_grpo_in_two_processes_train_as_one(script, mode, extra, paths, rl_data, rl_one_process, tmp_path):
    """3 steps of DPO and of GRPO, LoRA replicated (DDP) and sharded (--deepspeed zero3: GRPO samples from the
    gathered weights with the adapters folded in; the reference is the sharded model with its adapters off), and
    full fine-tuning sharded (FSDP2, the frozen reference sharded too; DPO also with the reference's log-probs
    precomputed), equal to one process: GRPO's two processes sample their own prompts from the whole weights
    and draw the completions one process draws (the noise keyed by the row in the whole round), with a
    deterministic reward; the eval, 2 prompts or pairs in one process and 1 in the other, is the same too."""
    done = rl_run(script, rl_argv(script, paths, rl_data, tmp_path, mode, 2, *extra), 2)
    assert ("DDP over 2 processes" if mode == "lora" and not extra else "FSDP2 over 2 processes") in done.stdout
    one = rl_one_process(script, mode, *extra)  # --deepspeed zero3 in one process: nothing to shard
    assert_same_rl_run(tmp_path, one, "eval_loss" if script == "train_dpo.py" else "eval_reward")
    if script == "train_grpo.py":
        assert len(set(losses(one, "reward"))) > 1 and losses(tmp_path, "reward") == losses(one, "reward")
        assert max(losses(tmp_path, "kl")) > 0


@pytest.mark.slow
def test_chord_in_two_processes_trains_as_one(paths, rl_data, rl_one_process, tmp_path):
    """CHORD (GRPO plus mu 0.5 x the SFT loss of expert rows, each process its own), full fine-tuning under FSDP2:
    the same 3 steps as one process, the expert term included."""
    extra = [str(a) for a in ["--chord_sft_dataset", paths["train"], "--chord_mu_peak", 0.5, "--chord_mu_valley",
                              0.5, "--chord_mu_warmup_steps", 0, "--chord_mu_decay_steps", 0]]
    rl_run("train_grpo.py", rl_argv("train_grpo.py", paths, rl_data, tmp_path, "full", 2, *extra), 2)
    one = rl_one_process("train_grpo.py", "full", *extra)
    assert_same_rl_run(tmp_path, one, "eval_reward")
    assert len(losses(one, "expert/sft_loss")) == 3
    assert losses(tmp_path, "expert/sft_loss") == pytest.approx(losses(one, "expert/sft_loss"), rel=1e-3)


@pytest.mark.slow
def test_a_grpo_checkpoint_resumes_on_another_number_of_processes(paths, rl_data, rl_one_process, tmp_path):
    """GRPO (LoRA): the checkpoint of step 2 written by 2 processes continues in 1, and one written by 1 continues
    in 2, with the step 3 of the run that wrote it: the same prompts, the same completions, the same update."""
    script = "train_grpo.py"
    one = rl_one_process(script, "lora")
    two = tmp_path / "two"
    rl_run(script, rl_argv(script, paths, rl_data, two, "lora", 2), 2)
    for world, source in ((1, two), (2, one)):
        out = tmp_path / f"into-{world}"
        rl_run(script, rl_argv(script, paths, rl_data, out, "lora", world, "--resume_from_checkpoint",
                               source / "checkpoint-2"), world)
        assert losses(out, "reward")[-1] == losses(source, "reward")[-1]
        assert losses(out)[-1] == pytest.approx(losses(source)[-1], rel=1e-5, abs=1e-7)
        assert losses(out, "grad_norm")[-1] == pytest.approx(losses(source, "grad_norm")[-1], rel=1e-5)
        same_weights(out / "checkpoint-3", source / "checkpoint-3")


@pytest.mark.slow
def test_a_failing_grpo_process_stops_all_and_keeps_the_last_checkpoint(paths, rl_data, tmp_path):
    """The second process's reward function fails in step 2: every process exits non-zero, soon, with that
    process's rank and the function's error; checkpoint-1 stays whole."""
    args = rl_argv("train_grpo.py", paths, rl_data, tmp_path, "lora", 2, "--save_steps", 1, "--reward_funcs",
                   "fails_in_rank_1")
    started = time.time()
    done = torchrun(args, timeout=120, script="train_grpo.py")
    assert done.returncode != 0 and time.time() - started < 90
    assert "rank 1: RewardFunctionError" in done.stderr and "a bad sample" in done.stderr
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


# -------------------------------------------------------------------------------- the two-process script

def check_sharded_qwen3(model_dir):
    """In each of 2 processes: the Qwen3-VL demo fully fine-tuned under FSDP2, the first process with a text-only
    batch, the second with an image (the vision tower and its DeepStack mergers run on a stand-in in the
    first). The gradients, gathered, equal those of one unsharded model on the mean of both losses; a frozen
    reference (load_reference) is sharded too, and sharded again after the trainers' log-prob call
    (reference_call); it and the whole_model copy give the unsharded logits; each process then decodes a different
    number of tokens from the copy, and a training step after it still runs in step."""
    from torch.distributed.tensor import DTensor

    args = train_sft.parse_args(["--model", model_dir, "--dataset", "unused", *map(str, MODES["full"])])
    proc = training.init_process(args)
    model, processor = training.load_model(args, proc)
    training.make_trainable(model, args, proc)
    reference = minivl.load(model_dir, dtype=torch.float32)
    image, colour, _ = demo.draw_shape(__import__("random").Random(0))
    batches = [processor([[{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]]),
               processor([[{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": colour}]])]

    def loss(m, batch):  # lm_head read after the forward, as the trainers read it
        return (m.hidden_states(**batch) @ m.lm_head.weight.t()).logsumexp(-1).mean()

    loss(model, batches[proc.rank]).backward()
    (sum(loss(reference, b) for b in batches) / 2).backward()  # FSDP2 averages the processes' gradients
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        grad = training.whole_tensor(p.grad)
        assert torch.allclose(grad, q.grad, rtol=1e-4, atol=1e-6), (name, float((grad - q.grad).abs().max()))
    assert any(n.startswith("model.visual.deepstack") for n, _ in model.named_parameters())
    frozen = training.load_reference(model_dir, proc)  # DPO's and GRPO's reference: sharded as the model
    assert all(isinstance(p, DTensor) and not p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.allclose(frozen(**batches[proc.rank]), reference(**batches[proc.rank]), atol=1e-5)
        batch = batches[proc.rank]
        starts, targets = torch.tensor([batch["input_ids"].shape[1] - 3]), batch["input_ids"][:, -3:]
        sharded = training.reference_call(rollouts.CompletionLogprobs(frozen, 0.7), frozen, proc)
        whole = rollouts.CompletionLogprobs(reference, 0.7)
        assert torch.allclose(sharded(batch, starts, targets)[0], whole(batch, starts, targets)[0], atol=1e-5)
    # the trainers' forward (hidden_states, then lm_head's weight) leaves FSDP2's root gathered: resharded after
    assert all(isinstance(p, DTensor) for p in frozen.parameters())
    with training.whole_model(model, proc) as whole, torch.no_grad():
        assert torch.allclose(whole(**batches[1]), reference(**batches[1]), atol=1e-5)
        prompt = processor([[{"role": "user", "content": "Say hello."}]], add_generation_prompt=True)
        minivl.generate(whole, prompt, max_new_tokens=2 + 5 * proc.rank, eos_token_id=[], temperature=0.0)
    loss(model, batches[1 - proc.rank]).backward()
    print("sharded Qwen3-VL: ok", flush=True)
    training.finish(proc)


if __name__ == "__main__":
    check_sharded_qwen3(sys.argv[1])
