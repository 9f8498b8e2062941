"""Dataset formats, image and video references, placeholder checks, truncation and collation (minivl/data.py);
where records come from: files, folders, hub snapshots, NAME#N, dataset_info.json (minivl/records.py)."""

import base64
import io
import json
import sys

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


# ------------------------------------------------------------------------------------------------- videos

def frame_files(tmp_path, n, colour=(0, 200, 0)):
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"frame{i}.png")
        paths[-1].write_bytes(png_bytes(tuple((c + 40 * i) % 256 for c in colour)))
    return [p.name for p in paths]


def test_videos_take_the_tags_in_order(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png_bytes())
    frames = frame_files(tmp_path, 4)
    (tmp_path / "clip.mp4").write_bytes(b"not decoded here")
    rows = data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
        {"query": "<image>then<video>what happens?", "response": "it turns green", "images": ["a.png"],
         "videos": [frames]},
        {"query": "What happens?", "response": "green", "images": ["a.png"], "videos": [frames]},   # no tags
        {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "a clip"}],
         "video": "clip.mp4"}]))
    assert rows[0].videos == [[str(tmp_path / f) for f in frames]]           # frames relative to the file
    # without tags, ms-swift's order: videos, then images, then the text
    assert rows[1].conversation[0]["content"] == "<video><image>What happens?"
    assert rows[2].videos == [str(tmp_path / "clip.mp4")]
    ds = data.SFTDataset(rows, processor)
    for i in (0, 1):
        sample = ds[i]
        assert sample["video_grid_thw"].tolist() == [[2, 4, 4]]               # 4 frames of 56x56
        assert sample["image_grid_thw"].tolist() == [[1, 4, 4]]
        ids = sample["input_ids"].tolist()
        assert ids.count(processor.video_token_id) == 2 * 4 * 4 // 4
        # the image's pads come before the video's in row 0, after them in row 1
        first = {t: ids.index(t) for t in (processor.image_token_id, processor.video_token_id)}
        assert (first[processor.image_token_id] < first[processor.video_token_id]) == (i == 0)


def test_video_errors_name_the_row(tmp_path):
    frames = frame_files(tmp_path, 2)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the text has 2 <video> placeholders but 1 videos"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
            {"query": "<video><video>q", "response": "r", "videos": [frames]}]))
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the text has 1 <video> placeholders but 0 videos"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [{"query": "<video>q", "response": "r"}]))
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2: video file not found: .*gone\.mp4"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
            {"query": "q", "response": "r", "videos": [frames]},
            {"query": "q", "response": "r", "videos": ["gone.mp4"]}]))
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:1: image file not found: .*nope\.png"):
        data.load_rows(write_jsonl(tmp_path / "d.jsonl", [
            {"query": "q", "response": "r", "videos": [["nope.png", frames[0]]]}]))


# ------------------------------------------------------------------------- where the records come from

