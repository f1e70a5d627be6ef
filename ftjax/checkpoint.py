"""Orbax checkpoints under `workdir/checkpoints/` that survive preemption.

Each step directory holds three items:
  params  the trainable parameters only (for LoRA/partial runs a small fraction of the model),
  opt     optimizer state, step and counters,
  meta    JSON: data-iterator state, the base weights' path and content hash, the trainable leaves.
Orbax writes a step into a temporary directory and renames it when complete, so a killed save is
never taken for a good checkpoint; leftovers are cleaned at start-up.

`resume` picks the step a run continues from. It never deletes a step: a broken one (missing commit
markers, or one that fails to restore while an older one restores) and, with train.resume_step, the
steps after the chosen one are moved to `workdir/checkpoints_aside/<step>.<why>.<time>/` (`RunDir.aside`),
outside orbax's directory, so neither a save of the same step nor the keep_checkpoints retention can touch the
step the run resumed from.
"""
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ftjax.errors import CheckpointError, MissingFileError
from ftjax.models import packaged
from ftjax.tree import path_str
from ftjax.workdir import ASIDE_DIR, CONFIG_FILE, RunDir

_HASH_CACHE = {}


def make_manager(workdir, train_cfg):
    policies = [pp.LatestN(n=int(train_cfg.keep_checkpoints))]
    metric = train_cfg.keep_best_by
    if metric:
        lower_better = 'loss' in metric or 'perplexity' in metric
        policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=not lower_better, n=1,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
        preservation_policy=pp.AnyPreservationPolicy(policies))
    return ocp.CheckpointManager(RunDir(workdir).checkpoints, options=options, item_names=('params', 'opt', 'meta'))


def split_state(state):
    """(trainable params, everything else that changes) — the frozen base is never saved."""
    rest = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name not in ('trainable', 'frozen')}
    return state.trainable, rest


def save(mngr, step, state, meta, metrics=None, force=False):
    params, rest = split_state(state)
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(rest),
                              meta=ocp.args.JsonSave(meta))
    return mngr.save(int(step), args=args, metrics=metrics, force=force)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
                        tree)


def restore(mngr, step, state):
    """Restores into `state`'s structure and shardings (so a checkpoint moves to another mesh)."""
    params, rest = split_state(state)
    try:
        out = mngr.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)), opt=ocp.args.StandardRestore(_abstract(rest)),
            meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"Checkpoint {step_dir(mngr, step)} could not be restored: it is corrupted or does "
                              f"not match this run ({type(e).__name__}: {_one_line(e)}).") from e
    state = state.replace(trainable=out['params'], **out['opt'])
    return state, dict(out['meta'])


def read_meta(mngr, step):
    return json.loads((epath.Path(step_dir(mngr, step)) / 'meta' / 'metadata').read_text())


def step_dir(mngr, step):
    return os.path.join(str(mngr.directory), str(int(step)))


def base_reference(model_path, quantized='none'):
    """Path and content hash of the base weights, so a LoRA checkpoint is tied to its base. `quantized`
    ('nf4', 'nf4+double', 'int8', 'gguf'; `ftjax.models.quantize.describe`): the base the adapters trained on
    is those weights quantized so, which the hash then covers ('none' leaves it as it always was)."""
    model_path = packaged.resolve(model_path)
    files = []
    if os.path.isdir(model_path):
        files = sorted(os.path.join(model_path, f) for f in os.listdir(model_path)
                       if f.endswith(('.safetensors', '.gguf')))
    elif os.path.exists(model_path):
        files = [model_path]
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        key = (f, st.st_size, st.st_mtime_ns)
        if key not in _HASH_CACHE:
            fh = hashlib.sha256()
            with open(f, 'rb') as fp:
                for chunk in iter(lambda: fp.read(1 << 22), b''):
                    fh.update(chunk)
            _HASH_CACHE[key] = fh.hexdigest()
        h.update(os.path.basename(f).encode() + _HASH_CACHE[key].encode())
    ref = {'path': os.path.abspath(model_path) if os.path.exists(model_path) else model_path}
    if quantized != 'none':
        h.update(f'quantize={quantized}'.encode())
        ref['quantize'] = quantized
    return dict(ref, sha256=h.hexdigest())


