"""Answers from a Qwen-VL checkpoint on the command line, the way `swift infer` gives them.

    python -m minivl.chat --model Qwen/Qwen2.5-VL-3B-Instruct --image cat.jpg --prompt "What is this?"
    python -m minivl.chat --adapters output/checkpoint-100 --image cat.jpg --prompt "..."   # LoRA on its base
    python -m minivl.chat --model output/demo/checkpoint-300 --val_dataset demo_data/data/test.jsonl
    python -m minivl.chat --model PATH                  # type a conversation turn by turn; `exit` ends it

--adapters takes a LoRA checkpoint as train_sft.py writes it (PEFT's format): the base model is the one its
adapter_config.json names unless --model is given, and the adapter is folded into the weights once loaded (no
export needed). One answer (--prompt) streams to stdout. --val_dataset answers every row of data files in the
trainers' formats (minivl/data.py), --max_batch_size rows at a time, and writes one JSON object a line, as
swift infer does: {"response", "labels" (the row's own last answer, when it ends with one), "messages",
"images"} into --result_path (default: <adapters or model>/infer_result/<YYYYMMDD-HHMMSS>.jsonl); it prints
how many responses equal their labels.

Options are spelled as in the trainers (--max_new_tokens); the dashed spelling (--max-new-tokens) works too.
bf16 on CUDA, float32 on the CPU; greedy unless --temperature is given; answers end at the checkpoint's
end-of-turn tokens. `minivl.generate` is the sampler this calls. Tests: tests/test_chat.py.
"""

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import torch

