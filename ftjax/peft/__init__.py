"""Parameter-efficient and partial fine-tuning: adapters and trainable-parameter selection.

`prepare(pre, config, rng)` applies `config.peft` to a loaded model: LoRA/DoRA add adapter leaves
beside the targeted kernels (base paths unchanged), and every method returns the trainable mask
(`ftjax.peft.select`) that `ftjax.state.create_state` splits the params by.
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.layers import LoraSpec
from ftjax.models.loading import Pretrained, build_model
from ftjax.peft import lora
from ftjax.peft.select import METHODS, LastLayers, describe, trainable_mask

__all__ = ['METHODS', 'LastLayers', 'count_params', 'describe', 'lora', 'lora_spec', 'prepare', 'trainable_mask']


def lora_spec(lora_cfg, dora: bool = False) -> LoraSpec:
    """`config.peft.lora` as a LoraSpec, with errors naming the key."""
    rank = lora_cfg.rank
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"config.peft.lora.rank must be a positive integer, got {rank!r}.")
    if not lora_cfg.alpha or lora_cfg.alpha <= 0:
        raise ValueError(f"config.peft.lora.alpha must be positive, got {lora_cfg.alpha!r} (PEFT's usual: 2 x rank).")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ValueError(f"config.peft.lora.dropout must be in [0, 1), got {lora_cfg.dropout!r}.")
    targets = tuple(lora_cfg.targets or ())
    if not targets:
        raise ValueError("config.peft.lora.targets is empty: give regexes over module paths, e.g. "
                         "['(q|k|v|o)_proj$', '(gate|up|down)_proj$'].")
    if lora_cfg.get('lr_ratio', 1.0) <= 0:
        raise ValueError(f"config.peft.lora.lr_ratio must be positive, got {lora_cfg.lr_ratio!r}.")
    return LoraSpec(rank=int(rank), alpha=float(lora_cfg.alpha), targets=targets, dropout=float(lora_cfg.dropout),
                    rslora=bool(lora_cfg.rslora), dora=dora)


def _with_runtime(pre: Pretrained, model_cfg) -> Pretrained:
    """Applies `model.remat` and `model.dtype` (compute dtype) from the config to the module."""
    changes = {}
    remat = model_cfg.get('remat', None)
    if remat is not None and remat != pre.config.remat:
        changes['remat'] = remat
    dtype = model_cfg.get('dtype', None)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(pre.config.dtype):
        changes['dtype'] = jnp.dtype(dtype)
    if not changes:
        return pre
    logging.info('model: %s', ', '.join(f'{k}={v}' for k, v in changes.items()))
    cfg = dataclasses.replace(pre.config, **changes)
    return dataclasses.replace(pre, model=build_model(cfg), config=cfg)


def prepare(pre: Pretrained, config, rng):
    """Applies `config.peft` to `pre`: (Pretrained with adapters if any, trainable mask like its params).

    A model loaded with an adapter (`model.adapter`) keeps that adapter and trains it on.
    """
    method = config.peft.method
    if method not in METHODS:
        raise ValueError(f"config.peft.method={method!r} is not one of {list(METHODS)}.")
    pre = _with_runtime(pre, config.model)
    if method in ('lora', 'dora'):
        spec = lora_spec(config.peft.lora, dora=method == 'dora')
        loaded = pre.config.lora
        if loaded is None:
            pre = lora.add_lora(pre, spec, rng)
        elif loaded.dora != spec.dora:
            raise ValueError(f"config.peft.method={method!r}, but the loaded adapter (config.model.adapter) is "
                             f"{'DoRA' if loaded.dora else 'LoRA'}; set config.peft.method="
                             f"{'dora' if loaded.dora else 'lora'!r}.")
        elif (loaded.rank, loaded.targets) != (spec.rank, spec.targets):
            logging.warning('Training the loaded adapter (rank %d, targets %s); config.peft.lora (rank %d, '
                            'targets %s) is ignored.', loaded.rank, loaded.targets, spec.rank, spec.targets)
    mask = trainable_mask(pre.params, config.peft, pre.config.num_layers)
    logging.info('peft.method=%s: %s', method, describe(mask))
    return pre, mask


def count_params(tree) -> int:
    """Number of scalars in the array leaves of a tree (params, a trainable subset, optimizer state)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree) if hasattr(x, 'shape')))
