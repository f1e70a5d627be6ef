"""`ftjax.objectives.preference` (issue 18): DPO / IPO / SimPO / ORPO as an objective of the one train step.

Parity with TRL (installed for the tests only): each loss and its gradient w.r.t. the four summed log-probs,
on the same numbers, through TRL's own code (`CPOTrainer.cpo_loss`, `ORPOTrainer.odds_ratio_loss`, called
as plain functions) and, for DPO's sigmoid and IPO, a transcription of `DPOTrainer._compute_loss`.
Per-answer log-prob sums against a transformers float32 computation on the tiny Llama. The LoRA / DoRA
reference with adapters off is exactly the untouched base (step 0: DPO loss log 2, rewards 0). The
`preference` data format: pairs kept in one row, masks on answers only, bad rows through the policy.
"""
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data as data_lib, optim, peft, synthetic
from ftjax import state as state_lib
from ftjax.config import default_config, override, validate
from ftjax.eval import evaluate
from ftjax.errors import ConfigError, DataError
from ftjax.models import build_model, load_pretrained
from ftjax.objectives import preference, reference
from ftjax.train_step import make_eval_step, make_train_step
from tests import tiny

LOG2 = math.log(2.0)


# --- the losses against TRL ----------------------------------------------------------------------------------

def _inputs(n=6, seed=0):
    rng = np.random.RandomState(seed)
    logps = -rng.uniform(5.0, 40.0, (n, 2)).astype(np.float32)  # summed answer log-probs [pairs, 2]
    ref = logps + rng.normal(0, 2.0, (n, 2)).astype(np.float32)
    counts = rng.randint(3, 30, (n, 2)).astype(np.float32)
    return logps, ref, counts


def _trl():
    import os
    os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')
    torch = pytest.importorskip('torch')
    pytest.importorskip('trl')
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    return torch, CPOTrainer, ORPOTrainer


def trl_loss(s, logps, ref, counts):
    """TRL's mean loss and its gradient w.r.t. (chosen, rejected, ref chosen, ref rejected) summed log-probs."""
    torch, CPOTrainer, ORPOTrainer = _trl()
    t = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (logps[:, 0], logps[:, 1], ref[:, 0],
                                                                              ref[:, 1])]
    c, r, rc, rr = t
    nc, nr = (torch.tensor(counts[:, i]) for i in (0, 1))
    fake = types.SimpleNamespace(beta=s.beta, label_smoothing=s.label_smoothing, simpo_gamma=s.simpo_gamma,
                                 alpha=0.0, accelerator=types.SimpleNamespace(device='cpu'))
    if s.loss == 'dpo' and s.label_smoothing == 0:  # DPOTrainer._compute_loss, loss_type 'sigmoid' (trl 1.16)
        delta = (c - rc) - (r - rr)
        loss = -torch.nn.functional.logsigmoid(s.beta * delta)
    elif s.loss == 'dpo':  # conservative DPO: CPO's sigmoid loss on the log-ratios is the same formula
        loss, _, _ = CPOTrainer.cpo_loss(types.SimpleNamespace(**vars(fake), loss_type='sigmoid'), c - rc, r - rr)
    elif s.loss == 'ipo':  # DPOTrainer 'ipo': log-ratios averaged over the completion tokens; = CPO's ipo on them
        loss, _, _ = CPOTrainer.cpo_loss(types.SimpleNamespace(**vars(fake), loss_type='ipo'),
                                         (c - rc) / nc, (r - rr) / nr)
    elif s.loss == 'simpo':  # CPOTrainer, loss_type 'simpo' (cpo_alpha 0): average log-probs
        loss, _, _ = CPOTrainer.cpo_loss(types.SimpleNamespace(**vars(fake), loss_type='simpo'), c / nc, r / nr)
    else:  # ORPOTrainer: loss = nll - mean(odds_ratio_loss); beta there is ORPO's lambda
        losses, _, _, _, _ = ORPOTrainer.odds_ratio_loss(
            types.SimpleNamespace(beta=s.orpo_lambda, accelerator=fake.accelerator), c / nc, r / nr)
        loss = -losses
    mean = loss.mean()
    mean.backward()
    grads = [np.zeros(len(logps), np.float32) if x.grad is None else x.grad.numpy() for x in t]  # None: unused
    return float(mean.detach()), np.stack(grads, -1)


