"""Chat templates against strings written out by hand from facts §6, token ids, labels, batching, errors.

The expected strings below are typed from the documented formats, not produced by any template engine. Where
transformers can render the same conversation (the demo's Jinja template of the Qwen2.5 format through its own
tokenizer), it is compared as well.
"""

import importlib.util

import pytest
import torch
from processor_helpers import PREPROCESSOR, family_dir, noise_image

from minivl.processor import IGNORE_INDEX, Processor

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
# small pixel limits so that token counts are easy to write by hand: a 56x56 image is 2x2 merged tokens (Qwen2
# patch 14), a 64x64 image 2x2 merged tokens (Qwen3 patch 16)
SMALL = {"qwen2_vl": {"min_pixels": 56 * 56, "max_pixels": 112 * 112},
         "qwen2_5_vl": {"min_pixels": 56 * 56, "max_pixels": 112 * 112},
         "qwen3_vl": {"min_pixels": 64 * 64, "max_pixels": 128 * 128}}


def make(tmp_path, model_type):
    pre = {k: v for k, v in PREPROCESSOR[model_type].items() if k != "size"}
    return Processor.from_pretrained(family_dir(tmp_path / model_type, model_type, {**pre, **SMALL[model_type]}))


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(56, 56), (112, 56), (64, 64)]):
        paths.append(str(tmp_path / f"img{i}.png"))
        noise_image(w, h, seed=i).save(paths[-1])
    return paths


def user(*items):
    return {"role": "user", "content": list(items)}


def image(x):
    return {"type": "image", "image": x}


def text(s):
    return {"type": "text", "text": s}


# -------------------------------------------------------------------------------------------- the text

