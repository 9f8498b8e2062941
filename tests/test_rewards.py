"""Reward functions (minivl/rewards.py): the built-ins, ms-swift plugin files without ms-swift, the checked call,
and trl's handling of None in the weighted sum."""

import argparse
import math
import sys
import textwrap

import pytest
import torch

from minivl import rewards
from minivl.data_rl import PromptRow
from minivl.rewards import RewardFunctionError

PLUGIN = '''
from swift.plugin import ORM, orms

CALLS = []


class RandomReward(ORM):
    """As in the users' guide: called with the completions and the solution column."""

    def __call__(self, completions, solution, **kwargs):
        CALLS.append({"completions": list(completions), "solution": list(solution), "kwargs": sorted(kwargs),
                      "args": self.args})
        return [0.1 + 0.9 * (len(c) % 10) / 9 for c in completions]


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def shout(completions, **kwargs):
    return [float(c.isupper()) for c in completions]


orms["random_reward"] = RandomReward
orms["upper"] = shout
'''


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("completion, solution, expected", [
    ("<think>2+1</think><answer>3</answer>", "3", 1.0),
    ("<answer> 3.0 </answer>", "3", 1.0),           # numbers compare as numbers
    ("3", " 3 ", 1.0),                              # no <answer>: the whole completion
    ("<answer>6/2</answer>", "<answer>3</answer>", 1.0),   # a <answer> in the solution is unwrapped too
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>3e0</answer>", "3", 1.0),
    ("<answer>3.01</answer>", "3", 0.0),
    ("<answer>0.333</answer>", "1/3", 0.0),         # exact values: a rounded decimal is not the fraction
    ("<answer>1,2</answer>", "12", 0.0),            # not a thousands separator
    ("The answer is 3", "3", 0.0),                  # the whole completion is the answer without tags
    ("<answer>  Red.\n</answer>", "red", 1.0),      # text: whitespace, case and a final period ignored
    ("<answer>dark  red</answer>", "Dark red", 1.0),
    ("<answer>red</answer>", "blue", 0.0),
    ("<answer>three</answer>", "3", 0.0),
    ("<answer>7</answer>", 7, 1.0),                 # a numeric solution column
])
def test_accuracy(completion, solution, expected):
    assert rewards.accuracy([completion], solution=[solution]) == [expected]


def test_accuracy_without_solution():
    assert rewards.accuracy(["3", "4"], solution=["3", None]) == [1.0, None]   # a row without one is skipped
    funcs = rewards.load_reward_funcs(["accuracy"])
    with pytest.raises(RewardFunctionError, match="reward function 'accuracy' raised ValueError: .*`solution`"):
        rewards.score(funcs, ["3"])


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>line 1\nline 2</think>\n\n<answer>b\nc</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    (" <think>a</think><answer>b</answer>", 0.0),   # the whole completion: nothing before <think>
    ("<think>a</think><answer>b</answer>\n", 0.0),  # ... and nothing after </answer> (ms-swift's regex)
    ("<think>a</think>so<answer>b</answer>", 0.0),
    ("<answer>b</answer>", 0.0),
    ("<think>a</think>", 0.0),
])
def test_format(completion, expected):
    assert rewards.format_reward([completion]) == [expected]


def test_random_is_seeded():
    a = rewards.load_reward_funcs(["random"], seed=3)[0].func
    b = rewards.load_reward_funcs(["random"], seed=3)[0].func
    first = a(["x"] * 5)
    assert first == b(["x"] * 5) and all(0 <= v < 1 for v in first) and len(set(first)) == 5
    assert a(["x"] * 5) != first                                            # the generator moves on
    assert rewards.load_reward_funcs(["random"], seed=4)[0].func(["x"] * 5) != first


