"""The config schema and the command line: defaults, validation, docs/config.md, --config.KEY overrides
(list keys included), experiment arguments, one-line errors, and sweeps that pass overrides on."""
import ast
import json
import os
import shlex
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from ftjax import config as config_lib, sweep
from ftjax.cli import config as config_cli, config_flag, sweep as sweep_cli
from ftjax.errors import EXIT_BAD_INPUT, ConfigError
from tests import tiny
from tests.tiny import REPO

ENV = tiny.subprocess_env()
EXPERIMENT = '''
from ftjax.config import default_config, parse_arg


def get_config(arg=None):
    variant, flags = parse_arg(arg, 'lora', ('lora', 'full'), 'exp.py')
    c = default_config()
    c.model.path = {model!r}
    c.data.path = {data!r}
    c.peft.method = variant
    if 'smoke' in flags:
        c.train.steps = 2
    return c
'''
LIST_KEYS = {  # key: (one value, the same as a literal, two repeated values)
    'peft.trainable': ('.*norm.*', "['.*norm.*']", ['.*norm.*', 'bias$']),
    'peft.lora.targets': ('(q|v)_proj$', "('(q|v)_proj$',)", ['q_proj$', 'v_proj$']),
    'optim.no_decay': ('norm', "['norm']", ['norm', 'embed']),
    'optim.lr_multipliers': ('lora_b$=16', "['lora_b$=16']", ['lora_b$=16', 'head=2']),
    'data.label_names': ('negative', "['negative']", ['negative', 'positive']),
    'mesh.rules': (None, "[('embed', 'fsdp'), ('mlp', ['tensor', 'fsdp'])]", None),
}


@pytest.fixture
def experiment(tmp_path):
    data = tmp_path / 'train.jsonl'
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    path = tmp_path / 'exp.py'
    path.write_text(EXPERIMENT.format(model=str(tmp_path / 'no_such_model'), data=str(data)))
    return str(path)


def valid_config():
    c = config_lib.default_config()
    c.model.path, c.data.path = 'model', 'data.jsonl'
    return c


def train_flags():
    """A fresh FlagValues with `ftjax train`'s --config (the same parser) and --workdir."""
    fv = flags.FlagValues()
    config_flag.define_config_flag(fv)
    flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
    return fv


def train_argv(experiment, *overrides):
    return ['train', f'--config={experiment}', '--workdir=/tmp/unused', *overrides]


# --- the schema ----------------------------------------------------------------------------------------

def test_default_config_follows_the_schema():
    c = config_lib.default_config()
    leaves = dict(config_lib._leaves(c, ''))
    assert sorted(leaves) == sorted(k.name for k in config_lib.SCHEMA)
    for key in config_lib.SCHEMA:
        *groups, leaf = key.name.split('.')
        node = c
        for g in groups:
            node = node[g]
        assert leaves[key.name] == key.default or (key.name == 'mesh.rules' and leaves[key.name] == [
            list(r) for r in config_lib.DEFAULT_RULES]), key.name
        if key.default is None:  # a typed placeholder: the command line can set it
            assert node.get_type(leaf) is key.type, key.name
    assert config_lib.default_data_config().to_dict() == c.data.to_dict()
    config_lib.validate(valid_config())
    with pytest.raises(ConfigError, match=r'config.model.path is not set .*--config.model.path='):
        config_lib.validate(config_lib.default_config())


def test_docs_config_md_is_in_sync():
    with open(os.path.join(REPO, 'docs', 'config.md')) as f:
        assert f.read() == config_cli.markdown(), 'regenerate: python -m ftjax config --markdown > docs/config.md'
    table = config_cli.text_table()
    assert all(k.name in table for k in config_lib.SCHEMA)


