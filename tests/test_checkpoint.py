"""Loading and saving checkpoints: both config formats, the round trip through transformers, sharded files, and a
clear error for every kind of damaged checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minivl
from minivl.checkpoint import read_config
from helpers import mm_token_type_ids, pixels, save_hf, text, vision_block

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]


def logits_of(model, family, hf=False):
    grid = (1, 8, 12)
    ids = torch.tensor([text(4, 1) + vision_block(grid) + text(5, 2)])
    pv, thw = pixels(family, [grid])
    kw = {"mm_token_type_ids": mm_token_type_ids(ids)} if hf else {}
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, image_grid_thw=thw, **kw)
    return out.logits if hf else out


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_loads_in_transformers_with_equal_logits(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    save_hf(family, tmp_path / "hf")
    ours = minivl.load(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    hf, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (logits_of(ours, family) - logits_of(hf.eval(), family, hf=True)).abs().max() <= 1e-4
    # and minivl reads back what it wrote, bit for bit
    again = minivl.load(tmp_path / "ours")
    assert torch.equal(logits_of(again, family), logits_of(ours, family))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_saved_files_use_the_published_flat_layout(family, tmp_path):
    save_hf(family, tmp_path / "hf")
    minivl.load(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "text_config" not in raw and raw["rope_scaling"]["type"] == "mrope" and raw["hidden_size"] == 64
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"model", "visual", "lm_head"}


def test_moe_experts_are_written_in_the_published_layout(tmp_path):
    # published Qwen3-VL-MoE files hold experts as [E, in, out]; transformers 5 writes [E, out, in]
    save_hf("qwen3_vl_moe", tmp_path / "hf")
    ours = minivl.load(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(load_file(tmp_path / "hf" / "model.safetensors")[key].shape) == (4, 48, 64)
    assert tuple(load_file(tmp_path / "ours" / "model.safetensors")[key].shape) == (4, 64, 48)


@pytest.mark.parametrize("family", FAMILIES)
def test_both_config_formats_give_the_same_model(family, tmp_path):
    # transformers 5 writes nested configs with rope_parameters; the published files are flat (Qwen2/2.5) or
    # nested with rope_scaling (Qwen3). minivl writes the published format.
    save_hf(family, tmp_path / "t5")
    ours = minivl.load(tmp_path / "t5")
    ours.save_pretrained(tmp_path / "published")
    t5 = json.loads((tmp_path / "t5" / "config.json").read_text())
    published = json.loads((tmp_path / "published" / "config.json").read_text())
    assert "rope_parameters" in json.dumps(t5) and "rope_parameters" not in json.dumps(published)
    assert read_config(tmp_path / "t5")[0] == read_config(tmp_path / "published")[0]


def test_published_configs_parse():
    from minivl.config import Config

    q2 = Config.from_dict(json.load(open("tests/configs/qwen2_vl_2b.json")))
    assert (q2.vision.hidden_size, q2.vision.out_hidden_size, q2.vision.intermediate_size) == (1280, 1536, 5120)
    assert q2.tie_word_embeddings and q2.text.attention_bias and not q2.text.qk_norm
    q25 = Config.from_dict(json.load(open("tests/configs/qwen2_5_vl_3b.json")))
    assert q25.vision.window_merged == 4 and q25.vision.tokens_per_second == 2
    assert q25.vision.fullatt_block_indexes == [7, 15, 23, 31] and q25.text.mrope_section == [16, 24, 24]
    q3 = Config.from_dict(json.load(open("tests/configs/qwen3_vl_8b.json")))
    assert q3.text.mrope_interleaved and q3.text.qk_norm and not q3.text.attention_bias
    assert (q3.text.head_dim, q3.text.rope_theta, q3.vision.deepstack_visual_indexes) == (128, 5e6, [8, 16, 24])
    assert not q3.tie_word_embeddings


def test_unknown_model_type_is_named(tmp_path):
    save_hf("qwen2_5_vl", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown model_type 'llava'"):
        minivl.load(tmp_path)


def damaged(tmp_path, change):
    save_hf("qwen2_5_vl", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    d = damaged(tmp_path, lambda t: t.pop("visual.blocks.1.attn.qkv.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): visual\.blocks\.1\.attn\.qkv\.weight"):
        minivl.load(d)


def test_wrong_shape_is_named(tmp_path):
    def change(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: file \[95, 64\] vs model \[96, 64\]"):
        minivl.load(damaged(tmp_path, change))


def test_unexpected_tensor_is_named(tmp_path):
    def change(t):
        t["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        minivl.load(damaged(tmp_path, change))


def test_truncated_file_is_named(tmp_path):
    save_hf("qwen2_5_vl", tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        minivl.load(tmp_path)


def test_corrupt_header_is_named(tmp_path):
    save_hf("qwen2_5_vl", tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"notjson!"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        minivl.load(tmp_path)


def test_sharded_checkpoint_round_trip_and_missing_shard(tmp_path):
    save_hf("qwen3_vl", tmp_path / "hf")
    ours = minivl.load(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = minivl.load(tmp_path / "sharded")
    assert torch.equal(logits_of(again, "qwen3_vl"), logits_of(ours, "qwen3_vl"))
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        minivl.load(tmp_path / "sharded")


def test_dtype_and_meta_build(tmp_path):
    save_hf("qwen2_5_vl", tmp_path)
    model = minivl.load(tmp_path, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        minivl.load(tmp_path / "nope" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        minivl.load(tmp_path / "empty")


def test_hub_id_goes_through_huggingface_hub_offline(tmp_path, monkeypatch):
    # with HF_HUB_OFFLINE and an empty cache, the download path is taken and fails: one line names the id, the
    # local path it is not, and the hub's reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"Qwen/Qwen2.5-VL-3B-Instruct: not a local directory \(looked "
                                                r"for .*\) and not fetched from the Hugging Face hub "
                                                r"\(LocalEntryNotFoundError: "):
        minivl.load("Qwen/Qwen2.5-VL-3B-Instruct")


def test_save_keeps_the_previous_checkpoint_when_interrupted(tmp_path, monkeypatch):
    save_hf("qwen2_5_vl", tmp_path / "hf")
    ours = minivl.load(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    from minivl import model  # save_pretrained writes the shards

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    shutil.rmtree(tmp_path / "hf")
