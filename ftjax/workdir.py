"""A run's directory, `RunDir(path)`: the one place that knows its files and reads and writes them.

  config.json            the resolved config of the run that owns the directory (`commit_config`); read back
                         laid over today's `ftjax.config.default_config()` (`config()`), so a run stored before
                         a key existed reads that key's default
  config.<time>.json     an earlier config, kept when a rerun changed it (--config.train.allow_config_change)
  metrics.jsonl          one JSON object per logged step (written by `ftjax.logs.MetricsLog`)
  summary.json           the final metrics, written when the run ends cleanly (never replaced by less)
  harness.json           lm-evaluation-harness results, when the run was evaluated (`ftjax.eval`)
  checkpoints/           orbax step directories (`ftjax.checkpoint`)
  checkpoints_aside/     broken or superseded steps, moved aside (never deleted) by `ftjax.checkpoint`

A directory belongs to one run. `check` (before anything loads) refuses a path that is a file and a rerun
whose config differs from the stored one in a key that changes what trains (RESUMABLE keys may change), and
says when the run is already finished. `commit_config` writes config.json only once the run is known to be
compatible (model loaded, checkpoint restored), atomically. A directory with a config.json but no checkpoint
and no summary (a run that failed before its first save) counts as new.

The directory may be local or a bucket (gs://..., through etils.epath, which needs gcsfs).
"""
import dataclasses
import json
import os
import time
from typing import Optional

import ml_collections
from etils import epath

from ftjax.config import KEYS, default_config
from ftjax.errors import EnvironmentSetupError, MissingFileError, WorkdirError
from ftjax.tree import overlay

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
HARNESS_FILE = 'harness.json'
CHECKPOINTS_DIR = 'checkpoints'
ASIDE_DIR = 'checkpoints_aside'  # beside checkpoints/: orbax (its retention included) never looks here
OVERRIDE = '--config.train.allow_config_change=true'
# Keys a rerun may change and still continue the run: lengths, intervals, evaluation, the mesh (a
# checkpoint restores onto another one), memory and speed knobs that leave the numbers alone.
RESUMABLE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches', 'train.checkpoint_every',
             'train.keep_checkpoints', 'train.keep_best_by', 'train.resume', 'train.resume_step',
             'train.allow_config_change', 'train.nan_policy', 'train.max_nan_skips', 'train.loss_chunk',
             'optim.grad_accum', 'model.remat', 'model.scan_unroll', 'model.kernels', 'data.num_proc', 'data.cache_dir',
             'data.pad_to_multiple_of',
             'eval.*', 'mesh.*')
_ABSENT = '<absent>'


class FilesystemMissing(EnvironmentSetupError, ImportError):
    """A bucket workdir (gs://...) without its filesystem package: one line, and still an ImportError."""


def _no_filesystem(workdir, error):
    return FilesystemMissing(f"--workdir={workdir}: {' '.join(str(error).split())}. Install it on every host (pip "
                             f"install gcsfs for gs://) or use a local --workdir.")