@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_default_system_and_generation_prompt(tmp_path, pictures, model_type):
    p = make(tmp_path, model_type)
    conv = [user(image(pictures[0]), text("Describe this image."))]
    assert p.apply_chat_template(conv, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    assert p.apply_chat_template(conv) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n")


def test_qwen2_given_system_replaces_the_default(tmp_path):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert p.apply_chat_template(conv, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_has_no_default_system(tmp_path, pictures):
    p = make(tmp_path, "qwen3_vl")
    conv = [user(image(pictures[2]), text("Describe this image."))]
    assert p.apply_chat_template(conv, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n")
    conv = [{"role": "system", "content": [text("Be brief.")]}] + conv
    assert p.apply_chat_template(conv) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Describe this image.<|im_end|>\n")


def test_multi_image_multi_turn_and_vision_ids(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [user(image(pictures[0]), image(pictures[1]), text("Compare them.")),
            {"role": "assistant", "content": "The second is wider."},
            user(text("And this one?"), image(pictures[2]))]
    assert p.apply_chat_template(conv, add_generation_prompt=True) == (
        SYS + "<|im_start|>user\n" + IMG + IMG + "Compare them.<|im_end|>\n"
        "<|im_start|>assistant\nThe second is wider.<|im_end|>\n"
        "<|im_start|>user\nAnd this one?" + IMG + "<|im_end|>\n<|im_start|>assistant\n")
    assert p.apply_chat_template(conv[:1], add_vision_id=True) == (
        SYS + "<|im_start|>user\nPicture 1: " + IMG + "Picture 2: " + IMG + "Compare them.<|im_end|>\n")


def test_video_placeholder(tmp_path, pictures):
    conv = [user({"type": "video", "video": pictures[:1] * 4, "fps": 2.0}, text("What happens?"))]
    assert make(tmp_path, "qwen2_5_vl").apply_chat_template(conv, add_generation_prompt=True) == (
        SYS + "<|im_start|>user\n" + VID + "What happens?<|im_end|>\n<|im_start|>assistant\n")
    # apply_chat_template keeps one placeholder, as transformers' does; the timestamps come with the tokens
    assert make(tmp_path, "qwen3_vl").apply_chat_template(conv) == (
        "<|im_start|>user\n" + VID + "What happens?<|im_end|>\n")


# ------------------------------------------------------------------------------------------- the tokens

def test_ids_are_the_encoding_of_the_expanded_text(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [user(image(pictures[0]), image(pictures[1]), text("Compare them, façade 漢字.")),
            {"role": "assistant", "content": "The second is wider."}]
    out = p(conv, add_generation_prompt=True)
    # 56x56 -> grid (1, 4, 4) -> 4 tokens; 112x56 (w x h) -> grid (1, 4, 8) -> 8 tokens
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    expanded = (SYS + "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|><|vision_start|>"
                + "<|image_pad|>" * 8 + "<|vision_end|>Compare them, façade 漢字.<|im_end|>\n"
                "<|im_start|>assistant\nThe second is wider.<|im_end|>\n<|im_start|>assistant\n")
    assert out["input_ids"][0].tolist() == p.tokenizer.encode(expanded).ids
    assert out["attention_mask"].tolist() == [[1] * len(out["input_ids"][0])]


def test_qwen3_video_tokens_carry_timestamps(tmp_path, pictures):
    p = make(tmp_path, "qwen3_vl")
    frames = [pictures[2]] * 4                              # 64x64 frames at 2 fps: 2 temporal patches of 2x2
    conv = [user({"type": "video", "video": frames, "fps": 2.0}, text("What happens?"))]
    p.family.video.min_pixels = 64 * 64                      # keep frames small (the default is 128 tokens)
    out = p(conv)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    pads = "<|video_pad|>" * 4
    expanded = ("<|im_start|>user\n<0.2 seconds><|vision_start|>" + pads + "<|vision_end|><1.2 seconds>"
                "<|vision_start|>" + pads + "<|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n")
    assert out["input_ids"][0].tolist() == p.tokenizer.encode(expanded).ids
    assert "second_per_grid_ts" not in out


def test_labels_cover_exactly_the_answers(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [user(image(pictures[0]), text("What colour is the shape?")),
            {"role": "assistant", "content": "red"},
            user(text("Sure?")),
            {"role": "assistant", "content": [text("It is "), text("red.")]}]
    out = p(conv, return_labels=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert not p.apply_chat_template(conv).endswith("<|im_start|>assistant\n")   # no generation prompt
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert p.decode(labels[kept], skip_special_tokens=False) == "red<|im_end|>It is red.<|im_end|>"
    answer_ids = (p.tokenizer.encode("red<|im_end|>").ids, p.tokenizer.encode("It is red.<|im_end|>").ids)
    assert int(kept.sum()) == sum(len(a) for a in answer_ids)
    # each answer sits right after "<|im_start|>assistant\n"
    header = p.tokenizer.encode("<|im_start|>assistant\n").ids
    starts = [i for i in range(len(ids)) if ids[i:i + len(header)].tolist() == header]
    for start, answer in zip(starts, answer_ids):
        first = start + len(header)
        assert ids[first:first + len(answer)].tolist() == answer
        assert bool(kept[first:first + len(answer)].all()) and not bool(kept[first - 1])
        assert not bool(kept[first + len(answer)])            # the "\n" after <|im_end|> is not a target


def test_images_in_an_answer_are_not_targets(tmp_path, pictures):
    # the Qwen2 template renders images in any turn; their tokens are inputs, the text around them targets
    p = make(tmp_path, "qwen2_5_vl")
    conv = [user(text("Draw it.")), {"role": "assistant", "content": [text("Here: "), image(pictures[0])]}]
    out = p(conv, return_labels=True)
    kept = out["labels"][0] != IGNORE_INDEX
    assert p.decode(out["labels"][0][kept], skip_special_tokens=False) == "Here: <|im_end|>"


def test_ms_swift_placeholders(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    items = [user(image(pictures[0]), text("first "), image(pictures[1]), text("second"))]
    swift = [{"role": "user", "content": "<image>first <image>second"}]
    a, b = p(items), p(swift, images=pictures[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="has 2 <image> placeholders but 1 images were given"):
        p(swift, images=pictures[:1])
    with pytest.raises(ValueError, match="has 2 <image> placeholders but 0 images were given"):
        p(swift)
    with pytest.raises(ValueError, match="has 0 <video> placeholders but 1 videos were given"):
        p(swift, images=pictures[:2], videos=[pictures[:2]])
    # a batch takes one list per conversation
    batch = p([swift, [{"role": "user", "content": "<image>only"}]], images=[pictures[:2], pictures[2:]])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 4]]


def test_batches_pad_left_for_generation_and_right_for_training(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    short = [user(image(pictures[0]), text("Hi"))]
    long = [user(image(pictures[1]), image(pictures[2]), text("A longer question here"))]
    one = [p(c) for c in (short, long)]
    out = p([short, long])
    n = len(one[0]["input_ids"][0])
    T = out["input_ids"].shape[1]
    assert out["input_ids"].shape == (2, len(one[1]["input_ids"][0]))
    assert out["attention_mask"][0].tolist() == [0] * (T - n) + [1] * n              # left padding
    assert out["input_ids"][0, :T - n].eq(p.pad_token_id).all()
    assert torch.equal(out["input_ids"][0, T - n:], one[0]["input_ids"][0])
    assert torch.equal(out["pixel_values"], torch.cat([one[0]["pixel_values"], one[1]["pixel_values"]]))
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 4]]
    right = p([short, long], padding_side="right")
    assert right["attention_mask"][0].tolist() == [1] * n + [0] * (T - n)
    train = p([short + [{"role": "assistant", "content": "ok"}], long], return_labels=True)
    assert train["attention_mask"][0, 0] == 1 and train["labels"][0, -1] == IGNORE_INDEX   # right padding
    assert p.batch_decode(out["input_ids"])[0].endswith("user\nHi\nassistant\n")


def test_max_length(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    conv = [user(image(pictures[0]), text("What colour is the shape?")), {"role": "assistant", "content": "red"}]
    full = p(conv, return_labels=True)
    L = full["input_ids"].shape[1]
    cut = p(conv, return_labels=True, max_length=L - 2)
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :L - 2])
    assert torch.equal(cut["labels"], full["labels"][:, :L - 2])
    first_pad = full["input_ids"][0].tolist().index(p.image_token_id)
    with pytest.raises(ValueError, match=f"max_length={first_pad + 2} would cut through image/video tokens"):
        p(conv, max_length=first_pad + 2)


def test_bad_conversations(tmp_path, pictures):
    p = make(tmp_path, "qwen2_5_vl")
    with pytest.raises(ValueError, match="unknown content type 'audio'"):
        p([user({"type": "audio", "audio": "x.wav"})])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        p([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        p([{"content": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        p([user(image("missing.png"))])
    with pytest.raises(ValueError, match="more <|image_pad|>"):
        p([user(text("<|image_pad|> typed by hand"))])
    q3 = make(tmp_path, "qwen3_vl")
    with pytest.raises(ValueError, match="system turn is only allowed first"):
        q3.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_eos_and_pad(tmp_path):
    p = make(tmp_path, "qwen2_5_vl")
    assert p.eos_token_ids == [p.tokenizer.token_to_id("<|im_end|>"), p.tokenizer.token_to_id("<|endoftext|>")]
    assert p.pad_token_id == p.tokenizer.token_to_id("<|endoftext|>")
    assert p.decode(p.tokenizer.encode("<|im_start|>assistant\nred<|im_end|>").ids) == "assistant\nred"


# --------------------------------------------------------------------------------------- transformers

CONVERSATIONS = [
    [user(image(0), text("Describe this image."))],
    [{"role": "system", "content": "Be brief."}, user(text("Hi"))],
    [user(image(0), image(1), text("Compare them.")), {"role": "assistant", "content": "The second is wider."},
     user(text("And this one?"), image(2))],
    [user({"type": "video", "video": [0, 0], "fps": 2.0}, text("What happens?"))],
]


@pytest.mark.parametrize("generation", [False, True])
def test_equal_to_transformers_rendering(tmp_path, pictures, generation):
    tf = pytest.importorskip("transformers")
    from minivl.demo import CHAT_TEMPLATE
    p = make(tmp_path, "qwen2_5_vl")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "qwen2_5_vl")
    for conv in CONVERSATIONS:
        conv = _with_paths(conv, pictures)
        theirs = tok.apply_chat_template(conv, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=generation)
        assert p.apply_chat_template(conv, add_generation_prompt=generation) == theirs
        if any(item.get("type") == "video" for turn in conv for item in turn["content"] if isinstance(item, dict)):
            continue
        # transformers' processors replace each pad by as many pads as the image has merged patches
        out = p(conv, add_generation_prompt=generation)
        counts = iter((out["image_grid_thw"].prod(-1) // 4).tolist() if "image_grid_thw" in out else [])
        expanded = "".join(part + ("<|image_pad|>" * next(counts) if i < theirs.count("<|image_pad|>") else "")
                           for i, part in enumerate(theirs.split("<|image_pad|>")))
        assert out["input_ids"][0].tolist() == tok(expanded)["input_ids"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="transformers' processors need "
                    "torchvision for their video half")
@pytest.mark.parametrize("use_fast", [True, False])
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_equal_to_transformers_processor(tmp_path, pictures, model_type, use_fast):
    tf = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        video = Qwen2VLVideoProcessor()
    except Exception as e:  # noqa: BLE001 - a torchvision build that does not load counts as absent
        pytest.skip(f"torchvision does not load: {e}")
    make(tmp_path, model_type)  # the processor files, with small pixel limits
    directory = tmp_path / model_type
    p = Processor.from_pretrained(directory, use_fast=use_fast)
    cls = tf.Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else tf.Qwen3VLProcessor
    images = (Qwen2VLImageProcessor if use_fast else Qwen2VLImageProcessorPil).from_pretrained(directory)
    theirs = cls(image_processor=images, tokenizer=tf.AutoTokenizer.from_pretrained(directory),
                 video_processor=video)
    conv = _with_paths(CONVERSATIONS[2], pictures)
    prompt = p.apply_chat_template(conv, add_generation_prompt=True)
    from PIL import Image
    ref = theirs(text=[prompt], images=[Image.open(x) for x in pictures], return_tensors="pt")
    mine = p(conv)
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert torch.equal(mine["image_grid_thw"], ref["image_grid_thw"])
    assert (mine["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-5


def _with_paths(conv, pictures):
    """Conversations above name images by index; put in the picture paths (video frames included)."""
    def fix(item):
        if isinstance(item, dict) and item.get("type") == "image":
            return {**item, "image": pictures[item["image"]]}
        if isinstance(item, dict) and item.get("type") == "video":
            return {**item, "video": [pictures[i] for i in item["video"]]}
        return item
    return [{**turn, "content": [fix(i) for i in turn["content"]] if isinstance(turn["content"], list)
             else turn["content"]} for turn in conv]