@pytest.mark.parametrize('key,value,message', [
    ('peft.method', 'lorra', r"config.peft.method='lorra' is not one of \['full', 'partial', 'lora', 'dora'\]"),
    ('optim.schedule', 'cosin', r"config.optim.schedule='cosin' is not one of"),
    ('train.nan_policy', 'ignore', r"config.train.nan_policy='ignore' is not one of \['halt', 'skip'\]"),
    ('data.format', 'sharegpt', r"config.data.format='sharegpt' is not one of"),
    ('peft.lora.rank', 0, r'config.peft.lora.rank must be a positive integer, got 0'),
    ('peft.lora.dropout', 1.0, r'config.peft.lora.dropout must be in \[0, 1\), got 1.0'),
    ('optim.learning_rate', 0.0, r'config.optim.learning_rate must be positive, got 0.0'),
    ('data.max_length', 1, r'config.data.max_length must be an integer >= 2, got 1'),
    ('data.eval_fraction', 1.0, r'config.data.eval_fraction must be in \[0, 1\)'),
    ('mesh.fsdp', 0, r'config.mesh.fsdp must be -1 \(all remaining devices\) or a positive integer'),
    ('peft.trainable', ['('], r"config.peft.trainable: '\(' is not a valid regex"),
    ('peft.lora.targets', [], r'config.peft.lora.targets is empty'),
    ('optim.lr_multipliers', ['lora_b'], r"config.optim.lr_multipliers: 'lora_b' should look like 'regex=multiplier'"),
    ('mesh.rules', [['embed', 'fsd']], r"config.mesh.rules: 'embed' -> 'fsd' is not a mesh axis"),
    ('train.steps', '10', r"config.train.steps must be an integer, got '10'"),
    ('data.shuffle', None, r'config.data.shuffle must not be None \(a bool\)'),
])
def test_validation_errors_name_the_key_and_the_allowed_values(key, value, message):
    d = valid_config().to_dict()  # as a config.json reads back: no type safety
    *groups, leaf = key.split('.')
    node = d
    for g in groups:
        node = node[g]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(ml_collections.ConfigDict(d))


def test_unknown_missing_and_cross_key_errors():
    c = valid_config()
    c.train.step = 3
    with pytest.raises(ConfigError, match=r'config.train.step is not a config key. Did you mean config.train.steps'):
        config_lib.validate(c)
    c = valid_config()
    c.peft.lora.rnk = 4
    with pytest.raises(ConfigError, match=r'config.peft.lora.rnk .*Did you mean config.peft.lora.rank'):
        config_lib.validate(c)
    c = valid_config()
    c.optimizer = ml_collections.ConfigDict({'lr': 1e-3})
    with pytest.raises(ConfigError, match=r'config.optimizer is not a config key. Did you mean config.optim\b'):
        config_lib.validate(c)
    c = valid_config()
    del c.train['seed']
    with pytest.raises(ConfigError, match='config.train.seed is missing'):
        config_lib.validate(c)
    c = valid_config()
    c.train.batch_size, c.optim.grad_accum = 6, 4
    with pytest.raises(ConfigError, match='config.train.batch_size=6 is not divisible by config.optim.grad_accum=4'):
        config_lib.validate(c)
    c = valid_config()
    c.data.text_stride, c.data.max_length = 300, 256
    with pytest.raises(ConfigError, match=r'config.data.text_stride must be in \[1, max_length=256\], got 300'):
        config_lib.validate(c)
    c.data.text_stride = 128
    c.mesh.data = c.mesh.tensor = -1
    with pytest.raises(ConfigError, match='only one of mesh.data/mesh.fsdp/mesh.tensor/mesh.context/mesh.expert may be -1'):
        config_lib.validate(c)
    c = valid_config()
    c.mesh.context, c.data.max_length = 4, 100
    with pytest.raises(ConfigError, match=r'config.data.max_length=100 must be a multiple of 8 with mesh.context=4 '
                                          r'and model.context_load_balance .* --config.data.max_length=104'):
        config_lib.validate(c)
    c.model.context_load_balance = False
    config_lib.validate(c)  # 100 = 25 tokens per shard
    c.data.pad_to_multiple_of = 10  # cut batches must split over the context shards too
    with pytest.raises(ConfigError, match=r'config.data.pad_to_multiple_of=10 must be a multiple of 4 with '
                                          r'mesh.context=4: set --config.data.pad_to_multiple_of=12'):
        config_lib.validate(c)
    c.data.pad_to_multiple_of = 20
    config_lib.validate(c)
    c = valid_config()
    c.align.loss, c.align.num_generations, c.rollout.prompts, c.train.batch_size = 'grpo', 4, 2, 8
    config_lib.validate(c)
    c.data.pad_to_multiple_of = 16
    with pytest.raises(ConfigError, match=r"pad_to_multiple_of=16 trims batches read from data; align.loss='grpo' "
                                          r"trains on rollouts.*--config.data.pad_to_multiple_of=0"):
        config_lib.validate(c)
    # A group alone: the data pipeline checks its own part (data.path is required there too).
    d = config_lib.default_data_config()
    with pytest.raises(ConfigError, match='config.data.path is not set'):
        config_lib.check_data_config(d)
    d.path = 'x.jsonl'
    assert config_lib.check_data_config(d) is d


