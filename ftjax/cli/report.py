"""`python -m ftjax report --workdir=DIR [--write] [--metric=M] [--baseline=KEY=VALUE]`: the results of a run
or a sweep as a markdown table, and per configuration (seeds grouped) the mean, std and 95% interval of one
metric, with the difference to a baseline row (the library: `ftjax.report`, `ftjax.stats`)."""
import argparse

from ftjax import report
from ftjax.cli import console


def main(argv=None):
    """The command line (argv without the program name) -> exit code."""
    parser = argparse.ArgumentParser(prog='python -m ftjax report', description=report.__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='A run workdir or a sweep workdir.')
    parser.add_argument('--write', action='store_true',
                        help='Also write results.csv, results.md and loss_curves.png into the workdir.')
    add_group_flags(parser)
    args = parser.parse_args(argv)
    if args.write:
        rows, by_config = report.write_all(args.workdir, args.metric, args.baseline)
    else:
        rows, by_config = report.collect(args.workdir), None
        if report.has_seeds(rows) or args.metric or args.baseline:
            by_config = report.grouped_table(*report.grouped(rows, args.metric, args.baseline))
    print(report.markdown_table(rows), end='')
    if by_config:
        print('\n' + by_config, end='')
    return 0


def add_group_flags(parser):
    """--metric and --baseline, of `report` and of `sweep` (whose end is a report)."""
    parser.add_argument('--metric', default=None,
                        help="The column the configurations are compared on, e.g. 'final eval/accuracy' (default: "
                             "the first of " + ', '.join(report.METRICS) + ' that the runs have).')
    parser.add_argument('--baseline', default=None,
                        help='KEY=VALUE: each configuration against the one with VALUE for KEY (same other values), '
                             'e.g. --baseline=arg=full or --baseline=peft.lora.rank=8.')


def run(argv=None):
    console.run(main, argv, use_absl=False)
