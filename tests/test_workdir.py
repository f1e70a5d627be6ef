"""`ftjax.workdir.RunDir`: a run's directory, its files and config.json laid over today's defaults; a workdir
belongs to one run, checkpoint recovery never loses the good step, and the data is checked before the model
loads (issue 13).

Each failure a hostile user found is a test here (the exact case), with more of the same kind: a misused
workdir (another run's data or model, a file, a finished run, a failed run), partial checkpoints (a file
or a commit marker missing, resume_step at a broken step) and labels outside the label set. Each asserts
the exit code or error class, the one-line message naming the culprit, and that nothing the user had
(config.json, summary.json, checkpoints) was changed: `snapshot` compares sizes, mtimes and hashes.

Fast tests use a fake used workdir (a config.json and a step directory): the guard refuses it before any
loading. The checkpoint tests copy one real 4-step run (`finished_run`, ~40 s on 2 CPU cores): slow.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from ftjax import checkpoint, loop, synthetic
from ftjax import workdir as workdir_lib
from ftjax.errors import EXIT_BAD_INPUT, CheckpointError, ConfigError, DataError, MissingFileError, WorkdirError
from tests import tiny
from tests.tiny import REPO

ENV = tiny.subprocess_env()
RUN = {'train.steps': 4, 'train.checkpoint_every': 2, 'train.eval_every': 4}


class Reached(Exception):
    """Raised in place of loading the model: the run got past every check before it."""


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model raises Reached: an error raised instead came before the model load."""
    def refuse(*args, **kwargs):
        raise Reached('the model would load now')
    monkeypatch.setattr(loop, 'build_model_and_mask', refuse)


def snapshot(path):
    """{relative path: (size, mtime_ns, sha256)} of every file under `path` ({} when it does not exist)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, 'rb') as fh:
                out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def one_line(error):
    text = str(error.value if hasattr(error, 'value') else error)
    assert '\n' not in text.strip(), text
    return text


def config(model_dir, data, **over):
    return tiny.tiny_config(model_dir, data, **dict(RUN, **over))


def fake_used_workdir(path, cfg, step=2):
    """A workdir as a run of `cfg` leaves it (config.json, a complete-looking step): enough for the guard."""
    os.makedirs(os.path.join(path, 'checkpoints', str(step)))
    open(os.path.join(path, 'checkpoints', str(step), checkpoint.COMMIT_MARKER), 'w').close()
    with open(os.path.join(path, 'config.json'), 'w') as f:
        f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return str(path)


@pytest.fixture(scope='module')
def other_data(tmp_path_factory):
    """Another experiment's chat data (other rows)."""
    return synthetic.write_task(str(tmp_path_factory.mktemp('other')), n_train=48, n_eval=8, seed=1)


