"""LoRA / DoRA adapters added to a pretrained model (the math: `ftjax.models.adapters`).

The adapters are declared by `ftjax.models.layers.Dense` when the model config carries a
`LoraSpec`: `lora_a` [in, r] (PEFT's init), `lora_b` [r, out] (zeros, so step 0 is the base model),
and for DoRA `lora_magnitude` [out], set here to the column norms of the pretrained kernel.
Stacked (scanned) layers carry a leading 'layers' axis on every leaf; the math broadcasts.
"""
import dataclasses
import re

import flax.linen as nn
import jax
from flax import traverse_util

from ftjax.errors import ConfigError
from ftjax.models.adapters import LORA_A, LORA_B, MAGNITUDE, LoraSpec, dora_norm, is_adapter, map_adapted
from ftjax.models.loading import Pretrained, build_model, dummy_inputs
from ftjax.tree import overlay


def kernel_paths(params):
    """'/'-joined module paths of every Dense kernel, e.g. 'layers/q_proj'."""
    flat = traverse_util.flatten_dict(params)
    return ['/'.join(p[:-1]) for p in flat if p[-1] == 'kernel']


def check_targets(spec: LoraSpec, params, key='peft.lora.targets'):
    """Every target regex must match at least one kernel, else an error that lists the kernels."""
    if spec.rank <= 0:
        raise ConfigError(f"peft.lora.rank must be a positive integer, got {spec.rank}.")
    paths = kernel_paths(params)
    for t in spec.targets:
        try:
            rx = re.compile(t)
        except re.error as e:
            raise ConfigError(f"{key}: {t!r} is not a valid regex ({e}).") from e
        if not any(rx.search(p) for p in paths):
            raise ConfigError(f"{key}: {t!r} matches no kernel. Kernels of this model: {sorted(set(paths))}.")


def add_lora(pre: Pretrained, spec: LoraSpec, rng) -> Pretrained:
    """Returns the model rebuilt with adapters and its params extended by fresh adapter leaves."""
    check_targets(spec, pre.params)
    cfg = dataclasses.replace(pre.config, lora=spec)
    model = build_model(cfg)

    def init_adapters(key):  # XLA drops the unused base-weight initialisers
        variables = nn.unbox(model.init({'params': key, 'dropout': key}, *dummy_inputs(cfg)))
        flat = traverse_util.flatten_dict(variables['params'])
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_adapter(p)})

    adapters = jax.jit(init_adapters)(rng)
    params = overlay(pre.params, adapters)
    if spec.dora:
        params = init_dora_magnitude(params, spec)
    return dataclasses.replace(pre, model=model, params=params, config=cfg)


def init_dora_magnitude(params, spec: LoraSpec):
    """DoRA starts with m = ||W + s B A|| per output feature, so step 0 is the base model."""
    def fn(mod):
        mod = dict(mod)
        mod[MAGNITUDE] = dora_norm(mod['kernel'], mod[LORA_A], mod[LORA_B], spec.scale)
        return mod
    return map_adapted(params, fn)
