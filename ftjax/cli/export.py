"""`python -m ftjax export`: a training run as a Hugging Face model, or its LoRA adapter for `peft`.

  python -m ftjax export --workdir=DIR --out=DIR --format=hf|peft [--step=N] [--dtype=bfloat16|float32]

The library: `ftjax.export` (what is written, and why). Errors are one line, exit code 2.
"""
from absl import app, flags

from ftjax.cli import console
from ftjax.export import export


def define_flags(flag_values=None):
    """The command's absl flags (defined on demand, so importing this module defines none)."""
    fv = flag_values if flag_values is not None else flags.FLAGS
    define = [('string', 'workdir', None, 'The training run to export (holds config.json and checkpoints/).'),
              ('string', 'out', None, 'Output directory (new or empty).'),
              ('enum', 'format', 'hf', 'hf: merged Hugging Face model; peft: the LoRA adapter alone.', ['hf', 'peft']),
              ('integer', 'step', None, 'Checkpoint step to export (default: the latest complete one).'),
              ('enum', 'dtype', 'float32', 'dtype of the exported tensors.', ['float32', 'bfloat16', 'float16'])]
    for kind, name, default, help_text, *choices in define:
        if name not in fv:
            getattr(flags, f'DEFINE_{kind}')(name, default, *choices, help_text, flag_values=fv)
    flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)
    return fv


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
    fv = flags.FLAGS
    print(export(fv.workdir, fv.out, fv.format, fv.step, fv.dtype))


def run(argv=None):
    define_flags()
    console.run(main, argv)
