"""Batched, jitted log-likelihoods and generation for a decoder on a mesh: what `ftjax.eval.harness` (the
lm-evaluation-harness backend) runs.

  lm = BatchedLM(pretrained, batch_size=8)                    # params placed on the mesh once
  lm.loglikelihoods([(context_ids, continuation_ids), ...], max_length)  # [(log p(cont | ctx), greedy?)]
  lm.generate([prompt_ids, ...], max_new_tokens=256, stop=fn)            # new ids per prompt (KV cache)

Shapes are bucketed so that a whole evaluation compiles a handful of programs: every call has `rows` rows
(`batch_size` rounded up to the mesh's batch shards; a short last batch the shards times a power of two, padded
with dummy rows) and a length from
32, 48, 64, 96, 128, 192, ... (powers of two and 1.5x them: at most 1.5x padding). Rows are split over the
mesh's (data, fsdp) axes and the parameters are sharded by the model's logical axes, as in training.

Scoring: the model input of a request is the last `max_length` tokens of (context + continuation)[:-1], as in
lm-eval's `hf` backend. Requests with the same input (one-token continuations of one context: the choices of a
multiple-choice question) share one row and differ only in the token read at its last position, gathered
among K candidates (K a power of two, at most MAX_CANDIDATES).

Generation: left-padded prompts are prefilled once into a KV cache (`llama.init_cache`, masks and sampling as
`ftjax.decoding`), then decoded `chunk` tokens per call inside a `lax.while_loop`. Between calls the host asks
`stop(i, new_ids)` for every running row (lm-eval's stop strings) and stops those rows; a row also stops at an
EOS id (kept in its output); the batch ends when every row stopped or `max_new_tokens` are done.
"""
import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import sharding
from ftjax.config import DEFAULT_RULES
from ftjax.decoding import NO_TOKEN, eos_token_ids, sample_logits
from ftjax.errors import ConfigError
from ftjax.models import abstract_variables, llama

MAX_CANDIDATES = 16  # last-token candidates gathered per shared row


def bucket(n: int, floor: int = 32) -> int:
    """The smallest of floor, 1.5 floor, 2 floor, 3 floor, 4 floor, ... (floor a power of two) that is >= n."""
    size = floor
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _fetch(x):
    """A (possibly sharded) array as host numpy, on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _until_empty(row):
    """Host-side: a row's new ids up to its first empty slot (NO_TOKEN)."""
    empty = np.flatnonzero(row == NO_TOKEN)
    return [int(t) for t in row[:empty[0] if empty.size else len(row)]]


def _score_rows(model, params, tokens, segment_ids, last_pos, candidates):
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


