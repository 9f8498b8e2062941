"""minivl: Qwen2-VL, Qwen2.5-VL and Qwen3-VL in plain PyTorch, loading the official safetensors.

    model = minivl.load("Qwen/Qwen2.5-VL-3B-Instruct", dtype=torch.bfloat16, device="cuda")
    processor = minivl.Processor.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")
    logits = model(**processor(conversation, add_generation_prompt=True))
    out = minivl.generate(model, processor(conversation), max_new_tokens=64, temperature=0.0)
"""

from .checkpoint import load
from .config import Config
from .model import VLModel
from .sampler import generate

from .processor import Processor

__all__ = ["load", "Config", "VLModel", "Processor", "generate"]
