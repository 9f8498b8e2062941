"""Training data: the formats of ms-swift, LLaMA-Factory and trl read into conversations, then encoded and batched.

    rows = data.load_rows(["train.jsonl"])                  # [Row(conversation, images, source, videos)]
    rows = data.load_rows(["llamafactory/RLHF-V#500"])      # a hub data set, 500 rows drawn as ms-swift draws them
    rows = data.load_rows(["mllm_demo"], dataset_dir="data")  # a name in LLaMA-Factory's dataset_info.json
    dataset = data.SFTDataset(rows, processor, max_length=2048)
    batch = dataset.collate([dataset[i] for i in range(4)])  # processor.pad + how many samples were dropped

Where the records come from (files, folders, hub ids, NAME#N, dataset_info.json): minivl/records.py. Preference
pairs (DPO), prompts (GRPO) and CHORD's expert rows are read from the same records in minivl/data_rl.py.

Formats of a record:
  ms-swift messages   {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}
                      (ShareGPT keys "from"/"value" and roles human/gpt are accepted there too)
  ms-swift query      {"system": ..., "query": "<image>...", "response": ..., "history": [[q, r], ...],
                       "images": [...]}   (ms-swift's aliases: prompt / question / problem / instruction+input /
                       input for query, answer / output / completion / solution for response)
  ShareGPT            {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}], "images": [...]}
                      or ms-swift's {"conversation": [{"human": q, "assistant": r}, ...]}
  trl                 {"prompt": [messages] or "text", "completion": [messages] or "text", "images": [...]}; a
                      content list [{"type": "image"}, {"type": "text", "text": ...}] reads as "<image>..."
Each `<image>` in the text takes the next entry of `images` (or `image`), each `<video>` the next of `videos` (or
`video`), in order. With no tag of a kind at all, that kind's entries go before the first user text, videos
before images (ms-swift's _add_default_tags); any other count of tags is an error. An image is a path, a data URL
or base64 string, raw bytes, or {"bytes": ..., "path": ...} (Hugging Face datasets); a video is a file path
(decoded with PyAV), a list of frame images, or {"video": ..., "fps": ...}. Relative paths start from the
record's base_dir (the data file's folder; see records.py), then from the working directory (where ms-swift and
LLaMA-Factory look).

Too long for max_length: `truncation_strategy="delete"` (ms-swift's default) drops the sample; "right" cuts it
inside its text when every image token lies before the cut, and drops it otherwise, since cutting through image
tokens breaks the image-feature count (trl #5285). `SFTDataset.fitting_rows()` checks a whole data set before
training from the image headers alone; the dropped count also travels with each batch.

Simplified: rows are read up front (images and videos are decoded when a sample is encoded); no tool turns, no
per-message loss switches. Tests: tests/test_data.py.
"""

import base64
import binascii
import os
import random
from dataclasses import dataclass, field

import torch

from .processor import IGNORE_INDEX
from .records import load_records

QUERY_KEYS = ("query", "prompt", "question", "problem", "instruction", "input")
RESPONSE_KEYS = ("response", "answer", "output", "completion", "solution")
MESSAGE_KEYS = ("messages", "conversations", "conversation")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "bot": "assistant"}


@dataclass
class Row:
    conversation: list  # [{"role", "content"}], content text with <image> / <video> placeholders
    images: list  # one entry per <image>: path / bytes / PIL, ready for processor.load_image
    source: str  # "file.jsonl:line" for error messages
    videos: list = field(default_factory=list)  # one entry per <video>: path, frame list or {"video": ...}


# ----------------------------------------------------------------------------- records -> conversations

def _first_key(record, keys):
    return next((k for k in keys if record.get(k) is not None), None)


def content_text(content, where):
    """Message content as text: a trl / OpenAI content list becomes its text with <image> / <video> tags."""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):  # a numeric answer, e.g. "solution": 3
        return str(content)
    if not isinstance(content, list):
        raise ValueError(f"{where}: message content must be text or a list of items, got {content!r:.80}")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else "text"
        if kind == "text":
            parts.append(item if isinstance(item, str) else item.get("text") or "")
        elif kind in ("image", "video"):
            if item.get(kind) is not None or item.get("image_url") is not None:
                raise ValueError(f"{where}: a {kind} inside the message content; give it in the `{kind}s` column "
                                 f"and put a <{kind}> item or tag where it goes")
            parts.append(f"<{kind}>")
        else:
            raise ValueError(f"{where}: content item of type {kind!r}: expected 'text', 'image' or 'video'")
    return "".join(parts)


