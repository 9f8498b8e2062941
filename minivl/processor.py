"""The Qwen-VL processor: images, videos, chat template and tokenizer in one object, without transformers.

    processor = Processor.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")   # or a local checkpoint directory
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(conversations)          # input_ids, attention_mask, pixel_values, image_grid_thw, ...
    batch = processor(conversations, return_labels=True)                 # + labels for training

Images follow one of transformers' two Qwen2-VL image processors: smart_resize, resize, rescale, normalize, and
the patch order the vision tower expects. `use_fast` picks which, as transformers 5 does: by default (and with
use_fast=True) its torchvision processor, antialiased bicubic on the uint8 tensor, written here with plain
torch; with use_fast=False its PIL processor, PIL bicubic. The two differ by about 2 grey levels on most
images and by up to 17 on noisy upscaled ones. Videos follow qwen-vl-utils (frame sampling at 2 fps, per-frame
pixel budget) and are resized like transformers' video processor, which has only the torchvision path. The
chat templates are written in Python, one small function per family, equal to the Jinja templates shipped with
the checkpoints.

What it simplifies: no Jinja engine (custom templates are not rendered), no tool calls, no URLs.
Tests: tests/test_processor.py, test_chat_template.py, test_video.py.

Legend: F frames, C channels (3), H/W pixels, P patch size, T temporal patch size (2), M merge size (2),
N patches, L tokens.
"""

import io
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch.nn.functional import interpolate

from .checkpoint import resolve

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
IGNORE_INDEX = -100
QWEN2_SYSTEM = "You are a helpful assistant."

# qwen-vl-utils video constants (fps, frame counts, tokens per frame, total budget in tokens)
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
VIDEO_TOTAL_TOKENS = 128000 * 0.9


@dataclass
class VisionSettings:
    """What preprocessor_config.json holds; videos use the same patches and statistics."""
    patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = 1 / 255

    @property
    def factor(self):
        return self.patch_size * self.merge_size


@dataclass
class VideoSettings:
    """qwen-vl-utils' video defaults; video_preprocessor_config.json may set the frame counts and pixel limits."""
    fps: float = VIDEO_FPS
    min_frames: int = VIDEO_MIN_FRAMES
    max_frames: int = VIDEO_MAX_FRAMES
    min_pixels: int | None = None      # per frame; None = 128 tokens
    max_pixels: int | None = None      # per frame cap; None = 768 tokens
    total_pixels: int | None = None    # whole clip; None = 128000 * 0.9 tokens


@dataclass
class Family:
    """What differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL on the input side."""
    vision: VisionSettings
    template: str                   # "qwen2" (Qwen2-VL, Qwen2.5-VL) or "qwen3" chat template
    default_system: str | None      # emitted when the conversation has no system turn
    second_per_grid_ts: bool        # Qwen2.5 passes seconds per temporal patch to the rope index
    timestamps: bool                # Qwen3 writes "<x.x seconds>" before each temporal patch
    video: VideoSettings = field(default_factory=VideoSettings)


