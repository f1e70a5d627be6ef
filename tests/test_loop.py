"""`ftjax.loop` in its three parts: setup(config, workdir) -> Run, train(run, stop_at), finish(run).

Each part on its own: a run set up and finished without training leaves a new run's workdir; train(run) twice
(stopped, then continued in the same process) equals one uninterrupted run, step for step; a finished run is
neither loaded nor rewritten; and the model is loaded once per run (`build.load_pretrained` counted), with the
base model's and the fine-tuned model's generation evals, the eval split and a run started from another run.
"""
import hashlib
import os

import pytest

from ftjax import build, checkpoint, loop
from ftjax.workdir import RunDir
from tests.tiny import losses, tiny_config

SHORT = {'train.steps': 4, 'train.checkpoint_every': 2, 'train.eval_every': 4}
GENERATE = {'eval.generate': 2, 'eval.max_new_tokens': 4, 'eval.batch_size': 2}


@pytest.fixture
def loads(monkeypatch):
    """The paths `build.load_pretrained` is called with (every weight load of a run goes through it)."""
    calls = []
    real = build.load_pretrained

    def counted(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(build, 'load_pretrained', counted)
    return calls


def snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_setup_then_finish_without_training(tmp_path, tiny_llama_dir, chat_data, loads):
    """Nothing trains, so nothing says it did: no checkpoint, no metrics, no summary; config.json alone keeps
    the workdir a new run's."""
    wd = str(tmp_path / 'run')
    cfg = tiny_config(tiny_llama_dir, chat_data, **SHORT)
    run = loop.setup(cfg, wd)
    assert (run.step, run.done, run.result['exit_code'], loads) == (0, None, 0, [tiny_llama_dir])
    assert run.result['trainable_params'] < run.result['total_params']
    out = loop.finish(run)
    assert (out['exit_code'], out['step'], out['loss']) == (0, 0, None)
    rundir = RunDir(wd)
    assert rundir.config_file.exists() and rundir.summary() is None and rundir.metrics() == []
    assert checkpoint.step_status(wd) == {} and not rundir.has_checkpoints()
    assert rundir.check(cfg).stored is None  # still a new run: it would start at step 0


def test_a_finished_run_is_not_loaded_trained_or_rewritten(tmp_path, tiny_llama_dir, chat_data, loads):
    cfg = tiny_config(tiny_llama_dir, chat_data, **SHORT)
    rundir = RunDir(str(tmp_path / 'run'))
    os.makedirs(os.path.join(rundir.checkpoints, '4'))
    rundir.config_file.write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
    rundir.write_summary({'step': 4, 'loss': 0.5, 'exit_code': 0})
    before = snapshot(rundir.path)
    run = loop.setup(cfg, rundir.path)
    assert run.done == {'step': 4, 'loss': 0.5, 'exit_code': 0} and run.pre is None
    assert loop.train(run) is run
    assert loop.finish(run) == run.done
    assert loads == [] and snapshot(rundir.path) == before


@pytest.mark.slow
def test_train_twice_equals_once_and_the_model_loads_once(tmp_path, tiny_llama_dir, chat_data, loads):
    """~25 s on 2 CPU cores: two 4-step runs, and a third set up on the second's fine-tuned model."""
    once_dir, parts_dir = str(tmp_path / 'once'), str(tmp_path / 'parts')
    once = loop.train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **SHORT), once_dir)
    assert loads == [tiny_llama_dir]  # training and the eval split: one load

    run = loop.setup(tiny_config(tiny_llama_dir, chat_data, **SHORT), parts_dir)
    loop.train(run, stop_at=3)
    assert (run.step, run.result['exit_code']) == (3, 0)
    assert sorted(checkpoint.step_status(parts_dir)) == [2, 3] and RunDir(parts_dir).summary() is None
    loop.train(run)  # continues in the same process, from step 3
    assert run.step == 4
    loop.train(run)  # nothing left to train
    assert run.step == 4
    parts = loop.finish(run)
    assert loads == [tiny_llama_dir] * 2
    assert losses(once_dir) == losses(parts_dir) and sorted(losses(parts_dir)) == [1, 2, 3, 4]
    timing = ('wall_s', 'compile_s', 'tokens_per_s')
    assert {k: v for k, v in once.items() if k not in timing} == {k: v for k, v in parts.items() if k not in timing}
    assert RunDir(parts_dir).summary()['step'] == 4 and 'eval/loss' in parts

    start = loop.setup(tiny_config(tiny_llama_dir, chat_data, **SHORT, **{'model.adapter': parts_dir}),
                       str(tmp_path / 'from_run'))
    assert loads == [tiny_llama_dir] * 3  # the run's fine-tuned model: its base, loaded once
    loop.finish(start)


@pytest.mark.slow
def test_generation_evals_before_and_after_use_the_one_model(tmp_path, tiny_llama_dir, chat_data, loads):
    """The base model's answers (before step 1) and the fine-tuned model's (after the last) come from the model
    the run built, not from another load."""
    wd = str(tmp_path / 'run')
    out = loop.train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **dict(SHORT, **{'train.steps': 2}),
                                              **GENERATE), wd)
    assert loads == [tiny_llama_dir]
    assert 'gen/exact_match' in out and 'gen/exact_match_base' in out
    rows = [r for r in RunDir(wd).metrics() if 'gen/exact_match' in r]
    assert [r['step'] for r in rows] == [0, 2]
