"""Videos: frame sampling, pixel budget, grids, Qwen2.5 seconds per grid and Qwen3 timestamps, by hand.

Every expected number below is worked out from the documented rules (facts §5.6, qwen-vl-utils):
n = total / video_fps * fps, clamped to [4, min(768, total)] and floored to an even count; indices =
round(linspace(0, total - 1, n)); seconds per temporal patch = 2 / sampled fps; a Qwen3 timestamp = the mean
time of the two frames of a temporal patch, printed with one decimal.
"""

import re
import sys

import pytest
from PIL import Image
from processor_helpers import PREPROCESSOR, family_dir, noise_image

from minivl.processor import Processor, sample_frame_indices, video_frame_pixels

SMALL_VIDEO = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}     # 56x56 frames stay 56x56 (2x2 merged)


def make(tmp_path, model_type, video=SMALL_VIDEO):
    pre = {k: v for k, v in PREPROCESSOR[model_type].items() if k != "size"}
    pre.update(min_pixels=56 * 56, max_pixels=112 * 112)
    return Processor.from_pretrained(family_dir(tmp_path / model_type, model_type, pre, video=video))


def frames(tmp_path, n, size=(56, 56)):
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"frame{i}.png"))
        noise_image(*size, seed=i).save(paths[-1])
    return paths


def timestamps(processor, batch):
    text = processor.decode(batch["input_ids"][0], skip_special_tokens=False)
    return re.findall(r"<(\d+\.\d) seconds>", text)


@pytest.mark.parametrize("total, video_fps, fps, nframes, expected", [
    (300, 30, 2, None, [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283,
                        299]),                 # 10 s at 2 fps: 20 frames
    (30, 30, 2, None, [0, 10, 19, 29]),        # 1 s gives 2 frames, raised to the minimum of 4
    (45, 30, 2, None, [0, 15, 29, 44]),        # 1.5 s gives 3, raised to 4
    (91, 30, 2, None, [0, 18, 36, 54, 72, 90]),  # 6.07 frames floored to 6
    (3, 30, 2, None, [0, 2]),                  # a 3-frame video: at most 2 (even, not above its length)
    (100, 10, 2, 7, [0, 14, 28, 42, 57, 71, 85, 99]),  # nframes 7 rounds to 8
])
def test_frame_indices(total, video_fps, fps, nframes, expected):
    assert sample_frame_indices(total, video_fps, fps, nframes=nframes) == expected


@pytest.mark.parametrize("total, video_fps, fps, count", [
    (250, 25, 1, 10), (100, 25, 4, 16), (10000, 30, 2, 666), (20000, 30, 2, 768),
    (7, 2.5, 2, 4)])                           # 5.6 frames floor to 4
def test_frame_counts(total, video_fps, fps, count):
    assert len(sample_frame_indices(total, video_fps, fps)) == count


def test_frame_count_limits():
    assert len(sample_frame_indices(300, 30, 2, min_frames=5, max_frames=9)) == 8     # max 9 floors to 8
    assert len(sample_frame_indices(30, 30, 2, min_frames=5)) == 6                    # min 5 rises to 6
    with pytest.raises(ValueError, match="a video of 1 frames cannot give 0 frames"):
        sample_frame_indices(1, 30)


def test_per_frame_pixel_budget():
    # Qwen2/2.5 (factor 28): min 128 tokens = 100352 px, cap 768 tokens = 602112 px, total 115200 tokens
    assert video_frame_pixels(4, 28) == (100352, 602112)
    assert video_frame_pixels(768, 28) == (100352, 235200)            # 90316800 / 768 * 2
    assert video_frame_pixels(2000, 28) == (100352, 105369)           # never under 1.05 x min
    assert video_frame_pixels(4, 28, max_pixels=50000) == (100352, 50000)
    assert video_frame_pixels(768, 32) == (131072, 307200)            # Qwen3 (factor 32)


@pytest.mark.parametrize("n, fps, grid_t, seconds", [(4, 2.0, 2, 1.0), (5, 2.0, 3, 1.0), (4, 1.0, 2, 2.0),
                                                      (6, 4.0, 3, 0.5), (2, 0.5, 1, 4.0)])
def test_frame_lists_qwen2_5(tmp_path, n, fps, grid_t, seconds):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [{"role": "user", "content": [{"type": "video", "video": frames(tmp_path, n), "fps": fps},
                                         {"type": "text", "text": "What happens?"}]}]
    out = p(conv)
    assert out["video_grid_thw"].tolist() == [[grid_t, 4, 4]]
    assert out["second_per_grid_ts"].tolist() == [seconds]
    assert out["pixel_values_videos"].shape == (grid_t * 16, 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == p.video_token_id).sum()) == grid_t * 4


