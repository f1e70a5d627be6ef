"""The files of a run's workdir, other than its checkpoints (`ftjax.checkpoint`):

  config.json            the resolved config of the run that owns the workdir (`commit_config`)
  config.<time>.json     an earlier config, kept when a rerun changed it (--config.train.allow_config_change)
  metrics.jsonl          one JSON object per logged step (written by `ftjax.logs.MetricsLog`)
  summary.json           the final metrics, written when the run ends cleanly (never replaced by less)
  checkpoints/           orbax step directories
  checkpoints_aside/     broken or superseded steps, moved aside (never deleted) by `ftjax.checkpoint`

A workdir belongs to one run. `check_workdir` (before anything loads) refuses a path that is a file and
a rerun whose config differs from the stored one in a key that changes what trains (RESUMABLE keys may
change), and says when the run is already finished. `commit_config` writes config.json only once the
run is known to be compatible (model loaded, checkpoint restored), atomically. A workdir with a
config.json but no checkpoint and no summary (a run that failed before its first save) counts as new.

The workdir may be local or a bucket (gs://..., through etils.epath, which needs gcsfs).
"""
import dataclasses
import json
import os
import time
from typing import Optional

import ml_collections
from etils import epath

from ftjax.config import KEYS
from ftjax.errors import EnvironmentSetupError, MissingFileError, WorkdirError

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
HARNESS_FILE = 'harness.json'  # lm-evaluation-harness results (ftjax.harness), when a run was evaluated
CHECKPOINTS_DIR = 'checkpoints'
ASIDE_DIR = 'checkpoints_aside'  # ftjax.checkpoint.ASIDE_DIR: steps moved aside, never deleted
OVERRIDE = '--config.train.allow_config_change=true'
# Keys a rerun may change and still continue the run: lengths, intervals, evaluation, the mesh (a
# checkpoint restores onto another one), memory and speed knobs that leave the numbers alone.
RESUMABLE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches', 'train.checkpoint_every',
             'train.keep_checkpoints', 'train.keep_best_by', 'train.resume', 'train.resume_step',
             'train.allow_config_change', 'train.nan_policy', 'train.max_nan_skips', 'train.loss_chunk',
             'optim.grad_accum', 'model.remat', 'model.scan_unroll', 'model.kernels', 'data.num_proc', 'data.cache_dir',
             'eval.*', 'mesh.*')
_ABSENT = '<absent>'


class FilesystemMissing(EnvironmentSetupError, ImportError):
    """A bucket workdir (gs://...) without its filesystem package: one line, and still an ImportError."""


def _no_filesystem(workdir, error):
    return FilesystemMissing(f"--workdir={workdir}: {' '.join(str(error).split())}. Install it on every host (pip "
                             f"install gcsfs for gs://) or use a local --workdir.")


@dataclasses.dataclass
class Workdir:
    """What `check_workdir` found: the stored config (None: a new run) and summary, and the keys that changed."""
    path: str
    stored: Optional[dict]  # config.json of the run that owns the workdir; None when the workdir is new
    summary: Optional[dict]  # summary.json, when the run ended cleanly before
    changed: list  # ['key: stored -> new', ...] of the keys that are not RESUMABLE (train.allow_config_change)
    config_differs: bool  # the stored config.json is not this run's (a RESUMABLE key or an allowed change)