def test_ms_swift_plugin_loads_without_ms_swift(tmp_path):
    assert "swift" not in sys.modules
    plugin = write(tmp_path, "RandomReward.py", PLUGIN)
    args = argparse.Namespace(beta=0.001, num_generations=2)
    funcs = rewards.load_reward_funcs(["random_reward", "format", "length_reward", "upper"], plugins=[plugin],
                                      weights=[1.0, 0.5, 0.01, 2.0], args=args)
    assert [f.name for f in funcs] == ["random_reward", "format", "length_reward", "upper"]
    assert [f.weight for f in funcs] == [1.0, 0.5, 0.01, 2.0]
    assert "swift" not in sys.modules and "swift.plugin" not in sys.modules   # the stand-in is gone again
    rows = [PromptRow([{"role": "user", "content": "q"}], [], [], {"solution": "42", "level": 1}, "g:1"),
            PromptRow([{"role": "user", "content": "q"}], [], [], {"solution": "7"}, "g:2")]
    completions = ["<think>x</think><answer>42</answer>", "SEVEN"]
    per_func = rewards.score(funcs, completions, trainer_state={"global_step": 3}, **rewards.batch_columns(rows))
    module = sys.modules["minivl_plugin_RandomReward"]
    call = module.CALLS[-1]
    assert call["completions"] == completions and call["solution"] == ["42", "7"]
    assert call["kwargs"] == ["level", "trainer_state"] and call["args"] is args   # created as ms-swift creates it
    expected = torch.tensor([[0.1 + 0.9 * 5 / 9, 1.0, 35.0, 0.0], [0.1 + 0.9 * 5 / 9, 0.0, 5.0, 1.0]])
    torch.testing.assert_close(per_func, expected)
    torch.testing.assert_close(rewards.total_reward(per_func, funcs),
                               expected @ torch.tensor([1.0, 0.5, 0.01, 2.0]))


