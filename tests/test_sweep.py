"""Sweeps and reports: grid parsing, typed overrides, run names, commands, skipping, tables and plots.

Most tests use a small hand-written config schema and fake run directories (config.json,
metrics.jsonl, summary.json); `test_smoke_sweep_2x2` trains a tiny Llama for real.
"""
import csv
import json
import os
import shlex
import shutil
import signal
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from ftjax import checkpoint, config as config_lib, report, sweep, workdir as workdir_lib
from ftjax.errors import EXIT_PREEMPTED, ConfigError
from ftjax.cli import report as report_cli, sweep as sweep_cli
from tests import tiny

SCHEMA = '''
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({'path': 'tiny', 'num_labels': config_dict.placeholder(int)})
    c.peft = ml_collections.ConfigDict({'method': 'lora', 'trainable': []})
    c.peft.lora = ml_collections.ConfigDict({'rank': 8, 'alpha': 16.0, 'rslora': False,
                                             'targets': ['(q|k|v|o)_proj$']})
    c.optim = ml_collections.ConfigDict({'learning_rate': 1e-4, 'name': 'adamw'})
    c.train = ml_collections.ConfigDict({'steps': 3 if arg == 'short' else 4, 'seed': 0, 'batch_size': 8})
    c.eval = ml_collections.ConfigDict({'batch_size': 8})
    c.data = ml_collections.ConfigDict({'seed': 0, 'path': 'train.jsonl'})
    return c
'''


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / 'exp.py'
    path.write_text(SCHEMA)
    return str(path)


@pytest.fixture
def no_validate(monkeypatch):
    """The hand-written schema lacks most keys ftjax.config.validate checks."""
    monkeypatch.setattr('ftjax.config.validate', lambda config: config)


