"""Log-likelihoods of (context, continuation) requests in bucketed batches: what lm-eval's `loglikelihood`
and `loglikelihood_rolling` requests need (`ftjax.eval.harness`), run by `Sampler.loglikelihoods`.

The model input of a request is the last `max_length` tokens of (context + continuation)[:-1], as in lm-eval's
`hf` backend. Requests with the same input (one-token continuations of one context: the choices of a
multiple-choice question) share one row and differ only in the token read at its last position, gathered
among K candidates (K a power of two, at most MAX_CANDIDATES). Rows are right-padded to a bucketed length
(`prompts.bucket`), longest first, so a whole evaluation compiles a handful of programs.
"""
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ftjax.errors import ConfigError
from ftjax.infer import prompts as prompts_lib

MAX_CANDIDATES = 16  # last-token candidates gathered per shared row


def fetch(x):
    """A (possibly sharded) array as host numpy, on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.partial(jax.jit, static_argnames=('model',))
def score_rows(model, params, tokens, segment_ids, last_pos, candidates):
    """tokens, segment_ids: [rows, len] right-padded inputs (segment 0 = padding); last_pos: [rows] each row's
    last input position; candidates: [rows, K] token ids wanted at that position.
    -> next_logp [rows, len] (log p of the next input token at each position), cand_logp [rows, K],
       greedy [rows, len] (the argmax token at each position)."""
    logits = model.apply({'params': params}, tokens, None, segment_ids).astype(jnp.float32)  # [rows, len, vocab]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [rows, len]: log p = logit - lse, no [rows, len, vocab] copy
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # [rows, len]; the last column is unused
    next_logp = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0] - lse
    last = jnp.take_along_axis(logits, last_pos[:, None, None], axis=1)[:, 0]  # [rows, vocab]
    cand_logp = jnp.take_along_axis(last, candidates, axis=-1) - jnp.take_along_axis(lse, last_pos[:, None], axis=1)
    return next_logp, cand_logp, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def group(requests: Sequence, max_length: int):
    """[(model input ids, [(request index, continuation length, last continuation token)])], at most
    MAX_CANDIDATES requests per entry, longest input first."""
    groups = {}
    for i, (ctx, cont) in enumerate(requests):
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        if not len(cont) or len(cont) >= len(whole):
            raise ConfigError(f'request {i}: a continuation of {len(cont)} tokens after a context of {len(ctx)} '
                              f'does not fit max_length={max_length} (or one of them is empty).')
        groups.setdefault(tuple(int(t) for t in whole[:-1]), []).append((i, len(cont), int(whole[-1])))
    entries = [(inp, reqs[j:j + MAX_CANDIDATES]) for inp, reqs in groups.items()
               for j in range(0, len(reqs), MAX_CANDIDATES)]
    entries.sort(key=lambda e: -len(e[0]))  # each batch's length is its first row's
    return entries


def loglikelihoods(engine, params, requests: Sequence, max_length: int, on_batch: Optional[Callable] = None):
    """requests: [(context_ids, continuation_ids)], both non-empty -> [(sum of log p(continuation | context),
    whether greedy decoding gives the continuation)], in order. engine: a `Sampler` (rows, mesh);
    `on_batch(k)`: called with the requests done."""
    entries = group(requests, max_length)
    out, done = [None] * len(requests), 0
    for b in range(0, len(entries), engine.rows):
        batch = entries[b:b + engine.rows]
        length, rows = prompts_lib.bucket(len(batch[0][0])), engine.rows_for(len(batch))
        k = prompts_lib.pow2(max(len(reqs) for _, reqs in batch))
        tokens = np.zeros((rows, length), np.int32)  # [rows, len], right-padded
        seg = np.zeros((rows, length), np.int32)
        last_pos = np.zeros((rows,), np.int32)
        cands = np.zeros((rows, k), np.int32)
        for r, (inp, reqs) in enumerate(batch):
            tokens[r, :len(inp)], seg[r, :len(inp)], last_pos[r] = inp, 1, len(inp) - 1
            cands[r, :len(reqs)] = [last for _, _, last in reqs]
        with engine.context():
            next_logp, cand_logp, greedy = map(fetch, score_rows(engine.model, params,
                                                                 *engine.put_rows(tokens, seg, last_pos, cands)))
        for r, (inp, reqs) in enumerate(batch):
            n = len(inp)
            targets = np.asarray(inp[1:], np.int32)
            for j, (i, c, last) in enumerate(reqs):
                logp = float(np.sum(next_logp[r, n - c:n - 1], dtype=np.float64) + cand_logp[r, j])
                hit = bool(np.all(greedy[r, n - c:n - 1] == targets[n - c:]) and greedy[r, n - 1] == last)
                out[i] = (logp, hit)
                done += 1
        if on_batch is not None:
            on_batch(done)
    return out
