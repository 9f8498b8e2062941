"""train_grpo.py: the loss against a hand computation, the REINFORCE gradient, reward plugins and their failures,
the batch arithmetic, learning on the demo task, exact resume, the users' ms-swift command, Qwen3-VL, options, two
processes. The batch-split check (4 x 1 and 2 x 2: the same loss and gradient) is in tests/test_train_numerics.py.

Most runs use the untrained demo model with LoRA, a few prompts and short completions (plumbing); the learning
check starts from a short SFT warm start of the demo model, as `python train_grpo.py` does.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minivl import data_rl, demo, rewards, rollouts, sampler
from minivl.processor import Processor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_grpo  # noqa: E402
import train_sft  # noqa: E402

RANDOM_REWARD = '''
import json, random
from swift.plugin import ORM, orms


class RandomReward(ORM):
    """The users' guide's plugin: random rewards in [0.1, 1.0], here also recording the solutions it is given."""

    def __call__(self, completions, solution, **kwargs):
        with open(__file__ + ".calls", "a") as f:
            f.write(json.dumps({"completions": list(completions), "solution": list(solution)}) + "\\n")
        return [random.uniform(0.1, 1.0) for _ in completions]


CALLS = []


def boom(completions, **kwargs):
    CALLS.append(1)
    if len(CALLS) > 1:
        raise KeyError("no such column")
    return [1.0 if c.startswith("r") else 0.0 for c in completions]


def varied(completions, **kwargs):
    return [float(len(set(c)) % 3) for c in completions]


def short(completions, **kwargs):
    return [0.5] * (len(completions) - 1)


orms["random_reward"] = RandomReward
'''


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The demo, prompts of it in ms-swift's GRPO format (`messages` with the user turn, `solution`), and a
    reward plugin file beside them."""
    paths = demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    grpo = [{"images": r["images"], "messages": [{"role": "user", "content": r["query"]}],
             "solution": r["response"]} for r in records]
    for name, n in (("grpo.jsonl", 16), ("grpo_small.jsonl", 2)):
        (paths["train"].parent / name).write_text("".join(json.dumps(r) + "\n" for r in grpo[:n]))
    plugin = paths["train"].parent / "RandomReward.py"
    plugin.write_text(RANDOM_REWARD)
    folder = paths["train"].parent
    return {**paths, "grpo": folder / "grpo.jsonl", "small": folder / "grpo_small.jsonl", "plugin": plugin}


def run(made, out, *extra):
    argv = ["--model", made["model"], "--dataset", made["grpo"], "--output_dir", out, "--reward_funcs", "random",
            "--num_generations", 4, "--per_device_train_batch_size", 8, "--max_completion_length", 4,
            "--temperature", 1.0, "--learning_rate", 1e-2, "--warmup_ratio", 0, "--logging_steps", 1,
            "--report_to", "none", "--gradient_checkpointing", "false", "--lora_dropout", 0, "--max_steps", 2,
            "--save_strategy", "no", *extra]
    return train_grpo.main([str(a) for a in argv])


def logged(out, key="loss"):
    entries = [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]
    return [e[key] for e in entries if key in e and "grad_norm" in e]


def by_step(out, key):
    entries = [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e and "grad_norm" in e}


# ------------------------------------------------------------------------------------------------- the loss

def hand_loss(logp, old, ref, adv, lengths, loss_type, level, beta, eps_low, eps_high, max_len):
    """(the GRPO loss of one micro-batch, tokens clipped below, above), one term at a time, from the formulas (trl's
    and ms-swift's)."""
    terms, low, high = [], 0, 0
    for i, n in enumerate(lengths):
        seq_ratio = math.exp(sum(logp[i][t] - old[i][t] for t in range(n)) / n)  # GSPO: the mean log-ratio
        row = []
        for t in range(n):
            r = seq_ratio if level == "sequence" else math.exp(logp[i][t] - old[i][t])
            term = -min(r * adv[i], min(max(r, 1 - eps_low), 1 + eps_high) * adv[i])
            low, high = low + (r < 1 - eps_low and adv[i] < 0), high + (r > 1 + eps_high and adv[i] > 0)
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            row.append(term)
        terms.append(row)
    every = [x for row in terms for x in row]
    if loss_type == "grpo":
        return sum(sum(row) / len(row) for row in terms) / len(terms), low, high
    if loss_type == "dr_grpo":
        return sum(every) / (len(terms) * max_len), low, high
    return sum(every) / len(every), low, high  # bnpo, and dapo over a step of this one micro-batch


