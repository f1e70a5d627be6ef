"""The precomputed reference of a preference objective (`align.reference='precomputed'`: full / partial fine-tuning,
or training on a loaded adapter): the starting model's summed answer log-probs of every pair, computed once before
training and carried by each batch as 'ref_logps' [batch, 2].

They are kept in a cache beside the data's (`cache_dir`), keyed by the starting model's identity (base weights'
hash, adapter files, model keys: `ftjax.build.start_identity`) and the tokenised rows (`data_digest`), so a
restart (or a sweep) reads them instead of running the model again.
"""
import hashlib
import logging
import os
import time

import jax
import numpy as np

from ftjax.data.locations import cache_root
from ftjax.data.packing import take_rows
from ftjax.objectives.preference import answer_logps


def cache_dir(config):
    """Where precomputed reference log-probs are kept: beside the data cache (`data.cache_dir`), else under
    $FTJAX_CACHE (~/.cache/ftjax)."""
    return os.path.join(config.data.cache_dir or cache_root(), 'reference_logps')


def data_digest(data):
    """A hash of a TokenizedData's rows: tokens, answer masks and how they are cut into sequences and rows."""
    h = hashlib.sha256(f'{data.task}:{data.max_length}'.encode())
    for name in ('tokens', 'offsets', 'row_offsets', 'row_examples', 'answer'):
        h.update(np.ascontiguousarray(getattr(data, name)).tobytes())
    return h.hexdigest()


def attach_reference(model, params, data, batch_size=8, chunk_tokens=512, cache=None, identity=None):
    """Computes the model's summed answer log-probs of every row of `data` (a preference TokenizedData) once
    and stores them as `data.ref_logps` [rows, 2] (float32), which batches then carry as 'ref_logps'.

    With `cache` (a directory) and `identity` (a hash of the model, `ftjax.build.start_identity`), they are
    read from `cache/<identity + data_digest>.npy` when there, and written there once computed.
    `data.stats['reference_batches']` counts the forward batches run (0: read from the cache). Returns `data`."""
    data.ref_logps = None
    n = len(data)
    path = None
    if cache and identity:
        key = hashlib.sha256(f'{identity}:{data_digest(data)}'.encode()).hexdigest()[:32]
        path = os.path.join(cache, f'{key}.npy')
        if os.path.exists(path):
            try:
                got = np.load(path)
            except (ValueError, OSError) as e:  # a damaged file: computed again and replaced
                got = np.zeros((0,), np.float32)
                logging.warning('%s: %s', path, e)
            if got.shape == (n, 2) and got.dtype == np.float32 and np.all(np.isfinite(got)):
                data.ref_logps, data.stats['reference_batches'] = got, 0
                logging.info('reference log-probs of %d pairs: read from %s', n, path)
                return data
            logging.warning('reference log-probs in %s do not fit the data; computing them again', path)
    t0 = time.perf_counter()
    fn = jax.jit(lambda p, b: answer_logps(model, p, b, None, chunk_tokens)[0])
    out = np.zeros((n, 2), np.float32)
    batches = 0
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)  # a full last batch: one compiled shape
        got = np.asarray(jax.device_get(fn(params, take_rows(data, rows))))
        keep = min(batch_size, n - start)
        out[start:start + keep] = got[:keep]
        batches += 1
    data.ref_logps, data.stats['reference_batches'] = out, batches
    if path:  # written whole, then renamed: a reader never sees half a file (every process writes the same)
        os.makedirs(cache, exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}.npy'
        np.save(tmp, out)
        os.replace(tmp, path)
    logging.info('reference log-probs of %d pairs: computed in %.0f s (%d batches)%s', n, time.perf_counter() - t0,
                 batches, f', saved to {path}' if path else '')
    return data
