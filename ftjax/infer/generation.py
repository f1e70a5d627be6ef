"""One-call generation on a loaded decoder: ids in, ids out (`generate`, which is `ftjax.generate`), or text
in, text out (`generate_text`). Both run the engine (`ftjax.infer.sampler.Sampler`) with every prompt in
one batch.

    new_ids = ftjax.generate(pretrained, prompt_ids, max_new_tokens=32)          # greedy
    texts = generate_text(pretrained, ['What is 2+2?'], chat=True, temperature=0.7, top_p=0.9, seed=1)
"""
import logging
from typing import Optional, Sequence

from ftjax.errors import ConfigError
from ftjax.infer import prompts as prompts_lib
from ftjax.infer.sampler import Sampler


def generate(pretrained, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, *, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_ids: Optional[Sequence[int]] = None, params=None,
             prompt_bucket: int = 32, n: int = 1, stop=None, logprobs: bool = False, mesh=None, chunk: int = 16):
    """New token ids for one prompt (a list of ids) or a batch (a list of such lists / a 2-D array).

    pretrained: what `load_pretrained` returned (a decoder); `params` overrides its parameters
      (e.g. the trainer's current ones, LoRA leaves included).
    temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature), restricted to the
      `top_k` most likely tokens (0 = all) and the smallest set with probability >= `top_p`.
    eos_ids: ids that end a row (kept in its output); default `eos_token_ids(pretrained)`.
    prompt_bucket: the smallest padded prompt width (a power of two; widths grow by 1.5x / 1.33x steps).
    n: samples per prompt: each prompt's result is then a list of n results.
    stop: stop strings (found in the decoded new text) or a callable (prompt index, new ids) -> bool, checked
      every `chunk` tokens. mesh: run sharded on it (default: the default device).
    Returns a list of new ids (a list of lists for a batch), each at most `max_new_tokens` long; with
    `logprobs`, (those, the matching float32 arrays of log p of each new token).
    """
    if getattr(pretrained.config, 'family', None) != 'llama':
        Sampler(pretrained)  # its one-line error for an encoder
    single, rows = prompts_lib.as_rows(prompt_ids, pretrained.config.vocab_size)
    longest, limit = max(len(r) for r in rows), pretrained.config.max_position_embeddings
    if isinstance(max_new_tokens, int) and longest + max_new_tokens > limit:
        logging.warning('A prompt of %d tokens + max_new_tokens=%d exceeds the model\'s max_position_embeddings=%d;'
                        ' the output past that length is unreliable.', longest, max_new_tokens, limit)
    batch = len(rows) * (n if isinstance(n, int) and n > 0 else 1)
    engine = Sampler(pretrained, batch_size=batch, mesh=mesh, chunk=chunk, params=params, eos_ids=eos_ids,
                     prompt_bucket=prompt_bucket)
    out = engine.sample(rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, n=n,
                        stop=stop, logprobs=logprobs)

    def shape(flat):
        per_prompt = flat if n == 1 else [flat[i * n:(i + 1) * n] for i in range(len(rows))]
        return per_prompt[0] if single else per_prompt
    return (shape(out.tokens), shape(out.logprobs)) if logprobs else shape(out.tokens)


def generate_text(pretrained, prompts, chat: bool = False, system: Optional[str] = None, **kw):
    """Text in, text out: `prompts` a string or a list; with `chat`, each goes through the tokenizer's chat
    template as one user turn (or is already a list of {'role', 'content'} messages). `kw` go to `generate`
    (not `logprobs`); a text is cut before the first of `stop` strings it contains."""
    tok = pretrained.tokenizer
    if tok is None:
        raise ConfigError(f"{pretrained.path}: the model has no tokenizer; use `generate` with token ids.")
    single = isinstance(prompts, str) or (chat and prompts_lib.is_messages(prompts))
    batch = [prompts] if single else list(prompts)
    ids = [prompts_lib.encode_prompt(tok, p, chat, system) for p in batch]
    new = generate(pretrained, ids, **kw)
    stops = [kw['stop']] if isinstance(kw.get('stop'), str) else [s for s in kw.get('stop') or [] if isinstance(s, str)]
    decode = lambda n: cut(tok.decode(n, skip_special_tokens=True), stops)  # noqa: E731
    texts = [[decode(x) for x in row] if kw.get('n', 1) > 1 else decode(row) for row in new]
    return texts[0] if single else texts


def cut(text: str, stops: Sequence[str]) -> str:
    """text up to the first occurrence of any of `stops`."""
    at = min([text.find(s) for s in stops if s and s in text], default=len(text))
    return text[:at]
