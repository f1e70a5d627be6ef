"""Which model a command runs (generate, evaluate): `--model=PATH [--adapter=DIR] [--dtype=...]`, a model as
it is, or `--workdir=RUN [--step=N]`, a training run's fine-tuned model (its base with its trained weights,
from the latest complete checkpoint or step N, in the run's dtypes; the workdir is only read)."""
import jax.numpy as jnp
from absl import flags

from ftjax import checkpoint
from ftjax.build import restore_for_export
from ftjax.data import templates
from ftjax.errors import ConfigError
from ftjax.models.loading import require_tokenizer
from ftjax.pretrained import load_pretrained

MODEL_ONLY = ('adapter', 'dtype')  # the run's config decides these for --workdir


def define_flags(flag_values, workdir_help='A training run (--workdir of `ftjax train`): its fine-tuned model.'):
    """--model, --adapter, --dtype, --workdir and --step on `flag_values` (those it lacks)."""
    define = [('string', 'model', None, 'HF directory (an export too), .gguf file, hub name or packaged:NAME.'),
              ('string', 'adapter', None, 'A PEFT LoRA adapter directory on top of --model.'),
              ('enum', 'dtype', 'float32', 'Parameter/compute dtype (with --model).',
               ['float32', 'bfloat16', 'float16']),
              ('string', 'workdir', None, workdir_help),
              ('integer', 'step', None, 'With --workdir: the checkpoint step (default: the latest complete one).')]
    for kind, name, default, help_text, *choices in define:
        if name not in flag_values:
            getattr(flags, f'DEFINE_{kind}')(name, default, *choices, help_text, flag_values=flag_values)
    return flag_values


def check_flags(fv, model_only=MODEL_ONLY, decided_by='model.adapter, model.param_dtype'):
    """One-line errors: --model and --workdir are exclusive (one is needed), `model_only` flags go with --model
    and --step with --workdir."""
    if fv.model and fv.workdir:
        raise ConfigError(f'--model={fv.model} and --workdir={fv.workdir} are exclusive: --model is a model as it '
                          f"is, --workdir a training run's fine-tuned model; pass one.")
    if not fv.model and not fv.workdir:
        raise ConfigError('pass --model=PATH (a HF directory, .gguf file, hub name or packaged:NAME) or '
                          '--workdir=RUN (a training run).')
    if fv.workdir:
        given = [f'--{name}' for name in model_only if fv[name].present]
        if given:
            raise ConfigError(f"{' and '.join(given)} go with --model; with --workdir={fv.workdir} the run's "
                              f'config decides them ({decided_by}).')
    elif fv.step is not None:
        raise ConfigError(f'--step={fv.step} picks a checkpoint of a --workdir; --model={fv.model} has none.')


def load(fv, chat_template=None):
    """(the `Pretrained` of `fv`'s checked flags, the checkpoint step or None). With --model, `chat_template`
    (a name or Jinja text; None: the model's own, else its family's) is set on the tokenizer."""
    if fv.workdir:
        step = checkpoint.pick_complete_step(fv.workdir, fv.step)[0]
        return restore_for_export(fv.workdir, step), step
    pre = require_tokenizer(load_pretrained(fv.model, dtype=jnp.dtype(fv.dtype), adapter=fv.adapter),
                            f'--model={fv.model}')
    templates.apply(pre.tokenizer, getattr(pre.config, 'model_type', None), chat_template, source=fv.model)
    return pre, None


def source(fv):
    """What the model is, for the record: the workdir or the --model path."""
    return fv.workdir or fv.model
