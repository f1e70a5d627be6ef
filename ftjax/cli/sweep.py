"""`python -m ftjax sweep`: one run per point of a grid of config values, then their table (the library, the
grid's syntax and how runs are named, skipped and resumed: `ftjax.sweep`).

  python -m ftjax sweep --config=experiments/x.py[:arg] --workdir=DIR --grid=peft.lora.rank=4,8,16 \\
      [--grid=optim.learning_rate=1e-4,3e-4] [--parallel=N] [--print_commands] [--only=NAME] [--config.KEY=VALUE ...]
      [--grid=arg=lora,full] [--seeds=3] [--metric='final eval/accuracy'] [--baseline=arg=full]
"""
import argparse
import shlex
import sys

from ftjax import config as config_lib, report, sweep
from ftjax.cli import config_flag, console, report as report_cli
from ftjax.errors import ConfigError


def main(argv=None):
    """The command line (argv without the program name; None: sys.argv[1:]) -> exit code."""
    argv, overrides = config_flag.split_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog='python -m ftjax sweep', description=sweep.__doc__.split('\n')[0])
    parser.add_argument('--config', required=True, help='Experiment file, experiments/x.py[:arg].')
    parser.add_argument('--grid', action='append', default=[], help='KEY=V1,V2,... (repeat for more keys).')
    parser.add_argument('--workdir', required=True, help='The sweep directory; one sub-workdir per run.')
    parser.add_argument('--parallel', type=int, default=1, help='Runs at a time (>1: as subprocesses).')
    parser.add_argument('--print_commands', action='store_true', help='Print one command per run and exit.')
    parser.add_argument('--only', action='append', default=[], help='Run only the named run(s) of the grid.')
    parser.add_argument('--seeds', type=int, default=0,
                        help='Run every configuration with train.seed=0..N-1; the report groups the seeds.')
    report_cli.add_group_flags(parser)
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f'--parallel must be >= 1, got {args.parallel}.')

    runs = sweep.plan(args.config, args.grid, args.workdir, overrides, args.seeds)
    for run in runs:
        try:
            config_lib.validate(run.config)
        except ValueError as e:
            raise ConfigError(f'sweep run {run.name}: {e}') from None
    sweep.check_existing(runs, overrides)
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in runs})
        if unknown:
            raise ConfigError(f'--only: no run named {unknown} in this grid; its runs are '
                             f'{[r.name for r in runs]}.')
        runs = [r for r in runs if r.name in args.only]
    else:
        sweep.write_sweep_file(args.workdir, args.config, args.grid, runs, overrides, args.seeds)

    if args.print_commands:
        for argv_ in sweep.commands(runs, args.config, args.grid, args.workdir, overrides=overrides, seeds=args.seeds):
            print(shlex.join(argv_))
        return 0
    if args.parallel > 1:
        argvs = sweep.commands(runs, args.config, args.grid, args.workdir, sys.executable, overrides, args.seeds)
        rc = sweep.run_parallel(runs, argvs, args.parallel)
    else:
        rc = sweep.run_sequential(runs)
    if not args.only:
        rows, by_config = report.write_all(args.workdir, args.metric, args.baseline)
        print(report.markdown_table(rows), end='')
        if by_config:
            print('\n' + by_config, end='')
        sweep.say(f'wrote {args.workdir}/results.csv, results.md and loss_curves.png'
                  + (' and results_by_config.csv, .md, seed_curves.png' if by_config else ''))
    return rc


def run(argv=None):
    console.run(main, argv, use_absl=False)
