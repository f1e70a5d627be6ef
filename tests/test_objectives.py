"""`ftjax.objectives`: objectives are values handed to the one train step. A toy objective written here (the LM
loss through the plain chunked log-probs, as a whole-batch mean) trains through `make_train_step` and evaluates
through `make_eval_step` unchanged, equals the built-in LM objective (whose gradient is hand-written), keeps
gradient accumulation exact through its whole-batch normalisers; `objective_for` is where the config chooses."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import optim, peft
from ftjax import state as state_lib
from ftjax.config import default_config, override
from ftjax.models import lm_head_kernel, load_pretrained
from ftjax.objectives import Objective, logprobs, objective_for
from ftjax.state import combine
from ftjax.train_step import make_eval_step, make_train_step

CHUNK = 16


def toy_objective():
    """The mean token cross-entropy from `logprobs.token_logps` (differentiated by JAX), divided by the whole batch's
    token count (a normaliser) in each micro-batch, with a metric of its own."""
    def nll(model, params, batch):
        hidden = model.apply({'params': params}, batch['input_ids'], batch['positions'], batch['segment_ids'],
                             return_hidden=True)  # [batch, seq, embed]
        lp = logprobs.token_logps(hidden, lm_head_kernel(params, model.cfg), batch['target_ids'], CHUNK)
        return -jnp.sum(batch['loss_mask'] * lp), jnp.sum(batch['loss_mask'])

    def sums(model, trainable, frozen, batch, rng, norms):
        total, count = nll(model, combine(trainable, frozen), batch)
        return total / norms, {'count': count, 'nll': jax.lax.stop_gradient(total)}

    def finalize(s):
        return jnp.ones(()), {'accuracy': jnp.zeros(()), 'num_tokens': s['count'],
                              'toy/perplexity': jnp.exp(s['nll'] / s['count'])}

    def eval_sums(model, params, batch):
        total, count = nll(model, params, batch)
        return {'loss_sum': total, 'correct': jnp.zeros(()), 'count': count}

    keys = ('input_ids', 'target_ids', 'loss_mask', 'positions', 'segment_ids')
    return Objective('toy', keys, sums, lambda batch: jnp.maximum(jnp.sum(batch['loss_mask']), 1.0), finalize,
                     eval_sums)


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


def lm_batch(vocab, b=4, t=16, seed=0):
    ids = np.random.RandomState(seed).randint(4, vocab, (b, t + 1)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, :5], mask[0, 5:9] = 0.0, 0.0  # micro-batches of unequal token counts
    return {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': mask,
            'segment_ids': np.ones((b, t), np.int32),
            'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def make_config(**over):
    c = default_config()
    c.peft.method, c.optim.schedule, c.train.loss_chunk = 'full', 'constant', CHUNK
    return override(c, over)


def build(pre, c, objective=None):
    pre, mask = peft.prepare(pre, c, jax.random.key(0))
    tx, schedule = optim.make_optimizer(c, state_lib.partition(pre.params, mask)[0], c.train.steps)
    state = jax.jit(lambda p: state_lib.create_state(p, mask, tx, c.model.frozen_dtype))(pre.params)
    return pre, state, jax.jit(make_train_step(pre.model, c, tx, schedule, objective))


def test_a_toy_objective_trains_and_evaluates(llama):
    batch = lm_batch(llama.config.vocab_size)
    c = make_config(**{'optim.learning_rate': 3e-3})
    pre, state, step = build(llama, c, toy_objective())
    eval_step = jax.jit(make_eval_step(pre.model, c, toy_objective()))
    before = jax.device_get(eval_step(state.params(), batch))
    curve = []
    for i in range(10):
        state, m = step(state, batch, jax.random.key(i))
        curve.append(float(m['loss']))
    print(f'toy objective: loss {curve[0]:.4f} -> {curve[-1]:.4f}')
    assert curve[0] == pytest.approx(before['loss_sum'] / before['count'], rel=1e-6)
    assert curve[-1] < curve[0] - 0.1 and int(state.step) == 10
    assert float(m['toy/perplexity']) == pytest.approx(np.exp(curve[-1]), rel=1e-5)
    assert float(m['num_tokens']) == batch['loss_mask'].sum() and float(m['grad_norm']) > 0
    with pytest.raises(ValueError, match=r"The toy batch lacks \['positions'\]"):
        step(state, {k: v for k, v in batch.items() if k != 'positions'}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"The lm batch lacks \['loss_mask'\]"):
        jax.jit(make_eval_step(pre.model, c))(state.params(), {k: v for k, v in batch.items() if k != 'loss_mask'})


@pytest.mark.parametrize('accum', [1, 2])
def test_toy_objective_equals_the_lm_objective(llama, accum):
    """SGD at learning rate 1: the update is the mean gradient. The toy (plain log-probs, a mean per micro-batch
    over the whole batch's tokens, `accum` micro-batches) and the built-in LM objective (the hand-written
    gradient, a sum divided once) take the same step."""
    batch = lm_batch(llama.config.vocab_size, seed=3)
    after = {}
    for name, objective, k in (('lm', None, 1), ('toy', toy_objective(), accum)):
        c = make_config(**{'optim.name': 'sgd', 'optim.momentum': 0.0, 'optim.learning_rate': 1.0,
                           'optim.grad_accum': k})
        _, state, step = build(llama, c, objective)
        start = jax.device_get(state.trainable)
        state, m = step(state, batch, jax.random.key(0))
        after[name] = (jax.device_get(state.trainable), jax.device_get(m))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after['lm'][0]), jax.tree.leaves(start)))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after['lm'][0]),
                                                          jax.tree.leaves(after['toy'][0])))
    print(f'toy (grad_accum={accum}) vs lm objective after one SGD step: max |param diff| {diff:.1e} '
          f'(the step moves params by up to {moved:.1e})')
    assert moved > 1e-3 and diff < 1e-6
    for key in ('loss', 'grad_norm', 'num_tokens'):
        assert after['toy'][1][key] == pytest.approx(after['lm'][1][key], rel=1e-6), key


def test_objective_for_chooses_from_the_config():
    lm, cls = (types.SimpleNamespace(cfg=types.SimpleNamespace(task=t)) for t in ('lm', 'classification'))
    pref = {'data.format': 'preference'}
    cases = [(lm, {}, 'lm', 'none'), (cls, {'data.format': 'classification'}, 'classification', 'none'),
             (lm, {**pref, 'peft.method': 'lora'}, 'preference', 'adapters_off'),
             (lm, {**pref, 'peft.method': 'full'}, 'preference', 'precomputed'),
             (lm, {**pref, 'align.loss': 'simpo'}, 'preference', 'none')]
    for model, over, name, reference in cases:
        o = objective_for(override(default_config(), over), model)
        assert (o.name, o.reference) == (name, reference), over
        assert (o.before_after is not None) == (name == 'preference')
        assert set(o.keys) >= {'input_ids'}
