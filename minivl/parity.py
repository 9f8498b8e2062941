"""Follow one real input through minivl and transformers, stage by stage, and say where they part.

    python -m minivl.parity --model Qwen/Qwen2.5-VL-3B-Instruct --image cat.png --prompt "Describe it."
    python -m minivl.parity --model demo_data/model --image demo_data/data/images/00000.png --every 2
    python -m minivl.parity --model PATH --image IMG --video FRAMES_DIR --trace    # minivl alone

Compare mode runs minivl's processor once and feeds the same tensors to both models. It prints one row per
stage, in the order the forward meets them:

    pixel_values (and grid)  what each vision tower received
    vision.patch_embed       PatchEmbed output                      transformers: visual.patch_embed
    vision.pos_embed         Qwen3: + resampled position grid       input of visual.blocks[0]
    vision.blocks.{i}        each vision block (Qwen2.5: in window order, as in transformers)
    vision.deepstack.{j}     Qwen3: DeepStack mergers               visual.deepstack_merger_list[j]
    vision.merger            merged tokens, in patch order          pooler_output of visual
    embeddings               token embeddings after the scatter     inputs_embeds of language_model
    position_ids             3-D M-RoPE positions, compared exactly position_ids of language_model
    text.layers.{i}          each decoder layer, DeepStack added    input of layers[i + 1] / of norm
    text.norm, logits        final norm, lm_head (+ top-1 agreement)
    generation               greedy tokens: how many leading tokens are equal

with max and mean |minivl - transformers| and the relative difference ||minivl - transformers|| over
||transformers||. minivl's stages come from its documented hook (`model(..., trace=fn)`), transformers' from
forward hooks on its modules. Its decoder-layer outputs are read as the input of the next layer, because Qwen3
adds the DeepStack features after a layer returns, outside the module (`output_hidden_states` misses them).

Verdict: every stage's relative difference must stay within the tolerance of the dtype (TOLERANCES; --tol
overrides) and the position ids must be equal; in float32 the greedy tokens must be equal too (in bf16 a
near-tie may flip a token, so there they are reported only). The tool exits 1 and names the first stage
beyond its tolerance, 0 when all pass, 2 on a usage error or when transformers is missing. In float32 on
CUDA, TF32 is switched off so that both sides compute in true float32 (transformers' Conv3d would use it).

Generation: `minivl.generate(..., temperature=0.0, decode="reference", compile=False)` (the KV-cache sampler's
reference step, eager); transformers: `generate(do_sample=False)`. Both stop at the processor's end-of-turn tokens
and, as minivl.generate does, never pick a vision token.

Known difference, not a minivl bug: for a Qwen2.5-VL video whose seconds per temporal patch are fractional, or
whose (t - 1) * time step reaches max(h', w'), transformers 5.x numbers the positions differently from the Qwen
reference that rope.py follows (its docstring says where); the tool then reports position_ids as the first
divergence.

What it simplifies: one conversation (batch of one, no padding); a --video is a file (needs PyAV) or a
directory of frames taken at --fps; transformers 5 gets `mm_token_type_ids` (0 text, 1 image, 2 video), which
its own processor would have made, to compute its 3-D positions.
"""

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import minivl
from minivl.rope import get_rope_index
from minivl.sampler import generate, vision_token_ids
from minivl.vision import window_index

# relative difference ||a - b|| / ||b|| allowed at every stage. float32 is the sharp check: tiny models agree to
# ~1e-6 and Qwen2.5-VL-3B widths to ~2e-6, so 1e-4 catches one perturbed weight. bf16 rounding is not: on
# random Qwen2.5-VL-3B weights (CPU) minivl-bf16 and transformers-bf16 each sit 1.3e-2 from float32 after 4
# layers, equally far, and 4.7e-2 from each other at the logits after all 36 layers (about 1e-3 more per
# layer). 1e-1 leaves room for that drift and other kernels; bf16 catches gross errors only.
TOLERANCES = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 2e-2}  # float16: 3 more mantissa bits
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ------------------------------------------------------------------------------------------------ inputs

