"""The Optax optimizer and learning-rate schedule from `config.optim`, for the trainable params only.

  clip by global norm -> AdamW / Adafactor / SGD scaling -> weight decay (masked: none on norms and
  biases) -> learning rate (warmup + cosine / linear / constant) -> per-group multipliers
  (`optim.lr_multipliers` regexes, LoRA+'s `peft.lora.lr_ratio` on `lora_b`).

The optimizer sees only `state.trainable` (see `ftjax.state`), so frozen leaves have no state.
Gradient accumulation (`optim.grad_accum`) happens inside the train step, before this runs.
"""
import re

import jax
import optax

from ftjax.errors import ConfigError
from ftjax.config import validate
from ftjax.models.adapters import LORA_B
from ftjax.tree import path_str


def make_schedule(optim_cfg, total_steps: int):
    """Step -> learning rate. Warmup is linear, peak * (step + 1) / warmup_steps, so the first step
    already moves; then `schedule` decays from the peak to `end_lr_ratio` x peak at `total_steps`.
    `optim_cfg` is valid (`ftjax.config.validate`)."""
    o = optim_cfg
    peak, warm = float(o.learning_rate), int(o.warmup_steps)
    decay_steps = max(int(total_steps) - warm, 1)
    end = float(o.end_lr_ratio)
    if o.schedule == 'constant':
        main = optax.constant_schedule(peak)
    elif o.schedule == 'cosine':
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=end)
    else:  # linear
        main = optax.linear_schedule(peak, peak * end, decay_steps)
    if warm == 0:
        return main
    warmup = optax.linear_schedule(peak / warm, peak, max(warm - 1, 1))
    return optax.join_schedules([warmup, main], [warm])


def _paths(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def decay_mask(optim_cfg, trainable_params):
    """True where weight decay applies: every leaf whose path matches none of `optim.no_decay`."""
    rules = [re.compile(pattern) for pattern in optim_cfg.no_decay]
    return jax.tree.map(lambda p: not any(r.search(p) for r in rules), _paths(trainable_params))


def lr_multipliers(config, trainable_params):
    """A tree of floats: `optim.lr_multipliers` ('regex=multiplier', the first match wins) times
    `peft.lora.lr_ratio` on `lora_b` leaves (LoRA+)."""
    rules = [(re.compile(pattern), float(value))
             for pattern, _, value in (rule.rpartition('=') for rule in config.optim.lr_multipliers)]
    paths = _paths(trainable_params)
    flat = jax.tree.leaves(paths)
    for rx, _ in rules:
        if not any(rx.search(p) for p in flat):
            raise ConfigError(f"config.optim.lr_multipliers: {rx.pattern!r} matches no trainable parameter "
                             f"(trainable: {', '.join(sorted(flat)[:10])}{' ...' if len(flat) > 10 else ''}).")
    ratio = float(config.peft.lora.lr_ratio)

    def multiplier(path):
        m = next((v for rx, v in rules if rx.search(path)), 1.0)
        return m * ratio if path.endswith(LORA_B) else m
    return jax.tree.map(multiplier, paths)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its leaf's constant (a stateless, per-group learning rate)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, trainable_params, total_steps: int):
    """(tx, lr_schedule) for `trainable_params` (arrays or shape structs; only the tree is read)."""
    o = validate(config.optim, 'optim')
    schedule = make_schedule(o, total_steps)
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    if o.name == 'adamw':
        parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    elif o.name == 'adafactor':
        parts.append(optax.scale_by_factored_rms())
    elif o.momentum:  # sgd
        parts.append(optax.trace(decay=float(o.momentum)))
    if o.weight_decay:
        parts.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask(o, trainable_params)))
    parts.append(optax.scale_by_learning_rate(schedule))
    mult = lr_multipliers(config, trainable_params)
    if any(m != 1.0 for m in jax.tree.leaves(mult)):
        parts.append(scale_by_tree(mult))
    return optax.chain(*parts), schedule
