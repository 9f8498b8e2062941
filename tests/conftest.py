import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py as a plain module

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers model, minivl model) on one tiny checkpoint that transformers wrote, per family."""
    import minivl
    from helpers import save_hf

    directory = tmp_path_factory.mktemp(request.param)
    hf = save_hf(request.param, directory)
    return request.param, hf, minivl.load(directory)


@pytest.fixture
def triton_cpu(monkeypatch):
    """Triton kernels on CPU tensors, through Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MINIVL_KERNELS", "triton")
