"""Orbax checkpoints under `workdir/checkpoints/` that survive preemption.

Each step directory holds three items:
  params  the trainable parameters only (for LoRA/partial runs a small fraction of the model),
  opt     optimizer state, step and counters,
  meta    JSON: data-iterator state, the base weights' path and content hash, the trainable leaves.
Orbax writes a step into a temporary directory and renames it when complete, so a killed save is
never taken for a good checkpoint; leftovers are cleaned at start-up.
"""
import dataclasses
import hashlib
import json
import logging
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; rerunning the same command resumes
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
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
                                 item_names=('params', 'opt', 'meta'))


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
        older = [s for s in mngr.all_steps() if s < step]
        offer = (f" The previous complete checkpoint is step {max(older)}: rerun with "
                 f"--config.train.resume_step={max(older)} (or delete {step_dir(mngr, step)}).") if older else ''
        raise RuntimeError(f"Checkpoint {step_dir(mngr, step)} could not be restored: it is corrupted or does not "
                           f"match this run ({type(e).__name__}: {str(e)[:300]}).{offer}") from e
    state = state.replace(trainable=out['params'], **out['opt'])
    return state, dict(out['meta'])


def read_meta(mngr, step):
    path = os.path.join(step_dir(mngr, step), 'meta', 'metadata')
    with open(path) as f:
        return json.load(f)


def step_dir(mngr, step):
    return os.path.join(str(mngr.directory), str(int(step)))


def base_reference(model_path):
    """Path and content hash of the base weights, so a LoRA checkpoint is tied to its base."""
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
    return {'path': os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
            'sha256': h.hexdigest()}


def leaf_signature(tree):
    """Sorted '/'-joined paths with shapes of a params tree: what a checkpoint's trainable set is."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append(f"{'/'.join(str(getattr(k, 'key', k)) for k in path)}:{list(np.shape(leaf))}")
    return sorted(out)


def check_compatible(meta, base_ref, trainable_sig, where):
    if meta.get('base', {}).get('sha256') != base_ref['sha256']:
        raise RuntimeError(f"{where}: the checkpoint was trained on base weights {meta.get('base')}, but this run "
                           f"loads {base_ref}. Point --config.model.path at the original base model.")
    if meta.get('trainable') != trainable_sig:
        theirs, ours = set(meta.get('trainable', [])), set(trainable_sig)
        raise RuntimeError(f"{where}: the checkpoint's trainable leaves differ from this run's "
                           f"(only in checkpoint: {sorted(theirs - ours)[:5]}, only in this run: "
                           f"{sorted(ours - theirs)[:5]}). Use the peft.* settings of the run that wrote it.")


class Preemption:
    """SIGTERM -> save at the next step boundary and exit with PREEMPTED_EXIT_CODE."""

    def __init__(self, mngr):
        self.mngr = mngr
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning('SIGTERM received: saving at the next step boundary, then exiting.')
        self.requested = True

    def should_stop(self, step):
        if jax.process_count() > 1:
            return self.mngr.reached_preemption(step)
        return self.requested


def restore_for_export(workdir, step=None):
    """The fine-tuned model of a finished (or preempted) run, as a `Pretrained` for `ftjax.export`."""
    from ftjax import loop as train
    config = train.load_workdir_config(workdir)
    mngr = make_manager(workdir, config.train)
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint under {mngr.directory}; train first "
                                f"(checkpoints are written every train.checkpoint_every steps and at the end).")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint for step {step}; available: {sorted(steps)}.")
    pre, mask = train.build_model_and_mask(config)
    from ftjax.state import partition
    trainable, frozen = partition(pre.params, mask)
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(trainable)),
                                                     meta=ocp.args.JsonRestore()))
    check_compatible(out['meta'], base_reference(config.model.path), leaf_signature(trainable), workdir)
    from ftjax.state import combine
    pre = dataclasses.replace(pre, params=combine(out['params'], frozen))
    pre.method = config.peft.method
    return pre
