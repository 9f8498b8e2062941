"""Preference pairs, GRPO prompts and CHORD's expert rows in the formats of LLaMA-Factory, trl and ms-swift
(minivl/data_rl.py), from files, a dataset_info.json and a hub snapshot."""

import json

import pytest
from test_data import png_bytes, write_jsonl, write_parquet

import minivl
from minivl import data, data_rl, demo

QUESTION = "<image>What are the key features you observe in the image?"
CHOSEN, REJECTED = "A red square on white.", "A blue circle."


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    made = demo.make_demo(tmp_path_factory.mktemp("demo") / "demo_data")
    return minivl.Processor.from_pretrained(made["model"])


def rlhf_v_record(raw, i=0):
    """One row shaped like llamafactory/RLHF-V: sharegpt ranking, images as {"bytes": ...}."""
    return {"conversations": [{"from": "human", "value": QUESTION}],
            "chosen": {"from": "gpt", "value": f"{CHOSEN} {i}"}, "rejected": {"from": "gpt", "value": REJECTED},
            "images": [{"bytes": raw}]}


RLHF_V_ENTRY = {"hf_hub_url": "llamafactory/RLHF-V", "ranking": True, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                            "images": "images"}}


def test_rlhf_v_parquet_through_dataset_info_and_the_hub(tmp_path, monkeypatch, processor):
    import huggingface_hub
    raw = png_bytes()
    snapshot = tmp_path / "snapshot"
    write_parquet(snapshot / "data" / "train-00000-of-00001.parquet", [rlhf_v_record(raw, i) for i in range(5)])
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, repo_type=None, **kw: str(snapshot) if (repo_id, repo_type) == (
                            "llamafactory/RLHF-V", "dataset") else pytest.fail(f"asked for {repo_id} {repo_type}"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"rlhf_v": RLHF_V_ENTRY}))
    rows = data_rl.load_preference_rows(["rlhf_v"], dataset_dir=tmp_path / "data", max_samples=2)
    assert len(rows) == 2
    row = rows[1]
    assert row.prompt == [{"role": "user", "content": QUESTION}]
    assert (row.chosen, row.rejected, row.images, row.rejected_images) == (f"{CHOSEN} 1", REJECTED, [raw], None)
    # the same data set named by its hub id, as `--dataset llamafactory/RLHF-V#2`: ms-swift draws rows 1 and 4
    # (np.random.RandomState(42).permutation(5) = [1 4 2 0 3])
    by_id = data_rl.load_preference_rows(["llamafactory/RLHF-V#2"])
    assert [r.chosen for r in by_id] == [f"{CHOSEN} 1", f"{CHOSEN} 4"]
    # both answers encode after the same prompt and image
    chosen = processor.encode(row.chosen_conversation, images=row.images, return_labels=True)
    rejected = processor.encode(row.rejected_conversation, images=row.images, return_labels=True)
    assert processor.decode(chosen["labels"][chosen["labels"] != -100]).startswith(f"{CHOSEN} 1")
    assert processor.decode(rejected["labels"][rejected["labels"] != -100]).startswith(REJECTED)
    assert chosen["image_grid_thw"].tolist() == rejected["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_preference_formats_agree(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes((0, 0, 200)))
    q = "What colour?"
    records = [
        # LLaMA-Factory sharegpt ranking, chosen / rejected as messages or strings
        {"conversations": [{"from": "human", "value": f"<image>{q}"}], "chosen": {"from": "gpt", "value": "red"},
         "rejected": {"from": "gpt", "value": "blue"}, "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": q}], "chosen": "red", "rejected": "blue", "images": "a.png"},
        # trl: prompt text or messages with content items, answers as strings or message lists, `image`
        {"prompt": f"<image>{q}", "chosen": "red", "rejected": "blue", "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
         "rejected": [{"role": "assistant", "content": "blue"}], "image": "a.png"},
        # trl's implicit prompt: the turns chosen and rejected share
        {"chosen": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": "red"}],
         "rejected": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": "blue"}],
         "images": ["a.png"]},
        # ms-swift: messages ending with the chosen answer + rejected_response / rejected_messages
        {"messages": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": "red"}],
         "rejected_response": "blue", "images": ["a.png"]},
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "red"}],
         "rejected_response": [{"role": "assistant", "content": "blue"}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": "red"}],
         "rejected_messages": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": "blue"}],
         "images": ["a.png"]},
    ]
    rows = data_rl.load_preference_rows(write_jsonl(tmp_path / "d.jsonl", records))
    for row in rows:
        assert (row.prompt, row.chosen, row.rejected) == ([{"role": "user", "content": f"<image>{q}"}], "red", "blue")
        assert row.images == [str(tmp_path / "a.png")] and row.rejected_images is None and row.videos == []
    (tmp_path / "d.json").write_text(json.dumps(records[:2]))
    assert [r.chosen for r in data_rl.load_preference_rows(tmp_path / "d.json")] == ["red", "red"]
    # ms-swift's rejected_images: the same answer on another image; and a system prompt
    row = data_rl.load_preference_rows(write_jsonl(tmp_path / "e.jsonl", [
        {"system": "Look closely.", "messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": "red"}],
         "images": ["a.png"], "rejected_images": ["b.png"]}]))[0]
    assert row.prompt == [{"role": "system", "content": "Look closely."}, {"role": "user", "content": f"<image>{q}"}]
    assert (row.chosen, row.rejected, row.rejected_images) == ("red", "red", [str(tmp_path / "b.png")])


