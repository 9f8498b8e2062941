"""train_dpo.py: each loss against its formula, the LoRA reference (adapters off = the base model, so the first
loss is log 2), learning on the demo pairs, one vision pass per pair, RLHF-V-shaped parquet data with a
LLaMA-Factory YAML, exact resume, precomputed reference log-probs, ORPO / SimPO, the Qwen3-VL demo and clear
errors. The batch-split test (4 x 1, 2 x 2, two processes) is in tests/test_train_numerics.py.

Runs use 32 demo pairs and a handful of steps.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_data import png_bytes, write_parquet

import minivl
from minivl import data_rl, demo, lora, training
from minivl.processor import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The demo with its preference pairs, a 32-pair slice for training and 16 for eval."""
    paths = demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")
    pairs = demo.make_preference_pairs(paths)
    lines = pairs["train"].read_text().splitlines()
    small, val = pairs["train"].with_name("small.jsonl"), pairs["train"].with_name("val.jsonl")
    small.write_text("\n".join(lines[:32]) + "\n")
    val.write_text("\n".join(lines[32:48]) + "\n")
    return {**paths, **{f"dpo_{k}": v for k, v in pairs.items()}, "small": small, "val": val}


def run(made, out, *extra):
    argv = ["--model", made["model"], "--dataset", made["small"], "--output_dir", out,
            "--per_device_train_batch_size", 4, "--logging_steps", 1, "--report_to", "none",
            "--gradient_checkpointing", "false", "--warmup_ratio", 0, *extra]
    return train_dpo.main([str(a) for a in argv])


def logged(out, key="loss"):
    entries = [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]
    return [e[key] for e in entries if key in e]


def options(*argv):
    return train_dpo.parse_args(["--model", "m", "--dataset", "d", *map(str, argv)])


# ---------------------------------------------------------------------------------------------- the losses

# two pairs: summed answer log-probs and answer lengths of the chosen and rejected answers, and the reference's
CHOSEN, REJECTED, N_CHOSEN, N_REJECTED = [-6.0, -3.0], [-14.0, -2.0], [4, 2], [7, 1]
REF_CHOSEN, REF_REJECTED = [-7.0, -2.5], [-12.0, -2.5]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def by_hand(kind, loss_type, beta, eps, gamma):
    """Per pair: (loss, reward of the chosen answer, reward of the rejected one), written out with math."""
    out = []
    for c, r, nc, nr, rc, rr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, REF_CHOSEN, REF_REJECTED):
        if kind == "orpo":  # average log-probs p; log odds = log p - log(1 - p)
            a, b = c / nc, r / nr
            odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
            out.append((-beta * math.log(sigmoid(odds)), beta * a, beta * b))
        elif kind == "simpo":
            z = beta * (c / nc - r / nr) - gamma
            out.append((-(1 - eps) * math.log(sigmoid(z)) - eps * math.log(sigmoid(-z)), beta * c / nc, beta * r / nr))
        elif loss_type == "ipo":  # each side's log-ratio averaged over its own answer's tokens
            h = (c - rc) / nc - (r - rr) / nr
            out.append(((h - 1 / (2 * beta)) ** 2, beta * (c - rc) / nc, beta * (r - rr) / nr))
        else:
            h = (c - rc) - (r - rr)
            loss = {"sigmoid": -(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)),
                    "robust": (-(1 - eps) * math.log(sigmoid(beta * h)) + eps * math.log(sigmoid(-beta * h)))
                    / (1 - 2 * eps),
                    "hinge": max(0.0, 1 - beta * h)}[loss_type]
            out.append((loss, beta * (c - rc), beta * (r - rr)))
    return out


