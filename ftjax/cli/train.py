"""`python -m ftjax train`: fine-tune.

  python -m ftjax train --config=experiments/quickstart.py[:smoke] --workdir=/tmp/run \\
      [--config.peft.lora.rank=16 --config.peft.trainable=.*norm.* ...] [--distributed] \\
      [--coordinator_address=host:port ...] [--verbosity=debug]

A thin `main` (flags only) calls `train_and_evaluate(config, workdir)`. Running the same command
again in the same workdir resumes from the latest complete checkpoint. The keys, their defaults and
allowed values: `python -m ftjax config` (docs/config.md); the --config flag: ftjax/cli/config_flag.py.
"""
import sys

from absl import app, flags

from ftjax import sharding
from ftjax.cli import config_flag, console
from ftjax.loop import train_and_evaluate


def define_flags(flag_values=flags.FLAGS):
    """--config and the flags of a (multi-host) training run, on `flag_values`."""
    fv = config_flag.define_config_flag(flag_values)
    define = [('string', 'workdir', None, 'Directory for checkpoints, metrics and TensorBoard logs.'),
              ('bool', 'distributed', False, 'Call jax.distributed.initialize() (auto-detects TPU pods).'),
              ('string', 'coordinator_address', None, 'host:port of process 0 (multi-host outside TPU pods).'),
              ('integer', 'num_processes', None, 'Number of processes (with --coordinator_address).'),
              ('integer', 'process_id', None, 'This process index (with --coordinator_address).')]
    for kind, name, default, help_text in define:
        if name not in fv:
            getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=fv)
    flags.mark_flags_as_required(['config'], flag_values=fv)
    return fv


def main(argv):
    fv = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}; flags are written --name=value.')
    if fv.workdir is None:
        raise app.UsageError('--workdir is required.')
    sharding.maybe_initialize_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
    result = train_and_evaluate(fv.config, fv.workdir)
    sys.exit(result.get('exit_code', 0))


def run(argv=None):
    define_flags()
    console.run(main, argv)
