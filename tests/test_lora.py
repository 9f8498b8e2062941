"""LoRA modules: injection, merge, and PEFT's adapter format in both directions (minivl/lora.py)."""

import json
import re

import pytest
import torch
from helpers import hf_model, mm_token_type_ids, pixels, save_hf, text, vision_block
from safetensors import safe_open

import minivl
from minivl import lora

peft = pytest.importorskip("peft")


def inputs(family):
    grid = (1, 4, 4)
    ids = torch.tensor([text(5, 0) + vision_block(grid) + text(6, 1)])
    pv, thw = pixels(family, [grid])
    return ids, pv, thw


def logits_of(model, family, hf=False):
    ids, pv, thw = inputs(family)
    with torch.no_grad():
        if hf:
            return model(input_ids=ids, pixel_values=pv, image_grid_thw=thw,
                         mm_token_type_ids=mm_token_type_ids(ids)).logits
        return model(ids, pixel_values=pv, image_grid_thw=thw)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_adapter_loads_in_peft_and_back(family, tmp_path):
    hf = save_hf(family, tmp_path / "base")
    model = minivl.load(tmp_path / "base")
    torch.manual_seed(0)
    names = lora.select_linear(model, parts=("llm", "vit"))
    assert any(n.startswith("model.visual.blocks.") for n in names) and "lm_head" not in names
    assert not any(".merger" in n for n in names)
    lora.inject(model, names, r=4, alpha=8, init_weights=False)         # random B: the adapter changes the output
    trained = lora.whole_modules(model, ("aligner",))                   # a fully trained merger next to LoRA
    with torch.no_grad():
        for name in trained:
            for p in model.get_submodule(name).parameters():
                p.add_(0.05 * torch.randn_like(p))
    ours = logits_of(model, family)
    assert (ours - logits_of(hf, family, hf=True)).abs().max() > 1e-3  # the adapter does something
    lora.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base", modules_to_save=trained)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"base_model.model.{names[0]}.lora_A.weight" in keys
    assert any(k.startswith(f"base_model.model.{trained[0]}.") for k in keys)    # modules_to_save, PEFT-style

    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()  # PEFT on the transformers model
    assert (logits_of(theirs, family, hf=True) - ours).abs().max() < 1e-4

    again = minivl.load(tmp_path / "base")
    lora.load_adapter(again, tmp_path / "adapter")
    assert torch.equal(logits_of(again, family), ours)
    lora.merge(again)
    assert not lora.lora_layers(again)
    assert set(again.state_dict()) == set(minivl.load(tmp_path / "base").state_dict())   # official tensors only
    assert (logits_of(again, family) - ours).abs().max() < 1e-4


def test_peft_adapter_loads_in_minivl(tmp_path):
    family = "qwen2_5_vl"
    save_hf(family, tmp_path / "base")
    hf = hf_model(family)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "qkv"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    model = minivl.load(tmp_path / "base")
    loaded = lora.load_adapter(model, tmp_path / "adapter")
    assert loaded["target_modules"] and {n.rsplit(".", 1)[1] for n, _ in lora.lora_layers(model)} == {
        "q_proj", "v_proj", "qkv"}
    assert (logits_of(model, family) - logits_of(theirs, family, hf=True)).abs().max() < 1e-4


def test_load_errors(tmp_path):
    save_hf("qwen2_5_vl", tmp_path / "base")
    model = minivl.load(tmp_path / "base")
    lora.inject(model, lora.select_linear(model, target_modules=["q_proj"]), r=4, alpha=8)
    lora.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        lora.load_adapter(minivl.load(tmp_path / "base"), tmp_path / "adapter")
    config.update(r=4, target_modules=["q_proj", "k_proj"])
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adapter layers without tensors .*k_proj"):
        lora.load_adapter(minivl.load(tmp_path / "base"), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        lora.load_adapter(model, tmp_path / "base")
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora.select_linear(model, target_modules=["nonexistent"])


def test_compact_regex_and_targets():
    model = minivl.VLModel(minivl.Config.from_dict(hf_model("qwen2_5_vl").config.to_dict()))
    everything = lora.linear_names(model)
    llm = lora.select_linear(model)
    assert lora.compact_regex(llm, everything).count("\\d+") == 7             # one pattern per projection
    some = llm[:3]                                                             # layer 0 only: listed by name
    pattern = lora.compact_regex(some, everything)
    assert [n for n in everything if re.fullmatch(pattern, n)] == some
    # names are searched only in the parts that train: the vision MLP also has gate_proj
    llm_gates = lora.select_linear(model, target_modules=["gate_proj"])
    assert llm_gates and all(n.startswith("model.language_model.") for n in llm_gates)
    vit = lora.select_linear(model, parts=("vit",), target_modules=["gate_proj"])
    assert vit and all(n.startswith("model.visual.blocks.") for n in vit)


def test_dropout_path_matches_fused_in_eval():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    layer = lora.LoRALinear(base, r=4, alpha=8, dropout=0.3, init_weights=False)
    x = torch.randn(3, 5, 24)
    layer.eval()
    expected = base(x) + (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()) * 2.0
    assert (layer(x) - expected).abs().max() < 1e-5
    layer.train()
    torch.manual_seed(1)
    assert (layer(x) - expected).abs().max() > 1e-3                          # dropout acts in training


def test_a_foreign_kernels_package_is_named(tmp_path):
    # Hugging Face's hub package is also imported as `kernels`; if it shadows ours, say so and what to do
    import os
    import subprocess
    import sys

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "elsewhere").mkdir()                                      # the working directory: on no path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}   # the foreign package first
    run = subprocess.run([sys.executable, "-c", "import minivl.lora"], capture_output=True, text=True,
                         cwd=tmp_path / "elsewhere", env=env)
    assert run.returncode != 0 and "pip uninstall kernels" in run.stderr, run.stderr[-2000:]
    assert str(tmp_path / "kernels") in run.stderr                        # where the foreign one was found


def test_disabled_adapters_give_the_base_model(tmp_path):
    """Inside lora.disabled the model's logits are the base model's exactly (the DPO / GRPO reference), the decode
    backends read the base weights, and the adapters come back on afterwards."""
    from helpers import save_hf

    save_hf("qwen2_5_vl", tmp_path)
    base, model = minivl.load(tmp_path), minivl.load(tmp_path)
    lora.inject(model, lora.select_linear(model, ["llm"]), r=4, alpha=8, init_weights=False)  # B random: not identity
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    with torch.no_grad():
        adapted = model(ids)
        with lora.disabled(model):
            off = model(ids)
            layer = lora.lora_layers(model)[0][1]
            assert layer.merged_weight() is layer.weight
        back = model(ids)
        want = base(ids)
    assert torch.equal(off, want) and not torch.allclose(adapted, want, atol=1e-3) and torch.equal(back, adapted)