@pytest.mark.parametrize("loss_type", train_grpo.LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_the_loss_equals_a_hand_computation(loss_type, level, clipped, beta):
    g = torch.Generator().manual_seed(0)
    lengths = [4, 2, 3]
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]  # (3, 4)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    # log-ratios inside the clip range (0.8, 1.28), or outside it both ways, per token and per sequence (GSPO)
    log_ratio = [[0.6, -0.2, 0.4, 0.4], [-0.6, 0.1, 0, 0], [0.1, -0.1, 0.05, 0]] if clipped else \
        [[0.05, -0.04, 0.03, 0.0], [-0.05, 0.02, 0, 0], [0.01, -0.03, 0.04, 0]]
    old = logp - torch.tensor(log_ratio, dtype=torch.float64)
    ref = logp + (torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    args = SimpleNamespace(importance_sampling_level=level, epsilon=0.2, epsilon_high=0.28, delta=None, beta=beta,
                           loss_type=loss_type, gradient_accumulation_steps=1, max_completion_length=6)
    loss, sums = train_grpo.grpo_loss(logp, old, ref if beta else None, adv, mask, args, step_tokens=sum(lengths))
    expected, low, high = hand_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, loss_type,
                                    level, beta, 0.2, 0.28, 6)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert sums["clip_ratio/low_mean"] == (low, sum(lengths))
    assert sums["clip_ratio/high_mean"] == (high, sum(lengths))
    assert sums["clip_ratio/region_mean"][0] == low + high
    assert (low > 0 and high > 0) == clipped  # both sides of the clip range are exercised
    if beta:
        kl = sum(math.exp(r - p) - (r - p) - 1 for i, n in enumerate(lengths)
                 for r, p in zip(ref[i, :n].tolist(), logp[i, :n].tolist()))
        assert sums["kl"][0] == pytest.approx(kl, rel=1e-9)
    # one iteration: the old policy is this one, detached; the ratio is 1, nothing is clipped
    loss, sums = train_grpo.grpo_loss(logp, None, None, adv, mask, SimpleNamespace(**{**vars(args), "beta": 0.0}),
                                      sum(lengths))
    assert float(loss) == pytest.approx(hand_loss(logp.tolist(), logp.tolist(), None, adv.tolist(), lengths,
                                                  loss_type, level, 0.0, 0.2, 0.28, 6)[0], rel=1e-12)
    assert sums["clip_ratio/region_mean"][0] == 0


