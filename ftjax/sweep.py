r"""Ablation sweeps: the cartesian product of a few config values, one run (and sub-workdir) each.

  python -m ftjax sweep --config=experiments/x.py[:arg] --workdir=DIR \
      --grid=peft.lora.rank=4,8,16 --grid=optim.learning_rate=1e-4,3e-4 [--parallel=N] [--print_commands] \
      [--config.train.steps=200 --config.peft.trainable=.*norm.* ...]

Runs go one after another in this process (or N at a time as `python -m ftjax train` subprocesses
with --parallel=N), each in `DIR/<name>` named from its values (`rank4_lr0.0001`). A finished run
is skipped and an interrupted one resumes from its checkpoint, so rerunning the command completes a
sweep; a run directory whose stored config differs from the one the sweep would run there (other than in
keys a run may change and continue, `workdir.RESUMABLE`) is refused before anything runs. At the end:
DIR/results.csv, DIR/results.md and DIR/loss_curves.png (see ftjax/report.py).
--print_commands prints one training command per run (for a cluster or a pod) and exits.
`--config.KEY=VALUE` overrides (as for `ftjax train`) hold for every run of the grid and are passed on
to each run's command. The command line: ftjax/cli/sweep.py.

A grid value is split at commas outside brackets and quotes, and read as `--config.KEY=VALUE` reads it
(`ftjax.config.parse_value`): `--grid=peft.lora.targets=['q_proj$'],['q_proj$','v_proj$']`. Every key and
value is checked before anything runs.

Two grid keys are not config keys: `--grid=arg=lora,full,bitfit` runs the experiment file with each argument
(`get_config('lora,' + the --config's own argument)`: variants that set several keys at once, e.g. a
method with its own learning rate), and `--seeds=N` adds `train.seed=0..N-1` to the grid, so that every
configuration runs with N seeds; the report then groups the seeds of each configuration (mean, standard
deviation, 95% interval: `ftjax.report.grouped`).
"""
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
import traceback

import ml_collections

from ftjax import checkpoint, config as config_lib, loop, report
from ftjax.errors import EXIT_PREEMPTED, ConfigError
from ftjax.workdir import RunDir, blocking_changes, config_changes, config_dict, describe_changes, flatten

ABBREVIATIONS = {'learning_rate': 'lr', 'batch_size': 'bs', 'weight_decay': 'wd', 'warmup_steps': 'warmup',
                 'max_length': 'len', 'grad_accum': 'accum', 'method': '', 'arg': ''}
MAX_NAME = 100
ARG = 'arg'  # the grid key of the experiment file's argument (--grid=arg=V1,V2)
SEED = 'train.seed'  # the key --seeds=N sweeps


@dataclasses.dataclass
class Run:
    name: str  # the sub-workdir's name
    workdir: str
    values: dict  # grid key -> typed value
    config: ml_collections.ConfigDict  # the experiment config with this run's values


class GridKeyError(ConfigError, KeyError):
    """A --grid key the config lacks, or a group of keys: a KeyError, printed as one line."""

    def __str__(self):
        return str(self.args[0])


