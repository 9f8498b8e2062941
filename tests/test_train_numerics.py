"""The trainers' numbers: the loss against an independent cross-entropy, the loss and gradient however the batch
is split, the optimizer's parameter groups, the learning-rate schedules, rsLoRA.

Runs use four rows whose answers have 2, 5, 8 and 52 label tokens, so that any split of the batch gives
micro-batches (and GPUs) with different label counts: a loss divided per micro-batch shows in the gradient.
"""

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minivl
from minivl import data, demo, lora, training
from minivl.processor import IGNORE_INDEX
from minivl.text import RMSNorm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402

ANSWERS = ["red", "It is blue.", "The shape is a green circle.",
           "The quick brown fox jumps over the lazy dog. The shape is a yellow triangle, 10 8 6 4 2 0 px from the "
           "corner."]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """The demo of each family, made on first use, with uneven.jsonl (the four rows above) beside its data."""
    made = {}

    def get(family=demo.FAMILIES[0]):
        if family not in made:
            paths = demo.make_demo(tmp_path_factory.mktemp(family) / "demo_data", family=family)
            images = [json.loads(line)["images"] for line in paths["train"].read_text().splitlines()[:4]]
            rows = [{"query": f"<image>{demo.QUESTION}", "response": a, "images": i}
                    for a, i in zip(ANSWERS, images)]
            paths["uneven"] = paths["train"].with_name("uneven.jsonl")   # beside train.jsonl: image paths hold
            paths["uneven"].write_text("".join(json.dumps(r) + "\n" for r in rows))
            made[family] = paths
        return made[family]
    return get


def logged(out):
    """The training entries (those with a loss) of a run's logging.jsonl."""
    lines = (Path(out) / "logging.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "loss" in e]


def run(script, argv, world=1):
    """One run of a trainer script: in this process, or under torchrun with `world` CPU processes (gloo)."""
    argv = [str(a) for a in argv]
    if world == 1:
        return importlib.import_module(Path(script).stem).main(argv)
    # the checkout on PYTHONPATH: the processes import this minivl, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIVL_KERNELS": "reference",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(ROOT / script), *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------- batch-split invariance

@dataclass
class Trainer:
    """A trainer in the batch-split test: its script, the options naming a data file of rows with answers of
    unequal lengths (made by `data`), and what else its runs need. The runs share --model, --output_dir,
    --per_device_train_batch_size, --gradient_accumulation_steps, --max_steps and the logging options."""
    script: str
    data: callable      # demo paths -> options
    options: list
    splits: list = None  # (processes, batch per process, accumulation steps) runs; default SPLITS


def sft_data(paths):
    return ["--dataset", paths["uneven"], "--truncation_strategy", "right"]


def dpo_data(paths):
    """Four pairs: each answer above chosen, the next one rejected (unequal lengths on both sides)."""
    rows = [json.loads(line) for line in paths["uneven"].read_text().splitlines()]
    pairs = [{"messages": [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}],
              "rejected_response": ANSWERS[(i + 1) % 4], "images": r["images"]} for i, r in enumerate(rows)]
    path = paths["uneven"].with_name("uneven_pairs.jsonl")
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return ["--dataset", path]


def grpo_data(paths):
    """The demo's prompts, and a reward that is a function of the completion (the built-in `random` draws from one
    generator per process, so 2 processes would score differently from 1)."""
    plugin = paths["uneven"].with_name("varied_reward.py")
    plugin.write_text("def varied(completions, **kwargs):\n    return [float(len(set(c)) % 3) for c in completions]\n")
    return ["--dataset", paths["train"], "--external_plugins", plugin, "--reward_funcs", "varied",
            "--num_generations", 2, "--max_completion_length", 6, "--temperature", 1.0]


