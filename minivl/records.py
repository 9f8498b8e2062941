"""Where training records come from: data files, folders, hub data set repositories, ms-swift's `NAME#N`, and
LLaMA-Factory's dataset_info.json. The formats inside the records are read in minivl/data.py and data_rl.py.

    records = records.load_records(["train.jsonl", "llamafactory/RLHF-V#500"])  # [(source, record, base_dir)]
    records = records.load_records(["rlhf_v"], dataset_dir="data", max_samples=1000)   # LLaMA-Factory names

Each `--dataset` entry is
  a file         .jsonl, .json (a list, or JSON lines), .parquet (needs pyarrow)
  a folder       its .parquet / .jsonl / .json files of the train split (files named for a split: train-*.parquet,
                 data/train.jsonl...; with no split in any name, all of them)
  owner/name     a hub data set repository: huggingface_hub.snapshot_download(repo_type="dataset") (its cache and
                 HF_HUB_OFFLINE apply), read as a folder
  NAME#N         N rows: drawn without replacement with the data seed (42), the whole set repeated first when N
                 exceeds it (ms-swift's `--dataset NAME#N` with its default `--dataset_shuffle true`); with
                 shuffle=False (ms-swift's `--val_dataset`) the first N
and with dataset_dir (LLaMA-Factory) a name in its dataset_info.json: `file_name` (a file or a folder in
dataset_dir) or `hf_hub_url`, with `formatting` (alpaca / sharegpt), `ranking`, `columns`, `tags`, `split`,
`folder`, `num_samples`; `max_samples` keeps the first N rows. Such records are turned into ms-swift's shapes
({"messages", "images", "videos"}, plus "chosen" / "rejected" strings for ranking data) here, so the readers
downstream see one set of keys. A name that looks like a local path (./, ../, /, ~, or a .jsonl / .json /
.parquet ending) and does not exist is an error naming the path, never a hub call.

base_dir is where relative image and video paths start: the data file's folder, the folder or hub repository
given, or a dataset_info.json entry's dataset_dir (LLaMA-Factory's media_dir default).

Simplified: no streaming, no ModelScope hub, no loading scripts; a hub subset is read from the folder of its name.
Tests: tests/test_data.py (sources), tests/test_data_rl.py (dataset_info.json ranking entries).
"""

import difflib
import json
import os
import re
from pathlib import Path

import numpy as np

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test"}
# LLaMA-Factory's DatasetAttr defaults: the columns and ShareGPT tags a dataset_info.json entry may rename
LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
              "messages": "conversations", "system": None, "images": None, "videos": None, "chosen": None,
              "rejected": None}
LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OTHER_SOURCES = {"ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}  # LLaMA-Factory's, not read here


# ------------------------------------------------------------------------------ files, folders, hub, NAME#N

def read_records(path):
    """The raw records of one data file: .jsonl, .json (a list, or JSON lines), or .parquet (needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to jsonl)") \
                from None
        return [(f"{path}:{i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after a first object: JSON lines in a .json file
                raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        else:
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json dataset must hold a list of objects (or one object a line)")
            return _objects([(f"{path}:{i + 1}", r) for i, r in enumerate(records)])
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    out.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
    return _objects(out)


def _objects(records):
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: each record must be a JSON object")
    return records


def load_records(specs, seed=42, dataset_dir=None, max_samples=None, shuffle=True):
    """Every record of the data sets `specs` names, as (source, record, base_dir), base_dir being the folder
    relative media paths start from. With dataset_dir the names are dataset_info.json entries (LLaMA-Factory),
    else files, folders or hub ids with an optional #N (ms-swift). max_samples keeps the first N of each.
    shuffle=False makes #N take the first N rows, as ms-swift does for --val_dataset and --dataset_shuffle false."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    rng = np.random.RandomState(seed)  # one random state drawn in order over the data sets, as ms-swift's loader
    out = []
    for spec in map(str, specs):
        if dataset_dir is not None:
            records = dataset_info_records(spec, dataset_dir, rng)
        else:
            name, n = split_sample_count(spec)
            records = sample_records(records_of(name), n, rng, shuffle)
        records = records[:max_samples] if max_samples is not None else records
        if not records:
            raise ValueError(f"dataset {spec} is empty")
        out += records
    return out


def split_sample_count(spec):
    """ms-swift's "NAME#N" -> (NAME, N); an existing path keeps any '#' in its name."""
    if os.path.exists(spec) or "#" not in spec:
        return spec, None
    name, count = spec.rsplit("#", 1)
    if not count.isdigit() or int(count) == 0:
        raise ValueError(f"dataset {spec!r}: the part after '#' must be a row count (N > 0), as in NAME#500")
    return name, int(count)


# ms-swift's swift/dataset/utils.py sample_dataset
def sample_records(records, n, rng, shuffle=True):
    """n records: the whole set n // len times, then n % len drawn without replacement with `rng` (the first
    n % len without shuffle)."""
    if n is None:
        return records
    repeats, rest = divmod(n, len(records)) if records else (0, 0)
    drawn = rng.permutation(len(records))[:rest].tolist() if shuffle else list(range(rest))
    order = list(range(len(records))) * repeats + drawn
    return [records[i] for i in order]


def looks_local(spec):
    return spec.startswith(("./", "../", "/", "~")) or spec in (".", "..") or spec.endswith(DATA_EXTENSIONS)


def records_of(spec):
    """The records of a file, a folder (its train split) or a hub data set repository."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [(where, r, str(path.parent)) for where, r in read_records(path)]
    if path.is_dir():
        return [(where, r, str(path)) for f in data_files(path) for where, r in read_records(f)]
    if looks_local(spec):
        raise FileNotFoundError(f"dataset file not found: {path}")
    if spec.count("/") != 1:
        raise FileNotFoundError(f"dataset {spec!r}: not a local file or folder, and not a hub id (owner/name)")
    root = hub_snapshot(spec)
    return [(where, r, str(root)) for f in data_files(root) for where, r in read_records(f)]


def hub_snapshot(repo_id):
    """A local copy of a hub data set repository, through huggingface_hub's cache (HF_HUB_OFFLINE applies)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset"))
    except Exception as e:  # not found, offline without a cached copy, no network: say which data set
        raise FileNotFoundError(f"dataset {repo_id!r} is not a local file or folder, and fetching it as a hub "
                                f"data set repository failed: {type(e).__name__}: {e}") from e


def _split_of(relative):
    tokens = re.split(r"[/_.\-]", str(relative).lower())
    return next((SPLIT_NAMES[t] for t in tokens if t in SPLIT_NAMES), None)


def data_files(directory, split="train"):
    """The data files of one split in a folder, as the Hugging Face hub names them (train-00000-of-00002.parquet,
    data/train.jsonl, train/...); when no file names a split, every file belongs to the train split."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.suffix in DATA_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts)
                   and p.name not in ("dataset_info.json", "dataset_infos.json"))
    if not files:
        raise FileNotFoundError(f"no .parquet / .jsonl / .json data files in {directory}")
    splits = {p: _split_of(p.relative_to(directory)) for p in files}
    chosen = files if split == "train" and not any(splits.values()) else [p for p in files if splits[p] == split]
    if not chosen:
        raise FileNotFoundError(f"{directory} has no data files of the {split!r} split (its files: "
                                f"{[str(p.relative_to(directory)) for p in files][:10]})")
    return chosen


# ----------------------------------------------------------------------- LLaMA-Factory's dataset_info.json

def dataset_info_records(name, dataset_dir, rng=None):
    """The records of one dataset_info.json entry (LLaMA-Factory's parser.py and loader.py), turned into the
    ms-swift shapes above; `dataset_dir: ONLINE` reads `name` as a hub id with the default attributes."""
    if dataset_dir == "ONLINE":
        entry = {"hf_hub_url": name}
    else:
        info_path = Path(dataset_dir) / "dataset_info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"dataset {name!r}: {info_path} not found (dataset_dir holds the data sets "
                                    "and their dataset_info.json)")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{info_path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (it defines {sorted(info)[:20]})"
            raise ValueError(f"dataset {name!r} is not defined in {info_path}{hint}")
        entry = info[name]
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt", "openai"):
        raise ValueError(f"dataset {name!r}: formatting {entry['formatting']!r} is not 'alpaca', 'sharegpt' or "
                         "'openai'")
    if "hf_hub_url" in entry:
        base = root = hub_snapshot(entry["hf_hub_url"])
        for part in ("folder", "subset"):  # a subset is read from the folder of that name
            if entry.get(part):
                root = root / entry[part]
                if not root.is_dir():
                    raise FileNotFoundError(f"dataset {name!r}: {part} {entry[part]!r} is not a folder of "
                                            f"{entry['hf_hub_url']}")
        files = data_files(root, entry.get("split", "train"))
    elif set(entry) & OTHER_SOURCES:
        raise ValueError(f"dataset {name!r}: minivl reads local files (file_name) and Hugging Face hub data sets "
                         f"(hf_hub_url), not {sorted(set(entry) & OTHER_SOURCES)}")
    elif "file_name" in entry:
        base, path = Path(dataset_dir), Path(dataset_dir) / entry["file_name"]
        if not path.exists():
            raise FileNotFoundError(f"dataset {name!r}: file_name {path} not found")
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_EXTENSIONS) if path.is_dir() else [path]
    else:
        raise ValueError(f"dataset {name!r} in dataset_info.json needs 'file_name' or 'hf_hub_url'")
    records = [(where, lf_record(r, entry, where), str(base)) for f in files for where, r in read_records(f)]
    return sample_records(records, entry.get("num_samples"), rng or np.random.RandomState(42))


def lf_record(record, entry, where):
    """One record of an alpaca or sharegpt dataset_info.json entry, with its column and tag names applied ->
    {"messages", "images", "videos", and "chosen" / "rejected" for ranking data} (LLaMA-Factory's converter.py)."""
    columns = {**LF_COLUMNS, **entry.get("columns", {})}
    tags = {**LF_TAGS, **entry.get("tags", {})}

    def get(key):  # a column the entry names (None: the entry has no such column)
        return record.get(columns[key]) if columns[key] else None

    out = {"images": get("images"), "videos": get("videos")}
    if entry.get("ranking") and not (columns["chosen"] and columns["rejected"]):
        raise ValueError(f"{where}: a ranking entry of dataset_info.json needs 'chosen' and 'rejected' columns")
    system = get("system")
    if entry.get("formatting", "alpaca") == "alpaca":
        turns = []
        for q, r in get("history") or []:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        turns.append({"role": "user", "content": "\n".join(x for x in (get("prompt"), get("query")) if x)})
        if not entry.get("ranking") and isinstance(get("response"), str):
            turns.append({"role": "assistant", "content": get("response")})
    else:
        messages = record.get(columns["messages"])
        if not isinstance(messages, list):
            raise ValueError(f"{where}: the messages column {columns['messages']!r} is missing or not a list")
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        turns = []
        for turn in messages:
            tag = turn.get(tags["role_tag"])
            if tag not in roles:
                raise ValueError(f"{where}: a turn with {tags['role_tag']}={tag!r}; the entry's tags name "
                                 f"{sorted(roles)} (tool turns are not supported)")
            role = roles[tag]
            turns.append({"role": role, "content": turn.get(tags["content_tag"])})
        if turns and turns[0]["role"] == "system":
            system, turns = turns[0]["content"], turns[1:]
    out["messages"] = ([{"role": "system", "content": system}] if system else []) + turns
    if entry.get("ranking"):
        for key in ("chosen", "rejected"):
            value = get(key)
            if isinstance(value, dict):  # sharegpt: {"from": "gpt", "value": ...}
                if value.get(tags["role_tag"]) != tags["assistant_tag"]:
                    raise ValueError(f"{where}: the {key} answer's {tags['role_tag']} is "
                                     f"{value.get(tags['role_tag'])!r}, not {tags['assistant_tag']!r}")
                value = value.get(tags["content_tag"])
            out[key] = value
    return out
