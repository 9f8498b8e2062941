"""Image preprocessing against transformers' slow (PIL) Qwen2-VL image processor, plus loading and bad input.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use transformers' Qwen2VLImageProcessor class with their own
preprocessor_config.json (patch 14 / CLIP statistics, patch 16 / 0.5); each family is checked with its
published values and with small pixel limits that force the shrink and grow branches of smart_resize.
"""

import functools
import io
import json
import os

import numpy as np
import pytest
import torch
from processor_helpers import FAMILIES, PREPROCESSOR, family_dir, noise_image, processor

from minivl.processor import Processor, fit_total_pixels, smart_resize

# (width, height): tiny, square, odd, very wide, very tall, large; 25 sizes, aspect ratios up to 187
SIZES = [(5, 3), (10, 10), (27, 29), (28, 28), (56, 56), (100, 37), (333, 517), (640, 480), (480, 640),
         (1024, 1024), (1600, 1200), (2000, 20), (3000, 16), (15, 2500), (4, 700), (1280, 720), (720, 1280),
         (299, 299), (57, 1999), (1999, 57), (800, 33), (123, 45), (45, 123), (700, 700), (1111, 777)]
MODES = [("L", (200, 150)), ("RGBA", (150, 200)), ("P", (90, 91))]
SMALL = {"min_pixels": 112 * 112, "max_pixels": 256 * 28 * 28}


def hf_image_processor(directory):
    tf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return tf_pil.Qwen2VLImageProcessorPil.from_pretrained(directory)


@functools.lru_cache(maxsize=1)
def _images():
    out = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    return out + [noise_image(w, h, seed=99, mode=mode) for mode, (w, h) in MODES]


def images():
    return list(_images())


