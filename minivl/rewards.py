"""Reward functions for GRPO: the built-ins, ms-swift reward plugins, and one checked call over a batch.

    funcs = rewards.load_reward_funcs(["accuracy", "format"], plugins=["plugin.py"], weights=[1.0, 0.5], args=args)
    per_func = rewards.score(funcs, completions, **rewards.batch_columns(rows))   # (N, F) float32, NaN = None
    reward = rewards.total_reward(per_func, funcs)                                  # (N,)

A reward function is called as ms-swift calls it: `f(completions, **kwargs)`, the completions as strings and, by
name, the data set's other columns (`solution`, ...) with one entry per completion, plus what the trainer passes
(e.g. `trainer_state`); it returns one number per completion, or None to skip that completion. As in trl, a None
counts as NaN: the weighted sum leaves that function out for that completion, and a completion no function scored
has a NaN reward (the trainer gives it no advantage). A function that raises, returns the wrong length, a value
that is not a number, a NaN or an infinity stops the run with its name in the message (RewardFunctionError).

Built-ins (`--reward_funcs`):
  accuracy  the <answer>...</answer> content of the completion if present, else the whole completion, against the
            `solution` column (a <answer> in it is unwrapped too). Two numbers compare by exact value: "3" = "3.0"
            = " 3 " = "6/2" = "3e0", "1,000" = "1000". Anything else compares as text after collapsing whitespace,
            ignoring case and a final period. 1.0 or 0.0; None where the row has no solution. (ms-swift and trl
            compare with math_verify, which also reads LaTeX; minivl does not depend on it.)
  format    1.0 when the whole completion is <think>...</think>, optional whitespace, <answer>...</answer> and
            nothing after (ms-swift's Format regex), else 0.0
  random    uniform in [0, 1) from a generator seeded once (checks the plumbing)

`--external_plugins file.py`: a plugin written for ms-swift loads unchanged. It does `from swift.plugin import ORM,
orms`, defines a class deriving from ORM and registers it with `orms['name'] = Class`; `--reward_funcs name` then
creates it as ms-swift does (`Class(args=args)`, or constructor parameters named like trainer options get their
values, the 3.x convention) and calls it. When ms-swift is installed, its own swift.plugin (or swift.rewards) is
used; otherwise minivl puts a stand-in holding only ORM and orms in sys.modules while the plugin files load. A plain
function `f(completions, **kwargs)` works too: registered in `orms` under a name, or found by its own name among the
functions the plugin file defines. A name a plugin defines wins over a built-in of that name.

Metric names use the `--reward_funcs` name (ms-swift logs the class name instead). Tests: tests/test_rewards.py.
"""

import asyncio
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import math
import random
import re
import sys
import types
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)
THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something unusable: the run stops with its name."""


@dataclass
class RewardFunc:
    name: str  # the --reward_funcs name, used in metrics (rewards/<name>/mean)
    func: object  # called as func(completions, **kwargs) -> one number (or None) per completion
    weight: float = 1.0


# ------------------------------------------------------------------------------------------------ built-ins

def _text(completion):
    """A completion as text: trl's conversational form [{"role": "assistant", "content": ...}] gives its content."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def extract_answer(text):
    """The content of the first <answer>...</answer>, else the whole text, stripped (ms-swift's accuracy)."""
    match = ANSWER.search(text)
    return (match.group(1) if match else text).strip()


def as_number(text):
    """The exact value of a number written as an integer, decimal, fraction or with thousands commas; else None."""
    text = text.strip()
    if THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def normal_text(text):
    return " ".join(text.split()).casefold().removesuffix(".")


def answers_match(answer, solution):
    a, b = as_number(answer), as_number(solution)
    if a is not None and b is not None:
        return a == b
    return normal_text(answer) == normal_text(solution)


def accuracy(completions, solution=None, **kwargs):
    if solution is None:
        raise ValueError("the accuracy reward compares with a `solution` column, and the data set has none")
    return [None if sol is None else float(answers_match(extract_answer(_text(c)), extract_answer(str(sol))))
            for c, sol in zip(completions, solution)]