def to_turns(messages, where):
    """A message list in any of the accepted spellings -> [{"role", "content"}] with text content."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: messages must be a list, got {type(messages).__name__}")
    turns = []
    for t in messages:
        if not isinstance(t, dict):
            raise ValueError(f"{where}: each message must be an object, got {t!r:.80}")
        if "role" not in t and "from" not in t and ("human" in t or "user" in t):  # {"human": q, "assistant": r}
            turns += [{"role": "user", "content": t.get("human", t.get("user"))},
                      {"role": "assistant", "content": t.get("assistant", t.get("gpt"))}]
            continue
        role = SHAREGPT_ROLES.get(t.get("role", t.get("from")))
        if role is None:
            raise ValueError(f"{where}: a message with role {t.get('role', t.get('from'))!r}: expected system, "
                             "user / human or assistant / gpt (tool turns are not supported)")
        turns.append({"role": role, "content": t.get("content", t.get("value"))})
    for t in turns:
        if t["content"] is None:
            raise ValueError(f"{where}: a {t['role']} message has no content")
        t["content"] = content_text(t["content"], where)
    return turns


def conversation_and_keys(record, where):
    """One record -> (turns, the keys they were made of). The turns may end on a user turn (a prompt)."""
    used = {"system", "images", "image", "videos", "video"}
    message_key = _first_key(record, MESSAGE_KEYS)
    if message_key is None and isinstance(record.get("prompt"), list):
        message_key = "prompt"  # trl's conversational prompt, maybe followed by its completion
    if message_key is not None:
        turns = to_turns(record[message_key], where)
        used.add(message_key)
        if message_key == "prompt" and record.get("completion") is not None:
            completion = record["completion"]
            turns += to_turns(completion, where) if isinstance(completion, list) else \
                [{"role": "assistant", "content": completion}]
            used.add("completion")
    else:
        query_key = _first_key(record, QUERY_KEYS)
        if query_key is None:
            raise ValueError(f"{where}: a record needs 'messages', 'conversations', or 'query' and 'response' "
                             f"(got keys {sorted(record)})")
        query = record[query_key]
        if query_key == "instruction" and record.get("input"):  # alpaca: instruction, then input
            query = f"{query}\n{record['input']}"
            used.add("input")
        used |= {query_key, "history"}
        pairs = [tuple(pair) for pair in record.get("history") or []]
        turns = [{"role": role, "content": text} for q, r in pairs for role, text in (("user", q), ("assistant", r))]
        turns.append({"role": "user", "content": query})
        response_key = _first_key(record, RESPONSE_KEYS)  # kept as a column too (a trl reward may read it)
        response = record.get(response_key)
        if isinstance(response, list) and response and isinstance(response[0], dict):  # trl: [messages]
            turns = to_turns(turns, where) + to_turns(response, where)
        else:
            turns = to_turns(turns + ([{"role": "assistant", "content": response}] if response_key else []), where)
    system = record.get("system")
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return turns, used


def to_conversation(record, where):
    """One record of any supported format -> a list of {"role", "content"} turns."""
    return conversation_and_keys(record, where)[0]


def media_list(value):
    """A media column (one entry or a list, maybe missing) -> a list."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, dict, bytes)) else list(value)


def _find_file(path, base_dir):
    path = os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path)
    for candidate in [path] if os.path.isabs(path) else [os.path.join(base_dir, path), path]:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def resolve_image(image, base_dir, where):
    """A relative path becomes absolute (and must exist); data URLs and base64 become bytes."""
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
    found = _find_file(image, base_dir)
    if found:
        return found
    if len(image) > 256 and "/" not in image[:64]:  # a bare base64 string (ms-swift accepts those)
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise FileNotFoundError(f"{where}: image file not found: {os.path.join(base_dir, image)}")


