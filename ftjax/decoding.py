"""Autoregressive generation for the decoders (every family of docs/models.md): KV cache, one jitted loop,
greedy or sampled. Sliding-window layers keep a full-length cache and mask the slots outside their window.

    new_ids = ftjax.generate(pretrained, prompt_ids, max_new_tokens=32)          # greedy (this module's `generate`)
    texts = decoding.generate_text(pretrained, ['What is 2+2?'], chat=True, temperature=0.7, top_p=0.9, seed=1)

Prompts are left-padded to a common length rounded up to `prompt_bucket`, so one compiled program
serves every (batch, prompt bucket, max_new_tokens, sampling mode). Inside it the prompt is prefilled
in one call and a `lax.while_loop` decodes one token per step until every row has emitted an EOS
token (kept in the output) or `max_new_tokens` are done.

The command line is `python -m ftjax generate` (ftjax/cli/generate.py).
"""
import functools
import json
import logging
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError
from ftjax.models import llama

NO_TOKEN = -1  # the output slot after a row's EOS


def generate(pretrained, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, *, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_ids: Optional[Sequence[int]] = None, params=None,
             prompt_bucket: int = 32):
    """New token ids for one prompt (a list of ids) or a batch (a list of such lists).

    pretrained: what `load_pretrained` returned (a decoder); `params` overrides its parameters
      (e.g. the trainer's current ones, LoRA leaves included).
    temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature), restricted to the
      `top_k` most likely tokens (0 = all) and the smallest set with probability >= `top_p`.
    eos_ids: ids that end a row (kept in its output); default `eos_token_ids(pretrained)`.
    Returns a list of new ids (a list of lists for a batch), each at most `max_new_tokens` long.
    """
    model, cfg = pretrained.model, pretrained.config
    if getattr(cfg, 'family', None) != 'llama':
        raise ConfigError(f"{pretrained.path or 'this model'} is a {getattr(cfg, 'family', type(cfg).__name__)} "
                         f"encoder; generation needs a decoder (Llama, Mistral, Qwen, Phi-3, Gemma; docs/models.md). Use "
                         f"`model.apply` for an encoder's hidden states or class logits.")
    single, rows = _as_rows(prompt_ids, cfg.vocab_size)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, prompt_bucket)
    eos = list(eos_token_ids(pretrained) if eos_ids is None else eos_ids)
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        logging.warning('A prompt of %d tokens + max_new_tokens=%d exceeds the model\'s max_position_embeddings=%d;'
                        ' the output past that length is unreliable.', longest, max_new_tokens,
                        cfg.max_position_embeddings)
    width = -(-longest // prompt_bucket) * prompt_bucket
    tokens = np.zeros((len(rows), width), np.int32)  # [batch, prompt_len], left-padded with id 0
    pad = np.array([width - len(r) for r in rows], np.int32)  # [batch]
    for i, r in enumerate(rows):
        tokens[i, pad[i]:] = r
    greedy = temperature == 0.0
    out = _decode(model, params if params is not None else pretrained.params, tokens, pad,
                  jnp.asarray(eos or [NO_TOKEN], jnp.int32), jax.random.key(seed),
                  jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p),
                  max_new_tokens=max_new_tokens, greedy=greedy, top_k=0 if greedy else min(top_k, cfg.vocab_size),
                  use_top_p=not greedy and top_p < 1.0)
    new = [_until_stop(row) for row in np.asarray(out)]
    return new[0] if single else new


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'greedy', 'top_k', 'use_top_p'))
def _decode(model, params, tokens, pad, eos, key, temperature, top_p, *, max_new_tokens, greedy, top_k, use_top_p):
    """tokens: [batch, prompt_len] left-padded, pad: [batch] pad counts -> new ids [batch, max_new_tokens]."""
    b, p = tokens.shape
    total = p + max_new_tokens
    cache = llama.init_cache(model.cfg, b, total)  # {'k','v'}: [layers, batch, total, kv_heads, head_dim]
    slots = jnp.arange(total)
    kv_valid = slots[None, :] >= pad[:, None]  # [batch, total]; later slots are hidden by the causal mask
    pick = functools.partial(sample_logits, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p)
    positions = jnp.maximum(slots[None, :p] - pad[:, None], 0)  # [batch, prompt_len]
    logits, cache = model.apply({'params': params}, tokens, positions, cache=cache, cache_index=0,
                                kv_valid=kv_valid)  # [batch, prompt_len, vocab]
    tok = pick(logits[:, -1], jax.random.fold_in(key, 0))  # [batch]
    out = jnp.full((b, max_new_tokens), NO_TOKEN, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)  # [batch]

    def running(state):
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, tok, done, cache, out = state
        slot = p + i - 1  # where the previous token's keys/values go
        logits, cache = model.apply({'params': params}, tok[:, None], (slot - pad)[:, None], cache=cache,
                                    cache_index=slot, kv_valid=kv_valid)  # [batch, 1, vocab]
        nxt = jnp.where(done, NO_TOKEN, pick(logits[:, 0], jax.random.fold_in(key, i)))  # [batch]
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, jnp.maximum(nxt, 0), done | jnp.isin(nxt, eos), cache, out

    *_, out = jax.lax.while_loop(running, step, (jnp.int32(1), tok, done, cache, out))
    return out