def leaf_signature(tree):
    """Sorted '/'-joined paths with shapes of a params tree: what a checkpoint's trainable set is."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append(f"{path_str(path)}:{list(np.shape(leaf))}")
    return sorted(out)


def _one_line(error, width=300):
    return ' '.join(str(error).split())[:width]


def check_compatible(meta, base_ref, trainable_sig, where):
    if meta.get('base', {}).get('sha256') != base_ref['sha256']:
        raise CheckpointError(f"{where}: the checkpoint was trained on base weights {meta.get('base')}, but this run "
                              f"loads {base_ref}. Point --config.model.path at the original base model.")
    if meta.get('trainable') != trainable_sig:
        theirs, ours = set(meta.get('trainable', [])), set(trainable_sig)
        raise CheckpointError(f"{where}: the checkpoint's trainable leaves differ from this run's "
                              f"(only in checkpoint: {sorted(theirs - ours)[:5]}, only in this run: "
                              f"{sorted(ours - theirs)[:5]}). Use the peft.* settings of the run that wrote it.")


_TERMINATING = []  # a SIGTERM reached this process: it stays asked to stop (a sweep starts no run after it)


def sigterm_received():
    """Whether a SIGTERM has reached this process since a `Preemption` first installed its handler."""
    return bool(_TERMINATING)


class Preemption:
    """SIGTERM -> save at the next step boundary and exit with `ftjax.errors.EXIT_PREEMPTED`. The request is
    kept for the process (`sigterm_received`), so a signal that lands while a run fails, or between the runs of a
    sweep, still stops what comes next."""

    def __init__(self, mngr):
        self.mngr = mngr
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning('SIGTERM received: saving at the next step boundary, then exiting.')
        _TERMINATING.append(signum)

    def should_stop(self, step):
        if jax.process_count() > 1:
            return self.mngr.reached_preemption(step)
        return sigterm_received()


COMMIT_MARKER = 'commit_success.txt'  # orbax writes it into a step directory last, just before the final rename


def step_status(workdir):
    """{step: None if its checkpoint is complete, else why not} of `workdir/checkpoints/<step>/`.

    Complete means what orbax leaves after a finished save: the commit marker and the `params` and `meta`
    items, each with its own marker. Orbax's temporary directories (`<step>.orbax-checkpoint-tmp-*`) are not
    listed: a save still running (or killed) is not a checkpoint.
    """
    ckpt_dir = epath.Path(RunDir(workdir).checkpoints)
    out = {}
    for path in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else []):
        if not path.name.isdigit() or not path.is_dir():
            continue
        missing = ['/'.join((path.name,) + p) for p in ((COMMIT_MARKER,), ('params', COMMIT_MARKER),
                                                       ('meta', COMMIT_MARKER)) if not path.joinpath(*p).exists()]
        out[int(path.name)] = f"missing {', '.join(missing)}" if missing else None
    return out


def _no_checkpoint_error(workdir, status, step):
    ckpt_dir = RunDir(workdir).checkpoints
    complete = sorted(s for s, why in status.items() if why is None)
    broken = '; '.join(f'step {s}: {why}' for s, why in sorted(status.items()) if why is not None)
    broken = (f" Incomplete (an interrupted save, or a partial copy; orbax writes {COMMIT_MARKER} last): "
              f"{broken}.") if broken else ''
    if step is not None and complete:
        return MissingFileError(f"{workdir}: no complete checkpoint for --step={step} under {ckpt_dir}; complete "
                                f"steps: {complete}. Pass one of those (or leave --step out for the latest).{broken}")
    return MissingFileError(f"{workdir}: no complete checkpoint under {ckpt_dir}.{broken} Train first, or rerun the "
                            f"run's `python -m ftjax train` command with this --workdir to resume it until a "
                            f"checkpoint is saved (every train.checkpoint_every steps and at the end).")


def pick_complete_step(workdir, step=None):
    """(the step to read, all complete steps): the latest complete checkpoint of `workdir`, or `step` once it is
    known to be complete. Reads only; newer incomplete checkpoints are skipped with a warning."""
    status = step_status(workdir)
    complete = sorted(s for s, why in status.items() if why is None)
    if not complete or (step is not None and int(step) not in complete):
        raise _no_checkpoint_error(workdir, status, step)
    step = complete[-1] if step is None else int(step)
    newer = sorted(s for s in status if s > step and status[s] is not None)
    if newer:
        logging.warning('%s: skipping incomplete checkpoint(s) %s (%s); exporting step %d.', workdir, newer,
                        status[newer[-1]], step)
    return step, complete


def set_aside(workdir, step, why):
    """Moves `workdir/checkpoints/<step>` to `workdir/checkpoints_aside/<step>.<why>.<time>` -> the new path.
    Nothing is deleted: a step that is set aside can be moved back by hand."""
    src = epath.Path(RunDir(workdir).checkpoints) / str(int(step))
    aside = epath.Path(RunDir(workdir).aside)
    aside.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    dst, n = aside / f'{int(step)}.{why}.{stamp}', 1
    while dst.exists():
        dst, n = aside / f'{int(step)}.{why}.{stamp}-{n}', n + 1
    src.rename(dst)
    return str(dst)


def _sync(name):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _restore_first(mngr, candidates, state, base_ref, trainable_sig):
    """Tries `candidates` in order -> (step, state, meta) of the first that restores, and {step: error} of
    those that did not. A checkpoint of another run (base weights, trainable leaves) is a CheckpointError
    at once: it is not broken, and an older step of the same run would not fit either."""
    failed = {}
    for step in candidates:
        where = step_dir(mngr, step)
        try:
            meta = read_meta(mngr, step)
        except (OSError, ValueError) as e:  # a torn or emptied meta item
            failed[step] = CheckpointError(f'Checkpoint {where} could not be restored: its meta item is unreadable '
                                           f'({type(e).__name__}: {_one_line(e, 120)}).')
            continue
        check_compatible(meta, base_ref, trainable_sig, where)
        try:
            state, meta = restore(mngr, step, state)
        except CheckpointError as e:
            failed[step] = e
            continue
        return step, state, meta, failed
    return None, state, None, failed


def resume(mngr, workdir, train_cfg, state, base_ref, trainable_sig, primary=True):
    """Restores the step this run continues from -> (state, meta or None, start step, a one-line note or None).

    The newest complete step that restores, or train.resume_step (which must be complete). Incomplete
    steps after it, complete ones that failed to restore, and (with train.resume_step) every later step
    are moved to checkpoints_aside/ so that orbax's retention cannot delete the step resumed from in
    their favour. When no complete step restores (and there is one), nothing is moved: CheckpointError.
    """
    status = step_status(workdir)
    complete = sorted(s for s, why in status.items() if why is None)
    wanted = train_cfg.resume_step
    where = RunDir(workdir).checkpoints
    if wanted is not None and int(wanted) not in complete:
        what = f'is incomplete ({status[int(wanted)]})' if int(wanted) in status else 'does not exist'
        raise CheckpointError(f'--config.train.resume_step={wanted}: {os.path.join(where, str(wanted))} {what}; '
                              f'complete steps: {complete}. Pass one of those, or leave train.resume_step out to '
                              f'resume from the newest complete step.')
    candidates = [int(wanted)] if wanted is not None else complete[::-1]
    step, state, meta, failed = _restore_first(mngr, candidates, state, base_ref, trainable_sig)
    if candidates and step is None:
        first = failed[candidates[0]]
        if wanted is not None:
            raise CheckpointError(f'{_one_line(first, 600)} Complete steps: {complete}; pass another '
                                  f'--config.train.resume_step, or leave it out to resume from the newest one that '
                                  f'restores.') from first
        raise CheckpointError(f'{_one_line(first, 600)} No complete step restores (steps {complete}), so nothing '
                              f'was moved or deleted; check that this config matches the run that wrote them, or '
                              f'use a new --workdir.') from first
    start = step or 0
    moves = [(s, 'incomplete', status[s]) for s in sorted(status) if (step is None or s > step) and status[s]]
    moves += [(s, 'broken', f'restore failed: {_one_line(e, 120)}') for s, e in failed.items()]
    if wanted is not None:
        moves += [(s, 'newer', 'after train.resume_step') for s in complete if s > start]
    moves.sort()
    if not moves:
        return state, meta, start, None
    moved = [(s, why, set_aside(workdir, s, kind) if primary else None) for s, kind, why in moves]
    _sync('ftjax_checkpoints_aside')
    mngr.reload()
    listed = '; '.join(f'step {s} ({why})' for s, why, _ in moved)
    dest = os.path.dirname(moved[0][2]) if primary else ASIDE_DIR
    then = f'resuming from step {start}' if step is not None else 'no complete checkpoint is left: starting at step 0'
    return state, meta, start, f'moved checkpoint {listed} to {dest}/ (not deleted); {then}.'


def read_trainable(workdir, step, trainable, model_path, complete=(), quantized='none'):
    """The trainable params of checkpoint `step` as host numpy arrays, for a run whose trainable leaves are
    shaped like `trainable` on the base weights at `model_path` (quantized as `quantized`, `base_reference`).

    Reads only: nothing in `workdir` is created or cleaned up, so reading beside a running training (whose
    save may be in flight) is safe, and a checkpoint of any mesh is read on a single host.
    """
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False)
    mngr = ocp.CheckpointManager(RunDir(workdir).checkpoints, options=options, item_names=('params', 'opt', 'meta'))
    where = step_dir(mngr, step)
    meta = read_meta(mngr, step)
    base = base_reference(model_path, quantized)
    if meta.get('base', {}).get('sha256') != base['sha256']:
        raise CheckpointError(f"{where} was trained on the base weights {meta.get('base')}, but model.path in "
                              f"{os.path.join(workdir, CONFIG_FILE)} now holds {base}. Restore the original base "
                              f"model there (or point model.path in that config.json at a copy of it).")
    check_compatible(meta, base, leaf_signature(trainable), where)
    try:
        as_numpy = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), trainable)
        out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(  # host memory, any mesh
            item=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable),
            restore_args=as_numpy)))
    except Exception as e:
        raise CheckpointError(f"Checkpoint {where} could not be restored: it is corrupted ({type(e).__name__}: "
                              f"{_one_line(e)}). Complete steps: {list(complete)}; pass another with --step.") from e
    finally:
        mngr.close()
    return out['params']
