"""The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL in one file.

All three share the skeleton: a Conv3d patch embed over (2 frames x 14 or 16 px)^2 patches, pre-norm blocks of
bidirectional attention with a 2-D rotary, and a merger that concatenates each 2x2 block of neighbouring patches
into one LLM token. What differs, and nothing else:

  family      norm      block MLP                    attention                          extra
  qwen2_vl    LayerNorm fc1 -> act -> fc2            per frame                          -
  qwen2_5_vl  RMSNorm   gated, with biases           4x4-merged-token windows, except   window reorder
                                                     per frame in fullatt_block_indexes
  qwen3_vl    LayerNorm linear_fc1 -> act            per frame                          learned 48x48 position
                        -> linear_fc2                                                   grid; DeepStack mergers

`act` is the config's vision `hidden_act` (published: quick_gelu, silu, gelu_pytorch_tanh), from text.py's
table; the mergers' GELU is fixed, as in transformers.

Attention runs over segments (frames or windows) of one packed sequence without an (N x N) mask and without a
Python loop over segments: the segments are gathered into a padded (segments, length) batch and go through
one SDPA call (`segment_attention`). When every segment has the same length (one image, video frames, full
windows of one size) the gather is a free view and no mask is needed.

Shapes: N patches of all images and videos packed, C ViT width, H heads, Dh head dim, M = N / 4 merged
tokens, S segments, L padded segment length, G position-grid side (48).
Patch rows arrive in merge-block order (the processor's): consecutive groups of 4 rows are the 2x2
patches of one merged token.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .text import MLP, RMSNorm, activation, apply_rotary, signed_sin


@dataclass
class Segments:
    """A packed sequence cut into segments, laid out for one batched SDPA call."""

    length: int  # L: the longest segment, rounded up to a multiple of 8 when padding is needed
    index: torch.Tensor | None  # (S, L) rows of the packed sequence for each padded slot; None = equal segments
    mask: torch.Tensor | None  # (S, 1, 1, L) True where the slot holds a real key
    unpad: torch.Tensor | None  # (N,) position of each packed row in the flattened (S * L) padded layout


def make_segments(lengths, device):
    lengths = [int(n) for n in lengths if n > 0]
    if len(set(lengths)) == 1:
        return Segments(lengths[0], None, None, None)
    L = -(-max(lengths) // 8) * 8  # aligned rows keep SDPA's memory-efficient kernel usable
    lens = torch.tensor(lengths)
    starts = torch.cumsum(lens, 0) - lens
    slot = torch.arange(L)
    valid = slot[None, :] < lens[:, None]  # (S, L)
    index = torch.where(valid, starts[:, None] + slot[None, :], 0)  # (S, L): padded slots read row 0
    unpad = (torch.arange(len(lengths))[:, None] * L + slot[None, :])[valid]  # (N,)
    return Segments(L, index.to(device), valid[:, None, None, :].to(device), unpad.to(device))


def segment_attention(q, k, v, seg):
    """Bidirectional attention of q, k, v (N, H, Dh) restricted to segments; returns (N, H, Dh)."""
    N, H, Dh = q.shape
    if seg.index is None:
        q, k, v = (t.view(N // seg.length, seg.length, H, Dh) for t in (q, k, v))  # (S, L, H, Dh)
    else:
        q, k, v = q[seg.index], k[seg.index], v[seg.index]  # (S, L, H, Dh)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (S, H, L, Dh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask)  # (S, H, L, Dh)
    out = out.transpose(1, 2).reshape(-1, H, Dh)  # (S * L, H, Dh)
    return out if seg.unpad is None else out[seg.unpad]  # (N, H, Dh)


def rotary_angles(grid_thw, head_dim, merge, theta):
    """2-D rotary angles (N, Dh) in merge-block order: the first half rotates by the patch row, the second by the
    patch column, each over Dh/4 frequencies (transformers' `rot_pos_emb` / `get_vision_position_ids`)."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (Dh/4,)
    pos = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([rows, cols], -1).view(h // merge, merge, w // merge, merge, 2)
        pos.append(hw.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))  # (t*h*w, 2) in merge-block order
    freqs = torch.cat(pos)[:, :, None].float() * inv_freq  # (N, 2, Dh/4)
    freqs = freqs.flatten(1)  # (N, Dh/2): row angles then column angles
    return torch.cat([freqs, freqs], dim=-1)  # (N, Dh)


def window_index(grid_thw, window, merge):
    """Qwen2.5-VL windows (transformers' `get_window_index`): merged tokens reordered frame by frame into
    window-row, window-col, in-window row, in-window col order. Returns the reorder index (M,) and each
    window's length in patches. Windows are padded only up to the grid (never a whole empty row of windows),
    so no empty window and no duplicate boundary has to be removed afterwards."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        ph, pw = -(-gh // window) * window, -(-gw // window) * window
        idx = torch.full((t, ph, pw), -1, dtype=torch.long)
        idx[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        idx = idx.view(t, ph // window, window, pw // window, window).permute(0, 1, 3, 2, 4)
        idx = idx.reshape(-1, window * window)  # (windows, window^2), -1 = padding
        lengths += ((idx >= 0).sum(1) * merge * merge).tolist()
        order.append(idx[idx >= 0])
        offset += t * gh * gw
    return torch.cat(order), lengths


def position_grid_taps(grid_thw, side, merge):
    """Qwen3-VL's learned side x side position grid resampled to each image's (h, w) patch grid: bilinear with
    aligned corners (align_corners=False is off by up to 6.6 on Qwen3-VL-2B, sglang #22052), weights in float32 as
    transformers 5 keeps them. Returns table rows (N, 4) and weights (N, 4), in merge-block order."""
    rows, weights = [], []
    for t, h, w in grid_thw:
        def axis(n):
            src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
            lo = src.floor()
            frac = src - lo
            return lo.long(), (lo.long() + 1).clamp(max=side - 1), frac

        h0, h1, dh = axis(h)
        w0, w1, dw = axis(w)
        idx = torch.stack([h0[:, None] * side + w0, h0[:, None] * side + w1,
                           h1[:, None] * side + w0, h1[:, None] * side + w1], -1)  # (h, w, 4)
        wt = torch.stack([(1 - dh)[:, None] * (1 - dw), (1 - dh)[:, None] * dw,
                          dh[:, None] * (1 - dw), dh[:, None] * dw], -1)  # (h, w, 4)
        for tensor, out in ((idx, rows), (wt, weights)):
            blocks = tensor.view(h // merge, merge, w // merge, merge, 4).permute(0, 2, 1, 3, 4)
            out.append(blocks.reshape(-1, 4).repeat(t, 1))  # (t*h*w, 4) in merge-block order
    return torch.cat(rows), torch.cat(weights)


class PatchEmbed(nn.Module):
    # The Conv3d's kernel equals its stride and covers a whole patch row, so it is one matmul on the row
    def __init__(self, cfg, bias):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, x):
        w = self.proj.weight.view(self.proj.weight.shape[0], -1)  # (C, 3 * 2 * P * P)
        return F.linear(x.to(w.dtype), w, self.proj.bias)  # (N, C)


class VisionAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, seg):
        N = x.shape[0]
        qkv = self.qkv(x).view(N, 3, self.num_heads, -1)  # (N, 3, H, Dh)
        # q and k rotate together, in float32, cast back (transformers' apply_rotary_pos_emb_vision)
        q, k = apply_rotary(qkv[:, :2].float(), cos, sin).to(x.dtype).unbind(1)  # 2 x (N, H, Dh)
        return self.proj(segment_attention(q, k, qkv[:, 2], seg).reshape(N, -1))


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = activation(act, "vision_config.hidden_act")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Qwen3VisionMLP(nn.Module):  # Qwen2VisionMLP with the checkpoint's other tensor names
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.linear_fc1, self.linear_fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = activation(act, "vision_config.hidden_act")

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg, family):
        super().__init__()
        C = cfg.hidden_size
        Norm = RMSNorm if family == "qwen2_5_vl" else nn.LayerNorm
        self.norm1, self.norm2 = Norm(C, eps=1e-6), Norm(C, eps=1e-6)
        self.attn = VisionAttention(C, cfg.num_heads)
        if family == "qwen2_vl":
            self.mlp = Qwen2VisionMLP(C, cfg.intermediate_size, cfg.hidden_act)
        elif family == "qwen2_5_vl":
            self.mlp = MLP(C, cfg.intermediate_size, bias=True, act=cfg.hidden_act)
        else:
            self.mlp = Qwen3VisionMLP(C, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, seg):
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Qwen2/2.5-VL merger: norm each patch, concatenate 2x2 blocks, MLP to the LLM width."""

    def __init__(self, cfg, family):
        super().__init__()
        C4 = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6) if family == "qwen2_5_vl" else nn.LayerNorm(cfg.hidden_size,
                                                                                                eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C4, C4), nn.GELU(), nn.Linear(C4, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))  # (N, C) -> (M, 4C) -> (M, out)