def family_defaults(model_type):
    qwen2 = VisionSettings(patch_size=14, min_pixels=56 * 56, max_pixels=16384 * 28 * 28)
    qwen3 = VisionSettings(patch_size=16, min_pixels=65536, max_pixels=16384 * 32 * 32,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    if model_type == "qwen2_vl":
        return Family(qwen2, "qwen2", QWEN2_SYSTEM, second_per_grid_ts=False, timestamps=False)
    if model_type == "qwen2_5_vl":
        return Family(qwen2, "qwen2", QWEN2_SYSTEM, second_per_grid_ts=True, timestamps=False)
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return Family(qwen3, "qwen3", None, second_per_grid_ts=False, timestamps=True)
    raise ValueError(f"unknown model_type {model_type!r}: minivl knows qwen2_vl, qwen2_5_vl, qwen3_vl, "
                     "qwen3_vl_moe")


# ------------------------------------------------------------------------------------------------- images

def open_image(image, decode=True):
    """A path (str, Path, file://...), PIL image, bytes, or a {"bytes": ..., "path": ...} dict -> PIL image.
    decode=False reads the header only (size and mode): a length check needs no pixels."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path") is not None:
            image = image["path"]
        elif image.get("url") is not None:
            image = image["url"]
        else:
            raise ValueError(f"image dict needs a 'bytes' or 'path' key, got keys {sorted(image)}")
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        try:
            pil = Image.open(io.BytesIO(image))
            if decode:
                pil.load()
        except (Image.UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{len(image)} bytes given as an image are not a readable image: {e}") from None
        return pil
    if isinstance(image, (str, Path)):
        path = str(image)
        if path.startswith(("http://", "https://")):
            raise ValueError(f"image URLs are not fetched: download {path} and pass the file")
        path = path[len("file://"):] if path.startswith("file://") else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            pil = Image.open(path)
            if decode:
                pil.load()                  # decode now: a truncated file fails here, and the file is closed
            else:
                pil.close()                 # size and mode stay readable
        except (Image.UnidentifiedImageError, OSError) as e:
            raise ValueError(f"not an image file: {path} ({e})") from None
        return pil
    raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, PIL image, bytes "
                    "or {'bytes': ...}")


def load_image(image):
    """An image as open_image takes it -> decoded RGB PIL image."""
    pil = open_image(image)
    # transformers' convert_to_rgb: mode conversion, alpha dropped (not composited)
    return pil if pil.mode == "RGB" else pil.convert("RGB")


# transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize
def smart_resize(height, width, factor, min_pixels, max_pixels):
    """Both sides a multiple of factor, area within [min_pixels, max_pixels], aspect ratio about kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image of {width}x{height} pixels (width x height) is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height} pixels (width x height) has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f}, above the limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_total_pixels(sizes, factor, min_pixels, max_pixels, max_total_pixels=None):
    """smart_resize for all images of one sample, then one common shrink when their sum exceeds the budget.

    sizes: [(height, width)] of the originals; min/max_pixels: one value or one per image. Returns [(h, w)].
    """
    n = len(sizes)
    mins = min_pixels if isinstance(min_pixels, (list, tuple)) else [min_pixels] * n
    maxs = max_pixels if isinstance(max_pixels, (list, tuple)) else [max_pixels] * n
    targets = [smart_resize(h, w, factor, lo, hi) for (h, w), lo, hi in zip(sizes, mins, maxs)]
    if max_total_pixels is None or sum(h * w for h, w in targets) <= max_total_pixels:
        return targets
    if n * factor * factor > max_total_pixels:
        raise ValueError(f"max_total_pixels={max_total_pixels} cannot hold {n} images: each needs at least "
                         f"{factor}x{factor} pixels")
    # every image keeps its share of the unconstrained total; flooring in smart_resize can leave the sum a
    # little high only through the factor x factor minimum, so shrink a bit more until it fits
    first = [h * w for h, w in targets]
    scale = max_total_pixels / sum(first)
    for _ in range(100):
        caps = [area * scale for area in first]
        targets = [smart_resize(h, w, factor, min(lo, cap), cap) for (h, w), lo, cap in zip(sizes, mins, caps)]
        if sum(h * w for h, w in targets) <= max_total_pixels:
            return targets
        scale *= 0.95
    raise ValueError(f"could not fit {n} images of sizes {sizes} into max_total_pixels={max_total_pixels}")


def normalize_frames(frames, height, width, settings):
    """PIL frames -> float32 array (F, C, H, W): PIL bicubic resize, rescale, normalize, as transformers' PIL
    image processor (Qwen2VLImageProcessorPil)."""
    arrays = []
    for frame in frames:
        if frame.size != (width, height):
            frame = frame.resize((width, height), resample=Image.BICUBIC)
        arrays.append(np.asarray(frame))                                     # (H, W, C) uint8
    x = np.stack(arrays).transpose(0, 3, 1, 2)                               # (F, C, H, W)
    # rescale in float64 then cast, normalize in float32: bit-equal to transformers' numpy path
    x = (x.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def normalize_frames_torch(frames, height, width, settings):
    """PIL frames -> float32 array (F, C, H, W) as transformers' torchvision image and video processors give it
    (Qwen2VLImageProcessor, Qwen2VLVideoProcessor) on the CPU: the uint8 frames resized by torchvision's
    resize, which on the CPU is interpolate on the uint8 tensor itself (bicubic, antialiased, align_corners
    False; torch's uint8 kernel rounds and clamps to uint8 between its width and height passes, as PIL does),
    then rescale and normalize fused into one float32 step."""
    x = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames])).permute(0, 3, 1, 2)  # (F, C, H, W)
    if x.shape[-2:] != (height, width):
        x = interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    # (x * rescale - mean) / std, written as transformers fuses it: (x - mean / rescale) / (std / rescale)
    mean = torch.tensor(settings.image_mean) * (1.0 / settings.rescale_factor)
    std = torch.tensor(settings.image_std) * (1.0 / settings.rescale_factor)
    return ((x.float() - mean[:, None, None]) / std[:, None, None]).numpy()


# §5.4 of the facts sheet: transformers' Qwen2-VL patchify (image and video processors)
def patchify(frames, settings):
    """(F, C, H, W) -> pixel rows (N, C*T*P*P) in merge-block order, and the grid (t, h, w) in patches."""
    P, M, T = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    if frames.shape[0] % T:
        # an image (or an odd clip) repeats its last frame to fill the temporal patch
        pad = np.repeat(frames[-1:], T - frames.shape[0] % T, axis=0)
        frames = np.concatenate([frames, pad])
    F, C, H, W = frames.shape
    t, h, w = F // T, H // P, W // P
    x = frames.reshape(t, T, C, h // M, M, P, w // M, M, P)
    # frame group, block row, block col, row in block, col in block | channel, time, patch row, patch col
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)                               # (t, h/M, w/M, M, M, C, T, P, P)
    x = np.ascontiguousarray(x).reshape(t * h * w, C * T * P * P)            # (N, C*T*P*P)
    return x, (t, h, w)


