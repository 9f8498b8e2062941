"""Ask a Qwen-VL checkpoint about an image or a video; the answer is printed as it is generated.

    python -m minivl.generate --model Qwen/Qwen2.5-VL-3B-Instruct --image cat.jpg --prompt "What is this?"
    python -m minivl.generate --model Qwen/Qwen3-VL-8B-Instruct --video clip.mp4 --prompt "What happens?"
    python -m minivl.generate         # the embedded demo model and one of its images (made on first use)

bf16 on CUDA, float32 on the CPU; greedy unless --temperature is given. The sampler itself is the function
`minivl.generate` (minivl/sampler.py); this file is only its command line. Run it with `python -m`: importing
the module minivl.generate would replace that function on the package.
"""

import argparse
import sys
import time

import torch

from . import sampler
from .checkpoint import load
from .processor import Processor


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory or hub id (default: the embedded demo model)")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ap.add_argument("--video", action="append", default=[], help="a video file (repeat for several)")
    ap.add_argument("--prompt", help="the question (default with the demo: its question)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    if args.model is None:
        from .demo import QUESTION, make_demo

        paths = make_demo()
        args.model = paths["model"]
        if not args.image and not args.video:
            args.image = [str(sorted(paths["images"].glob("*.png"))[0])]
        args.prompt = args.prompt or QUESTION
    if args.prompt is None:
        ap.error("--prompt is needed with --model")

    on_cuda = args.device.startswith("cuda")
    model = load(args.model, dtype=torch.bfloat16 if on_cuda else torch.float32, device=args.device)
    processor = Processor.from_pretrained(args.model)
    content = [{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p}
                                                                      for p in args.video]
    conversation = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    batch = processor(conversation, add_generation_prompt=True)

    printed = ""

    def stream(tokens, lengths):
        nonlocal printed
        answer = processor.decode(tokens[0, : int(lengths[0])])
        if answer.endswith("\ufffd"):  # a character split between tokens: print it once complete
            return
        print(answer[len(printed):], end="", flush=True)
        printed = answer

    start = time.perf_counter()
    out = sampler.generate(model, batch, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, eos_token_id=processor.eos_token_ids, seed=args.seed, stream=stream,
                           check_every=4 if on_cuda else 1)
    seconds = time.perf_counter() - start
    n = int(out.lengths[0])
    print()
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s"
          f"{', stopped at --max-new-tokens' if out.truncated[0] else ''}]", file=sys.stderr)


if __name__ == "__main__":
    main()
