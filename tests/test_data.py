"""Dataset formats, image references, placeholder checks, truncation and collation (minivl/data.py)."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

import minivl
from minivl import data, demo


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")


@pytest.fixture(scope="module")
def processor(made):
    return minivl.Processor.from_pretrained(made["model"])


def png_bytes(colour=(200, 30, 30), size=56):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats_give_the_same_conversation(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "<image>What colour?"},
                {"role": "assistant", "content": "red"}]
    records = [
        {"system": "Be brief.", "query": "<image>What colour?", "response": "red", "history": [["hi", "hello"]],
         "images": ["img/a.png"]},
        {"messages": expected, "images": ["img/a.png"]},
        {"system": "Be brief.", "images": ["img/a.png"], "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "red"}]},
        {"system": "Be brief.", "images": "img/a.png", "conversation": [
            {"human": "hi", "assistant": "hello"}, {"human": "<image>What colour?", "assistant": "red"}]},
    ]
    rows = data.load_rows(write_jsonl(tmp_path / "d.jsonl", records))
    for row in rows:
        assert row.conversation == expected
        assert row.images == [str(tmp_path / "img" / "a.png")]   # relative to the jsonl file
    (tmp_path / "d.json").write_text(json.dumps(records))
    json_rows = data.load_rows(tmp_path / "d.json")
    assert [r.conversation for r in json_rows] == [r.conversation for r in rows]
    alpaca = data.load_rows(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2",
                                                                 "output": "3"}]))
    assert alpaca[0].conversation == [{"role": "user", "content": "Add\n1 2"},
                                      {"role": "assistant", "content": "3"}]


def test_image_references(tmp_path, processor):
    raw = png_bytes((30, 30, 200))
    b64 = base64.b64encode(raw).decode()
    records = [{"query": "<image><image><image>Colours?", "response": "blue",
                "images": [{"bytes": b64}, "data:image/png;base64," + b64,
                           {"bytes": "data:image/png;base64," + b64}]},
               {"query": "Colour?", "response": "blue", "images": [{"bytes": b64}]}]   # no tag: image goes first
    rows = data.load_rows(write_jsonl(tmp_path / "d.jsonl", records))
    assert all(img == raw for img in rows[0].images)
    assert rows[1].conversation[0]["content"] == "<image>Colour?"
    sample = data.SFTDataset(rows, processor)[0]
    assert sample["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    # Hugging Face datasets rows carry raw bytes
    row = data.make_row({"query": "<image>c?", "response": "blue", "images": [{"bytes": raw, "path": "x.png"}]},
                        str(tmp_path), "mem:1")
    assert data.SFTDataset([row], processor)[0]["pixel_values"].shape == (16, 1176)


def test_clear_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2: image file not found: .*missing\.png"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
            {"query": "<image>q", "response": "r", "images": ["a.png"]},
            {"query": "<image>q", "response": "r", "images": ["missing.png"]}]))
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the text has 2 <image> placeholders but 1 images"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
            {"query": "<image>q<image>", "response": "r", "images": ["a.png"]}]))
    with pytest.raises(ValueError, match="has 1 <image> placeholders but 0 images"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [{"query": "<image>q", "response": "r"}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        data.load_rows(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        data.load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "response": "r"}\n{"query": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        data.load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="needs 'messages', 'conversations', or 'query' and 'response'"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}]))
    with pytest.raises(ValueError, match="must end with an assistant answer"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}]}]))


def test_system_option_fills_only_missing_system(tmp_path):
    rows = data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
        {"query": "q", "response": "r"}, {"system": "own", "query": "q", "response": "r"}]), system="default")
    assert rows[0].conversation[0] == {"role": "system", "content": "default"}
    assert rows[1].conversation[0] == {"role": "system", "content": "own"}


def test_labels_truncation_and_drops(made, processor):
    rows = data.load_rows(made["train"])[:3]
    full = data.SFTDataset(rows, processor)[0]
    labelled = full["labels"] != -100
    # the answer and its closing <|im_end|> are the only labels
    assert processor.decode(full["input_ids"][labelled]) == rows[0].conversation[-1]["content"]
    assert full["input_ids"][labelled][-1] == processor.im_end_token_id
    L = len(full["input_ids"])
    last_vision = max(i for i, t in enumerate(full["input_ids"].tolist()) if t in processor.vision_token_ids)
    cut = data.SFTDataset(rows, processor, max_length=L - 2, truncation_strategy="right")[0]  # text: cut there
    assert torch.equal(cut["input_ids"], full["input_ids"][:L - 2])
    right = {"truncation_strategy": "right"}
    assert data.SFTDataset(rows, processor, max_length=last_vision, **right)[0] is None  # would cut the image
    assert data.SFTDataset(rows, processor, max_length=L - 2)[0] is None     # ms-swift's default: delete
    ds = data.SFTDataset(rows, processor, max_length=last_vision, **right)
    batch = ds.collate([ds[0], data.SFTDataset(rows, processor)[1]])
    assert batch["num_dropped"] == 1 and batch["input_ids"].shape[0] == 1
    assert ds.collate([ds[0]]) == {"num_dropped": 1}


def test_split_is_seeded(made):
    rows = data.load_rows(made["test"])
    train, val = data.split_rows(rows, 0.1, seed=1)
    assert len(val) == 13 and len(train) + len(val) == len(rows)
    again = data.split_rows(rows, 0.1, seed=1)[1]
    assert [r.source for r in val] == [r.source for r in again]
    assert [r.source for r in data.split_rows(rows, 0.1, seed=2)[1]] != [r.source for r in val]