def ours(s, logps, ref, counts):
    def f(x):  # x [pairs, 4]: chosen, rejected, ref chosen, ref rejected
        loss, _ = preference.pair_losses(s, x[:, :2], jnp.asarray(counts), x[:, 2:])
        return jnp.mean(loss)
    x = jnp.asarray(np.concatenate([logps, ref], -1))
    value, grad = jax.value_and_grad(f)(x)
    return float(value), np.asarray(grad)


LOSS_CASES = {
    'dpo': dict(loss='dpo', beta=0.1), 'dpo_smoothed': dict(loss='dpo', beta=0.3, label_smoothing=0.1),
    'ipo': dict(loss='ipo', beta=0.2), 'simpo': dict(loss='simpo', beta=2.0, simpo_gamma=0.8),
    'simpo_smoothed': dict(loss='simpo', beta=2.5, simpo_gamma=0.5, label_smoothing=0.2),
    'orpo': dict(loss='orpo', orpo_lambda=0.25),
}


@pytest.mark.parametrize('case', list(LOSS_CASES))
def test_loss_and_gradient_equal_trl(case):
    s = preference.Settings(**LOSS_CASES[case])
    logps, ref, counts = _inputs()
    if s.loss == 'orpo':  # average log-probs of realistic answers, some above -log 2 (log1mexp's other branch)
        logps = logps / 10.0
    want, want_grad = trl_loss(s, logps, ref, counts)
    got, got_grad = ours(s, logps, ref, counts)
    diff = np.abs(got_grad - want_grad).max()
    print(f'{case}: loss {got:.7f} vs TRL {want:.7f}; gradient max |diff| {diff:.2e} (max |grad| '
          f'{np.abs(want_grad).max():.2e})')
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert diff <= 1e-6 * max(1.0, np.abs(want_grad).max())
    if s.loss not in preference.NEEDS_REFERENCE:
        assert np.all(got_grad[:, 2:] == 0)  # reference-free


def test_rewards_as_trl_logs_them():
    logps, ref, counts = _inputs()
    _, rewards = preference.pair_losses(preference.Settings(loss='dpo', beta=0.1), logps, counts, ref)
    np.testing.assert_allclose(rewards, 0.1 * (logps - ref), rtol=1e-6)
    _, rewards = preference.pair_losses(preference.Settings(loss='simpo', beta=2.0), logps, counts)
    np.testing.assert_allclose(rewards, 2.0 * logps / counts, rtol=1e-6)


# --- data --------------------------------------------------------------------------------------------------

PAIRS = [
    {'prompt': 'What is the capital of France?', 'chosen': 'Paris.', 'rejected': 'London, I think.'},
    {'prompt': [{'role': 'user', 'content': 'Name?'}, {'role': 'assistant', 'content': 'Alice'},
                {'role': 'user', 'content': 'Age?'}],
     'chosen': [{'role': 'assistant', 'content': '31'}], 'rejected': 'She is 13.'},
]


def data_config(path, **over):
    c = default_config()
    c.data.path, c.data.format, c.data.max_length = str(path), 'preference', 160
    return override(c, over).data


def test_pairs_stay_together_with_answer_masks(tmp_path):
    tok = tiny.make_tokenizer()
    data = data_lib.build_dataset(data_config(tiny.write_jsonl(tmp_path / 'p.jsonl', PAIRS),
                                              **{'data.use_chat_template': True}), tok)
    assert data.task == 'preference' and len(data) == 2 and data.num_examples == 4
    b = data_lib.take_rows(data, [0, 1])
    answers = {}
    for i in range(2):
        seg = b['segment_ids'][i]
        assert set(np.unique(seg)) == {0, 1, 2}
        assert np.all(b['positions'][i][seg == 2][:1] == 0)  # the rejected sequence restarts at position 0
        for s, name in ((1, 'chosen'), (2, 'rejected')):
            m = (seg == s) & (b['loss_mask'][i] > 0)
            answers[i, name] = tok.decode(b['target_ids'][i][m])
    assert answers[0, 'chosen'] == 'Paris.<|im_end|>' and answers[0, 'rejected'] == 'London, I think.<|im_end|>'
    # a message prompt: its earlier assistant turn is context, only the final answer is learned
    assert answers[1, 'chosen'] == '31<|im_end|>' and answers[1, 'rejected'] == 'She is 13.<|im_end|>'
    assert data_lib.prompt_and_answer(PAIRS[1], data_config('x'))[1] == '31'


