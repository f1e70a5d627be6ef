"""`python -m ftjax evaluate`: lm-evaluation-harness tasks on a model or a training run's fine-tuned model.

  python -m ftjax evaluate --workdir=RUN --tasks=gsm8k_local --include_path=experiments/eval_tasks [--limit=50]
  python -m ftjax evaluate --model=PATH_OR_GGUF --tasks=sst2_local,gsm8k_local --include_path=experiments/eval_tasks

With --workdir the run's fine-tuned model (latest complete checkpoint, or --step) is evaluated and the results
are written to RUN/harness.json (shown by `python -m ftjax report`); --out=FILE writes them elsewhere. The
library: `ftjax.eval.harness`.
"""
from absl import app, flags

from ftjax import sharding
from ftjax.cli import console, which_model
from ftjax.errors import ConfigError
from ftjax.eval import harness
from ftjax.workdir import RunDir


def define_flags(flag_values=None):
    """The command's absl flags (defined on demand, so importing this module defines none)."""
    fv = which_model.define_flags(flag_values if flag_values is not None else flags.FLAGS,
                                  "A training run: its fine-tuned model; results go to WORKDIR/harness.json.")
    define = [('list', 'tasks', None, 'lm-eval task names or task YAML files, comma-separated.'),
              ('multi_string', 'include_path', None, 'A directory of task YAMLs (e.g. experiments/eval_tasks).'),
              ('integer', 'limit', None, 'Evaluate only the first N examples of each task.'),
              ('integer', 'num_fewshot', None, "Few-shot examples per prompt (default: each task's own)."),
              ('integer', 'batch_size', 8, 'Rows per batch (rounded up to the mesh\'s batch shards).'),
              ('integer', 'max_length', None, "Context length (default: the model's max_position_embeddings)."),
              ('bool', 'apply_chat_template', False, "Wrap each prompt in the tokenizer's chat template."),
              ('bool', 'log_samples', False, 'Also write every prompt and answer (<out>_samples.jsonl).'),
              ('integer', 'bootstrap_iters', 100000, 'lm-eval bootstrap iterations for stderrs (0: none).'),
              ('string', 'out', None, 'Results JSON file (default: WORKDIR/harness.json; none with --model).'),
              ('string', 'mesh', 'data=-1,fsdp=1,tensor=1', 'Device mesh sizes (as config.mesh.*).')]
    for kind, name, default, help_text in define:
        if name not in fv:
            getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=fv)
    flags.mark_flags_as_required(['tasks'], flag_values=fv)
    return fv


def parse_mesh(text):
    """'data=-1,fsdp=1,tensor=1' -> {'data': -1, 'fsdp': 1, 'tensor': 1} (axes left out: 1, data: -1)."""
    sizes = {'data': -1, 'fsdp': 1, 'tensor': 1}
    for part in filter(None, (p.strip() for p in str(text).split(','))):
        axis, _, value = part.partition('=')
        if axis not in sizes or not value.lstrip('-').isdigit():
            raise ConfigError(f"--mesh={text}: {part!r} should be AXIS=SIZE with AXIS one of {sorted(sizes)}, e.g. "
                              f"--mesh=data=2,tensor=4.")
        sizes[axis] = int(value)
    return sizes


def run_cli(fv):
    """Evaluates `fv.model` or the run `fv.workdir` on `fv.tasks`; returns (lm-eval results, summary)."""
    which_model.check_flags(fv)
    mesh = sharding.make_mesh(parse_mesh(fv.mesh))
    harness.find_tasks(fv.tasks, fv.include_path)  # a wrong task name fails before the model loads
    pre, step = which_model.load(fv)
    out = fv.out or (str(RunDir(fv.workdir).harness_file) if fv.workdir else None)
    return harness.evaluate_model(
        pre, fv.tasks, out=out, include_path=fv.include_path, limit=fv.limit, num_fewshot=fv.num_fewshot,
        batch_size=fv.batch_size, log_samples=fv.log_samples, max_length=fv.max_length, mesh=mesh,
        meta={'model': which_model.source(fv), 'step': step},
        evaluate_kwargs={'apply_chat_template': fv.apply_chat_template, 'bootstrap_iters': fv.bootstrap_iters})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}; flags are written --name=value.')
    run_cli(flags.FLAGS)


def run(argv=None):
    define_flags()
    console.run(main, argv)