# (processes, batch per process, accumulation steps): 4 samples a step each time
SPLITS = [(1, 4, 1), (1, 2, 2), (2, 2, 1)]
TRAINERS = [pytest.param(Trainer("train_sft.py", sft_data, ["--train_type", "full", "--freeze_vit", "false",
                                                             "--freeze_aligner", "false", "--learning_rate", 1e-3,
                                                             "--warmup_ratio", 0]), id="sft"),
            # LoRA (the reference: adapters off) with the chosen answers' NLL, weighed per token of the step
            pytest.param(Trainer("train_dpo.py", dpo_data, ["--train_type", "lora", "--lora_dropout", 0,
                                                            "--rpo_alpha", 0.5, "--learning_rate", 1e-2,
                                                            "--warmup_ratio", 0]), id="dpo"),
            # GRPO: 4 completions a step, 2 prompts x 2, in one generate call and one reward call; under 2
            # processes each samples its own prompt, numbering its completions as the rows of the whole round in
            # the sampling noise, so that they are those one process draws
            pytest.param(Trainer("train_grpo.py", grpo_data, ["--learning_rate", 1e-2, "--warmup_ratio", 0,
                                                               "--beta", 0.1, "--lora_dropout", 0]), id="grpo")]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_batch_split_changes_no_loss_and_no_gradient(trainer, demos, tmp_path):
    """Two steps of 4 samples, split three ways: the same losses and gradient norms (float32). The second step
    also checks that the first update was the same everywhere (every process stepped alike)."""
    paths = demos()
    results = {}
    splits = trainer.splits or SPLITS
    for world, batch, accum in splits:
        out = tmp_path / f"{world}x{batch}x{accum}"
        run(trainer.script, ["--model", paths["model"], *trainer.data(paths), *trainer.options,
                             "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accum,
                             "--max_steps", 2, "--logging_steps", 1, "--save_strategy", "no", "--report_to",
                             "none", "--gradient_checkpointing", "false", "--output_dir", out], world)
        results[(world, batch, accum)] = [(e["loss"], e["grad_norm"]) for e in logged(out)]
    reference = results[splits[0]]
    assert len(reference) == 2
    for split, got in results.items():
        # abs: a GRPO loss with the old policy the current one is 0 up to rounding (its gradient is not)
        assert got == [pytest.approx(step, rel=1e-5, abs=1e-7) for step in reference], (split, results)


# ------------------------------------------------------------------------------ the loss, independently

@pytest.mark.parametrize("family", demo.FAMILIES)
def test_first_loss_is_the_cross_entropy_of_transformers(family, demos, tmp_path):
    """The logged first-step loss and token accuracy of a batch of 4 equal a plain forward of transformers'
    model on the same rows: logits at t scored against the label at t + 1, -100 ignored, every label token of
    the batch weighing the same."""
    tf = pytest.importorskip("transformers")
    paths = demos(family)
    run("train_sft.py", ["--model", paths["model"], "--dataset", paths["uneven"], "--train_type", "full",
                         "--per_device_train_batch_size", 4, "--max_steps", 1, "--logging_steps", 1,
                         "--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "false",
                         "--truncation_strategy", "right", "--output_dir", tmp_path])
    entry, = logged(tmp_path)

    processor = minivl.Processor.from_pretrained(paths["model"])
    rows = data.load_rows(paths["uneven"])
    batch = processor([r.conversation for r in rows], images=[r.images for r in rows], return_labels=True)
    labels = batch.pop("labels")
    hf = tf.AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32).eval()
    types = (batch["input_ids"] == processor.image_token_id).long()
    with torch.no_grad():
        logits = hf(**batch, mm_token_type_ids=types).logits  # (B, T, V)
    logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    cross_entropy = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)   # the mean over label tokens
    counted = targets != IGNORE_INDEX
    assert int(counted.sum()) == sum(len(processor.tokenizer.encode(a + "<|im_end|>").ids) for a in ANSWERS)
    accuracy = (logits.argmax(-1) == targets)[counted].float().mean()
    assert entry["loss"] == pytest.approx(float(cross_entropy), rel=1e-5)
    assert entry["mean_token_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)


# --------------------------------------------------------------------------------- optimizer and schedule

def options(*argv):
    return train_sft.parse_args([str(a) for a in argv])


def minivl_model(family):
    from helpers import hf_model

    hf = hf_model(family)
    return minivl.VLModel(minivl.Config.from_dict(hf.config.to_dict())), hf


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_no_weight_decay_on_any_one_dimensional_parameter(family):
    tf = pytest.importorskip("transformers")
    model, hf = minivl_model(family)
    named = list(model.named_parameters())
    groups = training.param_groups(named, 1e-4, options("--weight_decay", 0.1))
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert sorted(decay) == sorted(name for name, _ in named)                  # each parameter once
    for name, p in named:
        assert decay[name] == (0.1 if p.ndim >= 2 else 0.0), (name, tuple(p.shape))
    vision_norms = [n for n in decay if n.startswith("model.visual.") and ("norm" in n or "ln_q" in n)]
    assert vision_norms and all(decay[n] == 0.0 for n in vision_norms)
    # transformers' Trainer decides by name and layer type: it decays the weights of Qwen2.5-VL's vision RMSNorms
    # (norm1, norm2, merger.ln_q: neither named "layernorm" / "norm" nor nn.LayerNorm), and only those
    theirs = set(tf.Trainer.get_decay_parameter_names(None, hf))
    differ = {n for n in decay if (decay[n] > 0) != (n in theirs)}
    rms_in_vision = {f"{m}.weight" for m, module in model.named_modules()
                     if isinstance(module, RMSNorm) and m.startswith("model.visual.")}
    assert differ == rms_in_vision
    assert bool(differ) == (family == "qwen2_5_vl")


def test_lora_plus_and_part_learning_rates():
    model, _ = minivl_model("qwen2_5_vl")
    for p in model.parameters():
        p.requires_grad_(False)
    lora.inject(model, lora.select_linear(model, ("llm", "vit")), r=4, alpha=8)
    for p in model.model.visual.merger.parameters():
        p.requires_grad_(True)                                                 # the aligner trained in full
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = training.param_groups(trainable, 1e-4, options("--lorap_lr_ratio", 16, "--vit_lr", 2e-5,
                                                            "--aligner_lr", 3e-5))
    lr = {name: g["lr"] for g in groups for name in g["names"]}
    kinds = set()
    for name, _ in trainable:
        if name.startswith("model.visual.merger."):
            expected = 3e-5
        elif name.startswith("model.visual.blocks."):
            expected = 2e-5 * (16 if ".lora_B." in name else 1)
        else:
            assert name.startswith("model.language_model.")
            expected = 1e-4 * (16 if ".lora_B." in name else 1)
        kinds.add(expected)
        assert lr[name] == pytest.approx(expected), name
    assert len(kinds) == 5


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_lr_factor_at_warmup_middle_and_end(kind):
    # 100 steps, 10 of warmup: halfway through the warmup, its end, halfway through the decay, the end
    expected = {"cosine": [0.5, 1.0, 0.5, 0.0], "linear": [0.5, 1.0, 0.5, 0.0], "constant": [1.0] * 4,
                "constant_with_warmup": [0.5, 1.0, 1.0, 1.0]}[kind]
    assert [training.lr_factor(s, 100, 10, kind) for s in (5, 10, 55, 100)] == pytest.approx(expected)
    if kind == "cosine":
        assert training.lr_factor(77.5, 100, 10, kind) == pytest.approx(0.5 * (1 - 2**-0.5))  # 3/4 of the way
    tf = pytest.importorskip("transformers")
    for warmup in (0, 10):                 # every step against transformers' scheduler of the same name
        p = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([p], lr=1.0)
        scheduler = tf.get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=100)
        for step in range(101):
            assert training.lr_factor(step, 100, warmup, kind) == pytest.approx(
                optimizer.param_groups[0]["lr"], abs=1e-12), (warmup, step)
            optimizer.step()
            scheduler.step()


