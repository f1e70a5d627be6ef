"""The vocabulary of the config schema (`ftjax.config.SCHEMA`): `K(...)` declares a key, and the checks
say what a value may be (the table's `allowed` column) and, when it may not, the one-line message naming
the key and the fix.
"""
import dataclasses
import re
from typing import Callable, Optional

MESH_AXES = ('data', 'fsdp', 'tensor', 'context', 'expert')  # the mesh.* size keys and axis names; ftjax.sharding builds the mesh


# --- what a value may be (the `allowed` column) ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Check:
    allowed: str  # for the table, e.g. '> 0' or 'cosine | linear | constant'
    problem: Callable  # (key, value) -> the error message, or None when the value is fine


def one_of(*options):
    return Check(' | '.join(options), lambda k, v: None if v in options else
                 f'config.{k}={v!r} is not one of {list(options)}.')


def _range(allowed, ok, must):
    return Check(allowed, lambda k, v: None if ok(v) else f'config.{k} must be {must}, got {v!r}.')


POSITIVE_INT = _range('>= 1', lambda v: v >= 1, 'a positive integer')
POSITIVE = _range('> 0', lambda v: v > 0, 'positive')
NON_NEGATIVE = _range('>= 0', lambda v: v >= 0, '>= 0')
FRACTION = _range('[0, 1]', lambda v: 0 <= v <= 1, 'in [0, 1]')
FRACTION_BELOW_1 = _range('[0, 1)', lambda v: 0 <= v < 1, 'in [0, 1)')
AXIS_SIZE = _range('-1 or >= 1', lambda v: v == -1 or v >= 1, '-1 (all remaining devices) or a positive integer')
BELOW_HALF = _range('[0, 0.5)', lambda v: 0 <= v < 0.5, 'in [0, 0.5)')
AT_LEAST_2 = _range('>= 2', lambda v: v >= 2, 'an integer >= 2')


def _regex_problem(key, pattern):
    if not isinstance(pattern, str):
        return f'config.{key}: {pattern!r} is not a string (a regex over parameter paths).'
    try:
        re.compile(pattern)
    except re.error as e:
        return f'config.{key}: {pattern!r} is not a valid regex ({e}).'
    return None


def _each(allowed, item_problem, empty=None):
    def problem(key, value):
        if empty and not value:
            return f'config.{key} is empty: {empty}'
        return next(filter(None, (item_problem(key, item) for item in value)), None)
    return Check(allowed, problem)


def _multiplier_problem(key, rule):
    pattern, _, value = str(rule).rpartition('=')
    if not pattern or not re.fullmatch(r'\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*', value):
        return f"config.{key}: {rule!r} should look like 'regex=multiplier', e.g. 'lora_b$=16'."
    return _regex_problem(key, pattern)


def _rule_problem(key, rule):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
        return f"config.{key}: {rule!r} should be a [logical_axis, mesh_axes] pair, e.g. ['embed', 'fsdp']."
    axes = rule[1] if isinstance(rule[1], (list, tuple)) else (rule[1],)
    bad = [a for a in axes if a is not None and a not in MESH_AXES]
    return f'config.{key}: {rule[0]!r} -> {bad[0]!r} is not a mesh axis; use one of {MESH_AXES}.' if bad else None


REGEXES = _each('regexes', _regex_problem)
TARGETS = _each('non-empty regexes', _regex_problem,
                empty="give regexes over module paths, e.g. ['(q|k|v|o)_proj$', '(gate|up|down)_proj$'].")
