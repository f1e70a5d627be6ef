"""`python -m ftjax generate`: generate text from the command line (the library: `ftjax.generate`).

    python -m ftjax generate --model=PATH --prompt="..." [--chat] [--max_new_tokens=N] [--adapter=DIR]
    python -m ftjax generate --workdir=RUN [--step=N] --prompt="..." [--chat]

`--model`: a HF directory, a .gguf file, a hub name or `packaged:NAME` (plus a `peft` adapter with
`--adapter`). `--workdir`: a training run's base model with its fine-tuned weights, from the run's latest
complete checkpoint (or `--step`), in the run's dtypes; nothing needs exporting first, and the workdir is
only read (ftjax/cli/which_model.py). Errors are one line (ftjax/cli/console.py), exit code 2.
"""
import logging
import sys
import time

from absl import app, flags

from ftjax.cli import console, which_model
from ftjax.errors import ConfigError
from ftjax.infer import generate_text


def define_flags(flag_values=None):
    """The command's absl flags (defined on demand, so importing this module defines none)."""
    fv = which_model.define_flags(flag_values if flag_values is not None else flags.FLAGS)
    define = [('multi_string', 'prompt', None, 'Prompt text; repeat the flag for a batch.'),
              ('bool', 'chat', False, "Wrap each prompt in the tokenizer's chat template as a user turn."),
              ('string', 'system', None, 'Optional system message (with --chat).'),
              ('string', 'chat_template', None, "With --chat and --model: 'gemma' | 'chatml' | 'llama3' or a Jinja "
               "template (default: the model's own, else its family's published format)."),
              ('integer', 'max_new_tokens', 64, 'Most new tokens per prompt.'),
              ('float', 'temperature', 0.0, '0 = greedy; > 0 samples.'),
              ('integer', 'top_k', 0, 'Sample among the k most likely tokens (0 = all).'),
              ('float', 'top_p', 1.0, 'Nucleus sampling mass (1 = off).'),
              ('integer', 'seed', 0, 'Sampling seed.')]
    for kind, name, default, help_text in define:
        if name not in fv:
            getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=fv)
    flags.mark_flags_as_required(['prompt'], flag_values=fv)
    return fv


def check_flags(fv):
    """One-line errors for flags that cannot work together or values that cannot work."""
    which_model.check_flags(fv, which_model.MODEL_ONLY + ('chat_template',),
                            'model.adapter, model.param_dtype, data.chat_template')
    for name, ok, need in (('max_new_tokens', fv.max_new_tokens > 0, 'a positive integer'),
                           ('temperature', fv.temperature >= 0, '>= 0 (0 = greedy)'),
                           ('top_k', fv.top_k >= 0, '>= 0 (0 = no top-k filter)'),
                           ('top_p', 0 < fv.top_p <= 1, 'in (0, 1]')):
        if not ok:
            raise ConfigError(f'--{name}={fv[name].value}: must be {need}.')


def run_cli(fv, out=None):
    """Loads the model of `fv`, generates for each `fv.prompt` and prints the answers (one block per prompt)."""
    out = out or sys.stdout
    check_flags(fv)
    pre, _ = which_model.load(fv, fv.chat_template)
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


def run(argv=None):
    define_flags()
    console.run(main, argv)
