r"""The one command-line path of every entry point (ftjax.train, sweep, compile_check, export, generate).

  --config=experiments/x.py[:arg]   the experiment: its get_config(arg), a ConfigDict
  --config.KEY=VALUE                an override, typed by the schema (`python -m ftjax.config`,
                                    docs/config.md); a list key takes one value
                                    (--config.peft.trainable=.*norm.* -> ['.*norm.*']), repeated
                                    flags (each adds items) or a Python literal ("['q_proj$', 'v_proj$']");
                                    `None` for a key that may be None; `--config.KEY` / `--noconfig.KEY`
                                    for bools
  --verbosity=debug (or -v)         tracebacks for user errors, and the third-party libraries' logs

`run(main)` runs an absl `main(argv)`: a `ftjax.errors.UserError` (or a flags or usage error) prints
one line, `ftjax: error: <message>`, and exits 2; any other exception keeps its traceback (a bug).
The console shows ftjax's own log lines (INFO, as `ftjax: ...`) and only warnings of the libraries
underneath; `ftjax.logs.Progress` shows the progress of long loops. When stderr is not a terminal (CI, a
file, `| tee`), the data library's progress bars are off: they would be one long line of carriage returns.
"""
import ast
import importlib.util
import logging
import os
import re
import sys
import traceback

import ml_collections
from absl import app, flags
from absl import logging as absl_logging

from ftjax import config as config_lib
from ftjax.errors import EXIT_BAD_INPUT, ConfigError, MissingFileError, UserError

FLAGS = flags.FLAGS
TRUE, FALSE = ('true', 't', 'yes', 'y', '1'), ('false', 'f', 'no', 'n', '0')
VERBOSITY = {'debug': 1, 'info': 0, 'warning': -1, 'error': -2, 'fatal': -3}  # absl's numbers
# Loggers of the libraries underneath: WARNING and up unless --verbosity asks for more. absl's
# logger carries orbax's (and absl's own) chatter; ftjax logs through the root logger.
THIRD_PARTY_LOGGERS = ('absl', 'jax', 'jax2tf', 'orbax', 'flax', 'optax', 'chex', 'etils', 'transformers',
                       'datasets', 'huggingface_hub', 'fsspec', 'filelock', 'urllib3', 'matplotlib', 'PIL',
                       'torch', 'tensorflow', 'h5py', 'numexpr', 'lm_eval', 'evaluate')
_OVERRIDE = re.compile(r'^--?(no)?config\.([^=]+)(?:(=)(.*))?$', re.S)


# --- experiment and overrides ----------------------------------------------------------------------

def load_experiment(spec):
    """`file.py` or `file.py:arg` -> its get_config() or get_config('arg') (a ConfigDict)."""
    path, *arg = spec.split(':', 1)
    if not os.path.isfile(path):
        raise MissingFileError(f'--config={spec}: no file {path!r} (relative to {os.getcwd()}).')
    module_spec = importlib.util.spec_from_file_location('ftjax_experiment', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f'--config={spec}: {path} defines no get_config(); an experiment file returns its '
                          f'ConfigDict from get_config(arg=None).')
    config = module.get_config(*arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict '
                          f'(start from ftjax.config.default_config()).')
    return config


