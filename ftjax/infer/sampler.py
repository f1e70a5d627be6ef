"""The inference engine: every generated token and every scored continuation of ftjax goes through `Sampler`.

  engine = Sampler(pretrained, batch_size=8, mesh=mesh)       # params placed on the mesh once
  out = engine.sample(prompt_ids, max_new_tokens=64, temperature=0.7, top_p=0.9, n=4, stop=['\\n\\n'],
                      logprobs=True, params=trainer_params)  # out.tokens, out.logprobs (float32 per token)
  engine.loglikelihoods([(context_ids, continuation_ids), ...], max_length)   # ftjax.infer.scoring

A batch of `rows` prompts (`batch_size` rounded up to the mesh's batch shards; a short last batch the shards
times a power of two, padded with one-token dummy rows) is left-padded to a bucketed width (`prompts.bucket`)
and prefilled in one call, which computes the logits of the last position only. Then `chunk` tokens per call
are decoded inside a jitted `lax.while_loop` over the layers unrolled on per-layer buffers (`unrolled`: no
per-step copy of any weight), with the per-layer KV caches donated, so they are updated in place; a cache
holds only the slots filled so far rounded up to a bucket (at most the final length), and grows between
chunks, so attention reads the filled part. Between chunks the host checks the stop strings / `stop`
callable of each running row; a row also ends at a stop id (kept in its output). Rows are split over the
mesh's (data, fsdp) axes and the parameters sharded by the model's logical axes, as in training; `mesh=None`
runs on the default device with the parameters as they are.

Log-probabilities (`logprobs=True`) are log softmax of the model's unmodified logits at the emitted token, in
float32: what the train step computes for that token (`ftjax.objectives.logprobs.token_logps`).
"""
import contextlib
import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import sharding
from ftjax.config import DEFAULT_RULES
from ftjax.errors import ConfigError
from ftjax.infer import prompts as prompts_lib, sampling, scoring, unrolled
from ftjax.infer.scoring import fetch
from ftjax.models import abstract_variables, heads, layers, llama
from ftjax.objectives import logprobs as logprobs_lib

NO_TOKEN = -1  # an output slot after a row's end


class Samples(NamedTuple):
    """tokens: new ids per output row (prompt i's j-th sample at i * n + j); logprobs: a float32 array per row
    (log p of each new token), or None when not asked for."""
    tokens: list
    logprobs: Optional[list]


def vocab_major(rows: int) -> bool:
    """Whether the decode loop holds the LM head as [vocab, embed] (True) or [embed, vocab]. On XLA's CPU backend
    (2-core Zen 3, scripts/bench_generate.py era) [16, 576] x [576, 49152] took 22 ms as [embed, vocab] and
    13 ms as [vocab, embed] (40 ms of a 93 ms decode step inside the loop); at one row [embed, vocab] is
    faster (2.8 vs 3.5 ms), from two rows on [vocab, embed] (8.0 vs 8.5 ms at 2, 13.4 vs 9.0 at 4)."""
    return rows > 1


def head_logits(head, hidden, softcap, vocab_major: bool = False):
    """Logits [batch, vocab] float32 of hidden [batch, embed] and the LM head ([embed, vocab], or [vocab, embed]
    when `vocab_major`), computed as the train step's loss does (`ftjax.objectives.logprobs.project`: the same
    products, accumulated in float32)."""
    if not vocab_major:
        return logprobs_lib.project(hidden[:, None], head.astype(hidden.dtype), softcap)[:, 0]
    logits = jnp.einsum('be,ve->bv', hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


@functools.partial(jax.jit, static_argnames=('model', 'vocab_major'))
def _head(model, params, vocab_major):
    """The LM head as the decode loop holds it (`vocab_major`), materialised once per batch."""
    head = heads.lm_head_kernel(params, model.cfg)  # [embed, vocab]
    return head.T if vocab_major else head


@functools.partial(jax.jit, static_argnames=('model', 'length', 'mode'))
def _prefill(model, params, head, tokens, pad, key, temperature, top_p, *, length, mode):
    """tokens: [rows, width] left-padded (pad: [rows]) -> (first new ids [rows], their log p [rows], per-layer
    KV caches of `length` slots)."""
    b, p = tokens.shape
    cache = llama.init_cache(model.cfg, b, length)  # {'k','v'}: [layers, rows, kv_heads, length, head_dim]
    kv_valid = jnp.arange(length)[None, :] >= pad[:, None]  # [rows, length]
    positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0)  # [rows, width]
    hidden, cache = model.apply({'params': params}, tokens, positions, cache=cache, cache_index=0,
                                kv_valid=kv_valid, return_hidden=True)  # [rows, width, embed]
    last = hidden[:, -1]  # [rows, embed]: the logits of the last position only
    logits = head_logits(head, last, model.cfg.final_softcap, vocab_major(b))  # [rows, vocab]
    tok = sampling.sample_logits(logits, jax.random.fold_in(key, p - 1), temperature, top_p, mode)
    return tok, sampling.token_logp(logits, tok), unrolled.split_cache(cache, model.cfg.num_layers)


