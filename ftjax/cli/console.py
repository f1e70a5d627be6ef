r"""How every command runs: `run(main, argv)` runs an absl `main(argv)` (`ftjax/cli/<verb>.py`).

  --verbosity=debug (or -v)         tracebacks for user errors, and the third-party libraries' logs

A `ftjax.errors.UserError` (or a flags or usage error) prints one line, `ftjax: error: <message>`, and exits
2; any other exception keeps its traceback (a bug). The console shows ftjax's own log lines (INFO, as
`ftjax: ...`) and only warnings of the libraries underneath; `ftjax.logs.Progress` shows the progress of
long loops. When stderr is not a terminal (CI, a file, `| tee`), the data library's progress bars are off:
they would be one long line of carriage returns.
"""
import logging
import os
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging

from ftjax.cli.config_flag import parse_flags
from ftjax.errors import EXIT_BAD_INPUT, ConfigError, UserError

VERBOSITY = {'debug': 1, 'info': 0, 'warning': -1, 'error': -2, 'fatal': -3}  # absl's numbers
# Loggers of the libraries underneath: WARNING and up unless --verbosity asks for more. absl's
# logger carries orbax's (and absl's own) chatter; ftjax logs through the root logger.
THIRD_PARTY_LOGGERS = ('absl', 'jax', 'jax2tf', 'orbax', 'flax', 'optax', 'chex', 'etils', 'transformers',
                       'datasets', 'huggingface_hub', 'fsspec', 'filelock', 'urllib3', 'matplotlib', 'PIL',
                       'torch', 'tensorflow', 'h5py', 'numexpr', 'lm_eval', 'evaluate')


# --- running a main --------------------------------------------------------------------------------------

def verbosity(argv):
    """(argv with -v and --verbosity=NAME as absl's --verbosity=N, the level: 0 info, 1 debug, -1 warning)."""
    out, level, i = [], 0, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        name, equals, value = arg.partition('=')
        if name in ('-v', '--v', '-verbosity', '--verbosity'):
            if not equals:  # -v alone means debug; -v N and --verbosity X take the next argument
                takes_next = i < len(argv) and (re.fullmatch(r'-?\d+', argv[i]) or 'verbosity' in name)
                value, i = (argv[i], i + 1) if takes_next else ('debug', i)
            value = VERBOSITY.get(value.lower(), value)
            try:
                level = int(value)
            except ValueError:
                raise ConfigError(f'{arg}: --verbosity takes {" | ".join(VERBOSITY)} or a number.') from None
            arg = f'--verbosity={level}'
        out.append(arg)
    return out, level


def quiet_environment(level):
    """Environment of the libraries underneath, set before they are imported (setdefault: the user wins)."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if level > 0 else '1')  # XLA's C++ INFO lines
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'info' if level > 0 else 'warning')
    os.environ.setdefault('DATASETS_VERBOSITY', 'info' if level > 0 else 'warning')
    if level <= 0:
        os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')  # "PyTorch was not found ..."


def quiet_loggers(level):
    """ftjax's lines at the chosen level (INFO by default), the libraries' at WARNING unless debugging."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if level <= 0 else logging.NOTSET)
    if not sys.stderr.isatty() and os.environ.get('HF_DATASETS_DISABLE_PROGRESS_BARS') is None:
        os.environ['HF_DATASETS_DISABLE_PROGRESS_BARS'] = '1'  # read when `datasets` is first imported
        datasets = sys.modules.get('datasets')  # else already imported (by ftjax.data): switch them off there
        if datasets is not None:
            datasets.disable_progress_bars()


class ConsoleFormatter(logging.Formatter):
    """`ftjax: message` for ftjax's own lines, `ftjax: warning: message` for its warnings and
    `orbax: warning: message` for a library's (absl's prefix of time, thread and file:line only when
    debugging)."""

    def format(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += '\n' + self.formatException(record.exc_info)
        level = f'{record.levelname.lower()}: ' if record.levelno >= logging.WARNING else ''
        return f'{log_source(record)}: {level}{text}'


def log_source(record):
    """The package that logged `record`: 'ftjax', or the library ('orbax', 'jax', ...)."""
    path = record.pathname.replace(os.sep, '/')
    if '/site-packages/' in path:
        return path.split('/site-packages/')[-1].split('/')[0].removesuffix('.py')
    if record.name not in ('root', 'absl'):
        return record.name.split('.')[0]
    return 'ftjax'


def console_format(level):
    """Short log lines on the console unless debugging (then absl's own, with file:line)."""
    if level <= 0:
        absl_logging.get_absl_handler().setFormatter(ConsoleFormatter())


def error_message(error):
    cause = error.__cause__ or error.__context__
    if isinstance(error, flags.Error) and isinstance(cause, UserError):  # our parser's error, wrapped by absl
        error = cause
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def fail(error, level):
    """Prints `error` as one line (with its traceback first when debugging) and exits 2."""
    if level > 0:
        traceback.print_exception(error)
    sys.stdout.flush()
    sys.stderr.write(f'ftjax: error: {error_message(error)}\n')
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def command_help(main, flag_values=flags.FLAGS):
    """`--help` of a command: its module's docstring and the flags ftjax's modules defined (absl's own --help
    would list the flags of `__main__`, which defines none)."""
    text = [(sys.modules[main.__module__].__doc__ or '').strip(), '', 'flags:']
    for module in sorted(flag_values.flags_by_module_dict()):
        if module.startswith('ftjax'):
            text.append(flag_values.module_help(module))
    return '\n'.join(text) + '\n'


def run(main, argv=None, use_absl=True):
    """Runs `main(argv)` as the program: absl flags (or, use_absl=False, `main` parses argv[1:] itself),
    a quiet console, and one-line errors for the user's mistakes; exits with main's return value."""
    argv, level = verbosity(list(sys.argv if argv is None else argv))
    if use_absl and any(a in ('-h', '-help', '--help', '--helpshort', '-?') for a in argv[1:]):
        sys.stdout.write(command_help(main))
        sys.exit(0)
    quiet_environment(level)
    quiet_loggers(level)  # again once absl has parsed --verbosity (it sets its own logger's level)

    def flags_parser(args):
        try:
            return parse_flags(args)
        except (flags.Error, UserError) as e:
            fail(e, level)

    def guarded(args):
        quiet_loggers(level)
        console_format(level)
        try:
            return main(args)
        except (UserError, app.UsageError, flags.Error) as e:
            fail(e, level)

    if not use_absl:
        absl_logging.use_absl_handler()
        absl_logging.set_verbosity(level)
        sys.exit(guarded([a for a in argv[1:] if not a.startswith('--verbosity=')]))
    try:
        app.run(guarded, argv=argv, flags_parser=flags_parser)
    except UserError as e:  # raised while absl parsed the flags (e.g. a missing experiment file)
        fail(e, level)
