"""config.json against transformers' own reading of it: every field minivl reads gives the value transformers
computes with (a field left out takes transformers' class default), and a value minivl cannot compute with is
refused by name. The activation table against transformers' ACT2FN."""

import copy
import json

import pytest
import torch

from helpers import hf_config
from minivl.config import TEXT_DEFAULTS, VISION_DEFAULTS, Config
from minivl.text import ACTIVATIONS

tf = pytest.importorskip("transformers")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
CLASSES = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig",
           "qwen3_vl_moe": "Qwen3VLMoeConfig"}


def published(name):
    return json.load(open(f"tests/configs/{name}.json"))


def what_transformers_computes_with(raw):
    """The values transformers' modules read from the config it makes of `raw`, under minivl's names."""
    c = getattr(tf, CLASSES[raw["model_type"]]).from_dict(copy.deepcopy(raw))
    t, v = c.text_config, c.vision_config
    qwen2 = raw["model_type"] == "qwen2_vl"
    out = {
        "text.hidden_size": t.hidden_size, "text.intermediate_size": t.intermediate_size,
        "text.num_hidden_layers": t.num_hidden_layers, "text.num_attention_heads": t.num_attention_heads,
        "text.num_key_value_heads": t.num_key_value_heads, "text.vocab_size": t.vocab_size,
        "text.head_dim": getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        "text.rms_norm_eps": t.rms_norm_eps, "text.rope_theta": t.rope_parameters["rope_theta"],
        "text.hidden_act": t.hidden_act, "tie_word_embeddings": c.tie_word_embeddings,
        "vision.depth": v.depth, "vision.num_heads": v.num_heads, "vision.hidden_act": v.hidden_act,
        "vision.hidden_size": v.embed_dim if qwen2 else v.hidden_size,
        "vision.intermediate_size": int(v.embed_dim * v.mlp_ratio) if qwen2 else v.intermediate_size,
        "vision.out_hidden_size": v.hidden_size if qwen2 else v.out_hidden_size,
        "vision.rope_theta": v.rope_parameters["rope_theta"], "vision.patch_size": v.patch_size,
        "vision.spatial_merge_size": v.spatial_merge_size, "vision.temporal_patch_size": v.temporal_patch_size,
    }
    if raw["model_type"] == "qwen2_5_vl":
        out.update({"vision.window_size": v.window_size, "vision.tokens_per_second": v.tokens_per_second,
                    "vision.fullatt_block_indexes": list(v.fullatt_block_indexes)})
    if raw["model_type"].startswith("qwen3"):
        out.update({"vision.num_position_embeddings": v.num_position_embeddings,
                    "vision.deepstack_visual_indexes": list(v.deepstack_visual_indexes)})
    if raw["model_type"] == "qwen3_vl_moe":
        out.update({"text.num_experts": t.num_experts, "text.num_experts_per_tok": t.num_experts_per_tok,
                    "text.moe_intermediate_size": t.moe_intermediate_size,
                    "text.decoder_sparse_step": t.decoder_sparse_step,
                    "text.mlp_only_layers": t.mlp_only_layers})
    return out


def what_minivl_computes_with(raw, keys):
    c = Config.from_dict(raw)
    return {k: (c.tie_word_embeddings if k == "tie_word_embeddings" else
                getattr(getattr(c, k.split(".")[0]), k.split(".")[1])) for k in keys}