@functools.partial(jax.jit, static_argnames=('length',))
def _grow(caches, *, length):
    """The caches with empty slots appended up to `length`."""
    return jax.tree.map(lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0))), caches)


@functools.partial(jax.jit, static_argnames=('model', 'steps', 'mode'), donate_argnums=(4,))
def _decode_chunk(model, rest, per_layer, head, caches, tok, done, pad, start, limit, eos, key, temperature, top_p,
                  *, steps, mode):
    """Up to min(steps, limit) new tokens per row. tok: [rows] the last new ids (not in the cache yet; they go
    to slot `start`); done: [rows] rows that emit nothing more. -> (new ids [rows, steps] (NO_TOKEN after a
    row's end), their log p [rows, steps], last ids, done, caches, steps run)."""
    b = tok.shape[0]
    kv_valid = jnp.arange(caches[0]['k'].shape[2])[None, :] >= pad[:, None]  # [rows, cache length]

    def carried(caches):
        """The caches as the loop carries them: at one row without the row axis ([kv_heads, kv_len, head_dim]).
        With it, XLA's CPU backend fused each layer's cache update twice (for the loop state and for attention's
        view without the unit row axis) and copied every k and v cache four times per step (240 copies of
        [1, 3, 551, 64] per SmolLM2 step); without it, once (1 x 512: 24.3-24.8 -> 28.5 tok/s, the same values;
        docs/performance.md)."""
        return jax.tree.map(lambda c: c[0], caches) if b == 1 else caches

    def used(caches):
        """The inverse of `carried`: the caches as the model reads them, [rows, kv_heads, kv_len, head_dim]."""
        return jax.tree.map(lambda c: c[None], caches) if b == 1 else caches

    def running(state):
        i, _, done, *_ = state
        return (i < limit) & ~jnp.all(done)

    def step(state):
        i, tok, done, caches, out, logp = state
        slot = start + i
        hidden, caches = unrolled.hidden_states(model, rest, per_layer, tok[:, None], (slot - pad)[:, None],
                                                used(caches), slot, kv_valid)  # [rows, 1, embed]
        logits = head_logits(head, hidden[:, 0], model.cfg.final_softcap, vocab_major(b))  # [rows, vocab]
        nxt = sampling.sample_logits(logits, jax.random.fold_in(key, slot), temperature, top_p, mode)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, NO_TOKEN, nxt)[:, None], (0, i))
        logp = jax.lax.dynamic_update_slice(logp, sampling.token_logp(logits, nxt)[:, None], (0, i))
        return i + 1, nxt, done | jnp.isin(nxt, eos), carried(caches), out, logp

    out = jnp.full((b, steps), NO_TOKEN, jnp.int32)
    logp = jnp.zeros((b, steps), jnp.float32)
    state = (jnp.int32(0), tok, done, carried(caches), out, logp)
    i, tok, done, caches, out, logp = jax.lax.while_loop(running, step, state)
    return out, logp, tok, done, used(caches), i


def cache_length(needed: int, final: int) -> int:
    """Slots of the cache while `needed` are in use: a bucket of `needed`, at most the `final` length."""
    return min(final, prompts_lib.bucket(needed))


def stop_check(stop, tokenizer) -> Optional[Callable]:
    """`stop`: None, a callable (prompt index, new ids) -> bool, or stop strings (a string or a list of them,
    found in the decoded new text) -> a callable or None."""
    if stop is None or callable(stop):
        return stop
    texts = [stop] if isinstance(stop, str) else [s for s in stop if s]
    if not texts:
        return None
    if tokenizer is None:
        raise ConfigError('stop strings need the model\'s tokenizer (pretrained.tokenizer is None); pass a '
                          'callable stop(prompt_index, new_ids) or stop ids (eos_ids) instead.')
    return lambda _, ids: any(s in tokenizer.decode(ids, skip_special_tokens=False) for s in texts)


