"""minivl against transformers on the same tiny checkpoints, float32: logits within 1e-4.

Each case builds the token sequence by hand (vision blocks of the right length between random text), random
pixel rows of the right patch size, and runs both models on identical tensors. transformers 5 computes the 3-D
positions from `mm_token_type_ids`, which its processor would give it; minivl from `input_ids` alone.
"""

import pytest
import torch

import minivl
from helpers import (hf_model, left_pad, mm_token_type_ids, pixels, qwen3_video_tokens, save_hf, text,
                     vision_block)

TOL = 1e-4


def grids_for(family):
    # merged 5x7 and 3x4 are not multiples of the 4x4 Qwen2.5 window; 4x4 is exactly one window
    if family.startswith("qwen3"):
        return [(1, 10, 14), (1, 8, 8)], (2, 6, 8)
    return [(1, 10, 14), (1, 8, 8)], (2, 6, 8)


def run_both(hf, ours, input_ids, attention_mask=None, **vision):
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids(input_ids),
                 **vision).logits
        out = ours(input_ids, attention_mask=attention_mask, **vision)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=bool)
    return (out - ref)[valid].abs().max().item()


def test_text_only(pair):
    family, hf, ours = pair
    ids = torch.tensor([text(23, 1)])
    assert run_both(hf, ours, ids) <= TOL


def test_one_image(pair):
    family, hf, ours = pair
    grids, _ = grids_for(family)
    ids = torch.tensor([text(5, 2) + vision_block(grids[0]) + text(7, 3)])
    pv, thw = pixels(family, grids[:1])
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw) <= TOL


def test_two_images_of_different_sizes(pair):
    family, hf, ours = pair
    grids, _ = grids_for(family)
    ids = torch.tensor([text(4, 4) + vision_block(grids[0]) + text(3, 5) + vision_block(grids[1]) + text(6, 6)])
    pv, thw = pixels(family, grids)
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw) <= TOL


def test_one_video(pair):
    family, hf, ours = pair
    _, grid = grids_for(family)
    tokens = qwen3_video_tokens(grid) if family.startswith("qwen3") else vision_block(grid, video=True)
    ids = torch.tensor([text(5, 7) + tokens + text(8, 8)])
    pv, thw = pixels(family, [grid])
    extra = {}
    if family == "qwen2_5_vl":
        # whole seconds and (t - 1) * interval < max(h', w'): where transformers 5 and the reference agree
        extra["second_per_grid_ts"] = torch.tensor([1.0])
    assert run_both(hf, ours, ids, pixel_values_videos=pv, video_grid_thw=thw, **extra) <= TOL


def test_left_padded_batch(pair):
    family, hf, ours = pair
    grids, _ = grids_for(family)
    rows = [text(3, 9) + vision_block(grids[0]) + text(9, 10),
            text(6, 11) + vision_block(grids[1]) + text(2, 12)]
    ids, mask = left_pad(rows)
    pv, thw = pixels(family, grids)
    assert run_both(hf, ours, ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw) <= TOL


def test_image_and_video_in_one_batch(pair):
    # Qwen3 DeepStack then merges image and video features in sequence order
    family, hf, ours = pair
    grids, vgrid = grids_for(family)
    vtokens = qwen3_video_tokens(vgrid) if family.startswith("qwen3") else vision_block(vgrid, video=True)
    ids = torch.tensor([text(3, 13) + vtokens + text(2, 14) + vision_block(grids[1]) + text(4, 15)])
    pv, thw = pixels(family, grids[1:])
    pvv, vthw = pixels(family, [vgrid], seed=1)
    extra = {"second_per_grid_ts": torch.tensor([1.0])} if family == "qwen2_5_vl" else {}
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw, pixel_values_videos=pvv,
                    video_grid_thw=vthw, **extra) <= TOL


def test_hidden_states_are_transformers_last_hidden_state(pair):
    # what the trainers' fused loss reads: the decoder output after the final norm, before the lm_head
    family, hf, ours = pair
    grids, _ = grids_for(family)
    ids = torch.tensor([text(5, 16) + vision_block(grids[1]) + text(6, 17)])
    pv, thw = pixels(family, grids[1:])
    with torch.no_grad():
        ref = hf.model(input_ids=ids, pixel_values=pv, image_grid_thw=thw,
                       mm_token_type_ids=mm_token_type_ids(ids)).last_hidden_state
        hidden = ours.hidden_states(ids, pixel_values=pv, image_grid_thw=thw)
        assert (hidden - ref).abs().max() <= TOL
        assert (ours.lm_head(hidden) - hf.lm_head(ref)).abs().max() <= TOL


