"""Where the time of a GRPO-like decode step goes: 64 rows (8 prompts x 8 answers, temperature 1) with the cache
half written, as the middle step of a 512-token rollout, per kernel on the GPU.

    python benchmarks/profile_rollout.py --configs qwen3_vl_8b --layers kernels compiled    # GPU
    python benchmarks/profile_rollout.py --smoke                                            # anywhere: it runs

Per DecodeOptions.layer given ("compiled": per DecodeOptions.attention given; "kernels": the row kernels, which have
their own attention): a fresh prefill, the step compiled and captured (sampler.cuda_graph_step),
--tokens-64 // 2 steps run, then the median of --replays graph replays (CUDA events) and a torch.profiler table of
the top kernels, against the floor of the bytes that step must read: the decoder weights and the cache written so
far, or the whole static cache (what SDPA reads), at the copy bandwidth measured in the same run.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampler import copy_bandwidth, decoder_bytes, kv_bytes, make_batch  # noqa: E402
from common import median_ms  # noqa: E402
from profile_decode import Decoder, build_model, kernel_profile, say_profile  # noqa: E402

from kernels import decode_attention as split_kv  # noqa: E402
from minivl import sampler  # noqa: E402


def split_setting(text):
    """"programs=128,BS=64" -> {"programs": 128, "BS": 64}, keys of kernels/decode_attention.py's CONFIG."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in split_kv.CONFIG or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not KEY=INT with KEY one of {sorted(split_kv.CONFIG)}")
        out[key] = int(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen3_vl_8b"])
    ap.add_argument("--layers", nargs="+", default=["kernels", "compiled"], choices=["kernels", "compiled"])
    ap.add_argument("--attention", nargs="+", default=["triton"], choices=["auto", "sdpa", "math", "triton"],
                    help="of the compiled layer")
    ap.add_argument("--split", nargs="+", type=split_setting, default=[{}], metavar="KEY=INT[,KEY=INT]",
                    help="with the split-KV attention: changes to kernels/decode_attention.py's CONFIG, a variant each "
                         "(e.g. programs=128,BS=64; '' = CONFIG as it is)")
    ap.add_argument("--fuse", nargs="+", default=["qkv,gate_up"],
                    help="DecodeOptions.fuse, comma-joined, a variant each (e.g. 'qkv,gate_up' 'qkv')")
    ap.add_argument("--share", nargs="+", default=["on"], choices=["on", "off"],
                    help="the row kernels read a prompt's slots from its first copy (KVCache.shared), a variant each")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens-64", type=int, default=512)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--profile", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, eager steps")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.prompts, args.samples, args.tokens_64, args.replays, args.profile = 2, 2, 12, 2, 1
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# profile_rollout: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth(device)
    for name in args.configs:
        cfg, model = build_model(name, device, args.smoke)
        batch = make_batch(cfg, args.prompts, device, torch.bfloat16, seed=2)
        N, T0, half = args.prompts * args.samples, batch["input_ids"].shape[1], args.tokens_64 // 2
        variants = [(layer, a, c, f, share) for layer in args.layers
                    for a in (["triton"] if layer == "kernels" else args.attention)
                    for c in (args.split if a == "triton" else [{}]) for f in args.fuse
                    for share in (args.share if layer == "kernels" else ["on"])]
        default_config = dict(split_kv.CONFIG)
        for layer, attention, changes, fuse, share in variants:
            fuse = tuple(filter(None, fuse.split(",")))
            decode = dataclasses.replace(sampler.DECODE, attention=attention, layer=layer, fuse=fuse)
            split_kv.CONFIG.update(default_config, **changes)
            sampler.forget_compiled()
            with torch.no_grad():
                dec = Decoder(model, batch, args.samples, args.tokens_64, sampler.Sampling(1.0), decode, device,
                              share_prompt=share == "on")
                for _ in range(half - args.replays // 2):
                    dec.step()
                ms = median_ms(dec.step, device, args.replays)
                rows = kernel_profile(dec.step, args.profile, device)
            S = dec.state.key_valid.shape[1]
            weights = decoder_bytes(model)
            live = (weights + kv_bytes(cfg, N, T0 + half)) / bandwidth * 1e3
            whole = (weights + kv_bytes(cfg, N, S)) / bandwidth * 1e3
            label = f"split-KV {split_kv.CONFIG}" if attention == "triton" else attention
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                dec.step()
                label += (f", fused {fuse} ({dec.fused_bytes / 2**30:.2f} GiB of copies), allocated "
                          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            label += f", shared prompt {share}"
            print(f"\n## {name}, {N} rows, {layer} layers, attention {label}: step {ms:.3f} ms at slot "
                  f"~{T0 + half} of {S}; floor "
                  f"{live:.3f} ms with the written cache ({100 * live / ms:.0f}%), {whole:.3f} ms with the whole "
                  f"cache; graph built in {dec.build_s:.1f} s; copy {bandwidth / 1e12:.2f} TB/s")
            say_profile(rows, ms, args.top)
            del dec
        split_kv.CONFIG.update(default_config)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
