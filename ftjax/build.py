"""Run setup, shared by training (`ftjax.loop`), `ftjax.compile_check` and `ftjax.export`:

  build_model_and_mask(config)          the base model (+ adapter) with the PEFT method applied, and its mask
  load_start(config)                    the model fine-tuning starts from: model.path + model.adapter (a PEFT
                                        adapter directory or a ftjax run's workdir), merged with adapter_merge
  build_data(config, pre)               the train and eval splits, tokenised for the loaded model (preference
                                        pairs with `align.reference=precomputed`: with the base's log-probs)
  state_shardings / sharded_state(...)  the train state (trainable, frozen, optimizer) on the mesh
  jit_train_step(...)                   the train step compiled with the state's and the batch's shardings
  restore_for_export(workdir, step)     a finished (or preempted) run's fine-tuned model, on the host
"""
import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp

from ftjax import checkpoint, peft, sharding
from ftjax import data as data_lib
from ftjax.data import templates
from ftjax import state as state_lib
from ftjax.errors import ConfigError, MissingFileError
from ftjax.models import abstract_variables, adapters, build_model, convert, gguf_io, moe, packaged, quantize
from ftjax.models.loading import Pretrained, require_tokenizer
from ftjax.models.heads import task_of
from ftjax.pretrained import load_pretrained
from ftjax.objectives import objective_for, reference
from ftjax.train_step import make_train_step
from ftjax.workdir import RunDir


def build_model_and_mask(config, rng=None):
    """Loads the base model (+ adapter) and applies the fine-tuning method: (Pretrained, trainable mask).
    With `model.quantize`, the frozen kernels and embeddings are then quantized (`quantize_frozen`)."""
    pre = load_start(config)
    rng = jax.random.key(config.train.seed) if rng is None else rng
    pre, mask = peft.prepare(pre, config, jax.random.fold_in(rng, 1))
    return quantize_frozen(pre, mask, config), mask


def quantize_frozen(pre, mask, config):
    """`pre` with its frozen kernels / embeddings quantized as `config.model.quantize` says, once the trainable
    mask is known (adapters, norms and whatever trains stay in the master dtype). Params may be shape structs."""
    m = config.model
    kind = m.quantize
    if kind == 'none':
        return pre
    gguf = gguf_blocks(packaged.resolve(m.path), pre.config) if kind == 'gguf' else None
    params = quantize.quantize_params(pre.params, mask, kind, double=m.quantize_double, gguf=gguf,
                                      embeddings=m.quantize_embedding)
    logging.info('model.quantize=%s: frozen %s, %.1f MiB of params', quantize.describe(m),
                 ', '.join(quantize.kinds_in(params)) or 'nothing quantized', quantize.nbytes(params) / 2**20)
    return dataclasses.replace(pre, params=params)


def gguf_blocks(path, cfg):
    """The blocks of the GGUF file at `path` and how they map to ftjax params (`quantize.GGUFBlocks`)."""
    if not str(path or '').endswith('.gguf'):
        raise ConfigError(f"config.model.quantize='gguf' keeps a GGUF file's own blocks, but config.model.path="
                          f"{path!r} is not a .gguf file; use 'nf4' or 'int8' for other checkpoints.")
    return quantize.GGUFBlocks(path, gguf_io.read_gguf_blocks(path), convert.table(cfg), cfg.num_layers)


def load_start(config):
    """The model fine-tuning starts from: `model.path`, with `model.adapter` on top (a PEFT adapter directory, or
    a ftjax run's workdir: that run's fine-tuned model at its latest complete checkpoint), folded into the base
    weights when `model.adapter_merge` (a new adapter then trains on top of that model)."""
    m = config.model
    if m.adapter_merge and not m.adapter:
        raise ConfigError('config.model.adapter_merge=true but config.model.adapter is not set: pass '
                          '--config.model.adapter=DIR (a PEFT adapter directory or a ftjax run\'s workdir).')
    if m.adapter_merge and m.quantize == 'gguf':
        raise ConfigError("config.model.adapter_merge=true with config.model.quantize='gguf': the file's own blocks "
                          "cannot hold the merged adapter; use --config.model.quantize=nf4 (or int8), or keep the "
                          "adapter unmerged (--config.model.adapter_merge=false).")
    if m.adapter and '://' not in m.adapter and not os.path.exists(m.adapter):
        raise MissingFileError(f"config.model.adapter={m.adapter!r} does not exist (relative to {os.getcwd()}): pass "
                               f"a PEFT adapter directory or a ftjax run's workdir (train that run first, e.g. python "
                               f"-m ftjax train --config=experiments/quickstart.py --workdir={m.adapter}).")
    if RunDir(m.adapter or '').is_run():
        pre = _from_run(config)
    else:
        pre = load_pretrained(m.path, dtype=m.param_dtype, compute_dtype=m.dtype, num_labels=m.num_labels,
                              pooling=m.pooling, remat=m.remat, scan_unroll=m.scan_unroll, seed=config.train.seed,
                              adapter=m.adapter)
    if m.upcycle_experts:  # a dense decoder made a mixture of experts (after its adapter, if merged)
        if m.adapter and not m.adapter_merge:
            raise ConfigError('config.model.upcycle_experts with config.model.adapter: upcycle the merged model '
                              '(--config.model.adapter_merge=true) or train the adapter on the dense one.')
        pre = moe.upcycle(merge_adapter(pre) if m.adapter_merge else pre, m.upcycle_experts, m.upcycle_top_k,
                              m.upcycle_noise, seed=config.train.seed)
    require_tokenizer(pre, f'config.model.path={m.path!r}')
    templates.apply(pre.tokenizer, getattr(pre.config, 'model_type', None), config.data.chat_template,
                    source=m.path)  # data.chat_template, else the model's own, else its family's
    return merge_adapter(pre) if m.adapter_merge and not m.upcycle_experts else pre


