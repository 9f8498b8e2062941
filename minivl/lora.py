"""LoRA for minivl models: inject into named linear layers, merge, and save / load in PEFT's format.

    names = lora.select_linear(model, parts=("llm",))              # all linear layers of the LLM
    lora.inject(model, names, r=8, alpha=32)                       # nn.Linear -> LoRALinear, in place
    ... train the lora_A / lora_B parameters ...
    lora.save_adapter(model, "out/checkpoint-10", base_model="Qwen/Qwen2.5-VL-3B-Instruct")
    lora.load_adapter(model, "out/checkpoint-10")                  # into a fresh model (or a PEFT adapter)
    lora.merge(model)                                              # W += (alpha / r) B A, back to nn.Linear

A LoRALinear keeps the base layer's `weight` and `bias` (the same Parameter objects, frozen) and adds
`lora_A.weight` (r, in) and `lora_B.weight` (out, r): PEFT's layout and, since minivl's module names are
transformers' in-memory names, PEFT's tensor names once `base_model.model.` is put in front. So an adapter saved
here loads with `peft.PeftModel.from_pretrained` on the transformers model, and a PEFT adapter trained on the
transformers model (ms-swift, trl) loads here. Forward: `kernels.lora.lora_linear`, the fused
x W^T + b + scale (x A^T) B^T; with dropout on (training), PEFT's unfused formula instead, since the fused kernel
has no dropout on the low-rank input.

Modules trained in full next to LoRA (PEFT's `modules_to_save`, e.g. a vision tower with `--train_type lora_llm`)
are saved in the adapter file under `base_model.model.<module path>.<parameter>`, as PEFT writes them, and
copied into the model by `load_adapter` (ms-swift #9187: an export that forgets them loses the trained tower).

Simplified: no DoRA, no per-layer rank or alpha patterns, no LoRA on embeddings, convolutions or MoE expert
tensors, one adapter per model. Adapter tensors are kept in float32 (PEFT's `autocast_adapter_dtype`) and cast to
the base weight's dtype for the matmuls. Tests: tests/test_lora.py.

Legend: N tokens, r rank, in / out the linear layer's widths.
"""

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import kernels

if getattr(kernels, "MINIVL_KERNELS", False) is not True:  # Hugging Face's hub package has the same import name
    raise ImportError(f"`import kernels` found {getattr(kernels, '__file__', kernels)}, not minivl's kernels/ "
                      "package: `pip uninstall kernels` (Hugging Face's hub kernels), or put the minivl checkout "
                      "first on sys.path")
from kernels.lora import lora_linear  # noqa: E402

from .checkpoint import resolve
from .model import file_to_module_name, module_to_file_name
from .config import ARCHITECTURES

PREFIX = "base_model.model."  # what PEFT puts in front of the model's module names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the low-rank update: y = x W^T + b + scale * dropout(x) A^T B^T."""

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False, init_weights=True):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base Parameters themselves: names and ties kept
        self.r, self.alpha = r, alpha
        # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # weight (r, in): kaiming-uniform as nn.Linear
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight (out, r)
        if init_weights is True:
            nn.init.zeros_(self.lora_B.weight)  # PEFT default: the adapter starts as the identity
        elif init_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)
        elif init_weights is not False:
            raise ValueError(f"init_weights must be true, false or 'gaussian', got {init_weights!r}")
        # init_weights False leaves B random too (PEFT's init_lora_weights=False): a non-identity adapter
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.disabled = False  # inside `disabled(model)`: the base layer alone (the DPO / GRPO reference)

    def forward(self, x):
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        a = self.lora_A.weight.to(self.weight.dtype)  # (r, in)
        b = self.lora_B.weight.to(self.weight.dtype)  # (out, r)
        if self.dropout is not None and self.training:
            # peft.tuners.lora.layer.Linear.forward: base(x) + B(A(dropout(x))) * scaling
            return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), a), b) * self.scale
        return lora_linear(x, self.weight, self.bias, a, b, self.scale)

    @torch.no_grad()
    def merged_weight(self):
        """W + scale B A in the base weight's dtype, computed in float32: the layer without dropout as one weight.
        `merge` writes it back; the sampler's decode backends read it for a call (kernels/decode/)."""
        if self.disabled:
            return self.weight
        return fold(self.weight, self.lora_A.weight, self.lora_B.weight, self.scale)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


# ------------------------------------------------------------------------------------ choosing layers

