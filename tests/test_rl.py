"""`ftjax.rl`: rewards, advantages, rollouts sampled with the trained parameters, and the GRPO loop end to end on
the tiny model (resume bit-exact)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import build
from ftjax.errors import EXIT_PREEMPTED, ConfigError
from ftjax.loop import finish, setup, train, train_and_evaluate
from ftjax.objectives import grpo
from ftjax.objectives.preference import strip_adapters
from ftjax.rl import rewards, rollout
from ftjax.workdir import RunDir
from tests.tiny import REPO, tiny_rl_config, write_experiment, subprocess_env


# --- rewards ------------------------------------------------------------------------------------------------

def test_builtin_rewards():
    ref = ['{"name": "Ann", "age": 3}'] * 4
    outs = ['{"name": "Ann", "age": 3}', '{"name": "Ann", "age": 4}', 'Sure: {"name": "Ann", "age": 3}', '[1]']
    assert rewards.json_fields(None, outs, ref) == [1.0, 0.5, 1.0, 0.0]
    fenced = ['Here {bad ```json\n{"age": 3, "x": 1}\n```', '{"name": "Ann", "age": 3', '{"name": ["Ann"]}']
    assert rewards.json_fields(None, fenced, ref[:3]) == [0.5, 0.0, 0.0]
    assert rewards.json_exact(None, outs, ref)[:2] == [1.0, 0.0]
    assert rewards.json_format(None, outs) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.final_number(None, ['so 12 + 30 = 42', '#### 41', 'none'], ['#### 42'] * 3) == [1.0, 0.0, 0.0]
    assert rewards.answer_format(None, ['x\n#### 42', '#### 4.5 ', 'the answer is 42']) == [1.0, 1.0, 0.0]


def _raises(prompts, completions, **_):
    raise KeyError('answer')


def _short(prompts, completions, **_):
    return [1.0]


def test_reward_errors_name_the_function():
    with pytest.raises(ConfigError, match='_raises raised KeyError'):
        rewards.score([_raises], ['p'] * 2, ['c'] * 2, {})
    with pytest.raises(ConfigError, match='_short returned 1 values for 2 completions'):
        rewards.score([_short], ['p'] * 2, ['c'] * 2, {})
    with pytest.raises(ConfigError, match="'nope:missing'.*cannot import"):
        rewards.load(['nope:missing'])
    with pytest.raises(ConfigError, match='neither a built-in'):
        rewards.load(['json'])
    with pytest.raises(ConfigError, match='align.rewards is empty'):
        rewards.load([])
    with pytest.raises(ConfigError, match='2 values for 1 reward'):
        rewards.weights([1, 2], 1)


def test_advantages_follow_trl():
    """TRL's formula by hand: (r - group mean) / (Bessel std + 1e-4); NaN rewards left out, advantage 0."""
    r = np.array([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 1.0, np.nan, 0.0, 0.0])
    adv, std, zero = rollout.advantages(r, 4, 'group')
    g = r[:4]
    np.testing.assert_allclose(adv[:4], (g - g.mean()) / (g.std(ddof=1) + 1e-4), rtol=1e-6)
    assert np.all(adv[4:8] == 0) and zero[4] and not zero[0]
    h = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(adv[[8, 10, 11]], (h - h.mean()) / (h.std(ddof=1) + 1e-4), rtol=1e-6)
    assert adv[9] == 0.0
    adv_none, _, _ = rollout.advantages(r, 4, 'none')
    np.testing.assert_allclose(adv_none[:4], g - g.mean(), rtol=1e-6)
    adv_b, std_b, _ = rollout.advantages(r, 4, 'batch')
    assert np.allclose(std_b, np.nanstd(r, ddof=1))


# --- rollouts: the sampler sees the trained parameters --------------------------------------------------------

def _varied_lora(pre):
    """LoRA B at random values: the adapted model differs from the base (at init B = 0 hides a mix-up)."""
    leaves = jax.tree_util.tree_flatten_with_path(pre.params)[0]
    key = jax.random.key(5)
    new = {}
    for i, (path, leaf) in enumerate(leaves):
        names = [getattr(p, 'key', '') for p in path]
        new[tuple(names)] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype) \
            if 'lora_b' in names else leaf
    from flax import traverse_util
    return dataclasses.replace(pre, params=traverse_util.unflatten_dict(new))


