"""The embedded default: a tiny Qwen2.5-VL checkpoint, its tokenizer and a synthetic image task, made locally.

    python -m minivl.demo [--out demo_data] [--seed 0]
    python -m minivl.demo --family qwen3_vl      # a tiny Qwen3-VL instead, in demo_data_qwen3_vl

writes, in a few seconds and the same bytes for the same seed:

    demo_data/model/   config.json, model.safetensors (random init, official Qwen2.5-VL names and flat config),
                       tokenizer.json (byte-level BPE trained here, Qwen special tokens in their usual order),
                       tokenizer_config.json, preprocessor_config.json, video_preprocessor_config.json,
                       chat_template.json, generation_config.json
    demo_data/data/    train.jsonl, test.jsonl (ms-swift style), images/*.png (56x56: one coloured shape)
    demo_data/demo.json  what was made and where (also the "already made" marker)

The task, "What colour is the shape?" with four colours, is what a model of this size was measured to learn on a
CPU in about a minute (counting is not learnable at this size). Every script uses this directory as
its default model and data, and many tests use it as their fixture: `make_demo(dir)` returns the paths and does
nothing when the directory is already made. `--family qwen3_vl` makes the same task for a Qwen3-VL of the same
widths (nested config, interleaved M-RoPE, qk-norm, a learned position grid, one DeepStack tap, 16-pixel patches:
the 56x56 images are resized to 64x64, again 4 merged tokens) with the Qwen3-VL chat template (no default system
prompt).

What it simplifies: a vocabulary of a few hundred tokens (the token ids in config.json are the tokenizer's, not
Qwen's 151643+), one question type, no video data.
"""

import argparse
import json
import os
import random
import shutil
import uuid
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .processor import CLIP_MEAN, CLIP_STD

DEMO_VERSION = 1
DEFAULT_DIR = Path(os.environ.get("MINIVL_DEMO_DIR", "demo_data"))
FAMILIES = ("qwen2_5_vl", "qwen3_vl")                # the first is the default of every script

# Qwen2/2.5-VL added tokens in id order (151643...151664): the first 14 special, the rest plain added tokens
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
# Qwen2's pre-tokenizer split (the regex of its tokenizer.json)
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"
IMAGE_SIZE = 56                      # 4x4 patches of 14 -> 4 merged tokens per image

