"""`python -m minivl.chat` (one answer, a data set, a LoRA checkpoint on its base from any directory), the
adapter's base path, and minivl.generate stopping at the checkpoint's eos ids by default."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minivl
from minivl import chat, data, export, lora
from test_sft import ROOT, made, run  # noqa: F401  (made is a fixture)

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def adapter(made):
    """A LoRA checkpoint trained with --model given relative to the working directory, as users write it."""
    here = os.getcwd()
    os.chdir(made["model"].parent.parent)
    try:
        relative = os.path.relpath(made["model"])
        run(made, made["root"] / "lora_out", "--model", relative, "--train_type", "lora", "--max_steps", 4,
            "--learning_rate", 1e-2, "--lora_dropout", 0)
    finally:
        os.chdir(here)
    return made["root"] / "lora_out" / "checkpoint-4"


def expected_answer(made, adapter, conversation, images, max_new_tokens):
    """The greedy answer of the unmerged adapter model, through minivl.generate directly."""
    model = minivl.load(made["model"])
    lora.load_adapter(model, adapter)
    processor = minivl.Processor.from_pretrained(made["model"])
    batch = processor([conversation], images=[images], add_generation_prompt=True)
    out = minivl.generate(model, batch, max_new_tokens=max_new_tokens, temperature=0.0,
                          eos_token_id=processor.eos_token_ids)
    eos = processor.eos_token_ids
    return processor.decode([t for t in out.tokens[0, : int(out.lengths[0])].tolist() if t not in eos]).strip()


def test_the_adapter_finds_its_base_from_any_directory(made, adapter, tmp_path, monkeypatch):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(made["model"].resolve())   # not the relative path given
    monkeypatch.chdir(tmp_path)
    out, diff = export.merge_checkpoint(adapter, tmp_path / "merged")
    assert diff < 1e-4 and (out / "model.safetensors").is_file()
    # a base that moved away: the error names where it looked and what to pass
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/model"}))
    with pytest.raises(FileNotFoundError, match=r"not a checkpoint directory \(looked for /gone/model\) \(the base model that "
                                                r".*moved/adapter_config.json names; pass --model"):
        export.merge_checkpoint(moved, tmp_path / "merged2")
    assert export.merge_checkpoint(moved, tmp_path / "merged3", model=made["model"])[1] < 1e-4


def test_chat_answers_with_an_adapter_from_any_directory(made, adapter, tmp_path):
    image = sorted(made["images"].iterdir())[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINIVL_KERNELS": "reference"}
    question = [{"role": "user", "content": "<image>" + QUESTION}]
    expected = expected_answer(made, adapter, question, [str(image)], 32)
    for base, tokens in ((["--model", str(made["model"])], "--max_new_tokens"), ([], "--max-new-tokens")):
        done = subprocess.run([sys.executable, "-m", "minivl.chat", *base, "--adapters", str(adapter), "--image",
                               str(image), "--prompt", QUESTION, tokens, "32"], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == expected and expected
        assert "tokens/s" in done.stderr                               # the speed line goes to stderr


def test_val_dataset_answers_every_row(made, adapter, tmp_path, capsys):
    result = tmp_path / "answers.jsonl"
    lines = chat.main(["--adapters", str(adapter), "--val_dataset", str(made["val"]), "--max_batch_size", "3",
                       "--max_new_tokens", "8", "--result_path", str(result)])
    rows = data.load_rows(made["val"])
    assert [json.loads(line) for line in result.read_text().splitlines()] == lines and len(lines) == len(rows)
    for row, line in zip(rows, lines):
        assert line["labels"] == row.conversation[-1]["content"]           # the row's own answer
        assert line["messages"] == row.conversation[:-1] and line["images"] == row.images
        assert line["response"] == expected_answer(made, adapter, row.conversation[:-1], row.images, 8)
    hits = sum(line["response"] == line["labels"] for line in lines)
    assert f"{hits} of {len(rows)} responses equal their labels" in capsys.readouterr().out
    # rows without an answer are answered too, with labels None; the default place is beside the adapter
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"query": "<image>" + QUESTION, "images": [str(rows[0].images[0])]}) + "\n")
    (line,) = chat.main(["--adapters", str(adapter), "--val_dataset", str(prompts), "--max_new_tokens", "8"])
    assert line["labels"] is None and line["response"] == lines[0]["response"]
    assert len(list((adapter / "infer_result").glob("*.jsonl"))) == 1


def test_a_typed_conversation_keeps_its_history(made, adapter, monkeypatch, capsys):
    typed = iter([QUESTION, "And again?", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    seen = []
    answer = chat.answer
    monkeypatch.setattr(chat, "answer", lambda model, processor, conversations, **kw: (
        seen.append(list(conversations[0])), answer(model, processor, conversations, **kw))[1])
    image = str(sorted(made["images"].iterdir())[0])
    chat.main(["--adapters", str(adapter), "--image", image, "--max_new_tokens", "8"])
    first, second = seen
    assert first[0]["content"][0] == {"type": "image", "image": image} and len(second) == 3
    assert second[1]["content"] == capsys.readouterr().out.splitlines()[0].strip()   # the printed answer, kept


def test_generate_stops_at_the_checkpoint_eos_by_default(made, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(made["model"], directory)
    model = minivl.load(directory)
    processor = minivl.Processor.from_pretrained(directory)
    image = sorted(made["images"].iterdir())[0]
    batch = processor([{"role": "user", "content": "<image>" + QUESTION}], images=[image],
                      add_generation_prompt=True)
    free = minivl.generate(model, batch, max_new_tokens=6, temperature=0.0, eos_token_id=[]).tokens[0].tolist()
    stop = free[2]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop], "pad_token_id": 0}))
    model = minivl.load(directory)
    assert model.eos_token_ids == [stop]
    out = minivl.generate(model, batch, max_new_tokens=6, temperature=0.0)
    assert int(out.lengths[0]) == free.index(stop) + 1 and not bool(out.truncated[0])
    # no generation_config.json: config.json's eos_token_id, as transformers falls back to it
    (directory / "generation_config.json").unlink()
    raw = json.loads((directory / "config.json").read_text())
    eos = raw.get("eos_token_id", raw.get("text_config", {}).get("eos_token_id"))
    assert minivl.load(directory).eos_token_ids == [eos] and eos is not None
    built = minivl.VLModel(model.cfg)                                   # not from a checkpoint: no default stop
    built.load_state_dict(model.state_dict())
    assert built.eos_token_ids is None
    assert int(minivl.generate(built, batch, max_new_tokens=6, temperature=0.0).lengths[0]) == 6


def test_the_generate_module_is_gone():
    # the command line is minivl.chat: nothing shadows the function minivl.generate any more
    assert not (Path(minivl.__file__).parent / "generate.py").exists() and callable(minivl.generate)
    assert (Path(minivl.__file__).parent / "chat.py").is_file()
