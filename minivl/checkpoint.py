"""Read the official Hugging Face checkpoints: config.json plus one or many safetensors files. (Writing them is
VLModel.save_pretrained, in model.py.)

Tensor names in the files:
  Qwen2-VL / Qwen2.5-VL   `model.*` (decoder), `visual.*` (vision tower), `lm_head.*`
  Qwen3-VL (+ MoE)        `model.language_model.*`, `model.visual.*`, `lm_head.*`
minivl's module names are the Qwen3 ones for every family, so loading is one prefix map and one
`load_state_dict(strict=True, assign=True)` into a model built on the meta device: each tensor is read from the
file straight into its final dtype and device, and a 7B model never exists as a float32 copy. Files written by
transformers 5 with in-memory names (`model.language_model.*` for Qwen2/2.5) load too. Tied models ship no
`lm_head.weight`.

Qwen3-VL-MoE experts are stored [E, in, out] in the published files, and transformers 5 writes them transposed
([E, out, in], its in-memory layout). Which one a file holds is read from the config's `transformers_version`,
never guessed from shapes (square experts would fool a shape test, transformers #47031).

Every problem is an error that names it: a missing, unexpected or mis-shaped tensor, a missing shard, a
truncated or corrupt file. Nothing is unpickled.
"""

import difflib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import Config
from .model import VLModel, file_to_module_name, module_to_file_name

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*", "vocab*", "merges*"]


def resolve(path_or_hub_id, patterns=HUB_PATTERNS):
    """A local directory for a path or a hub id; hub ids go through huggingface_hub's cache (HF_HUB_OFFLINE
    makes it use the cache only). A name whose first part is a local directory (`demo_data/modle`) is a local
    path, never sent to the hub."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    looks_local = (path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
                   or Path(text.split("/")[0]).is_dir())
    if looks_local:
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, 1)
        raise FileNotFoundError(f"{text}: not a checkpoint directory (looked for {path.absolute()}"
                                + (f"; did you mean {path.parent / close[0]}?)" if close else ")"))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=list(patterns)))
    except Exception as e:  # network, authentication, unknown repository: one line instead of a long traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{text}: not a local directory (looked for {path.absolute()}) and not fetched "
                                f"from the Hugging Face hub ({type(e).__name__}: {reason})") from None


def read_config(directory):
    path = Path(directory) / "config.json"
    adapter = Path(directory) / "adapter_config.json"
    if not path.exists() and adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        raise FileNotFoundError(
            f"{directory} is a LoRA adapter (adapter_config.json; its base model: {base}), not a whole model. "
            f"Load the base model and the adapter: --model {base} --adapters {directory} (python -m minivl.chat), "
            f"minivl.lora.load_adapter(model, dir) in Python; or merge them into a model: python -m minivl.export "
            f"--adapters {directory} --merge_lora true")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory needs its config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return Config.from_dict(raw), raw


def open_shards(directory):
    """{tensor name: safetensors file} of a checkpoint directory, checking that every shard exists and parses."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no *.safetensors file (minivl never reads pickled .bin)")
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
        raise FileNotFoundError(f"{directory}: shard(s) {missing} listed in model.safetensors.index.json are missing")
    where = {}
    for f in files:
        try:
            with safe_open(directory / f, framework="pt") as handle:
                for k in handle.keys():
                    where[k] = directory / f
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{directory / f} is truncated or corrupt: {e}") from None
    return where


def _files_from_transformers5(raw):
    version = str(raw.get("transformers_version", "0"))
    return int(version.split(".")[0]) >= 5 if version.split(".")[0].isdigit() else False


def load(path_or_hub_id, dtype=None, device=None):
    """The model of a checkpoint directory or hub id, in eval mode. dtype None keeps the stored dtype."""
    directory = resolve(path_or_hub_id)
    cfg, raw = read_config(directory)
    with torch.device("meta"):
        model = VLModel(cfg, init=False)
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    where = open_shards(directory)
    transposed_experts = _files_from_transformers5(raw)
    by_module = {file_to_module_name(k, cfg.family): k for k in where}
    if cfg.tie_word_embeddings:
        by_module.pop("lm_head.weight", None)  # some tied checkpoints carry a copy; the tie wins
    missing = sorted(set(expected) - set(by_module))
    unexpected = sorted(by_module[k] for k in set(by_module) - set(expected))
    wrong = []
    state = {}
    handles = {}
    for name, file_key in sorted(by_module.items()):
        if name not in expected:
            continue
        f = where[file_key]
        handle = handles.get(f) or handles.setdefault(f, safe_open(f, framework="pt", device="cpu"))
        shape = tuple(handle.get_slice(file_key).get_shape())
        is_expert = re.search(r"\.experts\.(gate_up_proj|down_proj)$", name) is not None
        if is_expert and transposed_experts:
            shape = (shape[0], shape[2], shape[1])
        if shape != tuple(expected[name]):
            wrong.append(f"{file_key}: file {list(shape)} vs model {list(expected[name])}")
            continue
        if missing or unexpected or wrong:
            continue  # keep collecting problems, load nothing
        try:
            tensor = handle.get_tensor(file_key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: cannot read tensor {file_key}: {e}") from None
        if is_expert and transposed_experts:
            tensor = tensor.transpose(1, 2)
        state[name] = tensor.to(device=device or "cpu", dtype=dtype or tensor.dtype).contiguous()
    if missing or unexpected or wrong:
        lines = [f"checkpoint {directory} does not match the {cfg.model_type} model built from its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): "
                         + ", ".join(module_to_file_name(k, cfg.family) for k in missing[:20]))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        if wrong:
            lines.append(f"  wrong shapes ({len(wrong)}): " + "; ".join(wrong[:20]))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    model.tie_weights()
    model.eos_token_ids = eos_token_ids(directory, raw)
    return model.eval()


def eos_token_ids(directory, raw_config):
    """The ids generation stops at, as transformers' generate picks them: generation_config.json's eos_token_id,
    else config.json's (top level, or the text config of nested files). A list, or None when neither says."""
    path = Path(directory) / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = raw_config.get("eos_token_id", (raw_config.get("text_config") or {}).get("eos_token_id"))
    return None if eos is None else [eos] if isinstance(eos, int) else list(eos)