def run_train(exp, workdir, *extra):
    return subprocess.run([sys.executable, '-m', 'ftjax.train', f'--config={exp}', f'--workdir={workdir}', *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def error_line(proc):
    """The one `ftjax: error:` line of a failed command (and nothing else on stderr after it)."""
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('ftjax: error: '), proc.stderr[-3000:]
    assert sum(line.startswith('ftjax: error') for line in lines) == 1
    return lines[-1]


# --- RunDir: the files of a run's directory (fast) ---------------------------------------------------------

def test_run_dir_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = workdir_lib.RunDir('runs/a')
    assert run.checkpoints == str(tmp_path / 'runs' / 'a' / 'checkpoints')  # absolute, as orbax wants it
    assert run.aside == str(tmp_path / 'runs' / 'a' / 'checkpoints_aside')
    assert str(run.config_file) == 'runs/a/config.json' and str(run.summary_file) == 'runs/a/summary.json'
    assert workdir_lib.RunDir('gs://bucket/run').checkpoints == 'gs://bucket/run/checkpoints'  # not made absolute
    assert not run.is_run() and not run.has_checkpoints()
    os.makedirs('runs/a/checkpoints')
    assert not run.is_run()  # checkpoints/ without config.json: not a run (e.g. a PEFT adapter directory)
    run.config_file.write_text('{}')
    assert run.is_run() and not run.has_checkpoints()
    os.makedirs('runs/a/checkpoints_aside/2.broken.20260101-000000')
    assert run.has_checkpoints()  # a step set aside still marks the directory as used


def test_config_json_is_read_over_todays_defaults(tmp_path, tiny_llama_dir, chat_data):
    """A run stored before a key existed reads that key's default; a key ftjax no longer has is dropped."""
    from ftjax.config import default_config, validate
    cfg = config(tiny_llama_dir, chat_data, **{'peft.lora.rank': 4, 'optim.learning_rate': 3e-3})
    stored = workdir_lib.config_dict(cfg)
    del stored['model']['quantize'], stored['model']['quantize_double'], stored['train']['allow_config_change']
    del stored['align']  # a whole group added since
    stored['train']['a_key_since_removed'] = 7
    os.makedirs(tmp_path / 'run')
    (tmp_path / 'run' / 'config.json').write_text(json.dumps(stored))
    got = workdir_lib.RunDir(str(tmp_path / 'run')).config()
    validate(got)  # complete: every schema key, nothing unknown
    defaults = default_config()
    assert got.model.quantize == defaults.model.quantize == 'none'
    assert got.model.quantize_double is False and got.train.allow_config_change is False
    assert got.align.to_dict() == defaults.align.to_dict()
    assert 'a_key_since_removed' not in got.train
    assert (got.peft.lora.rank, got.optim.learning_rate, got.model.path) == (4, 3e-3, tiny_llama_dir)
    assert got.data.path == chat_data['train'] and workdir_lib.config_dict(got)['mesh'] == stored['mesh']


def test_config_json_missing_or_torn(tmp_path):
    run = workdir_lib.RunDir(str(tmp_path / 'run'))
    with pytest.raises(MissingFileError, match='no config.json'):
        run.config()
    os.makedirs(run.path)
    run.config_file.write_text('{"model": {"path": ')  # a torn write
    with pytest.raises(WorkdirError) as e:
        run.config()
    assert 'config.json' in one_line(e)


def test_metrics_and_summary(tmp_path):
    run = workdir_lib.RunDir(str(tmp_path))
    assert run.metrics() == [] and run.summary() is None and run.harness_summary() == {}
    run.metrics_file.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    assert run.metrics() == [{'step': 1, 'loss': 2.0}]
    assert run.write_summary({'step': 4, 'loss': 1.5, 'exit_code': 0})
    assert not run.write_summary({'step': 2, 'loss': 1.0, 'exit_code': 0})  # an earlier step: never replaces it
    assert not run.write_summary({'step': 4, 'loss': None, 'exit_code': 0})  # the same step without a loss
    assert run.summary() == {'step': 4, 'loss': 1.5, 'exit_code': 0}
    assert run.write_summary({'step': 6, 'loss': 1.2, 'exit_code': 0}) and run.summary()['step'] == 6
    run.harness_file.write_text(json.dumps({'summary': {'arc_easy/acc': 0.5}, 'results': {}}))
    assert run.harness_summary() == {'arc_easy/acc': 0.5}


# --- a workdir belongs to one run (fast: refused before anything loads) ---------------------------------

def test_other_data_on_the_same_model_is_refused(tmp_path, tiny_llama_dir, chat_data, other_data, no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    before = snapshot(wd)
    with pytest.raises(WorkdirError) as e:
        loop.train_and_evaluate(config(tiny_llama_dir, other_data), wd)
    msg = one_line(e)
    assert 'data.path' in msg and 'data.eval_path' in msg and chat_data['train'] in msg and other_data['train'] in msg
    assert '--config.train.allow_config_change=true' in msg and 'model.path' not in msg
    assert snapshot(wd) == before


def test_other_model_is_refused_before_config_json_changes(tmp_path, tiny_llama_dir, tiny_bert_dir, chat_data,
                                                           no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    before = snapshot(wd)
    with pytest.raises(WorkdirError) as e:
        loop.train_and_evaluate(config(tiny_bert_dir, chat_data), wd)
    msg = one_line(e)
    assert f'model.path {tiny_llama_dir!r} -> {tiny_bert_dir!r}' in msg
    assert snapshot(wd) == before  # config.json still names the model the checkpoints were trained on


def test_several_changes_are_listed_a_few_at_a_time(tmp_path, tiny_llama_dir, chat_data, no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    changed = {'optim.learning_rate': 3e-4, 'peft.lora.rank': 4, 'train.seed': 7, 'data.max_length': 128,
               'train.batch_size': 8, 'optim.name': 'sgd'}
    with pytest.raises(WorkdirError) as e:
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **changed), wd)
    msg = one_line(e)
    assert 'data.max_length 192 -> 128' in msg and '(+2 more)' in msg


def test_resumable_keys_may_change(tmp_path, tiny_llama_dir, chat_data, no_model):
    """More steps, other intervals, another mesh, eval settings: the same run, continued (config.json is
    only rewritten once the run is known to fit: not before the model loads)."""
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    before = snapshot(wd)
    with pytest.raises(Reached):
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **{
            'train.steps': 40, 'train.eval_every': 5, 'train.log_every': 7, 'train.checkpoint_every': 10,
            'train.keep_checkpoints': 3, 'mesh.tensor': 1, 'mesh.data': -1, 'eval.generate': 2,
            'train.nan_policy': 'skip', 'data.num_proc': 2}), wd)
    assert snapshot(wd) == before


def test_override_flag_passes_the_guard(tmp_path, tiny_llama_dir, chat_data, other_data, no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    before = snapshot(wd)
    with pytest.raises(Reached):
        loop.train_and_evaluate(config(tiny_llama_dir, other_data, **{'train.allow_config_change': True}), wd)
    assert snapshot(wd) == before


def test_keys_added_to_ftjax_since_the_run_are_no_change(tmp_path, tiny_llama_dir, chat_data):
    """A config.json written before a key existed lacks it: at its default it is not a difference."""
    stored = workdir_lib.config_dict(config(tiny_llama_dir, chat_data))
    del stored['train']['allow_config_change'], stored['peft']['lora']['rslora']
    new = workdir_lib.config_dict(config(tiny_llama_dir, chat_data))
    assert workdir_lib.config_changes(stored, new) == {}
    new['peft']['lora']['rslora'] = True
    assert workdir_lib.config_changes(stored, new) == {'peft.lora.rslora': ('<absent>', True)}


def test_workdir_that_is_a_file(tmp_path, tiny_llama_dir, chat_data, no_model):
    path = tmp_path / 'notes.txt'
    path.write_text('my notes\n')
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError) as e:
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data), str(path))
    assert f'--workdir={path} is a file' in one_line(e)
    with pytest.raises(WorkdirError) as e:  # a workdir under a file cannot be created either
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data), str(path / 'run'))
    assert f'{path} is a file' in one_line(e)
    assert snapshot(tmp_path) == before