def load_workdir_config(workdir):
    """The resolved config a run wrote to `workdir/config.json`."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise MissingFileError(f"{workdir}: no config.json, so this is not the --workdir of an ftjax training run "
                               f"(or the run never started). Pass the directory given to `python -m ftjax.train "
                               f"--workdir=...`.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


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


def resumable(key):
    return any(key == r or (r.endswith('.*') and key.startswith(r[:-1])) for r in RESUMABLE)


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


def has_checkpoints(workdir):
    """Whether `workdir/checkpoints/` (or checkpoints_aside/) holds any step, complete or not: a run used it."""
    for name in (CHECKPOINTS_DIR, ASIDE_DIR):
        ckpt_dir = epath.Path(workdir) / name
        if ckpt_dir.is_dir() and any(p.name.split('.')[0].isdigit() for p in ckpt_dir.iterdir()):
            return True
    return False


def check_workdir(config, workdir):
    """Checks that `workdir` can hold this run, before anything loads or is written -> Workdir.

    Raises WorkdirError (one line) when the path is a file or not writable, when the workdir was used and
    config.train.resume is False, or when its stored config differs from `config` in keys that are not
    RESUMABLE and config.train.allow_config_change is not set.
    """
    _check_path(workdir)
    wd = epath.Path(workdir)
    try:
        exists = wd.exists()
    except ImportError as e:
        raise _no_filesystem(workdir, e) from e
    summary = _read_json(wd / SUMMARY_FILE) if exists else None
    used = exists and (has_checkpoints(workdir) or (wd / SUMMARY_FILE).exists())
    if used and not config.train.resume:
        raise WorkdirError(f"{workdir} already holds a run (checkpoints or summary.json) and "
                           f"config.train.resume=False; choose a new --workdir, or drop --config.train.resume=false "
                           f"to continue that run.")
    config_path = wd / CONFIG_FILE
    stored = _read_json(config_path) if used else None
    if used and stored is None:
        what = 'unreadable' if config_path.exists() else 'missing'
        raise WorkdirError(f'{workdir} holds a run (checkpoints or summary.json) but its config.json is {what}, so '
                           f'this run cannot be checked against the one that wrote them; use a new --workdir, or '
                           f'restore {config_path}.')
    changes = config_changes(stored, config_dict(config)) if stored is not None else {}
    blocking = {k: v for k, v in changes.items() if not resumable(k)}
    if blocking and not config.train.get('allow_config_change', False):
        raise WorkdirError(f'{workdir} holds another run: its {CONFIG_FILE} differs in {describe_changes(blocking)}. '
                           f'Use a new --workdir, or pass {OVERRIDE} to continue this run with the new config '
                           f'(the old one is kept as config.<time>.json).')
    return Workdir(path=str(workdir), stored=stored, summary=summary if used else None,
                   changed=[f'{k}: {_short(a)} -> {_short(b)}' for k, (a, b) in blocking.items()],
                   config_differs=bool(changes))


def finished_summary(state, config):
    """The summary of a run that already ended at (or past) config.train.steps, else None."""
    s = state.summary
    if not s or s.get('exit_code', 1) != 0 or not isinstance(s.get('step'), int):
        return None
    if config.train.get('resume_step', None) is not None and config.train.resume_step < config.train.steps:
        return None  # going back to an earlier step on purpose
    return s if s['step'] >= config.train.steps else None


def _write_atomic(path, text):
    """Writes `text` to `path` through a temporary file and a rename (a local crash leaves the old file)."""
    tmp = path.parent / f'.{path.name}.tmp'
    tmp.write_text(text)
    tmp.replace(path)


def _timestamp():
    return time.strftime('%Y%m%d-%H%M%S')


def commit_config(config, state, primary=True):
    """Writes config.json once the run is known to be compatible with the workdir (on the `primary` process).

    A changed config (train.allow_config_change, or RESUMABLE keys) replaces the stored one; a config with
    other keys changed keeps the old file as config.<time>.json. Returns the archived path, or None.
    """
    if not primary:
        return None
    wd = epath.Path(state.path)
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except ImportError as e:
        raise _no_filesystem(state.path, e) from e
    except OSError as e:
        raise WorkdirError(f'--workdir={state.path} cannot be created ({e.strerror or e}); pass another '
                           f'--workdir.') from e
    path = wd / CONFIG_FILE
    archived = None
    if state.stored is not None and state.changed and path.exists():
        stamp = _timestamp()
        archived, n = wd / f'config.{stamp}.json', 1
        while archived.exists():
            archived, n = wd / f'config.{stamp}-{n}.json', n + 1
        archived.write_text(path.read_text())
    if state.stored is None or state.config_differs or not path.exists():
        _write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))
    return str(archived) if archived else None


def read_metrics(workdir):
    """The rows of `metrics.jsonl` ([] before the first one); a torn last line (a run killed mid-write) is ignored."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_summary(workdir, result):
    """`summary.json`: the final metrics of a run that ended cleanly (`ftjax.report` reads it).

    Never replaced by less: a summary of a later step, or of the same step with a loss where this
    result has none, is kept. Returns whether the file was written.
    """
    path = epath.Path(workdir) / SUMMARY_FILE
    old = _read_json(path)
    if old and isinstance(old.get('step'), int) and isinstance(result.get('step'), int):
        if old['step'] > result['step'] or (old['step'] == result['step'] and result.get('loss') is None
                                            and old.get('loss') is not None):
            return False
    _write_atomic(path, json.dumps(result, indent=2))
    return True
