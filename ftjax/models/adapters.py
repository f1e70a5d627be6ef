"""LoRA / DoRA math, in one place for the forward pass (`layers.Dense`), fine-tuning (`ftjax.peft`) and
export (`ftjax.export`).

A targeted `Dense` keeps its `kernel` [in, out] and adds `lora_a` [in, r] and `lora_b` [r, out] beside
it, plus `lora_magnitude` [out] for DoRA. Stacked (scanned) layers carry a leading 'layers' axis on
every leaf; everything below broadcasts over it.

  adapted kernel   W' = W + s A B,   s = alpha / r (or alpha / sqrt(r) with rsLoRA)
  LoRA             y = x W + s (x A) B
  DoRA             y = m / ||W'|| * (x W'),  ||.|| the column norm per output feature, detached
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from ftjax.config import LORA_TARGETS_ATTN_MLP
from ftjax.models import quantize

DEFAULT_TARGETS = tuple(LORA_TARGETS_ATTN_MLP)  # regexes over module paths: every attention and MLP projection
LORA_A, LORA_B, MAGNITUDE = 'lora_a', 'lora_b', 'lora_magnitude'
LORA_LEAVES = (LORA_A, LORA_B, MAGNITUDE)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which `Dense` layers get adapters, and how they are scaled (PEFT's semantics)."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS  # regexes over '/'-joined module paths
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False  # add a magnitude vector (Liu et al., 2024)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def matches(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.targets)


def is_adapter(path) -> bool:
    """Whether a parameter path (a tuple of names, or '/'-joined) is an adapter leaf."""
    last = path.rsplit('/', 1)[-1] if isinstance(path, str) else path[-1]
    return last in LORA_LEAVES


def lora_a_init(key, shape, dtype=jnp.float32):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def adapted_kernel(kernel, a, b, scale):
    """W + s A B in float32: kernel [..., in, out], a [..., in, r], b [..., r, out]."""
    return kernel.astype(jnp.float32) + scale * (a @ b)


def column_norm(w):
    """||w|| per output feature: [..., in, out] -> [..., out]."""
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


def dora_norm(kernel, a, b, scale):
    """Column norm of the adapted weight, ||W + s A B|| per output feature [..., out], detached as in the paper."""
    return jax.lax.stop_gradient(column_norm(adapted_kernel(kernel, a, b, scale)))


def merged_kernel(mod, spec: LoraSpec):
    """W + s A B for LoRA; m * (W + s A B) / ||W + s A B|| for DoRA. Shapes [..., in, out]."""
    kernel = mod['kernel']
    kernel = quantize.dequantize(kernel) if quantize.is_quantized(kernel) else kernel  # a quantized base: float32
    w = adapted_kernel(kernel, mod[LORA_A], mod[LORA_B], spec.scale)
    if MAGNITUDE in mod:
        w = w * (mod[MAGNITUDE] / column_norm(w))[..., None, :]  # [..., 1, out]
    return w.astype(kernel.dtype)


def map_adapted(params, fn):
    """Applies fn(module_dict) -> module_dict to every module that holds `lora_a`."""
    def visit(tree):
        if not isinstance(tree, dict):
            return tree
        if LORA_A in tree:
            return fn(tree)
        return {k: visit(v) for k, v in tree.items()}
    return visit(params)


def merge(params, spec: LoraSpec):
    """Folds every adapter into its kernel and drops the adapter leaves (pure; the base tree comes back)."""
    def fn(mod):
        out = {k: v for k, v in mod.items() if k not in LORA_LEAVES}
        out['kernel'] = merged_kernel(mod, spec)
        return out
    return map_adapted(params, fn)


def adapted_paths(params):
    """Module paths (tuples) that hold a LoRA adapter, e.g. ('layers', 'q_proj')."""
    return sorted({p[:-1] for p in traverse_util.flatten_dict(params) if p[-1] == LORA_A})
