"""LoRA / DoRA adapters: add them to a pretrained model, and merge them back into the kernels.

The adapters are declared by `ftjax.models.layers.Dense` when the model config carries a
`LoraSpec`: `lora_a` [in, r] (PEFT's init), `lora_b` [r, out] (zeros, so step 0 is the base model),
and for DoRA `lora_magnitude` [out], set here to the column norms of the pretrained kernel.
Stacked (scanned) layers carry a leading 'layers' axis on every leaf; the math below broadcasts.
"""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ftjax.models.layers import LoraSpec, dora_norm
from ftjax.models.loading import Pretrained, build_model, dummy_inputs

LORA_LEAVES = ('lora_a', 'lora_b', 'lora_magnitude')


def is_adapter(path) -> bool:
    return path[-1] in LORA_LEAVES


def kernel_paths(params):
    """'/'-joined module paths of every Dense kernel, e.g. 'layers/q_proj'."""
    flat = traverse_util.flatten_dict(params)
    return ['/'.join(p[:-1]) for p in flat if p[-1] == 'kernel']


def check_targets(spec: LoraSpec, params, key='peft.lora.targets'):
    """Every target regex must match at least one kernel, else an error that lists the kernels."""
    if spec.rank <= 0:
        raise ValueError(f"peft.lora.rank must be a positive integer, got {spec.rank}.")
    paths = kernel_paths(params)
    for t in spec.targets:
        try:
            rx = re.compile(t)
        except re.error as e:
            raise ValueError(f"{key}: {t!r} is not a valid regex ({e}).") from e
        if not any(rx.search(p) for p in paths):
            raise ValueError(f"{key}: {t!r} matches no kernel. Kernels of this model: {sorted(set(paths))}.")


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
    params = combine(pre.params, adapters)
    if spec.dora:
        params = init_dora_magnitude(params, spec)
    return dataclasses.replace(pre, model=model, params=params, config=cfg)


def combine(base, adapters):
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters))
    return traverse_util.unflatten_dict(flat)


def split(params):
    """(base params, adapter params) as two trees."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not is_adapter(p)}
    ada = {p: v for p, v in flat.items() if is_adapter(p)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(ada)


def _map_adapted(params, fn):
    """Applies fn(module_dict) -> module_dict to every module that holds `lora_a`."""
    def visit(tree):
        if not isinstance(tree, dict):
            return tree
        if 'lora_a' in tree:
            return fn(tree)
        return {k: visit(v) for k, v in tree.items()}
    return visit(params)


def init_dora_magnitude(params, spec: LoraSpec):
    """DoRA starts with m = ||W + s B A|| per output feature, so step 0 is the base model."""
    def fn(mod):
        mod = dict(mod)
        mod['lora_magnitude'] = dora_norm(mod['kernel'], mod['lora_a'], mod['lora_b'], spec.scale)
        return mod
    return _map_adapted(params, fn)


def merged_kernel(mod, spec: LoraSpec):
    """W + s A B for LoRA; m * (W + s A B) / ||W + s A B|| for DoRA. Shapes [..., in, out]."""
    kernel = mod['kernel']
    w = kernel.astype(jnp.float32) + spec.scale * (mod['lora_a'] @ mod['lora_b'])
    if 'lora_magnitude' in mod:
        norm = jnp.sqrt(jnp.sum(w * w, axis=-2, keepdims=True))  # [..., 1, out]
        w = w * (mod['lora_magnitude'][..., None, :] / norm)
    return w.astype(kernel.dtype)


def merge(params, spec: LoraSpec):
    """Folds every adapter into its kernel and drops the adapter leaves (pure; the base tree comes back)."""
    def fn(mod):
        out = {k: v for k, v in mod.items() if k not in LORA_LEAVES}
        out['kernel'] = merged_kernel(mod, spec)
        return out
    return _map_adapted(params, fn)
