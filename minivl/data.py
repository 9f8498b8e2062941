"""Training data: the dataset formats of ms-swift and ShareGPT read into conversations, then encoded and batched.

    rows = data.load_rows(["train.jsonl"])                  # [Row(conversation, images, source)]
    dataset = data.SFTDataset(rows, processor, max_length=2048)
    batch = dataset.collate([dataset[i] for i in range(4)])  # processor.pad + how many samples were dropped

Formats (one JSON object a line in .jsonl, or a JSON list in .json):
  ms-swift messages   {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}
  ms-swift query      {"system": ..., "query": "<image>...", "response": ..., "history": [[q, r], ...],
                       "images": [...]}
                      (aliases: prompt / question / instruction+input for query, answer / output for response)
  ShareGPT            {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}], "images": [...]}
                      or ms-swift's {"conversation": [{"human": q, "assistant": r}, ...]}
Each `<image>` in the text takes the next entry of `images` (or `image`), in order; with no `<image>` at all, the
images go before the first user text (ms-swift does the same). An image is a path (relative paths are relative to
the data file), a data URL or base64 string, raw bytes, or {"bytes": ..., "path": ...} (Hugging Face datasets).

Too long for max_length: `truncation_strategy="delete"` (ms-swift's default) drops the sample; "right" cuts it
inside its text when every image token lies before the cut, and drops it otherwise, since cutting through image
tokens breaks the image-feature count (trl #5285). `SFTDataset.fitting_rows()` checks a whole data set before
training from the image headers alone; the dropped count also travels with each batch.

Simplified: no streaming (rows are read up front; images are decoded when a sample is encoded), no videos in the
file formats, no per-message loss switches. Tests: tests/test_data.py.
"""

import base64
import binascii
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .processor import IGNORE_INDEX