def test_long_pairs_truncated_evenly_or_dropped(tmp_path):
    tok = tiny.make_tokenizer()
    long = [{'prompt': 'The quick brown fox jumps over the lazy dog. ' * 3, 'chosen': 'Paris ' * 10,
             'rejected': 'London ' * 10}]
    path = tiny.write_jsonl(tmp_path / 'long.jsonl', long)
    left = data_lib.build_dataset(data_config(path, **{'data.max_length': 40, 'data.truncation': 'left'}), tok)
    assert left.stats['num_truncated'] == 1 and len(left) == 1
    b = data_lib.take_rows(left, [0])
    assert (b['segment_ids'][0] > 0).sum() <= 40 and {1, 2} <= set(np.unique(b['segment_ids'][0]))
    assert all(((b['segment_ids'][0] == s) & (b['loss_mask'][0] > 0)).any() for s in (1, 2))
    with pytest.raises(DataError, match='no examples left'):
        data_lib.build_dataset(data_config(path, **{'data.max_length': 40, 'data.truncation': 'drop'}), tok)


@pytest.mark.parametrize('row,field', [
    ({'prompt': 'Q?', 'chosen': 'A'}, 'rejected'),  # a missing answer
    ({'prompt': 'Q?', 'chosen': 'Same answer', 'rejected': ' Same answer'}, 'rejected'),  # identical answers
    ({'prompt': '  ', 'chosen': 'A', 'rejected': 'B'}, 'prompt'),  # an empty prompt
    ({'prompt': [], 'chosen': 'A', 'rejected': 'B'}, 'prompt'),
])
def test_bad_pairs_follow_the_bad_row_policy(tmp_path, row, field):
    tok = tiny.make_tokenizer()
    rows = [dict(PAIRS[0], rejected=f'London {i}') for i in range(30)] + [dict({'rejected': None}, **row)]
    path = tiny.write_jsonl(tmp_path / 'bad.jsonl', rows)
    with pytest.raises(DataError, match=rf"row 30: field '{field}'"):
        data_lib.build_dataset(data_config(path), tok)
    data = data_lib.build_dataset(data_config(path, **{'data.on_bad_row': 'skip', 'data.max_bad_fraction': 0.1}), tok)
    assert data.stats['num_bad'] == 1 and len(data) == 30


def test_synthetic_preference_task(tmp_path):
    paths = synthetic.write_preference_task(str(tmp_path), n_train=40, n_eval=5, seed=0)
    rows = [json.loads(line) for line in open(paths['train'])]
    assert len(rows) == 40 and all(r['chosen'] != r['rejected'] for r in rows)
    assert all(r['prompt'][0]['role'] == 'user' for r in rows)


# --- the model: log-probs, reference, train step ---------------------------------------------------------------

@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


@pytest.fixture(scope='module')
def pref_data(tmp_path_factory, llama):
    """The synthetic preference task on the tiny tokenizer: (train TokenizedData, eval TokenizedData)."""
    d = tmp_path_factory.mktemp('pref')
    paths = synthetic.write_preference_task(str(d), n_train=16, n_eval=4, seed=0)
    out = []
    for split in ('train', 'eval'):  # nothing truncated, every pair kept
        rows = [json.loads(line) for line in open(paths[split])]
        for r in rows:  # the sentence without the long instruction: ~150 tiny-tokenizer tokens a sequence
            r['prompt'][0]['content'] = r['prompt'][0]['content'].split('\n')[-1]
        cfg = data_config(tiny.write_jsonl(d / f'short_{split}.jsonl', rows), **{'data.max_length': 320})
        out.append(data_lib.build_dataset(cfg, llama.tokenizer))
        assert out[-1].stats['num_truncated'] == 0 and len(out[-1]) == (16 if split == 'train' else 4)
    return out


def make_config(method='lora', loss='dpo', lr=1e-2, **over):
    c = default_config()
    c.model.path = 'unused'
    c.data.path, c.data.format = 'unused', 'preference'
    c.peft.method = method
    c.align.loss = loss
    c.optim.learning_rate = lr
    c.optim.schedule = 'constant'
    c.train.loss_chunk = 128
    c = override(c, over)
    validate(c)
    return c


def build(pre, c, rng=0):
    pre, mask = peft.prepare(pre, c, jax.random.key(rng))
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(c, trainable, c.train.steps)
    state = jax.jit(lambda p: state_lib.create_state(p, mask, tx, c.model.frozen_dtype))(pre.params)
    return pre, state, jax.jit(make_train_step(pre.model, c, tx, schedule))


