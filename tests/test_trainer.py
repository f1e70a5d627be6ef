"""The trainer: resume equals uninterrupted, preemption by SIGTERM, checkpoint hygiene, NaN policy."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ftjax import workdir as workdir_lib
from tests.tiny import REPO, losses, make_bert_checkpoint, tiny_config, write_experiment, subprocess_env


def final_trainable(workdir):
    from ftjax.build import restore_for_export
    pre = restore_for_export(workdir)
    return pre.params


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, tiny_llama_dir, chat_data):
    from ftjax.loop import train_and_evaluate
    full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
    train_and_evaluate(tiny_config(tiny_llama_dir, chat_data), full)
    first = train_and_evaluate(tiny_config(tiny_llama_dir, chat_data), parts, stop_at=3)
    assert first['step'] == 3
    second = train_and_evaluate(tiny_config(tiny_llama_dir, chat_data), parts)
    assert second['step'] == 6
    a, b = losses(full), losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit-identical floats
    pa, pb = final_trainable(full), final_trainable(parts)
    import jax
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _write_experiment(path, model_dir, data, steps):
    return write_experiment(path, model_dir, data, **{'train.steps': steps, 'train.checkpoint_every': 100,
                            'train.eval_every': 100, 'mesh.tensor': 1, 'optim.learning_rate': 1e-3})


def _run(exp, workdir, env):
    return subprocess.Popen([sys.executable, '-m', 'ftjax.train', f'--config={exp}', f'--workdir={workdir}'],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(tmp_path, tiny_llama_dir, chat_data):
    from ftjax.errors import EXIT_PREEMPTED
    env = subprocess_env()
    exp = _write_experiment(tmp_path / 'exp.py', tiny_llama_dir, chat_data, steps=400)
    ref_dir, pre_dir = str(tmp_path / 'ref'), str(tmp_path / 'pre')
    proc = _run(exp, pre_dir, env)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(pre_dir)) < 5:
        time.sleep(0.2)
    assert len(losses(pre_dir)) >= 5, 'the run did not start training in time'
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    assert 'preempted' in out
    stopped = max(losses(pre_dir))
    assert stopped < 400
    resumed = _run(exp, pre_dir, env)
    out2, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out2
    reference = _run(exp, ref_dir, env)
    out3, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out3
    a, b = losses(ref_dir), losses(pre_dir)
    assert sorted(b) == list(range(1, 401))
    assert all(a[s] == b[s] for s in range(1, 401))
    import jax
    for x, y in zip(jax.tree.leaves(final_trainable(ref_dir)), jax.tree.leaves(final_trainable(pre_dir))):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_half_written_checkpoint_is_ignored_and_corrupt_one_reported(tmp_path, tiny_llama_dir, chat_data):
    from ftjax.loop import train_and_evaluate
    wd = str(tmp_path / 'run')
    train_and_evaluate(tiny_config(tiny_llama_dir, chat_data), wd, stop_at=3)
    ckpts = os.path.join(wd, 'checkpoints')
    # a save killed half-way: orbax's temporary directory for step 6, never committed
    shutil.copytree(os.path.join(ckpts, '3'), os.path.join(ckpts, '6.orbax-checkpoint-tmp-1234'))
    out = train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **{'train.steps': 9}), wd)
    assert out['step'] == 9
    assert not any('tmp' in n for n in os.listdir(ckpts))  # cleaned
    assert sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())[-1] == 9
    # corrupt the latest checkpoint: it is moved aside (not deleted) and the run resumes from step 6
    for root, _, files in os.walk(os.path.join(ckpts, '9', 'params')):
        for f in files:
            if not f.startswith('_'):
                open(os.path.join(root, f), 'wb').close()
    out = train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **{'train.steps': 12}), wd)
    assert out['step'] == 12
    [aside] = os.listdir(os.path.join(wd, 'checkpoints_aside'))  # tests/test_workdir.py: the details
    assert aside.startswith('9.broken.')


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_lora_checkpoint_is_small(tmp_path, tiny_llama_dir, chat_data):
    from ftjax.loop import train_and_evaluate
    sizes = {}
    for method in ('full', 'lora'):
        wd = str(tmp_path / method)
        train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **{'peft.method': method, 'train.steps': 1,
                                                                     'peft.lora.rank': 2}), wd)
        sizes[method] = _dir_bytes(os.path.join(wd, 'checkpoints', '1', 'params'))
    print(f"checkpoint params: full {sizes['full']:,} bytes, LoRA r=2 {sizes['lora']:,} bytes "
          f"({sizes['lora'] / sizes['full']:.1%})")
    assert sizes['lora'] < 0.25 * sizes['full']


# halt stays in the fast lane: its one end-to-end run of ftjax.loop (build, data, steps, checkpoints, metrics)
@pytest.mark.parametrize('policy', ['halt', pytest.param('skip', marks=pytest.mark.slow)])
def test_nan_policy(tmp_path, tiny_llama_dir, chat_data, monkeypatch, policy):
    """A batch whose loss mask is NaN at step 5 poisons the loss: halt stops, skip drops the update."""
    from ftjax import data as data_lib
    from ftjax import loop
    real = data_lib.to_global
    calls = {'n': 0}

    def poisoned(batch, sharding):
        calls['n'] += 1
        if calls['n'] == 5 and 'loss_mask' in batch:
            batch = dict(batch, loss_mask=np.full_like(batch['loss_mask'], np.nan))
        return real(batch, sharding)
    monkeypatch.setattr(loop.data_lib, 'to_global', poisoned)
    wd = str(tmp_path / policy)
    cfg = tiny_config(tiny_llama_dir, chat_data, **{'train.nan_policy': policy, 'train.eval_every': 100,
                                                    'train.checkpoint_every': 2})
    if policy == 'halt':
        with pytest.raises(FloatingPointError, match='step 5.*last good checkpoint is step 4'):
            loop.train_and_evaluate(cfg, wd)
    else:
        out = loop.train_and_evaluate(cfg, wd)
        assert out['step'] == 6
        rows = {r['step']: r for r in workdir_lib.RunDir(wd).metrics()}
        assert rows[5]['is_finite'] == 0.0 and np.isfinite(rows[6]['loss'])


def test_config_errors_before_any_work(tmp_path, tiny_llama_dir, chat_data, monkeypatch):
    from ftjax import loop
    monkeypatch.setattr(loop, 'build_model_and_mask', lambda *a, **k: pytest.fail('loaded a model'))
    with pytest.raises(ValueError, match="peft.method='lorra'"):
        loop.train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **{'peft.method': 'lorra'}), str(tmp_path))
    with pytest.raises(ValueError, match='train.batch_size=6 is not divisible by config.optim.grad_accum=4'):
        loop.train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **{'train.batch_size': 6,
                                                                          'optim.grad_accum': 4}), str(tmp_path))


@pytest.mark.slow
def test_cli_rejects_unknown_key_and_used_workdir(tmp_path, tiny_llama_dir, chat_data):
    env = subprocess_env()
    exp = _write_experiment(tmp_path / 'exp.py', tiny_llama_dir, chat_data, steps=1)
    bad = subprocess.run([sys.executable, '-m', 'ftjax.train', f'--config={exp}', f'--workdir={tmp_path}/w',
                          '--config.peft.lora.rnk=4'], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and 'rnk' in bad.stderr
    assert not os.path.exists(tmp_path / 'w' / 'config.json')
    ok = subprocess.run([sys.executable, '-m', 'ftjax.train', f'--config={exp}', f'--workdir={tmp_path}/w'],
                        cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.load(open(tmp_path / 'w' / 'config.json'))['train']['steps'] == 1
    again = subprocess.run([sys.executable, '-m', 'ftjax.train', f'--config={exp}', f'--workdir={tmp_path}/w',
                            '--config.train.resume=false'], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and 'resume=False' in again.stderr


def _sentences(tmp_path):
    """A classification task whose rows run from 2 to 40 characters (the tiny tokenizer: a token each)."""
    rows = [(' '.join(['good'] * (1 + i % 8)) if i % 2 else 'bad ' * (1 + (3 * i) % 9), i % 2) for i in range(24)]
    data = tmp_path / 'sentences'
    data.mkdir()
    for name, part in (('train.tsv', rows), ('dev.tsv', rows[:8])):
        (data / name).write_text('label\tsentence\n' + ''.join(f'{y}\t{s.strip()}\n' for s, y in part))
    return {'data.path': str(data / 'train.tsv'), 'data.eval_path': str(data / 'dev.tsv'),
            'data.format': 'classification', 'data.fields.text': 'sentence', 'data.max_length': 48,
            'model.num_labels': 2, 'model.pooling': 'mean'}


@pytest.mark.slow
@pytest.mark.parametrize('task', ['lm', 'classification'])
def test_batches_cut_to_a_multiple_train_as_full_length_ones(tmp_path, tiny_llama_dir, chat_data, task,
                                                              monkeypatch):
    from ftjax import data as data_lib
    from ftjax.loop import train_and_evaluate
    widths, to_global = [], data_lib.to_global
    monkeypatch.setattr(data_lib, 'to_global', lambda b, sh: widths.append(b['input_ids'].shape[1]) or to_global(b, sh))
    if task == 'lm':  # chat rows of 212 to 250 tokens
        model, over = tiny_llama_dir, {'data.max_length': 320}
    else:  # without dropout: its masks are drawn per shape, so a cut batch would be another (fair) draw
        model = make_bert_checkpoint(str(tmp_path / 'bert'), hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
        over = _sentences(tmp_path)
    over = {**over, 'data.packing': False, 'train.steps': 4, 'train.eval_every': 2, 'train.eval_batches': 0,
            'train.checkpoint_every': 2}
    results = {}
    for multiple in (0, 16):
        widths.clear()
        workdir = str(tmp_path / f'm{multiple}')
        results[multiple] = train_and_evaluate(
            tiny_config(model, chat_data, **over, **{'data.pad_to_multiple_of': multiple}), workdir)
        results[multiple]['losses'] = losses(workdir)
        results[multiple]['widths'] = set(widths)  # of every train and eval batch
    full, cut = results[0], results[16]
    max_length = 320 if task == 'lm' else 48
    assert full['widths'] == {max_length}
    assert all(w % 16 == 0 for w in cut['widths']) and min(cut['widths']) < max_length
    assert sorted(full['losses']) == sorted(cut['losses']) == [1, 2, 3, 4]
    np.testing.assert_allclose([cut['losses'][s] for s in range(1, 5)], [full['losses'][s] for s in range(1, 5)],
                               rtol=2e-5)
    np.testing.assert_allclose(cut['eval/loss'], full['eval/loss'], rtol=2e-5)
    if task == 'classification':
        assert cut['eval/accuracy'] == full['eval/accuracy']