def test_group_advantages_and_reward_metrics():
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, float("nan"), 1.0, 0.0])
    adv = train_grpo.group_advantages(reward, 4, "group")
    # group stds (Bessel-corrected; the NaN left out): 0.5, 0, 1
    assert adv[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv[4:8].tolist() == [0.0] * 4  # the same reward four times: no signal
    assert adv[8:].tolist() == pytest.approx([1 / 1.0001, 0.0, 0.0, -1 / 1.0001])  # no reward: no advantage
    adv = train_grpo.group_advantages(reward, 4, "none")
    assert adv[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    adv = train_grpo.group_advantages(reward, 4, "batch")
    batch_std = float(reward[~reward.isnan()].std())
    assert adv[:4].tolist() == pytest.approx([x / (batch_std + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)])
    funcs = [rewards.RewardFunc("a", None), rewards.RewardFunc("b", None)]
    per_func = torch.stack([reward, torch.ones(12)], 1)
    metrics = rewards.reward_metrics(per_func, reward, funcs, 4)
    assert metrics["reward"] == pytest.approx(6 / 11) and metrics["reward_std"] == pytest.approx(0.5)
    assert metrics["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert metrics["rewards/a/std"] == pytest.approx(batch_std) and metrics["rewards/b/std"] == 0.0


def test_one_iteration_without_kl_is_reinforce(made):
    """With the old policy the current one and beta 0, the gradient of the loss is the REINFORCE gradient with group
    advantages, -(1/B) sum_i A_i (1/|y_i|) sum_t grad log pi(y_it), on the demo model's own completions."""
    model = __import__("minivl").load(made["model"])
    processor = Processor.from_pretrained(made["model"])
    prompts = rollouts.encode_prompts(processor, data_rl.load_prompt_rows(made["grpo"])[:2])
    gen, texts = rollouts.rollout(model, processor, prompts, 4, 5, temperature=1.0, seed=3)
    assert len(set(texts)) == 8
    gen = replace(gen, lengths=torch.tensor([5, 2, 4, 3, 1, 5, 3, 2]))  # as if some had ended: unequal lengths
    adv = train_grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0]), 4, "group")
    inputs = rollouts.completion_inputs(processor, prompts, gen, range(8), 4)
    policy = rollouts.CompletionLogprobs(model, 1.0)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    logp, _ = policy(*inputs)
    mask = inputs[2] != -100
    args = SimpleNamespace(importance_sampling_level="token", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0,
                           loss_type="grpo", gradient_accumulation_steps=1, max_completion_length=5)
    loss, _ = train_grpo.grpo_loss(logp, None, None, adv, mask, args)
    assert abs(float(loss)) < 1e-6  # the advantages of a group sum to 0: the loss value says nothing
    ours = torch.autograd.grad(loss, params)
    logp, _ = policy(*inputs)
    reinforce = -(adv * (logp * mask).sum(1) / mask.sum(1)).mean()
    theirs = torch.autograd.grad(reinforce, params)
    assert sum(float(g.abs().sum()) for g in ours) > 1e-3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def made3(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("demo3") / "demo_qwen3", family="qwen3_vl")


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_log_probs_are_the_samplers(made, made3, family):
    """The trainer's log-probs of sampled completions (hidden states at the completion positions, fused lm_head +
    log-softmax at the sampling temperature) against the logits of a plain forward: equal; and against the sampler's
    own log-probs: equal once the vision tokens, which the sampler never samples, are left out of the softmax."""
    paths = made if family == "qwen2_5_vl" else made3
    model = __import__("minivl").load(paths["model"])
    processor = Processor.from_pretrained(paths["model"])
    prompts = rollouts.encode_prompts(processor, data_rl.load_prompt_rows(paths["train"])[:3])
    gen, _ = rollouts.rollout(model, processor, prompts, 2, 6, temperature=0.7, seed=5)
    gen = replace(gen, lengths=torch.tensor([6, 3, 5, 6, 1, 4]))  # unequal lengths: padding inside the batch
    batch, starts, targets = rollouts.completion_inputs(processor, prompts, gen, range(6), 2)
    with torch.no_grad():
        ours, entropy = rollouts.CompletionLogprobs(model, 0.7)(batch, starts, targets)
        logits = model(**batch).float() / 0.7  # (B, T, V)
    mask = targets != -100
    for b in range(6):
        n = int(gen.lengths[b])
        z = logits[b, int(starts[b]) - 1:int(starts[b]) - 1 + n]  # (n, V): the positions predicting the completion
        full = z.log_softmax(-1).gather(1, targets[b, :n, None])[:, 0]
        torch.testing.assert_close(ours[b, :n], full, rtol=1e-5, atol=1e-5)
        p = z.softmax(-1)
        torch.testing.assert_close(entropy[b, :n], -(p * p.log()).sum(-1), rtol=1e-4, atol=1e-4)
        banned = z.index_fill(1, torch.tensor(sampler.vision_token_ids(model.cfg)), float("-inf"))
        support = banned.log_softmax(-1).gather(1, targets[b, :n, None])[:, 0]
        torch.testing.assert_close(gen.logprobs[b, :n], support, rtol=1e-5, atol=1e-5)
    assert (ours[~mask] == 0).all()


# ------------------------------------------------------------------------------- rewards, batches, options

def test_an_ms_swift_plugin_gets_the_solutions(made, tmp_path):
    calls = Path(str(made["plugin"]) + ".calls")
    calls.unlink(missing_ok=True)
    run(made, tmp_path, "--external_plugins", made["plugin"], "--reward_funcs", "random_reward", "--max_steps", 2,
        "--log_completions", "true")
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    solutions = [json.loads(line)["solution"] for line in made["grpo"].read_text().splitlines()]
    assert len(seen) == 2 and all(len(c["completions"]) == 8 for c in seen)
    for call in seen:  # each prompt's solution, once per completion of its group
        assert call["solution"][::4] == call["solution"][3::4] and set(call["solution"]) <= set(solutions)
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in lines] == [c for call in seen for c in call["completions"]]
    assert all(0.1 <= x["random_reward"] <= 1.0 and x["reward"] == x["random_reward"] for x in lines)
    assert [x["step"] for x in lines] == [1] * 8 + [2] * 8


