"""Prompts as the engine takes them: text -> ids (plain or through the chat template), checked id rows,
the stop ids of a model, and the bucketed, left-padded [rows, width] arrays one compiled program serves.

Lengths are bucketed to 32, 48, 64, 96, 128, 192, ... (powers of two and 1.5x them: at most 1.5x padding),
row counts to the mesh's batch shards times a power of two, so a whole evaluation compiles a handful of
programs.
"""
import json
import os
from typing import Optional

import numpy as np

from ftjax.errors import ConfigError


def bucket(n: int, floor: int = 32) -> int:
    """The smallest of floor, 1.5 floor, 2 floor, 3 floor, 4 floor, ... (floor a power of two) that is >= n."""
    size = floor
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def left_pad(rows, width: int, n_rows: int):
    """rows: lists of ids (at most n_rows, each at most width long) -> (tokens [n_rows, width] left-padded with
    id 0, pad [n_rows] pad counts); the rows past len(rows) are one-token dummies."""
    tokens = np.zeros((n_rows, width), np.int32)
    pad = np.full((n_rows,), width - 1, np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], pad[i] = r, width - len(r)
    return tokens, pad


def as_rows(prompt_ids, vocab_size):
    """(single, rows): a list of ids -> one row; a list of lists / 2-D array -> a batch; each row checked."""
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
        if not len(r):
            raise ConfigError(f"prompt_ids row {i} is empty; every prompt needs at least one token "
                              f"(e.g. the tokenizer's BOS id).")
        bad = [int(t) for t in r if not 0 <= int(t) < vocab_size]
        if bad:
            raise ConfigError(f"prompt_ids row {i} has ids {bad[:5]} outside the vocabulary [0, {vocab_size}); "
                              f"was it tokenized with another model's tokenizer?")
    return single, [[int(t) for t in r] for r in rows]


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


def is_messages(x):
    """Whether x is a chat: a non-empty list of {'role', 'content'} dicts."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) for m in x)


def encode_prompt(tokenizer, prompt, chat: bool = False, system: Optional[str] = None) -> list:
    """Token ids of one prompt; with `chat`, through the chat template with the assistant turn opened."""
    if not chat:
        return list(tokenizer(prompt)['input_ids'])
    if not getattr(tokenizer, 'chat_template', None):
        raise ConfigError("chat=True needs a tokenizer with a chat template (tokenizer.chat_template is empty); "
                          "pass chat=False (--nochat) for plain text prompts.")
    messages = list(prompt) if is_messages(prompt) else [{'role': 'user', 'content': prompt}]
    if system and messages[0].get('role') != 'system':
        messages.insert(0, {'role': 'system', 'content': system})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)['input_ids'])
