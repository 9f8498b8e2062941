"""bf16 numerics: the rotary tables at long positions, and each family in bf16 against transformers in bf16.

Every other model test runs in float32, where a cast to the model dtype does nothing. In bf16 (8 significant bits)
the rotary angle of position 32768 is only representable to a multiple of 256 radians, so tables computed from
angles cast to bf16 are off by up to 2.0 (cos of a wrong angle); the angles must stay float32 up to cos / sin.
"""

import pytest
import torch

import minivl
from conftest import FAMILIES
from helpers import hf_config, mm_token_type_ids, pixels, save_hf, text, vision_block
from minivl.config import Config
from minivl.text import mrope_cos_sin
from minivl.vision import VisionTower

# Rounding a float32 value in [-1, 1] to bf16 moves it by at most half a step, 2^-9; a table computed in float32
# and then cast may differ from the float32 table by that much, never more.
TABLE_TOL = 2.0**-8

# the published layouts: Qwen2/2.5 chunked sections, theta 1e6; Qwen3 interleaved, theta 5e6 (head_dim 128)
LAYOUTS = {"chunked": ([16, 24, 24], False, 1e6), "interleaved": ([24, 20, 20], True, 5e6)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mrope_tables_in_bf16_equal_float32_at_long_positions(layout):
    section, interleaved, theta = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    # positions 4k to 32k, the time, height and width rows different (an image late in a long sequence)
    t = torch.arange(4096, 32768, 3)
    position_ids = torch.stack([t, t - torch.randint(0, 64, t.shape, generator=g),
                                t - torch.randint(0, 64, t.shape, generator=g)])[:, None]  # (3, 1, T)
    cos32, sin32 = mrope_cos_sin(position_ids, 128, theta, section, interleaved, torch.float32)
    cos16, sin16 = mrope_cos_sin(position_ids, 128, theta, section, interleaved, torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16
    assert (cos16.float() - cos32).abs().max() <= TABLE_TOL
    assert (sin16.float() - sin32).abs().max() <= TABLE_TOL


class Stop(Exception):
    pass


def vision_tables(family, dtype, grid):
    """The cos / sin tables the vision tower hands its first block, for one image of `grid` patches. The run
    stops there: a full attention over this many patches is not needed to see the tables."""
    cfg = Config.from_dict(hf_config(family).to_dict())
    tower = VisionTower(cfg.vision, cfg.family).to(dtype)
    seen = {}

    def capture(block, args):
        seen["cos"], seen["sin"] = args[1], args[2]
        raise Stop

    tower.blocks[0].register_forward_pre_hook(capture)
    t, h, w = grid
    patch = torch.zeros(1, 3 * 2 * cfg.vision.patch_size ** 2, dtype=dtype)
    with torch.no_grad(), pytest.raises(Stop):
        tower(patch.expand(t * h * w, -1), torch.tensor([grid]))  # (N, 3 * 2 * P * P), one row repeated
    return seen["cos"].float(), seen["sin"].float()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_rotary_tables_in_bf16_equal_float32_at_long_positions(family):
    # patch rows 0 to 32767: an image 32768 patches tall and 2 wide (Qwen2.5 windows reorder the rows)
    grid = (1, 32768, 2)
    cos32, sin32 = vision_tables(family, torch.float32, grid)
    cos16, sin16 = vision_tables(family, torch.bfloat16, grid)
    assert cos32.shape[0] == 32768 * 2
    assert (cos16 - cos32).abs().max() <= TABLE_TOL
    assert (sin16 - sin32).abs().max() <= TABLE_TOL


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, checkpoint directory, transformers model in float32) per family."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, save_hf(request.param, directory)


def test_parity_in_bf16(saved):
    """minivl in bf16 against transformers in bf16, both measured against transformers in float32: two images
    and 300 text tokens, so that positions reach where bf16 angles go wrong. Two correct bf16 implementations
    round differently, so minivl's error must be of the size of transformers' own, not zero (measured: 0.4x to
    1.2x its largest error; with the text angles cast to bf16 before cos / sin, 3x to 20x)."""
    tf = pytest.importorskip("transformers")
    family, directory, hf32 = saved
    grids = [(1, 10, 14), (1, 8, 8)]
    ids = torch.tensor([text(5, 2) + vision_block(grids[0]) + text(7, 3) + vision_block(grids[1]) + text(300, 6)])
    pv, thw = pixels(family, grids)
    hf16 = tf.AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ours16 = minivl.load(directory, dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        types = mm_token_type_ids(ids)
        truth = hf32(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=types).logits
        theirs = hf16(input_ids=ids, pixel_values=pv.bfloat16(), image_grid_thw=thw,
                      mm_token_type_ids=types).logits.float()
        ours = ours16(ids, pixel_values=pv.bfloat16(), image_grid_thw=thw)
    assert ours.dtype == torch.bfloat16
    ours = ours.float()
    their_error = (theirs - truth).abs()
    our_error = (ours - truth).abs()
    assert our_error.max() <= 2 * their_error.max(), (our_error.max(), their_error.max())
    assert our_error.mean() <= 1.5 * their_error.mean(), (our_error.mean(), their_error.mean())
    assert (ours - theirs).abs().max() <= 2 * their_error.max()