@dataclasses.dataclass(frozen=True)
class Claim:
    """What `RunDir.check` found: the stored config (None: a new run) and summary, and the keys that changed."""
    stored: Optional[dict]  # config.json of the run that owns the directory; None when it is new
    summary: Optional[dict]  # summary.json, when the run ended cleanly before
    changed: list  # ['key: stored -> new', ...] of the keys that are not RESUMABLE (train.allow_config_change)
    config_differs: bool  # the stored config.json is not this run's (a RESUMABLE key or an allowed change)

    def finished(self, config):
        """The summary of a run that already ended at (or past) config.train.steps, else None."""
        s = self.summary
        if not s or s.get('exit_code', 1) != 0 or not isinstance(s.get('step'), int):
            return None
        if config.train.resume_step is not None and config.train.resume_step < config.train.steps:
            return None  # going back to an earlier step on purpose
        return s if s['step'] >= config.train.steps else None


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The directory of one training run (the --workdir): its files' paths, and reading and writing them."""
    path: str

    def file(self, name):
        return epath.Path(self.path) / name

    @property
    def config_file(self):
        return self.file(CONFIG_FILE)

    @property
    def metrics_file(self):
        return self.file(METRICS_FILE)

    @property
    def summary_file(self):
        return self.file(SUMMARY_FILE)

    @property
    def harness_file(self):
        return self.file(HARNESS_FILE)

    @property
    def remote(self):
        return '://' in str(self.path)

    @property
    def checkpoints(self):
        """`path/checkpoints` as orbax wants it: absolute (a gs://bucket/... path stays as is)."""
        return os.path.join(self.path if self.remote else os.path.abspath(self.path), CHECKPOINTS_DIR)

    @property
    def aside(self):
        """`path/checkpoints_aside`: where `ftjax.checkpoint` moves broken or superseded steps."""
        return os.path.join(os.path.dirname(self.checkpoints), ASIDE_DIR)

    def is_run(self):
        """Whether this is a ftjax training run's directory (config.json and checkpoints/), e.g. not a PEFT adapter."""
        return bool(self.path) and os.path.isfile(str(self.config_file)) and os.path.isdir(self.checkpoints)

    def has_checkpoints(self):
        """Whether checkpoints/ (or checkpoints_aside/) holds any step, complete or not: a run used it."""
        for ckpt_dir in (epath.Path(self.checkpoints), epath.Path(self.aside)):
            if ckpt_dir.is_dir() and any(p.name.split('.')[0].isdigit() for p in ckpt_dir.iterdir()):
                return True
        return False

    def stored_config(self):
        """config.json as it was written (a dict), or None when it is missing or unreadable."""
        return _read_json(self.config_file)

    def config(self):
        """The run's config: config.json laid over today's defaults (a key added since reads its default)."""
        if not self.config_file.exists():
            raise MissingFileError(f"{self.path}: no config.json, so this is not the --workdir of an ftjax training "
                                   f"run (or the run never started). Pass the directory given to `python -m "
                                   f"ftjax train --workdir=...`.")
        stored = self.stored_config()
        if not isinstance(stored, dict):
            raise WorkdirError(f"{self.config_file} is not a JSON object (a torn or edited file); restore it from "
                               f"the run's config.<time>.json or its experiment file.")
        return ml_collections.ConfigDict(laid_over_defaults(stored))

    def summary(self):
        """summary.json (a dict), or None before a clean end."""
        return _read_json(self.summary_file)

    def harness_summary(self):
        """The summary in harness.json ({'task/metric': value}), or {} when the run was not evaluated."""
        return (_read_json(self.harness_file) or {}).get('summary', {})

    def metrics(self):
        """The rows of metrics.jsonl ([] before the first one); a torn last line (a run killed mid-write) is ignored."""
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def write_summary(self, result):
        """summary.json: the final metrics of a run that ended cleanly (`ftjax.report` reads it).

        Never replaced by less: a summary of a later step, or of the same step with a loss where this
        result has none, is kept. Returns whether the file was written.
        """
        old = self.summary()
        if old and isinstance(old.get('step'), int) and isinstance(result.get('step'), int):
            if old['step'] > result['step'] or (old['step'] == result['step'] and result.get('loss') is None
                                                and old.get('loss') is not None):
                return False
        _write_atomic(self.summary_file, json.dumps(result, indent=2))
        return True

    def check(self, config):
        """Checks that this directory can hold the run of `config`, before anything loads or is written -> Claim.

        Raises WorkdirError (one line) when the path is a file or not writable, when the directory was used and
        config.train.resume is False, or when its stored config differs from `config` in keys that are not
        RESUMABLE and config.train.allow_config_change is not set.
        """
        _check_path(self.path)
        try:
            exists = epath.Path(self.path).exists()
        except ImportError as e:
            raise _no_filesystem(self.path, e) from e
        summary = self.summary() if exists else None
        used = exists and (self.has_checkpoints() or self.summary_file.exists())
        if used and not config.train.resume:
            raise WorkdirError(f"{self.path} already holds a run (checkpoints or summary.json) and "
                               f"config.train.resume=False; choose a new --workdir, or drop "
                               f"--config.train.resume=false to continue that run.")
        stored = self.stored_config() if used else None
        if used and stored is None:
            what = 'unreadable' if self.config_file.exists() else 'missing'
            raise WorkdirError(f'{self.path} holds a run (checkpoints or summary.json) but its config.json is {what}, '
                               f'so this run cannot be checked against the one that wrote them; use a new --workdir, '
                               f'or restore {self.config_file}.')
        changes = config_changes(stored, config_dict(config)) if stored is not None else {}
        blocking = blocking_changes(changes)
        if blocking and not config.train.allow_config_change:
            raise WorkdirError(f'{self.path} holds another run: its {CONFIG_FILE} differs in '
                               f'{describe_changes(blocking)}. Use a new --workdir, or pass {OVERRIDE} to continue '
                               f'this run with the new config (the old one is kept as config.<time>.json).')
        return Claim(stored=stored, summary=summary if used else None,
                     changed=[f'{k}: {_short(a)} -> {_short(b)}' for k, (a, b) in blocking.items()],
                     config_differs=bool(changes))

    def commit_config(self, config, claim, primary=True):
        """Writes config.json once the run is known to be compatible with the directory (on the `primary` process).

        A changed config (train.allow_config_change, or RESUMABLE keys) replaces the stored one; a config with
        other keys changed keeps the old file as config.<time>.json. Returns the archived path, or None.
        """
        if not primary:
            return None
        wd = epath.Path(self.path)
        try:
            wd.mkdir(parents=True, exist_ok=True)
        except ImportError as e:
            raise _no_filesystem(self.path, e) from e
        except OSError as e:
            raise WorkdirError(f'--workdir={self.path} cannot be created ({e.strerror or e}); pass another '
                               f'--workdir.') from e
        path = self.config_file
        archived = None
        if claim.stored is not None and claim.changed and path.exists():
            stamp = time.strftime('%Y%m%d-%H%M%S')
            archived, n = wd / f'config.{stamp}.json', 1
            while archived.exists():
                archived, n = wd / f'config.{stamp}-{n}.json', n + 1
            archived.write_text(path.read_text())
        if claim.stored is None or claim.config_differs or not path.exists():
            _write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))
        return str(archived) if archived else None