def test_qwen2_vl_has_no_seconds_per_grid(tmp_path):
    conv = [{"role": "user", "content": [{"type": "video", "video": frames(tmp_path, 4)}]}]
    out = make(tmp_path, "qwen2_vl")(conv)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]] and "second_per_grid_ts" not in out


@pytest.mark.parametrize("n, fps, expected", [
    (6, 2.0, ["0.2", "1.2", "2.2"]),   # times 0, .5 | 1, 1.5 | 2, 2.5 -> 0.25, 1.25, 2.25 (round half even)
    (4, 1.0, ["0.5", "2.5"]),          # 0, 1 | 2, 3
    (4, 4.0, ["0.1", "0.6"]),          # 0, .25 | .5, .75 -> 0.125, 0.625
    (3, 1.0, ["0.5", "2.5"]),          # padded to 4 frames, qwen-vl-utils numbers the copy as frame 3
])
def test_qwen3_timestamps(tmp_path, n, fps, expected):
    p = make(tmp_path, "qwen3_vl", video={"min_pixels": 64 * 64, "max_pixels": 128 * 128})
    conv = [{"role": "user", "content": [{"type": "video", "video": frames(tmp_path, n, (64, 64)), "fps": fps}]}]
    out = p(conv)
    assert timestamps(p, out) == expected
    assert out["video_grid_thw"].tolist() == [[len(expected), 4, 4]]
    # one <|vision_start|> ... <|vision_end|> block per temporal patch, 2x2 merged tokens each
    assert int((out["input_ids"] == p.vision_start_token_id).sum()) == len(expected)
    assert int((out["input_ids"] == p.video_token_id).sum()) == 4 * len(expected)


def test_default_frame_budget(tmp_path):
    # no video limits in the config: qwen-vl-utils' 128..768 tokens per frame; 4 frames of 640x480 keep their
    # size (rounded to 476x644), 4 frames of 56x56 grow to 128 tokens (336x336)
    p = make(tmp_path, "qwen2_5_vl", video=None)
    big = [noise_image(640, 480, seed=i) for i in range(4)]
    assert p([{"role": "user", "content": [{"type": "video", "video": big}]}])["video_grid_thw"].tolist() \
        == [[2, 34, 46]]
    small = [noise_image(56, 56, seed=i) for i in range(4)]
    assert p([{"role": "user", "content": [{"type": "video", "video": small}]}])["video_grid_thw"].tolist() \
        == [[2, 24, 24]]


def test_bad_videos(tmp_path, monkeypatch):
    p = make(tmp_path, "qwen2_5_vl")
    mixed = [noise_image(56, 56), noise_image(84, 56)]
    with pytest.raises(ValueError, match="frames of one video must have one size"):
        p([{"role": "user", "content": [{"type": "video", "video": mixed}]}])
    monkeypatch.setitem(sys.modules, "av", None)                       # as if PyAV were not installed
    with pytest.raises(ImportError, match="pip install av"):
        p([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")}]}])


def write_video(path, n, fps=30, size=(64, 48)):
    """A lossless video whose frame i is a flat grey of level 2 * i, so decoded frames tell their index."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv444p"
        for i in range(n):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (2 * i, 2 * i, 2 * i)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize("fps, indices, seconds, stamps", [
    (2.0, [0, 18, 36, 53, 71, 89], 1.0, ["0.3", "1.5", "2.7"]),   # 90 frames at 30 fps: 6 frames, 2 fps
    (1.0, [0, 30, 59, 89], 1.5, ["0.5", "2.5"]),                 # 3 frames raised to 4: sampled at 4/3 fps
])
def test_video_file(tmp_path, fps, indices, seconds, stamps):
    path = tmp_path / "clip.mkv"
    write_video(path, 90)
    p25 = make(tmp_path, "qwen2_5_vl")
    pil, got, rate, sample_fps = p25.load_video({"video": str(path), "fps": fps})
    assert got == indices and rate == 30.0
    assert [im.getpixel((5, 5))[0] // 2 for im in pil] == indices     # the decoded frames are those frames
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path), "fps": fps}]}]
    out = p25(conv)
    assert out["second_per_grid_ts"].tolist() == [pytest.approx(seconds)]
    assert out["video_grid_thw"][0, 0] == len(indices) // 2
    p3 = make(tmp_path, "qwen3_vl")
    assert timestamps(p3, p3(conv)) == stamps        # (0+18)/2/30 = 0.3, (36+53)/2/30 = 1.48, (71+89)/2/30 = 2.67
