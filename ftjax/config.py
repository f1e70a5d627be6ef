"""Configs: built from the schema (`ftjax.config_schema`: every key once, with its default, type, allowed values
and meaning), validated, and parsed from text.

`default_config()` builds the ConfigDict an experiment file (`experiments/*.py`) starts from, and
`validate(config)` checks a finished one against the same table: unknown keys (with the closest
valid key), types, allowed values or ranges, required keys, and the few checks that involve two keys.

Text to values, once for every surface (`--config.KEY=VALUE`, a sweep's `--grid`, tests): `parse_value`
reads a key's text as its type, `apply_overrides` sets [(key, text), ...] on a config and `override` sets
{key: value}; `load_experiment` / `load_config` read an experiment file.

  python -m ftjax config              # the table of every key (ftjax/cli/config.py)
  python -m ftjax config --markdown   # the same as docs/config.md (tests keep the file in sync)
"""
import ast
import copy
import difflib
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from ftjax.config_checks import MESH_AXES, TYPE_NAMES
from ftjax.config_schema import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, DEFAULT_RULES, GROUPS, KEYS,  # noqa: F401
                                 LORA_TARGETS_ATTN_MLP, RL_LOSSES, SCHEMA, SECTIONS)
from ftjax.errors import ConfigError, MissingFileError

TRUE, FALSE = ('true', 't', 'yes', 'y', '1'), ('false', 'f', 'no', 'n', '0')  # a bool's text


def _cross_checks(get):
    """Checks that involve two keys; `get(key)` raises KeyError for a key outside the checked part."""
    yield lambda: (get('train.batch_size') % get('optim.grad_accum') and
                   f"config.train.batch_size={get('train.batch_size')} is not divisible by "
                   f"config.optim.grad_accum={get('optim.grad_accum')}.")
    yield lambda: (get('data.text_stride') is not None and get('data.text_stride') > get('data.max_length') and
                   f"config.data.text_stride must be in [1, max_length={get('data.max_length')}], "
                   f"got {get('data.text_stride')}.")
    yield lambda: (get('align.loss') in ('dpo', 'ipo', 'simpo') and get('align.beta') <= 0 and
                   f"config.align.beta must be > 0 for align.loss={get('align.loss')!r}, got {get('align.beta')}.")
    yield lambda: (get('align.loss') in RL_LOSSES and
                   get('train.batch_size') != get('rollout.prompts') * get('align.num_generations') and
                   f"config.train.batch_size={get('train.batch_size')} must be rollout.prompts x "
                   f"align.num_generations = {get('rollout.prompts')} x {get('align.num_generations')}: set "
                   f"--config.train.batch_size={get('rollout.prompts') * get('align.num_generations')}.")
    yield lambda: _context_problem(get('mesh.context'), get('model.context_load_balance'), get('data.max_length'))
    yield lambda: (get('data.pad_to_multiple_of') > 0 and
                   _context_problem(get('mesh.context'), get('model.context_load_balance'),
                                    get('data.pad_to_multiple_of'), 'data.pad_to_multiple_of'))
    yield lambda: (get('align.loss') in RL_LOSSES and get('data.pad_to_multiple_of') > 0 and
                   f"config.data.pad_to_multiple_of={get('data.pad_to_multiple_of')} trims batches read from data; "
                   f"align.loss={get('align.loss')!r} trains on rollouts, which the sampler pads itself: set "
                   f"--config.data.pad_to_multiple_of=0.")
    yield lambda: (sum(get(f'mesh.{a}') == -1 for a in MESH_AXES) > 1 and
                   f"config.mesh: only one of mesh.data/mesh.fsdp/mesh.tensor/mesh.context/mesh.expert may be -1, got "
                   f"{[get(f'mesh.{a}') for a in MESH_AXES]}.")


def _context_problem(c, balance, max_length, key='data.max_length'):
    """Rows split over mesh.context = c (in 2c zig-zag pieces with load balancing) need a length they divide."""
    pieces = 2 * c if balance else c
    if c > 1 and max_length % pieces:
        return (f"config.{key}={max_length} must be a multiple of {pieces} with mesh.context={c}"
                f"{' and model.context_load_balance (2 x context pieces)' if balance else ''}: set "
                f"--config.{key}={-(-max_length // pieces) * pieces}.")
    return None


