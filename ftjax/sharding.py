"""The (data, fsdp, tensor, context) mesh, logical-to-mesh rules, and shardings for params, state and batches.

One code path from one CPU to a TPU pod: the mesh shape comes from `config.mesh`, the rules map the
models' logical axis names ('embed', 'mlp', 'heads', ...) to mesh axes, and every array of the
train state gets a `NamedSharding` derived from the parameter it belongs to.
"""
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.config import MESH_AXES
from ftjax.errors import ConfigError
from ftjax.models import quantize

BATCH_AXES = ('data', 'fsdp', 'expert')  # 'expert': data parallel outside the MoE MLPs


def mesh_shape(mesh_cfg, num_devices: int):
    """(data, fsdp, tensor, context, expert) sizes; one of them may be -1 for 'all remaining devices' (a missing axis: 1)."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: only one of mesh.data/mesh.fsdp/mesh.tensor/mesh.context/mesh.expert may be -1, "
                          f"got {sizes}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({known}).")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor*context*expert = {math.prod(sizes)} but there are {num_devices} devices; "
                         f"set one axis to -1 or make the product match.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(rules_cfg):
    """Config rules ([['embed', 'fsdp'], ['activation_batch', ['data', 'fsdp']], ...]) as flax's tuples."""
    out = []
    for rule in rules_cfg:
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"mesh.rules: {name!r} -> {a!r} is not a mesh axis; use one of {MESH_AXES}.")
        out.append((name, axes))
    return tuple(out)


def logical_specs(abstract_variables):
    """The logical PartitionSpec of every param, from `jax.eval_shape(model.init, ...)` output."""
    return nn.get_partition_spec(abstract_variables)['params']


def param_shardings(specs, mesh, rules, params=None):
    """NamedSharding per param; a dimension whose size the mesh axis does not divide stays unsharded. With
    `params`, each quantized leaf gets one sharding per part, its blocks never split
    (`ftjax.models.quantize.partition_specs`)."""
    if params is not None:
        specs = quantize.partition_specs(specs, params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _divisible(sharding, shape):
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    fixed = []
    for dim, axes in zip(shape, spec):
        names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
        size = math.prod(sharding.mesh.shape[a] for a in names)
        fixed.append(axes if size and dim % size == 0 else None)
    return NamedSharding(sharding.mesh, P(*fixed))


def _path_key(path):
    """Trailing dict keys (and attribute names) of a pytree path, '/'-joined: 'layers/q_proj/kernel', or
    'layers/q_proj/kernel/parts/q' for a part of a quantized kernel (`ftjax.models.quantize.QArray`)."""
    keys = []
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            keys.append(k.name)
        else:
            break
    return '/'.join(reversed(keys))


def tree_shardings(abstract_tree, param_sharding_tree, mesh):
    """Shardings for any tree whose leaves live under parameter paths (state, optimizer moments).

    A leaf takes the sharding of the parameter whose path its own path ends with, when the shapes
    agree (AdamW's mu/nu); anything else (step counters, factored statistics) is replicated.
    """
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(
            param_sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]:
        by_path[_path_key(path)] = s
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = _path_key(path)
        shape = getattr(leaf, 'shape', ())
        parts = key.split('/')
        for i in range(len(parts)):  # longest suffix first
            s = by_path.get('/'.join(parts[i:]))
            if s is not None:
                return _divisible(s, shape) if len(s.spec) <= len(shape) else replicated
        return replicated
    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def batch_sharding(mesh) -> NamedSharding:
    """Batches are split over data x fsdp along their leading (batch) axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards() -> int:
    """How many ways the batch axis is split on the mesh set with `jax.set_mesh` (1 when none is set):
    while tracing the step, the size of data x fsdp."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def place(tree, shardings):
    """Host numpy/jax arrays -> global arrays in their shardings; each process fills its own shards."""
    def put(x, s):
        x = np.asarray(x) if not isinstance(x, jax.Array) or not x.is_fully_addressable else x
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def maybe_initialize_distributed(distributed: bool, coordinator_address=None, num_processes=None,
                                 process_id=None):
    """`jax.distributed.initialize` when asked: auto-detected on TPU pods, explicit elsewhere."""
    if not distributed and coordinator_address is None:
        return
    kwargs = {}
    if coordinator_address is not None:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