# ------------------------------------------------------------------------------------------------- videos

# qwen_vl_utils.vision_process.smart_nframes
def sample_frame_indices(total_frames, video_fps, fps=VIDEO_FPS, min_frames=VIDEO_MIN_FRAMES,
                         max_frames=VIDEO_MAX_FRAMES, nframes=None):
    """Which frames of a decoded video the model sees: fps per second, an even count, clamped."""
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        lo = math.ceil(min_frames / 2) * 2
        hi = math.floor(min(max_frames, total_frames) / 2) * 2
        n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
        n = math.floor(n / 2) * 2
    if not 2 <= n <= total_frames:
        raise ValueError(f"a video of {total_frames} frames cannot give {n} frames: the model needs an even count "
                         f"of at least 2 frames, at most the video's length")
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def read_video(path, fps=VIDEO_FPS, min_frames=VIDEO_MIN_FRAMES, max_frames=VIDEO_MAX_FRAMES, nframes=None):
    """Decode a video file with PyAV -> (sampled PIL frames, their indices, the file's frame rate, frame count)."""
    try:
        import av
    except ImportError:
        raise ImportError(f"reading the video file {path} needs PyAV: pip install av "
                          "(or pass the video as a list of frames)") from None
    path = str(path)
    path = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    with av.open(path) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        if video_fps <= 0:
            raise ValueError(f"video file {path} has no frame rate")
        total = stream.frames or sum(1 for _ in container.decode(video=0))
        indices = sample_frame_indices(total, video_fps, fps, min_frames, max_frames, nframes)
        container.seek(0)
        wanted, frames = set(indices), {}
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_image()
            if i >= indices[-1]:
                break
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ValueError(f"video file {path} said {total} frames but frames {missing[:5]} could not be decoded")
    return [frames[i] for i in indices], indices, video_fps, total


# qwen_vl_utils.vision_process.fetch_video (pixel budget part)
def video_frame_pixels(nframes, factor, min_pixels=None, max_pixels=None, total_pixels=None, frame_cap=None):
    """Per-frame (min_pixels, max_pixels): the clip's total budget shared by its frames, capped per frame.

    min_pixels / max_pixels / total_pixels: the video item's keys (qwen-vl-utils); frame_cap: the per-frame cap.
    """
    min_pixels = VIDEO_MIN_TOKENS * factor**2 if min_pixels is None else min_pixels
    total_pixels = VIDEO_TOTAL_TOKENS * factor**2 if total_pixels is None else total_pixels
    frame_cap = VIDEO_MAX_TOKENS * factor**2 if frame_cap is None else frame_cap
    budget = max(min(frame_cap, total_pixels / nframes * 2), int(min_pixels * 1.05))
    return min_pixels, budget if max_pixels is None else min(max_pixels, budget)


# transformers Qwen3VLProcessor._calculate_timestamps (with temporal_patch_size, as fixed in PR #43659)
def temporal_patch_timestamps(indices, video_fps, temporal_patch_size=2):
    """Seconds of each temporal patch: the mean of the times of its first and last frame."""
    indices = list(indices)
    while len(indices) % temporal_patch_size:
        indices.append(indices[-1])
    seconds = [i / video_fps for i in indices]
    T = temporal_patch_size
    return [(seconds[k] + seconds[k + T - 1]) / 2 for k in range(0, len(seconds), T)]


# ------------------------------------------------------------------------------------------ chat templates

VISION_IDS = {"image": "Picture", "video": "Video"}


