r"""The `--config` flag of train, sweep and compile_check: an experiment file and its overrides.

  --config=experiments/x.py[:arg]   the experiment: its get_config(arg), a ConfigDict
  --config.KEY=VALUE                an override, typed by the schema (`python -m ftjax config`,
                                    docs/config.md); a list key takes one value
                                    (--config.peft.trainable=.*norm.* -> ['.*norm.*']), repeated
                                    flags (each adds items) or a Python literal ("['q_proj$', 'v_proj$']");
                                    `None` for a key that may be None; `--config.KEY` / `--noconfig.KEY`
                                    for bools

The text is read by `ftjax.config.parse_value` (the one parser, shared with sweeps and tests); this module
only finds the overrides among the arguments and hands them to absl's `--config` parser.
"""
import re

import ml_collections
from absl import flags

from ftjax import config as config_lib
from ftjax.errors import ConfigError, UserError

_OVERRIDE = re.compile(r'^--?(no)?config\.([^=]+)(?:(=)(.*))?$', re.S)


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


def parse_config(argv, validate=True):
    """The config of a command line (a list without the program name is fine): its --config and overrides."""
    rest, overrides = split_overrides(list(argv))
    specs = [a.split('=', 1)[1] for a in rest if re.match(r'^--?config=', a)]
    specs += [rest[i + 1] for i, a in enumerate(rest[:-1]) if re.match(r'^--?config$', a)]
    if not specs:
        raise ConfigError('no --config=experiments/x.py[:arg] given.')
    return config_lib.load_config(specs[-1], overrides, validate)


class ExperimentParser(flags.ArgumentParser):
    """Parses --config=experiments/x.py[:arg] into its ConfigDict, with the overrides `parse_flags` found."""
    syntax_help = 'experiments/x.py[:arg]'

    def __init__(self):
        self.overrides = []

    def parse(self, argument):
        if isinstance(argument, ml_collections.ConfigDict):
            return argument
        try:
            return config_lib.load_config(argument, self.overrides)
        except UserError:
            raise
        except (TypeError, ValueError, OverflowError) as e:  # absl would print these as one line: a bug
            raise RuntimeError(f'--config={argument}: the experiment raised {type(e).__name__}') from e

    def flag_type(self):
        return 'experiment config'


def define_config_flag(flag_values=flags.FLAGS):
    """--config on `flag_values` (once; every entry point with an experiment config shares it)."""
    if 'config' not in flag_values:
        flags.DEFINE(ExperimentParser(), 'config', None,
                     'Experiment file, experiments/x.py[:arg]; then --config.KEY=VALUE overrides '
                     '(`python -m ftjax config` lists the keys).', flag_values=flag_values)
    return flag_values


def parse_flags(argv, flag_values=flags.FLAGS):
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