@pytest.mark.parametrize("name, message", [
    ("boom", "reward function 'boom' raised KeyError: 'no such column'"),
    ("short", "reward function 'short' returned 7 rewards for 8 completions")])
def test_a_failing_reward_function_stops_the_run_by_name(made, tmp_path, name, message):
    """boom fails at its second call (step 2), short at once; the checkpoint of step 1 stays as it was saved."""
    with pytest.raises(rewards.RewardFunctionError, match=message):
        run(made, tmp_path, "--external_plugins", made["plugin"], "--reward_funcs", name, "--save_strategy",
            "steps", "--save_steps", 1)
    saved = sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name)
    assert saved == (["checkpoint-1"] if name == "boom" else [])
    if name == "boom":
        state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
        assert state["global_step"] == 1 and state["rounds"] == 1
        assert {"adapter_model.safetensors", "training_state.pt", "args.json"} <= {
            p.name for p in (tmp_path / "checkpoint-1").iterdir()}


@pytest.mark.parametrize("options, message", [
    (dict(generation_batch_size=12, per_device_train_batch_size=4),
     "--generation_batch_size 12 is not a multiple of --num_generations 8"),
    (dict(per_device_train_batch_size=3, gradient_accumulation_steps=2), "--generation_batch_size 6 is not a "
                                                                         "multiple of --num_generations 8"),
    (dict(generation_batch_size=10, per_device_train_batch_size=4), "not a multiple of --per_device_train_batch"),
    (dict(generation_batch_size=8, steps_per_generation=2), "give one"),
    (dict(num_generations=1, generation_batch_size=8), "2 or more"),
])
def test_a_round_is_whole_groups(options, message):
    args = train_grpo.parse_args(["--per_device_train_batch_size", "8"])
    for key, value in options.items():
        setattr(args, key, value)
    with pytest.raises(SystemExit, match=message):
        train_grpo.generation_plan(args, 1)


def test_batch_arithmetic_as_trl():
    args = train_grpo.parse_args(["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8"])
    assert train_grpo.generation_plan(args, 4) == (64, 8, 2)  # 64 completions = 8 prompts x 8, 2 per process
    args.generation_batch_size = 128
    assert train_grpo.generation_plan(args, 4) == (128, 16, 4)  # a round feeds two optimizer steps
    args.generation_batch_size, args.steps_per_generation = None, 4
    assert train_grpo.generation_plan(args, 1) == (8, 4, 1)
    args.steps_per_generation = None
    with pytest.raises(SystemExit, match="makes 2 groups for 4 processes"):
        train_grpo.generation_plan(SimpleNamespace(**{**vars(args), "gradient_accumulation_steps": 2}), 4)


def test_options_and_defaults(made, tmp_path, capsys):
    args = train_grpo.parse_args([])
    expected = dict(beta=0.04, loss_type="grpo", epsilon=0.2, epsilon_high=None, num_generations=8, temperature=0.9,
                    top_k=50, top_p=0.9, max_completion_length=512, scale_rewards="group", num_iterations=1,
                    importance_sampling_level="token", overlong_filter=False, rlhf_type="grpo")
    assert {k: getattr(args, k) for k in expected} == expected  # ms-swift's GRPO defaults
    assert train_grpo.parse_args(["--scale_rewards", "false"]).scale_rewards == "none"  # ms-swift < 3.10's bool
    with pytest.raises(SystemExit, match="--rlhf_type dpo: train_grpo.py runs GRPO; dpo is train_dpo.py"):
        train_grpo.parse_args(["--rlhf_type", "dpo"])
    with pytest.raises(SystemExit):
        train_grpo.parse_args(["--reward_model", "some/rm"])
    assert "minivl has no reward models" in capsys.readouterr().err
    run(made, tmp_path, "--max_steps", 1, "--use_vllm", "true", "--vllm_mode", "colocate",
        "--vllm_gpu_memory_utilization", "0.4", "--sleep_level", 1, "--offload_model", "--async_generate", "false")
    out = capsys.readouterr().out
    assert out.count("minivl samples with its own KV-cache sampler") == 1
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["beta"] == 0.04 and saved["epsilon"] == 0.2 and saved["loss_type"] == "grpo"
    assert "--vllm_gpu_memory_utilization" in saved["ignored_rollout_options"]
    entry = json.loads((tmp_path / "logging.jsonl").read_text().splitlines()[0])
    assert {"loss", "grad_norm", "reward", "reward_std", "rewards/random/mean", "rewards/random/std",
            "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
            "sampling/sampling_logp_difference/mean", "time/rollout", "time/train"} <= set(entry)