def test_resume_false_refuses_a_used_workdir(tmp_path, tiny_llama_dir, chat_data, no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    before = snapshot(wd)
    with pytest.raises(WorkdirError, match='resume=False') as e:
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **{'train.resume': False}), wd)
    one_line(e)
    assert snapshot(wd) == before


def test_used_workdir_without_its_config_is_refused(tmp_path, tiny_llama_dir, chat_data, no_model):
    wd = fake_used_workdir(tmp_path / 'run', config(tiny_llama_dir, chat_data))
    os.remove(os.path.join(wd, 'config.json'))
    with pytest.raises(WorkdirError, match='config.json is missing') as e:
        loop.train_and_evaluate(config(tiny_llama_dir, chat_data), wd)
    one_line(e)
    assert not os.path.exists(os.path.join(wd, 'config.json'))


def test_failed_run_leaves_no_used_workdir(tmp_path, tiny_llama_dir, chat_data):
    """A run that fails before it has a checkpoint leaves no config.json (here: a missing model), and a
    workdir holding only an earlier failed run's config.json is taken as new."""
    wd = str(tmp_path / 'run')
    with pytest.raises(Exception, match='no_such_model'):
        loop.train_and_evaluate(config(str(tmp_path / 'no_such_model'), chat_data), wd)
    assert not os.path.exists(wd)
    # a config.json left by a run that failed later (no checkpoint, no summary) does not bind the workdir
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, 'config.json'), 'w') as f:
        f.write(config(str(tmp_path / 'no_such_model'), chat_data).to_json_best_effort())
    claim = workdir_lib.RunDir(wd).check(config(tiny_llama_dir, chat_data))
    assert claim.stored is None