def test_installed_ms_swift_is_used(tmp_path, monkeypatch):
    """With ms-swift installed, the plugin gets its own ORM and orms; its own built-ins are not picked up."""
    package = tmp_path / "site" / "swift"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(textwrap.dedent('''
        class ORM:
            def __init__(self, args=None, **kwargs):
                self.args = args
        orms = {"cosine": ORM}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("swift", "swift.plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    plugin = write(tmp_path, "p.py", PLUGIN)
    try:
        func = rewards.load_reward_funcs(["random_reward"], plugins=[plugin])[0].func
        assert type(func).__mro__[1] is sys.modules["swift.plugin"].ORM
        assert sys.modules["swift.plugin"].ORM is not rewards.ORM
        with pytest.raises(ValueError, match="unknown reward function 'cosine'"):
            rewards.load_reward_funcs(["cosine"], plugins=[plugin])
    finally:
        for name in ("swift", "swift.plugin"):
            sys.modules.pop(name, None)


def test_plugin_classes_of_ms_swift_3(tmp_path):
    """ms-swift 3.x created a registered class with the trainer options its constructor names."""
    plugin = write(tmp_path, "v3.py", '''
        from swift.plugin import ORM, orms

        class Cosine(ORM):
            def __init__(self, cosine_max_len, tokenizer=None):
                self.max_len = cosine_max_len

            def __call__(self, completions, **kwargs):
                return [min(1.0, len(c) / self.max_len) for c in completions]

        orms["cosine"] = Cosine
    ''')
    func = rewards.load_reward_funcs(["cosine"], [plugin], args=argparse.Namespace(cosine_max_len=4))[0]
    assert rewards.score([func], ["ab", "abcdef"]).tolist() == [[0.5], [1.0]]
    with pytest.raises(RewardFunctionError, match=r"reward function 'cosine': creating Cosine\(\) failed: "
                                                  r"TypeError"):
        rewards.load_reward_funcs(["cosine"], [plugin], args=argparse.Namespace())


def test_none_is_skipped_as_trl_does():
    funcs = [rewards.RewardFunc("a", lambda c, **k: [1.0, None, None, 0.5], 2.0),
             rewards.RewardFunc("b", lambda c, **k: [3.0, 4.0, None, None], 1.0)]
    per_func = rewards.score(funcs, ["w", "x", "y", "z"])
    assert per_func[:, 0].isnan().tolist() == [False, True, True, False]
    total = rewards.total_reward(per_func, funcs)
    assert total[[0, 1, 3]].tolist() == [5.0, 4.0, 1.0] and math.isnan(total[2])   # nobody scored "y"


@pytest.mark.parametrize("output, message", [
    ([1.0], r"reward function 'bad' returned 1 rewards for 2 completions"),
    ([1.0, float("nan")], r"reward function 'bad' returned nan for completion 1: rewards must be finite"),
    ([1.0, float("inf")], r"reward function 'bad' returned inf for completion 1"),
    ([1.0, "0.5"], r"reward function 'bad' returned '0.5' for completion 1: expected a number"),
    ([1.0, [0.5]], r"reward function 'bad' returned \[0.5\] for completion 1: expected a number"),
    (0.5, r"reward function 'bad' returned a float: expected a list of 2 numbers"),
])
def test_bad_outputs_name_the_function(output, message):
    funcs = [rewards.RewardFunc("fine", lambda c, **k: [0.0, 1.0]), rewards.RewardFunc("bad", lambda c, **k: output)]
    with pytest.raises(RewardFunctionError, match=message):
        rewards.score(funcs, ["x", "y"])


def test_outputs_that_are_fine():
    funcs = [rewards.RewardFunc("t", lambda c, **k: torch.tensor([1, 0])),
             rewards.RewardFunc("b", lambda c, **k: (True, False))]
    assert rewards.score(funcs, ["x", "y"]).tolist() == [[1.0, 1.0], [0.0, 0.0]]

    async def remote(completions, **kwargs):                       # ms-swift's AsyncORM style
        return [0.25 for _ in completions]
    assert rewards.score([rewards.RewardFunc("r", remote)], ["x"]).tolist() == [[0.25]]


def test_a_raising_function_is_named(tmp_path):
    plugin = write(tmp_path, "boom.py", '''
        def boom(completions, solution, **kwargs):
            raise KeyError("the judge is down")
    ''')
    funcs = rewards.load_reward_funcs(["format", "boom"], [plugin])
    with pytest.raises(RewardFunctionError, match=r"reward function 'boom' raised KeyError: 'the judge is down'"):
        rewards.score(funcs, ["x"], solution=["y"])


def test_loading_errors(tmp_path):
    plugin = write(tmp_path, "plugin.py", PLUGIN)
    with pytest.raises(ValueError, match=r"unknown reward function 'random_rewards'; did you mean 'random_reward'"):
        rewards.load_reward_funcs(["random_rewards"], [plugin])
    with pytest.raises(ValueError, match=r"--reward_weights gives 1 weights for 2 reward functions"):
        rewards.load_reward_funcs(["format", "random"], weights=[1.0])
    with pytest.raises(ValueError, match="no reward function: name them with --reward_funcs"):
        rewards.load_reward_funcs([])
    with pytest.raises(FileNotFoundError, match=r"--external_plugins: .*missing\.py not found"):
        rewards.load_reward_funcs(["format"], [tmp_path / "missing.py"])
    other = write(tmp_path, "needs_more.py", "from swift.llm import InferRequest\n")
    with pytest.raises(RewardFunctionError, match=r"loading the reward plugin .*needs_more\.py failed: "
                                                  r"ModuleNotFoundError.*only ORM and orms"):
        rewards.load_reward_funcs(["format"], [other])
    assert "swift" not in sys.modules


def test_plugin_names_win_over_builtins(tmp_path):
    plugin = write(tmp_path, "acc.py", '''
        def accuracy(completions, **kwargs):
            return [0.5 for _ in completions]
    ''')
    assert rewards.score(rewards.load_reward_funcs(["accuracy"], [plugin]), ["x"]).tolist() == [[0.5]]


def test_batch_columns_fill_missing_with_none():
    rows = [PromptRow([], [], [], {"solution": "1"}, "a"), PromptRow([], [], [], {"hint": "h"}, "b")]
    assert rewards.batch_columns(rows) == {"solution": ["1", None], "hint": [None, "h"]}