def content_items(content):
    """A turn's content as a list of items; a plain string is one text item (both render the same)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"turn content must be a string or a list of items, got {type(content).__name__}")
    items = []
    for item in content:
        if isinstance(item, str):
            item = {"type": "text", "text": item}
        if not isinstance(item, dict):
            raise TypeError(f"a content item is a dict like {{'type': 'text', 'text': ...}}, got {item!r:.100}")
        kind = item.get("type") or next((k for k in ("image", "image_url", "video", "text") if k in item), None)
        kind = "image" if kind == "image_url" else kind
        if kind not in ("image", "video", "text"):
            raise ValueError(f"unknown content type {item.get('type')!r} in item with keys {sorted(item)}: "
                             "expected 'image', 'video' or 'text'")
        if kind not in item and not (kind == "image" and "image_url" in item):
            raise ValueError(f"a {kind!r} item needs a {kind!r} key, got keys {sorted(item)}")
        items.append({**item, "type": kind})
    return items


def render_items(items, counts, add_vision_id, placeholder):
    out = []
    for item in items:
        if item["type"] == "text":
            out.append(item["text"])
            continue
        kind = item["type"]
        counts[kind] += 1
        if add_vision_id:
            out.append(f"{VISION_IDS[kind]} {counts[kind]}: ")
        out.append(placeholder(kind, counts[kind] - 1))
    return "".join(out)


# the chat_template.json of Qwen2-VL / Qwen2.5-VL
def render_qwen2(conversation, add_generation_prompt, default_system, add_vision_id, placeholder):
    """[(text, is_assistant_answer)] pieces; the answer pieces are the assistant content and its <|im_end|>."""
    pieces, counts = [], {"image": 0, "video": 0}
    if conversation[0]["role"] != "system" and default_system is not None:
        pieces.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for turn in conversation:
        body = render_items(content_items(turn["content"]), counts, add_vision_id, placeholder)
        answer = turn["role"] == "assistant"
        pieces += [(f"<|im_start|>{turn['role']}\n", False), (body + "<|im_end|>", answer), ("\n", False)]
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


# the chat_template.json of Qwen3-VL Instruct, without tools
def render_qwen3(conversation, add_generation_prompt, default_system, add_vision_id, placeholder):
    pieces, counts = [], {"image": 0, "video": 0}
    system = default_system
    if conversation[0]["role"] == "system":
        items = content_items(conversation[0]["content"])
        if any(item["type"] != "text" for item in items):
            raise ValueError("Qwen3-VL: a system turn cannot contain images or videos")
        system = "".join(item["text"] for item in items)
        conversation = conversation[1:]
    if system is not None:
        pieces.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
    for turn in conversation:
        items = content_items(turn["content"])
        if turn["role"] == "system":
            # the official template drops it without a word; refuse rather than lose the text
            raise ValueError("Qwen3-VL: a system turn is only allowed first in the conversation")
        if turn["role"] == "assistant" and any(item["type"] != "text" for item in items):
            raise ValueError("Qwen3-VL: an assistant turn cannot contain images or videos")
        body = render_items(items, counts, add_vision_id, placeholder)
        answer = turn["role"] == "assistant"
        pieces += [(f"<|im_start|>{turn['role']}\n", False), (body + "<|im_end|>", answer), ("\n", False)]
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def check_conversation(conversation):
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} turns")
    for turn in conversation:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"each turn needs 'role' and 'content', got {turn!r:.200}")
        if turn["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {turn['role']!r}: expected 'system', 'user' or 'assistant' "
                             "(tool turns are not supported)")


def split_placeholders(conversation, images, videos):
    """ms-swift style: '<image>' / '<video>' in the text take the next entry of images / videos, in order."""
    tags = {"<image>": "image", "<video>": "video"}
    media = {"image": list(images or []), "video": list(videos or [])}
    used = {"image": 0, "video": 0}
    out = []
    for turn in conversation:
        items = []
        for item in content_items(turn["content"]):
            if item["type"] != "text":
                items.append(item)
                continue
            for part in _split_tags(item["text"], tags):
                if part in tags:
                    kind = tags[part]
                    if used[kind] < len(media[kind]):
                        value = media[kind][used[kind]]
                        items.append(value if kind == "video" and isinstance(value, dict) and "video" in value
                                     else {"type": kind, kind: value})
                    used[kind] += 1
                elif part:
                    items.append({"type": "text", "text": part})
        out.append({**turn, "content": items})
    for kind in ("image", "video"):
        if used[kind] != len(media[kind]):
            raise ValueError(f"the conversation has {used[kind]} <{kind}> placeholders but {len(media[kind])} "
                             f"{kind}s were given")
    return out


def _split_tags(text, tags):
    parts, start = [], 0
    while True:
        hits = [(text.find(tag, start), tag) for tag in tags if text.find(tag, start) >= 0]
        if not hits:
            return parts + [text[start:]]
        pos, tag = min(hits)
        parts += [text[start:pos], tag]
        start = pos + len(tag)


# ---------------------------------------------------------------------------------------------- processor

PROCESSOR_FILES = ("config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
                   "tokenizer_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json")


def _read_json(directory, name):
    path = Path(directory) / name
    return json.loads(path.read_text()) if path.is_file() else None


# transformers' Qwen2VLImageProcessor class defaults: what a preprocessor_config.json leaves out
IMAGE_PROCESSOR_DEFAULTS = VisionSettings(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
# fields minivl computes with one value only, the one of every published Qwen-VL file (resample 3 is bicubic)
FIXED_FIELDS = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                "resample": 3}


def _check_fixed_fields(pre, name):
    for key, value in FIXED_FIELDS.items():
        if key in pre and pre[key] != value:
            raise ValueError(f"{name} sets {key}={pre[key]!r}; minivl implements {key}={value!r} only")


def _vision_settings(pre, base):
    """preprocessor_config.json over transformers' class defaults; no file at all -> the family's published
    values. min_pixels / max_pixels win over size, which must then give both edges, as in transformers."""
    if pre is None:
        return base
    _check_fixed_fields(pre, "preprocessor_config.json")
    d = IMAGE_PROCESSOR_DEFAULTS
    size = dict(pre["size"]) if pre.get("size") is not None else {"shortest_edge": d.min_pixels,
                                                                   "longest_edge": d.max_pixels}
    for edge, key in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        if pre.get(key) is not None:
            size[edge] = pre[key]
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        raise ValueError(f"preprocessor_config.json: size={pre.get('size')!r} needs shortest_edge and "
                         "longest_edge (or min_pixels and max_pixels beside it)")
    return replace(
        d,
        patch_size=pre.get("patch_size", d.patch_size),
        merge_size=pre.get("merge_size", d.merge_size),
        temporal_patch_size=pre.get("temporal_patch_size", d.temporal_patch_size),
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
        image_mean=tuple(pre.get("image_mean", d.image_mean)),
        image_std=tuple(pre.get("image_std", d.image_std)),
        rescale_factor=pre.get("rescale_factor", d.rescale_factor),
    )


def _video_settings(video, vision):
    """video_preprocessor_config.json: qwen-vl-utils' frame and pixel settings. Videos are cut into patches and
    normalised with the image settings, so the file's own values for those must agree with them."""
    video = video or {}
    _check_fixed_fields(video, "video_preprocessor_config.json")
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor"):
        mine = getattr(vision, key)
        if key in video and (tuple(video[key]) if isinstance(video[key], list) else video[key]) != mine:
            raise ValueError(f"video_preprocessor_config.json sets {key}={video[key]!r} but the images use "
                             f"{mine!r}: minivl processes videos with the image settings")
    # only explicit keys: the "size" of Qwen3's video config means a whole-clip budget in transformers
    return VideoSettings(
        fps=video.get("fps") or VIDEO_FPS,
        min_frames=video.get("min_frames", VIDEO_MIN_FRAMES),
        max_frames=video.get("max_frames", VIDEO_MAX_FRAMES),
        min_pixels=video.get("min_pixels"), max_pixels=video.get("max_pixels"),
        total_pixels=video.get("total_pixels"),
    )