# --- data before the model (fast) -----------------------------------------------------------------------

def classification_data(tmp_path, bad=None, n=20):
    """`n` rows of sentiment (labels 0/1); `bad` = (row, label) puts a bad label in that row."""
    rows = [{'text': f'a {"great" if i % 2 else "terrible"} movie, number {i}', 'label': i % 2} for i in range(n)]
    if bad:
        rows[bad[0]]['label'] = bad[1]
    return tiny.write_jsonl(str(tmp_path / 'sentiment.jsonl'), rows)


def classification_config(model_dir, path, **over):
    return tiny.tiny_config(model_dir, {'train': path, 'eval': path}, **dict({
        'data.format': 'classification', 'data.eval_path': None, 'data.max_length': 32, 'model.num_labels': 2,
        'train.steps': 2, 'train.eval_every': 2, 'train.checkpoint_every': 2}, **over))


def test_label_outside_the_label_set_fails_before_the_model_loads(tmp_path, tiny_bert_dir, no_model):
    path = classification_data(tmp_path, bad=(13, 5))
    wd = str(tmp_path / 'run')
    with pytest.raises(DataError) as e:
        loop.train_and_evaluate(classification_config(tiny_bert_dir, path), wd)
    msg = one_line(e)
    assert f'{path}: row 13' in msg and '5 is outside the label set' in msg and 'num_labels=2' in msg
    assert not os.path.exists(wd)


@pytest.mark.parametrize('over,bad,words', [
    ({'data.label_names': ['neg', 'pos']}, (7, 'neutral'), ["row 7", "'neutral' is not in data.label_names"]),
    ({}, (3, -1), ['row 3', '-1']),
    ({'data.num_labels': 3}, None, ['data.num_labels=3', 'model.num_labels']),
])
def test_other_label_faults_fail_before_the_model_loads(tmp_path, tiny_bert_dir, no_model, over, bad, words):
    if 'data.label_names' in over:  # string labels
        rows = [{'text': f'movie {i}', 'label': ['neg', 'pos'][i % 2]} for i in range(20)]
        rows[bad[0]]['label'] = bad[1]
        path = tiny.write_jsonl(str(tmp_path / 'named.jsonl'), rows)
    else:
        path = classification_data(tmp_path, bad=bad)
    with pytest.raises((DataError, ConfigError)) as e:
        loop.train_and_evaluate(classification_config(tiny_bert_dir, path, **over), str(tmp_path / 'run'))
    msg = one_line(e)
    assert all(w in msg for w in words), msg
    assert not os.path.exists(tmp_path / 'run')


def test_missing_data_fails_before_the_model_loads(tmp_path, tiny_llama_dir, chat_data, no_model):
    data = dict(chat_data, eval=str(tmp_path / 'dev.jsonl'))
    with pytest.raises(MissingFileError) as e:
        loop.train_and_evaluate(config(tiny_llama_dir, data), str(tmp_path / 'run'))
    assert 'dev.jsonl' in one_line(e)
    assert not os.path.exists(tmp_path / 'run')


def test_build_data_checks_labels_against_the_loaded_classifier(tmp_path):
    """After the model loads, the splits are tokenised against its classifier size too (`build.build_data`):
    a label past it is a bad row, never a NaN loss at the end of an epoch."""
    from ftjax import build
    path = classification_data(tmp_path, bad=(4, 2))
    cfg = classification_config('unused', path)
    cfg_ = types.SimpleNamespace(task='classification', num_labels=2)
    pre = types.SimpleNamespace(config=cfg_, model=types.SimpleNamespace(cfg=cfg_),
                                tokenizer=tiny.make_tokenizer())  # what build_data reads of a loaded encoder
    with pytest.raises(DataError) as e:
        build.build_data(cfg, pre)
    assert f'{path}: row 4' in one_line(e) and 'outside the label set' in str(e.value)
    cfg = classification_config('unused', path, **{'data.on_bad_row': 'skip', 'data.max_bad_fraction': 0.1})
    train, _ = build.build_data(cfg, pre)
    assert train.num_examples == 19 and set(train.labels.tolist()) == {0, 1}