def test_rslora_scale_and_peft_round_trip(demos, tmp_path):
    """--use_rslora scales the adapter by alpha / sqrt(r) (8 / sqrt(4) = 4, where alpha / r would be 2), and the
    saved adapter loads in peft with equal logits."""
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    paths = demos()
    model, _ = run("train_sft.py", [
        "--model", paths["model"], "--dataset", paths["uneven"], "--train_type", "lora", "--use_rslora", "true",
        "--lora_rank", 4, "--lora_alpha", 8, "--lora_dropout", 0, "--freeze_vit", "false", "--max_steps", 2,
        "--learning_rate", 1e-2, "--per_device_train_batch_size", 4, "--warmup_ratio", 0, "--save_steps", 2,
        "--report_to", "none", "--gradient_checkpointing", "false", "--output_dir", tmp_path])
    layers = lora.lora_layers(model)
    assert layers and {layer.scale for _, layer in layers} == {4.0}
    checkpoint = tmp_path / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["use_rslora"] is True
    processor = minivl.Processor.from_pretrained(paths["model"])
    rows = data.load_rows(paths["uneven"])
    batch = processor([r.conversation for r in rows], images=[r.images for r in rows], return_labels=True)
    batch.pop("labels")
    real = batch["attention_mask"].bool()                                      # (B, T): not the padding
    types = (batch["input_ids"] == processor.image_token_id).long()
    model.eval()
    with torch.no_grad():
        ours = model(**batch)[real]
        base = tf.AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32)
        with_peft = peft.PeftModel.from_pretrained(base, checkpoint).eval()
        theirs = with_peft(**batch, mm_token_type_ids=types).logits[real]
        with with_peft.disable_adapter():
            without = with_peft(**batch, mm_token_type_ids=types).logits[real]
    assert (ours - without).abs().max() > 1e-2                                  # the adapter does something
    assert (ours - theirs).abs().max() < 1e-4