def flatten(tree, prefix=''):
    """{'optim': {'learning_rate': 1e-4}} -> {'optim.learning_rate': 1e-4}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def config_dict(config):
    """The config as config.json stores it (lists, not tuples; plain JSON values)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def laid_over_defaults(stored):
    """A stored config.json (a dict) over today's defaults: keys added since read their default, and keys that
    ftjax no longer has are dropped (they mean nothing to this version)."""
    known = {tuple(k.split('.')): v for k, v in flatten(stored).items() if k in KEYS}
    return overlay(config_dict(default_config()), _unflatten(known))


def _unflatten(flat):
    out = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def resumable(key):
    return any(key == r or (r.endswith('.*') and key.startswith(r[:-1])) for r in RESUMABLE)


def blocking_changes(changes):
    """Of `config_changes`' {key: (stored, new)}, those in keys a run cannot change and continue (not RESUMABLE)."""
    return {k: v for k, v in changes.items() if not resumable(k)}


def _default(key):
    """A key's schema default as config.json writes it (a key added to ftjax after the run was stored)."""
    known = KEYS.get(key)
    return json.loads(json.dumps(known.default)) if known is not None else _ABSENT


def config_changes(stored, new):
    """{key: (stored value, new value)} of the keys that differ between two config.json dicts.

    A key missing from the stored config (one ftjax added since) counts only when the new value is not its
    default; a key only in the stored config (one ftjax removed since) does not count."""
    a, b = flatten(stored), flatten(new)
    return {k: (a.get(k, _ABSENT), b[k]) for k in sorted(b)
            if a.get(k, _ABSENT) != b[k] and (k in a or b[k] != _default(k))}


def _short(value, width=160):
    text = repr(value) if value != _ABSENT else value
    return text if len(text) <= width else text[:width - 3] + '...'


def describe_changes(changes, limit=4):
    items = [f'{k} {_short(a)} -> {_short(b)}' for k, (a, b) in changes.items()]
    more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def _read_json(path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def _check_path(workdir):
    """A --workdir that is a file, under a file, or not writable: WorkdirError (local paths only)."""
    if '://' in str(workdir):
        return
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pass a directory (a new path for a '
                           f'new run).')
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f'--workdir={workdir}: {parent} is a file, so the workdir cannot be created under it; '
                           f'pass another --workdir.')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f'--workdir={workdir}: {parent} is not writable; pass a --workdir you can write to.')


def _write_atomic(path, text):
    """Writes `text` to `path` through a temporary file and a rename (a local crash leaves the old file)."""
    tmp = path.parent / f'.{path.name}.tmp'
    tmp.write_text(text)
    tmp.replace(path)