def _fake_run(run_dir, config, losses, evals=None, summary=True, key='eval/loss'):
    """A workdir as train_and_evaluate leaves it: losses at steps 1.., evals {step: value}."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
        json.dump(config, f)
    evals = evals or {}
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        for step, loss in enumerate(losses, 1):
            row = {'step': step, 'loss': loss, 'learning_rate': 1e-4, 'grad_norm': 1.0, 'tokens_per_s': 100.0}
            if step in evals:
                row[key] = evals[step]
            f.write(json.dumps(row) + '\n')
    if summary:
        last_eval = {key: evals[max(evals)]} if evals else {}
        with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
            json.dump({'step': len(losses), 'loss': losses[-1], 'trainable_params': 1234, 'total_params': 99999,
                       'tokens_per_s': 512.5, 'wall_s': 3.0, 'compile_s': 1.0, 'exit_code': 0, **last_eval}, f)


# --- grid parsing and typed overrides ----------------------------------------------------------

def test_split_values_respects_brackets_and_quotes():
    assert sweep.split_values('4, 8,16') == ['4', '8', '16']
    assert sweep.split_values("['a','b'],[\"c,d\"],'x,y'") == ["['a','b']", '["c,d"]', "'x,y'"]


@pytest.mark.parametrize('spec,match', [
    ('peft.lora.rank', 'expected KEY=V1,V2'),
    ('peft.lora.rank=', 'expected KEY=V1,V2'),
    ('peft.lora.rank=4,,8', 'empty value'),
    ('peft.lora.rank=4,4', 'listed twice'),
])
def test_parse_grid_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        sweep.parse_grid([spec])


def test_parse_grid_rejects_a_key_given_twice_and_strips_config_prefix():
    assert sweep.parse_grid(['config.optim.learning_rate=1e-4,3e-4']) == [('optim.learning_rate', ['1e-4', '3e-4'])]
    with pytest.raises(ValueError, match="'peft.lora.rank' is given twice"):
        sweep.parse_grid(['peft.lora.rank=4', 'peft.lora.rank=8'])


def test_convert_matches_field_types(experiment):
    c = config_lib.load_experiment(experiment)
    assert sweep.convert(c, 'peft.lora.rank', '16') == 16 and type(sweep.convert(c, 'peft.lora.rank', '1e3')) is int
    assert sweep.convert(c, 'optim.learning_rate', '3e-4') == 3e-4
    assert type(sweep.convert(c, 'peft.lora.alpha', '32')) is float
    assert sweep.convert(c, 'peft.lora.rslora', 'True') is True and sweep.convert(c, 'peft.lora.rslora', 'no') is False
    assert sweep.convert(c, 'peft.method', "'dora'") == 'dora' and sweep.convert(c, 'peft.method', 'full') == 'full'
    assert sweep.convert(c, 'peft.lora.targets', "['q_proj$', 'v_proj$']") == ['q_proj$', 'v_proj$']
    assert sweep.convert(c, 'peft.lora.targets', 'q_proj$') == ['q_proj$']  # one item, as --config.KEY=VALUE
    assert sweep.convert(c, 'model.num_labels', '3') == 3  # a typed placeholder (None by default)


@pytest.mark.parametrize('key,text,error,match', [
    ('peft.lora.rank', 'big', ValueError, '--grid peft.lora.rank=big: config.peft.lora.rank must be an integer'),
    ('peft.lora.rank', '4.5', ValueError, 'config.peft.lora.rank must be an integer'),
    ('optim.learning_rate', 'fast', ValueError, 'config.optim.learning_rate must be a number'),
    ('peft.lora.rslora', 'maybe', ValueError, 'is a bool'),
    ('model.num_labels', 'three', ValueError, 'config.model.num_labels must be an integer'),
    ('peft.lora.rnak', '4', KeyError, "no 'peft.lora.rnak'.*Did you mean peft.lora.rank"),
    ('optimizer.lr', '4', KeyError, "no 'optimizer'"),
    ('peft.lora', '4', KeyError, 'group of settings'),
])
def test_convert_errors_name_the_key(experiment, key, text, error, match):
    with pytest.raises(error, match=match):
        sweep.convert(config_lib.load_experiment(experiment), key, text)


def test_load_config_passes_the_arg(experiment):
    assert config_lib.load_experiment(experiment).train.steps == 4
    assert config_lib.load_experiment(experiment + ':short').train.steps == 3
    with pytest.raises(FileNotFoundError, match='no file'):
        config_lib.load_experiment(experiment + '.missing')


# --- planning: names, configs, commands ---------------------------------------------------------

def test_plan_2x2_names_and_configs(experiment, tmp_path):
    runs = sweep.plan(experiment, ['peft.lora.rank=4,8', 'optim.learning_rate=1e-4,3e-4'], str(tmp_path / 's'))
    assert [r.name for r in runs] == ['rank4_lr0.0001', 'rank4_lr0.0003', 'rank8_lr0.0001', 'rank8_lr0.0003']
    assert runs[1].workdir == str(tmp_path / 's' / 'rank4_lr0.0003')
    assert [(r.config.peft.lora.rank, r.config.optim.learning_rate) for r in runs] == [
        (4, 1e-4), (4, 3e-4), (8, 1e-4), (8, 3e-4)]
    assert runs[0].config.train.steps == 4 and runs[0].config.peft.lora.alpha == 16.0  # the rest untouched


def test_names_are_unique_and_filesystem_safe(experiment, tmp_path):
    # Same last key name -> the parent joins it; a one-value key stays out of the name.
    runs = sweep.plan(experiment, ['train.batch_size=4,8', 'peft.method=dora', 'eval.batch_size=2,4'], str(tmp_path))
    assert [r.name for r in runs] == ['train_bs4_eval_bs2', 'train_bs4_eval_bs4', 'train_bs8_eval_bs2',
                                      'train_bs8_eval_bs4']
    assert all(r.config.peft.method == 'dora' for r in runs)
    runs = sweep.plan(experiment, ['peft.method=lora,dora', 'train.seed=0,1'], str(tmp_path))
    assert [r.name for r in runs] == ['lora_seed0', 'lora_seed1', 'dora_seed0', 'dora_seed1']
    # Values that read the same once made safe still get their own directories.
    runs = sweep.plan(experiment, ["data.path=a/b.jsonl,'a b.jsonl',../x"], str(tmp_path))
    names = [r.name for r in runs]
    assert names == ['path-a-b.jsonl', 'path-a-b.jsonl-2', 'path-x']
    assert all(os.sep not in n and not n.startswith('.') for n in names)
    long = sweep.plan(experiment, ['data.path=' + 'x' * 300 + ',' + 'x' * 299 + 'y'], str(tmp_path))
    assert len({r.name for r in long}) == 2 and all(len(r.name) <= sweep.MAX_NAME for r in long)


def test_print_commands_parse_back_with_config_flags(experiment, tmp_path, capsys, no_validate):
    workdir = str(tmp_path / 'sweep')
    rc = sweep_cli.main([f'--config={experiment}:short', '--grid=peft.lora.rank=4,8',
                     '--grid=optim.learning_rate=1e-4,3e-4', '--grid=peft.lora.rslora=false,true',
                     f'--workdir={workdir}', '--print_commands'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 8
    argv = shlex.split(lines[3])
    assert argv[:4] == ['python', '-m', 'ftjax', 'train']
    assert f'--workdir={workdir}/rank4_lr0.0003_rslora-true' in argv
    # The same flags through ml_collections' config_flags (absl's usual --config) give the same config.
    fv = flags.FlagValues()
    train_argv = [argv[0]] + [a for a in argv[4:] if not a.startswith('--workdir')]
    config_flags.DEFINE_config_file('config', None, 'experiment', flag_values=fv, lock_config=True,
                                    sys_argv=train_argv)
    fv(train_argv)
    assert (fv.config.peft.lora.rank, fv.config.optim.learning_rate, fv.config.peft.lora.rslora) == (4, 3e-4, True)
    assert fv.config.train.steps == 3  # the :arg reached get_config
    assert not any(os.path.exists(os.path.join(workdir, n, 'config.json')) for n in os.listdir(workdir))
    rows = report.collect(workdir)  # sweep.json lists the planned runs
    assert [r['status'] for r in rows] == ['pending'] * 8 and rows[3]['peft.lora.rslora'] is True


def test_list_grids_print_sweep_commands(experiment, tmp_path, capsys, no_validate):
    workdir = str(tmp_path / 'sweep')
    grid = "--grid=peft.lora.targets=['q_proj$'],['q_proj$','v_proj$']"
    sweep_cli.main([f'--config={experiment}', grid, f'--workdir={workdir}', '--print_commands'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[:4] == ['python', '-m', 'ftjax', 'sweep'] and grid in argv
    assert argv[-1] == '--only=targets-q_proj-v_proj'
    with pytest.raises(ValueError, match='no run named'):
        sweep_cli.main([f'--config={experiment}', grid, f'--workdir={workdir}', '--only=nope'])


def test_errors_before_anything_runs(experiment, tmp_path, monkeypatch):
    workdir = str(tmp_path / 'sweep')
    with pytest.raises(KeyError, match='peft.lora.rnak'):
        sweep_cli.main([f'--config={experiment}', '--grid=peft.lora.rank=4,8', '--grid=peft.lora.rnak=1',
                    f'--workdir={workdir}'])

    def validate(config):
        if config.peft.lora.rank > 4:
            raise ValueError('config.peft.lora.rank is too large')
        return config
    monkeypatch.setattr('ftjax.config.validate', validate)
    with pytest.raises(ValueError, match='sweep run rank8: config.peft.lora.rank is too large'):
        sweep_cli.main([f'--config={experiment}', '--grid=peft.lora.rank=4,8', f'--workdir={workdir}'])
    assert not os.path.exists(workdir)


def test_refuses_a_sub_workdir_with_other_values(experiment, tmp_path):
    runs = sweep.plan(experiment, ['peft.lora.rank=4,8'], str(tmp_path))
    stored = workdir_lib.config_dict(runs[0].config)
    _fake_run(runs[0].workdir, stored, [1.0])
    sweep.check_existing(runs)  # the same config: fine (it resumes or is skipped)
    _fake_run(runs[0].workdir, dict(stored, train=dict(stored['train'], steps=50)), [1.0])
    sweep.check_existing(runs)  # a run of other length continues (train.steps is resumable): fine
    _fake_run(runs[1].workdir, {'peft': {'lora': {'rank': 16}}}, [1.0])
    with pytest.raises(ValueError, match='rank8 holds a run with peft.lora.rank=16'):
        sweep.check_existing(runs)
    # The experiment file changed since a run finished (no grid key differs): refused, not skipped as done.
    _fake_run(runs[1].workdir, workdir_lib.config_dict(runs[1].config), [1.0])
    sweep.check_existing(runs)
    _fake_run(runs[0].workdir, dict(stored, optim=dict(stored['optim'], learning_rate=1e-3)), [1.0])
    with pytest.raises(ConfigError, match=r'rank4 holds a run whose config differs from this sweep.s in '
                                          r'optim.learning_rate 0.001 -> 0.0001'):
        sweep.check_existing(runs)


# --- running (fake training) ---------------------------------------------------------------------

def test_sequential_skips_finished_runs_and_records_failures(experiment, tmp_path, monkeypatch, capsys, no_validate):
    calls = []

    def train_and_evaluate(config, workdir):
        calls.append(os.path.basename(workdir))
        if config.peft.lora.rank == 8 and config.optim.learning_rate == 3e-4:
            raise FloatingPointError('non-finite loss')
        losses = [2.0 / (config.peft.lora.rank * config.optim.learning_rate * 1e4 * s) for s in range(1, 5)]
        _fake_run(workdir, workdir_lib.config_dict(config), losses, {2: 1.5, 4: 1.7})  # config.json as train writes it
        return {'exit_code': 0}

    monkeypatch.setattr(sweep.loop, 'train_and_evaluate', train_and_evaluate)
    workdir = str(tmp_path / 'sweep')
    args = [f'--config={experiment}', '--grid=peft.lora.rank=4,8', '--grid=optim.learning_rate=1e-4,3e-4',
            f'--workdir={workdir}']
    assert sweep_cli.main(args) == 1  # one run failed
    assert calls == ['rank4_lr0.0001', 'rank4_lr0.0003', 'rank8_lr0.0001', 'rank8_lr0.0003']
    assert 'non-finite loss' in open(os.path.join(workdir, 'rank8_lr0.0003', report.ERROR_FILE)).read()
    calls.clear()
    assert sweep_cli.main(args) == 1
    assert calls == ['rank8_lr0.0003']  # the finished three are not trained again
    with open(os.path.join(workdir, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['status'] for r in rows] == ['finished'] * 3 + ['failed']
    assert [r['peft.lora.rank'] for r in rows] == ['4', '4', '8', '8']
    assert float(rows[0]['best eval/loss']) == 1.5 and float(rows[0]['final eval/loss']) == 1.7
    assert 'rank8_lr0.0001' in capsys.readouterr().out


def test_parallel_runs_subprocesses_n_at_a_time(experiment, tmp_path):
    runs = sweep.plan(experiment, ['peft.lora.rank=2,4,8'], str(tmp_path))
    writer = textwrap.dedent('''
        import json, os, sys
        d = sys.argv[1]
        os.makedirs(d, exist_ok=True)
        json.dump({'train': {'steps': 4}}, open(os.path.join(d, 'config.json'), 'w'))
        json.dump({'step': 4, 'exit_code': 0}, open(os.path.join(d, 'summary.json'), 'w'))
        print('trained', d)
    ''')
    argvs = [[sys.executable, '-c', writer, r.workdir] for r in runs]
    argvs[2] = [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)']
    assert sweep.run_parallel(runs, argvs, 2) == 1
    assert [report.finished(r.workdir, 4) for r in runs] == [True, True, False]
    assert 'trained' in open(os.path.join(runs[0].workdir, 'train.log')).read()
    assert 'boom' in open(os.path.join(runs[2].workdir, report.ERROR_FILE)).read()


# --- report ----------------------------------------------------------------------------------------

def _fake_sweep_dir(root):
    """Four runs without sweep.json: three finished, one still running; lr and rank vary."""
    base = {'model': {'path': 'tiny'}, 'train': {'steps': 4}}
    for i, (rank, lr) in enumerate([(4, 1e-4), (4, 3e-4), (8, 1e-4), (8, 3e-4)]):
        config = dict(base, peft={'lora': {'rank': rank}}, optim={'learning_rate': lr})
        losses = [3.0 - 0.2 * s - 0.1 * i for s in range(4)]
        _fake_run(os.path.join(root, f'r{i}'), config, losses if i < 3 else losses[:2],
                  {2: 0.75 + i / 8, 4: 0.5 + i / 8} if i < 3 else {2: 0.5}, key='eval/accuracy', summary=i < 3)


def test_collect_report_best_and_final(tmp_path):
    _fake_sweep_dir(str(tmp_path))
    rows = report.collect(str(tmp_path))
    assert [r['run'] for r in rows] == ['r0', 'r1', 'r2', 'r3']
    assert [r['status'] for r in rows] == ['finished'] * 3 + ['incomplete']
    assert [(r['optim.learning_rate'], r['peft.lora.rank']) for r in rows] == [
        (1e-4, 4), (3e-4, 4), (1e-4, 8), (3e-4, 8)]
    assert 'model.path' not in rows[0]  # the same in every run: not a column
    assert rows[1]['best eval/accuracy'] == 0.875 and rows[1]['final eval/accuracy'] == 0.625  # accuracy: max
    assert rows[3]['step'] == 2 and rows[3]['trainable params'] is None
    assert rows[0]['trainable params'] == 1234 and rows[0]['tokens/s'] == 512.5
    assert report.best_metrics([{'eval/loss': 2.0}, {'eval/loss': 1.0}, {'eval/loss': 1.5}]) == {'best eval/loss': 1.0}
    single = report.collect(os.path.join(str(tmp_path), 'r0'))
    assert len(single) == 1 and single[0]['run'] == 'r0' and 'peft.lora.rank' not in single[0]


def test_write_table_and_plot(tmp_path):
    _fake_sweep_dir(str(tmp_path))
    with open(os.path.join(str(tmp_path), 'r3', 'metrics.jsonl'), 'a') as f:
        f.write('{"step": 3, "lo')  # a run killed while writing a line
    rows = report.collect(str(tmp_path))
    csv_path, md_path = report.write_table(rows, str(tmp_path))
    with open(csv_path) as f:
        back = list(csv.DictReader(f))
    assert len(back) == 4 and back[2]['run'] == 'r2' and float(back[2]['final eval/accuracy']) == 0.75
    assert list(back[0])[:3] == ['run', 'path', 'optim.learning_rate']
    md = open(md_path).read().splitlines()
    assert len(md) == 6 and md[0].startswith('| run | optim.learning_rate | peft.lora.rank | status |')
    assert '| r1 | 0.0003 | 4 | finished | 4 |' in md[3] and '| 1,234 |' in md[3]
    import matplotlib.image
    narrow = matplotlib.image.imread(report.plot_loss_curves(rows, str(tmp_path / 'a.png')))
    colored = (narrow[..., :3].max(-1) - narrow[..., :3].min(-1)) > 0.3  # curves; axes and text are gray
    assert colored.sum() > 500
    _fake_run(str(tmp_path / 'r4'), {'train': {'steps': 2}}, [2.0, 1.0], {1: 2.5, 2: 2.0})  # logs eval/loss
    wide = matplotlib.image.imread(report.plot_loss_curves(report.collect(str(tmp_path)), str(tmp_path / 'b.png')))
    assert wide.shape[1] > 1.5 * narrow.shape[1]  # a second panel: eval loss


def test_report_main_and_errors(tmp_path, capsys):
    _fake_sweep_dir(str(tmp_path))
    assert report_cli.main([f'--workdir={tmp_path}', '--write']) == 0
    out = capsys.readouterr().out
    assert out.count('\n') == 6 and '| r3 |' in out and 'incomplete' in out
    assert all(os.path.exists(os.path.join(str(tmp_path), n)) for n in ('results.csv', 'results.md', 'loss_curves.png'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='holds no run'):
        report.collect(str(empty))


# --- seeds, the experiment's argument as a grid key, grouped reports ------------------------------------

VARIANTS = SCHEMA.replace("def get_config(arg=None):", """def get_config(arg=None):
    method, *flags = (arg or 'lora').split(',')
    if method not in ('lora', 'full'):
        raise ValueError(f'unknown variant {method!r}')""").replace(
    "c.optim = ml_collections.ConfigDict({'learning_rate': 1e-4, 'name': 'adamw'})",
    "c.optim = ml_collections.ConfigDict({'learning_rate': 5e-4 if method == 'lora' else 5e-5, 'name': 'adamw'})"
    "\n    c.peft.method = method\n    c.model.path = 'short' if 'short' in flags else 'tiny'")


def test_seeds_and_arg_grid_plan_runs_and_commands(tmp_path):
    exp = tmp_path / 'variants.py'
    exp.write_text(VARIANTS)
    runs = sweep.plan(f'{exp}:short', ['arg=lora,full'], str(tmp_path / 'w'), seeds=3)
    assert [r.name for r in runs] == [f'{m}_seed{s}' for m in ('lora', 'full') for s in range(3)]
    assert [(r.config.peft.method, r.config.optim.learning_rate, r.config.train.seed) for r in runs[2:4]] == [
        ('lora', 5e-4, 2), ('full', 5e-5, 0)]
    assert all(r.config.model.path == 'short' for r in runs)  # the --config's own argument kept: 'full,short'
    argv = sweep.commands(runs, f'{exp}:short', ['arg=lora,full'], str(tmp_path / 'w'), seeds=3)[3]
    assert argv[4:6] == [f'--config={exp}:full,short', f'--workdir={tmp_path}/w/full_seed0']
    assert argv[6:] == ['--config.train.seed=0']
    sweep.write_sweep_file(str(tmp_path / 'w'), f'{exp}:short', ['arg=lora,full'], runs, seeds=3)
    grid = json.load(open(tmp_path / 'w' / 'sweep.json'))['grid']
    assert grid == [['arg', ['lora', 'full']], ['train.seed', ['0', '1', '2']]]
    with pytest.raises(ConfigError, match='give the seeds one way'):
        sweep.plan(str(exp), ['train.seed=0,1'], str(tmp_path / 'w'), seeds=2)
    with pytest.raises(ValueError, match="unknown variant 'dora'"):
        sweep.plan(str(exp), ['arg=lora,dora'], str(tmp_path / 'w'))
    only_seeds = sweep.plan(str(exp), [], str(tmp_path / 'v'), seeds=2)
    assert [r.name for r in only_seeds] == ['seed0', 'seed1']


def _seed_sweep(root, accuracies, examples=872):
    """A finished sweep over arg x train.seed: {arg: [final eval/accuracy per seed]}."""
    runs = []
    for arg, accs in accuracies.items():
        for seed, acc in enumerate(accs):
            name = f'{arg}_seed{seed}'
            _fake_run(os.path.join(root, name), {'train': {'steps': 2, 'seed': seed}}, [1.0, 0.5 + 0.1 * seed],
                      {1: acc - 0.05, 2: acc}, key='eval/accuracy')
            with open(os.path.join(root, name, 'summary.json')) as f:
                summary = json.load(f)
            summary['eval/examples'] = examples
            with open(os.path.join(root, name, 'summary.json'), 'w') as f:
                json.dump(summary, f)
            runs.append({'name': name, 'values': {'arg': arg, 'train.seed': seed}})
    with open(os.path.join(root, report.SWEEP_FILE), 'w') as f:
        json.dump({'config': 'x.py', 'overrides': [], 'grid': [['arg', list(accuracies)],
                                                               ['train.seed', ['0', '1', '2']]], 'runs': runs}, f)


def test_grouped_report_by_configuration_with_a_baseline(tmp_path, capsys):
    root = str(tmp_path)
    _seed_sweep(root, {'full': [0.80, 0.81, 0.82], 'lora': [0.80, 0.83, 0.81], 'bitfit': [0.70, 0.71, 0.72]})
    rows = report.collect(root)
    assert report.has_seeds(rows) and report.default_metric(rows) == 'final eval/accuracy'
    metric, groups = report.grouped(rows, baseline='arg=full')
    by = {g['values']['arg']: g for g in groups}
    assert metric == 'final eval/accuracy' and set(by) == {'full', 'lora', 'bitfit'}
    assert by['lora']['summary'].n == 3 and by['lora']['summary'].mean == pytest.approx(0.8133333333)
    assert (by['lora']['summary'].lo, by['lora']['summary'].hi) == pytest.approx((0.80, 0.83))  # 3 seeds: min, max
    assert by['full']['is_baseline'] and by['full']['diff'] is None
    assert by['lora']['differs'] is False and by['lora']['diff'][1] < 0 < by['lora']['diff'][2]
    assert by['bitfit']['differs'] is True and by['bitfit']['diff'][0] == pytest.approx(-0.1)
    # paired by seed: lora - full per seed 0.00, +0.02, -0.01 (3 pairs: [min, max]); bitfit -0.10 every seed
    assert by['lora']['paired'] == pytest.approx((0.01 / 3, -0.01, 0.02)) and by['lora']['paired_differs'] is False
    assert by['bitfit']['paired'] == pytest.approx((-0.1, -0.1, -0.1)) and by['bitfit']['paired_differs'] is True
    assert by['full']['paired'] is None
    assert report_cli.main([f'--workdir={root}', '--write', '--baseline=arg=full']) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith('| bitfit |'))
    assert '| 3 | 0.7100 |' in line and '[0.7000, 0.7200] | seeds | [0.69' in line and line.endswith(' * |')
    assert next(x for x in out.splitlines() if x.startswith('| full |')).endswith('| baseline |')
    with open(os.path.join(root, 'results_by_config.csv')) as f:
        back = {r['arg']: r for r in csv.DictReader(f)}
    assert back['bitfit']['differs'] == 'True' and back['lora']['runs'] == 'lora_seed0 lora_seed1 lora_seed2'
    assert back['bitfit']['paired_differs'] == 'True' and float(back['lora']['paired_hi']) == pytest.approx(0.02)
    assert 'paired by seed' in out
    assert os.path.getsize(os.path.join(root, 'seed_curves.png')) > 10_000
    with pytest.raises(ConfigError, match='--baseline=rank=8: expected KEY=VALUE'):
        report.grouped(rows, baseline='rank=8')
    with pytest.raises(ConfigError, match="no finished run has it"):
        report.grouped(rows, metric='final eval/f1')


def test_a_single_run_gets_an_interval_over_its_examples(tmp_path):
    root = str(tmp_path)
    _seed_sweep(root, {'full': [0.80], 'lora': [0.81]})
    metric, groups = report.grouped(report.collect(root), baseline='arg=full')
    lora = next(g for g in groups if g['values']['arg'] == 'lora')
    assert lora['summary'].over == 'examples' and lora['summary'].lo < 0.79 and lora['summary'].hi > 0.83
    assert lora['differs'] is False  # one point on 872 examples is inside the noise
    assert lora['paired'] is None  # one seed: nothing to pair over


def test_runs_are_paired_by_their_seed_and_only_over_the_same_seeds(tmp_path):
    """Pairs are matched by train.seed, not by position; a configuration that lacks one of the baseline's seeds
    gets no paired difference (the unpaired one still)."""
    root = str(tmp_path)
    _seed_sweep(root, {'full': [0.70, 0.80, 0.90], 'lora': [0.68, 0.78, 0.88]})
    rows = report.collect(root)
    rows.reverse()  # the order runs are read in does not pair them
    _, groups = report.grouped(rows, baseline='arg=full')
    lora = next(g for g in groups if g['values']['arg'] == 'lora')
    assert lora['paired'] == pytest.approx((-0.02, -0.02, -0.02)) and lora['paired_differs'] is True
    assert lora['differs'] is False  # unpaired: the seeds' own 10-point steps hide the gap
    shutil.rmtree(os.path.join(root, 'lora_seed2'))
    _, groups = report.grouped(report.collect(root), baseline='arg=full')
    lora = next(g for g in groups if g['values']['arg'] == 'lora')
    assert lora['paired'] is None and lora['diff'] is not None


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_sweep_2x2(tmp_path, monkeypatch, capsys):
    from ftjax import synthetic
    model = tiny.make_llama_checkpoint(str(tmp_path / 'llama'))
    paths = synthetic.write_task(str(tmp_path / 'data'), n_train=16, n_eval=4, seed=0)
    # 8 fake CPU devices: a batch of 2 over data, the rest over tensor
    exp = tiny.write_experiment(tmp_path / 'smoke_exp.py', model, paths, **{
        'train.steps': 2, 'train.batch_size': 2, 'train.eval_every': 2, 'train.checkpoint_every': 2,
        'mesh.data': 2, 'mesh.tensor': -1})
    workdir = str(tmp_path / 'sweep')
    args = [f'--config={exp}', '--grid=peft.lora.rank=2,4', '--grid=optim.learning_rate=1e-3,3e-3',
            f'--workdir={workdir}']
    assert sweep_cli.main(args) == 0
    for name in ('results.csv', 'results.md', 'loss_curves.png'):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == ['rank2_lr0.001', 'rank2_lr0.003', 'rank4_lr0.001', 'rank4_lr0.003']
    assert all(r['status'] == 'finished' and r['step'] == '2' for r in rows)
    assert all(float(r['final eval/loss']) > 0 and float(r['tokens/s']) >= 0 for r in rows)
    # The overrides reached training: rank 4 trains twice the LoRA parameters of rank 2.
    assert int(rows[2]['trainable params']) == 2 * int(rows[0]['trainable params'])
    lr = json.load(open(os.path.join(workdir, 'rank2_lr0.003', 'config.json')))['optim']['learning_rate']
    assert lr == 3e-3
    md = open(os.path.join(workdir, 'results.md')).read().splitlines()
    assert len(md) == 6 and 'peft.lora.rank' in md[0] and 'optim.learning_rate' in md[0]

    # Rerunning the command trains nothing: every run is finished.
    import ftjax.loop
    monkeypatch.setattr(ftjax.loop, 'train_and_evaluate', lambda *a: pytest.fail('a finished run was trained again'))
    capsys.readouterr()
    assert sweep_cli.main(args) == 0
    assert capsys.readouterr().out.count('finished earlier, skipped') == 4
    assert report_cli.main([f'--workdir={workdir}']) == 0
    assert capsys.readouterr().out.count('| finished |') == 4


def test_sigterm_during_a_failing_run_stops_the_sequential_sweep(experiment, tmp_path, monkeypatch, no_validate):
    """A SIGTERM that lands while a run fails (or between runs) is not lost with that run: no later run starts."""
    calls = []
    monkeypatch.setattr(checkpoint, '_TERMINATING', [])
    previous = signal.getsignal(signal.SIGTERM)

    def train_and_evaluate(config, workdir):
        calls.append(os.path.basename(workdir))
        checkpoint.Preemption(None)  # the run's handler, as loop.setup installs it
        os.kill(os.getpid(), signal.SIGTERM)
        raise OSError('its files went away')  # the run then fails before a step boundary

    monkeypatch.setattr(sweep.loop, 'train_and_evaluate', train_and_evaluate)
    try:
        rc = sweep_cli.main([f'--config={experiment}', '--grid=peft.lora.rank=4,8', f'--workdir={tmp_path / "s"}'])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == EXIT_PREEMPTED and calls == ['rank4']
