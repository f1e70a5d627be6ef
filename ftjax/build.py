"""Run setup, shared by training (`ftjax.loop`), `ftjax.compile_check` and `ftjax.export`:

  build_model_and_mask(config)          the base model (+ adapter) with the PEFT method applied, and its mask
  build_data(config, pre)               the train and eval splits, tokenised for the loaded model (preference
                                        pairs with `align.reference=precomputed`: with the base's log-probs)
  state_shardings / sharded_state(...)  the train state (trainable, frozen, optimizer) on the mesh
  jit_train_step(...)                   the train step compiled with the state's and the batch's shardings
  restore_for_export(workdir, step)     a finished (or preempted) run's fine-tuned model, on the host
"""
import dataclasses

import jax

from ftjax import checkpoint, peft, preference, sharding
from ftjax import data as data_lib
from ftjax import state as state_lib
from ftjax.models import abstract_variables
from ftjax.models.heads import task_of
from ftjax.pretrained import load_pretrained
from ftjax.train_step import is_preference, make_train_step
from ftjax.workdir import load_workdir_config


def build_model_and_mask(config, rng=None):
    """Loads the base model (+ adapter) and applies the fine-tuning method: (Pretrained, trainable mask)."""
    m = config.model
    pre = load_pretrained(m.path, dtype=m.param_dtype, compute_dtype=m.dtype, num_labels=m.num_labels,
                          pooling=m.pooling, remat=m.remat, scan_unroll=m.scan_unroll, seed=config.train.seed,
                          adapter=m.adapter)
    rng = jax.random.key(config.train.seed) if rng is None else rng
    return peft.prepare(pre, config, jax.random.fold_in(rng, 1))


def build_data(config, pre):
    """(train, eval or None) TokenizedData for the loaded model `pre`; a classification label outside the
    model's classifier is a bad row (`data.on_bad_row`), not a NaN loss later."""
    num_labels = getattr(pre.config, 'num_labels', None) if task_of(pre.config) == 'classification' else None
    splits = tuple(data_lib.build_dataset(config.data, pre.tokenizer, split, num_labels=num_labels)
                   for split in ('train', 'eval'))
    if is_preference(config) and preference.settings(config).reference == 'precomputed':
        for data in filter(None, splits):  # the base model's answer log-probs, once, before any step
            preference.attach_reference(pre.model, pre.params, data, config.train.batch_size, config.train.loss_chunk)
    return splits


def state_shardings(model, params, mask, tx, config, mesh, rules):
    """(abstract train state, its shardings, shardings for `params`) on `mesh`.

    `params` may be abstract (shape structs): `ftjax.compile_check` uses this without any weights.
    """
    param_sh = sharding.param_shardings(sharding.logical_specs(abstract_variables(model)), mesh, rules)
    abstract_state = jax.eval_shape(_state_fn(mask, tx, config), params)
    return (abstract_state, sharding.tree_shardings(abstract_state, param_sh, mesh),
            sharding.tree_shardings(params, param_sh, mesh))


def _state_fn(mask, tx, config):
    return lambda params: state_lib.create_state(params, mask, tx, config.model.frozen_dtype)


def sharded_state(pre, mask, tx, config, mesh, rules):
    """The train state built on `mesh` from the host params `pre.params` (each device gets only its
    shards), and the state's shardings."""
    _, state_sh, params_sh = state_shardings(pre.model, pre.params, mask, tx, config, mesh, rules)
    with jax.set_mesh(mesh):
        placed = sharding.place(pre.params, params_sh)
        state = jax.jit(_state_fn(mask, tx, config), out_shardings=state_sh, donate_argnums=0)(placed)
    return state, state_sh


def jit_train_step(model, config, tx, schedule, state_sh, batch_sh):
    """The train step compiled for the mesh: state in and out in `state_sh` (donated), batch in
    `batch_sh`. Call (or lower) it inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
    return jax.jit(make_train_step(model, config, tx, schedule), in_shardings=(state_sh, batch_sh, None),
                   out_shardings=(state_sh, None), donate_argnums=0)


def restore_for_export(workdir, step=None):
    """The fine-tuned model of a finished (or preempted) run, as a `Pretrained` for `ftjax.export`.

    Reads only: nothing in `workdir` is created or cleaned up, so exporting beside a running training
    (whose save may be in flight) is safe. The latest complete checkpoint is used unless `step` is given.
    """
    config = load_workdir_config(workdir)
    step, complete = checkpoint.pick_complete_step(workdir, step)
    pre, mask = build_model_and_mask(config)
    trainable, frozen = state_lib.partition(pre.params, mask)
    restored = checkpoint.read_trainable(workdir, step, trainable, config.model.path, complete)
    pre = dataclasses.replace(pre, params=state_lib.combine(restored, frozen))
    pre.method = config.peft.method
    return pre
