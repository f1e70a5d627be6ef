"""The commands (ftjax/cli/): `python -m ftjax <verb>` and the `ftjax` console script dispatch to one module per
verb, the shared --model / --workdir choice (`which_model`) and `generate`'s output. The one-line errors of each
command: tests/test_console.py; the --config flag and its overrides: tests/test_config.py."""
import configparser
import importlib
import io
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from ftjax import cli
from ftjax.cli import evaluate as evaluate_cli, export as export_cli, generate as generate_cli, which_model
from ftjax.errors import EXIT_BAD_INPUT, ConfigError
from ftjax.infer import generate_text
from ftjax.models import load_pretrained
from tests import tiny

NEW = 16


@pytest.fixture(scope='module')
def varied(tmp_path_factory):
    """A tiny Llama whose greedy continuations vary (initializer_range=0.2)."""
    path = tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp('varied')), initializer_range=0.2)
    return load_pretrained(path)


def test_every_verb_is_a_module_with_run():
    assert set(cli.VERBS) == {'train', 'sweep', 'generate', 'evaluate', 'harness', 'export', 'report', 'config',
                              'compile_check'}
    for verb in cli.VERBS:
        assert callable(importlib.import_module(f'ftjax.cli.{verb}').run), verb
        assert verb in cli.usage()


def test_no_verb_or_an_unknown_one_lists_the_verbs(capsys):
    for argv, named in ((['ftjax'], None), (['ftjax', 'trian'], "unknown verb 'trian'")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == EXIT_BAD_INPUT and 'verbs:' in err and 'compile_check' in err, err
        assert named is None or named in err
    assert cli.main(['ftjax', '--help']) == 0 and 'verbs:' in capsys.readouterr().out


@pytest.mark.slow  # subprocesses; the fast lane calls `ftjax.cli.main` in-process (the tests above and below)
def test_python_dash_m_ftjax_and_the_console_script():
    env = dict(os.environ, PYTHONPATH=tiny.REPO)
    proc = subprocess.run([sys.executable, '-m', 'ftjax'], cwd=tiny.REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT and 'verbs:' in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, '-m', 'ftjax', 'generate', '--help'], cwd=tiny.REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # the verb's own flags, not __main__'s
    assert proc.returncode == 0 and '`python -m ftjax generate`' in proc.stdout, proc.stderr[-2000:]
    assert all(f'--{name}' in proc.stdout for name in ('prompt', 'max_new_tokens', 'model', 'workdir')), proc.stdout
    setup = configparser.ConfigParser()
    setup.read(os.path.join(tiny.REPO, 'setup.cfg'))
    script = setup['options.entry_points']['console_scripts'].strip()
    assert script == 'ftjax = ftjax.cli:main'
    if shutil.which('ftjax'):  # installed (pip install -e .): the script itself
        proc = subprocess.run(['ftjax', '--help'], cwd=tiny.REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and 'verbs:' in proc.stdout, proc.stderr[-2000:]


def test_commands_share_their_flags():
    """generate, evaluate and export define their flags on one FlagValues: the shared ones (--workdir, --step,
    --model, ...) once, no clash."""
    fv = flags.FlagValues()
    for module in (generate_cli, evaluate_cli, export_cli):
        module.define_flags(fv)
    assert {'model', 'adapter', 'dtype', 'workdir', 'step', 'prompt', 'tasks', 'format', 'out'} <= set(fv)


@pytest.mark.parametrize('argv,match', [
    (['--model=m', '--workdir=w'], 'are exclusive'),
    ([], 'pass --model=PATH'),
    (['--workdir=w', '--adapter=a'], r'--adapter go with --model; with --workdir=w the run'),
    (['--workdir=w', '--dtype=bfloat16'], r'--dtype go with --model'),
    (['--model=m', '--step=3'], r'--step=3 picks a checkpoint of a --workdir'),
])
def test_which_model_errors(argv, match):
    fv = which_model.define_flags(flags.FlagValues())
    fv(['x', *argv])
    with pytest.raises(ConfigError, match=match):
        which_model.check_flags(fv)


def test_generate_chat_template_goes_with_model():
    fv = generate_cli.define_flags(flags.FlagValues())
    fv(['generate', '--workdir=w', '--prompt=hi', '--chat_template=chatml'])
    with pytest.raises(ConfigError, match='--chat_template go with --model.*data.chat_template'):
        generate_cli.check_flags(fv)
    fv = generate_cli.define_flags(flags.FlagValues())
    fv(['generate', '--model=m', '--prompt=hi', '--top_p=0'])
    with pytest.raises(ConfigError, match=r'--top_p=0.0: must be in \(0, 1\]'):
        generate_cli.check_flags(fv)


def test_generate_prints_the_generation(varied):
    fv = generate_cli.define_flags(flags.FlagValues())
    fv(['generate', f'--model={varied.path}', '--prompt=The quick brown fox', '--chat', f'--max_new_tokens={NEW}'])
    out = io.StringIO()
    texts = generate_cli.run_cli(fv, out)
    expected = generate_text(varied, 'The quick brown fox', chat=True, max_new_tokens=NEW)
    assert texts == [expected] and expected.strip()
    assert out.getvalue() == expected + '\n'
