"""Labels on every family, through the trainer's own path (a data file -> data.SFTDataset -> labels): the labelled
tokens of each assistant turn decode to exactly its answer and `<|im_end|>`, and images inside an answer are
inputs, not targets.
"""

import json

import pytest
import torch
from processor_helpers import PREPROCESSOR, family_dir, noise_image

import minivl
from minivl import data
from minivl.processor import IGNORE_INDEX

# small pixel limits: every image is 2x2 merged tokens (56x56 with 14-pixel patches, 64x64 with 16)
SMALL = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 64}


def processor_of(tmp_path, family):
    side = SMALL[family]
    pre = {k: v for k, v in PREPROCESSOR[family].items() if k != "size"}
    return minivl.Processor.from_pretrained(family_dir(tmp_path / family, family, {
        **pre, "min_pixels": side * side, "max_pixels": side * side}))


def labelled_runs(labels):
    """The labelled stretches of one sample as (start, end) index pairs."""
    kept = (labels != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, k in enumerate(kept):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("family", list(SMALL))
def test_each_answer_and_its_im_end_are_the_labels(tmp_path, family):
    p = processor_of(tmp_path, family)
    for i in range(3):
        noise_image(SMALL[family], SMALL[family], seed=i).save(tmp_path / f"{i}.png")
    answers = ["red", "It is a red square on a white ground, in the corner.", "Yes."]
    messages = [{"role": "user", "content": "<image>What colour is the shape?"},
                {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "Say more about <image> this one."},
                {"role": "assistant", "content": answers[1]},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": answers[2]}]
    images = ["0.png", "1.png"]
    if family != "qwen3_vl":
        # the Qwen2 templates render images in any turn (Qwen3-VL refuses them in an answer)
        messages += [{"role": "user", "content": "Draw it."},
                     {"role": "assistant", "content": "Here: <image> is the drawing."}]
        images.append("2.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": messages, "images": images}) + "\n")
    dataset = data.SFTDataset(data.load_rows(tmp_path / "rows.jsonl"), p)
    sample = dataset[0]
    ids, labels = sample["input_ids"], sample["labels"]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])        # labels are the tokens themselves; the trainer shifts them
    runs = [p.decode(ids[a:b], skip_special_tokens=False) for a, b in labelled_runs(labels)]
    expected = [a + "<|im_end|>" for a in answers]
    if family != "qwen3_vl":
        expected += ["Here: ", " is the drawing.<|im_end|>"]
    assert runs == expected
    header = p.tokenizer.encode("<|im_start|>assistant\n").ids
    for a, _ in labelled_runs(labels)[:len(answers)]:
        assert ids[a - len(header):a].tolist() == header   # each answer starts right after its header
    if family != "qwen3_vl":
        # between the two labelled pieces of the last answer lies exactly the image block, unlabelled
        (_, gap_start), (gap_end, _) = labelled_runs(labels)[-2:]
        block = [p.vision_start_token_id] + [p.image_token_id] * 4 + [p.vision_end_token_id]
        assert ids[gap_start:gap_end].tolist() == block
    assert data.count_label_tokens(labels[None]) == int(kept.sum())   # the first token is never a label


def test_qwen3_refuses_an_image_in_an_answer(tmp_path):
    p = processor_of(tmp_path, "qwen3_vl")
    noise_image(64, 64).save(tmp_path / "0.png")
    conv = [{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": "Here: <image>"}]
    with pytest.raises(ValueError, match="assistant turn cannot contain images"):
        p(conv, images=[str(tmp_path / "0.png")], return_labels=True)