def test_image_token_count_mismatch_names_both_numbers(pair):
    family, hf, ours = pair
    grids, _ = grids_for(family)
    ids = torch.tensor([text(5, 2) + vision_block(grids[0])[:-3] + text(7, 3)])  # two pads short
    pv, thw = pixels(family, grids[:1])
    n = grids[0][1] * grids[0][2] // 4
    with pytest.raises(ValueError, match=f"{n - 2} image tokens.*{n}"):
        ours(ids, pixel_values=pv, image_grid_thw=thw)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tied_checkpoint_without_lm_head(family, tmp_path):
    from safetensors import safe_open

    hf = save_hf(family, tmp_path, tie=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = minivl.load(tmp_path)
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    ids = torch.tensor([text(9, 17)])
    assert run_both(hf, ours, ids) <= TOL


# an activation unlike the family's default in the vision tower and in the decoder, and a vision rotary base
# unlike 10000: each changes the logits by far more than the tolerance (checked below by undoing it)
OTHER_ACTIVATIONS = {"qwen2_vl": ("gelu", "gelu_pytorch_tanh"), "qwen2_5_vl": ("gelu_pytorch_tanh", "relu2"),
                     "qwen3_vl": ("quick_gelu", "gelu_new"), "qwen3_vl_moe": ("silu", "gelu")}


@pytest.mark.parametrize("family", list(OTHER_ACTIVATIONS))
def test_non_default_activations_and_vision_rope_theta(family, tmp_path):
    from minivl.config import VISION_DEFAULTS
    from minivl.text import ACTIVATIONS

    vision_act, text_act = OTHER_ACTIVATIONS[family]
    hf = hf_model(family, vision_extra={"hidden_act": vision_act, "rope_parameters": {"rope_theta": 500.0}},
                  text_extra={"hidden_act": text_act})
    with torch.no_grad():  # MLP inputs well beyond 0.1, where activations part ways, so each one shows
        for name, p in hf.named_parameters():
            if ".mlp." in name and "weight" in name and "visual.blocks" in name:
                p.mul_(20)
    hf.save_pretrained(tmp_path)
    ours = minivl.load(tmp_path)
    assert (ours.cfg.vision.hidden_act, ours.cfg.text.hidden_act, ours.cfg.vision.rope_theta) == (
        vision_act, text_act, 500.0)
    grids, _ = grids_for(family)
    ids = torch.tensor([text(5, 2) + vision_block(grids[0]) + text(7, 3)])
    pv, thw = pixels(family, grids[:1])
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw) <= TOL
    # computing with the family's default activation instead is far off, in the decoder and in the vision tower
    for layer in ours.model.language_model.layers:
        layer.mlp.act = ACTIVATIONS["silu"]
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw) > 10 * TOL
    ours = minivl.load(tmp_path)
    for block in ours.model.visual.blocks:
        block.mlp.act = ACTIVATIONS[VISION_DEFAULTS[family]["hidden_act"]]
    assert run_both(hf, ours, ids, pixel_values=pv, image_grid_thw=thw) > 10 * TOL


def test_placeholders_inside_the_padding_are_named(pair):
    # transformers 5.17 has no defined result here: it fills every placeholder with features but gives grids to
    # the attended ones only, in order, so a later image takes an earlier one's grid (or a shape error)
    family, hf, ours = pair
    grids, _ = grids_for(family)
    rows = [vision_block(grids[0]) + text(5, 1), text(2, 2) + vision_block(grids[1]) + text(3, 3)]
    ids, mask = left_pad(rows)
    mask[0, : mask.shape[1] - 5] = 0  # row 0 attends only to its text: its image block lies in the padding
    pv, thw = pixels(family, grids)
    n = grids[0][1] * grids[0][2] // 4
    with pytest.raises(ValueError, match=rf"{n} image/video placeholder tokens sit inside the padding "
                                         r"\(attention_mask 0\) of batch rows \[0\]"):
        ours(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