def split_values(text):
    """"4,8,[1,2],'a,b'" -> ['4', '8', '[1,2]', "'a,b'"]: commas inside brackets or quotes don't split."""
    parts, current, depth, quote = [], '', 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '[({':
            depth += 1
        elif ch in '])}':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(current)
            current = ''
            continue
        current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def parse_grid(specs):
    """['peft.lora.rank=4,8', ...] -> [('peft.lora.rank', ['4', '8']), ...] (values still text)."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition('=')
        key = key.strip().removeprefix('config.')
        if not sep or not key or not values.strip():
            raise ConfigError(f'--grid={spec}: expected KEY=V1,V2,... e.g. --grid=peft.lora.rank=4,8,16.')
        texts = split_values(values)
        if any(t == '' for t in texts):
            raise ConfigError(f'--grid={spec}: empty value in {values!r} (a stray comma?).')
        if len(set(texts)) != len(texts):
            raise ConfigError(f'--grid={spec}: a value is listed twice.')
        if key in [k for k, _ in grid]:
            raise ConfigError(f'--grid: key {key!r} is given twice; list all its values in one --grid.')
        grid.append((key, texts))
    return grid


def _leaf_keys(config, prefix=''):
    out = []
    for k, v in config.items():
        out += _leaf_keys(v, f'{prefix}{k}.') if isinstance(v, ml_collections.ConfigDict) else [f'{prefix}{k}']
    return out


def _parent(config, key):
    """(the ConfigDict holding `key`, its last name); a clear error for a key the config lacks."""
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            leaves = _leaf_keys(config)
            full = {v: k for k, v in ABBREVIATIONS.items() if v}.get(parts[-1], parts[-1])  # lr -> learning_rate
            close = [k for k in leaves if k.split('.')[-1] == full]
            close += [k for k in difflib.get_close_matches(key, leaves, n=3, cutoff=0.6) if k not in close]
            close = close[:3]
            hint = f' Did you mean {" or ".join(close)}?' if close else ''
            raise GridKeyError(f'--grid key {key!r}: the config has no {".".join(parts[:i + 1])!r}.{hint}')
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise GridKeyError(f'--grid key {key!r} is a group of settings, not one value; sweep one of its fields '
                       f'(e.g. {key}.{next(iter(node[parts[-1]].keys()), "name")}).')
    return node, parts[-1]


def convert(config, key, text):
    """The grid value `text` of `key` (a key of `config`) as the key's type, read as `--config.KEY=VALUE`."""
    _parent(config, key)  # a key the config lacks: named, with the closest ones
    return config_lib.parse_value(key, text, f'--grid {key}={text}')


def _short_keys(keys):
    """The shortest dotted suffix of each key that tells it apart from the others, abbreviated."""
    depth = {k: 1 for k in keys}
    while True:
        short = {k: '_'.join(k.split('.')[-depth[k]:-1] + [ABBREVIATIONS.get(k.split('.')[-1], k.split('.')[-1])])
                 for k in keys}
        clash = [k for k in keys if list(short.values()).count(short[k]) > 1 and depth[k] < len(k.split('.'))]
        if not clash:
            return {k: v.strip('_') for k, v in short.items()}
        for k in clash:
            depth[k] += 1


def _name_value(value):
    """A value as a filesystem-safe piece of a directory name."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = '-'.join(_name_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r'[^A-Za-z0-9._+-]+', '-', text).strip('-.') or 'none'


def run_name(values, short):
    """{'peft.lora.rank': 4, 'optim.learning_rate': 1e-4} -> 'rank4_lr0.0001' (filesystem-safe)."""
    parts = []
    for key, value in values.items():
        text = _name_value(value)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        parts.append(f'{short[key]}{text}' if numeric else (f'{short[key]}-{text}' if short[key] else text))
    name = '_'.join(parts)
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + '-' + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def full_grid(grid_specs, seeds=0):
    """The parsed --grid specs, with `train.seed=0..seeds-1` appended for --seeds=N (N > 0)."""
    grid = parse_grid(grid_specs)
    if seeds < 0:
        raise ConfigError(f'--seeds={seeds}: give the number of seeds per configuration, e.g. --seeds=3.')
    if seeds:
        if SEED in [k for k, _ in grid]:
            raise ConfigError(f'--seeds={seeds} and --grid={SEED}=...: give the seeds one way, not both.')
        grid.append((SEED, [str(s) for s in range(seeds)]))
    return grid


def experiment_spec(config_spec, arg=None):
    """The --config spec of one value of --grid=arg=...: 'file.py:ARG[,the spec's own argument]'."""
    if arg is None:
        return config_spec
    path, _, own = config_spec.partition(':')
    return f'{path}:{arg},{own}' if own else f'{path}:{arg}'


