"""The embedded demo: made in seconds, the same bytes for a seed, opened by minivl and by transformers."""

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import minivl
from minivl import demo


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo_data"
    start = time.perf_counter()
    paths = demo.make_demo(root)
    print(f"make_demo took {time.perf_counter() - start:.2f} s")
    return paths


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def rows(path, n=None):
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def batch_of(processor, jsonl, n, return_labels=False):
    """ms-swift rows -> a batch: image paths are relative to the jsonl file."""
    rs = rows(jsonl, n)
    convs = [[{"role": "user", "content": r["query"]}] + ([{"role": "assistant", "content": r["response"]}]
                                                           if return_labels else []) for r in rs]
    images = [[str(Path(jsonl).parent / x) for x in r["images"]] for r in rs]
    return processor(convs, images=images, return_labels=return_labels), rs


def test_layout(made):
    assert set(made) == {"root", "model", "train", "test", "images"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        assert (made["model"] / name).is_file(), name
    train, test = rows(made["train"]), rows(made["test"])
    assert (len(train), len(test)) == (1024, 128)
    assert train[0]["query"] == "<image>What colour is the shape?" and set(train[0]) == {"query", "response",
                                                                                       "images"}
    assert {r["response"] for r in train} == {r["response"] for r in test} == set(demo.COLOURS)
    assert not {r["images"][0] for r in train} & {r["images"][0] for r in test}     # held-out images


def test_answers_match_the_pictures(made):
    import numpy as np
    from PIL import Image
    for r in rows(made["test"], 40):
        pixels = set(map(tuple, np.asarray(Image.open(made["train"].parent / r["images"][0])).reshape(-1, 3)))
        assert demo.COLOURS[r["response"]] in pixels
        assert not {rgb for name, rgb in demo.COLOURS.items() if name != r["response"]} & pixels


def test_token_ids_agree(made):
    config = json.loads((made["model"] / "config.json").read_text())
    p = minivl.Processor.from_pretrained(made["model"])
    tok = p.tokenizer
    assert config["model_type"] == "qwen2_5_vl" and "text_config" not in config      # the flat official format
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                       ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>")]:
        assert config[key] == tok.token_to_id(token), key
    # Qwen's added tokens keep their relative order, right after the learned vocabulary
    first = tok.token_to_id("<|endoftext|>")
    assert [tok.token_to_id(t) for t in demo.SPECIAL_TOKENS + demo.ADDED_TOKENS] == list(range(first, first + 22))
    assert config["vocab_size"] >= tok.get_vocab_size()
    assert p.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert sum(config["rope_scaling"]["mrope_section"]) * 2 == config["hidden_size"] // config[
        "num_attention_heads"]


def test_minivl_opens_it(made):
    model = minivl.load(made["model"])
    p = minivl.Processor.from_pretrained(made["model"])
    batch, rs = batch_of(p, made["train"], 4, return_labels=True)
    labels = batch.pop("labels")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 4                       # 4 merged tokens each
    logits = model(**batch)
    assert logits.shape == (*batch["input_ids"].shape, model.cfg.text.vocab_size)
    assert torch.isfinite(logits).all()
    answers = [p.decode(row[row != -100]) for row in labels]
    assert answers == [r["response"] for r in rs]
    params = sum(t.numel() for t in model.parameters())
    assert 3e5 < params < 2e6, params                                                 # about facts/demo.md's size


def test_transformers_opens_it(made):
    tf = pytest.importorskip("transformers")
    hf = tf.AutoModelForImageTextToText.from_pretrained(made["model"]).eval()
    assert type(hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    p = minivl.Processor.from_pretrained(made["model"])
    batch, _ = batch_of(p, made["test"], 1)
    # transformers 5 takes the 3-D positions from token types (1 image, 2 video)
    types = (batch["input_ids"] == p.image_token_id).long()
    with torch.no_grad():
        ours = minivl.load(made["model"])(**batch)
        theirs = hf(**batch, mm_token_type_ids=types).logits
    assert (ours - theirs).abs().max() < 1e-4
    tok = tf.AutoTokenizer.from_pretrained(made["model"])
    text = p.apply_chat_template([{"role": "user", "content": "What colour is the shape? Ünïcødé"}], True)
    assert tok(text)["input_ids"] == p.tokenizer.encode(text).ids


def test_cached_and_deterministic(made, tmp_path):
    before = (made["model"] / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert demo.make_demo(made["root"]) == made
    assert time.perf_counter() - start < 0.5                                         # nothing rebuilt
    assert (made["model"] / "model.safetensors").stat().st_mtime_ns == before
    first = digest(made["root"])
    assert digest(demo.make_demo(tmp_path / "again")["root"]) == first
    other = digest(demo.make_demo(tmp_path / "other", seed=1)["root"])
    changed = {k for k, v in other.items() if first.get(k) != v}
    assert "model/model.safetensors" in changed and "data/train.jsonl" in changed


def test_concurrent_makers_agree(tmp_path):
    target, results, errors = tmp_path / "shared", [], []

    def run():
        try:
            results.append(demo.make_demo(target))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]                         # no temporary leftovers
    minivl.Processor.from_pretrained(results[0]["model"])


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a minivl demo directory"):
        demo.make_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_command_line(made, tmp_path):
    out = subprocess.run([sys.executable, "-m", "minivl.demo", "--out", str(made["root"])], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent.parent)
    assert f"model   {made['model']}" in out.stdout