@pytest.mark.parametrize("argv", [
    ["--loss_type", "sigmoid"], ["--loss_type", "sigmoid", "--label_smoothing", 0.2],
    ["--loss_type", "robust", "--label_smoothing", 0.1], ["--loss_type", "hinge", "--beta", 0.3],
    ["--loss_type", "ipo", "--beta", 0.5], ["--rlhf_type", "orpo", "--beta", 0.2],
    ["--rlhf_type", "simpo", "--label_smoothing", 0.1], ["--loss_type", "sigmoid", "--rpo_alpha", 0.5],
    ["--rlhf_type", "simpo", "--cpo_alpha", 0.0, "--simpo_gamma", 0.5],
], ids=lambda argv: "_".join(map(str, argv)).replace("--", ""))
def test_each_loss_equals_its_formula(argv):
    """pair_step on fixed answer log-probs (a stand-in forward) against the formulas computed with math: the
    losses, the rewards, and the NLL of the chosen answers (a mean over their tokens) with its weight."""
    args = options(*argv)
    sums, counts = torch.tensor(CHOSEN + REJECTED, dtype=torch.float64), torch.tensor(N_CHOSEN + N_REJECTED)
    logit_sums = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ref = torch.tensor(REF_CHOSEN + REF_REJECTED, dtype=torch.float64)
    losses, chosen_logp, metrics = train_dpo.pair_step(lambda **batch: (sums, counts, logit_sums), lambda b: ref,
                                                       {"index": torch.arange(2)}, args)
    expected = by_hand(args.rlhf_type, args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma)
    assert losses.tolist() == pytest.approx([e[0] for e in expected], rel=1e-12)
    mean = {k: float(v[0] / v[1]) for k, v in metrics.items()}
    assert mean["rewards/chosen"] == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-12)
    assert mean["rewards/rejected"] == pytest.approx(sum(e[2] for e in expected) / 2, rel=1e-12)
    assert mean["rewards/margins"] == pytest.approx(sum(e[1] - e[2] for e in expected) / 2, rel=1e-12)
    assert mean["rewards/accuracies"] == sum(e[1] > e[2] for e in expected) / 2
    assert mean["logits/chosen"] == pytest.approx(3 / 6) and mean["logits/rejected"] == pytest.approx(7 / 8)
    nll = -sum(CHOSEN) / sum(N_CHOSEN)                                   # every chosen token weighs the same
    assert mean["nll_loss"] == pytest.approx(nll) and float(chosen_logp) == sum(CHOSEN)


def test_ms_swift_defaults():
    assert (options().beta, options("--rlhf_type", "orpo").beta, options("--rlhf_type", "simpo").beta) == (0.1, 0.1, 2)
    args = options("--rlhf_type", "simpo")
    assert (args.simpo_gamma, args.cpo_alpha, args.label_smoothing, args.rpo_alpha) == (1.0, 1.0, 0.0, None)


# ---------------------------------------------------------------------------------- the model and a pair

def test_the_image_of_a_pair_is_encoded_once(made):
    """A batch of 2 pairs (one with its own rejected image) runs the vision tower once on 3 images, and each row's
    answer log-prob equals that row encoded and run on its own (positions and features placed right)."""
    model = minivl.load(made["model"])
    processor = minivl.Processor.from_pretrained(made["model"])
    rows = data_rl.load_preference_rows([made["small"]])[:2]
    rows[1].rejected_images = rows[0].images                             # ms-swift's rejected_images
    dataset = train_dpo.PairDataset(rows, processor)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 3 and batch["image_index"].tolist() == [0, 1, 0, 2]
    calls = []
    model.model.visual.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    module = train_dpo.AnswerLogprobs(model, torch.float32)
    with torch.no_grad():
        sums, counts, logit_sums = module(**{k: v for k, v in batch.items() if k not in ("index", "num_dropped")})
    assert calls == [3 * 16]                                             # one pass, 3 images of 16 patches
    for j, (row, conversation, images) in enumerate(
            [(r, r.chosen_conversation, r.images) for r in rows]
            + [(r, r.rejected_conversation, r.rejected_images or r.images) for r in rows]):
        alone = processor([conversation], images=[images], return_labels=True)
        with torch.no_grad():
            s, n, _ = module(**alone)
            logits = model(**{k: v for k, v in alone.items() if k != "labels"})[0]   # (T, V)
        assert int(n) == int(counts[j]) and float(s) == pytest.approx(float(sums[j]), abs=1e-5), j
        # trl's logits/*: the logits at the positions predicting answer tokens, averaged over the vocabulary
        answer = alone["labels"][0, 1:] != IGNORE_INDEX
        assert float(logit_sums[j]) == pytest.approx(float(logits[:-1][answer].mean(-1).sum()), abs=1e-5), j