def test_parse_arg_rejects_unknown_variants_and_flags(tmp_path):
    assert config_lib.parse_arg('full,smoke', 'lora', ('lora', 'full'), 'x.py') == ('full', {'smoke'})
    assert config_lib.parse_arg(None, 'lora', ('lora', 'full'), 'x.py') == ('lora', set())
    assert config_lib.parse_arg('smoke', 'lora', ('lora', 'full'), 'x.py') == ('lora', {'smoke'})
    assert config_lib.parse_arg('smoke', None, (), 'q.py') == (None, {'smoke'})
    with pytest.raises(ConfigError, match=r"x.py:lora,smok: unknown flag 'smok'. Did you mean 'smoke'\?"):
        config_lib.parse_arg('lora,smok', 'lora', ('lora', 'full'), 'x.py')
    with pytest.raises(ConfigError, match=r"x.py:lorra: unknown variant 'lorra'. Did you mean 'lora'\?"):
        config_lib.parse_arg('lorra', 'lora', ('lora', 'full'), 'x.py')
    with pytest.raises(ConfigError, match=r"q.py:lora: unknown flag 'lora'.*flags: smoke"):
        config_lib.parse_arg('lora', None, (), 'q.py')
    # The shipped experiments pass their allowed arguments.
    for spec, match in [('experiments/sst2_minilm.py:lora,smok', "Did you mean 'smoke'"),
                        ('experiments/quickstart.py:smok', "Did you mean 'smoke'"),
                        ('experiments/papers/lora_glue.py:sst2,cpux', "Did you mean 'cpu'"),
                        ('experiments/alpaca_smollm2.py:dorra', "Did you mean 'dora'")]:
        with pytest.raises(ConfigError, match=match):
            config_lib.load_experiment(os.path.join(REPO, spec))
    glue = config_lib.load_experiment(os.path.join(REPO, 'experiments/papers/lora_glue.py:mrpc,cpu,smoke'))
    assert glue.train.steps == 2


@pytest.mark.parametrize('spec', [
    'quickstart.py', 'quickstart.py:smoke', 'sst2_minilm.py:lora_all,smoke', 'sst2_minilm.py:bitfit',
    'papers/lora_glue.py:sst2', 'papers/lora_glue.py:mrpc,cpu,smoke', 'gsm8k_smollm2.py:dora,smoke',
    'alpaca_smollm2.py:full', 'shakespeare_smollm2.py:lora,smoke'])
def test_shipped_experiments_are_valid_configs(spec):
    config = config_lib.load_config(os.path.join(REPO, 'experiments', spec))  # validated, nothing loaded
    assert config.train.steps == 2 if 'smoke' in spec else config.train.steps > 2


# --- command-line overrides --------------------------------------------------------------------------

@pytest.mark.parametrize('key', sorted(LIST_KEYS))
def test_list_keys_from_the_command_line(experiment, key):
    one, literal, two = LIST_KEYS[key]
    expected = list(ast.literal_eval(literal))
    cases = [([f'--config.{key}={literal}'], expected)]
    if one is not None:
        cases += [([f'--config.{key}={one}'], [one]),
                  ([f'--config.{key}={v}' for v in two], two),
                  ([f'--config.{key}', two[0], f'--config.{key}={two[1]}'], two)]  # the space form too
    for overrides, want in cases:
        fv = train_flags()
        rest = config_flag.parse_flags(train_argv(experiment, *overrides), fv)  # what `ftjax train` parses
        assert rest == ['train'] and fv.workdir == '/tmp/unused'
        node = fv.config
        for part in key.split('.'):
            node = node[part]
        assert node == want, (overrides, node)
        assert config_flag.parse_config(train_argv(experiment, *overrides)).to_dict() == fv.config.to_dict()


def test_scalar_overrides_and_their_errors(experiment):
    c = config_flag.parse_config([f'--config={experiment}:full,smoke', '--config.peft.lora.rank=16',
                          '--config.optim.learning_rate=3e-4', '--noconfig.data.shuffle', '--config.train.resume',
                          '--config.model.num_labels', '3', '--config.data.fields.text_pair=sentence2',
                          '--config.train.seed=1e3', '--config.data.eval_path=None'])
    assert (c.peft.method, c.train.steps, c.peft.lora.rank, c.optim.learning_rate) == ('full', 2, 16, 3e-4)
    assert (c.data.shuffle, c.train.resume, c.model.num_labels, c.train.seed) == (False, True, 3, 1000)
    assert c.data.fields.text_pair == 'sentence2' and c.data.eval_path is None
    with pytest.raises(AttributeError, match='locked'):  # as with config_flags' lock_config=True
        c.train.new_key = 1
    for override, match in [
            ('--config.train.step=3', r'--config.train.step=3: config.train.step is not a config key. '
                                      r'Did you mean config.train.steps'),
            ('--config.train.steps=3.5', r'--config.train.steps=3.5: config.train.steps must be an integer'),
            ('--config.peft.lora.rslora=maybe', 'is a bool'),
            ('--config.optim.learning_rate=fast', 'must be a number'),
            ('--config.peft.method=lorra', r"config.peft.method='lorra' is not one of"),
            ('--config.train.steps=None', r'--config.train.steps=None: config.train.steps must be an integer')]:
        with pytest.raises(ConfigError, match=match):
            config_flag.parse_config([f'--config={experiment}', override])
    with pytest.raises(ConfigError, match=r"exp.py:lora,smok: unknown flag 'smok'"):
        config_flag.parse_config([f'--config={experiment}:lora,smok'])


