"""Generate text from the command line (the library: `ftjax.decoding`, `ftjax.generate` the function).

    python -m ftjax.generate --model=PATH --prompt="..." [--chat] [--max_new_tokens=N] [--adapter=DIR]

Nothing in ftjax imports this module: importing it makes the attribute `ftjax.generate` the module
instead of the function, so library code uses `ftjax.decoding`.
"""
import logging
import sys
import time

import jax.numpy as jnp

from ftjax.decoding import generate_text
from ftjax.pretrained import load_pretrained


def define_flags(flag_values=None):
    """The CLI's absl flags (defined on demand, so importing this module defines none)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string('model', None, 'HF model directory, .gguf file or hub name.', flag_values=fv)
    flags.DEFINE_multi_string('prompt', None, 'Prompt text; repeat the flag for a batch.', flag_values=fv)
    flags.DEFINE_bool('chat', False, "Wrap each prompt in the tokenizer's chat template as a user turn.",
                      flag_values=fv)
    flags.DEFINE_string('system', None, 'Optional system message (with --chat).', flag_values=fv)
    flags.DEFINE_integer('max_new_tokens', 64, 'Most new tokens per prompt.', flag_values=fv)
    flags.DEFINE_float('temperature', 0.0, '0 = greedy; > 0 samples.', flag_values=fv)
    flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all).', flag_values=fv)
    flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).', flag_values=fv)
    flags.DEFINE_integer('seed', 0, 'Sampling seed.', flag_values=fv)
    flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'], 'Parameter/compute dtype.',
                      flag_values=fv)
    flags.DEFINE_string('adapter', None, 'A PEFT LoRA adapter directory to apply.', flag_values=fv)
    flags.mark_flags_as_required(['model', 'prompt'], flag_values=fv)
    return fv


def run_cli(fv, out=None):
    """Loads `fv.model`, generates for each `fv.prompt` and prints the answers (one block per prompt)."""
    out = out or sys.stdout
    pre = load_pretrained(fv.model, dtype=jnp.dtype(fv.dtype), adapter=fv.adapter)
    kw = dict(chat=fv.chat, system=fv.system, max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
              top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed)
    start = time.perf_counter()
    texts = generate_text(pre, list(fv.prompt), **kw)
    logging.info('Generated for %d prompt(s) in %.2f s (compile included).', len(texts), time.perf_counter() - start)
    for prompt, text in zip(fv.prompt, texts):
        if len(fv.prompt) > 1:
            print(f'### {prompt}', file=out)
        print(text, file=out)
    return texts


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass the prompt as --prompt='...'.")
    run_cli(flags.FLAGS)


if __name__ == '__main__':
    from ftjax import cli
    define_flags()
    cli.run(main)
