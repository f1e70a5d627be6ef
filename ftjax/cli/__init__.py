"""The commands: `python -m ftjax <verb> ...` (or the `ftjax <verb>` console script), one module per verb.

  ftjax train --config=experiments/quickstart.py:smoke --workdir=/tmp/run   fine-tune (ftjax/cli/train.py)
  ftjax <verb> --help                                                     a verb's flags

Each verb's module defines its flags when it runs (`run(argv)`), so importing every module of ftjax defines
none; `console` is the one command-line path (one-line errors, exit 2, quiet logs), `config_flag` the
experiment flag `--config` and its overrides, `which_model` the `--model` / `--workdir` choice of generate
and evaluate. Nothing in the library imports this package.
"""
import importlib
import sys

from ftjax.errors import EXIT_BAD_INPUT

VERBS = {
    'train': 'fine-tune a model: --config=experiments/x.py[:arg] --workdir=DIR',
    'sweep': 'one run per point of a grid of config values, and their table',
    'generate': 'generate text with a model or a training run',
    'evaluate': 'lm-evaluation-harness tasks on a model or a training run',
    'harness': "lm-eval's own command line with the model `ftjax` registered",
    'export': "a training run as a Hugging Face model or a PEFT adapter",
    'report': 'the results of runs and sweeps as a table',
    'config': 'the table of every config key (--markdown: docs/config.md)',
    'compile_check': 'compile the train step for a mesh or TPU topology and size its memory',
}


def usage():
    width = max(map(len, VERBS))
    return '\n'.join(['usage: ftjax <verb> [flags]   (or python -m ftjax <verb> ...; ftjax <verb> --help)', '',
                      'verbs:'] + [f'  {verb.ljust(width)}  {about}' for verb, about in VERBS.items()]) + '\n'


def main(argv=None):
    """Runs the verb `argv[1]` with the rest of `argv` (default: sys.argv); no verb or an unknown one prints
    the verbs and exits 2."""
    argv = list(sys.argv if argv is None else argv)
    verb = argv[1] if len(argv) > 1 else None
    if verb in ('-h', '--help', 'help'):
        sys.stdout.write(usage())
        return 0
    if verb not in VERBS:
        if verb is not None:
            sys.stderr.write(f'ftjax: error: unknown verb {verb!r}.\n')
        sys.stderr.write(usage())
        sys.exit(EXIT_BAD_INPUT)
    module = importlib.import_module(f'ftjax.cli.{verb}')  # only the verb that runs is imported
    return module.run([f'ftjax {verb}', *argv[2:]])