def plan(config_spec, grid_specs, workdir, overrides=(), seeds=0):
    """Every run of the sweep, each value converted and applied: all errors surface here, before any run.

    `overrides`: [(key, text), ...] of `--config.KEY=VALUE`, the same for every run; `seeds`: --seeds=N."""
    grid = full_grid(grid_specs, seeds)
    if not grid:
        raise ConfigError('no --grid given: pass at least one, e.g. --grid=peft.lora.rank=4,8,16.')
    both = sorted({key for key, _ in grid} & {key for key, _ in overrides})
    if both:
        raise ConfigError(f'--config.{both[0]} is also swept by --grid={both[0]}=...; give it once.')
    args = dict(grid).get(ARG, [None])
    bases = {a: config_lib.apply_overrides(config_lib.load_experiment(experiment_spec(config_spec, a)), overrides)
             for a in args}  # an unknown variant fails here, named by the experiment file
    base = bases[args[0]]
    typed = [(key, texts if key == ARG else [convert(base, key, t) for t in texts]) for key, texts in grid]
    varied = [key for key, values in typed if len(values) > 1] or [key for key, _ in typed]
    short = _short_keys(varied)
    runs, seen = [], {}
    for combo in itertools.product(*[values for _, values in typed]):
        values = dict(zip([key for key, _ in typed], combo))
        name = run_name({k: values[k] for k in varied}, short)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # two values that read the same once made filesystem-safe
            name = f'{name}-{seen[name]}'
        config = config_lib.override(bases[values.get(ARG)], {k: v for k, v in values.items() if k != ARG})
        runs.append(Run(name, os.path.join(workdir, name), values, config))
    return runs


def _fixed(run, overrides):
    """The run's values of the --config.KEY overrides (the same in every run), by key."""
    out = {}
    for key, _ in overrides:
        parent, name = _parent(run.config, key)
        out[key] = parent[name]
    return out


def check_existing(runs, overrides=()):
    """Refuses a sub-workdir whose earlier run used other values (a different grid, other --config.KEY overrides,
    or an experiment file changed since) in keys a run cannot change and continue (`workdir.RESUMABLE`): a
    finished run with another config would otherwise be skipped and reported as this sweep's."""
    for run in runs:
        rundir = RunDir(run.workdir)
        if not rundir.config_file.exists():
            continue
        flat = flatten(config_dict(rundir.config()))  # laid over today's defaults: every key
        for key, value in {**_fixed(run, overrides), **run.values}.items():
            if key == ARG:  # not a config key; its value names the sub-workdir
                continue
            if json.dumps(flat.get(key)) != json.dumps(value if not isinstance(value, tuple) else list(value)):
                raise ConfigError(f'{run.workdir} holds a run with {key}={flat.get(key)!r}, but this sweep would '
                                 f'run {key}={value!r} there; use a new --workdir, or delete that directory.')
        # config() above refused a config.json that is not a JSON object, so stored_config() is a dict here
        changed = blocking_changes(config_changes(rundir.stored_config(), config_dict(run.config)))
        if changed:
            raise ConfigError(f'{run.workdir} holds a run whose config differs from this sweep\'s in '
                              f'{describe_changes(changed)} (the experiment file or its defaults changed since it '
                              f'ran); use a new --workdir, or delete that directory.')


def _flag_value(value):
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def commands(runs, config_spec, grid_specs, workdir, python='python', overrides=(), seeds=0):
    """One argv per run: `python -m ftjax train ... --config.key=value ...`, the --config.KEY overrides
    (as given) first. A grid over a list field runs each point as `python -m ftjax sweep ... --only=NAME`
    (in-process) instead, so that its value is read from the grid's own text."""
    fixed = [f'--config.{k}={text}' for k, text in overrides]
    if any(isinstance(v, (list, tuple)) for run in runs for v in run.values.values()):
        grid = [f'--grid={g}' for g in grid_specs] + ([f'--seeds={seeds}'] if seeds else [])
        return [[python, '-m', 'ftjax', 'sweep', f'--config={config_spec}', *grid, *fixed, f'--workdir={workdir}',
                 f'--only={run.name}'] for run in runs]
    return [[python, '-m', 'ftjax', 'train', f'--config={experiment_spec(config_spec, run.values.get(ARG))}',
             f'--workdir={run.workdir}', *fixed,
             *[f'--config.{k}={_flag_value(v)}' for k, v in run.values.items() if k != ARG]] for run in runs]