def format_reward(completions, **kwargs):
    return [1.0 if FORMAT.match(_text(c)) else 0.0 for c in completions]


def random_reward(seed):
    """The `random` built-in: uniform rewards from its own generator, so a seeded run repeats them."""
    rng = random.Random(seed)

    def random_reward(completions, **kwargs):
        return [rng.random() for _ in completions]
    return random_reward


def builtin_rewards(seed=0):
    return {"accuracy": accuracy, "format": format_reward, "random": random_reward(seed)}


# ------------------------------------------------------------------------------------------- plugin files

class ORM:
    """Stand-in for ms-swift's reward base class (swift.plugin.ORM), used only when ms-swift is not installed:
    ms-swift creates a registered class with the trainer's arguments and calls it with the completions and the
    data set's columns."""

    def __init__(self, args=None, **kwargs):
        self.args = args

    def __call__(self, completions, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define __call__(self, completions, **kwargs)")


def _installed_swift_plugin():
    for name in ("swift.plugin", "swift.rewards"):  # ms-swift 3.x, then 4.x
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


@contextlib.contextmanager
def swift_plugin_module():
    """ms-swift's own swift.plugin when it is installed; else a stand-in module holding ORM and an empty `orms`,
    in sys.modules (as swift.plugin and swift.rewards) only while the plugin files load."""
    installed = _installed_swift_plugin()
    if installed is not None:
        yield installed
        return
    stand_in = types.ModuleType("swift.plugin")
    stand_in.ORM, stand_in.orms = ORM, {}
    names = {"swift.plugin": stand_in, "swift.rewards": stand_in}
    if "swift" not in sys.modules:
        names["swift"] = types.ModuleType("swift")
        names["swift"].__path__, names["swift"].plugin, names["swift"].rewards = [], stand_in, stand_in
    sys.modules.update(names)
    try:
        yield stand_in
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _import_file(path, swift_installed):
    """Execute a plugin file as a module (its folder goes on sys.path, as ms-swift's import_external_file does,
    so helpers beside it import)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--external_plugins: {path} not found")
    name = f"minivl_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        hint = "" if swift_installed or not isinstance(e, ImportError) else \
            " (ms-swift is not installed: minivl provides only ORM and orms of swift.plugin)"
        raise RewardFunctionError(f"loading the reward plugin {path} failed: {type(e).__name__}: {e}{hint}") from e
    return module


def load_plugins(paths):
    """name -> reward function or ORM class, from the plugin files: the entries they register in `orms`, and the
    functions they define (by function name; a registered name wins)."""
    found, registered = {}, {}
    with swift_plugin_module() as plugin_module:
        swift_installed = plugin_module.ORM is not ORM
        before = dict(plugin_module.orms)
        for path in paths or []:
            module = _import_file(path, swift_installed)
            found.update({n: f for n, f in vars(module).items()
                          if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_")})
        registered = {n: v for n, v in plugin_module.orms.items() if before.get(n) is not v}
    return {**found, **registered}


def _instantiate(cls, name, args):
    """ms-swift's creation of a registered class: `args=args` (3.5 and later), and constructor parameters named
    like trainer options get those options (3.x)."""
    params = inspect.signature(cls).parameters
    kwargs = {"args": args} if "args" in params else {}
    for p in params.values():
        if p.name != "args" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and hasattr(args, p.name):
            kwargs[p.name] = getattr(args, p.name)
    try:
        return cls(**kwargs)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name!r}: creating {cls.__name__}({', '.join(kwargs)}) "
                                  f"failed: {type(e).__name__}: {e}") from e


def load_reward_funcs(names, plugins=(), weights=None, args=None, seed=0):
    """The reward functions `names` (--reward_funcs) from the built-ins and the plugin files (--external_plugins),
    each with its weight (--reward_weights; default 1 each). args: the trainer's options, for plugin classes."""
    names = list(names or [])
    if not names:
        raise ValueError("no reward function: name them with --reward_funcs (built-ins: accuracy, format, random; "
                         "or the functions of --external_plugins files)")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights gives {len(weights)} weights for {len(names)} reward functions "
                         f"{names}")
    available = {**builtin_rewards(seed), **load_plugins(plugins)}
    funcs = []
    for name, weight in zip(names, weights):
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown reward function {name!r}{hint} (built-ins: accuracy, format, random; from "
                             f"the plugin files: {sorted(set(available) - {'accuracy', 'format', 'random'})})")
        func = available[name]
        func = _instantiate(func, name, args) if inspect.isclass(func) else func
        if not callable(func):
            raise ValueError(f"reward function {name!r} is a {type(func).__name__}, not something to call")
        funcs.append(RewardFunc(name, func, weight))
    return funcs


