"""minivl's Triton kernels: fused log-probs (`kernels.logprobs`), fused LoRA linear (`kernels.lora`), and the
sampler's fast decode steps (`kernels.decode`: the split-KV attention, the one-row and several-row decoder layers,
the sampling tails, behind one `prepare`). kernels/ imports nothing from minivl/.

Each public function has a plain-PyTorch `*_reference` twin with the same signature (the several-row sampling tail's
twin is the sampler's own sampling). Which one runs:

    MINIVL_KERNELS=triton      always the Triton kernel (on CPU tensors too, under TRITON_INTERPRET=1)
    MINIVL_KERNELS=reference   always the PyTorch reference
    unset                      Triton on CUDA tensors when `import triton` works, else the reference
                               (with one warning)

Name clash: Hugging Face publishes an unrelated package whose import name is also `kernels`. Whichever comes
first on sys.path wins. `check_ours()` below (call it from minivl before using these kernels) says so loudly.
We define no `__version__` here on purpose: transformers decides whether *its* `kernels` is installed from the
distribution metadata of "kernels" (or, failing that, from `kernels.__version__`, which must parse as
0.16 <= v < 0.17), so with ours on sys.path transformers sees no hub-kernels package and never imports
from us (tests/test_kernels_logprobs.py checks this with transformers 5.17).
"""
import os
import warnings

MINIVL_KERNELS = True  # the marker that says this `kernels` package is minivl's, not huggingface/kernels

_CLASH_HELP = (
    "the `kernels` package on sys.path is not minivl's (it is probably Hugging Face's hub-kernels package, "
    "which uses the same import name). Fix: `pip uninstall kernels`, or put the minivl checkout first on "
    "sys.path (run from the repository root, or `pip install -e .` of minivl)."
)


def check_ours(module=None):
    """Raise ImportError unless `module` (default: whatever `import kernels` gives) is minivl's package."""
    if module is None:
        import importlib
        module = importlib.import_module("kernels")
    if getattr(module, "MINIVL_KERNELS", False) is not True:
        where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
        raise ImportError(f"{_CLASH_HELP} (found: {where})")
    return module


_warned = False
_triton_ok = None


def triton_available():
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception:  # ImportError, or a broken install that fails while importing
            _triton_ok = False
    return _triton_ok


def use_triton(*tensors):
    """Decide Triton vs reference for one call; the env var is read each call so tests can flip it."""
    global _warned
    mode = os.environ.get("MINIVL_KERNELS", "").strip().lower()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MINIVL_KERNELS=triton but `import triton` fails")
        on_cpu = any(not t.is_cuda for t in tensors if t is not None)
        if on_cpu and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            raise RuntimeError("MINIVL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"MINIVL_KERNELS must be 'triton', 'reference' or unset, got {mode!r}")
    ok = triton_available() and all(t.is_cuda for t in tensors if t is not None)
    if not ok and not _warned:
        _warned = True
        why = "Triton is not importable" if not triton_available() else "the tensors are not on a CUDA device"
        warnings.warn(f"minivl kernels: using the PyTorch reference path because {why} "
                      "(set MINIVL_KERNELS=reference to silence this)", stacklevel=3)
    return ok
