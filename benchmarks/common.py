"""What the GPU benchmarks share: the published configs (tests/configs/), cut to fewer layers for smoke runs, a
transformers model with random weights whose tensors minivl shares, so both run on the very same weights, and
one timer."""

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
    """(minivl Config, transformers model, minivl model) on the same tensors: transformers creates random weights
    on the device; minivl is built on the meta device and assigned them (its module names are transformers'
    in-memory names), so there is no copy."""
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
    return cfg, hf, ours.eval()


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
