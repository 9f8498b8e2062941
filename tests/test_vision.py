"""The vision tower's index bookkeeping on many grid shapes, and segment attention against a dense reference."""

import itertools

import pytest
import torch

from minivl.vision import make_segments, position_grid_taps, segment_attention, window_index

GRIDS = [(1, 2, 2), (1, 8, 8), (1, 10, 14), (1, 16, 6), (2, 6, 8), (3, 14, 22), (1, 2, 30)]


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 4, 12, 64], [1, 7], [100]])
def test_segment_attention_equals_block_diagonal_dense_attention(lengths):
    N, H, Dh = sum(lengths), 3, 8
    q, k, v = (torch.randn(N, H, Dh, dtype=torch.float64) for _ in range(3))
    out = segment_attention(q, k, v, make_segments(lengths, "cpu"))
    seg_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seg_id[:, None] == seg_id[None, :]  # (N, N) block diagonal
    scores = torch.einsum("nhd,mhd->hnm", q, k) / Dh**0.5
    ref = torch.einsum("hnm,mhd->nhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    assert (out - ref).abs().max() < 1e-12


def test_window_index_matches_transformers():
    from transformers.vision_utils import get_vision_window_index

    for grids in itertools.combinations(GRIDS, 2):
        order, lengths = window_index(grids, window=4, merge=2)
        ref_order, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
        assert torch.equal(order, ref_order)
        ours_cu = torch.cumsum(torch.tensor([0] + lengths), 0)
        assert torch.equal(ours_cu.int(), ref_cu.int())


def test_position_grid_taps_match_transformers():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    table = torch.randn(48 * 48, 5, dtype=torch.float64)
    rows, weights = position_grid_taps(GRIDS, 48, 2)
    idx, wt = get_vision_interpolation_indices_and_weights(torch.tensor(GRIDS), 48, mode="bilinear",
                                                           align_corners=True, spatial_merge_size=2)
    ours = (table[rows] * weights[..., None].double()).sum(1)
    ref = (table[idx] * wt[..., None].double()).sum(1)
    assert (ours - ref).abs().max() < 1e-6


def test_compiled_blocks_equal_eager_blocks(tmp_path):
    import minivl
    from helpers import pixels, save_hf

    save_hf("qwen2_5_vl", tmp_path)
    tower = minivl.load(tmp_path).model.visual
    pv, thw = pixels("qwen2_5_vl", [(1, 10, 14), (1, 8, 8)])  # partial windows: the padded, masked path
    with torch.no_grad():
        eager, _ = tower(pv, thw)
        tower.compile_blocks()
        compiled, _ = tower(pv, thw)
    assert (compiled - eager).abs().max() < 1e-5