def test_one_parser_for_overrides_grids_and_tests(experiment):
    """`--config.KEY=VALUE` and a sweep's `--grid` read text through `ftjax.config.parse_value`: the same
    booleans (one vocabulary), numbers, quoted strings, lists and None; `override` sets typed values."""
    base = config_lib.load_experiment(experiment)
    for key, text, value in [('peft.lora.rslora', 'y', True), ('peft.lora.rslora', 'No', False),
                             ('peft.lora.rslora', '1', True), ('train.seed', '1e3', 1000),
                             ('optim.learning_rate', '3e-4', 3e-4), ('peft.method', "'dora'", 'dora'),
                             ('peft.lora.targets', 'q_proj$', ['q_proj$']),
                             ('peft.lora.targets', "['q_proj$', 'v_proj$']", ['q_proj$', 'v_proj$']),
                             ('data.eval_path', 'None', None)]:
        assert config_lib.parse_value(key, text) == value and sweep.convert(base, key, text) == value, (key, text)
        c = config_flag.parse_config([f'--config={experiment}', f'--config.{key}={text}'], validate=False)
        node = c
        for part in key.split('.'):
            node = node[part]
        assert node == value, (key, text)
    with pytest.raises(ConfigError, match=r'--grid peft.lora.rslora=maybe: config.peft.lora.rslora is a bool'):
        sweep.convert(base, 'peft.lora.rslora', 'maybe')
    changed = config_lib.override(base, {'peft.lora.rank': 4, 'train.seed': 2})
    assert (changed.peft.lora.rank, changed.train.seed, base.peft.lora.rank) == (4, 2, 8)
    with pytest.raises(ConfigError, match='has no group config.nope'):
        config_lib.override(base, {'nope.x': 1})