@pytest.mark.parametrize("record, error, message", [
    ({"prompt": "<image>q", "chosen": "  ", "rejected": "b", "images": ["a.png"]}, ValueError,
     r"d\.jsonl:1: the chosen answer is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": {"from": "gpt", "value": ""}}, ValueError,
     r"d\.jsonl:1: the rejected answer is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected_response": ""}, ValueError, r"d\.jsonl:1: the rejected answer is empty"),
    ({"prompt": "<image>q", "chosen": "a", "rejected": "b", "images": ["gone.png"]}, FileNotFoundError,
     r"d\.jsonl:1: image file not found: .*gone\.png"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, ValueError, r"d\.jsonl:1: the chosen and rejected answers are "
                                                                  "the same"),
    ({"prompt": "q", "chosen": "a"}, ValueError, r"d\.jsonl:1: a preference record needs 'chosen' and 'rejected'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "a",
      "rejected": "b"}, ValueError, r"d\.jsonl:1: the prompt of a preference pair must end with a user turn"),
    ({"prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"}, ValueError,
     r"d\.jsonl:1: chosen comes from 'human'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected_response": "b", "images": ["a.png"], "rejected_images": ["a.png", "a.png"]},
     ValueError, r"d\.jsonl:1: 2 rejected_images for 1 images"),
    ({"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"}, ValueError,
     r"d\.jsonl:1: ms-swift preference data: `messages` must end with the chosen answer"),
    ({"prompt": "<image><image>q", "chosen": "a", "rejected": "b", "images": ["a.png"]}, ValueError,
     r"d\.jsonl:1: the text has 2 <image> placeholders but 1 images"),
])
def test_preference_errors_name_the_row(tmp_path, record, error, message):
    (tmp_path / "a.png").write_bytes(png_bytes())
    with pytest.raises(error, match=message):
        data_rl.load_preference_rows(write_jsonl(tmp_path / "d.jsonl", [record]))