def test_answer_logps_equal_transformers(llama, pref_data, tiny_llama_dir):
    torch = pytest.importorskip('torch')
    import transformers
    train, _ = pref_data
    batch = data_lib.take_rows(train, np.arange(4))
    logps, counts = jax.jit(lambda p, b: preference.answer_logps(llama.model, p, b, None, 64))(llama.params, batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    want = np.zeros((4, 2))
    for i in range(4):
        for s in (1, 2):
            m = batch['segment_ids'][i] == s
            ids = np.concatenate([batch['input_ids'][i][m], batch['target_ids'][i][m][-1:]])  # the whole sequence
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor(ids[None].astype(np.int64))).logits[0].float(), -1)
            tok_lp = lp[:-1].gather(-1, torch.tensor(ids[1:, None].astype(np.int64)))[:, 0].numpy()
            want[i, s - 1] = (tok_lp * batch['loss_mask'][i][m]).sum()
            assert counts[i, s - 1] == batch['loss_mask'][i][m].sum()
    diff = np.abs(np.asarray(logps) - want).max()
    print(f'summed answer log-probs vs transformers float32: max |diff| {diff:.2e} (|sums| up to '
          f'{np.abs(want).max():.1f})')
    assert diff < 1e-6 * np.abs(want).max() + 1e-5  # float32 rounding of sums of ~300 log-probs


@pytest.mark.parametrize('method', ['lora', pytest.param('dora', marks=pytest.mark.slow)])
def test_adapters_off_reference_is_the_untouched_base(llama, pref_data, method):
    train, _ = pref_data
    batch = data_lib.take_rows(train, np.arange(4))
    c = make_config(method, **{'train.batch_size': 4})
    pre, state, step = build(llama, c)
    s = preference.settings(c)
    assert s.reference == 'adapters_off'
    ref = jax.jit(lambda f, b: preference.reference_logps(pre.model, s, f, b, 128))(state.frozen, batch)
    base = jax.jit(lambda p, b: preference.answer_logps(build_model(llama.config), p, b, None, 128)[0])(
        llama.params, batch)
    print(f'{method}: adapters-off reference vs untouched base: max |diff| {np.abs(ref - base).max():.1e}')
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(base))
    _, m = step(state, batch, jax.random.key(0))
    print(f"{method} step 0: loss {float(m['loss']):.7f} (log 2 = {LOG2:.7f}), rewards {float(m['rewards/chosen']):.1e}"
          f" / {float(m['rewards/rejected']):.1e}")
    # LoRA: B = 0 adds an exact zero. DoRA: m / ||W|| is 1 up to float32 rounding (summed log-probs ~300 move ~1e-6)
    tol = 0.0 if method == 'lora' else 1e-5
    assert abs(float(m['loss']) - LOG2) <= max(tol, 1e-7)
    assert abs(float(m['rewards/chosen'])) <= tol and abs(float(m['rewards/rejected'])) <= tol
    assert float(m['rewards/accuracy']) <= 0.5 and m['num_tokens'] == 4


def test_adapters_off_refuses_trained_base_leaves(llama, pref_data):
    c = make_config('lora', **{'peft.norms': True})
    _, state, step = build(llama, c)
    with pytest.raises(ConfigError, match='precomputed'):
        step(state, data_lib.take_rows(pref_data[0], np.arange(2)), jax.random.key(0))
    with pytest.raises(ConfigError, match='align.reference=precomputed'):
        preference.settings(make_config('full', **{'align.reference': 'adapters_off'}))


MODES = {'full': ('full', {}, 1e-3), 'partial': ('partial', {'peft.last_n_blocks': 1}, 1e-2),
         'lora': ('lora', {}, 1e-2), 'dora': ('dora', {}, 1e-2)}