def test_a_pairs_video_is_encoded_once(made):
    """A pair about a video (two frames): one video in the batch, placed in both rows, and each row's answer
    log-prob equal to that row run on its own (Qwen2.5's second_per_grid_ts follows the video)."""
    model = minivl.load(made["model"])
    processor = minivl.Processor.from_pretrained(made["model"])
    frames = [json.loads(line)["images"][0] for line in made["small"].read_text().splitlines()[:2]]
    record = {"messages": [{"role": "user", "content": "<video>What colour is the shape?"},
                           {"role": "assistant", "content": "red"}], "rejected_response": "blue", "videos": [frames]}
    row = data_rl.make_preference_row(record, str(made["small"].parent), "row")
    dataset = train_dpo.PairDataset([row], processor)
    batch = dataset.collate([dataset[0]])
    assert len(batch["video_grid_thw"]) == len(batch["second_per_grid_ts"]) == 1
    assert batch["video_index"].tolist() == [0, 0]
    module = train_dpo.AnswerLogprobs(model, torch.float32)
    with torch.no_grad():
        sums, _, _ = module(**{k: v for k, v in batch.items() if k not in ("index", "num_dropped")})
        for j, conversation in enumerate((row.chosen_conversation, row.rejected_conversation)):
            alone = processor([conversation], videos=[row.videos], return_labels=True)
            assert float(module(**alone)[0]) == pytest.approx(float(sums[j]), abs=1e-5), j


def test_only_the_final_answer_is_scored(made):
    """A prompt with an earlier assistant turn: its tokens are context, the labels cover the last answer only."""
    processor = minivl.Processor.from_pretrained(made["model"])
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                           {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}],
              "rejected_response": "blue"}
    rows = [data_rl.make_preference_row(record, ".", "row")]
    _, chosen, rejected = train_dpo.PairDataset(rows, processor)[0]
    for sample, answer in ((chosen, "red"), (rejected, "blue")):
        labels = sample["labels"]
        assert processor.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False) == answer + "<|im_end|>"


def test_adapters_off_give_exactly_the_base_models_logprobs(made):
    processor = minivl.Processor.from_pretrained(made["model"])
    rows = data_rl.load_preference_rows([made["small"]])[:2]
    dataset = train_dpo.PairDataset(rows, processor)
    batch = {k: v for k, v in dataset.collate([dataset[0], dataset[1]]).items() if k not in ("index", "num_dropped")}
    base = train_dpo.AnswerLogprobs(minivl.load(made["model"]), torch.float32)
    model = minivl.load(made["model"])
    lora.inject(model, lora.select_linear(model, ("llm", "vit")), r=4, alpha=8, init_weights=False)  # B random
    tuned = train_dpo.AnswerLogprobs(model, torch.float32)
    with torch.no_grad():
        expected = base(**batch)
        with lora.disabled(model):
            off = tuned(**batch)
        on = tuned(**batch)
    assert all(torch.equal(a, b) for a, b in zip(off, expected))
    assert not torch.allclose(on[0], expected[0])                        # the adapters do change the model


# ------------------------------------------------------------------------------------------------ training

def test_a_lora_run_starts_at_log_2(made, tmp_path, monkeypatch):
    """At step 0 the LoRA policy is its reference (B = 0, the adapters off): the sigmoid loss is log 2, the rewards
    and margins 0, and the accuracy 0 (a tie counts 0, as in trl). The progress bar shows the accuracy."""
    bar = []
    monkeypatch.setattr(training.Progress, "update", lambda self, step, loss=None, values=None: bar.append(values))
    run(made, tmp_path, "--train_type", "lora", "--freeze_vit", "false", "--max_steps", 2, "--learning_rate", 2e-2,
        "--beta", 0.5, "--lora_dropout", 0.1)
    entries = [json.loads(line) for line in (tmp_path / "logging.jsonl").read_text().splitlines()]
    first = entries[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) == first["rewards/rejected"]
    assert first["rewards/accuracies"] == 0.0
    assert {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "num_tokens"} <= set(first) and "nll_loss" not in first
    assert first["grad_norm"] > 0 and entries[1]["rewards/margins"] != 0    # the step moved the policy off it
    assert bar == [{"rewards/accuracies": 0.0}, {"rewards/accuracies": entries[1]["rewards/accuracies"]}]


