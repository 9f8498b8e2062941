"""Image preprocessing against transformers' two Qwen2-VL image processors, plus loading and bad input.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use transformers' Qwen2-VL image processor with their own
preprocessor_config.json (patch 14 / CLIP statistics, patch 16 / 0.5); each family is checked with its
published values and with small pixel limits that force the shrink and grow branches of smart_resize.
The PIL path (use_fast=False) is checked against transformers' PIL processor everywhere; the default torch path
against transformers' torchvision processor where torchvision imports, and everywhere against a float64
reference of the resampling written out below.
"""

import functools
import io
import json

import numpy as np
import pytest
import torch
from processor_helpers import FAMILIES, PREPROCESSOR, family_dir, noise_image, processor

from minivl.processor import Processor, VisionSettings, family_defaults, fit_total_pixels, smart_resize

# (width, height): tiny, square, odd, very wide, very tall, large; 25 sizes, aspect ratios up to 187
SIZES = [(5, 3), (10, 10), (27, 29), (28, 28), (56, 56), (100, 37), (333, 517), (640, 480), (480, 640),
         (1024, 1024), (1600, 1200), (2000, 20), (3000, 16), (15, 2500), (4, 700), (1280, 720), (720, 1280),
         (299, 299), (57, 1999), (1999, 57), (800, 33), (123, 45), (45, 123), (700, 700), (1111, 777)]
MODES = [("L", (200, 150)), ("RGBA", (150, 200)), ("P", (90, 91))]
SMALL = {"min_pixels": 112 * 112, "max_pixels": 256 * 28 * 28}


def hf_image_processor(directory):
    tf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return tf_pil.Qwen2VLImageProcessorPil.from_pretrained(directory)


def hf_fast_image_processor(directory):
    try:  # PyPI's torchvision wheels need the CUDA build of torch: beside a CPU-only torch they do not import
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"transformers' torchvision processor does not import: {e}")
    return Qwen2VLImageProcessor.from_pretrained(directory)


@functools.lru_cache(maxsize=1)
def _images():
    out = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    return out + [noise_image(w, h, seed=99, mode=mode) for mode, (w, h) in MODES]


def images():
    return list(_images())