# the Qwen2.5-VL chat format as a Jinja template, written here for transformers (minivl renders the same format in
# Python: processor.render_qwen2)
DEFAULT_SYSTEM = ("{% if loop.first and message['role'] != 'system' %}"
                  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    + DEFAULT_SYSTEM +
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL Instruct's format (processor.render_qwen3) is the same without the default system prompt
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(DEFAULT_SYSTEM, "")


# ------------------------------------------------------------------------------------------------ tokenizer

def tokenizer_corpus():
    """The text the demo tokenizer sees: the chat frame, the task, and a little general text."""
    lines = ["system", "user", "assistant", "You are a helpful assistant.", QUESTION,
             "Describe this image.", "How many shapes are there?", "What shape is it?",
             "The shape is a red square.", "Picture 1: Video 1: <0.5 seconds>",
             "The quick brown fox jumps over the lazy dog.", "0 1 2 3 4 5 6 7 8 9 10"]
    lines += list(COLOURS) + list(SHAPES) + [f"It is {c}." for c in COLOURS] + [f"a {s}" for s in SHAPES]
    return lines * 4


def make_tokenizer(corpus=None, vocab_size=384):
    """A byte-level BPE tokenizer with Qwen2's normalizer and pre-tokenizer, then the Qwen added tokens.

    vocab_size counts the learned vocabulary (256 bytes + merges); the 22 added tokens come after it.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus or tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def token_ids(tok):
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])


def tokenizer_config(tok, chat_template=CHAT_TEMPLATE):
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t in SPECIAL_TOKENS}
               for t in SPECIAL_TOKENS + ADDED_TOKENS}
    return {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": decoder,
            "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 4096, "chat_template": chat_template}


# ------------------------------------------------------------------------------------------------- configs

def model_config(tok, family=FAMILIES[0]):
    """An official flat Qwen2.5-VL config.json at the demo's widths (vision: 2 blocks of width 64; text: 2 layers
    of width 128, 4 heads, 2 kv heads), or a nested Qwen3-VL one at the same widths."""
    ids = token_ids(tok)
    vocab = (tok.get_vocab_size() + 63) // 64 * 64          # room above the tokenizer, as Qwen's 151936
    if family == "qwen3_vl":
        return qwen3_config(ids, vocab)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},  # head_dim 32
        "vocab_size": vocab, "tie_word_embeddings": True, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2, "use_cache": True,
        "torch_dtype": "float32",
        **{k: v for k, v in ids.items() if k != "pad_token_id"},
        "vision_config": {
            "model_type": "qwen2_5_vl", "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
            "out_hidden_size": 128, "hidden_act": "silu", "in_chans": 3, "patch_size": 14,
            "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1], "tokens_per_second": 2, "initializer_range": 0.02,
        },
    }


def qwen3_config(ids, vocab):
    """A nested Qwen3-VL config.json (the published layout) at the demo's widths: head_dim 32, so the
    published mrope_section [24, 20, 20] of 64 frequencies becomes [6, 5, 5] of 16."""
    text = {"model_type": "qwen3_vl_text", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            "attention_bias": False, "vocab_size": vocab, "tie_word_embeddings": True,
            "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"]}
    vision = {"model_type": "qwen3_vl", "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
              "out_hidden_size": 128, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0]}
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
            **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id")}}


def processor_configs(tok, family=FAMILIES[0]):
    ids = token_ids(tok)
    qwen3 = family == "qwen3_vl"
    patch, mean, std = (16, [0.5] * 3, [0.5] * 3) if qwen3 else (14, list(CLIP_MEAN), list(CLIP_STD))
    vision = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": 2, "image_mean": mean,
              "image_std": std, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_resize": True, "do_convert_rgb": True, "resample": 3,
              "processor_class": "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor"}
    # small limits keep any image cheap on a CPU: 4 to 16 merged tokens (56x56 to 112x112 pixels, or 64x64 to
    # 128x128 with Qwen3's 16-pixel patches)
    side = 2 * patch * 2
    limits = {"min_pixels": side * side, "max_pixels": 4 * side * side,
              "size": {"shortest_edge": side * side, "longest_edge": 4 * side * side}}
    template = QWEN3_CHAT_TEMPLATE if qwen3 else CHAT_TEMPLATE
    return {
        "preprocessor_config.json": {**vision, "image_processor_type": "Qwen2VLImageProcessor", **limits},
        "video_preprocessor_config.json": {**vision, "video_processor_type": "Qwen2VLVideoProcessor", **limits,
                                           "fps": 2.0, "min_frames": 4, "max_frames": 16},
        "tokenizer_config.json": tokenizer_config(tok, template),
        "chat_template.json": {"chat_template": template},
        "generation_config.json": {"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
                                   "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]], "do_sample": False},
    }


def make_checkpoint(model_dir, seed=0, family=FAMILIES[0]):
    """Tokenizer, processor configs and a randomly initialised tiny model in the official layout."""
    import torch

    from .config import Config
    from .model import VLModel

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    for name, content in processor_configs(tok, family).items():
        _write_json(model_dir / name, content)
    torch.manual_seed(seed)
    VLModel(Config.from_dict(model_config(tok, family))).save_pretrained(model_dir)
    return model_dir


# ---------------------------------------------------------------------------------------------------- data

def draw_shape(rng, size=IMAGE_SIZE):
    """One shape of a random colour, kind, size and position on a white square -> (image, colour, shape)."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    side = rng.randint(size // 4, size // 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    draw = ImageDraw.Draw(image)
    box = (x, y, x + side - 1, y + side - 1)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
    return image, colour, shape


