"""Reward functions of RL with verifiable rewards: plain Python callables, named in the config.

  reward(prompts, completions, **columns) -> list of floats (one per completion; None = not scorable)

`prompts` and `completions` are lists of strings (a chat prompt: its last user message); `columns` holds, per
completion, every column of the prompt's data row and `reference` (the row's answer as training formats it:
`ftjax.data.prompt_and_answer`). `align.rewards` names them as 'module:function' (imported) or by a built-in
name below; `align.reward_weights` weighs them (the reward is the weighted sum; TRL's `reward_funcs` and
`reward_weights`). A reward that raises, returns the wrong number of values or a non-number is one ConfigError
naming the function.

Built-ins:
  final_number   1.0 when the last number of the completion equals the last number of the reference (GSM8K's
                 '#### 42' or a bare number), else 0.0
  json_fields    the share of the reference JSON object's fields that the first JSON object in the completion has
                 with the same value (prose or code fences around it allowed); 0.0 without one
  json_exact     1.0 when the completion's JSON object equals the reference's (`eval.scorer='json'`), else 0.0
  json_format    1.0 when the whole completion is one JSON object (any keys), else 0.0
  answer_format  1.0 when the completion ends with a line '#### <number>' (GSM8K's answer format), else 0.0
"""
import importlib
import json
import math
import re
from typing import Callable, List, Sequence

from ftjax.errors import ConfigError
from ftjax.eval import scores


def _parse_object(text):
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _first_object(text):
    """The first JSON object in `text` (at any '{' from which one parses), or None."""
    decoder = json.JSONDecoder()
    at = text.find('{')
    while at >= 0:
        try:
            value, _ = decoder.raw_decode(text, at)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        at = text.find('{', at + 1)
    return None


def final_number(prompts, completions, reference, **_):
    out = []
    for c, r in zip(completions, reference):
        got, want = scores.last_number(c), scores.last_number(str(r))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return out


def json_fields(prompts, completions, reference, **_):
    out = []
    for c, r in zip(completions, reference):
        got, want = _first_object(c), _parse_object(str(r))
        out.append(0.0 if got is None or not want else sum(got.get(k) == v for k, v in want.items()) / len(want))
    return out


def json_exact(prompts, completions, reference, **_):
    return [float(scores.score_json(c, str(r))) for c, r in zip(completions, reference)]


def json_format(prompts, completions, **_):
    return [float(_parse_object(c) is not None) for c in completions]


_ANSWER_LINE = re.compile(r'(?:^|\n)####\s*-?\d[\d,]*\.?\d*\s*$')


def answer_format(prompts, completions, **_):
    return [float(bool(_ANSWER_LINE.search(c.strip()))) for c in completions]


BUILTIN = {f.__name__: f for f in (final_number, json_fields, json_exact, json_format, answer_format)}


def load(names: Sequence[str]) -> List[Callable]:
    """The callables of `align.rewards` (built-in names or 'module:function')."""
    if not names:
        raise ConfigError(f"config.align.rewards is empty: an RL loss needs at least one reward function, a built-in "
                          f"({', '.join(BUILTIN)}) or 'module:function'.")
    out = []
    for name in names:
        if name in BUILTIN:
            out.append(BUILTIN[name])
            continue
        module, sep, attr = str(name).partition(':')
        if not sep or not module or not attr:
            raise ConfigError(f"config.align.rewards: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor "
                              f"'module:function'.")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ConfigError(f'config.align.rewards: {name!r}: cannot import {module!r} ({e}); put it on PYTHONPATH.') \
                from None
        except AttributeError:
            raise ConfigError(f'config.align.rewards: {name!r}: module {module!r} has no {attr!r}.') from None
        if not callable(fn):
            raise ConfigError(f'config.align.rewards: {name!r} is a {type(fn).__name__}, not a function.')
        out.append(fn)
    return out


def weights(config_weights, n: int) -> List[float]:
    """`align.reward_weights` ([] = 1 each), checked against the number of reward functions."""
    if not config_weights:
        return [1.0] * n
    if len(config_weights) != n:
        raise ConfigError(f'config.align.reward_weights has {len(config_weights)} values for {n} reward functions '
                          f'(align.rewards); give one weight per function, or none.')
    try:
        return [float(w) for w in config_weights]
    except (TypeError, ValueError):
        raise ConfigError(f'config.align.reward_weights={list(config_weights)} must be numbers.') from None


def name_of(fn) -> str:
    return getattr(fn, '__name__', type(fn).__name__)


def score(fns, prompts, completions, columns):
    """[functions][completions] float rewards (NaN: not scorable). `columns`: {name: list per completion}."""
    table = []
    for fn in fns:
        try:
            got = fn(list(prompts), list(completions), **columns)
        except Exception as e:  # noqa: BLE001 - a user's function: its failure is named, in one line
            raise ConfigError(f'reward function {name_of(fn)} raised {type(e).__name__}: {e}'.splitlines()[0]) from None
        if got is None or not hasattr(got, '__len__') or len(got) != len(completions):
            n = len(got) if hasattr(got, '__len__') else type(got).__name__
            raise ConfigError(f'reward function {name_of(fn)} returned {n} values for {len(completions)} completions; '
                              f'it must return one float (or None) per completion.')
        row = []
        for v in got:
            if v is None:
                row.append(math.nan)
                continue
            try:
                row.append(float(v))
            except (TypeError, ValueError):
                raise ConfigError(f'reward function {name_of(fn)} returned {v!r}, not a number.') from None
        table.append(row)
    return table
