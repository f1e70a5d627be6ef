"""Paths into nested trees (params, masks, optimizer state, configs) and the sizes of trees.

A parameter path is written '/'-joined ('layers/q_proj/kernel') in masks, regexes, checkpoints and
error messages, whether it came from `jax.tree_util` (DictKey / GetAttrKey / SequenceKey entries) or
from `flax.traverse_util.flatten_dict` (tuples of strings).
"""
import jax
import numpy as np
from flax import traverse_util


def path_str(path) -> str:
    """'layers/q_proj/kernel' from a jax key path (dict keys) or a tuple of names."""
    return '/'.join(str(getattr(k, 'key', k)) for k in path)


def get_path(tree, path):
    """The node at `path` (a sequence of keys, or a '.'-dotted string as config keys are written)."""
    for key in (path.split('.') if isinstance(path, str) else path):
        tree = tree[key]
    return tree


def overlay(base, extra):
    """`base` with every leaf of `extra` added (or replaced) at its path; both nested dicts."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(extra))
    return traverse_util.unflatten_dict(flat)


def count_params(tree) -> int:
    """Number of scalars in the array leaves of a tree (params, a trainable subset, optimizer state)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree) if hasattr(x, 'shape')))