# ----------------------------------------------------------------------------------------- learning, resume

def sft(made, out, steps, lr):
    train_sft.main(["--model", str(made["model"]), "--dataset", str(made["train"]), "--train_type", "full",
                    "--freeze_vit", "false", "--freeze_aligner", "false", "--learning_rate", str(lr),
                    "--per_device_train_batch_size", "16", "--max_steps", str(steps), "--warmup_ratio", "0.05",
                    "--weight_decay", "0", "--gradient_checkpointing", "false", "--save_steps", str(steps),
                    "--logging_steps", "50", "--report_to", "none", "--output_dir", str(out)])
    return out / f"checkpoint-{steps}"


@pytest.fixture(scope="module")
def quick(made, tmp_path_factory):
    """The demo model after 30 SFT steps: it answers with a colour word and stops (right by chance only)."""
    return sft(made, tmp_path_factory.mktemp("quick"), 30, 2e-3)


@pytest.fixture(scope="module")
def warm(made, tmp_path_factory):
    """The demo model after 100 SFT steps (train_sft.py's demo settings): a colour, right about 40% of the time
    when sampled at temperature 1."""
    return sft(made, tmp_path_factory.mktemp("warm"), 100, 1e-3)


@pytest.mark.slow
def test_a_few_steps_raise_the_reward_on_the_demo_task(made, warm, tmp_path):
    """From the warm start, 40 steps of GRPO with the accuracy reward (8 prompts x 8 completions a step, the LLM
    trained in full) raise the held-out reward: the mean accuracy of 8 sampled answers to each of 64 test images."""
    run(made, tmp_path, "--model", warm, "--dataset", made["train"], "--val_dataset", f"{made['test']}#64",
        "--reward_funcs", "accuracy", "--train_type", "full", "--learning_rate", 5e-4, "--lr_scheduler_type",
        "constant", "--num_generations", 8, "--per_device_train_batch_size", 64, "--per_device_eval_batch_size", 64,
        "--top_k", 0, "--top_p", 1.0, "--beta", 0, "--max_steps", 40, "--eval_steps", 40, "--eval_on_start", "true")
    evals = [e["eval_reward"] for e in map(json.loads, (tmp_path / "logging.jsonl").read_text().splitlines())
             if "eval_reward" in e]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.05, evals


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_continues_with_the_same_next_loss(made, tmp_path, iterations):
    """4 steps saved after 2, and a run resumed from there: the same steps 3 and 4 (LoRA, KL to the base, the
    next rounds' prompts and seeds from the saved state). With 2 iterations a round spans 2 steps and step 2 ends
    one, so the resumed run starts a round too; its old log-probs come from a forward before the first update."""
    extra = ["--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2, "--num_iterations", iterations,
             "--external_plugins", made["plugin"], "--reward_funcs", "varied",
             "--beta", 0.1, "--lora_dropout", 0.1, "--gradient_accumulation_steps", 2,
             "--per_device_train_batch_size", 4]
    run(made, tmp_path / "a", *extra)
    run(made, tmp_path / "b", *extra, "--resume_from_checkpoint", tmp_path / "a" / "checkpoint-2")
    for key in ("loss", "grad_norm", "kl", "reward"):  # a round's rewards are logged at the step that made it
        a, b = by_step(tmp_path / "a", key), by_step(tmp_path / "b", key)
        assert len(a) == 4 // (iterations if key == "reward" else 1) and b == {s: a[s] for s in a if s > 2}, key
    assert logged(tmp_path / "a", "kl")[1] > 0  # the adapters moved away from the base: a KL to it