def resolve_video(video, base_dir, where):
    """A video file path (made absolute; it must exist), a list of frame images, or {"video": ..., "fps": ...}."""
    if isinstance(video, dict) and "video" in video:
        return {**video, "video": resolve_video(video["video"], base_dir, where)}
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{where}: a video given as a list of frames has no frame")
        return [resolve_image(frame, base_dir, where) for frame in video]
    if not isinstance(video, str):
        raise ValueError(f"{where}: a video is a file path, a list of frames or {{'video': ..., 'fps': ...}}, got "
                         f"{type(video).__name__}")
    if video.startswith(("http://", "https://")):
        raise ValueError(f"{where}: video URLs are not fetched ({video}); download the file and give its path")
    found = _find_file(video, base_dir)
    if not found:
        raise FileNotFoundError(f"{where}: video file not found: {os.path.join(base_dir, video)}")
    return found


def place_media(turns, images, videos, where):
    """Check that the <image> / <video> tags match the media; a kind with no tag at all goes before the first
    user text, videos before images (ms-swift's _add_default_tags)."""
    for tag, items in (("<image>", images), ("<video>", videos)):
        count = sum(t["content"].count(tag) for t in turns)
        if count == 0 and items:
            first = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
            if first is None:
                raise ValueError(f"{where}: {len(items)} {tag[1:-1]}s but no user turn to put them in")
            turns[first] = {**turns[first], "content": tag * len(items) + turns[first]["content"]}
        elif count != len(items):
            raise ValueError(f"{where}: the text has {count} {tag} placeholders but {len(items)} {tag[1:-1]}s are "
                             "given")
    return turns


def record_media(record, base_dir, where, key="images"):
    """The resolved media of a record's column `key`: "images" (or "image"), "videos" (or "video"), or another
    image column such as "rejected_images"."""
    if key == "videos":
        return [resolve_video(v, base_dir, where) for v in media_list(record.get("videos", record.get("video")))]
    values = record.get("images", record.get("image")) if key == "images" else record.get(key)
    return [resolve_image(img, base_dir, where) for img in media_list(values)]


def with_system(turns, system):
    if system is not None and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return turns


def make_row(record, base_dir, where, system=None, need_answer=True):
    """An SFT row: the conversation must end with the assistant answer to train on (need_answer=False also takes
    a prompt ending on the user's turn, for minivl.chat to answer)."""
    conversation = to_conversation(record, where)
    if not conversation or (need_answer and conversation[-1]["role"] != "assistant"):
        hint = " (this is preference data: train it with train_dpo.py)" if "chosen" in record else ""
        raise ValueError(f"{where}: the conversation must end with an assistant answer to train on{hint}")
    return make_sft_row(conversation, record, base_dir, where, system)


def make_sft_row(conversation, record, base_dir, where, system=None):
    """Row of a conversation that ends with its answer, with the record's images and videos placed."""
    images, videos = record_media(record, base_dir, where), record_media(record, base_dir, where, "videos")
    conversation = place_media(with_system(conversation, system), images, videos, where)
    return Row(conversation, images, where, videos)


def load_rows(specs, system=None, need_answer=True, **source):
    """Every record of the data sets as a Row; `specs` and `source` (seed, dataset_dir, max_samples, shuffle) as
    records.load_records takes them. Problems a run would otherwise meet hours later (a missing image file, more
    or fewer <image> tags than images, an empty file) are errors here, naming the line."""
    return [make_row(record, base_dir, where, system, need_answer)
            for where, record, base_dir in load_records(specs, **source)]


def split_rows(rows, ratio, seed):
    """(train, val): a `ratio` share of the rows, chosen with the seed, held out (split_dataset_ratio); a ratio of
    1 or more is a number of rows (LLaMA-Factory's val_size)."""
    if not ratio:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = int(ratio) if ratio >= 1 else max(1, int(round(len(rows) * ratio)))
    if n_val >= len(rows):
        raise ValueError(f"split_dataset_ratio={ratio} leaves no training rows out of {len(rows)}")
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ----------------------------------------------------------------------------------------- encode, batch

class SFTDataset(torch.utils.data.Dataset):
    """Rows encoded on demand (images and videos are read here, so DataLoader workers can do it) -> one sample of
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
            return self.processor.encode(row.conversation, images=row.images, videos=row.videos,
                                         return_labels=True, pixels=pixels)
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