def colour_records(n):
    return [{"query": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def test_json_files_errors_and_json_lines(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"query": "q", "response": "r"},\n  {"query": }\n]')
    with pytest.raises(ValueError, match=r"bad\.json:3:13: not valid JSON \(Expecting value\)"):
        data.load_rows(tmp_path / "bad.json")
    write_jsonl(tmp_path / "lines.json", colour_records(3))     # JSON lines in a .json file, as datasets reads it
    assert [r.conversation[-1]["content"] for r in data.load_rows(tmp_path / "lines.json")] == \
        ["answer 0", "answer 1", "answer 2"]
    write_jsonl(tmp_path / "list.jsonl", [["not", "an", "object"]])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: each record must be a JSON object"):
        data.load_rows(tmp_path / "list.jsonl")


def test_sample_count_draws_as_ms_swift(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", colour_records(10))
    answers = lambda rows: [int(r.conversation[-1]["content"].split()[1]) for r in rows]  # noqa: E731
    # ms-swift: np.random.RandomState(data_seed=42).permutation(10) = [8 1 5 0 7 2 9 4 3 6], first N taken
    assert answers(data.load_rows(f"{path}#3")) == [8, 1, 5]
    assert answers(data.load_rows(f"{path}#23")) == list(range(10)) * 2 + [8, 1, 5]   # repeated, then drawn
    assert answers(data.load_rows(f"{path}#3", seed=1)) != [8, 1, 5]
    assert answers(data.load_rows(f"{path}#13", shuffle=False)) == list(range(10)) + [0, 1, 2]   # --val_dataset
    # one random state over the data sets in order: the second draw continues it
    both = answers(data.load_rows([f"{path}#3", f"{path}#3"]))
    state = [8, 1, 5]
    assert both[:3] == state and both[3:] != state and len(set(both[3:])) == 3
    assert len(data.load_rows(path)) == 10                     # no #N: every row, in file order
    hashed = write_jsonl(tmp_path / "with#2.jsonl", colour_records(4))   # an existing name keeps its '#'
    assert len(data.load_rows(hashed)) == 4
    with pytest.raises(ValueError, match=r"the part after '#' must be a row count"):
        data.load_rows(f"{path}#many")
    with pytest.raises(ValueError, match="dataset .* is empty"):
        data.load_rows(path, max_samples=0)
    assert answers(data.load_rows(path, max_samples=2)) == [0, 1]      # LLaMA-Factory's max_samples: the first N


def test_local_looking_paths_never_reach_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was called")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    for spec in ["./missing", "../missing", "/no/such/file", "~/no_such_minivl_file", "train.jsonl",
                 "sub/dir/train.parquet", "data.json#5"]:
        with pytest.raises(FileNotFoundError, match="dataset file not found: .*"):
            data.load_rows(spec)
    with pytest.raises(FileNotFoundError, match=r"'a/b/c': not a local file or folder, and not a hub id"):
        data.load_rows("a/b/c")


def write_parquet(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_hub_dataset_from_a_snapshot(tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train-00000-of-00002.jsonl", colour_records(3))
    write_jsonl(snapshot / "data" / "train-00001-of-00002.jsonl", colour_records(5)[3:])
    write_jsonl(snapshot / "data" / "test-00000-of-00001.jsonl", [{"query": "held", "response": "out"}])
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    calls = []

    def fake_download(repo_id, repo_type=None, **kwargs):
        calls.append((repo_id, repo_type))
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    rows = data.load_rows("someone/colours")
    assert calls == [("someone/colours", "dataset")]
    assert [r.conversation[-1]["content"] for r in rows] == [f"answer {i}" for i in range(5)]   # train split only
    assert len(data.load_rows("someone/colours#2")) == 2

    def offline(repo_id, **kwargs):
        raise OSError("offline and not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/colours' is not a local file or folder, and fetching "
                                                r"it as a hub data set repository failed: OSError: offline"):
        data.load_rows("someone/colours")


def test_hub_dataset_offline_from_the_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE: a data set in huggingface_hub's cache loads without the network; one not there is an
    error naming it."""
    from huggingface_hub import constants
    repo = tmp_path / "cache" / "datasets--someone--colours"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "data").mkdir(parents=True)
    write_jsonl(repo / "snapshots" / "abc123" / "data" / "train.jsonl", colour_records(3))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    rows = data.load_rows("someone/colours")
    assert [r.source for r in rows] == [f"{repo}/snapshots/abc123/data/train.jsonl:{i}" for i in (1, 2, 3)]
    with pytest.raises(FileNotFoundError, match=r"'someone/other' is not a local file or folder, and fetching it "
                                                r"as a hub data set repository failed: LocalEntryNotFoundError"):
        data.load_rows("someone/other")


def test_folder_reads_its_train_split(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", colour_records(2))
    write_jsonl(folder / "validation.jsonl", colour_records(7))
    assert len(data.load_rows(folder)) == 2
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", colour_records(2))
    write_jsonl(plain / "b.jsonl", colour_records(3))
    assert len(data.load_rows(plain)) == 5                     # no split in any name: all files
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    write_jsonl(only_test / "test.jsonl", colour_records(2))
    with pytest.raises(FileNotFoundError, match="has no data files of the 'train' split"):
        data.load_rows(only_test)


def test_parquet_and_missing_pyarrow(tmp_path, monkeypatch):
    raw = png_bytes()
    path = write_parquet(tmp_path / "d.parquet", [{"query": "<image>colour?", "response": "red",
                                                   "images": [{"bytes": raw, "path": None}]}])
    row = data.load_rows(path)[0]
    assert row.images == [raw] and row.source == f"{path}:1"
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"reading .*d\.parquet needs pyarrow: pip install pyarrow"):
        data.load_rows(path)


def test_dataset_info_entries(tmp_path, monkeypatch):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png_bytes())
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "mllm.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["media/a.png"]},
        {"messages": [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "no"}],
         "images": []}]))
    write_jsonl(tmp_path / "alpaca.jsonl", [{"q": "Add", "x": "1 2", "a": "3", "sys": "Be exact.",
                                             "past": [["hi", "hello"]], "images": ["media/a.png"]}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "mllm_demo": {"file_name": "sft", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "sums": {"file_name": "alpaca.jsonl",
                 "columns": {"prompt": "q", "query": "x", "response": "a", "system": "sys", "history": "past"}},
        "remote": {"ms_hub_url": "someone/data"}}))
    rows = data.load_rows(["mllm_demo", "sums"], dataset_dir=tmp_path)
    assert rows[0].conversation == [{"role": "user", "content": "<image>Colour?"},
                                    {"role": "assistant", "content": "red"}]
    assert rows[0].images == [str(tmp_path / "media" / "a.png")]      # relative to dataset_dir (media_dir)
    assert rows[1].images == []
    # the alpaca entry maps its own columns; the images column is not mapped, so LLaMA-Factory ignores it
    assert rows[2].conversation == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "Add\n1 2"}, {"role": "assistant", "content": "3"}]
    assert rows[2].images == []
    assert len(data.load_rows(["mllm_demo"], dataset_dir=tmp_path, max_samples=1)) == 1
    with pytest.raises(ValueError, match=r"'mlm_demo' is not defined in .*dataset_info\.json; did you mean "
                                         r"'mllm_demo'"):
        data.load_rows(["mlm_demo"], dataset_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'remote': minivl reads local files .* not \['ms_hub_url'\]"):
        data.load_rows(["remote"], dataset_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dataset_info\.json not found"):
        data.load_rows(["mllm_demo"], dataset_dir=tmp_path / "media")
