"""3-D positions written out by hand, where the Qwen reference rules and transformers 5 part ways (facts §7.15a)."""

import json

import pytest
import torch

from minivl.config import Config
from minivl.rope import get_rope_index


def cfg(name):
    return Config.from_dict(json.load(open(f"tests/configs/{name}.json")))


Q25, Q3, Q2 = cfg("qwen2_5_vl_3b"), cfg("qwen3_vl_8b"), cfg("qwen2_vl_2b")
VS, VE, IMG, VID = 151652, 151653, 151655, 151656


def positions(c, ids, **kw):
    pos, delta = get_rope_index(c, torch.tensor([ids]), **kw)
    return pos[:, 0].tolist(), delta.item()


def test_qwen2_5_fractional_seconds_per_grid_is_floored_after_multiplying():
    # fps 4 -> second_per_grid_t 0.5; 0.5 s x 2 tokens/s = one time step per temporal patch.
    # transformers 5.17 truncates 0.5 to 0 first and would give every patch time 0.
    ids = [1, 2, VS] + [VID] * 12 + [VE, 3]
    pos, delta = positions(Q25, ids, video_grid_thw=torch.tensor([[3, 4, 4]]),
                           second_per_grid_ts=torch.tensor([0.5]))
    t = [3 + k for k in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)]
    h = [3 + k for k in (0, 0, 1, 1) * 3]
    w = [3 + k for k in (0, 1, 0, 1) * 3]
    assert pos == [[0, 1, 2] + t + [6, 7], [0, 1, 2] + h + [6, 7], [0, 1, 2] + w + [6, 7]]
    assert delta == 8 - len(ids)


def test_qwen2_5_text_after_a_long_video_starts_after_its_last_time_position():
    # 4 temporal patches 2 steps apart reach time 3 + 6 = 9, so the text resumes at 10
    # (transformers 5 would resume at 3 + max(h', w') = 5 and reuse positions)
    ids = [1, 2, VS] + [VID] * 16 + [VE]
    pos, _ = positions(Q25, ids, video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=torch.tensor([1.0]))
    assert pos[0][3:19] == [3 + k for k in (0,) * 4 + (2,) * 4 + (4,) * 4 + (6,) * 4]
    assert [row[-1] for row in pos] == [10, 10, 10]


def test_qwen2_video_time_steps_by_one():
    ids = [VS] + [VID] * 8 + [VE]
    pos, _ = positions(Q2, ids, video_grid_thw=torch.tensor([[2, 4, 4]]))
    assert pos[0] == [0] + [1] * 4 + [2] * 4 + [3]


def test_qwen3_video_is_one_block_per_frame_behind_its_timestamp():
    ts = 17  # stands in for the "<0.5 seconds>" text tokens
    ids = [ts, VS] + [VID] * 4 + [VE, ts, VS] + [VID] * 4 + [VE]
    pos, _ = positions(Q3, ids, video_grid_thw=torch.tensor([[2, 4, 4]]))
    assert pos == [[0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 7, 7, 9],
                   [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 8, 8, 9],
                   [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9]]


def test_image_block_and_left_padding():
    ids = torch.tensor([[0, 0, 5, VS, IMG, IMG, VE], [5, 6, 7, VS, IMG, IMG, VE]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(Q25, ids, mask, image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 4]]))
    # an image of 1x2 merged tokens: h row stays, w row steps; text resumes at start + max(h', w') = start + 2
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2, 2, 4], [1, 1, 0, 1, 2, 2, 4], [1, 1, 0, 1, 2, 3, 4]]
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4, 4, 6], [0, 1, 2, 3, 4, 4, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert delta.flatten().tolist() == [5 - 7, 7 - 7]


def test_text_only_positions_count_real_tokens():
    ids = torch.tensor([[0, 0, 0, 5, 6], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(Q3, ids, mask)
    assert pos[0].tolist() == [[1, 1, 1, 0, 1], [0, 1, 2, 3, 4]]
    assert delta.flatten().tolist() == [-3, 0]


def test_grid_count_mismatch_names_the_counts():
    ids = [VS] + [IMG] * 2 + [VE]
    with pytest.raises(ValueError, match="describes 2 image blocks but input_ids hold 1"):
        positions(Q25, ids, image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 4]]))
    with pytest.raises(ValueError, match="run of 2 image tokens does not fit image block 0"):
        positions(Q25, ids, image_grid_thw=torch.tensor([[1, 4, 4]]))
