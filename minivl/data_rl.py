"""Data for preference tuning and RL: preference pairs (DPO), prompts (GRPO) and CHORD's expert rows, read from the
records of minivl/records.py (files, folders, hub ids, NAME#N, dataset_info.json) in the formats users bring.

    pairs = data_rl.load_preference_rows(["rlhf_v"], dataset_dir="data")   # [PreferenceRow]
    prompts = data_rl.load_prompt_rows(["train_grpo.jsonl"])                # [PromptRow]
    expert = data_rl.load_expert_rows(["expert.jsonl"])                     # [data.Row], for data.SFTDataset

Preference pairs, one record each:
  LLaMA-Factory   {"conversations": [... ending on a human turn], "chosen": {"from": "gpt", "value": ...},
                   "rejected": {...}, "images": [...]}   (chosen / rejected may be plain strings; a dataset_info.json
                   entry renames the columns and tags)
  trl             {"prompt": "text" or [messages], "chosen": "text" or [messages], "rejected": ..., "images": [...]}
                  (or "image"); without "prompt", the common first turns of chosen and rejected are the prompt
  ms-swift        {"messages": [... ending with the chosen answer], "rejected_response": "text" or [messages],
                   "images": [...], "rejected_images": [...]}, or "rejected_messages" (a whole conversation with the
                   same prompt); rejected_images alone gives a pair of one answer with two image sets
An empty chosen or rejected answer, identical answers on the same images, and a missing image are errors naming
the row.

Prompts (GRPO): any SFT format (minivl/data.py), or trl's {"prompt": ...}. A trailing assistant turn is not part of
the prompt: ms-swift drops it ("use extra columns to keep it"); here it becomes the `solution` column when the row
has none, since ms-swift's query format reads `solution` as the response, so either spelling reaches a reward
function as `solution`. Every other column (`solution`, ...) is kept by name for the reward functions.

CHORD's expert rows: SFT rows (ending with the assistant answer), or GRPO rows whose `solution` is the answer.
Tests: tests/test_data_rl.py.
"""

from dataclasses import dataclass

from .data import (MESSAGE_KEYS, content_text, conversation_and_keys, make_sft_row, place_media, record_media,
                   to_turns, with_system)
from .records import load_records

ASSISTANT_ROLES = ("assistant", "gpt", "bot")


@dataclass
class PreferenceRow:
    prompt: list  # [{"role", "content"}] ending on the user turn; <image> / <video> tags placed
    chosen: str  # the preferred assistant answer
    rejected: str  # the other answer
    images: list  # the images of the prompt's <image> tags (of the chosen side when rejected_images is set)
    videos: list
    source: str  # "file.jsonl:line" for error messages
    rejected_images: list | None = None  # the rejected side's images when they differ (ms-swift's rejected_images)

    @property
    def chosen_conversation(self):
        return self.prompt + [{"role": "assistant", "content": self.chosen}]

    @property
    def rejected_conversation(self):
        return self.prompt + [{"role": "assistant", "content": self.rejected}]


@dataclass
class PromptRow:
    prompt: list  # [{"role", "content"}] ending on the user turn; <image> / <video> tags placed
    images: list
    videos: list
    columns: dict  # every other column of the record by name (solution, ...), passed to the reward functions
    source: str


# ------------------------------------------------------------------------------------------ preference pairs

def answer_text(value, where, name):
    """One answer: a string, a {"from"/"role", "value"/"content"} message, or a list holding one assistant
    message."""
    if isinstance(value, list):
        turns = to_turns(value, where)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise ValueError(f"{where}: {name} must be one assistant answer, got roles {[t['role'] for t in turns]}")
        return turns[0]["content"]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if role not in ASSISTANT_ROLES:
            raise ValueError(f"{where}: {name} comes from {role!r}, not the assistant")
        value = value.get("content", value.get("value"))
    if value is None:
        raise ValueError(f"{where}: the {name} answer is missing")
    return content_text(value, where)