def test_rollout_logprobs_equal_the_train_steps_recomputation(tiny_llama_dir, chat_data, tmp_path):
    """old_logps from the engine = the GRPO objective's log-probs of the same rows to 1e-5 with LoRA on; so the
    importance ratio is 1 and nothing clips. Handing the engine the base parameters breaks it (> 1e-3)."""
    config = tiny_rl_config(tiny_llama_dir, chat_data)
    pre, _ = build.build_model_and_mask(config)
    pre = _varied_lora(pre)
    it = rollout.Rollouts(config, pre, None, str(tmp_path))
    it.bind(lambda: pre.params)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    mask = np.asarray(batch['loss_mask']) > 0
    assert mask.sum() >= 8 and np.any(np.asarray(batch['advantages']) != 0)
    logps = np.asarray(jax.jit(lambda p, b: grpo.completion_logps(pre.model, p, b))(pre.params, batch))
    diff = np.abs(logps - np.asarray(batch['old_logps']))[mask]
    assert diff.max() <= 1e-5, diff.max()
    s = grpo.settings(config)
    _, sums = grpo.loss_and_sums(s, jnp.asarray(logps), batch['old_logps'], None, batch['advantages'],
                                 batch['loss_mask'], *grpo.normalisers(batch))
    _, m = grpo.finalize(sums)
    assert abs(float(m['ratio_mean']) - 1.0) <= 1e-5 and float(m['clip_ratio/region_mean']) == 0.0
    # the same rows sampled with the base parameters (adapters dropped): log-probs that the trainer does not give
    base = rollout.Rollouts(config, pre)
    base_params = dict(strip_adapters(pre.params))
    base.sampler.model = pre.model.clone(cfg=dataclasses.replace(pre.model.cfg, lora=None))
    base.bind(lambda: base_params)
    b2 = {k: jnp.asarray(v) for k, v in next(base).items()}
    wrong = np.asarray(jax.jit(lambda p, b: grpo.completion_logps(pre.model, p, b))(pre.params, b2))
    m2 = np.asarray(b2['loss_mask']) > 0
    assert np.abs(wrong - np.asarray(b2['old_logps']))[m2].max() > 1e-3


def test_prompt_too_long_is_one_error(tiny_llama_dir, chat_data, tmp_path):
    config = tiny_rl_config(tiny_llama_dir, chat_data, **{'data.max_length': 128})
    pre, _ = build.build_model_and_mask(config)
    with pytest.raises(ConfigError, match=r'row 0: a prompt of \d+ tokens.*raise --config.data.max_length'):
        rollout.Rollouts(config, pre, None, str(tmp_path))


def test_batch_size_must_be_prompts_times_generations(tiny_llama_dir, chat_data, tmp_path):
    with pytest.raises(ConfigError, match='train.batch_size=6 must be rollout.prompts x align.num_generations'):
        train_and_evaluate(tiny_rl_config(tiny_llama_dir, chat_data, **{'train.batch_size': 6}), tmp_path / 'w')


# --- the loop ---------------------------------------------------------------------------------------------------

def _rows(workdir):
    return [r for r in RunDir(str(workdir)).metrics() if 'reward' in r]


