"""`python -m ftjax harness ...`: lm-eval's own command line (all its flags) with the model `ftjax` registered.

  python -m ftjax harness --model ftjax --model_args pretrained=PATH_OR_GGUF[,workdir=RUN] --tasks T --include_path DIR

The model_args: ftjax/eval/harness.py. `python -m ftjax evaluate` is the same with ftjax's own flags.
"""
import sys

from ftjax.cli import console
from ftjax.errors import UserError
from ftjax.eval import harness


def main(argv=None):
    """lm-eval's `cli_evaluate` on `argv` (without the program name; None: sys.argv[1:])."""
    harness.register()
    from lm_eval.__main__ import cli_evaluate  # lm-eval is optional (the `eval` extra): register() checks it

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


def run(argv=None):
    """lm-eval parses its own flags (its --verbosity too), so only ftjax's errors are made one line here."""
    try:
        main(None if argv is None else argv[1:])
    except UserError as e:  # e.g. lm-eval not installed, a bad model_arg
        console.fail(e, 0)