# --- the command line: the exact cases, exit codes, one line ---------------------------------------------

@pytest.mark.slow  # subprocesses
def test_command_line_bad_label_and_file_workdir(tmp_path, tiny_bert_dir):
    """The hostile cases through `python -m ftjax.train`: exit 2 and one line, before the model loads."""
    path = classification_data(tmp_path, bad=(13, 5))
    exp = tiny.write_experiment(tmp_path / 'exp.py', tiny_bert_dir, {'train': path, 'eval': path}, **{
        'data.format': 'classification', 'data.eval_path': None, 'data.max_length': 32, 'model.num_labels': 2,
        'train.steps': 2})
    wd = tmp_path / 'run'
    bad = run_train(exp, wd)
    assert bad.returncode == EXIT_BAD_INPUT, bad.stderr[-3000:]
    line = error_line(bad)
    assert f'{path}: row 13' in line and '5 is outside the label set' in line
    assert 'fine-tuning of' not in bad.stdout and not wd.exists()  # the model never loaded
    wd.write_text('a file\n')
    as_file = run_train(exp, wd)
    assert as_file.returncode == EXIT_BAD_INPUT
    assert error_line(as_file) == (f'ftjax: error: --workdir={wd} is a file, not a directory; pass a directory '
                                   f'(a new path for a new run).')
    assert wd.read_text() == 'a file\n'


# --- real runs: finished runs, partial checkpoints (slow: one 4-step run, copied) --------------------------

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, tiny_llama_dir, chat_data):
    """A finished 4-step run: checkpoints 2 and 4, summary.json."""
    wd = str(tmp_path_factory.mktemp('finished') / 'run')
    out = loop.train_and_evaluate(config(tiny_llama_dir, chat_data), wd)
    assert out['step'] == 4 and sorted(checkpoint.step_status(wd)) == [2, 4]
    return wd


def copy_run(finished_run, tmp_path, summary=True):
    wd = str(tmp_path / 'run')
    shutil.copytree(finished_run, wd)
    if not summary:  # a run killed after its last save
        os.remove(os.path.join(wd, 'summary.json'))
    return wd


def steps_in(wd, sub='checkpoints'):
    d = os.path.join(wd, sub)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.slow
def test_run_stored_before_new_keys_restores(tmp_path, finished_run):
    """The fine-tuned model of a run whose config.json predates model.quantize (and the align group) loads: the
    missing keys read their defaults (`RunDir.config`), as `generate --workdir` and `export` read it."""
    from ftjax import build
    wd = copy_run(finished_run, tmp_path)
    stored = json.load(open(os.path.join(wd, 'config.json')))
    del stored['model']['quantize'], stored['model']['quantize_double'], stored['align']
    with open(os.path.join(wd, 'config.json'), 'w') as f:
        json.dump(stored, f)
    pre = build.restore_for_export(wd)
    assert pre.method == 'lora' and pre.config.lora is not None


@pytest.mark.slow
def test_command_line_other_data_and_finished_rerun(tmp_path, finished_run, tiny_llama_dir, chat_data, other_data):
    wd = copy_run(finished_run, tmp_path)
    before = snapshot(wd)
    other = tiny.write_experiment(tmp_path / 'other.py', tiny_llama_dir, other_data, **RUN)
    refused = run_train(other, wd)
    assert refused.returncode == EXIT_BAD_INPUT, refused.stderr[-3000:]
    line = error_line(refused)
    assert 'holds another run' in line and f"data.path {chat_data['train']!r} -> {other_data['train']!r}" in line
    assert '--config.train.allow_config_change=true' in line
    assert snapshot(wd) == before
    same = tiny.write_experiment(tmp_path / 'same.py', tiny_llama_dir, chat_data, **RUN)
    again = run_train(same, wd)  # README: "resume: run the same command again"
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'ftjax: {wd} is finished: step 4 of 4' in again.stdout
    assert 'fine-tuning of' not in again.stdout
    assert snapshot(wd) == before  # summary.json (and everything else) untouched


