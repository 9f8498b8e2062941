"""Configs of the three Qwen-VL families, read from and written to the official `config.json`.

Two file formats exist for the same models:
  * flat (Qwen2-VL, Qwen2.5-VL as published): text fields at the top level, `rope_scaling` with
    `{"type": "mrope", "mrope_section": [...]}`, a `vision_config` dict;
  * nested (Qwen3-VL as published, and everything transformers 5 writes): `text_config` + `vision_config`,
    rope settings in `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
`Config.from_dict` reads both; `Config.to_dict` writes the format the family is published in, so that
`transformers` and every other loader open what minivl saves. Derived values live in properties here and
nowhere else.

Qwen2-VL names its vision fields differently: `embed_dim` is the ViT width and `hidden_size` is the merger
output (= the LLM width); Qwen2.5-VL and Qwen3-VL use `hidden_size` for the ViT width and `out_hidden_size`
for the merger output.
"""

from dataclasses import asdict, dataclass, field

from .text import activation

FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",  # same vision tower and decoder, with a sparse MLP
}

ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


# transformers 5.17's config class defaults: a field that config.json leaves out takes the value transformers
# gives it (tests/test_config.py builds each class and compares)
QWEN2_TEXT = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6)
QWEN3_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=5e5)
TEXT_DEFAULTS = {
    "qwen2_vl": QWEN2_TEXT,
    "qwen2_5_vl": QWEN2_TEXT,
    "qwen3_vl": QWEN3_TEXT,
    "qwen3_vl_moe": dict(QWEN3_TEXT, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, num_local_experts=60,
                         num_experts_per_tok=4, moe_intermediate_size=1408, decoder_sparse_step=1,
                         mlp_only_layers=[]),
}
PATCHES = dict(in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VISION = dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
                    num_heads=16, patch_size=16, out_hidden_size=3584, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], **PATCHES)
VISION_DEFAULTS = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                     num_heads=16, patch_size=14, **PATCHES),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       patch_size=14, out_hidden_size=3584, window_size=112, tokens_per_second=4,
                       fullatt_block_indexes=[7, 15, 23, 31], **PATCHES),
    "qwen3_vl": QWEN3_VISION,
    "qwen3_vl_moe": QWEN3_VISION,
}


