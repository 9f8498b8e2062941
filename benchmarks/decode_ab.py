"""Settings of kernels/decode_layer.py against each other, side by side: the batch-1 decode step of each built
(prefill, CUDA graph) in one process and timed in interleaved rounds, so that clock and thermal drift, which moves
a step by 10-30% between processes on the same GPU, falls on all settings alike.

    python benchmarks/decode_ab.py --settings PDL=0 PDL=1 BLOCKS=2,2048,4         # GPU
    python benchmarks/decode_ab.py --smoke --settings PDL=0 PDL=1                   # anywhere: does it run?

A setting is NAME=VALUE of a module constant of kernels/decode_layer.py (several joined by "+"); the first
setting is the reference. Per setting: the median over --rounds of a round's mean step (--replays graph replays
timed with CUDA events), its ratio to the reference, the floor share (as profile_decode.py), and whether its first
step's logits and greedy tokens equal the reference's: settings that only change how kernels are launched (PDL)
must give identical bits.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampler import copy_bandwidth, decoder_bytes, make_batch  # noqa: E402
from common import median_ms  # noqa: E402
from profile_decode import VARIANTS, Decoder, build_model  # noqa: E402

from kernels import decode_layer  # noqa: E402
from minivl import sampler  # noqa: E402


def parse(setting):
    """"PDL=1+BLOCKS=2,2048,4" -> {"PDL": 1, "BLOCKS": (2, 2048, 4)}."""
    out = {}
    for part in setting.split("+"):
        name, _, value = part.partition("=")
        if not hasattr(decode_layer, name) or not value.replace(",", "").isdigit():
            raise SystemExit(f"decode_ab: {part!r} is not NAME=INT[,INT...] of a constant of kernels/decode_layer.py")
        numbers = tuple(int(v) for v in value.split(","))
        out[name] = numbers if len(numbers) > 1 else numbers[0]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["qwen2_5_vl_3b", "qwen3_vl_8b"])
    ap.add_argument("--settings", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny widths, 2 layers, eager steps")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.rounds, args.replays = 2, 2
    tokens = 16 + args.rounds * args.replays
    defaults = {name: getattr(decode_layer, name) for s in args.settings for name in parse(s)}
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# decode_ab: {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    bandwidth = copy_bandwidth(device)
    for name in args.configs:
        cfg, model = build_model(name, device, args.smoke)
        floor_ms = decoder_bytes(model) / bandwidth * 1e3
        batch = make_batch(cfg, 1, device, torch.bfloat16)
        decoders, greedy = [], sampler.Sampling(0.0)
        with torch.no_grad():
            for setting in args.settings:
                for k, v in dict(defaults, **parse(setting)).items():
                    setattr(decode_layer, k, v)
                sampler.forget_compiled()
                dec = Decoder(model, batch, 1, tokens, greedy, VARIANTS["kernels"], device)
                dec.step()
                decoders.append((setting, dec, dec.state.logits.clone()))
                for _ in range(4):
                    dec.step()
            rounds = {setting: [] for setting in args.settings}
            for _ in range(args.rounds):
                for setting, dec, _ in decoders:
                    steps = lambda: [dec.step() for _ in range(args.replays)]  # noqa: E731
                    rounds[setting].append(median_ms(steps, device, 1) / args.replays)
        ref_ms = statistics.median(rounds[args.settings[0]])
        ref_logits, ref_tokens = decoders[0][2], decoders[0][1].state.tokens[0]
        print(f"\n## {name}: floor {floor_ms:.3f} ms/step at {bandwidth / 1e12:.2f} TB/s; {args.rounds} rounds x "
              f"{args.replays} replays per setting, interleaved")
        print("| setting | ms/step (median of rounds) | min-max of rounds | vs first | % of floor | logits = first | "
              "greedy = first |")
        print("|---|---|---|---|---|---|---|")
        for setting, dec, logits in decoders:
            ms = statistics.median(rounds[setting])
            diff = float((logits - ref_logits).abs().max())
            same = int((dec.state.tokens[0] == ref_tokens).sum())
            print(f"| {setting} | {ms:.3f} | {min(rounds[setting]):.3f}-{max(rounds[setting]):.3f} | "
                  f"{ms / ref_ms:.3f} | {100 * floor_ms / ms:.0f}% | {'yes' if diff == 0 else f'max diff {diff:.3g}'}"
                  f" | {same}/{ref_tokens.numel()} |")
        del decoders, model
        if device == "cuda":
            torch.cuda.empty_cache()
    for k, v in defaults.items():
        setattr(decode_layer, k, v)


if __name__ == "__main__":
    main()