def make_dataset(data_dir, seed=0, n_train=1024, n_test=128):
    """images/*.png and ms-swift jsonl rows {"query": "<image>...", "response": colour, "images": [path]}."""
    data_dir = Path(data_dir)
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n, start in (("train", n_train, 0), ("test", n_test, n_train)):
        rows = []
        for i in range(start, start + n):
            image, colour, _ = draw_shape(rng)
            name = f"images/{i:05d}.png"
            image.save(data_dir / name)
            rows.append({"query": f"<image>{QUESTION}", "response": colour, "images": [name]})
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl", "images": data_dir / "images"}


def make_preference_pairs(paths):
    """dpo_train.jsonl, dpo_test.jsonl beside the demo's train / test data: ms-swift preference rows of the same
    images, the right colour chosen and another colour rejected -> {"train", "test"} paths. The same bytes every
    time (each written under a temporary name and renamed, so concurrent callers may both write)."""
    made = {}
    for split in ("train", "test"):
        rng = random.Random(split)
        rows = [json.loads(line) for line in Path(paths[split]).read_text().splitlines()]
        text = "".join(json.dumps({"messages": [{"role": "user", "content": r["query"]},
                                                {"role": "assistant", "content": r["response"]}],
                                   "rejected_response": rng.choice(sorted(set(COLOURS) - {r["response"]})),
                                   "images": r["images"]}) + "\n" for r in rows)
        made[split] = Path(paths[split]).with_name(f"dpo_{split}.jsonl")  # beside train.jsonl: image paths hold
        tmp = made[split].with_name(f".{made[split].name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text)
        os.replace(tmp, made[split])
    return made


# ------------------------------------------------------------------------------------------------ the demo

def demo_paths(out_dir):
    out_dir = Path(out_dir)
    return {"root": out_dir, "model": out_dir / "model", "train": out_dir / "data" / "train.jsonl",
            "test": out_dir / "data" / "test.jsonl", "images": out_dir / "data" / "images"}


def default_dir(family=FAMILIES[0]):
    return DEFAULT_DIR if family == FAMILIES[0] else DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}_{family}")


def make_demo(out_dir=DEFAULT_DIR, seed=0, family=FAMILIES[0]):
    """Make the demo in out_dir unless it is already there -> {"root", "model", "train", "test", "images"}.

    Built in a temporary sibling directory and renamed into place, so concurrent callers (parallel tests,
    several scripts) never see a half-made demo.
    """
    if family not in FAMILIES:
        raise ValueError(f"no demo of family {family!r}: choose one of {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    if _is_made(out_dir, seed, family):
        return demo_paths(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "demo.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a minivl demo directory: remove it or choose another")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        make_checkpoint(tmp / "model", seed, family)
        make_dataset(tmp / "data", seed)
        _write_json(tmp / "demo.json", {"version": DEMO_VERSION, "seed": seed, "family": family,
                                        "model": "model", "train": "data/train.jsonl", "test": "data/test.jsonl"})
        if out_dir.exists():
            if _is_made(out_dir, seed, family):  # another process finished first
                return demo_paths(out_dir)
            if (out_dir / "demo.json").is_file():    # an older demo, another seed or family: ours to replace
                shutil.rmtree(out_dir)
            elif out_dir.is_dir():
                out_dir.rmdir()                  # empty (checked above)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_made(out_dir, seed, family):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return demo_paths(out_dir)


def _is_made(out_dir, seed, family):
    try:
        info = json.loads((Path(out_dir) / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    # demos made before there was a choice of family are Qwen2.5-VL ones
    return (info.get("version") == DEMO_VERSION and info.get("seed") == seed
            and info.get("family", FAMILIES[0]) == family)


def _write_json(path, content):
    Path(path).write_text(json.dumps(content, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default=FAMILIES[0])
    parser.add_argument("--out", type=Path, help=f"directory to write (default {DEFAULT_DIR}, "
                        f"{default_dir('qwen3_vl')} for qwen3_vl)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = make_demo(args.out or default_dir(args.family), args.seed, args.family)
    for key, path in paths.items():
        print(f"{key:7s} {path}")


if __name__ == "__main__":
    main()