def video_item(path, fps):
    """A video file for the processor to sample, or a directory of frames taken at fps frames per second."""
    path = Path(path)
    if path.is_dir():
        frames = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise FileNotFoundError(f"{path} holds no image frames ({', '.join(FRAME_SUFFIXES)})")
        return {"type": "video", "video": frames, "fps": fps}
    return {"type": "video", "video": str(path), "fps": fps}


def prepare(args):
    """minivl's processor, run once: -> processor, batch (a dict with transformers' key names)."""
    processor = minivl.Processor.from_pretrained(args.model)
    content = [{"type": "image", "image": str(p)} for p in args.image]
    content += [video_item(v, args.fps) for v in args.video]
    content.append({"type": "text", "text": args.prompt})
    return processor, processor([{"role": "user", "content": content}], add_generation_prompt=True)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def token_types(input_ids, cfg):
    # transformers 5 computes its 3-D positions from these (0 text, 1 image, 2 video)
    return (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()


def media_passes(batch):
    """The vision tower runs once for the images, then once for the videos (model.py)."""
    return [k for k, key in (("image", "pixel_values"), ("video", "pixel_values_videos")) if key in batch]


# -------------------------------------------------------------------------------------- capturing stages

def suffixed(name, kind, passes):
    # with both images and videos the vision tower runs twice: name the pass ("vision.blocks.0[video]")
    return f"{name}[{kind}]" if len(passes) > 1 and name.startswith("vision.") else name


def pixel_key(kind):
    return "pixel_values" if kind == "image" else "pixel_values_videos"


def run_minivl(model, batch, on_stage=None):
    """Stage tensors by name, in the order the forward produced them (through minivl's documented hook)."""
    passes, tensors, state = media_passes(batch), {}, {"pass": -1}

    def trace(name, tensor):
        if name == "vision.patch_embed":  # a new vision pass: first what the tower received (model._scatter)
            state["pass"] += 1
            kind = passes[state["pass"]]
            tensors[pixel_key(kind)] = batch[pixel_key(kind)].to(model.dtype)
        if name.startswith("vision."):
            name = suffixed(name, passes[state["pass"]], passes)
        tensors[name] = tensor.detach()
        if on_stage is not None:
            on_stage(name, tensor)

    with torch.no_grad():
        model(**batch, trace=trace)
    return tensors


def hook_transformers(hf, passes, tensors):
    """Forward hooks on transformers' modules that fill `tensors` with the stage names of minivl's trace.
    Returns the hook handles (remove them before generating)."""
    visual, lm = hf.model.visual, hf.model.language_model
    state = {"pass": -1}

    def put(name, tensor):
        if name.startswith("vision."):
            name = suffixed(name, passes[state["pass"]], passes)
        tensors[name] = tensor.detach()

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def on_visual_in(module, args, kwargs):
        state["pass"] += 1
        put(pixel_key(passes[state["pass"]]), args[0] if args else kwargs["hidden_states"])

    def on_block0_in(module, args, kwargs):
        if hasattr(visual, "pos_embed"):  # Qwen3: patch embed + position grid = what block 0 receives
            put("vision.pos_embed", args[0] if args else kwargs["hidden_states"])

    def on_lm_in(module, args, kwargs):
        put("embeddings", kwargs["inputs_embeds"])
        pos = kwargs.get("position_ids")
        if pos is None:  # text only: transformers counts 0..T-1 inside the text model
            B, T = kwargs["inputs_embeds"].shape[:2]
            pos = torch.arange(T, device=kwargs["inputs_embeds"].device).expand(3, B, T)
        put("position_ids", pos[-3:])  # a 4-row form carries plain text positions first

    def output_of(name):
        return lambda module, args, out: put(name, first(out))

    def input_of(name):
        return lambda module, args, kwargs: put(name, args[0] if args else kwargs["hidden_states"])

    handles = [visual.register_forward_pre_hook(on_visual_in, with_kwargs=True),
               visual.patch_embed.register_forward_hook(output_of("vision.patch_embed")),
               visual.blocks[0].register_forward_pre_hook(on_block0_in, with_kwargs=True),
               visual.register_forward_hook(lambda m, a, out: put("vision.merger", out.pooler_output)),
               lm.register_forward_pre_hook(on_lm_in, with_kwargs=True),
               lm.norm.register_forward_pre_hook(input_of(f"text.layers.{len(lm.layers) - 1}"),
                                                 with_kwargs=True),
               lm.norm.register_forward_hook(output_of("text.norm"))]
    handles += [b.register_forward_hook(output_of(f"vision.blocks.{i}")) for i, b in enumerate(visual.blocks)]
    handles += [m.register_forward_hook(output_of(f"vision.deepstack.{j}"))
                for j, m in enumerate(getattr(visual, "deepstack_merger_list", []))]
    handles += [layer.register_forward_pre_hook(input_of(f"text.layers.{i - 1}"), with_kwargs=True)
                for i, layer in enumerate(lm.layers) if i > 0]
    return handles


def run_transformers(hf, batch, cfg):
    tensors = {}
    handles = hook_transformers(hf, media_passes(batch), tensors)
    try:
        with torch.no_grad():
            logits = hf(**batch, mm_token_type_ids=token_types(batch["input_ids"], cfg)).logits
    finally:
        for h in handles:
            h.remove()
    tensors["logits"] = logits.detach()
    return tensors


# ------------------------------------------------------------------------------------------- generation

def until_eos(tokens, eos_ids):
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def greedy_minivl(model, batch, max_new_tokens, eos_ids, pad_id):
    # the eager reference step: check the model, not torch.compile's fusions or the Triton backends
    with torch.no_grad():
        out = generate(model, batch, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=sorted(eos_ids),
                       pad_token_id=pad_id, compile=False, decode="reference")
    return until_eos(out.tokens[0, : int(out.lengths[0])].tolist(), eos_ids)


def greedy_transformers(hf, batch, cfg, max_new_tokens, eos_ids, pad_id):
    with torch.no_grad():
        out = hf.generate(**batch, mm_token_type_ids=token_types(batch["input_ids"], cfg), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                          bad_words_ids=[[i] for i in vision_token_ids(cfg)],
                          temperature=None, top_p=None, top_k=None)  # no sampling defaults to warn about
    return until_eos(out[0, batch["input_ids"].shape[1]:].tolist(), eos_ids)


def leading_equal(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------------------- comparing

@dataclass
class Row:
    stage: str
    shape: str
    max_abs: float = float("nan")
    mean_abs: float = float("nan")
    rel: float = float("nan")
    note: str = ""
    ok: bool = True


def compare_tensors(stage, ours, ref, tol):
    if ref is None or ours is None:
        side = "transformers" if ref is None else "minivl"
        return Row(stage, "-", note=f"missing in {side}", ok=False)
    if ours.shape != ref.shape:
        return Row(stage, f"{tuple(ours.shape)} vs {tuple(ref.shape)}", note="shapes differ", ok=False)
    if stage == "position_ids":
        return compare_positions(ours, ref)
    a, b = ours.float(), ref.float().to(ours.device)
    diff = a - b
    rel = (diff.norm() / b.norm().clamp_min(1e-30)).item()
    row = Row(stage, str(tuple(ours.shape)), diff.abs().max().item(), diff.abs().mean().item(), rel,
              ok=rel <= tol)
    if stage == "logits":
        top1 = (a.argmax(-1) == b.argmax(-1)).float()
        next_token = "equal" if top1[0, -1] else "DIFFERS"
        row.note = f"top-1 agree {top1.mean().item() * 100:.1f}%, next token {next_token}"
    return row


def compare_positions(ours, ref):
    """3-D positions must be equal; otherwise say where the first difference is."""
    ref = ref.to(ours.device)
    diff = (ours != ref).nonzero()
    row = Row("position_ids", str(tuple(ours.shape)), (ours - ref).abs().max().item())
    if diff.shape[0] == 0:
        row.note = "equal"
        return row
    r, b, t = diff[diff[:, 2].argmin()].tolist()  # the earliest token that differs
    row.note = (f"{diff.shape[0]} differ; first at token {t}, row {'THW'[r]}: minivl {ours[r, b, t].item()}, "
                f"transformers {ref[r, b, t].item()}")
    row.ok = False
    return row


def stage_order(ours, ref):
    """minivl's order, with any stage only transformers produced appended (it then shows as missing)."""
    return list(ours) + [k for k in ref if k not in ours]


def shown(stage, every, depth, layers, first_bad):
    """--every k: print every k-th vision block and decoder layer (and the last, and the first divergent)."""
    for prefix, n in (("vision.blocks.", depth), ("text.layers.", layers)):
        if stage.startswith(prefix):
            i = int(stage[len(prefix):].split("[")[0])
            return i % every == 0 or i == n - 1 or stage == first_bad
    return True


def print_rows(rows, every, cfg):
    first_bad = next((r.stage for r in rows if not r.ok), None)
    print(f"{'stage':<28} {'shape':<20} {'max|diff|':>9} {'mean|diff|':>10} {'rel diff':>9}  note")
    print("-" * 110)
    for r in rows:
        if not shown(r.stage, every, cfg.vision.depth, cfg.text.num_hidden_layers, first_bad):
            continue
        mark = "" if r.ok else "  <-- beyond tolerance"
        values = f"{num(r.max_abs):>9} {num(r.mean_abs):>10} {num(r.rel):>9}"
        print(f"{r.stage:<28} {r.shape:<20} {values}  {r.note}{mark}")
    if every > 1:
        print(f"(--every {every}: the other vision blocks and decoder layers were compared, not printed)")


def num(x):
    return "-" if x != x else f"{x:.2e}"  # NaN: not a float comparison (position ids)


# ------------------------------------------------------------------------------------------ compare mode

def import_transformers():
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def compare(args, modify_minivl=None):
    transformers = import_transformers()
    if transformers is None:
        print("python -m minivl.parity compares minivl with transformers, which is not installed here.\n"
              "  pip install 'transformers>=5'   (or run with --trace to follow minivl alone)",
              file=sys.stderr)
        return 2
    dtype, device = DTYPES[args.dtype], args.device
    if dtype == torch.float32:  # true float32 on both sides: transformers' Conv3d patch embed would use TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tol = args.tol if args.tol is not None else TOLERANCES[args.dtype]
    processor, batch = prepare(args)
    model = minivl.load(args.model, dtype=dtype, device=device)
    if modify_minivl is not None:  # tests perturb one weight here
        modify_minivl(model)
    auto = transformers.AutoModelForImageTextToText
    hf = auto.from_pretrained(args.model, dtype=dtype, device_map=device).eval()
    cfg = model.cfg
    batch = to_device(batch, device)
    print_header(args, model, processor, batch, f"transformers {transformers.__version__} "
                 f"({hf.config._attn_implementation} attention)")

    ours = run_minivl(model, batch)
    ref = run_transformers(hf, batch, cfg)
    rows = []
    for stage in stage_order(ours, ref):
        row = compare_tensors(stage, ours.get(stage), ref.get(stage), tol)
        if stage.startswith("pixel_values"):
            key = "video_grid_thw" if "video" in stage else "image_grid_thw"
            row.note = f"grid (t, h, w) {batch[key].tolist()}"
        rows.append(row)
    print_rows(rows, args.every, cfg)

    gen_ok, gen_note = True, "generation skipped (--max-new-tokens 0)"
    if args.max_new_tokens > 0:
        gen_ok, gen_note = compare_generation(args, model, hf, processor, batch, cfg)
    return verdict(rows, tol, args.dtype, gen_ok, gen_note)


def compare_generation(args, model, hf, processor, batch, cfg):
    eos = set(processor.eos_token_ids)
    mine = greedy_minivl(model, batch, args.max_new_tokens, eos, processor.pad_token_id)
    theirs = greedy_transformers(hf, batch, cfg, args.max_new_tokens, list(eos), processor.pad_token_id)
    n = leading_equal(mine, theirs)
    counts = f"{len(mine)} vs {len(theirs)} tokens"
    print(f"{'generation':<28} {counts:<20} {n} equal leading tokens (minivl.generate (KV cache) vs transformers "
          f"generate(do_sample=False))")
    print(f"  minivl:       {processor.decode(mine)!r}\n  transformers: {processor.decode(theirs)!r}")
    if mine != theirs:
        print(f"  first different new token: number {n}: minivl {mine[n] if n < len(mine) else 'ended'}, "
              f"transformers {theirs[n] if n < len(theirs) else 'ended'}")
    note = f"greedy: {n}/{max(len(mine), len(theirs))} leading tokens equal"
    # a bf16 near-tie may flip a token without any bug: only float32 makes generation part of the verdict
    return mine == theirs or args.dtype != "float32", note


def verdict(rows, tol, dtype, gen_ok, gen_note):
    bad = [r for r in rows if not r.ok]
    print("-" * 110)
    if not bad and gen_ok:
        print(f"verdict: PASS: {len(rows)} stages within {dtype} tolerance (relative difference <= "
              f"{tol:.0e}), position ids equal; {gen_note}")
        return 0
    if bad:
        first = bad[0]
        why = first.note if first.stage == "position_ids" or first.rel != first.rel else \
            f"relative difference {first.rel:.2e} > {tol:.0e}"
        print(f"verdict: FAIL: first divergent stage: {first.stage} ({why}); {len(bad)} of {len(rows)} "
              f"stages beyond {dtype} tolerance; {gen_note}")
    else:
        print(f"verdict: FAIL: every stage within tolerance, but in float32 the greedy tokens differ: "
              f"{gen_note}")
    return 1


def print_header(args, model, processor, batch, reference):
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"minivl.parity: {args.model}\n  {cfg.model_type}, {n_params:.3g}B parameters, {args.dtype} on "
          f"{args.device}; torch {torch.__version__}; {reference}")
    ids = batch["input_ids"][0]
    print(f"  prompt: {ids.numel()} tokens: {prompt_text(processor, ids)!r}")


def prompt_text(processor, ids, width=320):
    """The prompt, with each run of image / video pad tokens written once with its length."""
    pads = {processor.image_token_id: "<|image_pad|>", processor.video_token_id: "<|video_pad|>"}
    pieces = []
    for pad, run in itertools.groupby(ids.tolist(), key=lambda t: t if t in pads else None):
        run = list(run)  # text is decoded a run at a time: the bytes of one character may span tokens
        text = processor.decode(run, skip_special_tokens=False) if pad is None else f"{pads[pad]}x{len(run)}"
        pieces.append(text)
    text = "".join(pieces)
    return text if len(text) <= width else text[: width // 2] + " ... " + text[-width // 2:]


# -------------------------------------------------------------------------------------------- trace mode

def stats(t):
    t = t.float()
    std = t.std().item() if t.numel() > 1 else 0.0
    return f"mean {t.mean().item():+.3e}  std {std:.3e}  absmax {t.abs().max().item():.3e}"


def print_preprocessing(args, processor, batch, cfg):
    """What processor.py made: sizes after smart_resize, grids, patches, merged tokens, and per family the
    Qwen2.5 windows, Qwen3's position grid, the video time."""
    from PIL import Image

    v, P = processor.vision, processor.vision.patch_size
    print(f"\nprocessor.py  smart_resize to multiples of {v.factor} px (patch {P} x merge {v.merge_size}) "
          f"within {v.min_pixels}..{v.max_pixels} pixels; patch rows of 3 x {v.temporal_patch_size} x {P} x {P}"
          f" = {3 * v.temporal_patch_size * P * P} values, in 2x2 merge-block order")
    grids = batch.get("image_grid_thw", torch.zeros(0, 3)).tolist()
    for i, (path, (t, h, w)) in enumerate(zip(args.image, grids)):
        with Image.open(path) as im:
            size = f"{im.width}x{im.height}"
        merged = t * h * w // cfg.vision.merge_unit
        print(f"  image {i}: {size} px -> {w * P}x{h * P} px, grid (t, h, w) = ({t}, {h}, {w}): {t * h * w} "
              f"patches (one frame, repeated to fill the temporal patch), {merged} merged tokens"
              f"{family_facts(cfg, (t, h, w))}")
    for i, (t, h, w) in enumerate(batch.get("video_grid_thw", torch.zeros(0, 3)).tolist()):
        time = ""
        if "second_per_grid_ts" in batch:
            s = batch["second_per_grid_ts"][i].item()
            time = f", {s:g} s per temporal patch -> time step {s * cfg.vision.tokens_per_second:g}"
        elif cfg.family == "qwen3_vl":
            time = ", each temporal patch its own block behind a '<x.x seconds>' timestamp"
        print(f"  video {i}: {t * v.temporal_patch_size} frames -> {w * P}x{h * P} px, grid ({t}, {h}, {w}): "
              f"{t} temporal patches of {h * w} patches, {t * h * w // cfg.vision.merge_unit} merged tokens"
              f"{time}{family_facts(cfg, (t, h, w))}")
    for kind in media_passes(batch):
        print(f"  {pixel_key(kind)} {tuple(batch[pixel_key(kind)].shape)}  {stats(batch[pixel_key(kind)])}")


def family_facts(cfg, grid):
    v = cfg.vision
    if cfg.family == "qwen2_5_vl":
        n = len(window_index([grid], v.window_merged, v.spatial_merge_size)[1])
        return f"; {n} window(s) of up to {v.window_merged}x{v.window_merged} merged tokens"
    if cfg.family == "qwen3_vl":
        side = int(v.num_position_embeddings**0.5)
        return f"; {side}x{side} position grid resampled to {grid[1]}x{grid[2]}"
    return ""


def rope_owners(cfg):
    """Which position row (T, H, W) turns each rotary frequency, as text.mrope_cos_sin assigns them."""
    half, s = cfg.text.head_dim // 2, cfg.text.mrope_section
    if not cfg.text.mrope_interleaved:
        return "T" * s[0] + "H" * s[1] + "W" * s[2], "chunked"
    owner = ["T"] * half
    owner[1: 3 * s[1]: 3] = "H" * len(range(1, 3 * s[1], 3))
    owner[2: 3 * s[2]: 3] = "W" * len(range(2, 3 * s[2], 3))
    return "".join(owner), "interleaved"


def vision_runs(input_ids, cfg):
    """[first token, last token, kind] of each run of image / video pad tokens: one vision block each."""
    kinds = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    ids, runs = input_ids[0].tolist(), []
    for i, t in enumerate(ids):
        if t in kinds and (i == 0 or ids[i - 1] != t):
            runs.append([i, i, kinds[t]])
        elif t in kinds:
            runs[-1][1] = i
    return runs


def print_positions(pos, batch, cfg):
    """The 3-D positions of the first vision block in full, a line for each later block, the rope delta."""
    _, deltas = get_rope_index(cfg, batch["input_ids"], batch.get("attention_mask"),
                               batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                               batch.get("second_per_grid_ts"))
    p = pos[:, 0].cpu()  # (3, T)
    for n, (a, b, kind) in enumerate(vision_runs(batch["input_ids"], cfg)[:6]):
        block = p[:, a: b + 1]
        ranges = "  ".join(f"{r} {lo}..{hi}" for r, lo, hi in zip("THW", block.min(1).values.tolist(),
                                                                  block.max(1).values.tolist()))
        after = p[0, b + 1].item() if b + 1 < p.shape[1] else "-"
        print(f"      {kind} block, tokens {a}..{b}: {ranges}; the text after it starts at {after}")
        if n == 0:
            triples = " ".join(f"({t},{h},{w})" for t, h, w in block.T[:8].tolist())
            print(f"        first (t, h, w): {triples}{' ...' if block.shape[1] > 8 else ''}")
    T, delta = batch["input_ids"].shape[1], deltas[0, 0].item()
    print(f"      rope delta {delta}: a generated token at sequence index c >= {T} gets position "
          f"c {delta:+d} on all three rows")
    owners, how = rope_owners(cfg)
    print(f"      M-RoPE ({how}): the row that turns each of the {len(owners)} rotary frequencies: {owners}")


class JourneyPrinter:
    """minivl's trace hook for --trace: prints each stage as the forward reaches it, under the file and
    function that made it, with a note on what happened there."""

    def __init__(self, cfg, batch, every):
        self.cfg, self.batch, self.every = cfg, batch, every
        self.passes, self.pass_no, self.section = media_passes(batch), -1, None
        self.visual_tokens = sum(b - a + 1 for a, b, _ in vision_runs(batch["input_ids"], cfg))

    def __call__(self, name, tensor):
        base = name.split("[")[0]
        self.header(base)
        if shown(name, self.every, self.cfg.vision.depth, self.cfg.text.num_hidden_layers, None):
            numbers = stats(tensor) if name != "position_ids" else ""
            print(f"  {name:<26} {str(tuple(tensor.shape)):<16} {numbers:<62} {self.note(base)}")
        if name == "position_ids":
            print_positions(tensor, self.batch, self.cfg)

    def grids(self):
        key = "image_grid_thw" if self.passes[self.pass_no] == "image" else "video_grid_thw"
        return [tuple(g) for g in self.batch[key].tolist()]

    def header(self, base):
        if base == "vision.patch_embed":
            self.pass_no += 1
        section = base.split(".")[0] if base.startswith(("vision.", "text.")) else base
        section += str(self.pass_no) if section == "vision" else ""
        if section == self.section:
            return
        self.section, v, t = section, self.cfg.vision, self.cfg.text
        if section.startswith("vision"):
            grids = self.grids()
            print(f"\nvision.py  VisionTower.forward, {self.passes[self.pass_no]}s {grids}: width "
                  f"{v.hidden_size}, {v.num_heads} heads; 2-D rotary (float32) over {v.head_dim // 4} row and "
                  f"{v.head_dim // 4} column frequencies; attention stays inside each frame "
                  f"({sum(g[0] for g in grids)} in all)")
            return
        titles = {"embeddings": "model.py  VLModel.hidden_states: token embeddings, vision features put in",
                  "position_ids": "rope.py  get_rope_index: 3-D positions (T, H, W) for M-RoPE",
                  "text": f"text.py  TextModel.forward: {t.num_hidden_layers} decoder layers, "
                          f"{t.num_attention_heads} query / {t.num_key_value_heads} key-value heads",
                  "logits": "model.py  VLModel.forward: lm_head"}
        print("\n" + titles[section])

    def note(self, base):
        cfg, v = self.cfg, self.cfg.vision
        i = int(base.split(".")[-1]) if base[-1].isdigit() else None
        if base.startswith("vision.blocks."):
            note = "attention per frame"
            if cfg.family == "qwen2_5_vl":
                windows = len(window_index(self.grids(), v.window_merged, v.spatial_merge_size)[1])
                full = i in v.fullatt_block_indexes
                note = ("full attention per frame" if full else f"attention in {windows} window(s)") + \
                    ", rows in window order"
            if i in v.deepstack_visual_indexes:
                note += f"; read by DeepStack {v.deepstack_visual_indexes.index(i)}"
            return note
        if base.startswith("text.layers."):
            note = "attention + MoE" if cfg.text.is_sparse_layer(i) else "attention + MLP"
            if i < len(v.deepstack_visual_indexes) and self.visual_tokens:
                note += f"; + DeepStack {i} at the {self.visual_tokens} visual positions"
            return note
        if base.startswith("vision.deepstack."):
            return f"block {v.deepstack_visual_indexes[i]}: 2x2 concat, norm, MLP; added after text layer {i}"
        back = "; back in patch order" if cfg.family == "qwen2_5_vl" else ""
        notes = {"vision.patch_embed": "Conv3d over (2 frames x P x P) = one matmul per patch row",
                 "vision.pos_embed": "+ learned position grid, bilinear with aligned corners",
                 "vision.merger": f"norm, 2x2 patches -> {4 * v.hidden_size}, MLP -> {v.out_hidden_size}{back}",
                 "embeddings": f"embed_tokens; {self.visual_tokens} pad embeddings replaced by vision features",
                 "text.norm": "final RMSNorm", "logits": "lm_head"}
        return notes.get(base, "")


def journey(args):
    """--trace: the forward of minivl alone, stage by stage."""
    processor, batch = prepare(args)
    model = minivl.load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    print_header(args, model, processor, batch, "minivl alone (--trace)")
    print_preprocessing(args, processor, batch, model.cfg)
    batch = to_device(batch, args.device)
    logits = run_minivl(model, batch, on_stage=JourneyPrinter(model.cfg, batch, args.every))["logits"]
    top = logits[0, -1].float().softmax(-1).topk(5)
    words = ", ".join(f"{processor.decode([i], skip_special_tokens=False)!r} {p:.3f}"
                      for p, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"\nnext token (top 5 of the softmax): {words}")
    return 0


# ------------------------------------------------------------------------------------------------- main

def parse_args(argv):
    tolerances = ", ".join(f"{k} {v:.0e}" for k, v in TOLERANCES.items())
    ap = argparse.ArgumentParser(
        prog="python -m minivl.parity", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one input through minivl and transformers and compare them stage by stage "
                    "(or, with --trace, follow minivl alone).",
        epilog="tolerances: relative difference ||minivl - transformers|| / ||transformers|| at every stage,\n"
               f"{tolerances}. Position ids must be equal; in float32 the greedy tokens too.\n"
               "exit status: 0 every stage within tolerance, 1 a stage diverges (the first one is named),\n"
               "2 usage error or transformers not installed.")
    ap.add_argument("--model", required=True, help="checkpoint directory or hub id (weights, processor files)")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ap.add_argument("--video", action="append", default=[],
                    help="a video file (needs PyAV) or a directory of frames (repeat for several)")
    ap.add_argument("--fps", type=float, default=2.0, help="frames per second of a directory of frames")
    ap.add_argument("--prompt", default="Describe this image.")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens to compare (0: skip)")
    ap.add_argument("--every", type=int, default=1,
                    help="print every k-th vision block and decoder layer (all are still compared)")
    ap.add_argument("--tol", type=float, default=None, help="override the dtype's relative tolerance")
    ap.add_argument("--trace", action="store_true",
                    help="minivl alone: every stage's shape and statistics, in the order of the code")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    for path in args.image + args.video:
        if not os.path.exists(path):
            ap.error(f"{path} does not exist")
    if args.every < 1:
        ap.error("--every must be at least 1")
    return args


def main(argv=None, modify_minivl=None):
    """The command line; returns the exit status. modify_minivl(model), if given, runs on minivl's model right
    after loading (tests perturb one weight with it to check that the tool names that layer)."""
    args = parse_args(argv)
    if args.trace:
        return journey(args)
    return compare(args, modify_minivl)


if __name__ == "__main__":
    sys.exit(main())