def default_config():
    """A ConfigDict of every key at its default (None defaults are typed placeholders)."""
    c = ml_collections.ConfigDict()
    for key in SCHEMA:
        *groups, leaf = key.name.split('.')
        node = c
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        node[leaf] = config_dict.placeholder(key.type) if key.default is None else copy.deepcopy(key.default)
    return c


def default_data_config():
    """The `data` group alone (ftjax.data as a library)."""
    return default_config().data


def check_data_config(data_cfg):
    return validate(data_cfg, 'data')  # the `data` group alone


def suggest(name, candidates):
    """' Did you mean config.x?' for the closest of `candidates` (dotted names), or ''."""
    close = difflib.get_close_matches(name, candidates, n=2, cutoff=0.6)
    if not close:  # a typo in the last part only: compare the last parts of the same group
        last = {c.rsplit('.', 1)[-1]: c for c in candidates if c.rsplit('.', 1)[0] == name.rsplit('.', 1)[0]}
        close = [last[c] for c in difflib.get_close_matches(name.rsplit('.', 1)[-1], last, n=2, cutoff=0.6)]
    return f" Did you mean {' or '.join('config.' + c for c in close)}?" if close else ''


def unknown_key_error(name):
    hint = suggest(name, list(KEYS)) or suggest(name, GROUPS)
    return ConfigError(f'config.{name} is not a config key.{hint} (`python -m ftjax config` lists every key.)')


def _leaves(node, prefix):
    for name, value in node.items():
        full = f'{prefix}{name}'
        if isinstance(value, ml_collections.ConfigDict):
            if full not in GROUPS:
                raise unknown_key_error(full)
            yield from _leaves(value, full + '.')
        else:
            yield full, value


def type_problem(key, value):
    """The message for a value of the wrong type for `key` (a Key), or None."""
    if value is None:
        return None if key.nullable else (
            f'config.{key.name} is not set ({key.meaning}): pass --config.{key.name}=...' if key.required else
            f'config.{key.name} must not be None ({TYPE_NAMES[key.type]}).')
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), list: lambda v: isinstance(v, (list, tuple))}[key.type]
    return None if ok(value) else f'config.{key.name} must be {TYPE_NAMES[key.type]}, got {value!r}.'


def validate(config, at=''):
    """Raises ConfigError for the first bad key of `config` (the group at `at`, e.g. 'data', or the whole
    config): an unknown key, a missing one, a wrong type, a value not allowed, or two keys that disagree."""
    prefix = f'{at}.' if at else ''
    values = dict(_leaves(config, prefix))
    for name in values:
        if name not in KEYS:
            raise unknown_key_error(name)
    for key in SCHEMA:
        if not key.name.startswith(prefix):
            continue
        if key.name not in values:
            raise ConfigError(f'config.{key.name} is missing: build configs from ftjax.config.default_config().')
        value = values[key.name]
        problem = type_problem(key, value)
        if problem is None and value is not None and key.check is not None:
            problem = key.check.problem(key.name, value)
        if problem:
            raise ConfigError(problem)
    for cross in _cross_checks(lambda name: values[name]):
        try:
            problem = cross()
        except KeyError:  # a key outside `at`
            continue
        if problem:
            raise ConfigError(problem)
    return config


def smoke(c, max_length=64, batch_size=2):
    """Shrinks a config so that it runs in seconds (the `smoke` argument of every experiment)."""
    c.data.max_length = max_length
    c.train.steps, c.train.batch_size, c.train.log_every = 2, batch_size, 1
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 2, 1, 2
    c.eval.generate, c.eval.max_new_tokens = min(c.eval.generate, 2), min(c.eval.max_new_tokens, 4)
    c.eval.batch_size = 2
    return c


def parse_arg(arg, default, variants, where, flags=('smoke',)):
    """The `arg` of an experiment's `get_config(arg)`, 'variant[,flag,...]' (just 'flag,...' when `variants`
    is empty) -> (variant, set of flags); `default` when no variant is given. Anything else is a
    ConfigError naming `where` (the experiment file) and the closest valid argument."""
    parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
    variants, flags = list(variants), list(flags)
    variant = parts.pop(0) if variants and parts and parts[0] not in flags else default
    valid = f'variants: {", ".join(variants) or "none"}; flags: {", ".join(flags) or "none"}.'
    if variants and variant not in variants:
        raise ConfigError(f'{where}:{arg}: unknown variant {variant!r}.{_closest(variant, variants + flags)} '
                          f'Valid {valid}')
    for flag in parts:
        if flag not in flags:
            raise ConfigError(f'{where}:{arg}: unknown flag {flag!r}.{_closest(flag, flags + variants)} Valid {valid}')
    return variant, set(parts)