@pytest.mark.parametrize("limits", ["published", "small"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_images_equal_transformers(tmp_path, model_type, limits):
    pre = dict(PREPROCESSOR[model_type])
    if limits == "small":
        pre.pop("size", None)
        pre.update(SMALL)
    directory = family_dir(tmp_path, model_type, preprocessor=pre)
    ours, theirs = Processor.from_pretrained(directory), hf_image_processor(directory)
    worst = 0.0
    for image in images():
        mine = ours.process_images([image])
        ref = theirs(images=[image], return_tensors="np")
        assert mine["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist(), image.size
        assert mine["pixel_values"].shape == ref["pixel_values"].shape
        worst = max(worst, float(np.abs(mine["pixel_values"].numpy() - ref["pixel_values"]).max()))
    assert worst <= 1e-5
    # several images of one sample: rows concatenated in order
    batch = images()[:6]
    mine = ours.process_images(batch)
    ref = theirs(images=batch, return_tensors="np")
    assert mine["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert np.abs(mine["pixel_values"].numpy() - ref["pixel_values"]).max() <= 1e-5


def test_known_grids(tmp_path):
    # 448x448 -> (1, 32, 32) for Qwen2.5 and (1, 28, 28) for Qwen3 (facts §5.5); tiny images grow to the minimum
    image = noise_image(448, 448)
    assert processor(tmp_path, "qwen2_5_vl").process_images([image])["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert processor(tmp_path, "qwen3_vl").process_images([image])["image_grid_thw"].tolist() == [[1, 28, 28]]
    assert processor(tmp_path, "qwen3_vl").process_images([noise_image(10, 10)])["image_grid_thw"].tolist() \
        == [[1, 16, 16]]                               # 65536 pixels = 256x256 = 16x16 patches of 16
    assert smart_resize(1080, 1920, 28, 3136, 12845056) == (1092, 1932)
    assert smart_resize(1080, 1920, 28, 3136, 256 * 28 * 28) == (336, 588)


def test_aspect_ratio_error_names_the_size(tmp_path):
    p = processor(tmp_path, "qwen2_5_vl")
    with pytest.raises(ValueError, match=r"1000x4 pixels.*aspect ratio 250.0"):
        p.process_images([noise_image(1000, 4)])
    with pytest.raises(ValueError):      # transformers refuses it as well
        hf_image_processor(tmp_path / "qwen2_5_vl")(images=[noise_image(1000, 4)])


def test_image_input_kinds(tmp_path):
    p = processor(tmp_path, "qwen2_5_vl")
    image = noise_image(90, 60, seed=3)
    path = tmp_path / "a.png"
    image.save(path)
    data = path.read_bytes()
    ref = p.process_images([image])["pixel_values"]
    for kind in (str(path), path, f"file://{path}", data, {"bytes": data}, {"bytes": None, "path": str(path)},
                 {"image": str(path)}):
        assert torch.equal(p.process_images([kind])["pixel_values"], ref), kind
    # the same image inside a conversation
    conv = [{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "hi"}]}]
    assert torch.equal(p(conv)["pixel_values"], ref)


def test_bad_images_are_named(tmp_path):
    p = processor(tmp_path, "qwen2_5_vl")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        p.process_images([str(tmp_path / "nope.png")])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file: .*notes.txt"):
        p.process_images([str(text)])
    with pytest.raises(ValueError, match="bytes given as an image are not a readable image"):
        p.process_images([b"garbage"])
    with pytest.raises(TypeError, match="cannot read an image from int"):
        p.process_images([3])


def test_per_image_limits_and_env(tmp_path, monkeypatch):
    image = noise_image(640, 480)
    p = processor(tmp_path, "qwen2_5_vl")
    assert p.process_images([image])["image_grid_thw"].tolist() == [[1, 34, 46]]
    item = {"image": image, "max_pixels": 64 * 28 * 28}
    assert p.process_images([item])["image_grid_thw"].tolist() == [[1, 12, 18]]
    assert p.process_images([image], max_pixels=64 * 28 * 28)["image_grid_thw"].tolist() == [[1, 12, 18]]
    conv = [{"role": "user", "content": [{"type": "image", "image": image, "max_pixels": 64 * 28 * 28}]}]
    assert p(conv)["image_grid_thw"].tolist() == [[1, 12, 18]]
    # ms-swift users set MAX_PIXELS / MIN_PIXELS in the environment; read when the processor is made
    monkeypatch.setenv("MAX_PIXELS", str(64 * 28 * 28))
    monkeypatch.setenv("MIN_PIXELS", str(32 * 28 * 28))
    p = Processor.from_pretrained(tmp_path / "qwen2_5_vl")
    assert (p.vision.min_pixels, p.vision.max_pixels) == (32 * 28 * 28, 64 * 28 * 28)
    assert p.process_images([image])["image_grid_thw"].tolist() == [[1, 12, 18]]
    assert p.process_images([noise_image(20, 20)])["image_grid_thw"].tolist() == [[1, 12, 12]]
    # an argument wins over the environment
    p = Processor.from_pretrained(tmp_path / "qwen2_5_vl", max_pixels=16 * 28 * 28, min_pixels=4 * 28 * 28)
    assert p.process_images([image])["image_grid_thw"].tolist() == [[1, 6, 8]]


def test_total_pixel_budget_scales_images_together(tmp_path):
    p = processor(tmp_path, "qwen2_5_vl")
    sample = [noise_image(640, 480), noise_image(480, 640), noise_image(300, 300)]
    free = p.process_images(sample)["image_grid_thw"]
    budget = 1000 * 28 * 28 // 2
    got = p.process_images(sample, max_total_pixels=budget)["image_grid_thw"]
    areas = [int(h * w) * 14 * 14 for _, h, w in got.tolist()]
    assert sum(areas) <= budget < sum(int(h * w) * 14 * 14 for _, h, w in free.tolist())
    ratios = [(g[1] * g[2] / (f[1] * f[2])).item() for g, f in zip(got, free)]
    assert max(ratios) - min(ratios) < 0.15 and max(ratios) < 0.6       # all shrunk by about the same factor
    # a budget below the processor's own totals is the default for every call
    p.max_total_pixels = budget
    assert p.process_images(sample)["image_grid_thw"].tolist() == got.tolist()
    with pytest.raises(ValueError, match="cannot hold 3 images"):
        fit_total_pixels([(100, 100)] * 3, 28, 3136, 12845056, max_total_pixels=2 * 28 * 28)


def test_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type 'llava'"):
        Processor.from_pretrained(family_dir(tmp_path / "x", "llava", preprocessor={}))
    d = family_dir(tmp_path / "q3", "qwen3_vl", generation=False)
    p = Processor.from_pretrained(d)
    assert p.eos_token_ids == [p.im_end_token_id]                      # no generation_config.json
    assert p.pad_token_id == p.tokenizer.token_to_id("<|endoftext|>")
    assert (p.vision.patch_size, p.vision.min_pixels, p.vision.image_mean) == (16, 65536, (0.5, 0.5, 0.5))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "image_token_id": 7}))
    with pytest.raises(ValueError, match="image_token_id=7 but the tokenizer gives"):
        Processor.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Processor.from_pretrained(str(tmp_path / "missing"))


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    # a snapshot laid out as huggingface_hub caches it; offline, the hub id resolves to it without a network
    snapshot = tmp_path / "hub" / "models--someone--tiny-qwen" / "snapshots" / ("a" * 40)
    family_dir(snapshot, "qwen2_5_vl")
    (tmp_path / "hub" / "models--someone--tiny-qwen" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-qwen" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    p = Processor.from_pretrained("someone/tiny-qwen")
    assert p.model_type == "qwen2_5_vl"


def test_bytes_dict_like_parquet(tmp_path):
    # LLaMA-Factory / HF datasets store images as {"bytes": png, "path": name}
    p = processor(tmp_path, "qwen2_5_vl")
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, format="PNG")
    conv = [{"role": "user", "content": "<image>What is it?"}]
    out = p(conv, images=[{"bytes": buf.getvalue(), "path": "x.png"}])
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


@pytest.mark.skipif(os.environ.get("MINIVL_FAST_PROCESSOR") is None,
                    reason="measures transformers' torchvision processor; set MINIVL_FAST_PROCESSOR=1 with "
                           "torchvision installed")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_fast_processor_differences(tmp_path, model_type):
    # the torchvision processor resizes with antialiased bicubic on tensors: same grids, slightly other values
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    directory = family_dir(tmp_path, model_type)
    ours, fast = Processor.from_pretrained(directory), Qwen2VLImageProcessor.from_pretrained(directory)
    diffs = []
    for image in images():
        mine = ours.process_images([image])
        ref = fast(images=[image], return_tensors="np")
        assert mine["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        d = np.abs(mine["pixel_values"].numpy() - ref["pixel_values"])
        diffs.append((image.size, float(d.max()), float(d.mean())))
    print(model_type, "max", max(m for _, m, _ in diffs), "mean", np.mean([a for *_, a in diffs]))
    for size, mx, mean in diffs:
        print(f"  {size}: max {mx:.4f} mean {mean:.5f}")
