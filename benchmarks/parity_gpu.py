"""`python -m minivl.parity` end to end on random bf16 weights of Qwen2.5-VL-3B and Qwen3-VL-8B shapes.

    python benchmarks/parity_gpu.py                        # on a GPU: both models in bf16, the tool's output
    python benchmarks/parity_gpu.py --configs qwen3_vl_8b  # one of them
    python benchmarks/parity_gpu.py --smoke                # on the CPU: 2 layers and narrow widths, same path

For each config of tests/configs/, transformers creates the model with random weights directly on the device
(as bench_model.py does) and `save_pretrained` writes it to a temporary directory, together with the processor
files a downloaded checkpoint has: a tokenizer with the Qwen special tokens at their official ids (151643...:
the demo's byte-level BPE with its vocabulary padded by unused entries), the family's published
preprocessor_config.json, and a generation_config.json. Then the tool runs on it in a subprocess, as a user
would call it, on a synthetic 640x480 image and a 4-frame video, in bf16 and, where two float32 copies of the
model fit in 70% of the GPU's memory (the 3B on an H100, both on an H200), again in float32: the sharp check
(tolerance 1e-4) that bf16 rounding drift cannot give. Its output is printed as it comes, and this script
exits non-zero when any run did.

Disk: the 8B checkpoint takes about 17 GB (--workdir chooses where); each is deleted after its runs. Time: a
tool run loads two copies of the model and generates 32 tokens with each; under a 10-minute limit per command,
give each config its own command (--configs qwen2_5_vl_3b, then --configs qwen3_vl_8b).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from minivl import demo  # noqa: E402
from processor_helpers import PREPROCESSOR  # noqa: E402  (the published preprocessor configs)

QWEN_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; the other added tokens follow in demo.SPECIAL_TOKENS order


def qwen_tokenizer():
    """The demo tokenizer with the special tokens moved to Qwen's ids: its learned vocabulary is padded with
    unused entries up to 151642, so the added tokens land at 151643... as in the real tokenizer."""
    from tokenizers import Tokenizer

    spec = json.loads(demo.make_tokenizer().to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), QWEN_FIRST_SPECIAL_ID)})
    names = demo.SPECIAL_TOKENS + demo.ADDED_TOKENS
    for token in spec["added_tokens"]:
        token["id"] = QWEN_FIRST_SPECIAL_ID + names.index(token["content"])
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.token_to_id("<|image_pad|>") == 151655 and tok.token_to_id("<|vision_start|>") == 151652
    return tok


def load_config(name, smoke, layers):
    raw = json.loads((ROOT / "tests" / "configs" / f"{name}.json").read_text())
    if layers:  # the published widths, fewer layers (as bench_model.py --layers)
        text, v = raw.get("text_config", raw), raw["vision_config"]
        text["num_hidden_layers"], v["depth"] = layers, layers + 1
        if "fullatt_block_indexes" in v:
            v["fullatt_block_indexes"] = [layers]
        if "deepstack_visual_indexes" in v:
            v["deepstack_visual_indexes"] = list(range(min(3, layers)))
    if smoke:  # the same families and code paths, small enough for a CPU: 2 layers, narrow, Qwen's vocabulary
        text, v = raw.get("text_config", raw), raw["vision_config"]
        text.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                    num_key_value_heads=1)
        if "head_dim" in text:
            text.update(num_attention_heads=4, num_key_value_heads=2)  # Qwen3: head_dim 128 stays
        head_dim = v["hidden_size"] // v["num_heads"]
        v.update(depth=3, hidden_size=2 * head_dim, num_heads=2, intermediate_size=256, out_hidden_size=256)
        if "fullatt_block_indexes" in v:
            v["fullatt_block_indexes"] = [1]
        if "deepstack_visual_indexes" in v:
            v["deepstack_visual_indexes"] = [0, 2]
    return raw


def write_checkpoint(name, directory, device, smoke, layers):
    """Random bf16 weights made by transformers on the device, saved with the processor files."""
    import transformers as tf

    raw = load_config(name, smoke, layers)
    hf_cfg = tf.AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        hf = tf.AutoModelForImageTextToText.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    hf.save_pretrained(directory)
    n = sum(p.numel() for p in hf.parameters()) / 1e9
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    family = "qwen3_vl" if raw["model_type"].startswith("qwen3") else raw["model_type"]
    tok = qwen_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    files = {"tokenizer_config.json": demo.tokenizer_config(tok),
             "preprocessor_config.json": PREPROCESSOR[family],
             "generation_config.json": {"bos_token_id": 151643, "pad_token_id": 151643,
                                        "eos_token_id": [151645, 151643], "do_sample": False}}
    if family == "qwen2_5_vl":
        files["chat_template.json"] = {"chat_template": demo.CHAT_TEMPLATE}  # Qwen2.5's default system turn
    for file, content in files.items():
        (directory / file).write_text(json.dumps(content, indent=2))
    print(f"# {name}: {n:.2f}B random bf16 parameters written to {directory} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return n * 1e9


def write_media(directory, size):
    """A 640x480 (smoke: 224x168) picture of shapes over a gradient, and 4 frames of a moving square."""
    w, h = size
    image = Image.new("RGB", (w, h))
    image.putdata([(x * 255 // w, y * 255 // h, 128) for y in range(h) for x in range(w)])
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 8, h // 6, w // 2, h // 2), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 2, 7 * w // 8, 5 * h // 6), fill=(40, 80, 220))
    image.save(directory / "image.png")
    frames = directory / "frames"
    frames.mkdir()
    for i in range(4):
        frame = Image.new("RGB", (w // 2, h // 2), (255, 255, 255))
        x = i * w // 16
        ImageDraw.Draw(frame).rectangle((x, h // 8, x + w // 8, h // 8 + w // 8), fill=(40, 170, 60))
        frame.save(frames / f"{i:02d}.png")
    return directory / "image.png", frames


def dtypes_for(n_params, device, smoke):
    """bf16 always; float32 too where minivl's and transformers' float32 copies fit in 70% of the GPU."""
    if device == "cuda":
        fits = 2 * 4 * n_params < 0.7 * torch.cuda.get_device_properties(0).total_memory
    else:
        fits = smoke  # a CPU run of the real widths has no memory to spare
    return ["bfloat16", "float32"] if fits else ["bfloat16"]


def run_tool(model_dir, image, frames, device, dtype, every, max_new_tokens):
    cmd = [sys.executable, "-m", "minivl.parity", "--model", str(model_dir), "--image", str(image), "--video",
           str(frames), "--prompt", "Describe the picture and the video.", "--dtype", dtype, "--device",
           device, "--every", str(every), "--max-new-tokens", str(max_new_tokens)]
    print("$ python -m minivl.parity " + shlex.join(cmd[3:]), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    print(f"# exit status {code} after {time.perf_counter() - start:.0f} s\n", flush=True)
    return code


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="2 layers, narrow widths, small inputs (CPU check)")
    ap.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16, and float32 where it fits")
    ap.add_argument("--layers", type=int, default=0, help="published widths, this many layers (0: all)")
    ap.add_argument("--every", type=int, default=4, help="print every k-th block and layer (all compared)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: system temp)")
    args = ap.parse_args()
    if args.smoke:
        args.every, args.max_new_tokens = 1, min(args.max_new_tokens, 4)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{time.strftime('%Y-%m-%d')}{', smoke' if args.smoke else ''}", flush=True)
    codes = {}
    for name in args.configs:
        work = Path(tempfile.mkdtemp(prefix=f"parity_{name}_", dir=args.workdir))
        try:
            image, frames = write_media(work, (224, 168) if args.smoke else (640, 480))
            n_params = write_checkpoint(name, work / "model", args.device, args.smoke, args.layers)
            for dtype in args.dtypes or dtypes_for(n_params, args.device, args.smoke):
                codes[f"{name} {dtype}"] = run_tool(work / "model", image, frames, args.device, dtype,
                                                    args.every, args.max_new_tokens)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("# " + ", ".join(f"{name}: exit {code}" for name, code in codes.items()))
    sys.exit(max(codes.values()))


if __name__ == "__main__":
    main()