MULTIPLIERS = _each("'regex=multiplier' items", _multiplier_problem)
RULES = _each('[logical_axis, mesh_axes] pairs', _rule_problem)
DTYPES = one_of('float32', 'bfloat16', 'float16')
# model.remat: XLA's named policies, presets of placed tensors, or 'custom:TENSOR=PLACE,...' (MaxText's `custom`).
# TENSOR: a block's input or a projection's output (after its adapter), as `checkpoint_name` tags them in the
# blocks; groups 'qkv' and 'mlp'. PLACE: device (saved), offload (saved to host memory, 'pinned_host'),
# remat (recomputed in the backward pass: anything not named is).
REMAT_NAMED = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')
REMAT_TENSORS = ('layer_input', 'q_proj', 'k_proj', 'v_proj', 'qkv_proj', 'o_proj', 'gate_proj', 'up_proj',
                 'down_proj')
REMAT_GROUPS = {'qkv': ('q_proj', 'k_proj', 'v_proj', 'qkv_proj'), 'mlp': ('gate_proj', 'up_proj', 'down_proj')}
REMAT_PLACES = ('device', 'offload', 'remat')
REMAT_PRESETS = {
    'save_qkv': 'custom:qkv=device',
    'offload_layer_inputs': 'custom:layer_input=offload',
    'offload_layer_inputs_and_projections': 'custom:layer_input=offload,qkv=offload,o_proj=offload',  # MaxText's
}


def remat_places(value: str):
    """model.remat -> {tensor: place} for a preset or 'custom:...' value, None for one of REMAT_NAMED; raises
    ValueError naming the key and the fix."""
    if value in REMAT_NAMED:
        return None
    spec = REMAT_PRESETS.get(value, value)
    choices = f"one of {list(REMAT_NAMED + tuple(REMAT_PRESETS))} or 'custom:TENSOR=PLACE,...'"
    if not isinstance(spec, str) or not spec.startswith('custom:'):
        raise ValueError(f"config.model.remat={value!r} is not {choices}.")
    places = {}
    for item in filter(None, spec[len('custom:'):].split(',')):
        name, _, place = (part.strip() for part in item.partition('='))
        if name not in REMAT_TENSORS + tuple(REMAT_GROUPS) or place not in REMAT_PLACES:
            raise ValueError(f"config.model.remat={value!r}: {item!r} should be TENSOR=PLACE with TENSOR one of "
                             f"{list(REMAT_TENSORS + tuple(REMAT_GROUPS))} and PLACE one of {list(REMAT_PLACES)}, "
                             f"e.g. custom:layer_input=offload,qkv=device.")
        for t in REMAT_GROUPS.get(name, (name,)):
            places[t] = place
    return places


def _remat_problem(key, value):
    try:
        remat_places(value)
    except ValueError as e:
        return str(e)
    return None


REMAT = Check(' | '.join(REMAT_NAMED + tuple(REMAT_PRESETS)) + " | 'custom:TENSOR=PLACE,...'", _remat_problem)
CHAT_FORMATS = ('gemma', 'chatml', 'llama3')  # the named formats of ftjax.data.templates
CHAT_TEMPLATE = Check(' | '.join(CHAT_FORMATS) + ' | a Jinja template', lambda k, v: None if (
    v in CHAT_FORMATS or '{{' in v or '{%' in v) else f"config.{k}={v!r} is neither a named chat format "
    f"{list(CHAT_FORMATS)} nor a Jinja template (with {{{{ ... }}}} or {{% ... %}}); None = the model's own.")
TYPE_NAMES = {bool: 'a bool', int: 'an integer', float: 'a number', str: 'a string', list: 'a list'}


@dataclasses.dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. 'peft.lora.rank'
    default: object
    type: type  # bool | int | float | str | list
    meaning: str
    check: Optional[Check] = None
    required: bool = False  # None is an error: the experiment or the command line must set it
    optional: bool = False  # None is allowed (always, when the default is None)

    @property
    def nullable(self):
        return self.optional or (self.default is None and not self.required)


def K(name, default, meaning, check=None, kind=None, required=False, optional=False):
    """One schema entry; the type is the default's unless `kind` says (None defaults)."""
    kind = kind or (list if isinstance(default, (list, tuple)) else type(default))
    return Key(name, default, kind, meaning, check, required, optional)