def split_overrides(argv):
    """argv -> (argv without the overrides, [(key, text), ...]): --config.KEY=VALUE, --config.KEY VALUE,
    --config.KEY (true) and --noconfig.KEY (false), in order; '--' ends the flags."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            rest += argv[i:]
            break
        match = _OVERRIDE.match(arg)
        i += 1
        if not match:
            rest.append(arg)
            continue
        no, key, equals, text = match.groups()
        if no:
            if equals:
                raise ConfigError(f'{arg}: --noconfig.KEY takes no value; write --config.{key}={text}.')
            text = 'false'
        elif not equals:
            kind = getattr(config_lib.KEYS.get(key), 'type', None)
            if kind is bool or i == len(argv) or argv[i].startswith('--'):
                text = 'true'
            else:
                text, i = argv[i], i + 1
        overrides.append((key, text))
    return rest, overrides


def parse_value(key, text):
    """The command-line text of schema key `key` (a config.Key) as its type; a list key's text is a list
    literal or one item."""
    where = f'--config.{key.name}={text}'
    if text.strip() == 'None' and key.nullable:
        return None
    if key.type is list:  # a list or tuple literal, else one item: '(q|v)_proj$' is a regex, not a literal
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        return list(value) if isinstance(value, (list, tuple)) else [value if isinstance(value, str) else text]
    if key.type is bool:
        if text.lower() not in TRUE + FALSE:
            raise ConfigError(f'{where}: config.{key.name} is a bool (true or false).')
        return text.lower() in TRUE
    if key.type is str:
        return text
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f'{where}: config.{key.name} must be {config_lib.TYPE_NAMES[key.type]}.') from None
    if key.type is int:
        if not number.is_integer():
            raise ConfigError(f'{where}: config.{key.name} must be an integer.')
        return int(number)
    return number


def _set(config, name, value, where):
    *groups, leaf = name.split('.')
    node = config
    for group in groups:
        if not isinstance(node, ml_collections.ConfigDict) or group not in node:
            raise ConfigError(f"{where}: the experiment's config has no group config.{name.rsplit('.', 1)[0]} "
                              f'(build it from ftjax.config.default_config()).')
        node = node[group]
    try:
        node[leaf] = value
    except (TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f'{where}: {e}') from None


def apply_overrides(config, overrides):
    """Sets the [(key, text), ...] of `split_overrides` on `config`: a scalar key takes its last value,
    the values of a list key are joined in order. An unknown key is a ConfigError naming the closest."""
    values = {}
    for name, text in overrides:
        key = config_lib.KEYS.get(name)
        if key is None:
            raise ConfigError(f'--config.{name}={text}: {config_lib.unknown_key_error(name)}')
        value = parse_value(key, text)
        if key.type is list and values.get(name) is not None and value is not None:
            value = values[name] + value
        values[name] = value
    for name, value in values.items():
        _set(config, name, value, f'--config.{name}')
    return config


def load_config(spec, overrides=(), validate=True):
    """The experiment `spec` with the overrides applied, validated and locked (no key can be added)."""
    config = apply_overrides(load_experiment(spec), overrides)
    if validate:
        config_lib.validate(config)
    config.lock()
    return config


def parse_config(argv, validate=True):
    """The config of a command line (a list without the program name is fine): its --config and overrides."""
    rest, overrides = split_overrides(list(argv))
    specs = [a.split('=', 1)[1] for a in rest if re.match(r'^--?config=', a)]
    specs += [rest[i + 1] for i, a in enumerate(rest[:-1]) if re.match(r'^--?config$', a)]
    if not specs:
        raise ConfigError('no --config=experiments/x.py[:arg] given.')
    return load_config(specs[-1], overrides, validate)


# --- absl flags ----------------------------------------------------------------------------------------

class ExperimentParser(flags.ArgumentParser):
    """Parses --config=experiments/x.py[:arg] into its ConfigDict, with the overrides `parse_flags` found."""
    syntax_help = 'experiments/x.py[:arg]'

    def __init__(self):
        self.overrides = []

    def parse(self, argument):
        if isinstance(argument, ml_collections.ConfigDict):
            return argument
        try:
            return load_config(argument, self.overrides)
        except UserError:
            raise
        except (TypeError, ValueError, OverflowError) as e:  # absl would print these as one line: a bug
            raise RuntimeError(f'--config={argument}: the experiment raised {type(e).__name__}') from e

    def flag_type(self):
        return 'experiment config'


def define_config_flag(flag_values=FLAGS):
    """--config on `flag_values` (once; every entry point with an experiment config shares it)."""
    if 'config' not in flag_values:
        flags.DEFINE(ExperimentParser(), 'config', None,
                     'Experiment file, experiments/x.py[:arg]; then --config.KEY=VALUE overrides '
                     '(`python -m ftjax.config` lists the keys).', flag_values=flag_values)
    return flag_values


def parse_flags(argv, flag_values=FLAGS):
    """absl's parse with the --config.KEY overrides taken out first (and applied by --config's parser)."""
    argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)
    if 'config' in flag_values and isinstance(flag_values['config'].parser, ExperimentParser):
        argv, overrides = split_overrides(argv)
        flag_values['config'].parser.overrides = overrides
        rest = flag_values(argv)
        if overrides and flag_values.config is None:
            raise ConfigError(f'--config.{overrides[0][0]} given, but no --config=experiments/x.py[:arg].')
        return rest
    return flag_values(argv)


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


def run(main, argv=None, use_absl=True):
    """Runs `main(argv)` as the program: absl flags (or, use_absl=False, `main` parses argv[1:] itself),
    a quiet console, and one-line errors for the user's mistakes; exits with main's return value."""
    argv, level = verbosity(list(sys.argv if argv is None else argv))
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