def _from_run(config):
    """The fine-tuned model of the run in `model.adapter`, which must have trained on this run's base weights."""
    m = config.model
    run = RunDir(m.adapter).config()
    if not isinstance(run.model.path, str) or not run.model.path:
        raise ConfigError(f"config.model.adapter={m.adapter!r}: its config.json names no model.path, so it is no "
                          f"complete ftjax run's workdir; pass a PEFT adapter directory or another run.")
    if run.model.path != m.path and (checkpoint.base_reference(run.model.path)['sha256'] !=
                                     checkpoint.base_reference(m.path)['sha256']):
        raise ConfigError(f"config.model.adapter={m.adapter!r} is a run on the base {run.model.path!r}, not on "
                          f"config.model.path={m.path!r}; start from that base or from another run.")
    pre = restore_for_export(m.adapter)  # a quantized (QLoRA) run's frozen weights come back dequantized, as it ran
    dtype = jnp.dtype(m.param_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          quantize.dequantize_tree(pre.params))
    return dataclasses.replace(pre, params=params)


def merge_adapter(pre: Pretrained) -> Pretrained:
    """`pre` with its LoRA / DoRA adapters folded into the kernels (W + s A B) and the adapter leaves gone."""
    if pre.config.lora is None:
        return pre
    cfg = dataclasses.replace(pre.config, lora=None)
    return dataclasses.replace(pre, model=build_model(cfg), config=cfg,
                               params=jax.device_get(adapters.merge(pre.params, pre.config.lora)))


def start_identity(config):
    """What the starting model's outputs depend on, as one hash: the base weights' content, the adapter's files
    (a run's: its latest complete checkpoint) and the model keys (path, dtypes, quantization, merge). Keys the
    precomputed reference's cache (`ftjax.objectives.reference.attach_reference`)."""
    m = config.model
    ident = {'base': checkpoint.base_reference(m.path)['sha256'],
             'model': {k: v for k, v in m.to_dict().items() if k not in ('remat', 'scan_unroll', 'offload_frozen')}}
    if m.upcycle_experts:
        ident['upcycle_seed'] = config.train.seed  # the router's draw
    if m.adapter:
        where = m.adapter
        if RunDir(where).is_run():
            step, _ = checkpoint.pick_complete_step(where)
            where = os.path.join(RunDir(where).checkpoints, str(step), 'params')  # the trained weights
        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(where)):
            for f in sorted(files):
                with open(os.path.join(root, f), 'rb') as fp:
                    h.update(os.path.relpath(os.path.join(root, f), where).encode())
                    h.update(hashlib.sha256(fp.read()).digest())
        ident['adapter'] = h.hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def build_data(config, pre):
    """(train, eval or None) TokenizedData for the loaded model `pre`; a classification label outside the
    model's classifier is a bad row (`data.on_bad_row`), not a NaN loss later."""
    num_labels = getattr(pre.config, 'num_labels', None) if task_of(pre.config) == 'classification' else None
    splits = tuple(data_lib.build_dataset(config.data, pre.tokenizer, split, num_labels=num_labels)
                   for split in ('train', 'eval'))
    if objective_for(config, pre.model).reference == 'precomputed':
        cache = reference.cache_dir(config)
        ident = start_identity(config)
        for data in filter(None, splits):  # the base model's answer log-probs, once, before any step (or cached)
            reference.attach_reference(pre.model, pre.params, data, config.train.batch_size, config.train.loss_chunk,
                                       cache=cache, identity=ident)
    return splits


def state_shardings(model, params, mask, tx, config, mesh, rules):
    """(abstract train state, its shardings, shardings for `params`) on `mesh`.

    `params` may be abstract (shape structs): `ftjax.compile_check` uses this without any weights.
    """
    param_sh = sharding.param_shardings(sharding.logical_specs(abstract_variables(model)), mesh, rules, params)
    abstract_state = jax.eval_shape(_state_fn(mask, tx, config), params)
    state_sh = sharding.tree_shardings(abstract_state, param_sh, mesh)
    host = lambda s: s.with_memory_kind('pinned_host')  # noqa: E731
    if config.optim.offload_state:  # between steps in host memory; the step moves it in for the update
        state_sh = state_sh.replace(opt_state=jax.tree.map(host, state_sh.opt_state))
    if config.model.offload_frozen and 'layers' in state_sh.frozen:
        # the layers' frozen matrices ([layers, in, out]); each scanned block copies its own in. The per-layer
        # vectors ([layers, d]: norms, biases) stay: they are small, and the TPU compiler cannot slice one row
        # of a packed bf16 [layers, d] array out of host memory ("Sublane slicing size must be multiple of
        # element packing factor", libtpu 0.0.42.1)
        frozen = dict(state_sh.frozen)
        frozen['layers'] = jax.tree.map(lambda s, a: host(s) if a.ndim >= 3 else s, frozen['layers'],
                                        abstract_state.frozen['layers'])
        state_sh = state_sh.replace(frozen=type(state_sh.frozen)(frozen))
    return abstract_state, state_sh, sharding.tree_shardings(params, param_sh, mesh)


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
    config = RunDir(workdir).config()
    step, complete = checkpoint.pick_complete_step(workdir, step)
    pre, mask = build_model_and_mask(config)
    trainable, frozen = state_lib.partition(pre.params, mask)
    restored = checkpoint.read_trainable(workdir, step, trainable, config.model.path, complete,
                                         quantize.describe(config.model))
    pre = dataclasses.replace(pre, params=state_lib.combine(restored, frozen))
    pre.method = config.peft.method
    return pre