def _prompt_and_answers(record, where):
    """(prompt turns, chosen, rejected, rejected image column or None) of the three formats."""
    if any(k in record for k in ("rejected_response", "rejected_messages", "rejected_images")):  # ms-swift
        turns = conversation_and_keys(record, where)[0]
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError(f"{where}: ms-swift preference data: `messages` must end with the chosen answer")
        prompt, chosen, rejected = turns[:-1], turns[-1]["content"], turns[-1]["content"]
        if record.get("rejected_messages") is not None:
            other = to_turns(record["rejected_messages"], where)
            if not other or other[-1]["role"] != "assistant" or \
                    [t for t in other[:-1] if t["role"] != "system"] != [t for t in prompt if t["role"] != "system"]:
                raise ValueError(f"{where}: rejected_messages must be the prompt of `messages` followed by the "
                                 "rejected answer")
            rejected = other[-1]["content"]
        elif record.get("rejected_response") is not None:
            rejected = answer_text(record["rejected_response"], where, "rejected_response")
        return prompt, chosen, rejected, "rejected_images" if record.get("rejected_images") else None
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' (LLaMA-Factory, trl) or "
                         f"'messages' and 'rejected_response' (ms-swift); got keys {sorted(record)}")
    has_prompt = any(record.get(k) is not None for k in MESSAGE_KEYS + ("prompt", "query", "question"))
    if not has_prompt and isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        chosen, rejected = to_turns(record["chosen"], where), to_turns(record["rejected"], where)
        n = 0  # trl's implicit prompt: the turns both conversations share
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:], None
    prompt = conversation_and_keys({k: v for k, v in record.items() if k not in ("chosen", "rejected")}, where)[0]
    return prompt, record["chosen"], record["rejected"], None


def make_preference_row(record, base_dir, where, system=None):
    prompt, chosen, rejected, rejected_key = _prompt_and_answers(record, where)
    chosen, rejected = answer_text(chosen, where, "chosen"), answer_text(rejected, where, "rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt of a preference pair must end with a user turn")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise ValueError(f"{where}: the {name} answer is empty")
        if "<image>" in answer or "<video>" in answer:
            raise ValueError(f"{where}: the {name} answer holds an <image> / <video> tag; media go in the prompt")
    images, videos = record_media(record, base_dir, where), record_media(record, base_dir, where, "videos")
    rejected_images = record_media(record, base_dir, where, rejected_key) if rejected_key else None
    if rejected_images is not None and len(rejected_images) != len(images):
        raise ValueError(f"{where}: {len(rejected_images)} rejected_images for {len(images)} images: the rejected "
                         "side puts its images at the same tags")
    if rejected_images == images:
        rejected_images = None
    if chosen == rejected and rejected_images is None:
        raise ValueError(f"{where}: the chosen and rejected answers are the same (and so are the images)")
    prompt = place_media(with_system(prompt, system), images, videos, where)
    return PreferenceRow(prompt, chosen, rejected, images, videos, where, rejected_images)


def load_preference_rows(specs, system=None, **source):
    """Every record of the data sets (records.load_records) as a PreferenceRow."""
    return [make_preference_row(record, base_dir, where, system)
            for where, record, base_dir in load_records(specs, **source)]


# ------------------------------------------------------------------------------------------------- prompts

def make_prompt_row(record, base_dir, where, system=None):
    turns, used = conversation_and_keys(record, where)
    columns = {k: v for k, v in record.items() if k not in used}
    if turns and turns[-1]["role"] == "assistant":
        columns.setdefault("solution", turns.pop()["content"])
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"{where}: a prompt must end with a user turn")
    images, videos = record_media(record, base_dir, where), record_media(record, base_dir, where, "videos")
    return PromptRow(place_media(with_system(turns, system), images, videos, where), images, videos, columns, where)


def load_prompt_rows(specs, system=None, **source):
    """Every record of the data sets (records.load_records) as a PromptRow."""
    return [make_prompt_row(record, base_dir, where, system)
            for where, record, base_dir in load_records(specs, **source)]


# ------------------------------------------------------------------------------------------ CHORD's experts

def make_expert_row(record, base_dir, where, system=None):
    """An SFT Row: the conversation's own answer, else (a GRPO row) the `solution` as the answer."""
    turns = conversation_and_keys(record, where)[0]
    if not turns or turns[-1]["role"] != "assistant":
        solution = record.get("solution")
        if solution is None or not content_text(solution, where).strip():
            raise ValueError(f"{where}: an expert row needs an assistant answer (SFT format) or a `solution` "
                             "(GRPO format)")
        turns.append({"role": "assistant", "content": content_text(solution, where)})
    return make_sft_row(turns, record, base_dir, where, system)


def load_expert_rows(specs, system=None, **source):
    """Every record of the data sets (records.load_records) as an SFT Row for CHORD's expert loss."""
    return [make_expert_row(record, base_dir, where, system)
            for where, record, base_dir in load_records(specs, **source)]