@pytest.mark.parametrize('mode', [m if m == 'lora' else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_dpo_in_every_mode(llama, pref_data, mode):
    """DPO through the one step in each fine-tuning mode: full / partial with the precomputed reference (step 0:
    log 2), LoRA / DoRA with adapters off; the loss falls and the reward accuracy rises on a repeated batch."""
    method, over, lr = MODES[mode]
    c = make_config(method, 'dpo', lr, **over, **{'train.batch_size': 4, 'align.beta': 0.5})
    pre, state, step = build(llama, c)
    train, _ = pref_data
    if preference.settings(c).reference == 'precomputed':
        reference.attach_reference(pre.model, pre.params, train, batch_size=4, chunk_tokens=128)
    try:
        batch = data_lib.take_rows(train, np.arange(4))
        curve = []
        for i in range(8):
            state, m = step(state, batch, jax.random.key(i))
            curve.append((float(m['loss']), float(m['rewards/accuracy']), float(m['rewards/margin'])))
    finally:
        train.ref_logps = None
    print(f'{mode}: DPO loss {curve[0][0]:.4f} -> {curve[-1][0]:.4f}, reward accuracy {curve[-1][1]:.2f}, '
          f'margin {curve[-1][2]:.3f}')
    assert curve[0][0] == pytest.approx(LOG2, abs=1e-5)
    assert all(np.isfinite(x) for row in curve for x in row)
    assert curve[-1][0] < curve[0][0] - 0.01 and curve[-1][1] > 0.5 and curve[-1][2] > 0


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['ipo', 'simpo', 'orpo'])
def test_other_losses_train_with_lora(llama, pref_data, loss):
    c = make_config('lora', loss, 1e-2, **{'train.batch_size': 4, 'align.beta': 2.0 if loss == 'simpo' else 0.5})
    _, state, step = build(llama, c)
    batch = data_lib.take_rows(pref_data[0], np.arange(4))
    curve = []
    for i in range(8):
        state, m = step(state, batch, jax.random.key(i))
        curve.append(float(m['loss']))
    print(f'{loss}: loss {curve[0]:.4f} -> {curve[-1]:.4f}, reward margin {float(m["rewards/margin"]):.3f}')
    assert all(np.isfinite(curve)) and curve[-1] < curve[0]
    if loss == 'orpo':  # loss = NLL per chosen token - lambda mean log s(log odds ratio)
        assert 0 < float(m['nll']) < float(m['loss'])


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['dpo', 'orpo'])
def test_grad_accumulation_is_exact(llama, pref_data, loss):
    """Uneven answer lengths across micro-batches: the step's normalisers come from the whole batch."""
    batch = data_lib.take_rows(pref_data[0], np.arange(4))
    after = {}
    for k in (1, 2):
        c = make_config('lora', loss, 1.0, **{'optim.name': 'sgd', 'optim.momentum': 0.0, 'optim.grad_accum': k,
                                              'train.batch_size': 4, 'optim.clip_norm': 0.0})
        _, state, step = build(llama, c)
        state, m = step(state, batch, jax.random.key(0))
        after[k] = (jax.device_get(state.trainable), jax.device_get(m))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after[1][0]), jax.tree.leaves(after[2][0])))
    print(f'{loss}: grad_accum=2 vs one batch: max |param diff| {diff:.1e}')
    assert diff < 1e-6
    for name in ('loss', 'rewards/margin', 'logps/chosen', 'grad_norm'):
        assert after[2][1][name] == pytest.approx(after[1][1][name], rel=1e-5, abs=1e-6), name


def test_eval_step_sums(llama, pref_data):
    _, eval_data = pref_data
    c = make_config('lora', 'dpo')
    pre, state, _ = build(llama, c)
    batches = list(evaluate.eval_batches(eval_data, 3))
    eval_step = jax.jit(make_eval_step(pre.model, c))
    sums = {}
    for b in batches:
        for k, v in jax.device_get(eval_step(state.params(), b)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    assert sums['count'] == len(eval_data)  # the padded rows of the short last batch count for nothing
    assert sums['loss_sum'] / sums['count'] == pytest.approx(LOG2, abs=1e-6)
    assert sums['rewards/margin_sum'] == pytest.approx(0.0, abs=1e-6)


def test_reference_resolution():
    s = lambda method, **over: preference.settings(make_config(method, **over)).reference  # noqa: E731
    assert s('lora') == s('dora') == 'adapters_off' and s('full') == s('partial') == 'precomputed'
    assert s('lora', **{'model.adapter': '/sft_adapter'}) == 'precomputed'  # the SFT model is the reference
    assert s('lora', **{'model.adapter': '/sft_adapter', 'model.adapter_merge': True}) == 'adapters_off'  # merged
    assert s('full', **{'model.adapter': '/sft_adapter', 'model.adapter_merge': True}) == 'precomputed'
    assert s('lora', **{'align.loss': 'simpo'}) == s('full', **{'align.loss': 'orpo'}) == 'none'
    with pytest.raises(ConfigError, match="config.align.loss='kto' is not one of"):
        make_config('lora', 'kto')