@pytest.mark.slow
def test_finished_run_is_not_retrained_or_rewritten(tmp_path, finished_run, tiny_llama_dir, chat_data, monkeypatch,
                                                    capsys):
    wd = copy_run(finished_run, tmp_path)
    before = snapshot(wd)
    summary = json.load(open(os.path.join(wd, 'summary.json')))
    with monkeypatch.context() as m:
        m.setattr(loop, 'build_model_and_mask', lambda *a, **k: pytest.fail('loaded the model'))
        for over in ({}, {'train.steps': 3}, {'train.eval_every': 1}):  # lower steps: still finished
            out = loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **over), wd)
            assert out == summary
    assert 'is finished: step 4 of 4' in capsys.readouterr().out
    assert snapshot(wd) == before
    # Raising train.steps continues it (stopped at once here: it resumes from step 4, nothing trains).
    out = loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **{'train.steps': 8}), wd, stop_at=4)
    assert out['step'] == 4 and out['exit_code'] == 0
    assert json.load(open(os.path.join(wd, 'config.json')))['train']['steps'] == 8
    assert json.load(open(os.path.join(wd, 'summary.json'))) == summary  # never replaced by less
    assert steps_in(wd) == ['2', '4'] and not os.path.exists(os.path.join(wd, 'checkpoints_aside'))


@pytest.mark.slow
def test_allowed_config_change_keeps_the_old_config(tmp_path, finished_run, tiny_llama_dir, chat_data):
    wd = copy_run(finished_run, tmp_path, summary=False)
    old = open(os.path.join(wd, 'config.json')).read()
    cfg = config(tiny_llama_dir, chat_data, **{'optim.learning_rate': 3e-3, 'train.allow_config_change': True})
    out = loop.train_and_evaluate(cfg, wd)
    assert out['step'] == 4
    assert json.load(open(os.path.join(wd, 'config.json')))['optim']['learning_rate'] == 3e-3
    [kept] = [n for n in os.listdir(wd) if n.startswith('config.') and n != 'config.json']
    assert open(os.path.join(wd, kept)).read() == old


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_nothing_moves(tmp_path, finished_run, chat_data):
    """With the override, a changed model.path gets past the config guard, but the checkpoints' base hash
    does not match: CheckpointError, and config.json and the checkpoints stay as they were."""
    wd = copy_run(finished_run, tmp_path, summary=False)
    before = snapshot(wd)
    other_model = tiny.make_llama_checkpoint(str(tmp_path / 'llama_seed1'), seed=1)
    with pytest.raises(CheckpointError) as e:
        loop.train_and_evaluate(config(other_model, chat_data, **{'train.allow_config_change': True}), wd)
    assert 'base weights' in one_line(e) and '--config.model.path' in str(e.value)
    assert snapshot(wd) == before


def break_step(wd, step, what):
    """Deletes one file of checkpoint `step`: its params manifest (the restore fails) or its commit marker."""
    rel = {'file': os.path.join('params', 'manifest.ocdbt'), 'marker': checkpoint.COMMIT_MARKER}[what]
    os.remove(os.path.join(wd, 'checkpoints', str(step), rel))


