"""`python -m ftjax report --workdir=DIR [--write]`: the results of a run or a sweep as a markdown table
(the library: `ftjax.report`)."""
import argparse

from ftjax import report
from ftjax.cli import console


def main(argv=None):
    """The command line (argv without the program name) -> exit code."""
    parser = argparse.ArgumentParser(prog='python -m ftjax report', description=report.__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='A run workdir or a sweep workdir.')
    parser.add_argument('--write', action='store_true',
                        help='Also write results.csv, results.md and loss_curves.png into the workdir.')
    args = parser.parse_args(argv)
    rows = report.write_all(args.workdir) if args.write else report.collect(args.workdir)
    print(report.markdown_table(rows), end='')
    return 0


def run(argv=None):
    console.run(main, argv, use_absl=False)
