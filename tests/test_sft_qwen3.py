"""train_sft.py on the tiny Qwen3-VL demo (`python -m minivl.demo --family qwen3_vl`): its labels, a falling loss,
and the export that transformers and peft load. (Its first loss against transformers' cross-entropy is in
tests/test_train_numerics.py, for both demo families.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minivl
from minivl import data, demo, export, lora
from minivl.processor import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The Qwen3-VL demo made by its command line, and a 32-row slice of its training data."""
    root = tmp_path_factory.mktemp("qwen3_vl") / "demo_data"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout first
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "minivl.demo", "--family", "qwen3_vl", "--out", str(root)], check=True,
                   cwd=ROOT, env=env, capture_output=True)
    paths = demo.demo_paths(root)
    small = paths["train"].with_name("small.jsonl")  # beside train.jsonl: the image paths stay valid
    small.write_text("\n".join(paths["train"].read_text().splitlines()[:32]) + "\n")
    return {**paths, "small": small}


def test_the_qwen3_demo_is_a_qwen3_checkpoint(made, tmp_path):
    with pytest.raises(ValueError, match="no demo of family 'qwen2_vl'"):
        demo.make_demo(tmp_path / "other", family="qwen2_vl")
    assert json.loads((made["root"] / "demo.json").read_text())["family"] == "qwen3_vl"
    config = json.loads((made["model"] / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["rope_scaling"]["mrope_interleaved"]
    model = minivl.load(made["model"])
    assert model.cfg.text.qk_norm and model.cfg.vision.deepstack_visual_indexes == [0]
    assert model.cfg.vision.patch_size == 16 and model.cfg.vision.num_position_embeddings == 64
    processor = minivl.Processor.from_pretrained(made["model"])
    assert processor.family.template == "qwen3" and processor.family.default_system is None
    # the 56x56 images are resized to 64x64: 4x4 patches of 16, 4 merged tokens, as in the Qwen2.5-VL demo
    ds = data.SFTDataset(data.load_rows(made["small"])[:4], processor)
    for i, row in enumerate(ds.rows):
        sample = ds[i]
        assert sample["image_grid_thw"].tolist() == [[1, 4, 4]]
        labels = sample["labels"]
        answer = processor.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)
        assert answer == row.conversation[-1]["content"] + "<|im_end|>"
        assert processor.decode(sample["input_ids"], skip_special_tokens=False).startswith("<|im_start|>user\n")


def test_qwen3_trains_and_exports(made, tmp_path):
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # LoRA on the LLM; the vision blocks, position grid, merger and DeepStack merger trained in full beside it
    model, _ = train_sft.main([str(a) for a in [
        "--model", made["model"], "--dataset", made["small"], "--output_dir", tmp_path, "--train_type", "lora_llm",
        "--freeze_vit", "false", "--freeze_aligner", "false", "--max_steps", 6, "--learning_rate", 1e-2,
        "--lora_dropout", 0, "--per_device_train_batch_size", 4, "--logging_steps", 1, "--warmup_ratio", 0,
        "--save_steps", 6, "--report_to", "none", "--gradient_checkpointing", "false"]])
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "logging.jsonl").read_text().splitlines())
              if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8, losses
    checkpoint = tmp_path / "checkpoint-6"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())["modules_to_save"]
    assert "model.visual.deepstack_merger_list.0" in saved and "model.visual.pos_embed" in saved

    export.main(["--adapters", str(checkpoint), "--merge_lora", "true"])
    merged_dir = tmp_path / "checkpoint-6-merged"
    processor = minivl.Processor.from_pretrained(merged_dir)
    rows = data.load_rows(made["small"])[:2]
    batch = processor([r.conversation for r in rows], images=[r.images for r in rows], return_labels=True)
    batch.pop("labels")
    real = batch["attention_mask"].bool()
    types = (batch["input_ids"] == processor.image_token_id).long()
    model.eval()
    with torch.no_grad():
        expected = model(**batch)[real]
        base = minivl.load(made["model"])(**batch)[real]
        assert (expected - base).abs().max() > 1e-2                      # training changed the model
        merged = tf.AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
        assert type(merged).__name__ == "Qwen3VLForConditionalGeneration"
        assert (merged(**batch, mm_token_type_ids=types).logits[real] - expected).abs().max() < 1e-4
        hf_base = tf.AutoModelForImageTextToText.from_pretrained(made["model"], dtype=torch.float32)
        with_peft = peft.PeftModel.from_pretrained(hf_base, checkpoint).eval()
        assert (with_peft(**batch, mm_token_type_ids=types).logits[real] - expected).abs().max() < 1e-4
    again = minivl.load(made["model"])
    lora.load_adapter(again, checkpoint)
    with torch.no_grad():
        assert (again(**batch)[real] - expected).abs().max() < 1e-5
