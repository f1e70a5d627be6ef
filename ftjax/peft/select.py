"""Which parameters train: a mask with the structure of the params, built from `config.peft`.

A mask leaf is `True` (the leaf trains), `False` (frozen), or `LastLayers(n)` for a stacked block
leaf (leading 'layers' axis, as `nn.scan` stores them) of which only the last `n` layers train.
An Optax mask cannot freeze part of one array, so `ftjax.state.partition` splits such a leaf into
its frozen first layers and its trainable last layers, and `ftjax.state.combine` concatenates them
again for the forward pass. The frozen slice then has no optimizer state and no master copy, and
its layers stay bit-identical because the optimizer never sees them. The cost: every step builds
the whole stacked leaf (one transient copy of it), and the backward pass of the scan produces its
gradient for all layers before the frozen layers' part is dropped (one transient gradient buffer
the size of the stacked leaf, not kept across steps).

Selections (unions; see `ftjax.config.default_config`, keys `peft.*`):
  full     everything trains.
  partial  `trainable` regexes over '/'-joined paths, `last_n_blocks`, `embeddings`, `norms`,
           `biases` (BitFit), `head` (a classifier's pooler + classifier; a linear probe alone).
  lora     the adapter leaves, plus any of the partial selections (e.g. norms and the head).
  dora     as lora, with the DoRA magnitude vectors.
"""
import dataclasses
import re

from flax import traverse_util

from ftjax.errors import ConfigError
from ftjax.models.adapters import is_adapter
from ftjax.tree import path_str

# What the conveniences select, as regexes over '/'-joined parameter paths.
EMBEDDINGS = r'embed/embedding$'  # Llama 'embed/embedding'; BERT 'token_embed/embedding', ...
NORMS = r'norm[^/]*/(scale|bias)$'  # attn_norm, mlp_norm, final_norm, embed_norm
BIASES = r'(^|/)bias$'  # every bias, norms' included (BitFit)
HEAD = r'^(pooler|classifier)/'  # a classification head (encoders with num_labels)
BLOCKS = 'layers/'  # the stacked blocks


@dataclasses.dataclass(frozen=True)
class LastLayers:
    """Mask leaf: the last `n` entries along the leading 'layers' axis train, the others are frozen."""
    n: int


def _matching(paths, pattern):
    rx = re.compile(pattern)
    return {p for p in paths if rx.search(p)}


def _examples(paths, n=12):
    paths = sorted(paths)
    more = f' ... ({len(paths)} in all)' if len(paths) > n else ''
    return ', '.join(paths[:n]) + more


def trainable_mask(params, peft_cfg, num_layers: int):
    """A tree like `params` of True / False / LastLayers(n), from `config.peft`.

    `peft_cfg` is valid (`ftjax.config.validate`); raises ValueError naming the config key for what
    only the model can tell: a regex or convenience that selects nothing, `last_n_blocks` above the
    model's layers, or (partial) an empty selection.
    """
    method = peft_cfg.method
    flat = {path_str(p): p for p in traverse_util.flatten_dict(params)}
    paths = set(flat)
    if method == 'full':
        return traverse_util.unflatten_dict({flat[p]: True for p in paths})
    whole = set()  # paths that train entirely
    if method in ('lora', 'dora'):
        adapters = {p for p in paths if is_adapter(p)}
        if not adapters:
            raise ConfigError(f"config.peft.method={method!r} but the model has no adapter leaves; "
                             f"`ftjax.peft.prepare` adds them (check config.peft.lora.targets).")
        whole |= adapters
    for pattern in peft_cfg.trainable:
        hit = _matching(paths, pattern)
        if not hit:
            raise ConfigError(f"config.peft.trainable: {pattern!r} matches no parameter. Parameter paths: "
                             f"{_examples(paths)}.")
        whole |= hit
    for key, pattern, what in (('embeddings', EMBEDDINGS, 'embedding tables'), ('norms', NORMS, 'norm parameters'),
                               ('biases', BIASES, 'bias parameters')):
        if peft_cfg[key]:
            hit = _matching(paths, pattern)
            if not hit:
                raise ConfigError(f"config.peft.{key}=True but this model has no {what} (no path matches "
                                 f"{pattern!r}); set config.peft.{key}=False.")
            whole |= hit
    if peft_cfg.head:  # "when there is one": decoders have none
        whole |= _matching(paths, HEAD)
    partly = {}
    n = peft_cfg.last_n_blocks
    if n > num_layers:
        raise ConfigError(f"config.peft.last_n_blocks={n} must be between 0 and the model's {num_layers} layers.")
    if n:
        blocks = {p for p in paths if p.startswith(BLOCKS) and not is_adapter(p)}
        if n == num_layers:
            whole |= blocks
        else:
            partly = {p: LastLayers(n) for p in blocks - whole}
    if not whole and not partly:
        raise ConfigError("config.peft.method='partial' selects no parameter: set config.peft.trainable (regexes "
                         "over parameter paths), config.peft.last_n_blocks, config.peft.embeddings, "
                         "config.peft.norms, config.peft.biases or config.peft.head (classifiers).")
    mask = {flat[p]: (True if p in whole else partly.get(p, False)) for p in paths}
    return traverse_util.unflatten_dict(mask)


def describe(mask) -> str:
    """A one-line summary of a mask: which leaves train (for logs and error messages)."""
    flat = {path_str(p): m for p, m in traverse_util.flatten_dict(mask).items()}
    whole = sorted(p for p, m in flat.items() if m is True)
    partly = sorted(f'{p}[-{m.n}:]' for p, m in flat.items() if isinstance(m, LastLayers))
    return f"{len(whole) + len(partly)} of {len(flat)} leaves train: {_examples(whole + partly, 8)}"
