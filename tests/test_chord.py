"""CHORD in train_grpo.py (--chord_sft_dataset): mu's schedule, the phi weights and the mixed loss against hand
computations, the expert stream over both row formats, no SFT forward at mu = 0, mu logged each step, exact resume
of the expert stream, the option errors, and the users' ms-swift CHORD command on the demo.
"""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from minivl import chord, training
from minivl.processor import Processor
from test_grpo import by_step, made, quick, run  # noqa: F401 (the fixtures and helpers of the GRPO tests)

import train_grpo  # noqa: E402 (test_grpo puts the repository root on sys.path)
import train_sft  # noqa: E402

MU = ["--chord_mu_warmup_steps", 0, "--chord_mu_decay_steps", 0, "--chord_mu_peak", 0.5, "--chord_mu_valley", 0.5]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def experts(made):
    """Three expert rows beside the demo's images, one in each format users bring: ms-swift SFT `messages` ending
    with the answer, GRPO `messages` with the user turn and `solution`, and the query / solution format."""
    rows = [json.loads(line) for line in made["train"].read_text().splitlines()][:3]
    return write_jsonl(made["train"].parent / "experts.jsonl", [
        {"messages": [{"role": "user", "content": rows[0]["query"]},
                      {"role": "assistant", "content": rows[0]["response"]}], "images": rows[0]["images"]},
        {"messages": [{"role": "user", "content": rows[1]["query"]}], "solution": rows[1]["response"],
         "images": rows[1]["images"]},
        {"query": rows[2]["query"], "solution": rows[2]["response"], "images": rows[2]["images"]}])


# ------------------------------------------------------------------------------------------- the formulas