def test_full_training_raises_held_out_accuracy_and_margin(made, tmp_path):
    """The demo's settings (full training, a frozen copy as the reference) at a constant learning rate, 60 steps:
    the held-out pairs' rewards/accuracies and margin rise well above a tie (0.5 and 0 need no image)."""
    val = made["dpo_test"].with_name("test64.jsonl")
    val.write_text("\n".join(made["dpo_test"].read_text().splitlines()[:64]) + "\n")
    run(made, tmp_path, "--dataset", made["dpo_train"], "--val_dataset", val, "--train_type", "full",
        "--freeze_vit", "false", "--freeze_aligner", "false", "--learning_rate", 1e-3, "--beta", 0.5,
        "--lr_scheduler_type", "constant", "--weight_decay", 0, "--per_device_train_batch_size", 16,
        "--max_steps", 60, "--eval_steps", 60, "--save_strategy", "no", "--logging_steps", 20)
    accuracy, margin = logged(tmp_path, "eval_rewards/accuracies")[-1], logged(tmp_path, "eval_rewards/margins")[-1]
    assert accuracy >= 0.7 and margin > 0.5, (accuracy, margin)


@pytest.mark.parametrize("mode", ["lora", "full_precomputed"])
def test_resume_gives_the_same_next_losses(made, tmp_path, mode):
    extra = ["--max_steps", 5, "--save_steps", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-2,
             "--per_device_train_batch_size", 2, "--lora_dropout", 0.1]
    extra += ["--train_type", "full", "--precompute_ref_log_probs", "true"] if mode != "lora" else []
    run(made, tmp_path / "a", *extra)
    run(made, tmp_path / "b", *extra, "--resume_from_checkpoint", tmp_path / "a" / "checkpoint-2")
    assert logged(tmp_path / "b") == logged(tmp_path / "a")[2:]
    assert logged(tmp_path / "b", "rewards/margins") == logged(tmp_path / "a", "rewards/margins")[2:]


def test_precomputed_reference_log_probs_equal_the_live_reference(made, tmp_path):
    for name, extra in (("live", []), ("pre", ["--precompute_ref_log_probs", "true"])):
        run(made, tmp_path / name, "--max_steps", 3, "--learning_rate", 1e-2, "--lora_dropout", 0, *extra,
            "--val_dataset", made["val"], "--eval_steps", 3, "--per_device_eval_batch_size", 3)
    for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
        assert logged(tmp_path / "pre", key) == pytest.approx(logged(tmp_path / "live", key), abs=1e-5), key


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_orpo_and_simpo_train_without_a_reference(made, tmp_path, kind, monkeypatch):
    monkeypatch.setattr(lora, "disabled", lambda model: pytest.fail("no reference in " + kind))
    run(made, tmp_path, "--rlhf_type", kind, "--max_steps", 8, "--learning_rate", 2e-2)
    losses, nll = logged(tmp_path), logged(tmp_path, "nll_loss")
    assert len(nll) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses  # both hold the chosen answers' NLL


