"""`python -m minivl.parity` on tiny checkpoints written by transformers, one per family.

Each checkpoint is tests/helpers.py's tiny model plus processor files (the demo tokenizer, which carries every
Qwen special token; helpers' 256-token vocabulary grows to 448 to hold its ids). The tool must find every stage
equal in float32 and exit 0; with one weight of one minivl layer perturbed it must exit 1 and name that layer.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import processor_helpers as ph
from helpers import hf_model
from minivl import demo, parity

ROOT = Path(__file__).resolve().parents[1]
SMALL_IMAGES = {"min_pixels": 32 * 32, "max_pixels": 200 * 200}


def tiny_checkpoint(family, directory):
    model_type = "qwen3_vl" if family.startswith("qwen3") else family
    ph.family_dir(directory, family, preprocessor=dict(ph.PREPROCESSOR[model_type], **SMALL_IMAGES),
                  video=dict(SMALL_IMAGES, fps=2.0))
    hf = hf_model(family)
    ids = demo.token_ids(ph.tokenizer())
    hf.resize_token_embeddings(448, mean_resizing=False)
    for cfg in (hf.config, hf.config.text_config):
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                    "bos_token_id", "eos_token_id"):
            if hasattr(cfg, key):
                setattr(cfg, key, ids[key])
    hf.save_pretrained(directory)  # over the processor's stub config.json
    return directory


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    ph.noise_image(140, 84, seed=1).save(root / "wide.png")  # Qwen2.5: merged 3x5, two windows
    ph.noise_image(90, 60, seed=2).save(root / "small.png")
    (root / "frames").mkdir()
    # 2 temporal patches of 2 frames, 1 s each: a video whose Qwen2.5 positions transformers 5 numbers as the
    # Qwen reference does (whole seconds, (t - 1) * 2 < max(h', w'); facts §7 item 15a)
    for i in range(4):
        ph.noise_image(112, 84, seed=10 + i).save(root / "frames" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {f: tiny_checkpoint(f, root / f) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")}


def argv(model, media, images=("wide.png",), videos=(), *extra):
    args = ["--model", str(model), "--prompt", "Describe this.", "--device", "cpu", "--max-new-tokens", "6"]
    args += [x for name in images for x in ("--image", str(media / name))]
    args += [x for name in videos for x in ("--video", str(media / name))]
    return args + list(extra)


CASES = {  # family -> (images, videos): between them every input kind, two images, image + video passes
    "qwen2_vl": (("wide.png",), ()),
    "qwen2_5_vl": (("wide.png", "small.png"), ("frames",)),
    "qwen3_vl": (("wide.png",), ("frames",)),
    "qwen3_vl_moe": (("small.png",), ()),
}


@pytest.mark.parametrize("family", list(CASES))
def test_every_stage_equal_in_float32(family, checkpoints, media, capsys):
    images, videos = CASES[family]
    assert parity.main(argv(checkpoints[family], media, images, videos)) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "beyond tolerance" not in out
    vision = "[image]" if videos else ""
    stages = ["pixel_values", f"vision.patch_embed{vision}", f"vision.blocks.1{vision}",
              f"vision.merger{vision}", "embeddings", "position_ids", "text.layers.0", "text.layers.1",
              "text.norm", "logits", "generation"]
    if family.startswith("qwen3"):
        stages += [f"vision.pos_embed{vision}", f"vision.deepstack.1{vision}"]
    if videos:
        stages += ["pixel_values_videos", "vision.blocks.0[video]", "vision.merger[video]"]
    lines = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(stages) <= lines, set(stages) - lines
    assert "top-1 agree 100.0%" in out and "6 equal leading tokens" in out


def perturb(name):
    def modify(model):
        with torch.no_grad():
            p = model.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    return modify


@pytest.mark.parametrize("family, weight, stage, extra", [
    ("qwen2_5_vl", "model.visual.blocks.1.mlp.down_proj.weight", "vision.blocks.1", ["--every", "2"]),
    ("qwen3_vl", "model.language_model.layers.1.mlp.down_proj.weight", "text.layers.1", []),
    ("qwen3_vl", "model.visual.deepstack_merger_list.0.linear_fc2.weight", "vision.deepstack.0", []),
    ("qwen2_vl", "model.visual.merger.mlp.2.weight", "vision.merger", []),
])
def test_a_perturbed_layer_is_named(family, weight, stage, extra, checkpoints, media, capsys):
    code = parity.main(argv(checkpoints[family], media, ("wide.png",), (), *extra),
                       modify_minivl=perturb(weight))
    out = capsys.readouterr().out
    assert code == 1
    assert f"verdict: FAIL: first divergent stage: {stage} (relative difference" in out
    # the stages before it still agree; with --every 2 the hidden block 1 is printed because it diverges
    rows = [line.split()[0] for line in out.splitlines() if "<-- beyond tolerance" in line]
    assert rows[0] == stage


def test_position_ids_difference_is_located(checkpoints, media, capsys, monkeypatch):
    # minivl's positions shifted by one from the first vision token on: the tool says where
    import minivl.model
    from minivl.rope import get_rope_index

    def shifted(*args, **kw):
        pos, deltas = get_rope_index(*args, **kw)
        return torch.cat([pos[..., :5], pos[..., 5:] + 1], dim=-1), deltas

    monkeypatch.setattr(minivl.model, "get_rope_index", shifted)
    assert parity.main(argv(checkpoints["qwen2_vl"], media, ("wide.png",), (), "--max-new-tokens", "0")) == 1
    out = capsys.readouterr().out
    assert "first divergent stage: position_ids" in out and "first at token 5, row T" in out


def test_command_line(checkpoints, media):
    cmd = [sys.executable, "-m", "minivl.parity"] + argv(checkpoints["qwen2_5_vl"], media, ("wide.png",))
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vision.blocks.1" in run.stdout and "verdict: PASS" in run.stdout


def test_help_documents_the_tolerances(capsys):
    with pytest.raises(SystemExit) as stop:
        parity.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "float32 1e-04" in out and "bfloat16 1e-01" in out and "--trace" in out


def test_without_transformers_compare_says_so_and_trace_still_runs(checkpoints, media, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert parity.main(argv(checkpoints["qwen3_vl"], media)) == 2
    assert "pip install" in capsys.readouterr().err
    assert parity.main(argv(checkpoints["qwen3_vl"], media, ("wide.png",), ("frames",), "--trace")) == 0
    out = capsys.readouterr().out
    for stage in ("vision.patch_embed[image]", "vision.pos_embed[video]", "vision.deepstack.1[video]",
                  "vision.merger[video]", "text.layers.1", "logits", "DeepStack 0 at the"):
        assert stage in out


def test_trace_on_the_demo_model(tmp_path, capsys):
    import random

    model_dir = demo.make_checkpoint(tmp_path / "model")
    image, _, _ = demo.draw_shape(random.Random(0))
    image.save(tmp_path / "shape.png")
    code = parity.main(["--model", str(model_dir), "--image", str(tmp_path / "shape.png"), "--prompt",
                        demo.QUESTION, "--trace", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    # every stage of the demo's Qwen2.5 forward, in the order of the code
    stages = ["vision.patch_embed", "vision.blocks.0", "vision.blocks.1", "vision.merger", "embeddings",
              "position_ids", "text.layers.0", "text.layers.1", "text.norm", "logits"]
    at = [out.index(f"  {s} ") for s in stages]
    assert at == sorted(at)
    for fact in ("56x56 px -> 56x56 px", "grid (t, h, w) = (1, 4, 4)", "4 merged tokens", "1 window(s)",
                 "full attention per frame", "first (t, h, w): (15,15,15) (15,15,16) (15,16,15) (15,16,16)",
                 "TTTTHHHHHHWWWWWW", "next token (top 5"):
        assert fact in out, fact