from . import data, lora, sampler
from .checkpoint import load
from .processor import Processor


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)

    def a(name, **kw):  # --max_new_tokens and --max-new-tokens
        p.add_argument(name, *([name.replace("_", "-")] if "_" in name else []), **kw)

    a("--model", help="checkpoint directory or hub id (with --adapters: default the adapter's base model)")
    a("--adapters", help="a LoRA checkpoint directory (adapter_config.json + adapter_model.safetensors)")
    a("--image", action="append", default=[], help="an image file (repeat for several)")
    a("--video", action="append", default=[], help="a video file or a folder of frames (repeat for several)")
    a("--prompt", help="the question: one answer")
    a("--system", help="system prompt (default: the model family's)")
    a("--val_dataset", nargs="+", help="data files whose every row gets an answer")
    a("--result_path", help="where --val_dataset answers go (default: <adapters or model>/infer_result/...)")
    a("--max_batch_size", type=int, default=16, help="rows answered at once with --val_dataset (default: 16)")
    a("--max_new_tokens", type=int, default=512, help="(default: 512)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    a("--top_p", type=float, default=1.0, help="(default: 1.0)")
    a("--top_k", type=int, default=0, help="0 = all tokens (default: 0)")
    a("--seed", type=int)
    a("--max_pixels", type=int, help="per image (default: MAX_PIXELS, else preprocessor_config.json)")
    a("--torch_dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, else float32")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_model(model=None, adapters=None, dtype=None, device="cpu", max_pixels=None):
    """(model, processor): a checkpoint, or a LoRA checkpoint merged into its base."""
    if adapters is None:
        if model is None:
            raise SystemExit("give --model (a checkpoint directory or hub id), or --adapters (a LoRA checkpoint)")
        return load(model, dtype=dtype, device=device), Processor.from_pretrained(model, max_pixels=max_pixels)
    base = lora.base_model(adapters, model)
    merged = load(base, dtype=dtype, device=device)
    lora.load_adapter(merged, adapters)
    lora.merge(merged)
    # the trainer copies the processor files into each checkpoint; an adapter from elsewhere uses the base's
    source = adapters if (Path(adapters) / "tokenizer.json").is_file() else base
    return merged, Processor.from_pretrained(source, max_pixels=max_pixels)


def answer(model, processor, conversations, images=None, videos=None, stream=None, **sampling):
    """Answers to a batch of conversations, each ending at an end-of-turn token -> ([str], Generation)."""
    batch = processor(conversations, images=images, videos=videos, add_generation_prompt=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    eos = processor.eos_token_ids
    out = sampler.generate(model, batch, eos_token_id=eos, stream=stream, **sampling)
    return [processor.decode([t for t in row[:n] if t not in eos]).strip()
            for row, n in zip(out.tokens.tolist(), out.lengths.tolist())], out


def answer_one(model, processor, conversation, sampling):
    """Print one answer as it is generated; the speed goes to stderr."""
    printed = ""

    def stream(tokens, lengths):
        nonlocal printed
        text = processor.decode(tokens[0, : int(lengths[0])])
        if text.endswith("\ufffd"):  # a character split between tokens: print it once complete
            return
        print(text[len(printed):], end="", flush=True)
        printed = text

    start = time.perf_counter()
    (text,), out = answer(model, processor, [conversation], stream=stream, **sampling)
    seconds = time.perf_counter() - start
    n = int(out.lengths[0])
    print()
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s"
          f"{', stopped at --max_new_tokens' if out.truncated[0] else ''}]", file=sys.stderr)
    return text


def answer_rows(model, processor, rows, batch_size, result_path, sampling):
    """Every row answered, batch by batch, one JSON line each in result_path; returns the lines."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    lines, hits, labelled = [], 0, 0
    with open(result_path, "w") as f:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            labels = [r.conversation[-1]["content"] if r.conversation[-1]["role"] == "assistant" else None
                      for r in chunk]
            prompts = [r.conversation[:-1] if label is not None else r.conversation
                       for r, label in zip(chunk, labels)]
            texts, _ = answer(model, processor, prompts, images=[r.images for r in chunk],
                              videos=[r.videos for r in chunk], **sampling)
            for row, prompt, text, label in zip(chunk, prompts, texts, labels):
                line = {"response": text, "labels": label, "messages": prompt,
                        "images": [img if isinstance(img, str) else base64.b64encode(img).decode()
                                   for img in row.images], "source": row.source}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                lines.append(line)
                labelled += label is not None
                hits += label is not None and text == label.strip()
            print(f"{min(i + batch_size, len(rows))}/{len(rows)} rows answered", file=sys.stderr)
    if labelled:
        print(f"{hits} of {labelled} responses equal their labels ({100 * hits / labelled:.1f}%)")
    print(f"answers written to {result_path}")
    return lines


def converse(model, processor, images, videos, system, sampling):
    """A conversation typed turn by turn: `clear` starts over, `exit` (or end of input) stops."""
    turns = [{"role": "system", "content": system}] if system else []
    media = [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
    while True:
        try:
            text = input("<<< ").strip()
        except EOFError:
            return
        if text in ("exit", "quit"):
            return
        if text == "clear":
            turns = turns[:1] if system else []
            continue
        first = not any(t["role"] == "user" for t in turns)
        turns.append({"role": "user", "content": (media if first else []) + [{"type": "text", "text": text}]})
        turns.append({"role": "assistant", "content": answer_one(model, processor, turns, sampling)})


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    dtype = getattr(torch, args.torch_dtype) if args.torch_dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, processor = load_model(args.model, args.adapters, dtype, args.device, args.max_pixels)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    if args.val_dataset:
        rows = data.load_rows(args.val_dataset, args.system, need_answer=False)
        where = Path(args.adapters) if args.adapters else Path(args.model) if Path(args.model).is_dir() \
            else Path("result") / Path(args.model).name
        result_path = Path(args.result_path) if args.result_path else \
            where / "infer_result" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        return answer_rows(model, processor, rows, args.max_batch_size, result_path, sampling)
    content = [{"type": "image", "image": path} for path in args.image] + [
        {"type": "video", "video": path} for path in args.video]
    if args.prompt is None:
        return converse(model, processor, args.image, args.video, args.system, sampling)
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    return answer_one(model, processor, conversation, sampling)


if __name__ == "__main__":
    main()
