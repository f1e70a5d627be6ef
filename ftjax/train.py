"""`python -m ftjax.train ...` is `python -m ftjax train ...` (ftjax/cli/train.py); the library is ftjax.loop."""
import sys

from ftjax import cli

if __name__ == '__main__':
    sys.exit(cli.main([sys.argv[0], 'train', *sys.argv[1:]]))
