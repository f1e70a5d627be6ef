"""Picking the next token from logits: greedy, or sampled after temperature / top-k / top-p; and the
log-probability of the picked token under the unmodified logits (what a train step computes for it).

The sampling mode is static (one compiled program per mode); the temperature and top-p value are traced.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError


class Mode(NamedTuple):
    """The static part of a sampling setting (hashable: a jit static argument)."""
    greedy: bool
    top_k: int  # 0 = no top-k filter
    use_top_p: bool


def mode_of(temperature: float, top_k: int, top_p: float, vocab_size: int) -> Mode:
    greedy = temperature == 0.0
    return Mode(greedy, 0 if greedy else min(int(top_k), vocab_size), not greedy and top_p < 1.0)


def check(max_new_tokens, temperature, top_k, top_p, n=1):
    """One-line errors for a bad sampling setting."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 = no top-k filter).")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus filter).")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n={n!r} (samples per prompt) must be a positive integer.")


def sample_logits(logits, key, temperature, top_p, mode: Mode):
    """Next ids [batch] from logits [batch, vocab]: argmax, or a sample after temperature / top-k / top-p."""
    logits = logits.astype(jnp.float32)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if mode.top_k:
        kth = jax.lax.top_k(logits, mode.top_k)[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if mode.use_top_p:
        ranked = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass before a token; the top one always stays
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def token_logp(logits, tok):
    """log softmax(logits)[tok] in float32: logits [batch, vocab] as the model gives them (no temperature, no
    filter), tok [batch] -> [batch]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