def part_of(name):
    """Which part a module name belongs to: 'llm', 'vit', 'aligner' (the merger(s)) or 'lm_head'."""
    if name.startswith("model.visual."):
        tail = name[len("model.visual."):]
        return "aligner" if tail.startswith(("merger", "deepstack_merger_list")) else "vit"
    if name.startswith("model.language_model."):
        return "llm"
    return "lm_head" if name.startswith("lm_head") else "other"


def linear_names(model):
    """Names of every nn.Linear (or LoRALinear) in the model, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]


def select_linear(model, parts=("llm",), target_modules=("all-linear",), target_regex=None):
    """The linear layers that get LoRA, ms-swift's way.

    parts: the unfrozen parts ('llm', 'vit', 'aligner'); `all-linear` means every linear layer in them except
    lm_head and the MoE routers. Other target_modules entries are name suffixes (PEFT's list semantics), also
    looked for only inside `parts`, so a frozen part never gets an adapter whose gradient would be cut by its
    no_grad. target_regex (a full match on the module name) overrides both.
    """
    names = linear_names(model)
    if target_regex:
        pattern = re.compile(target_regex)
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        inside = [n for n in names if part_of(n) in parts and not n.endswith(".mlp.gate")]  # MoE router
        if "all-linear" in targets:
            chosen = inside
        else:
            chosen = [n for n in inside if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"no linear layer matches target_modules={target_modules} target_regex={target_regex} "
                         f"in the parts {list(parts)}; some names: {names[:3] + names[-3:]}")
    return chosen


def whole_modules(model, parts):
    """The modules that make up `parts` for full training next to LoRA (PEFT's modules_to_save): the vision
    tower's children, with module lists expanded, so each entry is a module PEFT can wrap and call."""
    out = []
    for child, module in model.model.visual.named_children():
        name = f"model.visual.{child}"
        if part_of(name + ".") not in parts:
            continue
        if isinstance(module, nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(module))]
        else:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------- inject / merge

def inject(model, names, r, alpha, dropout=0.0, use_rslora=False, init_weights=True):
    """Replace each named nn.Linear by a LoRALinear around it. Returns the LoRA parameters (A and B)."""
    params = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not nn.Linear: LoRA here is for linear layers")
        layer = LoRALinear(base, r, alpha, dropout, use_rslora, init_weights)
        setattr(parent, child, layer)
        params += [layer.lora_A.weight, layer.lora_B.weight]
    return params


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled(model):
    """The model with every adapter switched off, i.e. the base model (PEFT's `disable_adapter()`): the reference
    of DPO and GRPO under LoRA, with no second copy of the weights. Modules trained in full (modules_to_save) stay
    as trained: unlike PEFT, minivl keeps no copy of their original weights."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


@torch.no_grad()
def fold(weight, lora_a, lora_b, scale):
    """W + scale B A in W's dtype, computed in float32: weight (out, in), lora_a (r, in), lora_b (out, r)."""
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (weight.float() + scale * delta.to(weight.device)).to(weight.dtype)


def merge(model):
    """Fold every adapter into its base weight (W += scale B A, computed in float32) and put the plain
    nn.Linear back. The model afterwards has exactly the official tensors."""
    for name, layer in lora_layers(model):
        layer.weight.copy_(layer.merged_weight())
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


# ----------------------------------------------------------------------------------------- PEFT format

def compact_regex(names, all_names):
    """A regex that fully matches exactly `names` among `all_names`: layer numbers become \\d+ where that
    selects nothing more (the usual case), else the names are listed."""
    shapes = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    pattern = "^(" + "|".join(shapes) + ")$"
    if {n for n in all_names if re.fullmatch(pattern, n)} == set(names):
        return pattern
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def adapter_config(model, base_model, modules_to_save=(), init_weights=True, dropout=0.0, use_rslora=False):
    """PEFT's adapter_config.json for the model's adapters (LoRA, one r and alpha for all layers)."""
    layers = lora_layers(model)
    ranks = {(m.r, m.alpha) for _, m in layers}
    if len(ranks) != 1:
        raise ValueError(f"save_adapter writes one rank and alpha for all layers; the model has {sorted(ranks)}")
    (r, alpha), = ranks
    return {
        "peft_type": "LORA", "task_type": None,
        # a local base is stored as an absolute path, so the adapter finds it from any directory
        "base_model_name_or_path": (str(Path(base_model).resolve()) if base_model and Path(base_model).is_dir()
                                    else str(base_model) if base_model else None),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora, "use_dora": False,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": init_weights, "inference_mode": True,
        "target_modules": compact_regex([n for n, _ in layers], linear_names(model)),
        "modules_to_save": list(modules_to_save) or None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
        "auto_mapping": {"base_model_class": ARCHITECTURES[model.cfg.model_type], "parent_library": "minivl"},
    }


def adapter_state(model, modules_to_save=(), tensors=None):
    """{PEFT key: tensor} for every adapter and every fully trained module (detached, on the CPU), read from
    `tensors` ({parameter name: tensor}, e.g. a sharded model's gathered whole) or the model's parameters."""
    params = dict(model.named_parameters()) if tensors is None else tensors
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PREFIX}{name}.lora_A.weight"] = params[f"{name}.lora_A.weight"]
        state[f"{PREFIX}{name}.lora_B.weight"] = params[f"{name}.lora_B.weight"]
    for module_name in modules_to_save:
        for pname, _ in model.get_submodule(module_name).named_parameters():
            state[f"{PREFIX}{module_name}.{pname}"] = params[f"{module_name}.{pname}"]
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model, directory, base_model=None, modules_to_save=(), config=None, tensors=None):
    """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes them (`tensors`: see
    adapter_state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config or adapter_config(model, base_model, modules_to_save)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state(model, modules_to_save, tensors), tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    (directory / (ADAPTER_CONFIG + ".tmp")).write_text(json.dumps(config, indent=2) + "\n")
    os.replace(directory / (ADAPTER_CONFIG + ".tmp"), directory / ADAPTER_CONFIG)


def read_adapter_config(directory):
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a LoRA adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config['peft_type']!r}; minivl loads LoRA adapters only")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by minivl.lora")
    return config


def base_model(directory, model=None):
    """The base model of an adapter directory: `model` when given, else the base_model_name_or_path of its
    adapter_config.json, which must be found (a local path is stored absolute, so it is, from any directory)."""
    if model:
        return model
    base = read_adapter_config(directory).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory}/adapter_config.json names no base model: pass --model")
    try:
        resolve(base)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the base model that {directory}/adapter_config.json names; pass --model "
                                "to give it)") from None
    return base


def _model_name(key, family, known):
    """A PEFT key's module path in minivl's names. Adapters made on transformers < 4.52 carry the file names
    (`model.layers.*`, `visual.*`), not today's in-memory names (ms-swift #4697): map those too."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if path in known:
        return path
    return file_to_module_name(path, family)