# ------------------------------------------------------------------------------------------ calling them

def batch_columns(rows):
    """The data set columns of a batch of PromptRows (one row per completion), by name: a row without a column
    gives None there (ms-swift's rows_to_batched)."""
    names = list(dict.fromkeys(k for row in rows for k in row.columns))
    return {k: [row.columns.get(k) for row in rows] for k in names}


def _checked(values, n, name):
    if hasattr(values, "tolist"):  # a tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__}: expected a list "
                                  f"of {n} numbers")
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} rewards for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)  # trl and ms-swift: None skips this function for this completion
            continue
        try:
            x = float(v) if not isinstance(v, (str, bytes)) else None
        except (TypeError, ValueError):
            x = None
        if x is None:
            raise RewardFunctionError(f"reward function {name!r} returned {v!r:.60} for completion {i}: expected a "
                                      "number (or None to skip it)")
        if not math.isfinite(x):
            raise RewardFunctionError(f"reward function {name!r} returned {v!r:.60} for completion {i}: rewards "
                                      "must be finite numbers (None skips a completion)")
        out.append(x)
    return out


def score(funcs, completions, **kwargs):
    """(N, F) float32 rewards of each function for each completion, NaN where a function returned None. kwargs go
    to every function: the columns (one entry per completion) and whatever else the trainer passes."""
    n = len(completions)
    out = torch.empty(n, len(funcs), dtype=torch.float32)
    for j, f in enumerate(funcs):
        try:
            values = f.func(completions, **kwargs)
            if inspect.isawaitable(values):  # an async reward function (ms-swift's AsyncORM)
                values = asyncio.run(values)
        except Exception as e:
            raise RewardFunctionError(f"reward function {f.name!r} raised {type(e).__name__}: {e}") from e
        out[:, j] = torch.tensor(_checked(values, n, f.name), dtype=torch.float32)
    return out


def total_reward(per_func, funcs):
    """trl's sum: each function's reward times its weight, summed over the functions that scored the completion;
    NaN where none did."""
    weights = torch.tensor([f.weight for f in funcs], dtype=per_func.dtype)
    total = (per_func * weights).nansum(dim=1)
    total[per_func.isnan().all(dim=1)] = math.nan
    return total


def score_rows(funcs, rows, completions, **kwargs):
    """(N, F) rewards (score) and (N,) their weighted sum (total_reward) of completions of data rows, one row per
    completion: the rows' columns go to the functions by name, with kwargs (trainer_state, ...)."""
    per_func = score(funcs, completions, **batch_columns(rows), **kwargs)
    return per_func, total_reward(per_func, funcs)


def nanstd(x):
    """The Bessel-corrected std of the values that are not NaN (0 for fewer than two), as a float."""
    x = x[~x.isnan()]
    return float(x.std()) if len(x) > 1 else 0.0


def reward_metrics(per_func, total, funcs, group):
    """trl's reward metrics of completions in groups of `group` answers to one prompt: reward (the mean weighted
    sum), reward_std (the mean of the groups' stds), frac_reward_zero_std (the share of groups whose rewards are all
    alike: no signal), rewards/<name>/mean and /std."""
    group_std = torch.tensor([nanstd(g) for g in total.view(-1, group)])
    metrics = {"reward": float(total.nanmean()), "reward_std": float(group_std.mean()),
               "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros(())).float().mean())}
    for j, f in enumerate(funcs):
        metrics[f"rewards/{f.name}/mean"], metrics[f"rewards/{f.name}/std"] = (float(per_func[:, j].nanmean()),
                                                                             nanstd(per_func[:, j]))
    return metrics
