"""train_sft.py on the tiny demo model: learning, exact resume, LoRA+, freezing, vision LoRA, export, options,
and the demo default learning its task (slow). Two processes (DDP) and the loss's numbers are in
tests/test_train_numerics.py.

Runs use a 32-row slice of the demo data and a handful of steps, so the file stays well under a minute of CPU
(the demo default, 300 steps, aside).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import minivl
from minivl import data, demo, lora, training

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    paths = demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")
    lines = paths["train"].read_text().splitlines()
    small = paths["train"].with_name("small.jsonl")  # beside train.jsonl: the image paths stay valid
    small.write_text("\n".join(lines[:32]) + "\n")
    val = paths["train"].with_name("val.jsonl")
    val.write_text("\n".join(lines[32:40]) + "\n")
    return {**paths, "small": small, "val": val}


def run(made, out, *extra):
    argv = ["--model", str(made["model"]), "--dataset", str(made["small"]), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
            "--gradient_checkpointing", "false", "--warmup_ratio", "0", *map(str, extra)]
    return train_sft.main(argv)


def logged(out, key="loss"):
    entries = [json.loads(line) for line in (Path(out) / "logging.jsonl").read_text().splitlines()]
    return [e[key] for e in entries if key in e]


def test_lora_lowers_loss_and_keeps_the_base(made, tmp_path):
    model, _ = run(made, tmp_path, "--train_type", "lora", "--max_steps", 6, "--learning_rate", 1e-2,
                   "--lora_dropout", 0)
    losses = logged(tmp_path)
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8, losses
    entry = json.loads((tmp_path / "logging.jsonl").read_text().splitlines()[0])
    assert {"loss", "grad_norm", "learning_rate", "mean_token_accuracy", "num_tokens",
            "tokens_per_second"} <= set(entry)
    base = minivl.load(made["model"]).state_dict()
    for name, p in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(p, base[name]), name                      # the frozen base: bit-identical
    ckpt = tmp_path / "checkpoint-6"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt", "trainer_state.json",
            "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "config.json").exists()                           # an adapter, not a model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]   # no temporary leftovers


def test_full_training_with_frozen_vision(made, tmp_path):
    model, _ = run(made, tmp_path, "--train_type", "full", "--max_steps", 4, "--learning_rate", 1e-3,
                   "--freeze_vit", "true", "--freeze_aligner", "true")
    losses = logged(tmp_path)
    assert losses[-1] < losses[0], losses
    base = minivl.load(made["model"]).state_dict()
    saved = minivl.load(tmp_path / "checkpoint-4").state_dict()         # the official layout, loadable
    for name, p in saved.items():
        if name.startswith("model.visual."):
            assert torch.equal(p, base[name]), name
    assert not torch.equal(saved["model.language_model.layers.0.mlp.up_proj.weight"],
                           base["model.language_model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_run(made, tmp_path, mode):
    # dropout and gradient accumulation on, so RNG state and data position both matter
    extra = ["--train_type", mode, "--max_steps", 6, "--save_steps", 3, "--gradient_accumulation_steps", 2,
             "--learning_rate", 5e-3, "--lr_scheduler_type", "cosine", "--warmup_steps", 1]
    if mode == "lora":
        extra += ["--lora_dropout", 0.1, "--lorap_lr_ratio", 16, "--freeze_vit", "false"]
    # an epoch of 32 rows is 4 steps of 2 x 4 samples: the run resumed after step 3 crosses into epoch 2
    run(made, tmp_path / "a", *extra)
    run(made, tmp_path / "b", *extra, "--resume_from_checkpoint", tmp_path / "a" / "checkpoint-3")
    assert logged(tmp_path / "b") == logged(tmp_path / "a")[3:]
    assert logged(tmp_path / "b", "grad_norm") == logged(tmp_path / "a", "grad_norm")[3:]
    if mode == "lora":
        # LoRA+: the B matrices got lr x 16 (the schedule's factor is the same for every group)
        groups = torch.load(tmp_path / "a" / "checkpoint-3" / "training_state.pt",
                            weights_only=True)["optimizer"]["param_groups"]
        lrs = {all(".lora_B." in n for n in g["names"]): g["lr"] for g in groups}
        assert lrs[True] == pytest.approx(16 * lrs[False])
        assert any(".visual." in n for g in groups for n in g["names"])


def test_vision_lora_gets_gradients_and_a_frozen_tower_no_graph(made):
    for freeze_vit in (False, True):
        model = minivl.load(made["model"])
        for p in model.parameters():
            p.requires_grad_(False)
        parts = ("llm",) if freeze_vit else ("llm", "vit")
        lora.inject(model, lora.select_linear(model, parts), r=4, alpha=8, init_weights=False)
        model.model.visual.gradient_checkpointing = model.model.language_model.gradient_checkpointing = True
        model.train()
        seen = []
        model.model.visual.register_forward_hook(lambda m, i, out: seen.append(out[0].requires_grad))
        rows = data.load_rows(made["small"])[:2]
        ds = data.SFTDataset(rows, minivl.Processor.from_pretrained(made["model"]))
        batch = ds.collate([ds[0], ds[1]])
        batch.pop("num_dropped")
        logp, _, _ = train_sft.TokenLogprobs(model, torch.float32)(**batch)
        (-logp.sum()).backward()
        vision = [(n, m) for n, m in lora.lora_layers(model) if n.startswith("model.visual.")]
        assert seen == [not freeze_vit]                                  # frozen tower: no autograd graph
        assert bool(vision) != freeze_vit
        for name, layer in vision:
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_export_merges_lora_and_copies_the_trained_tower(made, tmp_path):
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # LoRA on the LLM, the vision tower trained in full next to it (ms-swift lora_llm, freeze_vit false)
    run(made, tmp_path, "--train_type", "lora_llm", "--freeze_vit", "false", "--max_steps", 2,
        "--learning_rate", 1e-2, "--lora_dropout", 0)
    ckpt = tmp_path / "checkpoint-2"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert "model.visual.blocks.0" in config["modules_to_save"]
    from minivl import export
    export.main(["--adapters", str(ckpt), "--merge_lora", "true"])
    merged_dir = tmp_path / "checkpoint-2-merged"
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "model.safetensors").is_file()

    adapter_model = minivl.load(made["model"])
    lora.load_adapter(adapter_model, ckpt)
    processor = minivl.Processor.from_pretrained(merged_dir)
    rows = data.load_rows(made["val"])[:2]
    batch = processor([r.conversation for r in rows], images=[r.images for r in rows], return_labels=True)
    batch.pop("labels")
    types = (batch["input_ids"] == processor.image_token_id).long()
    with torch.no_grad():
        expected = adapter_model(**batch)
        hf_merged = tf.AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = hf_merged(**batch, mm_token_type_ids=types).logits
        assert (got - expected).abs().max() < 1e-4
        hf_base = tf.AutoModelForImageTextToText.from_pretrained(made["model"], dtype=torch.float32)
        with_peft = peft.PeftModel.from_pretrained(hf_base, ckpt).eval()
        assert (with_peft(**batch, mm_token_type_ids=types).logits - expected).abs().max() < 1e-4
    base = minivl.load(made["model"]).state_dict()
    merged = minivl.load(merged_dir).state_dict()
    name = "model.visual.blocks.0.attn.qkv.weight"
    assert not torch.equal(merged[name], base[name])                    # the trained tower made it into the merge
    assert torch.equal(merged[name], adapter_model.state_dict()[name])


def test_options(made, tmp_path, capsys):
    def refused(*argv):
        with pytest.raises(SystemExit):
            train_sft.parse_args(list(map(str, argv)))
        return capsys.readouterr().err

    assert "--frobnicate: not an option minivl supports" in refused("--frobnicate", "1")
    assert "did you mean --learning_rate" in refused("--learnig_rate", "1e-4")
    assert "no logits exist" in refused("--use_liger_kernel", "true") and "vLLM" in refused("--use_vllm", "true")
    assert "give both --model and --dataset" in refused("--model", "x")
    assert "expected true or false" in refused("--freeze_vit", "maybe")
    # the ms-swift command of facts/user_workflows.md, option for option
    (tmp_path / "system.txt").write_text("You are a careful annotator.\n")
    args = train_sft.parse_args(
        f"--model m --dataset train.jsonl --val_dataset eval.jsonl --sft_type lora --lorap_lr_ratio 10 "
        f"--freeze_vit false --freeze_aligner false --freeze_llm false --per_device_train_batch_size 1 "
        f"--per_device_eval_batch_size 1 --split_dataset_ratio 0.1 --output_dir out --num_train_epochs 6 "
        f"--save_steps 20 --eval_steps 20 --save_total_limit 2 --logging_steps 10 --seed 42 --learning_rate 1e-4 "
        f"--init_weights true --lora_rank 8 --lora_alpha 32 --adam_beta1 0.9 --adam_beta2 0.95 "
        f"--adam_epsilon 1e-08 "
        f"--weight_decay 0.1 --gradient_accumulation_steps 16 --max_grad_norm 1 --lr_scheduler_type cosine "
        f"--warmup_ratio 0.05 --warmup_steps 0 --gradient_checkpointing false --system {tmp_path / 'system.txt'}"
        .split())
    assert args.train_type == "lora" and args.freeze_vit is False
    assert args.system == "You are a careful annotator."                 # read from the file
    # bad data reaches the user before any training
    empty = made["small"].with_name("empty.jsonl")
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        run(made, tmp_path / "e", "--dataset", empty)
    broken = made["small"].with_name("broken.jsonl")
    broken.write_text(json.dumps({"query": "<image>q", "response": "r", "images": ["images/none.png"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="broken.jsonl:1: image file not found"):
        run(made, tmp_path / "e", "--dataset", broken)


def test_rotation_keeps_the_best_and_the_last(tmp_path):
    for step in (10, 20, 30, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
    training.rotate_checkpoints(tmp_path, 2, "checkpoint-20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-40"]
    training.rotate_checkpoints(tmp_path, 2, "checkpoint-40")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-40"]
    training.rotate_checkpoints(tmp_path, 1, None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-40"]


@pytest.mark.slow
def test_the_demo_default_learns_the_task(made, tmp_path, monkeypatch):
    """`python train_sft.py` with no arguments: 300 steps on the demo task. The held-out accuracy of the saved
    checkpoint, answered greedily by transformers (not by minivl's sampler), is at least 90% (chance: 25%; the
    README says 98.4%), and train_sft's exact-match count, which it prints, agrees with it."""
    tf = pytest.importorskip("transformers")
    monkeypatch.setattr(demo, "DEFAULT_DIR", made["root"])
    model, state = train_sft.main(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert state["global_step"] == 300
    checkpoint = tmp_path / "checkpoint-300"
    processor = minivl.Processor.from_pretrained(checkpoint)
    rows = data.load_rows(made["test"])
    hf = tf.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hits = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        batch = processor([r.conversation[:-1] for r in chunk], images=[r.images for r in chunk])  # left-padded
        types = (batch["input_ids"] == processor.image_token_id).long()
        with torch.no_grad():
            out = hf.generate(**batch, mm_token_type_ids=types, max_new_tokens=4, do_sample=False)
        answers = [processor.decode(row[batch["input_ids"].shape[1]:]).strip() for row in out]
        hits += sum(a == r.conversation[-1]["content"] for a, r in zip(answers, chunk))
    accuracy = hits / len(rows)
    assert accuracy >= 0.9, accuracy
    assert train_sft.exact_match(model, processor, rows, 64) == accuracy