def _targets_from_config(model, config):
    """The module names the config's target_modules select: a regex (full match) or a list of suffixes."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    target = config.get("target_modules")
    family = model.cfg.family
    if isinstance(target, str):
        pattern = re.compile(target)
        return [n for n in names if pattern.fullmatch(n) or pattern.fullmatch(module_to_file_name(n, family))]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target or [])]


def load_adapter(model, directory, trainable=False):
    """Inject the adapter of a PEFT directory into the model and load its tensors. Returns its config."""
    config = read_adapter_config(directory)
    inject(model, _targets_from_config(model, config), config["r"], config["lora_alpha"], 0.0,
           bool(config.get("use_rslora")))
    loaded = load_adapter_tensors(model, directory)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and name in loaded)
    return config


@torch.no_grad()
def load_adapter_tensors(model, directory):
    """Copy adapter_model.safetensors into a model whose adapters are already in place, strictly: a tensor
    without a place in the model, or an adapter layer without tensors, is an error that names them.
    Returns the names of the parameters written."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (minivl reads safetensors adapters, not adapter_model.bin)")
    params = dict(model.named_parameters(remove_duplicate=False))
    family = model.cfg.family
    loaded, unexpected = set(), []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            # PEFT files say lora_A.weight; a state dict taken from a PeftModel says lora_A.default.weight
            name = _model_name(key.replace(".default.", "."), family, params)
            if name not in params:
                unexpected.append(key)
                continue
            tensor = f.get_tensor(key)
            if tensor.shape != params[name].shape:
                raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, "
                                 f"the model {list(params[name].shape)}")
            param = params[name]
            if hasattr(param, "device_mesh"):  # an FSDP2 shard (DTensor): this process copies its own slice
                from torch.distributed.tensor import distribute_tensor
                tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements,
                                           src_data_rank=None)
            param.copy_(tensor)
            loaded.add(name)
    expected = {f"{n}.lora_{ab}.weight" for n, _ in lora_layers(model) for ab in "AB"}
    missing = sorted(expected - loaded)
    if unexpected or missing:
        raise ValueError(f"adapter {directory} does not fit the model: unexpected tensors {unexpected[:10]}, "
                         f"adapter layers without tensors {missing[:10]}")
    return loaded