@pytest.mark.parametrize("use_fast", [False, True])
@pytest.mark.parametrize("limits", ["published", "small"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_images_equal_transformers(tmp_path, model_type, limits, use_fast):
    pre = dict(PREPROCESSOR[model_type])
    if limits == "small":
        pre.pop("size", None)
        pre.update(SMALL)
    directory = family_dir(tmp_path, model_type, preprocessor=pre)
    ours = Processor.from_pretrained(directory, use_fast=use_fast)
    theirs = (hf_fast_image_processor if use_fast else hf_image_processor)(directory)
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


def resample_reference(image, height, width, a=-0.5, clamp_between_passes=True, antialias=True):
    """Antialiased bicubic resampling in float64, (H, W, C) uint8 -> (height, width, C), written from its
    definition: each output pixel a normalised weighted sum of the input pixels within 2 * max(scale, 1) of its
    centre, cubic weights (a = -0.5, the antialiasing kernel of PIL and torch) stretched by max(scale, 1); the
    width first, rounded and clamped to uint8, then the height (torch's uint8 kernel keeps PIL's order)."""
    def weights(n_in, n_out):
        scale = n_in / n_out
        stretch = max(scale, 1.0) if antialias else 1.0
        out = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
            x = np.abs((np.arange(lo, hi) - centre + 0.5) / stretch)
            w = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                         np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
            out[i, lo:hi] = w / w.sum()
        return out

    def to_uint8(x):
        return np.clip(np.round(x), 0, 255)

    x = np.asarray(image, dtype=np.float64).transpose(0, 2, 1)  # (H, C, W)
    x = x @ weights(x.shape[-1], width).T  # (H, C, width)
    x = to_uint8(x) if clamp_between_passes else x
    x = weights(x.shape[0], height) @ x.reshape(x.shape[0], -1)  # (height, C * width)
    return to_uint8(x.reshape(height, -1, width).transpose(0, 2, 1))  # (height, width, C)


# upscaled, downscaled, one side each way, squeezed to a strip: the resize cases of the processor
RESIZES = [((100, 37), (112, 56)), ((333, 517), (336, 504)), ((10, 10), (256, 256)), ((300, 300), (100, 100)),
           ((700, 20), (644, 28)), ((777, 555), (308, 224))]


def test_fast_resize_equals_a_float64_reference():
    from minivl.processor import normalize_frames_torch

    identity = VisionSettings(patch_size=14, min_pixels=0, max_pixels=0, image_mean=(0, 0, 0),
                              image_std=(1, 1, 1), rescale_factor=1.0)
    wrong_ways = (dict(a=-0.75), dict(clamp_between_passes=False), dict(antialias=False))
    worst_wrong = [0.0] * len(wrong_ways)
    for seed, ((w, h), (tw, th)) in enumerate(RESIZES):
        image = noise_image(w, h, seed=seed)
        ours = normalize_frames_torch([image], th, tw, identity)[0].transpose(1, 2, 0)  # (th, tw, C) in 0..255
        diff = np.abs(ours - resample_reference(image, th, tw))
        # torch weighs in 16-bit fixed point: a rounding step now and then, never more than two
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02, ((w, h), diff.max(), (diff > 0).mean())
        for k, wrong in enumerate(wrong_ways):
            off = np.abs(ours - resample_reference(image, th, tw, **wrong)).max()
            worst_wrong[k] = max(worst_wrong[k], off)
        same_size = normalize_frames_torch([image], h, w, identity)[0].transpose(1, 2, 0)
        assert np.array_equal(same_size, np.asarray(image))
    # each way of getting it wrong moves these noisy images by many levels somewhere
    assert min(worst_wrong) >= 10, worst_wrong


def test_fast_normalisation_in_float32():
    # transformers fuses rescale and normalise: (x - mean / rescale) / (std / rescale), in float32
    from minivl.processor import normalize_frames_torch

    image = noise_image(64, 48, seed=5)
    for settings in (family_defaults("qwen2_5_vl").vision, family_defaults("qwen3_vl").vision):
        ours = normalize_frames_torch([image], 48, 64, settings)[0]
        x = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)
        mean, std = (np.array(v)[:, None, None] for v in (settings.image_mean, settings.image_std))
        ref = (x / 255 - mean) / std
        assert ours.dtype == np.float32 and np.abs(ours - ref).max() < 1e-5


def test_use_fast_picks_the_path(tmp_path):
    directory = family_dir(tmp_path, "qwen2_5_vl")
    image = noise_image(100, 37, seed=1)  # upscaled, where the two resamplers differ most
    default, fast, pil = (Processor.from_pretrained(directory, **kw) for kw in ({}, {"use_fast": True},
                                                                                 {"use_fast": False}))
    assert default.use_fast and fast.use_fast and not pil.use_fast
    rows = {name: p.process_images([image])["pixel_values"] for name, p in
            (("default", default), ("fast", fast), ("pil", pil))}
    assert torch.equal(rows["default"], rows["fast"])
    # the resamplers part on this upscaled image (by up to 17 grey levels with torch 2.13, fewer with 2.11)
    assert not torch.equal(rows["fast"], rows["pil"])


@pytest.mark.parametrize("use_fast", [None, True, False])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_use_fast_chooses_as_transformers_auto_image_processor(tmp_path, model_type, use_fast):
    # a use_fast key in the file changes nothing in transformers 5.17, nor does image_processor_type
    directory = family_dir(tmp_path, model_type, preprocessor={**PREPROCESSOR[model_type], "use_fast": False})
    hf_fast_image_processor(directory)  # skips where transformers' torchvision processor does not import
    from transformers import AutoImageProcessor

    kw = {} if use_fast is None else {"use_fast": use_fast}
    ours, theirs = Processor.from_pretrained(directory, **kw), AutoImageProcessor.from_pretrained(directory, **kw)
    image = noise_image(100, 37, seed=1)
    ref = theirs(images=[image], return_tensors="np")["pixel_values"]
    assert np.abs(ours.process_images([image])["pixel_values"].numpy() - ref).max() <= 1e-5


def test_preprocessor_fields_left_out_take_transformers_defaults(tmp_path):
    # transformers' class defaults: patch 14, CLIP statistics, 3136..1003520 pixels, whatever the family
    pre = {"image_processor_type": "Qwen2VLImageProcessorFast"}
    directory = family_dir(tmp_path, "qwen3_vl", preprocessor=pre)
    ours, theirs = Processor.from_pretrained(directory, use_fast=False), hf_image_processor(directory)
    assert ours.vision == VisionSettings(patch_size=14, min_pixels=3136, max_pixels=1003520)
    for image in images()[:8]:
        mine, ref = ours.process_images([image]), theirs(images=[image], return_tensors="np")
        assert mine["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        assert np.abs(mine["pixel_values"].numpy() - ref["pixel_values"]).max() <= 1e-5


@pytest.mark.parametrize("field,value", [("do_resize", False), ("do_normalize", False), ("do_rescale", False),
                                         ("do_convert_rgb", False), ("resample", 2)])
def test_preprocessor_values_minivl_does_not_compute_are_refused(tmp_path, field, value):
    pre = {**PREPROCESSOR["qwen2_5_vl"], field: value}
    with pytest.raises(ValueError, match=rf"preprocessor_config.json sets {field}={value!r}"):
        Processor.from_pretrained(family_dir(tmp_path, "qwen2_5_vl", preprocessor=pre))
    video = {field: value}
    with pytest.raises(ValueError, match=rf"video_preprocessor_config.json sets {field}={value!r}"):
        Processor.from_pretrained(family_dir(tmp_path / "v", "qwen2_5_vl", video=video))


def test_preprocessor_size_needs_both_edges(tmp_path):
    pre = {**PREPROCESSOR["qwen3_vl"], "size": {"shortest_edge": 65536}}
    with pytest.raises(ValueError, match=r"size=\{'shortest_edge': 65536\} needs shortest_edge and"):
        Processor.from_pretrained(family_dir(tmp_path, "qwen3_vl", preprocessor=pre))
    pre["max_pixels"] = 2**20  # as in transformers, max_pixels fills the missing edge
    p = Processor.from_pretrained(family_dir(tmp_path, "qwen3_vl", preprocessor=pre))
    assert (p.vision.min_pixels, p.vision.max_pixels) == (65536, 2**20)


def test_video_config_must_agree_with_the_images(tmp_path):
    ok = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "fps": 1.0}
    assert Processor.from_pretrained(family_dir(tmp_path / "a", "qwen3_vl", video=ok)).family.video.fps == 1.0
    with pytest.raises(ValueError, match=r"video_preprocessor_config.json sets patch_size=14 but the images use"):
        Processor.from_pretrained(family_dir(tmp_path / "b", "qwen3_vl", video={**ok, "patch_size": 14}))
    with pytest.raises(ValueError, match=r"sets image_std=\[0.3, 0.3, 0.3\] but the images use \(0.5, 0.5, 0.5"):
        Processor.from_pretrained(family_dir(tmp_path / "c", "qwen3_vl", video={**ok, "image_std": [0.3] * 3}))


@pytest.mark.parametrize("gen,message", [({"eos_token_id": "<|im_end|>"}, "eos_token_id='<|im_end|>' is "),
                                         ({"eos_token_id": []}, r"eos_token_id=\[\] is neither"),
                                         ({"eos_token_id": [5, 10**7]}, r"eos_token_id=\[5, 10000000\] names"),
                                         ({"pad_token_id": 1.5}, "pad_token_id=1.5 is neither")])
def test_generation_config_ids_are_checked(tmp_path, gen, message):
    directory = family_dir(tmp_path, "qwen2_5_vl")
    (directory / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        Processor.from_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "pad_token_id": 3}))
    p = Processor.from_pretrained(directory)
    assert (p.eos_token_ids, p.pad_token_id) == ([7], 3)