QUERY_KEYS = ("query", "prompt", "question", "instruction")
RESPONSE_KEYS = ("response", "answer", "output", "completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclass
class Row:
    conversation: list  # [{"role", "content"}], content text with <image> placeholders
    images: list  # one entry per placeholder: path / bytes / PIL, ready for processor.load_image
    source: str  # "file.jsonl:line" for error messages


# ------------------------------------------------------------------------------------------------ reading

def read_records(path):
    """The raw records of one data file: .jsonl, .json (a list), or .parquet (needs pyarrow)."""
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
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of objects")
        return [(f"{path}:{i + 1}", r) for i, r in enumerate(records)]
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    out.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
    return out


def _first(record, keys):
    return next((record[k] for k in keys if record.get(k) is not None), None)


def to_conversation(record, where):
    """One record of any supported format -> a list of {"role", "content"} turns."""
    if "messages" in record:
        turns = [{"role": t["role"], "content": t["content"]} for t in record["messages"]]
        if record.get("system") and turns and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": record["system"]})
        return turns
    if "conversations" in record:
        turns = []
        for t in record["conversations"]:
            role = SHAREGPT_ROLES.get(t.get("from"))
            if role is None:
                raise ValueError(f"{where}: ShareGPT turn with unknown 'from' {t.get('from')!r}")
            turns.append({"role": role, "content": t["value"]})
        if record.get("system") and turns and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": record["system"]})
        return turns
    turns = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if "conversation" in record:  # ms-swift's ShareGPT flavour: [{"human": q, "assistant": r}, ...]
        pairs = [(t.get("human"), t.get("assistant")) for t in record["conversation"]]
    else:
        query, response = _first(record, QUERY_KEYS), _first(record, RESPONSE_KEYS)
        if "instruction" in record and record.get("input"):  # alpaca: instruction, then input
            query = f"{record['instruction']}\n{record['input']}"
        if query is None:
            raise ValueError(f"{where}: a record needs 'messages', 'conversations', or 'query' and 'response' "
                             f"(got keys {sorted(record)})")
        pairs = [tuple(pair) for pair in record.get("history") or []] + [(query, response)]
    for q, r in pairs:
        turns.append({"role": "user", "content": q})
        if r is not None:  # a prompt to answer (minivl.chat) ends on the user's turn
            turns.append({"role": "assistant", "content": r})
    return turns


def resolve_image(image, base_dir, where):
    """A path relative to the data file becomes absolute (and must exist); data URLs and base64 become bytes."""
    if isinstance(image, dict):
        if isinstance(image.get("bytes"), str):  # JSON can only carry bytes as base64
            return base64.b64decode(image["bytes"].split(",", 1)[-1])
        if image.get("bytes") is not None:
            return image["bytes"]
        if image.get("path") is not None:
            return resolve_image(image["path"], base_dir, where)
        raise ValueError(f"{where}: image dict needs 'bytes' or 'path', got keys {sorted(image)}")
    if not isinstance(image, str):
        return image  # bytes or a PIL image
    if image.startswith("data:image"):
        return base64.b64decode(image.split(",", 1)[1])
    if image.startswith(("http://", "https://")):
        raise ValueError(f"{where}: image URLs are not fetched ({image}); download the file and give its path")
    path = image[len("file://"):] if image.startswith("file://") else image
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if os.path.isfile(full):
        return full
    if len(image) > 256 and "/" not in image[:64]:  # a bare base64 string (ms-swift accepts those)
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise FileNotFoundError(f"{where}: image file not found: {full}")


def load_rows(paths, system=None, need_answer=True):
    """Every record of the data files as a Row. Problems a run would otherwise meet hours later (a missing
    image file, more or fewer <image> tags than images, an empty file) are errors here, naming the line.
    need_answer=False also takes conversations that end on a user turn (prompts to answer)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows = []
    for path in paths:
        records = read_records(path)
        if not records:
            raise ValueError(f"dataset {path} is empty")
        base_dir = str(Path(path).parent)
        for where, record in records:
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each record must be a JSON object")
            rows.append(make_row(record, base_dir, where, system, need_answer))
    if not rows:
        raise ValueError(f"no rows in {[str(p) for p in paths]}")
    return rows


def make_row(record, base_dir, where, system=None, need_answer=True):
    conversation = to_conversation(record, where)
    if not conversation or (need_answer and conversation[-1]["role"] != "assistant"):
        raise ValueError(f"{where}: the conversation must end with an assistant answer to train on")
    if system is not None and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": system})
    images = record.get("images", record.get("image")) or []
    images = [images] if isinstance(images, (str, dict, bytes)) else list(images)
    images = [resolve_image(img, base_dir, where) for img in images]
    tags = sum(t["content"].count("<image>") for t in conversation if isinstance(t["content"], str))
    if tags == 0 and images:
        first = next(i for i, t in enumerate(conversation) if t["role"] == "user")
        conversation[first] = {**conversation[first], "content": "<image>" * len(images)
                               + conversation[first]["content"]}
    elif tags != len(images):
        raise ValueError(f"{where}: the text has {tags} <image> placeholders but {len(images)} images are given")
    return Row(conversation, images, where)


def split_rows(rows, ratio, seed):
    """(train, val): a `ratio` share of the rows, chosen with the seed, held out (split_dataset_ratio)."""
    if not ratio:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(rows) * ratio)))
    if n_val >= len(rows):
        raise ValueError(f"split_dataset_ratio={ratio} leaves no training rows out of {len(rows)}")
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ----------------------------------------------------------------------------------------- encode, batch

class SFTDataset(torch.utils.data.Dataset):
    """Rows encoded on demand (images are read here, so DataLoader workers can do it) -> one sample of
    processor.encode with labels, or None when the sample is too long and must be dropped."""

    def __init__(self, rows, processor, max_length=None, truncation_strategy="delete"):
        if truncation_strategy not in ("right", "delete"):
            raise ValueError(f"truncation_strategy must be 'right' or 'delete', got {truncation_strategy!r}")
        self.rows, self.processor = rows, processor
        self.max_length, self.truncation = max_length, truncation_strategy

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.fit(self.encode(i))

    def encode(self, i, pixels=True):
        """Sample i as the processor encodes it, whatever its length; pixels=False reads image headers only."""
        row = self.rows[i]
        try:
            return self.processor.encode(row.conversation, images=row.images, return_labels=True, pixels=pixels)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise type(e)(f"{row.source}: {e}") from None

    def fit(self, sample):
        """A sample cut to max_length, or None when it must be dropped."""
        L, limit = len(sample["input_ids"]), self.max_length
        if limit is None or L <= limit:
            return sample
        vision = torch.isin(sample["input_ids"], torch.tensor(sorted(self.processor.vision_token_ids)))
        if self.truncation == "delete" or bool(vision[limit:].any()):
            return None  # cutting here would cut through an image: drop the whole sample
        sample["input_ids"], sample["labels"] = sample["input_ids"][:limit], sample["labels"][:limit]
        return sample

    def fitting_rows(self):
        """The rows that still train once cut to max_length, and what the cut does to the others: {"dropped"
        (longer, not cut), "cut" (cut, some answer left), "no_answer" (cut before the answer: left out too),
        "longest" (tokens)}. Images are read up to their headers, so this costs no pixel work."""
        kept, counts = [], {"dropped": 0, "cut": 0, "no_answer": 0, "longest": 0}
        for i, row in enumerate(self.rows):
            sample = self.encode(i, pixels=False)
            L = len(sample["input_ids"])
            counts["longest"] = max(counts["longest"], L)
            sample = self.fit(sample)
            if sample is None:
                counts["dropped"] += 1
            elif count_label_tokens(sample["labels"][None]) == 0:
                counts["no_answer"] += 1
            else:
                kept.append(row)
                counts["cut"] += L > len(sample["input_ids"])
        return kept, counts

    def collate(self, samples):
        """processor.pad (right padding) of the kept samples; "num_dropped" counts the dropped ones. A batch
        whose samples were all dropped holds only "num_dropped"."""
        kept = [s for s in samples if s is not None]
        batch = self.processor.pad(kept, padding_side="right") if kept else {}
        batch["num_dropped"] = len(samples) - len(kept)
        return batch


def count_label_tokens(labels):
    """Tokens the loss sees: labels shifted by one (token t predicts t+1), -100 excluded."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
