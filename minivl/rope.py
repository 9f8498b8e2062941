"""3-D position ids (time, height, width) for M-RoPE, and the rope deltas that continue them during generation.

Text tokens advance all three rows together by one. A block of vision tokens (one image, one video, or for
Qwen3 one video frame) of merged grid (t', h', w') starts all three rows at the position the next text token
would take, and spreads them: row 0 by time, row 1 by merged-patch row, row 2 by merged-patch column. The text
after the block continues at (largest position used so far) + 1.

Which behaviour this follows where transformers' versions disagree: the Qwen team's reference (transformers 4.57's
`get_rope_index` and the official fine-tune code `rope2d.py`):
  * Qwen2.5-VL video time: floor(k * second_per_grid_t * tokens_per_second) for temporal patch k, multiplied
    in floating point before flooring. transformers 5.17 truncates second_per_grid_t to an int first, which
    collapses every temporal patch to 0 when the sampling fps is above 2.
  * the text after a video starts at max(time, height, width position of the block) + 1. transformers 5.x
    starts it at start + max(h', w'), which differs when a video is longer in time than it is wide.
  * still images get no time scaling (t' = 1 anyway).
Both agree whenever second_per_grid_t is whole and (t' - 1) * interval < max(h', w').

Qwen3-VL puts a "<x.x seconds>" text timestamp before each frame, so each temporal patch of a video is its own
block with time row 0 (video_grid_thw rows are split into t rows of (1, h, w)).

Shapes: B batch, T tokens (padding included), n valid tokens of one row.
"""

import torch


def _vision_block(grid, merge, start, time_step):
    """Positions (3, t' h' w') of one vision block starting at `start`."""
    t, h, w = grid
    gh, gw = h // merge, w // merge
    time = (torch.arange(t, dtype=torch.float32) * time_step).long()  # floor after the float product
    pos = torch.stack(torch.meshgrid(time, torch.arange(gh), torch.arange(gw), indexing="ij"))  # (3, t, gh, gw)
    return pos.view(3, -1) + start


def _vision_items(cfg, image_grid_thw, video_grid_thw, second_per_grid_ts):
    """Iterators over (grid, time step) of the images and the videos, in the order they occur in the batch."""
    images = [(tuple(g), 1.0) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    videos = []
    for i, (t, h, w) in enumerate(video_grid_thw.tolist() if video_grid_thw is not None else []):
        if cfg.family == "qwen3_vl":
            videos += [((1, h, w), 1.0)] * t  # one block per temporal patch, each behind its timestamp
        elif cfg.family == "qwen2_5_vl":
            seconds = float(second_per_grid_ts[i]) if second_per_grid_ts is not None else 1.0
            videos.append(((t, h, w), seconds * cfg.vision.tokens_per_second))
        else:
            videos.append(((t, h, w), 1.0))
    return images, videos


def get_rope_index(cfg, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None):
    """Returns position_ids (3, B, T) and rope_deltas (B, 1) (transformers' `get_rope_index`, reference rules
    above). Padding positions (attention_mask 0, left or right) get position 1, as in the reference; the
    delta is (largest position + 1) - T, so that decoding token number c (counting padding) sits at c + delta.
    """
    merge = cfg.vision.spatial_merge_size
    ids_all = input_ids.cpu()
    mask_all = attention_mask.cpu().bool() if attention_mask is not None else torch.ones_like(ids_all, dtype=bool)
    images, videos = _vision_items(cfg, image_grid_thw, video_grid_thw, second_per_grid_ts)
    queue = {cfg.image_token_id: iter(images), cfg.video_token_id: iter(videos)}
    used = {cfg.image_token_id: 0, cfg.video_token_id: 0}
    B, T = ids_all.shape
    hidden = ((ids_all == cfg.image_token_id) | (ids_all == cfg.video_token_id)) & ~mask_all  # (B, T)
    if hidden.any():
        # transformers 5.17 gives no defined result here: it scatters features into every placeholder, padding
        # included, but takes grids only for the attended ones, so each later image gets an earlier one's grid
        rows = hidden.any(1).nonzero().flatten().tolist()
        raise ValueError(f"{int(hidden.sum())} image/video placeholder tokens sit inside the padding "
                         f"(attention_mask 0) of batch rows {rows}: a vision block must be attended as a "
                         "whole; pad with the pad token, never with placeholders")
    position_ids = torch.ones(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    for b in range(B):
        ids = ids_all[b][mask_all[b]]  # (n,)
        kind = torch.where((ids == cfg.image_token_id) | (ids == cfg.video_token_id), ids, -1)
        cuts = (torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist()
        chunks, next_pos = [], 0
        for s, e in zip([0] + cuts, cuts + [len(ids)]):
            token = int(kind[s])
            if token == -1:  # a text run (vision start/end tokens and timestamps included)
                chunks.append(torch.arange(e - s).expand(3, -1) + next_pos)
                next_pos += e - s
                continue
            # a run of pad tokens: one or more whole vision blocks, each as long as its grid says
            while s < e:
                item = next(queue[token], None)
                name = "image" if token == cfg.image_token_id else "video"
                if item is None:
                    raise ValueError(f"input_ids hold more {name} tokens than {name}_grid_thw describes "
                                     f"({used[token]} {name} blocks given)")
                (t, h, w), step = item
                n = t * (h // merge) * (w // merge)
                if s + n > e:
                    raise ValueError(f"a run of {e - s} {name} tokens does not fit {name} block "
                                     f"{used[token]} of grid {(t, h, w)}, which needs {n} tokens")
                block = _vision_block((t, h, w), merge, next_pos, step)
                chunks.append(block)
                next_pos = int(block.max()) + 1
                used[token] += 1
                s += n
        positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)  # (3, n)
        position_ids[:, b, mask_all[b]] = positions
        deltas[b] = next_pos - T
    for token, items in ((cfg.image_token_id, images), (cfg.video_token_id, videos)):
        if used[token] != len(items):
            name = "image" if token == cfg.image_token_id else "video"
            raise ValueError(f"{name}_grid_thw describes {len(items)} {name} blocks but input_ids hold "
                             f"{used[token]}")
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)