class Qwen3PatchMerger(nn.Module):
    """Qwen3-VL merger. The DeepStack mergers normalise after concatenating the 2x2 block (postshuffle)."""

    def __init__(self, cfg, postshuffle):
        super().__init__()
        C4 = cfg.hidden_size * cfg.merge_unit
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(C4 if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1, self.linear_fc2 = nn.Linear(C4, C4), nn.Linear(C4, cfg.out_hidden_size)

    def forward(self, x):
        C4 = self.linear_fc1.in_features
        x = self.norm(x.view(-1, C4)) if self.postshuffle else self.norm(x).view(-1, C4)  # (M, 4C)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # (M, out)


class VisionTower(nn.Module):
    def __init__(self, cfg, family):
        super().__init__()
        self.cfg, self.family = cfg, family
        self.patch_embed = PatchEmbed(cfg, bias=family == "qwen3_vl")
        if family == "qwen3_vl":
            self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(cfg, family) for _ in range(cfg.depth)])
        if family == "qwen3_vl":
            self.merger = Qwen3PatchMerger(cfg, postshuffle=False)
            self.deepstack_merger_list = nn.ModuleList(
                [Qwen3PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes])
        else:
            self.merger = PatchMerger(cfg, family)
        self.gradient_checkpointing = False

    def compile_blocks(self):
        """Optional: torch.compile each block, with dynamic shapes. On a GPU a small image is bound by the cost of
        launching some 25 kernels per block; compiled, the norms, rotary and activations fuse and the launches
        shrink. The eager blocks stay the reference (tests compare the two)."""
        for block in self.blocks:
            block.compile(dynamic=True)

    def forward(self, pixel_values, grid_thw, trace=None):
        """pixel_values (N, 3 * 2 * P * P), grid_thw (items, 3) -> merged tokens (M, out) and the DeepStack
        features [(M, out), ...] (empty for Qwen2/2.5), both in the order of the input patches."""
        cfg, dev = self.cfg, pixel_values.device
        grids = [tuple(int(n) for n in g) for g in grid_thw.tolist()]
        N = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != N:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but grid_thw {grids} "
                             f"describes {N}")
        x = self.patch_embed(pixel_values)  # (N, C)
        if trace:
            trace("vision.patch_embed", x)
        if self.family == "qwen3_vl":
            rows, weights = position_grid_taps(grids, int(cfg.num_position_embeddings**0.5), cfg.spatial_merge_size)
            pos = (self.pos_embed(rows.to(dev)) * weights.to(dev)[..., None]).sum(1)  # (N, 4, C) -> (N, C)
            x = x + pos.to(x.dtype)
            if trace:
                trace("vision.pos_embed", x)
        angles = rotary_angles(grids, cfg.head_dim, cfg.spatial_merge_size, cfg.rope_theta).to(dev)  # (N, Dh)
        frames = make_segments([h * w for t, h, w in grids for _ in range(t)], dev)
        windows = None
        if self.family == "qwen2_5_vl":
            order, lengths = window_index(grids, cfg.window_merged, cfg.spatial_merge_size)
            order = order.to(dev)
            # windows never cross frames, so reordering whole 2x2 units keeps every frame contiguous
            x = x.view(N // cfg.merge_unit, cfg.merge_unit, -1)[order].view(N, -1)  # (N, C) in window order
            angles = angles.view(N // cfg.merge_unit, cfg.merge_unit, -1)[order].view(N, -1)
            windows = make_segments(lengths, dev)
        cos, sin = angles.cos()[:, None, None], signed_sin(angles.sin())[:, None, None]  # (N, 1, 1, Dh) float32
        deepstack = []
        for i, block in enumerate(self.blocks):
            seg = frames if windows is None or i in cfg.fullatt_block_indexes else windows
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, seg, use_reentrant=False)
            else:
                x = block(x, cos, sin, seg)
            if trace:
                trace(f"vision.blocks.{i}", x)
            if i in cfg.deepstack_visual_indexes:
                j = cfg.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[j](x))  # (M, out)
                if trace:
                    trace(f"vision.deepstack.{j}", deepstack[-1])
        merged = self.merger(x)  # (M, out)
        if windows is not None:
            merged = merged[torch.argsort(order)]  # back from window order to patch order
        if trace:
            trace("vision.merger", merged)
        return merged, deepstack