def _token_ids(gen, key, tokenizer):
    """generation_config.json's eos_token_id / pad_token_id as a list of the tokenizer's ids; None if absent."""
    value = gen.get(key)
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
        raise ValueError(f"generation_config.json: {key}={value!r} is neither a token id nor a list of them")
    unknown = [i for i in ids if tokenizer.id_to_token(i) is None]
    if unknown:
        raise ValueError(f"generation_config.json: {key}={value!r} names ids {unknown} the tokenizer lacks")
    return ids


class Processor:
    def __init__(self, tokenizer, family, model_type, eos_token_ids, pad_token_id, chat_template=None,
                 max_total_pixels=None, use_fast=True):
        self.tokenizer = tokenizer
        self.use_fast = use_fast                    # images through the torch resize (True) or PIL's (False)
        self.family = family
        self.model_type = model_type
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template          # kept for reference and saving; rendering is in Python
        self.max_total_pixels = max_total_pixels    # per-sample budget over all images, None = no budget
        ids = {}
        for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                     "<|video_pad|>"):
            ids[name] = tokenizer.token_to_id(name)
            if ids[name] is None:
                raise ValueError(f"the tokenizer has no {name} token: not a Qwen-VL tokenizer")
        self.image_token_id = ids["<|image_pad|>"]
        self.video_token_id = ids["<|video_pad|>"]
        self.vision_start_token_id = ids["<|vision_start|>"]
        self.vision_end_token_id = ids["<|vision_end|>"]
        self.im_end_token_id = ids["<|im_end|>"]
        self.vision_token_ids = {self.image_token_id, self.video_token_id, self.vision_start_token_id,
                                 self.vision_end_token_id}

    @property
    def vision(self):
        return self.family.vision

    @classmethod
    def from_pretrained(cls, path_or_hub_id, min_pixels=None, max_pixels=None, max_total_pixels=None,
                        default_system=..., use_fast=None, video_settings=None):
        """Read a checkpoint's processor files (local directory or hub id); missing files -> family defaults.

        Pixel limits: the arguments here, else the MIN_PIXELS / MAX_PIXELS environment variables (as ms-swift
        reads them), else preprocessor_config.json. default_system=None drops the Qwen2/2.5 default system turn.
        use_fast: the image path, chosen as transformers 5's AutoProcessor chooses it. None (the default) and
        True give its torchvision processor, which transformers picks for every Qwen-VL family whenever
        torchvision is installed, whatever image_processor_type the preprocessor_config.json names; False gives
        the PIL one. video_settings: {fps, max_frames, min_pixels, max_pixels (per frame)} over the video
        defaults and video_preprocessor_config.json (a trainer's --video_* options; None values are skipped).
        """
        directory = resolve(path_or_hub_id, PROCESSOR_FILES)  # the processor never needs the weights
        config = _read_json(directory, "config.json")
        pre = _read_json(directory, "preprocessor_config.json")
        if config is not None:
            model_type = config.get("model_type")
        else:
            # a processor-only directory: the processor class names the family
            classes = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
                       "Qwen3VLProcessor": "qwen3_vl", "Qwen3VLMoeProcessor": "qwen3_vl_moe"}
            model_type = classes.get((pre or {}).get("processor_class"))
            if model_type is None:
                raise FileNotFoundError(f"{directory} has no config.json naming the model_type")
        family = family_defaults(model_type)
        vision = _vision_settings(pre, family.vision)
        env_min, env_max = os.environ.get("MIN_PIXELS"), os.environ.get("MAX_PIXELS")
        vision = replace(
            vision,
            min_pixels=int(min_pixels or (env_min and float(env_min)) or vision.min_pixels),
            max_pixels=int(max_pixels or (env_max and float(env_max)) or vision.max_pixels),
        )
        video = _video_settings(_read_json(directory, "video_preprocessor_config.json"), vision)
        video = replace(video, **{k: v for k, v in (video_settings or {}).items() if v is not None})
        family = replace(family, vision=vision, video=video)

        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tok_cfg = _read_json(directory, "tokenizer_config.json") or {}
        template = (_read_json(directory, "chat_template.json") or {}).get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        template = template or tok_cfg.get("chat_template")
        if default_system is ...:
            default_system = family.default_system
            # a template that does not carry the family's default system prompt has none
            if default_system and isinstance(template, str) and default_system not in template:
                default_system = None
        family = replace(family, default_system=default_system)

        gen = _read_json(directory, "generation_config.json") or {}
        eos = _token_ids(gen, "eos_token_id", tokenizer) or [tokenizer.token_to_id("<|im_end|>")]
        pad = (_token_ids(gen, "pad_token_id", tokenizer) or [None])[0]
        if pad is None:
            pad_token = tok_cfg.get("pad_token") or "<|endoftext|>"
            pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
            pad = tokenizer.token_to_id(pad_token)
        processor = cls(tokenizer, family, model_type, eos, pad, template, max_total_pixels,
                        use_fast=use_fast is None or bool(use_fast))
        processor._check_config_ids(config or {})
        return processor

    def _check_config_ids(self, config):
        # a checkpoint whose config.json disagrees with its tokenizer would scatter image features wrongly
        text = config.get("text_config") or {}
        expected = {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                    "vision_start_token_id": self.vision_start_token_id,
                    "vision_end_token_id": self.vision_end_token_id}
        for key, token_id in expected.items():
            value = config.get(key, text.get(key))
            if value is not None and value != token_id:
                raise ValueError(f"config.json says {key}={value} but the tokenizer gives {token_id}")

    # ------------------------------------------------------------------------------------ chat template

    def render(self, conversation, add_generation_prompt=False, add_vision_id=False, placeholder=None):
        """The chat template as [(text, is_assistant_answer)] pieces (see apply_chat_template)."""
        check_conversation(conversation)
        placeholder = placeholder or (lambda kind, i: f"<|vision_start|><|{kind}_pad|><|vision_end|>")
        render = {"qwen2": render_qwen2, "qwen3": render_qwen3}[self.family.template]
        return render(conversation, add_generation_prompt, self.family.default_system, add_vision_id, placeholder)

    def apply_chat_template(self, conversation, add_generation_prompt=False, add_vision_id=False):
        """The prompt text with one <|image_pad|> / <|video_pad|> per image / video, as transformers gives it."""
        return "".join(text for text, _ in self.render(conversation, add_generation_prompt, add_vision_id))

    # ---------------------------------------------------------------------------------- images, videos

    def process_images(self, images, min_pixels=None, max_pixels=None, max_total_pixels=None, pixels=True):
        """The images of one sample -> pixel_values (N, C*T*P*P) float32, image_grid_thw (n, 3) int64.

        images: each an image (see load_image) or an item {"image": x, "min_pixels": .., "max_pixels": ..}.
        pixels=False: image_grid_thw alone, from the image headers (how many tokens a sample will have).
        """
        v = self.vision
        items = [img if isinstance(img, dict) and "image" in img else {"image": img} for img in images]
        pils = [load_image(item["image"]) if pixels else open_image(item["image"], decode=False) for item in items]
        mins = [item.get("min_pixels") or min_pixels or v.min_pixels for item in items]
        maxs = [item.get("max_pixels") or max_pixels or v.max_pixels for item in items]
        sizes = [(pil.height, pil.width) for pil in pils]
        budget = max_total_pixels if max_total_pixels is not None else self.max_total_pixels
        targets = fit_total_pixels(sizes, v.factor, mins, maxs, budget)
        if not pixels:  # the grids patchify would give, without resizing a single pixel
            return {"image_grid_thw": torch.tensor([(1, h // v.patch_size, w // v.patch_size) for h, w in targets],
                                                   dtype=torch.long)}
        normalize = normalize_frames_torch if self.use_fast else normalize_frames
        rows, grids = [], []
        for pil, (h, w) in zip(pils, targets):
            x, grid = patchify(normalize([pil], h, w, v), v)
            rows.append(x)
            grids.append(grid)
        return {"pixel_values": torch.from_numpy(np.concatenate(rows)),          # (N, C*T*P*P)
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}         # (n, 3)

    def load_video(self, video):
        """A video item -> (PIL frames, frame indices, frame rate the indices count in, frames per second seen).

        {"video": path, "fps": f}: the file is sampled at f frames per second (default 2), qwen-vl-utils' rule.
        {"video": [frames], "fps": f}: the frames were taken at f per second (default 2) and are all kept,
        padded to an even count by repeating the last one (qwen-vl-utils).
        """
        item = video if isinstance(video, dict) and "video" in video else {"video": video}
        source, cfg = item["video"], self.family.video
        fps = item.get("fps") or cfg.fps
        if isinstance(source, (list, tuple)):
            if not source:
                raise ValueError("a video given as a list of frames needs at least one frame")
            frames = [load_image(frame) for frame in source]
            frames += [frames[-1]] * (len(frames) % 2)
            return frames, list(range(len(frames))), float(fps), float(fps)
        frames, indices, video_fps, total = read_video(source, fps, item.get("min_frames", cfg.min_frames),
                                                       item.get("max_frames", cfg.max_frames), item.get("nframes"))
        # qwen-vl-utils' sample_fps: sampled frames over the video's length
        return frames, indices, video_fps, len(indices) / total * video_fps

    def process_video(self, video):
        """One video -> pixel rows (N, C*T*P*P), grid (t, h, w), seconds per temporal patch, patch timestamps."""
        v = self.vision
        item = video if isinstance(video, dict) and "video" in video else {"video": video}
        frames, indices, rate, sample_fps = self.load_video(item)
        cfg = self.family.video
        lo, hi = video_frame_pixels(len(frames), v.factor, item.get("min_pixels", cfg.min_pixels),
                                    item.get("max_pixels"), item.get("total_pixels", cfg.total_pixels),
                                    cfg.max_pixels)
        sizes = {frame.size for frame in frames}
        if len(sizes) > 1:
            raise ValueError(f"the frames of one video must have one size, got {sorted(sizes)}")
        width, height = frames[0].size
        h, w = smart_resize(height, width, v.factor, lo, hi)
        x, grid = patchify(normalize_frames_torch(frames, h, w, v), v)  # transformers has no PIL video path
        seconds = v.temporal_patch_size / sample_fps
        return x, grid, seconds, temporal_patch_timestamps(indices, rate, v.temporal_patch_size)

    # ------------------------------------------------------------------------------------------ encode

    def encode(self, conversation, images=None, videos=None, add_generation_prompt=False, return_labels=False,
               max_length=None, min_pixels=None, max_pixels=None, max_total_pixels=None, pixels=True):
        """One conversation -> unpadded tensors: input_ids (L,), labels (L,), pixel_values, grids, ...
        pixels=False: the same input_ids and labels, images read up to their headers (no pixel_values)."""
        if images is not None or videos is not None or _has_tags(conversation):
            conversation = split_placeholders(conversation, images, videos)
        check_conversation(conversation)
        media = [item for turn in conversation for item in content_items(turn["content"])
                 if item["type"] != "text"]
        out = {}
        image_items = [item for item in media if item["type"] == "image"]
        if image_items:
            out.update(self.process_images(
                [{**item, "image": item.get("image", item.get("image_url"))} for item in image_items],
                min_pixels, max_pixels, max_total_pixels, pixels))
        videos_done = [self.process_video(item) for item in media if item["type"] == "video"]
        if videos_done:
            out["pixel_values_videos"] = torch.from_numpy(np.concatenate([x for x, *_ in videos_done]))
            out["video_grid_thw"] = torch.tensor([grid for _, grid, *_ in videos_done], dtype=torch.long)
            if self.family.second_per_grid_ts:
                out["second_per_grid_ts"] = torch.tensor([s for _, _, s, _ in videos_done], dtype=torch.float32)

        pieces = self.render(conversation, add_generation_prompt, placeholder=self._video_placeholder(videos_done))
        ids, answer = self._tokenize(pieces)
        ids, answer = self._expand_pads(ids, answer, out)
        L = len(ids)
        if max_length is not None and L > max_length:
            cut = [i for i in range(max_length, L) if ids[i] in self.vision_token_ids]
            if cut:
                raise ValueError(f"max_length={max_length} would cut through image/video tokens (the sequence has "
                                 f"{L} tokens, vision tokens up to position {cut[-1]}): raise max_length, lower "
                                 "max_pixels, or drop the sample")
            ids, answer = ids[:max_length], answer[:max_length]
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)                          # (L,)
        if return_labels:
            # vision tokens are inputs even inside an answer (Qwen2 templates allow images there)
            target = [a and token not in self.vision_token_ids for token, a in zip(ids, answer)]
            labels = torch.tensor(ids, dtype=torch.long)
            labels[~torch.tensor(target, dtype=torch.bool)] = IGNORE_INDEX
            out["labels"] = labels                                                       # (L,)
        return out

    def _video_placeholder(self, videos_done):
        """Qwen3 spells one block per temporal patch with its time; Qwen2/2.5 one block per video."""
        def placeholder(kind, i):
            if kind == "image" or not self.family.timestamps:
                return f"<|vision_start|><|{kind}_pad|><|vision_end|>"
            return "".join(f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>"
                           for t in videos_done[i][3])
        return placeholder

    def _tokenize(self, pieces):
        """Token ids of the joined text, and for each token whether it lies in an assistant answer."""
        text, spans, pos = "", [], 0
        for piece, is_answer in pieces:
            if is_answer:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        # a token belongs to an answer when it starts inside one (the text between two special tokens is
        # tokenized as a whole, so the ids equal the encoding of the full text)
        answer = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return enc.ids, answer

    def _expand_pads(self, ids, answer, media):
        """Each <|image_pad|> / <|video_pad|> becomes as many pads as the item has merged patches."""
        M2 = self.vision.merge_size ** 2
        counts = {self.image_token_id: [int(g.prod()) // M2 for g in media.get("image_grid_thw", [])],
                  self.video_token_id: []}
        for t, h, w in media.get("video_grid_thw", torch.zeros(0, 3)).tolist():
            # Qwen3 writes one pad per temporal patch, Qwen2/2.5 one per video
            counts[self.video_token_id] += [h * w // M2] * t if self.family.timestamps else [t * h * w // M2]
        used = {key: 0 for key in counts}
        new_ids, new_answer = [], []
        for token, is_answer in zip(ids, answer):
            if token in counts:
                if used[token] >= len(counts[token]):
                    raise ValueError("the text holds more <|image_pad|>/<|video_pad|> tokens than images/videos "
                                     "given: do not write these tokens in the text, use <image>/<video> or items")
                n = counts[token][used[token]]
                used[token] += 1
                new_ids += [token] * n
                new_answer += [is_answer] * n
            else:
                new_ids.append(token)
                new_answer.append(is_answer)
        for token, seen in used.items():
            if seen != len(counts[token]):
                name = "image" if token == self.image_token_id else "video"
                raise ValueError(f"{len(counts[token])} {name} blocks were processed but the text holds {seen} "
                                 f"<|{name}_pad|> tokens")
        return new_ids, new_answer

    # ------------------------------------------------------------------------------------------- batch

    def __call__(self, conversations, images=None, videos=None, add_generation_prompt=None, return_labels=False,
                 padding_side=None, max_length=None, min_pixels=None, max_pixels=None, max_total_pixels=None):
        """One conversation or a list of them -> a padded batch with transformers' key names.

        add_generation_prompt defaults to True for inference and False with return_labels; padding_side defaults
        to "left" for inference (generation appends on the right) and "right" with return_labels.
        images / videos (ms-swift style, filling '<image>' / '<video>' in the text): a list for one
        conversation, a list of lists for a batch.
        """
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError("give one conversation (a list of turns) or a non-empty list of conversations")
        single = isinstance(conversations[0], dict)
        batch = [conversations] if single else list(conversations)
        images = [images] if single else (images or [None] * len(batch))
        videos = [videos] if single else (videos or [None] * len(batch))
        if len(images) != len(batch) or len(videos) != len(batch):
            raise ValueError(f"{len(batch)} conversations but images/videos for {len(images)}/{len(videos)}: give "
                             "one list per conversation")
        if add_generation_prompt is None:
            add_generation_prompt = not return_labels
        samples = [self.encode(conv, imgs, vids, add_generation_prompt, return_labels, max_length, min_pixels,
                               max_pixels, max_total_pixels)
                   for conv, imgs, vids in zip(batch, images, videos)]
        return self.pad(samples, padding_side or ("right" if return_labels else "left"))

    def pad(self, samples, padding_side="left"):
        """Pad encode() outputs into one batch: (B, L) ids/mask/labels, vision tensors concatenated in order."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        L = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)            # (B, L)
        attention_mask = torch.zeros((B, L), dtype=torch.long)                          # (B, L)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long) if "labels" in samples[0] else None
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            cols = slice(L - n, L) if padding_side == "left" else slice(0, n)
            input_ids[b, cols] = s["input_ids"]
            attention_mask[b, cols] = 1
            if labels is not None:
                labels[b, cols] = s["labels"]
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "second_per_grid_ts"):
            parts = [s[key] for s in samples if key in s]
            if parts:
                out[key] = torch.cat(parts)
        return out

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def _has_tags(conversation):
    return any("<image>" in item["text"] or "<video>" in item["text"]
               for turn in conversation if isinstance(turn, dict) and "content" in turn
               for item in content_items(turn["content"]) if item["type"] == "text")