def test_rlhf_v_parquet_and_a_llamafactory_yaml(made, tmp_path, capsys):
    """RLHF-V's shape (sharegpt ranking, images as bytes in parquet) named in a dataset_info.json, trained by a
    LLaMA-Factory LoRA DPO config as its examples write it."""
    from test_training import write_yaml
    images = [png_bytes(colour) for colour in ((220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 200, 30))]
    records = [{"conversations": [{"from": "human", "value": "<image>What colour is the shape?"}],
                "chosen": {"from": "gpt", "value": name}, "rejected": {"from": "gpt", "value": wrong},
                "images": [{"bytes": image}]}
               for image, name, wrong in zip(images * 4, ["red", "blue", "green", "yellow"] * 4,
                                             ["blue", "green", "yellow", "red"] * 4)]
    write_parquet(tmp_path / "data" / "rlhf-v.parquet", records)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"rlhf_v": {
        "file_name": "rlhf-v.parquet", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    config = write_yaml(tmp_path / "dpo.yaml", model_name_or_path=str(made["model"]), trust_remote_code=True,
                        stage="dpo", do_train=True, finetuning_type="lora", lora_rank=8, lora_target="all",
                        pref_beta=0.5, pref_loss="sigmoid", pref_ftx=0.1, dataset="rlhf_v",
                        dataset_dir=str(tmp_path / "data"), template="qwen2_vl", cutoff_len=128, max_samples=16,
                        overwrite_cache=True, preprocessing_num_workers=4, output_dir=str(tmp_path / "out"),
                        logging_steps=1, save_steps=4, plot_loss=True, overwrite_output_dir=True,
                        report_to="none", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        learning_rate=2e-2, max_steps=4, lr_scheduler_type="cosine", warmup_ratio=0.0, bf16=False,
                        val_size=4, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=4,
                        disable_gradient_checkpointing=True)
    model, state = train_dpo.main([str(config)])
    out = capsys.readouterr().out
    assert "runs as: python train_dpo.py --train_type lora" in out and "--rlhf_type dpo --loss_type sigmoid" in out
    assert "data: 12 train pairs, 4 eval pairs" in out and "0 of 12 training pairs left out" in out
    first = json.loads((tmp_path / "out" / "logging.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2) + 0.1 * first["nll_loss"], rel=1e-6)  # pref_ftx 0.1
    assert state["global_step"] == 4
    assert logged(tmp_path / "out", "eval_rewards/accuracies")
    assert (tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    if training.importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "training_rewards_accuracies.png").is_file()
    else:
        assert "--plot_loss needs matplotlib" in out


def test_the_qwen3_demo_runs(tmp_path):
    """`python train_dpo.py --model <the Qwen3-VL demo's model>`: the demo's pairs on that model."""
    paths = demo.make_demo(tmp_path / "demo_qwen3", family="qwen3_vl")
    model, state = train_dpo.main(["--model", str(paths["model"]), "--max_steps", "3", "--eval_steps", "3",
                                   "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert model.cfg.model_type == "qwen3_vl" and state["global_step"] == 3
    assert (paths["train"].with_name("dpo_train.jsonl")).is_file() and logged(tmp_path / "out", "eval_loss")


# ------------------------------------------------------------------------------------------------ mistakes

def test_bad_input_is_a_clear_error(made, tmp_path):
    from test_training import write_yaml
    image = json.loads(made["small"].read_text().splitlines()[0])["images"][0]
    folder = made["small"].parent

    def bad_data(record, error, message):
        path = folder / "bad.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(error, match=message):
            run(made, tmp_path / "bad", "--dataset", path, "--max_steps", 1)

    prompt = [{"role": "user", "content": "<image>What colour is the shape?"}]
    bad_data({"messages": prompt + [{"role": "assistant", "content": "red"}], "rejected_response": " ",
              "images": [image]}, ValueError, r"bad\.jsonl:1: the rejected answer is empty")
    bad_data({"messages": prompt + [{"role": "assistant", "content": "red"}], "rejected_response": "blue",
              "images": ["images/nowhere.png"]}, FileNotFoundError, r"bad\.jsonl:1: image file not found")

    def refused(*argv):
        with pytest.raises(SystemExit) as e:
            train_dpo.main([str(a) for a in argv])
        return str(e.value)

    yaml = dict(model_name_or_path=str(made["model"]), stage="dpo", dataset="x", output_dir=str(tmp_path / "y"))
    assert "pref_betta: not a key minivl supports (did you mean pref_beta?)" in refused(
        write_yaml(tmp_path / "a.yaml", **yaml, pref_betta=0.1))
    assert "stage: ppo (PPO with a reward model) is not implemented" in refused(
        write_yaml(tmp_path / "b.yaml", **{**yaml, "stage": "ppo"}))
    assert "stage: sft is run by train_sft.py, not train_dpo.py" in refused(
        write_yaml(tmp_path / "c.yaml", **{**yaml, "stage": "sft"}))

    def bad_option(*argv):
        with pytest.raises(SystemExit) as e:
            options(*argv)
        return str(e.value)

    assert "--rlhf_type grpo: GRPO is train_grpo.py" in bad_option("--rlhf_type", "grpo")
    assert "--rlhf_type kto: KTO is not implemented in minivl; train_dpo.py runs dpo, orpo, simpo" in bad_option(
        "--rlhf_type", "kto")
    assert "--label_smoothing 0.1: in [0, 0.5), for dpo's sigmoid / robust or simpo" in bad_option(
        "--loss_type", "hinge", "--label_smoothing", 0.1)
    assert "--rlhf_type orpo has no reference model" in bad_option("--rlhf_type", "orpo", "--reference_free")
    with pytest.raises(SystemExit):                                       # argparse names the choices
        options("--loss_type", "exo_pair")
    # a LoRA run that trains the vision tower in full has no base copy of it to switch back to
    assert "add --precompute_ref_log_probs true" in refused(
        "--model", made["model"], "--dataset", made["small"], "--train_type", "lora_llm", "--freeze_vit", "false",
        "--output_dir", tmp_path / "z", "--report_to", "none")
    assert "nothing to train on: no pair fits --max_length 20" in refused(
        "--model", made["model"], "--dataset", made["small"], "--max_length", 20, "--output_dir", tmp_path / "w",
        "--report_to", "none")
    assert not (tmp_path / "y").exists()
