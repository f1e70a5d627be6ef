"""The train state: trainable params (master copy), frozen params, optimizer state for the trainable only.

Freezing is structural: the optimizer is built for, initialised on and updated with the trainable
subtree alone, and the train step differentiates with respect to it alone. A frozen leaf therefore
has no optimizer state and no gradient buffer, and it may be stored in a lower precision
(`model.frozen_dtype`, e.g. bfloat16) than the trainable float32 master copy, or quantized
(`model.quantize`, `ftjax.models.quantize.QArray` leaves, kept as they are).

A stacked block leaf of which only the last layers train (`peft.last_n_blocks`, mask leaf
`LastLayers(n)`) is split along its leading 'layers' axis: the same path then appears in both
subtrees, frozen layers first, and `combine` concatenates them back (see `ftjax.peft.select`).
Everything is a plain pytree, so orbax saves it and jit donates and shards it.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from ftjax.models.quantize import is_quantized
from ftjax.peft.select import LastLayers


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer steps taken (skipped non-finite steps included)
    trainable: Any  # the params that train, nested dicts; stacked leaves may hold only their last layers
    frozen: Any  # every other param (or the first layers of a partly trained stacked leaf)
    opt_state: Any  # optax state of `trainable` only
    nan_count: jax.Array  # int32 []: steps whose loss or gradients were not finite

    def params(self):
        """The whole parameter tree for `model.apply`."""
        return combine(self.trainable, self.frozen)


def partition(params, mask):
    """(trainable, frozen) subtrees of `params` by a mask of True / False / LastLayers(n) leaves."""
    flat_p = traverse_util.flatten_dict(params)
    flat_m = traverse_util.flatten_dict(mask)
    if set(flat_p) != set(flat_m):
        only_p = sorted('/'.join(p) for p in set(flat_p) - set(flat_m))[:5]
        only_m = sorted('/'.join(p) for p in set(flat_m) - set(flat_p))[:5]
        raise ValueError(f"The trainable mask does not fit the params (only in params: {only_p}, only in the "
                         f"mask: {only_m}); build it with ftjax.peft.prepare on these params.")
    trainable, frozen = {}, {}
    for path, x in flat_p.items():
        m = flat_m[path]
        if isinstance(m, LastLayers):
            cut = x.shape[0] - m.n  # [layers, ...]: layers [:cut] frozen, [cut:] train
            frozen[path], trainable[path] = x[:cut], x[cut:]
        elif m:
            trainable[path] = x
        else:
            frozen[path] = x
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable, frozen):
    """The inverse of `partition`: a path in both subtrees is concatenated, frozen layers first."""
    flat = traverse_util.flatten_dict(frozen)
    for path, x in traverse_util.flatten_dict(trainable).items():
        if path in flat:
            flat[path] = jnp.concatenate([flat[path].astype(x.dtype), x], axis=0)  # [layers, ...]
        else:
            flat[path] = x
    return traverse_util.unflatten_dict(flat)


def create_state(params, mask, tx, frozen_dtype='float32', param_dtype=None) -> TrainState:
    """Splits `params` by `mask`, casts the frozen part to `frozen_dtype` (and the trainable part to
    `param_dtype` when given) and initialises `tx` on the trainable part only. Jit it (with
    out_shardings) to build the state on the devices."""
    trainable, frozen = partition(params, mask)
    cast = lambda dtype: (lambda x: jnp.asarray(x, jnp.dtype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating)
                          else jnp.asarray(x))
    keep_quantized = lambda x: jax.tree.map(jnp.asarray, x) if is_quantized(x) else cast(frozen_dtype)(x)
    frozen = jax.tree.map(keep_quantized, frozen, is_leaf=is_quantized)  # quantized leaves keep their scales
    trainable = jax.tree.map(cast(param_dtype) if param_dtype else jnp.asarray, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), nan_count=jnp.zeros((), jnp.int32))
