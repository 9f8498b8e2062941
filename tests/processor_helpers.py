"""Processor directories of each family (official preprocessor values, the demo tokenizer) and test images.

The demo tokenizer carries every Qwen special token, so one tokenizer serves all families; config.json holds
only the model_type and the token ids, which is all the processor reads from it.
"""

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from minivl import demo
from minivl.processor import CLIP_MEAN, CLIP_STD, Processor

# the published preprocessor_config.json values (facts §5.2)
PREPROCESSOR = {
    "qwen2_vl": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                 "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"},
    "qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
    "qwen3_vl": {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
                 "processor_class": "Qwen3VLProcessor"},
}
FAMILIES = tuple(PREPROCESSOR)


@lru_cache(maxsize=1)
def tokenizer():
    return demo.make_tokenizer()


def family_dir(directory, model_type, preprocessor=None, generation=True, video=None):
    """Write the processor files of one family into directory and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    ids = demo.token_ids(tok)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, **ids}))
    preprocessor = PREPROCESSOR[model_type] if preprocessor is None else preprocessor
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if video is not None:
        (directory / "video_preprocessor_config.json").write_text(json.dumps(video))
    (directory / "tokenizer_config.json").write_text(json.dumps(demo.tokenizer_config(tok)))
    if generation:
        (directory / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]], "pad_token_id": ids["pad_token_id"]}))
    return directory


def processor(tmp_path, model_type, **kw):
    return Processor.from_pretrained(family_dir(tmp_path / model_type, model_type, **kw))


def noise_image(width, height, seed=0, mode="RGB"):
    """Smooth gradients plus noise: both stress the bicubic filter. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(width + height - 2, 1)], -1)
    noise = rng.normal(0, 40, (height, width, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image = image.convert("RGBA")
        image.putalpha(alpha)
        return image
    return image if mode == "RGB" else image.convert(mode)