def test_ranking_entries_from_local_files(tmp_path):
    """LLaMA-Factory's sharegpt ranking data in local json / jsonl files named by dataset_info.json, with the
    entry's own column and tag names."""
    (tmp_path / "img.png").write_bytes(png_bytes())
    record = {**rlhf_v_record(None), "images": ["img.png"]}
    (tmp_path / "pairs.json").write_text(json.dumps([record]))
    write_jsonl(tmp_path / "custom.jsonl", [{"q": [{"speaker": "me", "text": QUESTION}],
                                             "good": {"speaker": "bot", "text": "yes"},
                                             "bad": {"speaker": "bot", "text": "no"}, "pics": ["img.png"]}])
    local = {k: v for k, v in RLHF_V_ENTRY.items() if k != "hf_hub_url"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pairs": {**local, "file_name": "pairs.json"},
        "custom": {"file_name": "custom.jsonl", "ranking": True, "formatting": "sharegpt",
                   "columns": {"messages": "q", "chosen": "good", "rejected": "bad", "images": "pics"},
                   "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "wrong_tags": {"file_name": "custom.jsonl", "ranking": True, "formatting": "sharegpt",
                       "columns": {"messages": "q", "chosen": "good", "rejected": "bad"}},
        "no_columns": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt"}}))
    row = data_rl.load_preference_rows(["pairs"], dataset_dir=tmp_path)[0]
    assert (row.prompt, row.chosen, row.images) == ([{"role": "user", "content": QUESTION}], f"{CHOSEN} 0",
                                                    [str(tmp_path / "img.png")])
    row = data_rl.load_preference_rows(["custom"], dataset_dir=tmp_path)[0]
    assert (row.prompt, row.chosen, row.rejected) == ([{"role": "user", "content": QUESTION}], "yes", "no")
    with pytest.raises(ValueError, match=r"custom\.jsonl:1: a turn with from=None; the entry's tags name"):
        data_rl.load_preference_rows(["wrong_tags"], dataset_dir=tmp_path)
    with pytest.raises(ValueError, match=r"pairs\.json:1: a ranking entry of dataset_info\.json needs 'chosen' and"):
        data_rl.load_preference_rows(["no_columns"], dataset_dir=tmp_path)


# -------------------------------------------------------------------------------------------------- prompts

def test_prompt_rows(tmp_path):
    for name in ("p1.png", "p2.png"):
        (tmp_path / name).write_bytes(png_bytes())
    rows = data_rl.load_prompt_rows(write_jsonl(tmp_path / "g.jsonl", [
        # the users' GRPO jsonl: only the user turn, no tags, a solution and another column
        {"images": ["p1.png", "p2.png"], "messages": [{"role": "user", "content": "Extract the totals"}],
         "solution": "42", "difficulty": 3},
        # system allowed; a trailing assistant turn leaves the prompt and becomes the solution
        {"messages": [{"role": "system", "content": "Think first."}, {"role": "user", "content": "<image>Count"},
                      {"role": "assistant", "content": "<answer>7</answer>"}], "images": ["p1.png"]},
        # with a solution of its own the assistant turn is dropped (ms-swift)
        {"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "seven"}],
         "solution": "7"},
        # query format with ms-swift's aliases; trl's prompt with `image`
        {"problem": "What is 2+2?", "solution": "4"},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "image": "p1.png", "solution": "red"},
    ]), system="Be brief.")
    first = rows[0]
    assert first.prompt == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "<image><image>Extract the totals"}]
    assert first.images == [str(tmp_path / "p1.png"), str(tmp_path / "p2.png")]
    assert first.columns == {"solution": "42", "difficulty": 3}
    assert rows[1].prompt == [{"role": "system", "content": "Think first."}, {"role": "user", "content": "<image>Count"}]
    assert rows[1].columns == {"solution": "<answer>7</answer>"}
    assert rows[2].prompt[-1] == {"role": "user", "content": "Count"} and rows[2].columns == {"solution": "7"}
    assert rows[3].prompt[-1] == {"role": "user", "content": "What is 2+2?"} and rows[3].columns == {"solution": "4"}
    assert rows[4].prompt[-1] == {"role": "user", "content": "<image>Colour?"} and rows[4].columns == {
        "solution": "red"}
    with pytest.raises(ValueError, match=r"g\.jsonl:1: a prompt must end with a user turn"):
        data_rl.load_prompt_rows(write_jsonl(tmp_path / "g.jsonl", [
            {"messages": [{"role": "system", "content": "only a system turn"}]}]))
    with pytest.raises(ValueError, match=r"g\.jsonl:1: the text has 1 <image> placeholders but 2 images"):
        data_rl.load_prompt_rows(write_jsonl(tmp_path / "g.jsonl", [
            {"messages": [{"role": "user", "content": "<image>q"}], "images": ["p1.png", "p2.png"]}]))


# --------------------------------------------------------------------------------------------- CHORD experts

def test_expert_rows_in_both_formats(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["a.png"]},                                               # SFT format
        {"messages": [{"role": "user", "content": "Colour?"}], "images": ["a.png"], "solution": "red"},  # GRPO
        {"query": "<image>Colour?", "solution": "red", "images": ["a.png"]},   # GRPO, query format
    ])
    rows = data_rl.load_expert_rows(path)
    expected = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}]
    assert all(r.conversation == expected and r.images == [str(tmp_path / "a.png")] for r in rows)
    assert all(isinstance(r, data.Row) for r in rows)
    sample = data.SFTDataset(rows, processor)[1]
    assert processor.decode(sample["input_ids"][sample["labels"] != -100], skip_special_tokens=False) == \
        "red<|im_end|>"
    with pytest.raises(ValueError, match=r"x\.jsonl:1: an expert row needs an assistant answer .* or a `solution`"):
        data_rl.load_expert_rows(write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user",
                                                                                    "content": "q"}]}]))
    with pytest.raises(ValueError, match="dataset .*empty.jsonl is empty"):
        (tmp_path / "empty.jsonl").write_text("")
        data_rl.load_expert_rows(tmp_path / "empty.jsonl")
