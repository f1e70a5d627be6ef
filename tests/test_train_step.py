"""The one train step: overfitting in every mode, frozen leaves untouched, optimizer state only for the
trainable, compiled memory LoRA < full, exact gradient accumulation, NaN skipping, optimizer config."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from ftjax import optim, tree
from ftjax import state as state_lib
from ftjax.models import build_model, load_pretrained
from ftjax.models import adapters
from ftjax.peft import LastLayers
from ftjax.train_step import make_eval_step
from tests import tiny
from tests.tiny import build, lm_batch, make_config

MODES = {  # method, peft overrides, learning rate
    'full': ('full', {}, 3e-3),
    'partial': ('partial', {'last_n_blocks': 1}, 1e-2),
    'lora': ('lora', {}, 1e-2),
    'dora': ('dora', {}, 1e-2),
}
OVERFIT_STEPS = 25
# the fast lane trains LoRA only
FAST_LORA_MODES = [mode if mode == 'lora' else pytest.param(mode, marks=pytest.mark.slow) for mode in MODES]


@pytest.fixture(scope='module')
def sharp_llama(tmp_path_factory):
    """The tiny Llama with weights at std 0.2: the fixture's std 0.02 tied embedding bounds its logits to about
    +-1.3, which no adapter on the blocks can overcome; pretrained models have logits of realistic range."""
    path = tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp('sharp')), initializer_range=0.2)
    return load_pretrained(path)


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


@pytest.fixture(scope='module')
def runs(sharp_llama):
    """Each mode trained OVERFIT_STEPS steps (AdamW, weight decay on) on one repeated batch; computed lazily."""
    done = {}

    def get(mode):
        if mode not in done:
            method, over, lr = MODES[mode]
            c = make_config(method, lr, **{f'peft.{k}': v for k, v in over.items()}, **{'optim.weight_decay': 0.1})
            pre, mask, _, _, state, step = build(sharp_llama, c)
            start = jax.device_get(state.params())
            batch = lm_batch(pre.config.vocab_size)
            curve = []
            for i in range(OVERFIT_STEPS):
                state, metrics = step(state, batch, jax.random.key(i))
                curve.append(float(metrics['loss']))
            done[mode] = dict(pre=pre, mask=mask, start=start, state=state, losses=curve, batch=batch,
                              metrics=jax.device_get(metrics))
        return done[mode]
    return get


@pytest.mark.parametrize('mode', FAST_LORA_MODES)
def test_overfits_a_repeated_batch(runs, mode):
    r = runs(mode)
    first, last = r['losses'][0], r['losses'][-1]
    print(f'{mode}: loss {first:.3f} -> {last:.4f} in {OVERFIT_STEPS} steps ({1 - last / first:.1%} drop), '
          f'{int(r["metrics"]["trainable_params"]):,} trainable')
    assert last < 0.1 * first
    m = r['metrics']
    assert m['trainable_params'] == tree.count_params(r['state'].trainable) and m['num_tokens'] == 32
    assert m['is_finite'] == 1.0 and m['learning_rate'] == pytest.approx(MODES[mode][2]) and m['grad_norm'] > 0
    assert 0.9 <= m['accuracy'] <= 1.0 and int(r['state'].step) == OVERFIT_STEPS


@pytest.mark.parametrize('mode', FAST_LORA_MODES)
def test_frozen_leaves_bit_identical_trainable_leaves_changed(runs, mode):
    r = runs(mode)
    end = traverse_util.flatten_dict(jax.device_get(r['state'].params()))
    start = traverse_util.flatten_dict(r['start'])
    mask = traverse_util.flatten_dict(r['mask'])
    assert set(end) == set(start) == set(mask)
    n_frozen = n_trained = 0
    for path, m in mask.items():
        a, b = np.asarray(start[path]), np.asarray(end[path])
        if isinstance(m, LastLayers):  # stacked leaf: first layers frozen, last m.n train
            cut = a.shape[0] - m.n
            assert np.array_equal(a[:cut], b[:cut]), path
            assert all(not np.array_equal(a[i], b[i]) for i in range(cut, a.shape[0])), path
            n_frozen, n_trained = n_frozen + 1, n_trained + 1
        elif m:
            assert not np.array_equal(a, b), f'{path} trains but did not change'
            n_trained += 1
        else:
            assert np.array_equal(a, b), f'{path} is frozen but changed'
            n_frozen += 1
    assert n_trained and (n_frozen or mode == 'full')


@pytest.mark.parametrize('mode', FAST_LORA_MODES)
def test_optimizer_state_only_for_trainable_leaves(runs, mode):
    r = runs(mode)
    state = r['state']
    trainable = jax.tree.leaves(state.trainable)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]  # AdamW's mu and nu
    assert len(moments) == 2 * len(trainable)
    assert tree.count_params(moments) == 2 * tree.count_params(trainable)
    total = tree.count_params(r['pre'].params)
    if mode != 'full':
        assert tree.count_params(trainable) < 0.5 * total


@pytest.mark.slow
@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_merge_after_training_matches_the_adapter_model(llama, method):
    """On the std-0.02 fixture (logits of order 1): on the sharp model float32 rounding alone reaches 2e-5
    in logits of order 10 (relative 2e-6), the same on both sides of the merge."""
    c = make_config(method, 1e-2)
    pre, _, _, _, state, step = build(llama, c)
    batch = lm_batch(pre.config.vocab_size, seed=7)
    for i in range(8):
        state, _ = step(state, batch, jax.random.key(i))
    params = jax.device_get(state.params())
    b = traverse_util.flatten_dict(params)[('layers', 'q_proj', 'lora_b')]
    assert np.abs(b).max() > 1e-2  # trained away from B = 0
    ids = batch['input_ids']
    adapted = np.asarray(jax.jit(lambda p: pre.model.apply({'params': p}, ids))(params))
    merged = adapters.merge(params, pre.config.lora)
    base_model = build_model(dataclasses.replace(pre.config, lora=None))
    merged_out = np.asarray(jax.jit(lambda p: base_model.apply({'params': p}, ids))(merged))
    diff = np.abs(adapted - merged_out).max()
    print(f'{method} after 8 steps: merged vs adapter logits max |diff| = {diff:.2e} (|logits| <= '
          f'{np.abs(adapted).max():.2f})')
    assert diff < 1e-5


@pytest.mark.slow
def test_compiled_memory_lora_well_under_full(llama):
    batch = lm_batch(llama.config.vocab_size)
    mem = {}
    for method in ('full', 'lora'):
        c = make_config(method)
        _, _, _, _, state, step = build(llama, c)
        stats = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                 + stats.temp_size_in_bytes)
        mem[method] = (total, stats.argument_size_in_bytes, stats.temp_size_in_bytes)
    ratio = mem['lora'][0] / mem['full'][0]
    print('compiled train step memory (total / state arguments / temp, bytes): ' + ', '.join(
        f'{k} {t:,} / {a:,} / {tmp:,}' for k, (t, a, tmp) in mem.items()) + f'; LoRA/full {ratio:.2f}')
    assert mem['lora'][1] < 0.6 * mem['full'][1]  # state: no AdamW moments for the base weights
    assert mem['lora'][0] < 0.75 * mem['full'][0]


@pytest.mark.parametrize('method,k', [('full', 2), pytest.param('lora', 4, marks=pytest.mark.slow)])
def test_grad_accumulation_equals_one_big_batch(llama, method, k):
    """SGD at learning rate 1 and no momentum: the update *is* the (clipped) mean gradient, so any
    difference between k micro-batches and one batch shows unscaled."""
    batch = lm_batch(llama.config.vocab_size, b=4, seed=5)
    batch['loss_mask'][:, :5] = 0.0  # micro-batches with different token counts must still average exactly
    batch['loss_mask'][0, 5:9] = 0.0
    after = {}
    for accum in (1, k):
        c = make_config(method, 1.0, **{'optim.name': 'sgd', 'optim.momentum': 0.0, 'optim.grad_accum': accum})
        _, _, _, _, state, step = build(llama, c)
        before = jax.device_get(state.trainable)
        state, metrics = step(state, batch, jax.random.key(0))
        after[accum] = (jax.device_get(state.trainable), jax.device_get(metrics))
    update = jax.tree.map(lambda a, b: a - b, after[1][0], before)
    assert max(float(np.abs(u).max()) for u in jax.tree.leaves(update)) > 1e-3
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after[1][0]), jax.tree.leaves(after[k][0])))
    print(f'{method}: grad_accum={k} vs one batch: max |param diff| = {diff:.2e}')
    assert diff < 1e-5
    for name in ('loss', 'accuracy', 'grad_norm', 'num_tokens'):
        assert after[k][1][name] == pytest.approx(after[1][1][name], rel=1e-6, abs=1e-7), name


@pytest.mark.slow
def test_nan_skip_leaves_state_unchanged(llama):
    c = make_config('lora', **{'train.nan_policy': 'skip'})
    _, _, _, _, state, step = build(llama, c)
    batch = lm_batch(llama.config.vocab_size)
    state, _ = step(state, batch, jax.random.key(0))
    before = jax.device_get((state.trainable, state.opt_state))
    bad = dict(batch, loss_mask=np.full_like(batch['loss_mask'], np.nan))
    state, metrics = step(state, bad, jax.random.key(1))
    assert metrics['is_finite'] == 0.0 and int(state.nan_count) == 1 and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.trainable, state.opt_state)))):
        assert np.array_equal(a, b)
    state, metrics = step(state, batch, jax.random.key(2))
    assert metrics['is_finite'] == 1.0 and int(state.nan_count) == 1
    assert not np.array_equal(jax.tree.leaves(before[0])[0], jax.device_get(jax.tree.leaves(state.trainable)[0]))


@pytest.mark.slow
def test_frozen_bf16_remat_and_eval_step(llama):
    """Frozen params stored in bfloat16 next to float32 trainable ones; `model.remat` changes nothing numerically;
    the eval step's sums agree with the train step's metrics."""
    batch = lm_batch(llama.config.vocab_size, seed=4)
    out = {}
    for remat in ('none', 'full'):
        c = make_config('partial', **{'peft.last_n_blocks': 1, 'peft.norms': True, 'model.remat': remat,
                                      'model.frozen_dtype': 'bfloat16'})
        pre, _, _, _, state, step = build(llama, c)
        assert pre.config.remat == remat
        dtypes = {x.dtype for x in jax.tree.leaves(state.frozen)}
        assert dtypes == {jnp.dtype(jnp.bfloat16)} and {x.dtype for x in jax.tree.leaves(state.trainable)} == {
            jnp.dtype(jnp.float32)}
        sums = jax.jit(make_eval_step(pre.model, c))(state.params(), batch)
        state, metrics = step(state, batch, jax.random.key(0))
        out[remat] = (jax.device_get(state.trainable), metrics)
        assert float(sums['loss_sum']) / float(sums['count']) == pytest.approx(float(metrics['loss']), rel=1e-6)
        assert float(sums['correct']) / float(sums['count']) == pytest.approx(float(metrics['accuracy']))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out['none'][0]),
                                                          jax.tree.leaves(out['full'][0])))
    assert diff < 1e-6


@pytest.fixture(scope='module')
def bert_cls(tmp_path_factory):
    path = tiny.make_bert_checkpoint(str(tmp_path_factory.mktemp('bert_cls')), num_labels=2)
    return load_pretrained(path, num_labels=2)


@pytest.mark.slow
def test_classifier_lora_plus_head_trains_and_evaluates(bert_cls):
    rng = np.random.RandomState(0)
    b, t = 8, 12
    ids = rng.randint(4, bert_cls.config.vocab_size, (b, t)).astype(np.int32)
    attn = np.ones((b, t), np.int32)
    attn[::2, 8:] = 0
    batch = {'input_ids': ids, 'attention_mask': attn, 'token_type_ids': np.zeros((b, t), np.int32),
             'label': (np.arange(b) % 2).astype(np.int32)}
    c = make_config('lora', 1e-2, **{'peft.lora.targets': ['(q|v)_proj$'], 'peft.lora.lr_ratio': 4.0})
    pre, mask, _, _, state, step = build(bert_cls, c)
    assert 'classifier' in state.trainable and 'pooler' in state.trainable
    curve = []
    for i in range(30):
        state, metrics = step(state, batch, jax.random.key(i))  # dropout on: 0.1 from the checkpoint
        curve.append(float(metrics['loss']))
    print(f'BERT classifier LoRA + head: loss {curve[0]:.3f} -> {curve[-1]:.4f}')
    assert curve[-1] < 0.1 * curve[0] and metrics['num_tokens'] == b
    eval_step = jax.jit(make_eval_step(pre.model, c))
    valid = dict(batch, valid=np.array([True] * 6 + [False] * 2))
    out = jax.device_get(eval_step(state.params(), valid))
    assert out['count'] == 6 and out['pred'].shape == (b,) and np.array_equal(out['label'], batch['label'])
    assert out['correct'] == np.sum((out['pred'] == batch['label'])[:6])


def test_optimizer_from_config():
    params = {'layers': {'q_proj': {'kernel': jnp.ones((2, 3)), 'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.ones((2, 3))},
                         'attn_norm': {'scale': jnp.ones(3)}},
              'classifier': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    c = make_config('lora', 0.1, **{'optim.name': 'sgd', 'optim.momentum': 0.0, 'optim.clip_norm': 0.0,
                                    'optim.weight_decay': 0.5, 'peft.lora.lr_ratio': 4.0,
                                    'optim.lr_multipliers': ['classifier/=10', 'lora_a$=2']})
    tx, _ = optim.make_optimizer(c, params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    u = {'/'.join(k): float(v.ravel()[0]) for k, v in traverse_util.flatten_dict(updates).items()}
    assert u['layers/q_proj/kernel'] == pytest.approx(-0.1 * 1.5)  # decayed: (g + wd * p) * lr
    assert u['layers/attn_norm/scale'] == pytest.approx(-0.1)  # norms: no decay
    assert u['classifier/bias'] == pytest.approx(-1.0)  # bias: no decay; x10
    assert u['classifier/kernel'] == pytest.approx(-1.5)
    assert u['layers/q_proj/lora_a'] == pytest.approx(-0.3)
    assert u['layers/q_proj/lora_b'] == pytest.approx(-0.6)  # LoRA+: B at 4x

    c = make_config('lora', 1e-3, **{'optim.schedule': 'cosine', 'optim.warmup_steps': 4, 'optim.end_lr_ratio': 0.1})
    _, schedule = optim.make_optimizer(c, params, 14)
    assert [float(schedule(s)) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert float(schedule(9)) == pytest.approx(0.55e-3) and float(schedule(14)) == pytest.approx(1e-4)
    c = make_config('lora', 1e-3, **{'optim.schedule': 'linear'})
    _, schedule = optim.make_optimizer(c, params, 10)
    assert float(schedule(0)) == pytest.approx(1e-3) and float(schedule(5)) == pytest.approx(5e-4)

    adafactor = make_config('lora', **{'optim.name': 'adafactor'})
    tx, _ = optim.make_optimizer(adafactor, params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match=r"config.optim.name='adam' is not one of"):
        optim.make_optimizer(make_config(**{'optim.name': 'adam'}), params, 10)
    with pytest.raises(ValueError, match=r"config.optim.lr_multipliers: 'head/' matches no trainable parameter"):
        optim.make_optimizer(make_config(**{'optim.lr_multipliers': ['head/=2']}), params, 10)
    with pytest.raises(ValueError, match=r"config.optim.lr_multipliers: 'lora_b' should look like"):
        optim.make_optimizer(make_config(**{'optim.lr_multipliers': ['lora_b']}), params, 10)


def test_partition_combine_round_trip():
    params = {'layers': {'w': np.arange(24.0).reshape(3, 2, 4)}, 'embed': {'embedding': np.ones((5, 2))},
              'head': {'kernel': np.zeros((2, 2))}}
    mask = {'layers': {'w': LastLayers(1)}, 'embed': {'embedding': False}, 'head': {'kernel': True}}
    trainable, frozen = state_lib.partition(params, mask)
    assert trainable['layers']['w'].shape == (1, 2, 4) and frozen['layers']['w'].shape == (2, 2, 4)
    assert 'head' not in frozen and 'embed' not in trainable
    back = state_lib.combine(trainable, frozen)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match='does not fit the params'):
        state_lib.partition(params, {'layers': {'w': True}})
    tx = optax.adamw(1e-3)
    st = state_lib.create_state(params, mask, tx, 'bfloat16')
    assert st.frozen['layers']['w'].dtype == jnp.bfloat16 and st.trainable['layers']['w'].dtype == jnp.float32
    assert tree.count_params(st.opt_state) == 2 * tree.count_params(st.trainable) + 1  # + AdamW's step count