def write_sweep_file(workdir, config_spec, grid_specs, runs, overrides=(), seeds=0):
    """DIR/sweep.json: the grid and the runs, so that the report shows the grid's keys (and pending runs)."""
    os.makedirs(workdir, exist_ok=True)
    grid = full_grid(grid_specs, seeds)
    entries = [{'name': r.name, 'values': {k: list(v) if isinstance(v, tuple) else v for k, v in r.values.items()}}
               for r in runs]
    old = report._read_json(os.path.join(workdir, report.SWEEP_FILE))
    if old and {k for k, _ in old['grid']} == {k for k, _ in grid}:  # a sweep extended with more values
        names = {e['name'] for e in entries}
        entries = [e for e in old['runs'] if e['name'] not in names] + entries
    with open(os.path.join(workdir, report.SWEEP_FILE), 'w') as f:
        json.dump({'config': config_spec, 'overrides': [list(o) for o in overrides], 'grid': grid, 'runs': entries},
                  f, indent=2)


def say(msg):
    print(f'ftjax.sweep: {msg}', flush=True)


def _record_failure(run, message):
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, report.ERROR_FILE), 'w') as f:
        f.write(message)


def _clear_failure(run):
    path = os.path.join(run.workdir, report.ERROR_FILE)
    if os.path.exists(path):
        os.remove(path)


def run_sequential(runs):
    """Each unfinished run in this process, in order; a failing run is recorded and the sweep goes on, unless
    the process was sent SIGTERM (then it starts nothing more)."""
    failed = 0
    for i, run in enumerate(runs, 1):
        if checkpoint.sigterm_received():
            say('SIGTERM received: no further runs started; rerun the same command to resume the sweep.')
            return EXIT_PREEMPTED
        if report.finished(run.workdir, run.config.train.steps):
            say(f'[{i}/{len(runs)}] {run.name}: finished earlier, skipped')
            continue
        say(f'[{i}/{len(runs)}] {run.name}: training in {run.workdir}')
        _clear_failure(run)
        try:
            result = loop.train_and_evaluate(run.config, run.workdir)
        except Exception:  # noqa: BLE001 -- one bad point must not lose the rest of the sweep
            _record_failure(run, traceback.format_exc())
            say(f'[{i}/{len(runs)}] {run.name}: FAILED (traceback in {run.workdir}/{report.ERROR_FILE})')
            failed += 1
            continue
        if result.get('exit_code', 0) == EXIT_PREEMPTED:
            say('preempted; rerun the same command to resume the sweep.')
            return EXIT_PREEMPTED
        if result.get('exit_code', 0) != 0:
            failed += 1
    return 1 if failed else 0


def run_parallel(runs, argvs, n):
    """The unfinished runs as subprocesses, `n` at a time; output in each run's train.log."""
    todo = [(i, r, a) for i, (r, a) in enumerate(zip(runs, argvs), 1)
            if not report.finished(r.workdir, r.config.train.steps)]
    for i, run in enumerate(runs, 1):
        if all(run is not r for _, r, _ in todo):
            say(f'[{i}/{len(runs)}] {run.name}: finished earlier, skipped')
    active, failed, stop = [], 0, []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while todo or active:
            if stop:  # preemption: pass SIGTERM on so each run checkpoints, and start nothing new
                for proc, *_ in active:
                    proc.send_signal(signal.SIGTERM)
                todo = []
            while todo and len(active) < n:
                i, run, argv = todo.pop(0)
                os.makedirs(run.workdir, exist_ok=True)
                _clear_failure(run)
                log = open(os.path.join(run.workdir, 'train.log'), 'a')
                say(f'[{i}/{len(runs)}] {run.name}: started ({run.workdir}/train.log)')
                active.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, i, run))
            time.sleep(0.5)
            for item in [a for a in active if a[0].poll() is not None]:
                proc, log, i, run = item
                active.remove(item)
                log.close()
                if proc.returncode not in (0, EXIT_PREEMPTED):
                    with open(os.path.join(run.workdir, 'train.log')) as f:
                        tail = f.read()[-4000:]
                    _record_failure(run, f'exit code {proc.returncode}; end of train.log:\n{tail}')
                    failed += 1
                say(f'[{i}/{len(runs)}] {run.name}: exit code {proc.returncode}')
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stop:
        say('preempted; rerun the same command to resume the sweep.')
        return EXIT_PREEMPTED
    return 1 if failed else 0