def test_resume_inside_a_round(made, tmp_path):
    """A round of 2 passes spans steps 1 and 2; resumed from step 1, the run samples that round's prompts again and
    trains only its second pass, so it ends where the uninterrupted run ends (rounds, data position)."""
    extra = ["--max_steps", 4, "--save_strategy", "steps", "--save_steps", 1, "--num_iterations", 2,
             "--log_completions", "true"]
    _, a = run(made, tmp_path / "a", *extra)
    _, b = run(made, tmp_path / "b", *extra, "--resume_from_checkpoint", tmp_path / "a" / "checkpoint-1")
    assert {k: b[k] for k in ("rounds", "epoch", "micro_batch", "global_step")} == {
        k: a[k] for k in ("rounds", "epoch", "micro_batch", "global_step")} and a["rounds"] == 2
    lines = {name: [json.loads(x) for x in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
             for name in ("a", "b")}
    assert [x["step"] for x in lines["a"]] == [1] * 8 + [3] * 8
    assert [x["step"] for x in lines["b"]] == [2] * 8 + [3] * 8  # the first round sampled again at step 2
    assert [x["prompt"] for x in lines["b"]] == [x["prompt"] for x in lines["a"]]


def test_the_users_grpo_command_runs_as_written(made, quick, tmp_path, monkeypatch):
    """ms-swift's `swift rlhf --rlhf_type grpo` command of the users' guide, `swift rlhf` replaced by
    `python train_grpo.py`, the model (the demo's after a short SFT, which stops its answers), data (2 prompts: 4
    steps over 2 epochs) and plugin the demo's."""
    monkeypatch.chdir(tmp_path)
    command = f"""
        --rlhf_type grpo --model {quick} --external_plugins {made['plugin']} --reward_funcs random_reward
        --use_vllm true --vllm_mode server --vllm_server_host 127.0.0.1 --vllm_server_port 9008 --train_type lora
        --torch_dtype bfloat16 --dataset {made['small']} --max_completion_length 4096 --num_train_epochs 2
        --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4
        --gradient_accumulation_steps 8 --save_strategy steps --eval_strategy steps --eval_steps 10 --save_steps 10
        --save_total_limit 2 --logging_steps 1 --output_dir output/grpo_output --warmup_ratio 0.01
        --num_generations 8 --generation_batch_size 8 --temperature 1.0 --log_completions true
        --async_generate true --beta 0.001"""
    model, state = train_grpo.main(command.split())
    out = tmp_path / "output" / "grpo_output"
    assert state["global_step"] == 4 and (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 8 and len(logged(out)) == 4
    assert all(0.1 <= r <= 1.0 for r in logged(out, "reward"))
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_qwen3_vl_demo(made3, tmp_path):
    run({"model": made3["model"], "grpo": made3["train"]}, tmp_path / "out", "--reward_funcs", "accuracy",
        "random", "--reward_weights", 1.0, 0.5, "--max_steps", 2, "--beta", 0.04)
    assert len(logged(tmp_path / "out")) == 2
    assert logged(tmp_path / "out", "rewards/random/mean")[0] > 0


@pytest.mark.slow
def test_two_processes(made, tmp_path):
    """Under torchrun with 2 CPU processes each samples its own group; rewards, advantages and completions are
    gathered over both."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = ["--model", made["model"], "--dataset", made["grpo"], "--output_dir", tmp_path, "--external_plugins",
            made["plugin"], "--reward_funcs", "varied", "--num_generations", 4, "--per_device_train_batch_size", 4,
            "--max_completion_length", 4, "--max_steps", 2, "--logging_steps", 1, "--report_to", "none",
            "--log_completions", "true", "--save_steps", 2, "--gradient_checkpointing", "false"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train_grpo.py"), *map(str, argv)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 8 and len({str(x["images"]) for x in lines[:8]}) == 2  # two groups a step
    rewards = [x["reward"] for x in lines[:8]]
    assert logged(tmp_path, "reward")[0] == pytest.approx(sum(rewards) / 8)
    for group in (lines[:4], lines[4:8]):  # advantages within each group, over the gathered rewards
        r = torch.tensor([x["reward"] for x in group])
        assert r.std() > 0
        assert [x["advantage"] for x in group] == pytest.approx(((r - r.mean()) / (r.std() + 1e-4)).tolist())