def close(tensor, expected):
    torch.testing.assert_close(tensor, torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_mu_at_chosen_steps():
    """ms-swift's schedule: W = 4 warmup steps from 0 to the peak, D = 8 steps of cosine decay, then the valley."""
    mu = [chord.mu_at(s, peak=0.9, valley=0.05, warmup=4, decay=8) for s in (0, 1, 2, 4, 6, 8, 10, 12, 13, 500)]
    # by hand: 0.9 s / 4 below step 4; 0.05 + 0.85 (1 + cos(pi (s - 4) / 8)) / 2 from step 4 to 11; 0.05 after
    c = (1 + math.sqrt(0.5)) / 2  # (1 + cos(pi / 4)) / 2
    expected = [0.0, 0.225, 0.45, 0.9, 0.05 + 0.85 * c, 0.475, 0.05 + 0.85 * (1 - c), 0.05, 0.05, 0.05]
    assert mu == pytest.approx(expected, abs=1e-12)
    # the users' schedule: no warmup, the peak at step 0, halfway down at step 100 of 200
    assert [chord.mu_at(s, 0.9, 0.05, 0, 200) for s in (0, 100, 200)] == pytest.approx([0.9, 0.475, 0.05])
    # peak = valley: a constant mu, whatever the decay
    assert {chord.mu_at(s, 0.1, 0.1, 0, d) for s in range(0, 30, 7) for d in (0, 5, 50)} == {0.1}


def test_phi_weights_and_the_sft_term_by_hand():
    p = torch.tensor([[0.5, 0.9, 0.2, 0.7], [0.1, 0.6, 0.3, 0.3]], dtype=torch.float64)
    labelled = torch.tensor([[True, True, True, False], [True, True, False, False]])  # N = 5 label tokens
    logp = p.log().requires_grad_(True)
    phi = chord.phi_weights(logp)
    close(phi, [[0.25, 0.09, 0.16, 0.21], [0.09, 0.24, 0.21, 0.21]])
    assert not phi.requires_grad  # detached: no gradient through the weights
    terms = [(0.5, 0.25), (0.9, 0.09), (0.2, 0.16), (0.1, 0.09), (0.6, 0.24)]  # (p, phi) of the label tokens
    plain = chord.sft_loss(logp, labelled)
    assert float(plain.detach()) == pytest.approx(-sum(math.log(q) for q, _ in terms) / 5, rel=1e-12)
    weighted = chord.sft_loss(logp, labelled, phi=True)
    assert float(weighted.detach()) == pytest.approx(-sum(w * math.log(q) for q, w in terms) / 5, rel=1e-12)
    # d L / d log p_t = -phi_t / N on label tokens, 0 elsewhere: phi is a constant of the gradient
    grad, = torch.autograd.grad(weighted, logp)
    close(grad, -phi * labelled / 5)


def test_the_mixed_loss_on_fixed_tensors():
    """L = (1 - mu) L_GRPO + mu L_SFT, each a 1 / accum share of the step: its value and its gradients with respect
    to the policy's log-probs of the completions and to the expert tokens' log-probs."""
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    expert_logp = torch.tensor([[-0.2, -1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    labelled = torch.tensor([[True, True, False]])
    args = SimpleNamespace(importance_sampling_level="token", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0,
                           loss_type="grpo", gradient_accumulation_steps=2, max_completion_length=3)
    grpo, _ = train_grpo.grpo_loss(logp, None, None, adv, mask, args)
    loss = train_grpo.chord_loss(grpo, chord.sft_loss(expert_logp, labelled), mu=0.3, accum=2)
    # by hand: the GRPO value is -(1/2)(1.5 - 0.5) / 2 = -0.25 (ratio 1); the SFT term (0.2 + 1.0) / 2 = 0.6
    assert float(loss.detach()) == pytest.approx(0.7 * -0.25 + 0.3 * 0.6 / 2, rel=1e-12)
    g_policy, g_expert = torch.autograd.grad(loss, (logp, expert_logp))
    # d/d log pi(y_it) = -0.7 A_i / (|y_i| B accum); d/d log p_t = -0.3 / (N accum) on the expert's label tokens
    close(g_policy, [[-0.7 * 1.5 / 12] * 3, [0.7 * 0.5 / 8] * 2 + [0.0]])
    close(g_expert, [[-0.3 / 4, -0.3 / 4, 0.0]])


# ------------------------------------------------------------------------------------------ expert data

def expert_args(path, *extra):
    return train_grpo.parse_args(["--chord_sft_dataset", str(path), *map(str, MU), *map(str, extra)])


def test_the_expert_stream_of_both_formats_cycles(made, experts):
    """Batches of 2 of the 3 rows (each format once): every row once an epoch, its answer (the `solution` of a GRPO
    row) the only labelled text, epoch after epoch, the position in state["expert"]."""
    processor = Processor.from_pretrained(made["model"])
    answers = [json.loads(line)["response"] for line in made["train"].read_text().splitlines()][:3]
    state = {}
    stream = chord.expert_batches(expert_args(experts, "--chord_sft_per_device_train_batch_size", 2), processor,
                                  training.Process(torch.device("cpu"), torch.float32), state)
    seen = []
    for _ in range(6):  # three epochs of a batch of 2 and a batch of 1
        batch, weight = next(stream)
        assert weight == 1.0
        seen.append(sorted(processor.decode(ids[labels != -100], skip_special_tokens=False)
                           for ids, labels in zip(batch["input_ids"], batch["labels"])))
    for epoch in range(3):
        assert sorted(seen[2 * epoch] + seen[2 * epoch + 1]) == sorted(a + "<|im_end|>" for a in answers)
    assert [len(s) for s in seen] == [2, 1] * 3
    assert state["expert"]["epoch"] == 3 and state["expert"]["micro_batch"] == 0


def test_options_and_data_errors(made, experts, tmp_path):
    with pytest.raises(SystemExit, match="--chord_sft_dataset names no data set"):
        train_grpo.parse_args(["--chord_sft_dataset", *map(str, MU)])
    with pytest.raises(SystemExit, match="needs --chord_mu_warmup_steps, --chord_mu_decay_steps, --chord_mu_vall"):
        train_grpo.parse_args(["--chord_sft_dataset", str(experts), "--chord_mu_peak", "0.9"])
    with pytest.raises(SystemExit, match="give --chord_sft_dataset too"):
        train_grpo.parse_args(["--chord_mu_peak", "0.9"])
    with pytest.raises(SystemExit, match=r"mu in \[0, 1\]"):
        expert_args(experts, "--chord_mu_valley", 1.5)
    processor, proc = Processor.from_pretrained(made["model"]), training.Process(torch.device("cpu"), torch.float32)
    with pytest.raises(SystemExit, match="--chord_sft_dataset: dataset file not found: .*nowhere.jsonl"):
        chord.expert_batches(expert_args(tmp_path / "nowhere.jsonl"), processor, proc, {})
    with pytest.raises(SystemExit, match="--chord_sft_dataset: none of its 3 rows keeps an answer under --max_len"):
        chord.expert_batches(expert_args(experts, "--max_length", 8), processor, proc, {})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="--chord_sft_dataset: dataset .*empty.jsonl is empty"):  # in the trainer
        run(made, tmp_path / "out", "--chord_sft_dataset", tmp_path / "empty.jsonl", *MU)


# ------------------------------------------------------------------------------------------- the trainer

def test_no_sft_forward_at_mu_0_and_mu_logged_each_step(made, experts, tmp_path, monkeypatch):
    """The expert forwards counted: none while mu is 0; one a micro-step after (2 a step). The logged loss is the
    mix, mu L_SFT here (the GRPO term's value is 0: one pass, beta 0, a micro-batch of whole groups)."""
    forwards = []
    forward = train_sft.TokenLogprobs.forward
    monkeypatch.setattr(train_sft.TokenLogprobs, "forward", lambda self, **kw: forwards.append(1) or forward(
        self, **kw))
    extra = ["--chord_sft_dataset", experts, "--chord_sft_per_device_train_batch_size", 2, "--beta", 0,
             "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_steps", 3]
    _, state = run(made, tmp_path / "zero", *extra, *MU[:4], "--chord_mu_peak", 0, "--chord_mu_valley", 0)
    assert forwards == [] and state["expert"]["micro_batch"] == 0
    assert by_step(tmp_path / "zero", "mu") == {1: 0.0, 2: 0.0, 3: 0.0}
    # warmup 2 to a constant 0.5: mu = 0, 0.25, 0.5 at steps 1, 2, 3
    _, state = run(made, tmp_path / "rise", *extra, "--chord_mu_warmup_steps", 2, *MU[2:])
    assert len(forwards) == 4 and by_step(tmp_path / "rise", "mu") == {1: 0.0, 2: 0.25, 3: 0.5}
    loss, sft = by_step(tmp_path / "rise", "loss"), by_step(tmp_path / "rise", "expert/sft_loss")
    assert 1 not in sft and sft[2] > 1 and loss[1] == pytest.approx(0, abs=1e-6)
    assert [loss[2], loss[3]] == pytest.approx([0.25 * sft[2], 0.5 * sft[3]], rel=1e-5)


def test_resume_continues_the_expert_stream(made, experts, tmp_path):
    """4 steps saved after 2 and a run resumed there: the same steps 3 and 4, the expert batches included (3 rows in
    batches of 2 wrap into a new epoch inside the run); the phi weights on."""
    extra = ["--chord_sft_dataset", experts, "--chord_sft_per_device_train_batch_size", 2, *MU, "--max_steps", 4,
             "--chord_enable_phi_function", "true",
             "--save_strategy", "steps", "--save_steps", 2, "--per_device_train_batch_size", 4,
             "--gradient_accumulation_steps", 2, "--external_plugins", made["plugin"], "--reward_funcs", "varied"]
    _, a = run(made, tmp_path / "a", *extra)
    _, b = run(made, tmp_path / "b", *extra, "--resume_from_checkpoint", tmp_path / "a" / "checkpoint-2")
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["expert"]["epoch"] == 2  # 4 expert batches: two epochs of 3 rows done
    assert a["expert"] == b["expert"] and a["expert"]["epoch"] == 4
    for key in ("loss", "expert/sft_loss", "grad_norm"):
        first, resumed = by_step(tmp_path / "a", key), by_step(tmp_path / "b", key)
        assert resumed == {s: first[s] for s in (3, 4)}, key
    # phi: a token's term -p (1 - p) log p is at most 0.26, where the untrained model's -log p is about 6
    assert all(0 < x < 0.27 for x in by_step(tmp_path / "a", "expert/sft_loss").values())


def test_the_users_chord_command_runs_as_written(made, quick, experts, tmp_path, monkeypatch):
    """ms-swift's CHORD command of the users' guide with `swift rlhf` replaced by `python train_grpo.py`: the
    model the demo's after a short SFT (which stops its answers), --dataset one SFT-format row (4 epochs: 4 steps),
    --chord_sft_dataset the three expert rows, the plugin the guide's RandomReward.py in the working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(made["plugin"], tmp_path / "RandomReward.py")
    first = json.loads(made["train"].read_text().splitlines()[5])
    dataset = write_jsonl(made["train"].parent / "sft_one.jsonl", [
        {"messages": [{"role": "user", "content": first["query"]},
                      {"role": "assistant", "content": first["response"]}], "images": first["images"]}])
    command = f"""
        --rlhf_type grpo --model {quick} --dataset {dataset} --torch_dtype bfloat16 --beta 0.0
        --num_train_epochs 4 --per_device_train_batch_size 1 --gradient_accumulation_steps 8
        --chord_sft_per_device_train_batch_size 1 --chord_sft_dataset {experts}
        --chord_enable_phi_function false --chord_mu_warmup_steps 0 --chord_mu_decay_steps 200
        --chord_mu_peak 0.9 --chord_mu_valley 0.05 --num_generations 8 --train_type lora --lorap_lr_ratio 10
        --freeze_vit true --freeze_llm false --external_plugins RandomReward.py --reward_funcs random_reward
        --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.4 --vllm_max_model_len 8192
        --max_completion_length 4096 --overlong_filter true --offload_optimizer true --offload_model true
        --sleep_level 1
        --save_steps 20 --learning_rate 1e-6 --save_total_limit 2 --logging_steps 1 --warmup_ratio 0.05
        --log_completions true"""
    model, state = train_grpo.main(command.split())
    out = tmp_path / "output"
    assert state["global_step"] == 4 and (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert list(by_step(out, "mu").values()) == pytest.approx([chord.mu_at(s, 0.9, 0.05, 0, 200) for s in range(4)])
    assert all(x > 0 for x in by_step(out, "expert/sft_loss").values())
    assert state["expert"]["micro_batch"] + 3 * state["expert"]["epoch"] == 4 * 8  # one expert row a micro-step
    assert len((out / "completions.jsonl").read_text().splitlines()) == 4 * 8
    assert model.lm_head.weight.dtype == torch.bfloat16