def sample_logits(logits, key, *, temperature, top_p, greedy: bool, top_k: int, use_top_p: bool):
    """Next ids [batch] from logits [batch, vocab]: argmax, or a sample after temperature / top-k / top-p."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        ranked = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass before a token; the top one always stays
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def eos_token_ids(pretrained) -> list:
    """The tokenizer's EOS plus the config's and generation_config.json's `eos_token_id` (int or list)."""
    ids = []
    tok = pretrained.tokenizer
    if tok is not None and getattr(tok, 'eos_token_id', None) is not None:
        ids.append(tok.eos_token_id)
    sources = [pretrained.hf_config or {}]
    gen_file = os.path.join(pretrained.path, 'generation_config.json') if pretrained.path else ''
    if gen_file and os.path.isfile(gen_file):
        with open(gen_file) as f:
            sources.append(json.load(f))
    for src in sources:
        value = src.get('eos_token_id')
        ids.extend(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return sorted({int(i) for i in ids})


def generate_text(pretrained, prompts, chat: bool = False, system: Optional[str] = None, **kw):
    """Text in, text out: `prompts` a string or a list; with `chat`, each goes through the tokenizer's chat
    template as one user turn (or is already a list of {'role', 'content'} messages). `kw` go to `generate`."""
    tok = pretrained.tokenizer
    if tok is None:
        raise ConfigError(f"{pretrained.path}: the model has no tokenizer; use `generate` with token ids.")
    single = isinstance(prompts, str) or (chat and _is_messages(prompts))
    batch = [prompts] if single else list(prompts)
    ids = [encode_prompt(tok, p, chat, system) for p in batch]
    new = generate(pretrained, ids, **kw)
    texts = [tok.decode(n, skip_special_tokens=True) for n in new]
    return texts[0] if single else texts


def encode_prompt(tokenizer, prompt, chat: bool = False, system: Optional[str] = None) -> list:
    """Token ids of one prompt; with `chat`, through the chat template with the assistant turn opened."""
    if not chat:
        return list(tokenizer(prompt)['input_ids'])
    if not getattr(tokenizer, 'chat_template', None):
        raise ConfigError("chat=True needs a tokenizer with a chat template (tokenizer.chat_template is empty); "
                         "pass chat=False (--nochat) for plain text prompts.")
    messages = list(prompt) if _is_messages(prompt) else [{'role': 'user', 'content': prompt}]
    if system and messages[0].get('role') != 'system':
        messages.insert(0, {'role': 'system', 'content': system})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)['input_ids'])


def _is_messages(x):
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


def _as_rows(prompt_ids, vocab_size):
    """(single, rows): a list of ids -> one row; a list of lists / 2-D array -> a batch."""
    if isinstance(prompt_ids, np.ndarray) or hasattr(prompt_ids, 'shape'):
        arr = np.asarray(prompt_ids)
        single, rows = arr.ndim == 1, ([arr.tolist()] if arr.ndim == 1 else arr.tolist())
    else:
        items = list(prompt_ids)
        single = bool(items) and np.ndim(items[0]) == 0
        rows = [items] if single else [list(np.asarray(r).reshape(-1)) for r in items]
    if not rows:
        raise ConfigError("prompt_ids is empty; pass a list of token ids or a list of such lists.")
    for i, r in enumerate(rows):
        if not r:
            raise ConfigError(f"prompt_ids row {i} is empty; every prompt needs at least one token "
                             f"(e.g. the tokenizer's BOS id).")
        bad = [int(t) for t in r if not 0 <= int(t) < vocab_size]
        if bad:
            raise ConfigError(f"prompt_ids row {i} has ids {bad[:5]} outside the vocabulary [0, {vocab_size}); "
                             f"was it tokenized with another model's tokenizer?")
    return single, [[int(t) for t in r] for r in rows]


def _check_sampling(max_new_tokens, temperature, top_k, top_p, prompt_bucket):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 = no top-k filter).")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus filter).")
    if prompt_bucket < 1:
        raise ConfigError(f"prompt_bucket={prompt_bucket} must be >= 1.")


def _until_stop(row):
    """Host-side: the new ids up to the first empty slot (the EOS, if any, is kept)."""
    stop = np.flatnonzero(row == NO_TOKEN)
    return [int(t) for t in row[:stop[0] if stop.size else len(row)]]
