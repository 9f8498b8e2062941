"""minivl's two image paths and its video path against transformers' processors, on the test images: max |diff|.

    python benchmarks/check_fast_processor.py          # needs transformers, and torchvision for its fast half

No network: for each family a processor directory is written locally (the family's published
preprocessor_config.json values, the demo tokenizer). For each test image (tests/test_processor.py's 28: 25
sizes up to aspect ratio 187, grey, RGBA and palette images) it prints the largest absolute difference of the
pixel values of
    fast   minivl's default torch path      vs transformers' Qwen2VLImageProcessor (torchvision), should be 0
    pil    minivl with use_fast=False       vs transformers' Qwen2VLImageProcessorPil, should be 0
    paths  minivl's two paths against each other, in grey levels (0..255): the price of the other path
and for a 6-frame clip the video path against transformers' Qwen2VLVideoProcessor at the same frame size. Exits
non-zero when fast or pil or video exceed 1e-5.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from processor_helpers import FAMILIES, family_dir, noise_image  # noqa: E402
from test_processor import images  # noqa: E402

from minivl.processor import Processor  # noqa: E402

TOL = 1e-5


def worst(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def grey_levels(a, b, settings):
    """max |a - b| of two pixel-row arrays (N, C * T * P * P), undone to grey levels channel by channel."""
    d = np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), 3, -1).max(axis=(0, 2))  # (C,)
    return float((d * np.asarray(settings.image_std) / settings.rescale_factor).max())


def main():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        import torchvision
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        version = torchvision.__version__
    except Exception as e:  # noqa: BLE001 - torchvision missing or not loading beside this torch
        Qwen2VLImageProcessor = Qwen2VLVideoProcessor = None
        version = f"not importable ({e}): the fast and video columns are skipped"
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torchvision {version}")
    failed = False
    root = Path(tempfile.mkdtemp())
    for family in FAMILIES:
        directory = family_dir(root / family, family)
        fast, pil = Processor.from_pretrained(directory), Processor.from_pretrained(directory, use_fast=False)
        hf_pil = Qwen2VLImageProcessorPil.from_pretrained(directory)
        hf_fast = Qwen2VLImageProcessor.from_pretrained(directory) if Qwen2VLImageProcessor else None
        print(f"\n{family}: image (width x height, mode) -> grid   fast  pil  paths (grey levels)")
        totals, paths = np.zeros(3), []
        for image in images():
            ours_fast, ours_pil = fast.process_images([image]), pil.process_images([image])
            ref_pil = hf_pil(images=[image], return_tensors="np")
            assert ours_pil["image_grid_thw"].tolist() == ref_pil["image_grid_thw"].tolist()
            row = [float("nan"), worst(ours_pil["pixel_values"], ref_pil["pixel_values"]),
                   grey_levels(ours_fast["pixel_values"], ours_pil["pixel_values"], fast.vision)]
            if hf_fast is not None:
                ref_fast = hf_fast(images=[image], return_tensors="np")
                assert ours_fast["image_grid_thw"].tolist() == ref_fast["image_grid_thw"].tolist()
                row[0] = worst(ours_fast["pixel_values"], ref_fast["pixel_values"])
            totals = np.fmax(totals, row)
            grid = tuple(ours_fast["image_grid_thw"][0].tolist())
            paths.append(row[2])
            print(f"  {image.size[0]}x{image.size[1]} {image.mode:4s} -> {grid}   "
                  + "  ".join(f"{x:.3g}" for x in row))
        fast_max = f"{totals[0]:.3g}" if hf_fast is not None else "-"
        print(f"  max over images: fast {fast_max}  pil {totals[1]:.3g}  paths {totals[2]:.3g} grey levels "
              f"(median {np.median(paths):.3g})")
        failed |= bool(totals[0] > TOL or totals[1] > TOL)
        if Qwen2VLVideoProcessor is not None:
            frames = [noise_image(160, 90, seed=s) for s in range(6)]
            x, (t, h, w), _, _ = fast.process_video({"video": frames, "fps": 2.0})
            v = fast.vision
            pixels = h * v.patch_size * w * v.patch_size  # the frame size minivl chose, for transformers too
            video = Qwen2VLVideoProcessor(
                patch_size=v.patch_size, merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                image_mean=list(v.image_mean), image_std=list(v.image_std), min_pixels=pixels,
                max_pixels=pixels, do_sample_frames=False, cap_pixels_per_frame=False)
            clip = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames]))  # (F, H, W, C) uint8
            ref = video(videos=[clip], return_tensors="np")
            assert ref["video_grid_thw"].tolist() == [[t, h, w]]
            d = worst(x, ref["pixel_values_videos"])
            print(f"  video 6 frames 160x90 -> {(t, h, w)}: {d:.3g}")
            failed |= d > TOL
    checked = "PIL, fast and video paths" if Qwen2VLImageProcessor else "PIL path only (no torchvision)"
    print(f"\nFAILED ({checked})" if failed else f"\n{checked}: all within {TOL}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
