"""Fine-tuning entry point.

  python -m ftjax.train --config=experiments/quickstart.py[:smoke] --workdir=/tmp/run \\
      [--config.peft.lora.rank=16 --config.peft.trainable=.*norm.* ...] [--distributed] \\
      [--coordinator_address=host:port ...] [--verbosity=debug]

A thin `main` (flags only) calls `train_and_evaluate(config, workdir)`. Running the same command
again in the same workdir resumes from the latest complete checkpoint. The keys, their defaults and
allowed values: `python -m ftjax.config` (docs/config.md); the command line: ftjax/cli.py.
"""
import sys

from absl import app, flags

from ftjax import cli, sharding
from ftjax.loop import train_and_evaluate

FLAGS = flags.FLAGS
cli.define_config_flag()
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard logs.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (auto-detects TPU pods).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host outside TPU pods).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process index (with --coordinator_address).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}; flags are written --name=value.')
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required.')
    sharding.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    sys.exit(result.get('exit_code', 0))


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    cli.run(main)