def _completions(workdir):
    with open(os.path.join(workdir, 'completions.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize('mu', [1, 2])
def test_grpo_run_resumes_bit_exact(tiny_llama_dir, chat_data, tmp_path, mu):
    """Stopped after step 1 (mu=2: between the two iterations of a rollout), then rerun: every later step's
    rewards, losses and sampled completions equal an uninterrupted run's."""
    config = tiny_rl_config(tiny_llama_dir, chat_data, **{'align.num_iterations': mu, 'train.checkpoint_every': 1})
    whole = tmp_path / 'whole'
    result = train_and_evaluate(config, str(whole))
    assert result['step'] == 4 and 'eval/reward' in result and 'base/eval/reward' in result
    rows = _rows(whole)
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    for key in ('loss', 'reward', 'reward_std', 'kl', 'entropy', 'clip_ratio/region_mean', 'time/rollout_s',
                'time/update_s', 'completions/mean_length', 'frac_reward_zero_std', 'rollout/tokens_per_s'):
        assert key in rows[0], key
    assert rows[0]['clip_ratio/region_mean'] == 0.0 and abs(rows[0]['ratio_mean'] - 1.0) < 1e-5
    parts = tmp_path / 'parts'
    run = setup(config, str(parts))
    train(run, stop_at=1)
    assert run.step == 1
    again = setup(config, str(parts))
    assert again.step == 1
    train(again)
    finish(again)
    got = _rows(parts)
    for a, b in zip(rows, got):
        for key in ('loss', 'reward', 'reward_std', 'entropy', 'grad_norm', 'completions/mean_length'):
            assert a[key] == b[key], (a['step'], key, a[key], b[key])
    assert [c['completion'] for c in _completions(whole)] == [c['completion'] for c in _completions(parts)]
    assert len(_completions(whole)) == 4 // mu * 8


@pytest.mark.slow
def test_compile_check_of_an_rl_config_with_a_reference(tiny_llama_dir, chat_data):
    """The GRPO step (beta > 0: the adapters-off reference in the same step) compiles for a mesh with its batch
    layout (old_logps, advantages); full fine-tuning with beta > 0 gets the per-token reference log-probs in its
    batch, and asking it for the adapters-off reference is one error naming the fix."""
    from ftjax import compile_check
    config = tiny_rl_config(tiny_llama_dir, chat_data, **{'align.beta': 0.04, 'align.loss': 'dapo'})
    report = compile_check.check(config, compile_check.parse_topology('data=2,fsdp=2,tensor=2'))
    assert report['temp_bytes'] > 0 and report['argument_bytes'] > report['trainable_bytes']
    full = tiny_rl_config(tiny_llama_dir, chat_data, **{'align.beta': 0.04, 'peft.method': 'full'})
    assert grpo.settings(full).reference == 'precomputed'
    assert compile_check.abstract_batch(full, None, None)['ref_logps'].shape == (8, 224)  # [batch, seq]
    with pytest.raises(ConfigError, match="adapters_off' needs peft.method lora or dora.*reference=precomputed"):
        grpo.settings(tiny_rl_config(tiny_llama_dir, chat_data, **{'align.beta': 0.04, 'peft.method': 'full',
                                                                    'align.reference': 'adapters_off'}))


@pytest.mark.slow
def test_full_fine_tuning_with_kl_keeps_the_starting_model_as_reference(tiny_llama_dir, chat_data, tmp_path):
    """Full fine-tuning with beta > 0: each rollout carries the *starting* model's per-token log-probs (a copy of
    the starting weights, taken before a resume replaces them), so the KL is ~0 at step 1 and grows as the policy
    moves; a run stopped after step 2 and resumed logs the same KL and losses as an uninterrupted one."""
    config = tiny_rl_config(tiny_llama_dir, chat_data, **{'peft.method': 'full', 'align.beta': 0.04,
                                                         'train.steps': 3, 'train.checkpoint_every': 1,
                                                         'optim.learning_rate': 1e-3})
    whole = tmp_path / 'whole'
    train_and_evaluate(config, str(whole))
    rows = _rows(whole)
    assert rows[0]['kl'] < 1e-6 and rows[-1]['kl'] > 1e-5, [r['kl'] for r in rows]
    parts = tmp_path / 'parts'
    train(setup(config, str(parts)), stop_at=2)
    again = setup(config, str(parts))
    assert again.step == 2
    train(again)
    for a, b in zip(rows, _rows(parts)):
        for key in ('loss', 'kl', 'reward', 'grad_norm'):
            assert a[key] == b[key], (a['step'], key, a[key], b[key])
    batch = {k: jnp.asarray(v) for k, v in again.it.current[1].items()}  # step 3's rollout, sampled after resume
    mask = np.asarray(batch['loss_mask']) > 0
    start, _ = build.build_model_and_mask(config)
    logps = jax.jit(lambda p, b: grpo.completion_logps(start.model, p, b))
    assert np.abs(np.asarray(logps(start.params, batch)) - np.asarray(batch['ref_logps']))[mask].max() <= 1e-5
    now = np.asarray(logps(jax.device_get(again.state.params()), batch))
    assert np.abs(now - np.asarray(batch['ref_logps']))[mask].max() > 1e-3
    finish(again)


@pytest.mark.slow
@pytest.mark.variants  # CI: SIGTERM is test_trainer's; GRPO mid-rollout resume is test_grpo_run_resumes_bit_exact
def test_grpo_sigterm_mid_run_resumes_exactly(tiny_llama_dir, chat_data, tmp_path):
    """A real SIGTERM while a GRPO run trains (in a separate process: the preemption handler saves and exits with
    EXIT_PREEMPTED), then the same command again: every step's loss, reward and KL, and every sampled
    completion, equal an uninterrupted run's."""
    env = subprocess_env()
    steps = 40
    exp = write_experiment(tmp_path / 'exp.py', tiny_llama_dir, chat_data, config_fn='tiny_rl_config',
                           **{'train.steps': steps, 'train.checkpoint_every': 100, 'train.eval_every': 100,
                              'align.beta': 0.04})
    run = lambda workdir: subprocess.Popen(  # noqa: E731
        [sys.executable, '-m', 'ftjax', 'train', f'--config={exp}', f'--workdir={workdir}'], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped, whole = tmp_path / 'stopped', tmp_path / 'whole'
    proc = run(stopped)
    deadline = time.time() + 180
    while time.time() < deadline and len(_rows(stopped)) < 2:
        time.sleep(0.2)
    assert len(_rows(stopped)) >= 2, 'the run did not start training in time'
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED and 'preempted' in out, out
    cut = len(_rows(stopped))
    assert cut < steps
    for workdir in (stopped, whole):
        proc = run(workdir)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    a, b = _rows(whole), _rows(stopped)
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for key in ('loss', 'reward', 'kl', 'grad_norm'):
            assert x[key] == y[key], (x['step'], key, x[key], y[key])
    assert [c['completion'] for c in _completions(whole)] == [c['completion'] for c in _completions(stopped)]
