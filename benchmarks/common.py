"""What the GPU benchmarks share: the published configs (tests/configs/), cut to fewer layers or tiny widths for
smoke runs; a transformers model with random weights whose tensors minivl shares, so both run on the very same
weights, or minivl's model alone; prompts with one 448x448 image; the copy bandwidth, the bytes a decode step reads,
and one timer."""

import json
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def published_config(name, layers=0):
    """The config.json dict of a published model; layers > 0 cuts both towers to about that depth, same widths."""
    raw = json.load(open(os.path.join(HERE, "..", "tests", "configs", f"{name}.json")))
    if layers:
        text, vision = raw.get("text_config", raw), raw["vision_config"]
        text["num_hidden_layers"] = layers
        vision["depth"] = layers + 1
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [layers]
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = [0]
    return raw


def shared_models(raw, device, dtype=torch.bfloat16):
    """(minivl Config, transformers model, minivl model) on the same tensors, both frozen: transformers creates
    random weights on the device; minivl is built on the meta device and assigned them (its module names are
    transformers' in-memory names), so there is no copy. The parameter objects are each model's own, so freezing
    one would leave the other trainable: both are frozen here."""
    import transformers as tf

    from minivl.config import Config
    from minivl.model import VLModel

    hf_cfg = tf.AutoConfig.for_model(**raw)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = tf.AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype).eval()
    cfg = Config.from_dict(raw)
    with torch.device("meta"):
        ours = VLModel(cfg, init=False)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    ours.tie_weights()
    return cfg, hf.requires_grad_(False), ours.requires_grad_(False).eval()


def median_ms(fn, device, repeats, warmup=0):
    """Median milliseconds of one call of fn over `repeats` calls, each timed on its own (CUDA events on the GPU,
    the host clock elsewhere), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def load_raw(name, layers=0, tiny=False):
    """published_config, and with `tiny` (--smoke runs) tiny widths and the real vocabulary (real token ids)."""
    raw = published_config(name, layers)
    if tiny:
        t, v = raw.get("text_config", raw), raw["vision_config"]
        t.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        rope = t.get("rope_scaling") or raw.get("rope_scaling")
        if "head_dim" in t:
            t["head_dim"] = 16
            rope["mrope_section"] = [4, 2, 2]
        else:
            rope["mrope_section"] = [2, 3, 3]
        v.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    return raw


def build_model(raw, device, dtype=torch.bfloat16):
    """(Config, minivl's model) with random weights (transformers' init: normal(0, 0.02), unit norms), made on the
    meta device and materialised once in `dtype` on the device."""
    from minivl.config import Config
    from minivl.model import VLModel

    cfg = Config.from_dict(raw)
    with torch.device("meta"):
        model = VLModel(cfg, init=False).to(dtype)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    model.tie_weights()  # to_empty made the tied lm_head a tensor of its own
    return cfg, model.eval()


def make_batch(cfg, prompts, device, dtype, seed=0):
    """Left-padded prompts: text (8 + 5i tokens), one 448x448 image, text (12 + 3i tokens)."""
    patch = cfg.vision.patch_size
    side = round(448 / (2 * patch)) * 2  # patches per side after smart_resize
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(prompts):
        words = torch.randint(1000, 100000, (20 + 8 * i,), generator=g).tolist()
        rows.append(words[: 8 + 5 * i] + [cfg.vision_start_token_id] + [cfg.image_token_id] * (side * side // 4)
                    + [cfg.vision_end_token_id] + words[8 + 5 * i:])
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    pv = torch.randn(prompts * side * side, 3 * 2 * patch * patch, generator=g)
    thw = torch.tensor([[1, side, side]] * prompts)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pv.to(device, dtype),
            "image_grid_thw": thw.to(device)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy."""
    n = 2**30 if device == "cuda" else 2**24
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty(n // 2, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    sync(device)
    return 2 * n * 20 / (time.perf_counter() - start)


def decoder_bytes(model):
    """Bytes of the weights one decode step reads: every decoder weight, lm_head once (tied or not)."""
    text = model.model.language_model
    size = sum(p.numel() * p.element_size() for name, p in text.named_parameters()
               if not name.startswith("embed_tokens"))
    return size + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def kv_bytes(cfg, rows, slots, dtype_bytes=2):
    t = cfg.text
    return 2 * t.num_hidden_layers * rows * t.num_key_value_heads * slots * t.head_dim * dtype_bytes