def _prefill(model, params, tokens, pad, key, temperature, top_p, *, total, greedy, top_k, use_top_p):
    """tokens: [rows, prompt_len] left-padded (pad: [rows] pad counts) -> (first new ids [rows], KV cache of
    `total` slots). The prompt but its last token only fills the cache; the last one gives the logits."""
    b, p = tokens.shape
    cache = llama.init_cache(model.cfg, b, total)  # {'k','v'}: [layers, rows, total, kv_heads, head_dim]
    slots = jnp.arange(total)
    kv_valid = slots[None, :] >= pad[:, None]  # [rows, total]
    positions = jnp.maximum(slots[None, :p] - pad[:, None], 0)  # [rows, prompt_len]
    _, cache = model.apply({'params': params}, tokens[:, :-1], positions[:, :-1], cache=cache, cache_index=0,
                           kv_valid=kv_valid, return_hidden=True)
    logits, cache = model.apply({'params': params}, tokens[:, -1:], positions[:, -1:], cache=cache,
                                cache_index=p - 1, kv_valid=kv_valid)  # [rows, 1, vocab]
    tok = sample_logits(logits[:, 0], jax.random.fold_in(key, p - 1), temperature=temperature, top_p=top_p,
                        greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return tok, cache


def _decode_chunk(model, params, cache, tok, done, pad, start, limit, eos, key, temperature, top_p, *, steps,
                  greedy, top_k, use_top_p):
    """Up to min(steps, limit) new tokens per row. tok: [rows] the last new ids (not in the cache yet; they go
    to slot `start`); done: [rows] rows that emit nothing more. -> (new ids [rows, steps] (NO_TOKEN after a
    row's end), last ids, done, cache, steps run)."""
    b = tok.shape[0]
    total = cache['k'].shape[2]
    kv_valid = jnp.arange(total)[None, :] >= pad[:, None]  # [rows, total]
    pick = functools.partial(sample_logits, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)

    def running(state):
        i, _, done, _, _ = state
        return (i < limit) & ~jnp.all(done)

    def step(state):
        i, tok, done, cache, out = state
        slot = start + i
        logits, cache = model.apply({'params': params}, tok[:, None], (slot - pad)[:, None], cache=cache,
                                    cache_index=slot, kv_valid=kv_valid)  # [rows, 1, vocab]
        nxt = jnp.where(done, NO_TOKEN, pick(logits[:, 0], jax.random.fold_in(key, slot)))  # [rows]
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, jnp.maximum(nxt, 0), done | jnp.isin(nxt, eos), cache, out

    out = jnp.full((b, steps), NO_TOKEN, jnp.int32)
    i, tok, done, cache, out = jax.lax.while_loop(running, step, (jnp.int32(0), tok, done, cache, out))
    return out, tok, done, cache, i


class BatchedLM:
    """A decoder's log-likelihoods and generations in fixed-shape batches on `mesh` (default: every device on
    the data axis). `pretrained`: what `ftjax.load_pretrained` / `build.restore_for_export` return."""

    def __init__(self, pretrained, batch_size: int = 8, mesh=None, rules=None, chunk: int = 16):
        cfg = pretrained.config
        if getattr(cfg, 'family', None) != 'llama':
            raise ConfigError(f"{pretrained.path or 'this model'} is an encoder ({type(cfg).__name__}); "
                              f"log-likelihoods and generation need a decoder (docs/models.md).")
        if batch_size < 1 or chunk < 1:
            raise ConfigError(f'batch_size={batch_size} and chunk={chunk} must be positive integers.')
        self.model, self.chunk = pretrained.model, int(chunk)
        self.mesh = mesh if mesh is not None else sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
        self.rules = sharding.rules_from_config(DEFAULT_RULES if rules is None else rules)
        self.shards = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        self.rows = -(-int(batch_size) // self.shards) * self.shards
        specs = sharding.logical_specs(abstract_variables(self.model))
        param_sh = sharding.tree_shardings(pretrained.params, sharding.param_shardings(
            specs, self.mesh, self.rules, pretrained.params), self.mesh)  # quantized leaves: per part
        self.params = sharding.place(pretrained.params, param_sh)
        self.batch_sh = sharding.batch_sharding(self.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        self.eos = eos_token_ids(pretrained)
        model = self.model
        self._score = jax.jit(functools.partial(_score_rows, model))
        self._prefill = jax.jit(functools.partial(_prefill, model),
                                static_argnames=('total', 'greedy', 'top_k', 'use_top_p'))
        self._decode = jax.jit(functools.partial(_decode_chunk, model), donate_argnums=(1,),
                               static_argnames=('steps', 'greedy', 'top_k', 'use_top_p'))

    def rows_for(self, n):
        """Rows of a batch of n requests: `rows`, or for a short (last) batch the batch shards times a power of two."""
        return min(self.rows, self.shards * _pow2(-(-n // self.shards)))

    def _rows(self, *arrays):
        return [sharding.place(a, self.batch_sh) for a in arrays]

    def _scalars(self, *values):
        return [sharding.place(np.asarray(v), self.replicated) for v in values]

    # --- log-likelihoods ----------------------------------------------------------------------------------

    def loglikelihoods(self, requests: Sequence, max_length: int, on_batch: Optional[Callable] = None):
        """requests: [(context_ids, continuation_ids)], both non-empty -> [(sum of log p(continuation | context),
        whether greedy decoding gives the continuation)], in order. `on_batch(n)`: called with the requests done."""
        groups = {}  # model input -> [(request index, continuation length, last continuation token)]
        for i, (ctx, cont) in enumerate(requests):
            whole = (list(ctx) + list(cont))[-(max_length + 1):]
            if not cont or len(cont) >= len(whole):
                raise ConfigError(f'request {i}: a continuation of {len(cont)} tokens after a context of {len(ctx)} '
                                  f'does not fit max_length={max_length} (or one of them is empty).')
            groups.setdefault(tuple(whole[:-1]), []).append((i, len(cont), whole[-1]))
        entries = [(inp, reqs[j:j + MAX_CANDIDATES]) for inp, reqs in groups.items()
                   for j in range(0, len(reqs), MAX_CANDIDATES)]
        entries.sort(key=lambda e: -len(e[0]))  # longest first: each batch's length is its first row's
        out, done = [None] * len(requests), 0
        for b in range(0, len(entries), self.rows):
            batch = entries[b:b + self.rows]
            length, rows = bucket(len(batch[0][0])), self.rows_for(len(batch))
            k = _pow2(max(len(reqs) for _, reqs in batch))
            tokens = np.zeros((rows, length), np.int32)
            seg = np.zeros((rows, length), np.int32)
            last_pos = np.zeros((rows,), np.int32)
            cands = np.zeros((rows, k), np.int32)
            for r, (inp, reqs) in enumerate(batch):
                tokens[r, :len(inp)], seg[r, :len(inp)], last_pos[r] = inp, 1, len(inp) - 1
                cands[r, :len(reqs)] = [last for _, _, last in reqs]
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                next_logp, cand_logp, greedy = map(_fetch, self._score(self.params, *self._rows(tokens, seg, last_pos,
                                                                                                  cands)))
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

    # --- generation ---------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence, max_new_tokens: int, stop: Optional[Callable] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 on_batch: Optional[Callable] = None):
        """New ids for each prompt (a list of ids), in order, `rows` prompts per batch: greedy (temperature 0)
        or sampled; a row ends at an EOS id (kept), when `stop(prompt_index, new_ids)` is true (asked every
        `chunk` tokens) or after `max_new_tokens`. `on_batch(n)`: called with the prompts done."""
        if max_new_tokens < 1:
            raise ConfigError(f'max_new_tokens={max_new_tokens} must be a positive integer.')
        greedy = temperature == 0.0
        flags = dict(greedy=greedy, top_k=0 if greedy else int(top_k), use_top_p=not greedy and top_p < 1.0)
        temp, nucleus = self._scalars(np.float32(1.0 if greedy else temperature), np.float32(top_p))
        eos = self._scalars(np.asarray(self.eos or [NO_TOKEN], np.int32))[0]
        results = []
        for b in range(0, len(prompts), self.rows):
            results += self._generate_batch(list(range(b, min(b + self.rows, len(prompts)))), prompts,
                                            max_new_tokens, stop, temp, nucleus, eos, jax.random.key(seed + b), flags)
            if on_batch is not None:
                on_batch(len(results))
        return results

    def _generate_batch(self, index, prompts, max_new_tokens, stop, temp, nucleus, eos, key, flags):
        if any(len(prompts[i]) == 0 for i in index):
            raise ConfigError('an empty prompt: every prompt needs at least one token (e.g. the BOS id).')
        width = bucket(max(len(prompts[i]) for i in index))
        total = width + -(-max_new_tokens // self.chunk) * self.chunk
        rows = self.rows_for(len(index))
        tokens = np.zeros((rows, width), np.int32)  # [rows, width], left-padded with id 0
        pad = np.full((rows,), width - 1, np.int32)  # dummy rows: one token
        for r, i in enumerate(index):
            tokens[r, width - len(prompts[i]):], pad[r] = prompts[i], width - len(prompts[i])
        new = [[] for _ in index]
        done = np.arange(rows) >= len(index)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            tokens_g, pad_g = self._rows(tokens, pad)
            tok, cache = self._prefill(self.params, tokens_g, pad_g, key, temp, nucleus, total=total, **flags)
            first = _fetch(tok)
            for r in range(len(index)):
                new[r].append(int(first[r]))
                done[r] = first[r] in self.eos or bool(stop and stop(index[r], new[r]))
            n = 1
            while n < max_new_tokens and not done.all():
                start, limit = self._scalars(np.int32(width + n - 1), np.int32(min(self.chunk, max_new_tokens - n)))
                out, tok, done_dev, cache, ran = self._decode(self.params, cache, tok, *self._rows(done), pad_g, start,
                                                              limit, eos, key, temp, nucleus, steps=self.chunk,
                                                              **flags)
                out, ended = _fetch(out), _fetch(done_dev)
                for r in range(len(index)):
                    if done[r]:
                        continue
                    new[r] += _until_empty(out[r])
                    done[r] = bool(ended[r]) or bool(stop and stop(index[r], new[r]))
                n += int(_fetch(ran))
        return new
