"""The trainers' shared module (minivl/training.py): a LLaMA-Factory YAML translated into ms-swift's options and
trained by train_sft.py, its clear errors (unknown key, wrong stage, wrong template, engines), the DPO keys'
translation, and the step mechanics every trainer's loop stands on (micro-batch order, exact resume position,
zero-weight stand-ins under DDP, the reduction of metrics over processes).
"""

import io
import json
import sys

import pytest
import torch

import minivl
from minivl import training
from test_sft import logged, made, train_sft  # noqa: F401  (made is a fixture)


def lf_data(made):
    """A LLaMA-Factory dataset_dir beside the demo images: dataset_info.json naming a sharegpt-style file, as
    LLaMA-Factory's own mllm_demo entry does (role / content tags, an images column)."""
    folder = made["train"].parent
    rows = [json.loads(line) for line in made["small"].read_text().splitlines()]
    demo_rows = [{"messages": [{"role": "user", "content": r["query"]},
                               {"role": "assistant", "content": r["response"]}],
                  "images": r["images"]} for r in rows]
    (folder / "lf_demo.json").write_text(json.dumps(demo_rows))
    info = {"lf_demo": {"file_name": "lf_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "images": "images"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def write_yaml(path, **keys):
    pytest.importorskip("yaml")
    import yaml

    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def sft_yaml(made, out, **changes):
    """A LLaMA-Factory LoRA SFT config shaped like its examples (qwen2vl_lora_sft.yaml), on the demo."""
    keys = dict(model_name_or_path=str(made["model"]), image_max_pixels=262144, video_max_pixels=16384,
                trust_remote_code=True, stage="sft", do_train=True, finetuning_type="lora", lora_rank=4,
                lora_target="all", dataset="lf_demo", dataset_dir=str(lf_data(made)), template="qwen2_vl",
                cutoff_len=64, max_samples=24, overwrite_cache=True, preprocessing_num_workers=16,
                dataloader_num_workers=0, output_dir=str(out), logging_steps=1, save_steps=3, plot_loss=True,
                overwrite_output_dir=True, save_only_model=False, report_to="none",
                per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1.0e-2,
                max_steps=6, lr_scheduler_type="cosine", warmup_ratio=0.0, bf16=False, ddp_timeout=180000000,
                resume_from_checkpoint=None, val_size=0.25, per_device_eval_batch_size=2, eval_strategy="steps",
                disable_gradient_checkpointing=True)
    return write_yaml(out.parent / f"{out.name}.yaml", **{**keys, **changes})


# ---------------------------------------------------------------------------------- LLaMA-Factory's YAML

def test_a_llamafactory_sft_yaml_trains(made, tmp_path, capsys):
    config = sft_yaml(made, tmp_path / "out")
    model, state = train_sft.main([str(config), "lora_dropout=0.0"])  # key=value overrides, as LLaMA-Factory
    out = capsys.readouterr().out
    assert "(LLaMA-Factory) runs as: python train_sft.py --train_type lora --target_modules all-linear" in out
    assert "data: 18 train rows, 6 eval rows" in out                    # max_samples 24, val_size 0.25
    losses = logged(tmp_path / "out")
    assert state["global_step"] == 6 and losses[-1] < losses[0] * 0.8, losses
    assert logged(tmp_path / "out", "eval_loss")                        # eval_steps: logging_steps
    # the learning rate each step used: cosine from 1e-2, no warmup, over 6 steps
    assert logged(tmp_path / "out", "learning_rate") == pytest.approx(
        [1e-2 * training.lr_factor(s, 6, 0, "cosine") for s in range(6)])
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    # LLaMA-Factory's meaning and defaults: alpha = 2 x rank, no weight decay, Adam's beta2 0.999, the cutoff
    # cuts rather than drops, image_max_pixels bounds the image
    expected = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, weight_decay=0.0, adam_beta2=0.999,
                    max_length=64, truncation_strategy="right", max_pixels=262144, min_pixels=1024,
                    video_max_pixels=16384, template="qwen2_vl", dataset=["lf_demo"], split_dataset_ratio=0.25,
                    gradient_checkpointing=False, learning_rate=1e-2, eval_steps=1)
    assert {k: args[k] for k in expected} == expected
    adapter = json.loads((tmp_path / "out" / "checkpoint-6" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    if training.importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "training_loss.png").is_file()
        assert (tmp_path / "out" / "training_eval_loss.png").is_file()
    else:
        assert "--plot_loss needs matplotlib" in out


def test_yaml_mistakes_are_clear_errors(made, tmp_path, monkeypatch):
    def refused(**changes):
        with pytest.raises(SystemExit) as e:
            train_sft.main([str(sft_yaml(made, tmp_path / "out", **changes))])
        return str(e.value)

    assert "lora_rnak: not a key minivl supports (did you mean lora_rank?)" in refused(lora_rnak=8)
    assert "stage: ppo (PPO with a reward model) is not implemented" in refused(stage="ppo")
    assert "stage: dpo is run by train_dpo.py, not train_sft.py" in refused(stage="dpo")
    assert "pref_beta: a DPO key (stage: dpo, train_dpo.py)" in refused(pref_beta=0.1)
    assert "finetuning_type: freeze is not implemented" in refused(finetuning_type="freeze")
    assert "use_unsloth: minivl has no Unsloth" in refused(use_unsloth=True)
    assert "flash_attn: minivl always uses PyTorch SDPA" in refused(flash_attn="fa2")
    assert "fp16: minivl trains in bf16" in refused(fp16=True)
    problems = refused(lora_rnak=8, stage="kto")                         # every problem at once
    assert "lora_rnak" in problems and "stage: kto" in problems
    # the template is checked against the model's family before any weight loads
    assert ("template qwen3_vl does not fit" in refused(template="qwen3_vl")
            and "a qwen2_5_vl model: its template is qwen2_5_vl or qwen2_vl" in refused(template="qwen3_vl"))
    # an override that is not key=value, and a missing PyYAML
    with pytest.raises(SystemExit, match="overrides are written key=value"):
        train_sft.main([str(sft_yaml(made, tmp_path / "out")), "--learning_rate", "1e-4"])
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(SystemExit, match="needs PyYAML: pip install pyyaml"):
        train_sft.parse_args([str(tmp_path / "out.yaml")])
    assert not (tmp_path / "out").exists()                               # nothing ran, nothing written


def test_keys_left_out_take_llamafactorys_defaults(tmp_path):
    """A YAML trains as LLaMA-Factory would train it, not with ms-swift's defaults where the two differ."""
    args = train_sft.parse_args([str(write_yaml(tmp_path / "min.yaml", model_name_or_path="m", dataset="d"))])
    expected = dict(train_type="lora", target_modules=["all-linear"], lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                    learning_rate=5e-5, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                    lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, adam_beta2=0.999,
                    logging_steps=500, eval_strategy="no", max_length=2048, truncation_strategy="right",
                    dataset_dir="data", max_pixels=768 * 768, min_pixels=32 * 32, video_max_pixels=256 * 256,
                    video_maxlen=128, gradient_checkpointing=True)
    assert {k: getattr(args, k) for k in expected} == expected


def test_the_dpo_keys_translate_to_ms_swift_options(tmp_path, capsys):
    base = dict(model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", stage="dpo", finetuning_type="lora",
                dataset="rlhf_v", template="qwen2_vl", cutoff_len=2048, bf16=True)

    def options(**keys):
        return " ".join(training.from_llamafactory(write_yaml(tmp_path / "dpo.yaml", **{**base, **keys}), "dpo"))

    assert "--rlhf_type dpo --loss_type sigmoid --beta 0.1" in options(pref_beta=0.1, pref_loss="sigmoid")
    assert "--rlhf_type dpo --loss_type hinge --beta 0.2" in options(pref_beta=0.2, pref_loss="hinge")
    assert "--label_smoothing 0.1" in options(dpo_label_smoothing=0.1)
    assert "--rpo_alpha 0.5" in options(pref_ftx=0.5)                   # + 0.5 x NLL of the chosen answer
    # LLaMA-Factory's SimPO: gamma 0.5 by default, no NLL term unless pref_ftx
    assert "--rlhf_type simpo --beta 0.1 --simpo_gamma 0.5 --cpo_alpha 0.0" in options(pref_loss="simpo")
    assert "--rlhf_type orpo --beta 0.1" in options(pref_loss="orpo")
    assert "--torch_dtype bfloat16" in options() and "--max_length 2048" in options()
    for keys, message in ((dict(pref_loss="hinge", dpo_label_smoothing=0.1), "only for pref_loss sigmoid"),
                          (dict(pref_loss="kto_pair"), "pref_loss: kto_pair is not implemented"),
                          (dict(pref_loss="orpo", pref_ftx=1.0), "ORPO's loss already holds"),
                          (dict(stage="sft"), "stage: sft is run by train_sft.py, not train_dpo.py")):
        with pytest.raises(SystemExit, match=message):
            options(**keys)


# ------------------------------------------------------------------------------------- step mechanics

class Rows(torch.utils.data.Dataset):
    """Rows 0..n-1; a row in `too_long` is dropped by the collate, as SFTDataset drops a sample."""

    def __init__(self, n, too_long=()):
        self.n, self.too_long = n, set(too_long)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return None if i in self.too_long else i

    @staticmethod
    def collate(samples):
        kept = [s for s in samples if s is not None]
        return {**({"ids": torch.tensor(kept)} if kept else {}), "num_dropped": len(samples) - len(kept)}


def options(**changes):
    return train_sft.parse_args(["--model", "m", "--dataset", "d.jsonl"] + [
        str(x) for k, v in changes.items() for x in (f"--{k}", v)])


def new_state():
    return {"global_step": 0, "epoch": 0, "micro_batch": 0, "num_dropped": 0}


def test_micro_batches_cover_each_epoch_and_resume_exactly():
    proc, args = training.Process(torch.device("cpu"), torch.float32), options(seed=3)
    data = Rows(10)
    state = new_state()
    steps = training.step_batches(data, data.collate, 3, 2, proc, state, args)  # 4 micro-batches an epoch
    seen, positions = [], []
    for _ in range(5):
        seen.append([b["ids"].tolist() for b, _ in next(steps)])
        positions.append(dict(state))
    # an epoch is 2 steps of 2 micro-batches (the last of 1 row): each row once, in the seed's order
    assert [len(s) for s in seen] == [2, 2, 2, 2, 2]
    for epoch in range(2):
        ids = [i for step in seen[2 * epoch:2 * epoch + 2] for batch in step for i in batch]
        assert sorted(ids) == list(range(10))
        assert ids == torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
    assert positions[1]["epoch"] == 1 and positions[1]["micro_batch"] == 0
    # a run resumed from the position after step 3 yields what the uninterrupted run yielded next
    resumed = training.step_batches(data, data.collate, 3, 2, proc, dict(positions[2]), args)
    assert [[b["ids"].tolist() for b, _ in next(resumed)] for _ in range(2)] == seen[3:5]


def test_a_micro_batch_dropped_whole_runs_as_a_zero_weight_stand_in_under_ddp():
    args = options(seed=0)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()

    def first_step(world, too_long):
        proc = training.Process(torch.device("cpu"), torch.float32, rank=0, world=world)
        state, data = new_state(), Rows(8, too_long)
        micro = next(training.step_batches(data, data.collate, 2, 2, proc, state, args))
        return [(b["ids"].tolist(), w) for b, w in micro], state

    # one process: micro-batches of 2 rows in the seed's order; the second one dropped whole is skipped
    micro, state = first_step(1, too_long=order[2:4])
    assert micro == [(order[0:2], 1.0)] and state["num_dropped"] == 2 and state["micro_batch"] == 2
    # two processes: process 0 takes rows 0-1, then 4-5 of the order; the second dropped whole, it runs the
    # first again with weight 0, so both processes run two backward passes
    assert first_step(2, too_long=())[0] == [(order[0:2], 1.0), (order[4:6], 1.0)]
    micro, state = first_step(2, too_long=order[4:6])
    assert micro == [(order[0:2], 1.0), (order[0:2], 0.0)] and state["num_dropped"] == 2


def test_means_over_processes_and_what_is_due():
    proc = training.Process(torch.device("cpu"), torch.float32)
    assert training.reduce_means({"loss": (3.0, 2), "accuracy": (0, 0)}, proc) == {"loss": 1.5, "accuracy": None}
    assert [s for s in range(1, 11) if training.due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if training.due(s, 0, 10)] == [10]   # eval_strategy no: at the end
    assert not any(training.due(s, None, 10) for s in range(1, 11))       # save_strategy no: never
    args = options(eval_strategy="no", save_strategy="epoch", save_steps=7)
    assert training.intervals(args, 5) == (0, 5)


def test_video_settings_reach_the_processor(made):
    processor = minivl.Processor.from_pretrained(made["model"], video_settings=dict(
        max_pixels=16384, min_pixels=None, fps=1.0, max_frames=64))
    video = processor.family.video
    assert (video.max_pixels, video.fps, video.max_frames) == (16384, 1.0, 64)
    assert video.min_pixels == minivl.Processor.from_pretrained(made["model"]).family.video.min_pixels


def test_the_bar_shows_chosen_values_beside_the_loss():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = training.Progress(10, stream=screen, min_interval=0)
    bar.update(5, 1.5, {"rewards/accuracies": 0.75, "rewards/margins": None})
    assert screen.getvalue().startswith("\rstep 5/10 |##########----------| loss 1.5 | rewards/accuracies 0.75 |")