class Sampler:
    """A decoder's generations and log-likelihoods in fixed-shape batches on `mesh` (None: the default device,
    unsharded). `pretrained`: what `ftjax.load_pretrained` / `build.restore_for_export` return; `params`
    replaces its parameters (e.g. the trainer's, LoRA/DoRA or quantized leaves included)."""

    def __init__(self, pretrained, batch_size: int = 8, mesh=None, rules=None, chunk: int = 16, params=None,
                 eos_ids: Optional[Sequence[int]] = None, prompt_bucket: int = 32, copy_layers: bool = True):
        cfg = pretrained.config
        if getattr(cfg, 'family', None) != 'llama':
            raise ConfigError(f"{pretrained.path or 'this model'} is a {getattr(cfg, 'family', type(cfg).__name__)} "
                              f"encoder; generation and log-likelihoods need a decoder (Llama, Mistral, Qwen, Phi-3, "
                              f"Gemma; docs/models.md). Use `model.apply` for an encoder's outputs.")
        if batch_size < 1 or chunk < 1:
            raise ConfigError(f'batch_size={batch_size} and chunk={chunk} must be positive integers.')
        if prompt_bucket < 1 or prompt_bucket & (prompt_bucket - 1):
            raise ConfigError(f'prompt_bucket={prompt_bucket} must be a power of two (the smallest prompt width).')
        self.model, self.chunk, self.tokenizer = pretrained.model, int(chunk), pretrained.tokenizer
        self.prompt_bucket = int(prompt_bucket)
        self.copy_layers = bool(copy_layers)  # per-layer weight copies for the decode loop (`unrolled.split`)
        self.mesh = mesh
        self.rules = sharding.rules_from_config(DEFAULT_RULES if rules is None else rules)
        self.fuse = mesh is None or mesh.shape.get('tensor', 1) == 1  # `unrolled.fused`: no tensor-split kernels
        self.shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
        self.rows = -(-int(batch_size) // self.shards) * self.shards
        self.eos = list(prompts_lib.eos_token_ids(pretrained) if eos_ids is None else eos_ids)
        if mesh is not None:
            self.batch_sh = sharding.batch_sharding(mesh)
            self.replicated = NamedSharding(mesh, P())
        self._given = pretrained.params if params is None else params  # placed on first use (`params`)
        self._placed = self._buffers = None

    @property
    def params(self):
        """The default parameters, placed on the mesh when first used: a caller that always passes its own (the
        RL rollouts pass the trainer's) never makes a second copy of the weights."""
        if self._placed is None:
            self._placed = self.place(self._given)
        return self._placed

    def buffers(self, params=None):
        """The decode loop's (rest, per_layer) parameters (`unrolled.split`) of `params` (placed), made at each call;
        of the default ones (None), made once and kept, so that repeated `sample` calls copy no weight."""
        split = functools.partial(unrolled.split, cfg=self.model.cfg, copy=self.copy_layers, fuse=self.fuse,
                                  out_major=self.fuse and vocab_major(self.rows))
        if params is not None:
            return split(params)
        if self._buffers is None:
            self._buffers = split(self.params)
        return self._buffers

    def place(self, params):
        """Parameters sharded by the model's logical axes on the mesh (unchanged without a mesh); weights a
        trainer keeps in host memory (model.offload_frozen) are copied to the device for the decode loop. Host
        (numpy) leaves, as `load_pretrained` returns them, are put on the device here, once: left as they are, every
        jitted call (each decode chunk) would copy them again (the embedding and every layer's o_proj / down_proj:
        ~260 MB per 16-token chunk for SmolLM2)."""
        if self.mesh is None:
            return jax.device_put(layers.on_device(params))
        specs = sharding.logical_specs(abstract_variables(self.model))
        param_sh = sharding.tree_shardings(params, sharding.param_shardings(specs, self.mesh, self.rules, params),
                                           self.mesh)  # quantized leaves: per part
        return sharding.place(params, param_sh)

    def rows_for(self, n):
        """Rows of a batch of n requests: `rows`, or for a short (last) batch the batch shards times a power of two."""
        return min(self.rows, self.shards * prompts_lib.pow2(-(-n // self.shards)))

    def context(self):
        """The mesh and logical-axis rules every call runs under (nothing without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def put_rows(self, *arrays):
        """Row-major host arrays split over the batch axes."""
        return [jnp.asarray(a) if self.mesh is None else sharding.place(a, self.batch_sh) for a in arrays]

    def put(self, *values):
        """Host values replicated on every device."""
        return [jnp.asarray(v) if self.mesh is None else sharding.place(np.asarray(v), self.replicated)
                for v in values]

    def loglikelihoods(self, requests: Sequence, max_length: int, on_batch: Optional[Callable] = None, params=None):
        """[(sum of log p(continuation | context), whether greedy decoding gives it)] per (context_ids,
        continuation_ids) request; see `ftjax.infer.scoring`."""
        return scoring.loglikelihoods(self, self.params if params is None else self.place(params), requests,
                                      max_length, on_batch)

    def sample(self, prompts: Sequence, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, n: int = 1, stop: Union[None, str, Sequence[str], Callable] = None,
               eos_ids: Optional[Sequence[int]] = None, logprobs: bool = False, params=None,
               on_batch: Optional[Callable] = None) -> Samples:
        """`n` continuations of each prompt (a list of ids), greedy (temperature 0) or sampled, `rows` per call.
        A row ends at a stop id (`eos_ids`, default the model's; kept in its output), when a stop string appears
        in its decoded new text or `stop(prompt_index, new_ids)` is true (asked every `chunk` tokens), or after
        `max_new_tokens`. `on_batch(k)`: called with the output rows done."""
        sampling.check(max_new_tokens, temperature, top_k, top_p, n)
        _, rows = prompts_lib.as_rows(list(prompts), self.model.cfg.vocab_size) if len(prompts) else (None, [])
        stop = stop_check(stop, self.tokenizer)
        mode = sampling.mode_of(temperature, top_k, top_p, self.model.cfg.vocab_size)
        eos = list(self.eos if eos_ids is None else eos_ids)
        given = None if params is None else self.place(params)
        params = self.params if given is None else given
        expanded = [i for i in range(len(rows)) for _ in range(n)]  # output row -> prompt index
        key = jax.random.key(seed)
        tokens, logps = [], []
        with self.context():
            scalars = self.put(np.float32(1.0 if mode.greedy else temperature), np.float32(top_p),
                               np.asarray(eos or [NO_TOKEN], np.int32))
            buffers = self.buffers(given)
            for b in range(0, len(expanded), self.rows):
                index = expanded[b:b + self.rows]
                new, lp = self._batch(params, buffers, [rows[i] for i in index], index, max_new_tokens, stop, eos, mode,
                                      jax.random.fold_in(key, b), *scalars)
                tokens += new
                logps += lp
                if on_batch is not None:
                    on_batch(len(tokens))
        return Samples(tokens, logps if logprobs else None)

    def _batch(self, params, buffers, batch, index, max_new_tokens, stop, eos, mode, key, temp, top_p, eos_dev):
        """One batch of prompts; `buffers`: the decode loop's (rest, per_layer) parameters (`unrolled.split`)."""
        width = prompts_lib.bucket(max(len(r) for r in batch), self.prompt_bucket)
        final = width + max_new_tokens - 1  # slots of every token but the last new one
        tokens, pad = prompts_lib.left_pad(batch, width, self.rows_for(len(batch)))
        new = [[] for _ in batch]
        logps = [[] for _ in batch]
        done = np.arange(len(tokens)) >= len(batch)  # dummy rows are done from the start
        tokens_d, pad_d = self.put_rows(tokens, pad)
        rest, per_layer = buffers
        head = _head(self.model, params, vocab_major(len(tokens)))
        length = width  # prefill attends over the prompt's slots only; the first chunk grows the cache
        tok, logp, caches = _prefill(self.model, params, head, tokens_d, pad_d, key, temp, top_p, length=length,
                                     mode=mode)
        first, first_lp = fetch(tok), fetch(logp)
        for r in range(len(batch)):
            new[r].append(int(first[r]))
            logps[r].append(float(first_lp[r]))
            done[r] = first[r] in eos or bool(stop and stop(index[r], new[r]))
        count = 1
        while count < max_new_tokens and not done.all():
            start, steps = width + count - 1, min(self.chunk, max_new_tokens - count)
            wanted = cache_length(start + steps, final)
            if wanted > caches[0]['k'].shape[2]:
                caches = _grow(caches, length=wanted)
            out, lp, tok, done_d, caches, ran = _decode_chunk(
                self.model, rest, per_layer, head, caches, tok, *self.put_rows(done), pad_d,
                *self.put(np.int32(start), np.int32(steps)), eos_dev, key, temp, top_p, steps=self.chunk, mode=mode)
            out, lp, ended = fetch(out), fetch(lp), fetch(done_d)
            for r in range(len(batch)):
                if done[r]:
                    continue
                kept = int(np.sum(out[r] != NO_TOKEN))  # a row's ids up to its first empty slot
                new[r] += [int(t) for t in out[r, :kept]]
                logps[r] += [float(x) for x in lp[r, :kept]]
                done[r] = bool(ended[r]) or bool(stop and stop(index[r], new[r]))
            count += int(fetch(ran))
        return new, [np.asarray(x, np.float32) for x in logps]
