"""Generate text from the command line (the library: `ftjax.decoding`, `ftjax.generate` the function).

    python -m ftjax.generate --model=PATH --prompt="..." [--chat] [--max_new_tokens=N] [--adapter=DIR]
    python -m ftjax.generate --workdir=RUN [--step=N] --prompt="..." [--chat]

`--model`: a HF directory, a .gguf file, a hub name or `packaged:NAME` (plus a `peft` adapter with
`--adapter`). `--workdir`: a training run's base model with its fine-tuned weights, from the run's latest
complete checkpoint (or `--step`), in the run's dtypes; nothing needs exporting first, and the workdir is
only read. Errors are one line (`ftjax.cli`), exit code 2.

Nothing in ftjax imports this module: importing it makes the attribute `ftjax.generate` the module
instead of the function, so library code uses `ftjax.decoding`.
"""
import logging
import sys
import time

import jax.numpy as jnp
from absl import app, flags

from ftjax import cli
from ftjax.build import restore_for_export
from ftjax.data import templates
from ftjax.decoding import generate_text
from ftjax.errors import ConfigError
from ftjax.pretrained import load_pretrained


def define_flags(flag_values=None):
    """The CLI's absl flags (defined on demand, so importing this module defines none)."""
    fv = flag_values if flag_values is not None else flags.FLAGS
    define = [('string', 'model', None, 'HF model directory, .gguf file, hub name or packaged:NAME.'),
              ('string', 'workdir', None, 'A training run (--workdir of ftjax.train): its fine-tuned model.'),
              ('integer', 'step', None, 'With --workdir: the checkpoint step (default: the latest complete one).'),
              ('multi_string', 'prompt', None, 'Prompt text; repeat the flag for a batch.'),
              ('bool', 'chat', False, "Wrap each prompt in the tokenizer's chat template as a user turn."),
              ('string', 'system', None, 'Optional system message (with --chat).'),
              ('string', 'chat_template', None, "With --chat and --model: 'gemma' | 'chatml' | 'llama3' or a Jinja "
               "template (default: the model's own, else its family's published format)."),
              ('integer', 'max_new_tokens', 64, 'Most new tokens per prompt.'),
              ('float', 'temperature', 0.0, '0 = greedy; > 0 samples.'),
              ('integer', 'top_k', 0, 'Sample among the k most likely tokens (0 = all).'),
              ('float', 'top_p', 1.0, 'Nucleus sampling mass (1 = off).'),
              ('integer', 'seed', 0, 'Sampling seed.'),
              ('enum', 'dtype', 'float32', 'Parameter/compute dtype (with --model).',
               ['float32', 'bfloat16', 'float16']),
              ('string', 'adapter', None, 'A PEFT LoRA adapter directory to apply (with --model).')]
    for kind, name, default, help_text, *choices in define:
        if name not in fv:  # --workdir / --step are shared with other entry points imported first
            getattr(flags, f'DEFINE_{kind}')(name, default, *choices, help_text, flag_values=fv)
    flags.mark_flags_as_required(['prompt'], flag_values=fv)
    return fv


def check_flags(fv):
    """One-line errors for flags that cannot work together or values that cannot work."""
    if fv.model and fv.workdir:
        raise ConfigError(f'--model={fv.model} and --workdir={fv.workdir} are exclusive: --model generates with a '
                          f'model as it is, --workdir with a training run\'s fine-tuned model; pass one.')
    if not fv.model and not fv.workdir:
        raise ConfigError('pass --model=PATH (a HF directory, .gguf file or hub name) or --workdir=RUN '
                          '(a training run).')
    if fv.workdir:
        given = [f'--{name}' for name in ('adapter', 'dtype', 'chat_template') if fv[name].present]
        if given:
            raise ConfigError(f"{' and '.join(given)} go with --model; with --workdir={fv.workdir} the run's "
                              f"config decides them (model.adapter, model.param_dtype, data.chat_template).")
    elif fv.step is not None:
        raise ConfigError(f'--step={fv.step} picks a checkpoint of a --workdir; --model={fv.model} has none.')
    for name, ok, need in (('max_new_tokens', fv.max_new_tokens > 0, 'a positive integer'),
                           ('temperature', fv.temperature >= 0, '>= 0 (0 = greedy)'),
                           ('top_k', fv.top_k >= 0, '>= 0 (0 = no top-k filter)'),
                           ('top_p', 0 < fv.top_p <= 1, 'in (0, 1]')):
        if not ok:
            raise ConfigError(f'--{name}={fv[name].value}: must be {need}.')


def load_model(fv):
    """The model to generate with: `--model` (+ `--adapter`), or a training run's fine-tuned model."""
    if fv.workdir:
        return restore_for_export(fv.workdir, fv.step)
    pre = load_pretrained(fv.model, dtype=jnp.dtype(fv.dtype), adapter=fv.adapter)
    templates.apply(pre.tokenizer, getattr(pre.config, 'model_type', None), fv.chat_template, source=fv.model)
    return pre


def run_cli(fv, out=None):
    """Loads the model of `fv`, generates for each `fv.prompt` and prints the answers (one block per prompt)."""
    out = out or sys.stdout
    check_flags(fv)
    pre = load_model(fv)
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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass the prompt as --prompt='...'.")
    run_cli(flags.FLAGS)


if __name__ == '__main__':
    define_flags()
    cli.run(main)
