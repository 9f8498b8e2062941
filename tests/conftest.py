import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py as a plain module


def _import_triton_interpreted():
    """Triton decorates its own library functions (tl.zeros, ...) when it is first imported, and they run in the
    interpreter only if TRITON_INTERPRET was set then. Any test module may import triton first (transformers and
    torch do, indirectly), so it is imported here, under the flag, before them; the flag is restored, and the tests
    that launch kernels set it again (the `triton_cpu` fixture). With a GPU the kernels compile as usual."""
    import torch

    if "triton" in sys.modules or torch.cuda.is_available():
        return
    from helpers import interpreter_flag

    with interpreter_flag():
        try:
            import triton.language  # noqa: F401
        except ImportError:
            pass


_import_triton_interpreted()

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