def variants():
    """Published files, tiny files written by transformers, and files that leave fields out."""
    out = [("qwen2_vl 2b", published("qwen2_vl_2b")), ("qwen2_5_vl 3b", published("qwen2_5_vl_3b")),
           ("qwen3_vl 8b", published("qwen3_vl_8b"))]
    for family in FAMILIES:
        out.append((f"{family} tiny", hf_config(family).to_dict()))
        out.append((f"{family} tiny flat", hf_config(family, rope_format="rope_scaling").to_dict()))
        out.append((f"{family} only model_type", {"model_type": family}))
    # fields left out one at a time from the published files
    for name, raw in out[:3]:
        for key in ("rms_norm_eps", "rope_theta", "tie_word_embeddings", "num_key_value_heads", "hidden_act"):
            smaller = copy.deepcopy(raw)
            (smaller.get("text_config") or smaller).pop(key, None)
            out.append((f"{name} without {key}", smaller))
        for key in ("tokens_per_second", "fullatt_block_indexes", "hidden_act", "window_size"):
            smaller = copy.deepcopy(raw)
            if key in smaller["vision_config"]:
                del smaller["vision_config"][key]
                out.append((f"{name} without vision {key}", smaller))
    # values that differ from every published file
    q3 = published("qwen3_vl_8b")
    q3["text_config"].pop("head_dim")
    q3["vision_config"]["rope_theta"] = 500.0
    out.append(("qwen3_vl 8b, no head_dim, vision rope_theta", q3))
    q25 = published("qwen2_5_vl_3b")
    q25["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 700.0}
    q25["head_dim"] = 64  # transformers ignores it for Qwen2/2.5: hidden_size // heads
    q25["text_config"] = None
    del q25["text_config"]
    out.append(("qwen2_5_vl 3b, vision rope_parameters, stray head_dim", q25))
    nested = hf_config("qwen2_5_vl").to_dict()
    nested["text_config"]["tie_word_embeddings"] = True  # transformers 4 wrote it there
    out.append(("qwen2_5_vl tie in text_config", nested))
    return out


@pytest.mark.parametrize("name,raw", variants(), ids=[n for n, _ in variants()])
def test_every_field_read_as_transformers_reads_it(name, raw):
    theirs = what_transformers_computes_with(raw)
    ours = what_minivl_computes_with(raw, theirs)
    assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_are_transformers_class_defaults(family):
    c = getattr(tf, CLASSES[family])()
    for key, value in TEXT_DEFAULTS[family].items():
        t = c.text_config
        got = t.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(t, key)
        assert got == value, key
    for key, value in VISION_DEFAULTS[family].items():
        got = getattr(c.vision_config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_activation_table_equals_transformers():
    from transformers.activations import ACT2FN

    x = torch.cat([torch.randn(4000) * 4, torch.linspace(-30, 30, 601)])
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name
    assert not {"prelu", "xielu"} & set(ACTIVATIONS)  # learned parameters that no checkpoint stores


@pytest.mark.parametrize("field,value", [("vision", "prelu"), ("vision", "laplace"), ("text", "swiglu"),
                                         ("flat text", "gelu_fancy")])
def test_unknown_activation_is_refused_by_name(field, value):
    if field == "flat text":
        raw = published("qwen2_5_vl_3b")
        raw["hidden_act"], where = value, "hidden_act"
    elif field == "text":
        raw = published("qwen3_vl_8b")
        raw["text_config"]["hidden_act"], where = value, "text_config.hidden_act"
    else:
        raw = published("qwen2_vl_2b")
        raw["vision_config"]["hidden_act"], where = value, "vision_config.hidden_act"
    with pytest.raises(ValueError, match=rf"{where}='{value}' is an activation minivl does not implement"):
        Config.from_dict(raw)


@pytest.mark.parametrize("name,edit,message", [
    ("qwen2_5_vl_3b", lambda d: d["rope_scaling"].update(type="yarn", factor=4.0),
     r"rope_scaling.rope_type='yarn'"),
    ("qwen3_vl_8b", lambda d: d["text_config"]["rope_scaling"].update(rope_type="linear", factor=2.0),
     r"text_config.rope_scaling.rope_type='linear'"),
    ("qwen2_vl_2b", lambda d: d.update(use_sliding_window=True), r"use_sliding_window=True"),
    ("qwen3_vl_8b", lambda d: d["text_config"].update(attention_bias=True), r"text_config.attention_bias=True"),
])
def test_values_minivl_does_not_compute_are_refused_by_name(name, edit, message):
    raw = published(name)
    edit(raw)
    with pytest.raises(ValueError, match=message):
        Config.from_dict(raw)


def test_moe_router_always_renormalises():
    raw = hf_config("qwen3_vl_moe").to_dict()
    raw["text_config"]["norm_topk_prob"] = False
    with pytest.raises(ValueError, match="text_config.norm_topk_prob=False"):
        Config.from_dict(raw)
    raw["text_config"]["norm_topk_prob"] = True
    assert Config.from_dict(raw).to_dict()["text_config"]["norm_topk_prob"] is True