@pytest.mark.slow
def test_broken_newest_checkpoint_is_set_aside_and_the_good_one_kept(tmp_path, finished_run, tiny_llama_dir,
                                                                      chat_data, capsys):
    """The hostile case: one file of the newest checkpoint deleted. The run moves that step aside (not
    deleted), resumes from step 2, and the keep-2 retention does not delete step 2 for the broken 4."""
    wd = copy_run(finished_run, tmp_path, summary=False)
    break_step(wd, 4, 'file')
    good, broken = snapshot(os.path.join(wd, 'checkpoints', '2')), snapshot(os.path.join(wd, 'checkpoints', '4'))
    out = loop.train_and_evaluate(config(tiny_llama_dir, chat_data, **{'train.steps': 6}), wd, stop_at=3)
    assert out['step'] == 3
    printed = capsys.readouterr().out
    [note] = [line for line in printed.splitlines() if 'moved checkpoint' in line]
    assert 'step 4 (restore failed' in note and 'resuming from step 2' in note and 'not deleted' in note
    assert steps_in(wd) == ['2', '3']  # the good step survived the save of step 3 (keep_checkpoints=2)
    assert snapshot(os.path.join(wd, 'checkpoints', '2')) == good
    [aside] = steps_in(wd, 'checkpoints_aside')
    assert aside.startswith('4.broken.')
    assert snapshot(os.path.join(wd, 'checkpoints_aside', aside)) == broken  # moved as it was


@pytest.mark.slow
def test_partial_checkpoints(tmp_path, finished_run, tiny_llama_dir, chat_data, capsys):
    """Missing commit markers, resume_step at a broken or absent step, every step broken, resume_step at
    an older good step: resumes (steps=2: nothing trains) or one-line errors that move nothing."""
    def fresh(name):
        d = tmp_path / name
        d.mkdir()
        return copy_run(finished_run, d, summary=False)

    def cfg(**over):
        return config(tiny_llama_dir, chat_data, **dict({'train.steps': 2}, **over))

    # The newest step lacks its commit marker: set aside, resume from 2.
    wd = fresh('marker')
    break_step(wd, 4, 'marker')
    assert loop.train_and_evaluate(cfg(), wd)['step'] == 2
    assert 'step 4 (missing 4/commit_success.txt)' in capsys.readouterr().out
    assert steps_in(wd) == ['2'] and steps_in(wd, 'checkpoints_aside')[0].startswith('4.incomplete.')

    # resume_step at the incomplete step, or at a step that does not exist: one line, nothing moved.
    wd = fresh('resume_step')
    break_step(wd, 4, 'marker')
    before = snapshot(wd)
    for step, what in ((4, 'is incomplete (missing 4/commit_success.txt)'), (3, 'does not exist')):
        with pytest.raises(CheckpointError) as e:
            loop.train_and_evaluate(cfg(**{'train.resume_step': step}), wd)
        msg = one_line(e)
        assert f'--config.train.resume_step={step}' in msg and what in msg and 'complete steps: [2]' in msg
    assert snapshot(wd) == before

    # resume_step at a step whose restore fails: one line, nothing moved, no advice to delete anything.
    wd = fresh('resume_broken')
    break_step(wd, 2, 'file')
    before = snapshot(wd)
    with pytest.raises(CheckpointError) as e:
        loop.train_and_evaluate(cfg(**{'train.resume_step': 2, 'train.steps': 4}), wd)
    msg = one_line(e)
    assert 'checkpoints/2 could not be restored' in msg and 'Complete steps: [2, 4]' in msg and 'delete' not in msg
    assert snapshot(wd) == before

    # Every complete step fails to restore: an error, and nothing is moved or deleted.
    wd = fresh('all_broken')
    break_step(wd, 2, 'file')
    break_step(wd, 4, 'file')
    before = snapshot(wd)
    with pytest.raises(CheckpointError) as e:
        loop.train_and_evaluate(cfg(**{'train.steps': 4}), wd)
    assert 'No complete step restores (steps [2, 4]), so nothing was moved or deleted' in one_line(e)
    assert snapshot(wd) == before

    # Going back on purpose: the newer good step is moved aside (not deleted), so saves cannot collide.
    wd = fresh('back')
    newer = snapshot(os.path.join(wd, 'checkpoints', '4'))
    assert loop.train_and_evaluate(cfg(**{'train.resume_step': 2}), wd)['step'] == 2
    [aside] = steps_in(wd, 'checkpoints_aside')
    assert aside.startswith('4.newer.') and snapshot(os.path.join(wd, 'checkpoints_aside', aside)) == newer
