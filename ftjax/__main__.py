"""`python -m ftjax <verb> ...`: the commands of ftjax/cli/ (the same as the `ftjax` console script)."""
import sys

from ftjax import cli

if __name__ == '__main__':
    sys.exit(cli.main())