def refuse_unsupported(model_type, t, v, tp):
    """An error for every config value that would make transformers compute something minivl does not.
    t, v: the text and vision fields with defaults filled in; tp: "text_config." for nested files, else ""."""
    activation(t["hidden_act"], f"{tp}hidden_act")
    activation(v["hidden_act"], "vision_config.hidden_act")
    for key in ("rope_parameters", "rope_scaling"):
        kind = (t.get(key) or {}).get("rope_type", (t.get(key) or {}).get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"{tp}{key}.rope_type={kind!r}: minivl computes the default M-RoPE only (no "
                             "scaled rotary; no published Qwen-VL checkpoint uses one)")
    qwen3 = FAMILIES[model_type] == "qwen3_vl"
    if not qwen3 and t.get("use_sliding_window"):
        raise ValueError(f"{tp}use_sliding_window={t['use_sliding_window']!r}: minivl has no sliding-window "
                         "attention (every published Qwen2/2.5-VL config turns it off)")
    if qwen3 and t.get("attention_bias"):
        raise ValueError(f"{tp}attention_bias={t['attention_bias']!r}: minivl's Qwen3-VL decoder has no "
                         "attention biases (no published checkpoint has them)")
    if model_type == "qwen3_vl_moe" and t.get("norm_topk_prob", True) is not True:
        raise ValueError(f"{tp}norm_topk_prob={t['norm_topk_prob']!r}: transformers always renormalises the "
                         "top-k router weights of Qwen3-VL-MoE, and so does minivl")


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int  # ViT width
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # merger output = LLM width
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL window attention and video time scale
    window_size: int = 0
    fullatt_block_indexes: list = field(default_factory=list)
    tokens_per_second: float = 2.0
    # Qwen3-VL learned position grid and DeepStack taps
    num_position_embeddings: int = 0
    deepstack_visual_indexes: list = field(default_factory=list)
    rope_theta: float = 10000.0  # of the 2-D rotary

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self):
        return self.spatial_merge_size**2

    @property
    def window_merged(self):
        # Qwen2.5-VL windows measured in merged tokens per side: 112 px // 2 // 14 = 4
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list
    mrope_interleaved: bool  # Qwen3: T/H/W frequencies interleaved; Qwen2/2.5: contiguous chunks
    attention_bias: bool  # Qwen2/2.5: q/k/v biases
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    # Qwen3-VL-MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)

    def is_sparse_layer(self, i):
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class Config:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    @property
    def family(self):
        return FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, d):
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unknown model_type {model_type!r} in config.json; minivl reads {sorted(FAMILIES)}"
            )
        family = FAMILIES[model_type]
        # flat files keep the text fields at the top level; a field left out takes transformers' default
        nested = "text_config" in d
        t = {**TEXT_DEFAULTS[model_type], **(d["text_config"] if nested else d)}
        v = {**VISION_DEFAULTS[model_type], **d.get("vision_config", {})}
        tp = "text_config." if nested else ""  # where a text field sits, for error messages
        refuse_unsupported(model_type, t, v, tp)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
        heads = t["num_attention_heads"]
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=t["num_key_value_heads"] or heads,
            # Qwen2/2.5 have no head_dim field (transformers divides); Qwen3 reads it, default 128
            head_dim=t["head_dim"] if family == "qwen3_vl" else t["hidden_size"] // heads,
            rms_norm_eps=t["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", t["rope_theta"])),
            mrope_section=list(rope.get("mrope_section", [24, 20, 20] if family == "qwen3_vl" else
                                        [16, 24, 24])),
            # transformers ignores the flag: Qwen3-VL text rotary is always interleaved
            mrope_interleaved=family == "qwen3_vl",
            attention_bias=family != "qwen3_vl",
            qk_norm=family == "qwen3_vl",
            max_position_embeddings=t["max_position_embeddings"],
            hidden_act=t["hidden_act"],
            num_experts=t.get("num_experts", t.get("num_local_experts")) if model_type == "qwen3_vl_moe" else 0,
            num_experts_per_tok=t.get("num_experts_per_tok", 0),
            moe_intermediate_size=t.get("moe_intermediate_size", 0),
            decoder_sparse_step=t.get("decoder_sparse_step", 1),
            mlp_only_layers=list(t.get("mlp_only_layers", [])),
        )
        if family == "qwen2_vl":
            width = v["embed_dim"]
            vision = VisionConfig(
                depth=v["depth"], hidden_size=width, intermediate_size=int(width * v["mlp_ratio"]),
                num_heads=v["num_heads"], out_hidden_size=v["hidden_size"], hidden_act=v["hidden_act"],
            )
        else:
            vision = VisionConfig(
                depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"], hidden_act=v["hidden_act"])
        if family == "qwen2_5_vl":
            vision.window_size, vision.tokens_per_second = v["window_size"], v["tokens_per_second"]
            vision.fullatt_block_indexes = list(v["fullatt_block_indexes"])
        if family == "qwen3_vl":
            vision.num_position_embeddings = v["num_position_embeddings"]
            vision.deepstack_visual_indexes = list(v["deepstack_visual_indexes"])
        vision.rope_theta = float((v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 1e4)))
        for k in ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels"):
            setattr(vision, k, v[k])
        if family != "qwen3_vl" and 2 * sum(text.mrope_section) != text.head_dim:
            raise ValueError(f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}")
        # transformers 4 wrote the flag into text_config; transformers 5 ties a Qwen2/2.5 model when either place
        # says so, a Qwen3 model when the top level does
        tie = d.get("tie_word_embeddings", False) or (family != "qwen3_vl" and t.get("tie_word_embeddings"))
        ids = {k: d.get(k, t.get(k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id", "bos_token_id", "eos_token_id")}
        ids = {k: (val[0] if isinstance(val, list) else val) for k, val in ids.items() if val is not None}
        return cls(model_type=model_type, text=text, vision=vision, tie_word_embeddings=bool(tie), **ids)

    def to_dict(self, dtype=None):
        """The config.json of the published format: flat for Qwen2/2.5-VL, nested for Qwen3-VL."""
        t, v = self.text, self.vision
        text = {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
            "rope_theta": t.rope_theta, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        ids = {k: getattr(self, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id")}
        common = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
                  "tie_word_embeddings": self.tie_word_embeddings, **ids}
        if dtype is not None:
            common["torch_dtype"] = common["dtype"] = str(dtype).replace("torch.", "")
        vis = {"depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "patch_size": v.patch_size,
               "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
               "in_channels": v.in_channels}
        if v.rope_theta != 10000.0:
            vis["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        if self.family == "qwen2_vl":
            ratio = v.intermediate_size / v.hidden_size
            vis.update(embed_dim=v.hidden_size, hidden_size=v.out_hidden_size,
                       mlp_ratio=int(ratio) if ratio.is_integer() else ratio)
        else:
            vis.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                       out_hidden_size=v.out_hidden_size)
        if self.family == "qwen2_5_vl":
            vis.update(window_size=v.window_size, fullatt_block_indexes=v.fullatt_block_indexes,
                       tokens_per_second=v.tokens_per_second)
        if self.family == "qwen3_vl":
            vis.update(num_position_embeddings=v.num_position_embeddings,
                       deepstack_visual_indexes=v.deepstack_visual_indexes)
            text.update(head_dim=t.head_dim, attention_bias=False, rope_scaling={
                "rope_type": "default", "mrope_section": t.mrope_section, "mrope_interleaved": True})
            if t.num_experts:
                text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                            moe_intermediate_size=t.moe_intermediate_size,
                            decoder_sparse_step=t.decoder_sparse_step, mlp_only_layers=t.mlp_only_layers,
                            norm_topk_prob=True)
            text["model_type"] = self.model_type + "_text"
            vis["model_type"] = self.model_type
            return {**common, "text_config": text, "vision_config": vis}
        text["rope_scaling"] = {"type": "mrope", "mrope_section": t.mrope_section}
        return {**common, **text, "vision_config": vis}

    def __repr__(self):
        return f"Config({self.model_type}, text={asdict(self.text)}, vision={asdict(self.vision)})"