def _closest(word, words):
    close = difflib.get_close_matches(str(word), list(words), n=1, cutoff=0.5)
    return f' Did you mean {close[0]!r}?' if close else ''


# --- text to values: the command line, sweeps and tests ------------------------------------------------

def parse_value(name, text, where=None):
    """The text of the key `name` as the key's type (the one parser of `--config.KEY=VALUE` and `--grid`):
    a bool is true/false (yes/no, 1/0, ...), a number may be written 3e-4 (an int 1e3), a str may be quoted
    ('a,b'), a list key's text is a list literal or one item, and `None` fits a key that may be None."""
    key = KEYS.get(name)
    where = where or f'--config.{name}={text}'
    if key is None:
        raise ConfigError(f'{where}: {unknown_key_error(name)}')
    text = str(text)
    if text.strip() == 'None' and key.nullable:
        return None
    if key.type is list:  # a list or tuple literal, else one item: '(q|v)_proj$' is a regex, not a literal
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        return list(value) if isinstance(value, (list, tuple)) else [value if isinstance(value, str) else text]
    if key.type is bool:
        if text.strip().lower() not in TRUE + FALSE:
            raise ConfigError(f'{where}: config.{name} is a bool (true or false).')
        return text.strip().lower() in TRUE
    if key.type is str:
        quoted = len(text) > 1 and text[0] == text[-1] and text[0] in '\'"'
        return text[1:-1] if quoted else text
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f'{where}: config.{name} must be {TYPE_NAMES[key.type]}.') from None
    if key.type is int:
        if not number.is_integer():
            raise ConfigError(f'{where}: config.{name} must be an integer.')
        return int(number)
    return number


def set_value(config, name, value, where=None):
    """Sets the dotted key `name` of `config` to `value` (a ConfigError names a group the config lacks)."""
    where = where or f'config.{name}'
    *groups, leaf = name.split('.')
    node = config
    for group in groups:
        if not isinstance(node, ml_collections.ConfigDict) or group not in node:
            raise ConfigError(f"{where}: the experiment's config has no group config.{name.rsplit('.', 1)[0]} "
                              f'(build it from ftjax.config.default_config()).')
        node = node[group]
    try:
        node[leaf] = value
    except (TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f'{where}: {e}') from None


def apply_overrides(config, overrides):
    """Sets [(key, text), ...] (`--config.KEY=VALUE` in order) on `config`: a scalar key takes its last
    value, the values of a list key are joined in order. An unknown key is a ConfigError naming the closest."""
    values = {}
    for name, text in overrides:
        value = parse_value(name, text)
        if KEYS[name].type is list and values.get(name) is not None and value is not None:
            value = values[name] + value
        values[name] = value
    for name, value in values.items():
        set_value(config, name, value, f'--config.{name}')
    return config


def override(config, values):
    """A copy of `config` with `values` ({dotted key: value}, e.g. {'peft.lora.rank': 4}) set."""
    config = copy.deepcopy(config)
    for name, value in values.items():
        set_value(config, name, value)
    return config


def load_experiment(spec):
    """`file.py` or `file.py:arg` -> its get_config() or get_config('arg') (a ConfigDict)."""
    path, *arg = spec.split(':', 1)
    if not os.path.isfile(path):
        raise MissingFileError(f'--config={spec}: no file {path!r} (relative to {os.getcwd()}).')
    module_spec = importlib.util.spec_from_file_location('ftjax_experiment', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f'--config={spec}: {path} defines no get_config(); an experiment file returns its '
                          f'ConfigDict from get_config(arg=None).')
    config = module.get_config(*arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict '
                          f'(start from ftjax.config.default_config()).')
    return config


def load_config(spec, overrides=(), check=True):
    """The experiment `spec` with the [(key, text), ...] overrides applied, validated (unless not `check`)
    and locked (no key can be added)."""
    config = apply_overrides(load_experiment(spec), overrides)
    if check:
        validate(config)
    config.lock()
    return config
