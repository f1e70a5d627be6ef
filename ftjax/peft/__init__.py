"""Parameter-efficient and partial fine-tuning: adapters and trainable-parameter selection.

`prepare(pre, config, rng)` applies `config.peft` to a loaded model: LoRA/DoRA add adapter leaves
beside the targeted kernels (base paths unchanged), and every method returns the trainable mask
(`ftjax.peft.select`) that `ftjax.state.create_state` splits the params by.
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError
from ftjax.config import validate
from ftjax.models import kernels
from ftjax.models.adapters import LoraSpec
from ftjax.models.loading import Pretrained, build_model
from ftjax.peft import lora
from ftjax.peft.select import LastLayers, describe, trainable_mask

__all__ = ['LastLayers', 'describe', 'lora', 'lora_spec', 'prepare', 'trainable_mask']


def lora_spec(lora_cfg, dora: bool = False) -> LoraSpec:
    """`config.peft.lora` (checked against the schema, `ftjax.config`) as a LoraSpec."""
    validate(lora_cfg, 'peft.lora')
    return LoraSpec(rank=lora_cfg.rank, alpha=float(lora_cfg.alpha), targets=tuple(lora_cfg.targets),
                    dropout=float(lora_cfg.dropout), rslora=lora_cfg.rslora, dora=dora)


def _with_runtime(pre: Pretrained, model_cfg, platform: str) -> Pretrained:
    """Applies `model.remat`, `model.dtype` (compute dtype) and `model.kernels` (resolved for `platform`) from
    the config to the module."""
    changes = {}
    kind = kernels.resolve(model_cfg.kernels, platform)
    if kind != pre.config.kernels:
        changes['kernels'] = kind
    if model_cfg.remat != pre.config.remat:
        changes['remat'] = model_cfg.remat
    if model_cfg.offload_frozen != pre.config.offload_frozen:
        changes['offload_frozen'] = bool(model_cfg.offload_frozen)
    for key in ('context_parallel', 'context_load_balance', 'moe_impl', 'moe_capacity_factor', 'moe_dispatch',
                'router_z_loss_coef'):  # decoders only
        if hasattr(pre.config, key) and model_cfg[key] != getattr(pre.config, key):
            changes[key] = model_cfg[key]
    coef = model_cfg.router_aux_loss_coef
    if coef is not None and getattr(pre.config, 'num_experts', 0) and coef != pre.config.router_aux_loss_coef:
        changes['router_aux_loss_coef'] = coef
    if jnp.dtype(model_cfg.dtype) != jnp.dtype(pre.config.dtype):
        changes['dtype'] = jnp.dtype(model_cfg.dtype)
    if not changes:
        return pre
    logging.info('model: %s', ', '.join(f'{k}={v}' for k, v in changes.items()))
    cfg = dataclasses.replace(pre.config, **changes)
    return dataclasses.replace(pre, model=build_model(cfg), config=cfg)


def prepare(pre: Pretrained, config, rng, platform: str | None = None):
    """Applies `config.peft` to `pre`: (Pretrained with adapters if any, trainable mask like its params).

    `platform` is where the step will run ('cpu', 'tpu', 'gpu'; this process's backend by default):
    `ftjax.compile_check` passes its target topology's, so a TPU-only kernel setting compiles from a CPU.

    A model loaded with an adapter (`model.adapter`) keeps that adapter and trains it on.
    """
    method = validate(config.peft, 'peft').method
    pre = _with_runtime(pre, config.model, platform or jax.default_backend())
    if method in ('lora', 'dora'):
        spec = lora_spec(config.peft.lora, dora=method == 'dora')
        loaded = pre.config.lora
        if loaded is None:
            pre = lora.add_lora(pre, spec, rng)
        elif loaded.dora != spec.dora:
            raise ConfigError(f"config.peft.method={method!r}, but the loaded adapter (config.model.adapter) is "
                             f"{'DoRA' if loaded.dora else 'LoRA'}; set config.peft.method="
                             f"{'dora' if loaded.dora else 'lora'!r}.")
        elif (loaded.rank, loaded.targets) != (spec.rank, spec.targets):
            logging.warning('Training the loaded adapter (rank %d, targets %s); config.peft.lora (rank %d, '
                            'targets %s) is ignored.', loaded.rank, loaded.targets, spec.rank, spec.targets)
    mask = trainable_mask(pre.params, config.peft, pre.config.num_layers)
    logging.info('peft.method=%s: %s', method, describe(mask))
    return pre, mask
