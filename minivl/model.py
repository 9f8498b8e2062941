"""The vision-language model: vision features scattered into the token embeddings, the decoder, the lm_head.

    pixel_values --VisionTower--> (M, D) features --replace the <|image_pad|> / <|video_pad|> embeddings-->
    (B, T, D) --TextModel (3-D positions from rope.py; Qwen3: DeepStack features added after layers 0..2)-->
    normed hidden (B, T, D) --lm_head--> logits (B, T, V)

Module names equal the tensor names transformers uses in memory (`model.visual.*`, `model.language_model.*`,
`lm_head.*`), which are the Qwen3-VL file names; file_to_module_name maps the flat Qwen2/2.5-VL file names onto
them (checkpoint.py reads checkpoints with it) and module_to_file_name back (save_pretrained writes them).

`model(**batch)` returns logits. `model.hidden_states(**batch)` returns the final normed hidden states, for the
trainers, which feed them with `model.lm_head.weight` to the fused log-prob kernel instead of materialising
(B, T, V) logits. `image_index` / `video_index` place an item in several rows while the vision tower encodes it once
(a preference pair's chosen and rejected answers share their image). Both take `trace=fn`: fn(stage_name, tensor) is
called at every stage (patch embed, each vision block, merger, DeepStack features, embeddings, position ids, each
decoder layer, final norm), which is how `minivl.parity` and `--trace` watch a forward without editing the model.

Shapes: B batch, T tokens, D LLM width, V vocabulary, M merged vision tokens.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .rope import get_rope_index
from .text import TextModel
from .vision import VisionTower


def file_to_module_name(name, family):
    if family in ("qwen2_vl", "qwen2_5_vl"):
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
            return "model.language_model." + name[len("model."):]
    return name


def module_to_file_name(name, family):
    if family in ("qwen2_vl", "qwen2_5_vl"):
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
    return name


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.visual = VisionTower(cfg.vision, cfg.family)
        self.language_model = TextModel(cfg.text)


def causal_padding_mask(attention_mask):
    """Boolean (B, 1, T, T): causal, keys restricted to real tokens. Each token may always see itself, so a
    padding row still has one key and never turns into NaN (a NaN value row would poison every query)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class VLModel(nn.Module):
    def __init__(self, cfg, init=True):
        super().__init__()
        self.cfg = cfg
        self.eos_token_ids = None  # where minivl.generate stops by default; checkpoint.load sets it
        # several processes (training.shard, training.wrap_ddp): the vision tower runs in every forward, for
        # the images and for the videos, on a dummy image when there are none (FSDP gathers its weights in
        # each run; DDP waits for a gradient of each trained parameter)
        self.vision_in_every_forward = False
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if init:
            self.init_weights()
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std=0.02):
        # transformers' _init_weights for these models: normal(0, 0.02) weights, zero biases, unit norms
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
                m.weight.normal_(0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif hasattr(m, "eps") and hasattr(m, "weight"):  # RMSNorm
                m.weight.fill_(1.0)
            elif hasattr(m, "gate_up_proj"):  # MoE experts
                m.gate_up_proj.normal_(0, std)
                m.down_proj.normal_(0, std)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    @property
    def device(self):
        return self.lm_head.weight.device

    def _scatter(self, embeds, input_ids, token_id, pixels, grid_thw, name, trace, index=None):
        """Replace the embeddings of `token_id` positions with the vision features of `pixels`, in order; with
        `index`, the features of item index[0], index[1], ... of grid_thw, in order. With pixels None
        (vision_in_every_forward), the tower runs on a dummy image and its output is added times 0: every process
        then runs the same modules, with the same collectives, whatever its batch holds."""
        # a frozen tower runs without autograd: no graph and no saved activations (ms-swift PR #10214)
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.visual.parameters())
        if pixels is None:
            v, m = self.cfg.vision, self.cfg.vision.spatial_merge_size
            pixels = embeds.new_zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
            with torch.set_grad_enabled(trains):  # the smallest image: one merged token of m x m patches
                features, deepstack = self.model.visual(pixels.to(self.dtype), torch.tensor([[1, m, m]]))
            unused = features.sum() + sum(level.sum() for level in deepstack)  # DeepStack mergers too
            return embeds + 0.0 * unused.to(embeds.dtype), torch.zeros_like(input_ids, dtype=torch.bool), []
        with torch.set_grad_enabled(trains):
            features, deepstack = self.model.visual(pixels.to(self.dtype), grid_thw, trace=trace)  # (M, D)
        if index is not None:
            rows = _item_rows(grid_thw, index, self.cfg.vision.merge_unit)
            features, deepstack = features[rows], [level[rows] for level in deepstack]  # (M', D)
        mask = input_ids == token_id  # (B, T)
        n_tokens = int(mask.sum())
        if n_tokens != features.shape[0]:
            raise ValueError(f"input_ids hold {n_tokens} {name} tokens but {name}_grid_thw {grid_thw.tolist()} "
                             f"gives {features.shape[0]} {name} features")
        embeds = embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
        return embeds, mask, deepstack

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                      trace=None, cache=None, image_index=None, video_index=None):
        """Final normed hidden states (B, T, D) of the decoder. `cache`, one KVCache of T slots a layer (positions
        0..T-1), keeps the prompt's keys and values for the sampler. `image_index` (n,): the images of the
        token sequence, in order, as indices into image_grid_thw / pixel_values, which then hold each image
        once; `video_index` the same for videos."""
        cfg = self.cfg
        embeds = self.model.language_model.embed_tokens(input_ids)  # (B, T, D)
        visual_mask, deepstack = torch.zeros_like(input_ids, dtype=torch.bool), []
        if pixel_values is not None or self.vision_in_every_forward:
            embeds, visual_mask, deepstack = self._scatter(embeds, input_ids, cfg.image_token_id, pixel_values,
                                                           image_grid_thw, "image", trace, image_index)
        if pixel_values_videos is not None or self.vision_in_every_forward:
            embeds, video_mask, video_deepstack = self._scatter(embeds, input_ids, cfg.video_token_id,
                                                                pixel_values_videos, video_grid_thw, "video", trace,
                                                                video_index)
            deepstack = _merge_deepstack(visual_mask, deepstack, video_mask, video_deepstack)
            visual_mask = visual_mask | video_mask
        if image_index is not None:  # positions follow the items as placed
            image_grid_thw = image_grid_thw[image_index]
        if video_index is not None:
            video_grid_thw = video_grid_thw[video_index]
            second_per_grid_ts = None if second_per_grid_ts is None else second_per_grid_ts[video_index]
        if trace:
            trace("embeddings", embeds)
        if position_ids is None:
            position_ids, _ = get_rope_index(cfg, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts)
        if trace:
            trace("position_ids", position_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = causal_padding_mask(attention_mask)
        hidden = self.model.language_model(embeds, position_ids, mask, (visual_mask, deepstack) if deepstack else None,
                                           cache=cache, trace=trace)
        if trace:
            trace("text.norm", hidden)
        return hidden

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None, trace=None):
        """Logits (B, T, V) in the model's dtype."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                    video_grid_thw, second_per_grid_ts, position_ids, trace)
        logits = self.lm_head(hidden)
        if trace:
            trace("logits", logits)
        return logits

    def save_pretrained(self, directory, max_shard_bytes=5 * 2**30, tensors=None):
        """config.json and safetensors shards with the official names and layout. Files are written under temporary
        names and renamed at the end, so an interrupted save never leaves a half-written checkpoint in place.
        `tensors`: the state dict to write (default: the model's own), e.g. a sharded model's, gathered."""
        cfg = self.cfg
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state, tensors = self.state_dict() if tensors is None else tensors, {}
        for name, p in state.items():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            tensors[module_to_file_name(name, cfg.family)] = p.detach().to("cpu").contiguous()
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = t
            size += nbytes
        shards.append(current)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        written = []
        for fname, shard in zip(names, shards):
            save_file(shard, directory / (fname + ".tmp"), metadata={"format": "pt"})
            os.chmod(directory / (fname + ".tmp"), 0o644)  # safetensors writes 0600; checkpoints are shared files
            written.append(fname)
        extra = {"config.json": json.dumps(cfg.to_dict(dtype=self.dtype), indent=2)}
        if len(shards) > 1:
            weight_map = {k: f for f, shard in zip(names, shards) for k in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            extra["model.safetensors.index.json"] = json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        for fname, text in extra.items():
            (directory / (fname + ".tmp")).write_text(text)
            written.append(fname)
        for fname in written:
            os.replace(directory / (fname + ".tmp"), directory / fname)
        # a previous save with another shard count would leave stale shards that an index-less reader would glob
        for stale in directory.glob("model*.safetensors"):
            if stale.name not in names:
                stale.unlink()
        if len(shards) == 1 and (directory / "model.safetensors.index.json").exists():
            (directory / "model.safetensors.index.json").unlink()


def _item_rows(grid_thw, index, merge_unit):
    """The feature rows of items index[0], index[1], ... of grid_thw (each item's merged tokens are contiguous)."""
    sizes = grid_thw.prod(-1) // merge_unit  # (n_items,)
    starts = sizes.cumsum(0) - sizes
    return torch.cat([torch.arange(int(starts[i]), int(starts[i] + sizes[i]), device=grid_thw.device)
                      for i in index.tolist()])  # (M',)


def _merge_deepstack(image_mask, image_features, video_mask, video_features):
    """Qwen3-VL with images and videos in one batch: one (n_visual, D) feature per level whose rows follow the
    visual positions in sequence order, image rows from the image mergers and video rows from the video ones."""
    if not image_features or not video_features:  # one of them Qwen2/2.5 or a dummy pass: nothing to merge
        return image_features or video_features
    visual = image_mask | video_mask  # (B, T)
    is_image = image_mask[visual]  # (n_visual,)
    merged = []
    for img, vid in zip(image_features, video_features):
        level = img.new_zeros(is_image.shape[0], img.shape[-1])
        level[is_image] = img
        level[~is_image] = vid
        merged.append(level)
    return merged