def run_module(*argv, timeout=120):
    return subprocess.run([sys.executable, '-m', *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # the fast lane has tests/test_console.py's one-line errors of `python -m ftjax train`
def test_train_command_line_errors_are_one_line(experiment, tmp_path):
    workdir = str(tmp_path / 'w')
    bad = run_module('ftjax', 'train', f'--config={experiment}', f'--workdir={workdir}', '--config.train.step=3')
    assert bad.returncode == EXIT_BAD_INPUT, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        'ftjax: error: --config.train.step=3: config.train.step is not a config key. Did you mean '
        'config.train.steps or config.train.seed? (`python -m ftjax config` lists every key.)']
    smok = run_module('ftjax.train', f'--config={experiment}:lora,smok', f'--workdir={workdir}')
    assert smok.returncode == EXIT_BAD_INPUT and len(smok.stderr.strip().splitlines()) == 1
    assert "unknown flag 'smok'. Did you mean 'smoke'?" in smok.stderr
    debug = run_module('ftjax', 'train', f'--config={experiment}', f'--workdir={workdir}', '--config.train.step=3',
                       '--verbosity=debug')
    assert debug.returncode == EXIT_BAD_INPUT and 'Traceback' in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith('ftjax: error: --config.train.step=3')
    assert not os.path.exists(workdir)
    # List overrides get through the parse: the run fails on the missing model, and a run that failed
    # leaves no config.json (tests/test_workdir.py).
    overrides = ['--config.peft.trainable=.*norm.*', "--config.peft.lora.targets=('q_proj$', 'v_proj$')",
                 '--config.optim.no_decay=norm', '--config.optim.no_decay=bias$']
    ok = run_module('ftjax', 'train', f'--config={experiment}', f'--workdir={workdir}', *overrides)
    assert ok.returncode != 0 and 'no_such_model' in ok.stderr, ok.stderr[-2000:]
    assert 'not supported for overriding' not in ok.stderr
    assert not os.path.exists(os.path.join(workdir, 'config.json'))
    written = json.loads(config_flag.parse_config([f'--config={experiment}', *overrides]).to_json())
    assert written['peft']['trainable'] == ['.*norm.*']
    assert written['peft']['lora']['targets'] == ['q_proj$', 'v_proj$']
    assert written['optim']['no_decay'] == ['norm', 'bias$']


def test_config_table_command():
    out = run_module('ftjax', 'config')
    assert out.returncode == 0 and out.stdout == config_cli.text_table()


# --- sweeps ------------------------------------------------------------------------------------------------

def test_sweep_passes_overrides_to_every_run(experiment, tmp_path, capsys):
    workdir = str(tmp_path / 'sweep')
    args = [f'--config={experiment}:full', '--grid=optim.learning_rate=1e-4,3e-4', f'--workdir={workdir}',
            '--config.peft.trainable=.*norm.*', '--config.train.steps=3', '--print_commands']
    assert sweep_cli.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, lr in zip(lines, (1e-4, 3e-4)):
        argv = shlex.split(line)
        assert argv[:4] == ['python', '-m', 'ftjax', 'train'] and '--config.peft.trainable=.*norm.*' in argv
        c = config_flag.parse_config(argv[4:])  # each run's command parses back to the sweep's config of that run
        assert (c.peft.trainable, c.train.steps, c.optim.learning_rate, c.peft.method) == (
            ['.*norm.*'], 3, lr, 'full')
    runs = sweep.plan(f'{experiment}:full', ['optim.learning_rate=1e-4,3e-4'], workdir,
                      [('peft.trainable', '.*norm.*'), ('peft.trainable', 'bias$')])
    assert all(r.config.peft.trainable == ['.*norm.*', 'bias$'] for r in runs)
    with pytest.raises(ConfigError, match='--config.optim.learning_rate is also swept by --grid'):
        sweep_cli.main([f'--config={experiment}', '--grid=optim.learning_rate=1e-4,3e-4', f'--workdir={workdir}',
                    '--config.optim.learning_rate=1e-3', '--print_commands'])
    # A list grid runs each point through `ftjax sweep`, with the overrides.
    assert sweep_cli.main([f'--config={experiment}', "--grid=peft.lora.targets=['q_proj$'],['v_proj$']",
                       f'--workdir={tmp_path}/s2', '--config.train.steps=3', '--print_commands']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all('--config.train.steps=3' in shlex.split(line) for line in lines)
    # A sweep run whose stored config has another override value is refused.
    stored = os.path.join(workdir, runs[0].name)
    os.makedirs(stored)
    json.dump({'peft': {'trainable': ['x']}, 'optim': {'learning_rate': 1e-4}}, open(f'{stored}/config.json', 'w'))
    with pytest.raises(ConfigError, match="holds a run with peft.trainable=\\['x'\\]"):
        sweep.check_existing(runs, [('peft.trainable', '.*norm.*')])


def test_sweep_command_line_error_is_one_line(experiment, tmp_path):
    out = run_module('ftjax', 'sweep', f'--config={experiment}', '--grid=peft.lora.rank=4,8',
                     f'--workdir={tmp_path}/s', '--config.peft.lora.rnk=4', '--print_commands')
    assert out.returncode == EXIT_BAD_INPUT
    [line] = out.stderr.strip().splitlines()
    assert line.startswith('ftjax: error: --config.peft.lora.rnk=4: config.peft.lora.rnk is not a config key. '
                           'Did you mean config.peft.lora.rank')


@pytest.mark.slow  # ~20 s: one 2-step run of the tiny Llama, in process
def test_tiny_sweep_trains_with_a_list_override(tmp_path, tiny_llama_dir):
    from ftjax import report, synthetic
    paths = synthetic.write_task(str(tmp_path / 'data'), n_train=8, n_eval=2, seed=0)
    exp = tiny.write_experiment(tmp_path / 'tiny_exp.py', tiny_llama_dir, paths, **{
        'train.steps': 2, 'train.batch_size': 2, 'train.eval_every': 2, 'train.checkpoint_every': 2,
        'mesh.data': 2, 'mesh.tensor': -1})
    workdir = str(tmp_path / 'sweep')
    assert sweep_cli.main([f'--config={exp}', '--grid=peft.lora.rank=2', f'--workdir={workdir}',
                       '--config.peft.trainable=final_norm/scale$', '--config.train.seed=3']) == 0
    [row] = report.collect(workdir)
    assert row['status'] == 'finished' and row['step'] == 2
    stored = json.load(open(os.path.join(workdir, 'rank2', 'config.json')))
    assert stored['peft']['trainable'] == ['final_norm/scale$'] and stored['train']['seed'] == 3
    # rank-2 LoRA on every linear layer of the tiny Llama (2 x 2048 per rank) plus the final norm's 64 scales
    assert row['trainable params'] == 2 * 2048 + 64
