"""PEFT methods: LoRA/DoRA at step 0 are the base model, merge == adapter model, trainable selections, bad configs."""
import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from ftjax import peft, tree
from ftjax.config import default_config
from ftjax.models import load_pretrained
from ftjax.models import adapters
from ftjax.peft import LastLayers
from tests import tiny


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


@pytest.fixture(scope='module')
def bert_cls(tmp_path_factory):
    path = tiny.make_bert_checkpoint(str(tmp_path_factory.mktemp('bert_cls')), num_labels=2)
    return load_pretrained(path, num_labels=2)


def config(method, **peft_over):
    c = default_config()
    c.peft.method = method
    for k, v in peft_over.items():
        node = c.peft
        *parents, leaf = k.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def flat_mask(mask):
    return {'/'.join(p): m for p, m in traverse_util.flatten_dict(mask).items()}


def trains(mask):
    return {p for p, m in flat_mask(mask).items() if m is True}


def llama_inputs(cfg, seed=0):
    return (np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 11)),)


def bert_inputs(cfg, seed=0):
    ids = np.random.RandomState(seed).randint(4, cfg.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, np.zeros_like(ids)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(lambda p, *x: model.apply({'params': p}, *x))


def _outputs(pre, params, inputs):
    return np.asarray(_jitted_apply(pre.model)(params, *inputs))  # one compile per model (and input shapes)


@pytest.mark.parametrize('method', ['lora', 'dora'])
@pytest.mark.parametrize('family', ['llama', 'bert'])
def test_step0_equals_base_model(llama, bert_cls, family, method):
    base = llama if family == 'llama' else bert_cls
    inputs = (llama_inputs if family == 'llama' else bert_inputs)(base.config)
    pre, mask = peft.prepare(base, config(method, **{'lora.rslora': True}), jax.random.key(0))
    assert pre.config.lora.dora == (method == 'dora')
    adapters = {p for p in flat_mask(mask) if p.endswith(('lora_a', 'lora_b'))}
    assert adapters and adapters <= trains(mask)
    for path, leaf in traverse_util.flatten_dict(base.params).items():  # base paths and values unchanged
        assert np.array_equal(np.asarray(traverse_util.flatten_dict(pre.params)[path]), leaf)
    ours, ref = _outputs(pre, pre.params, inputs), _outputs(base, base.params, inputs)
    if method == 'lora':
        assert np.array_equal(ours, ref)  # B = 0: exactly the base model
    else:
        assert np.abs(ours - ref).max() < 1e-6  # m = ||W||: equal up to the rounding of m / ||W||


def _perturbed(params, seed):
    """Adapters as training leaves them: B and the DoRA magnitudes away from their initial values."""
    key = jax.random.key(seed)
    flat = traverse_util.flatten_dict(params)
    for i, (path, x) in enumerate(sorted(flat.items())):
        k = jax.random.fold_in(key, i)
        if path[-1] == 'lora_b':
            flat[path] = 0.2 * jax.random.normal(k, x.shape)
        elif path[-1] == 'lora_magnitude':
            flat[path] = x * (1.0 + 0.1 * jax.random.normal(k, x.shape))
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize('family,method', [  # the fast lane merges on the classifier; llama's are slow
    pytest.param('llama', 'lora', marks=pytest.mark.slow), pytest.param('llama', 'dora', marks=pytest.mark.slow),
    ('bert', 'lora'), ('bert', 'dora')])
def test_merge_gives_the_adapter_models_outputs(llama, bert_cls, family, method):
    base = llama if family == 'llama' else bert_cls
    inputs = (llama_inputs if family == 'llama' else bert_inputs)(base.config, seed=3)
    pre, _ = peft.prepare(base, config(method), jax.random.key(1))
    params = _perturbed(pre.params, seed=2)
    adapted = _outputs(pre, params, inputs)
    merged = adapters.merge(params, pre.config.lora)
    assert not any(p[-1] in adapters.LORA_LEAVES for p in traverse_util.flatten_dict(merged))
    merged_out = _outputs(base, merged, inputs)  # the plain base model runs the merged tree
    change = np.abs(merged_out - _outputs(base, base.params, inputs)).max()
    diff = np.abs(merged_out - adapted).max()
    print(f'{family} {method}: merged vs adapter max |diff| = {diff:.2e} (adapters change outputs by {change:.2e})')
    assert change > 1e-3  # the adapters matter
    assert diff < 1e-5


def test_partial_conveniences_on_llama(llama):
    n = llama.config.num_layers
    _, mask = peft.prepare(llama, config('partial', last_n_blocks=1), None)
    flat = flat_mask(mask)
    assert all(flat[p] == LastLayers(1) for p in flat if p.startswith('layers/'))
    assert flat['embed/embedding'] is False and flat['final_norm/scale'] is False
    _, mask = peft.prepare(llama, config('partial', last_n_blocks=n), None)
    assert trains(mask) == {p for p in flat if p.startswith('layers/')}  # all blocks: whole leaves
    _, mask = peft.prepare(llama, config('partial', norms=True), None)
    assert trains(mask) == {'layers/attn_norm/scale', 'layers/mlp_norm/scale', 'final_norm/scale'}
    _, mask = peft.prepare(llama, config('partial', embeddings=True, trainable=['q_proj/kernel$']), None)
    assert trains(mask) == {'embed/embedding', 'layers/q_proj/kernel'}
    _, mask = peft.prepare(llama, config('full'), None)
    assert trains(mask) == set(flat)


def test_partial_conveniences_on_a_classifier(bert_cls):
    _, mask = peft.prepare(bert_cls, config('partial'), None)  # peft.head defaults to True: a linear probe
    assert trains(mask) == {'pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias'}
    _, mask = peft.prepare(bert_cls, config('partial', biases=True, head=False), None)  # BitFit
    got = trains(mask)
    assert got == {p for p in flat_mask(mask) if p.endswith('/bias')}
    assert {'layers/q_proj/bias', 'layers/attn_norm/bias', 'embed_norm/bias', 'classifier/bias'} <= got
    _, mask = peft.prepare(bert_cls, config('partial', embeddings=True, head=False), None)
    assert trains(mask) == {'token_embed/embedding', 'position_embed/embedding', 'type_embed/embedding'}


def test_lora_combined_with_head_and_norms(bert_cls):
    pre, mask = peft.prepare(bert_cls, config('lora', norms=True, **{'lora.targets': ['(q|v)_proj$']}),
                             jax.random.key(0))
    got = trains(mask)
    assert got == {'layers/q_proj/lora_a', 'layers/q_proj/lora_b', 'layers/v_proj/lora_a', 'layers/v_proj/lora_b',
                   'pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias',
                   'layers/attn_norm/scale', 'layers/attn_norm/bias', 'layers/mlp_norm/scale',
                   'layers/mlp_norm/bias', 'embed_norm/scale', 'embed_norm/bias'}
    assert flat_mask(mask)['layers/q_proj/kernel'] is False and flat_mask(mask)['token_embed/embedding'] is False
    assert tree.count_params(pre.params) == tree.count_params(bert_cls.params) + sum(
        int(np.prod(x.shape)) for p, x in traverse_util.flatten_dict(pre.params).items() if p[-1].startswith('lora'))


def test_lora_spec_from_config(llama):
    pre, _ = peft.prepare(llama, config('dora', **{'lora.rank': 4, 'lora.alpha': 8.0, 'lora.rslora': True,
                                                   'lora.targets': ['o_proj$']}), jax.random.key(0))
    spec = pre.config.lora
    assert (spec.rank, spec.dora, spec.targets) == (4, True, ('o_proj$',)) and spec.scale == pytest.approx(4.0)
    flat = traverse_util.flatten_dict(pre.params)
    assert flat[('layers', 'o_proj', 'lora_a')].shape == (llama.config.num_layers, 64, 4)
    assert flat[('layers', 'o_proj', 'lora_magnitude')].shape == (llama.config.num_layers, 64)
    assert ('layers', 'q_proj', 'lora_a') not in flat
    assert np.all(np.asarray(flat[('layers', 'o_proj', 'lora_b')]) == 0)


def test_remat_and_compute_dtype_come_from_the_config(llama):
    c = config('full')
    c.model.remat = 'dots_saveable'
    c.model.dtype = 'bfloat16'
    pre, _ = peft.prepare(llama, c, None)
    assert pre.config.remat == 'dots_saveable' and pre.model.cfg.dtype == np.dtype('bfloat16')
    assert llama.config.remat == 'none'  # the input is not modified


@pytest.mark.parametrize('method,over,message', [
    ('lorra', {}, r"config.peft.method='lorra' is not one of"),
    ('lora', {'lora.rank': 0}, r'config.peft.lora.rank must be a positive integer, got 0'),
    ('dora', {'lora.rank': -2}, r'config.peft.lora.rank must be a positive integer, got -2'),
    ('lora', {'lora.targets': ['qq_proj$']}, r"peft.lora.targets: 'qq_proj\$' matches no kernel"),
    ('lora', {'lora.targets': []}, r'config.peft.lora.targets is empty'),
    ('lora', {'lora.dropout': 1.0}, r'config.peft.lora.dropout must be in \[0, 1\)'),
    ('partial', {}, r"config.peft.method='partial' selects no parameter"),
    ('partial', {'trainable': ['nope/kernel']}, r"config.peft.trainable: 'nope/kernel' matches no parameter"),
    ('partial', {'trainable': ['(']}, r"config.peft.trainable: '\(' is not a valid regex"),
    ('partial', {'biases': True}, r'config.peft.biases=True but this model has no bias parameters'),
    ('partial', {'last_n_blocks': 3}, r"config.peft.last_n_blocks=3 must be between 0 and the model's 2 layers"),
], ids=['unknown-method', 'rank-0', 'rank-negative', 'target-matches-nothing', 'no-targets', 'dropout',
        'empty-selection', 'regex-matches-nothing', 'bad-regex', 'bitfit-without-biases', 'too-many-blocks'])
def test_bad_config_names_the_key(llama, method, over, message):
    with pytest.raises(ValueError, match=message):
        peft.prepare(llama, config(method, **over), jax.random.key(0))


def test_loaded_adapter_must_match_the_method(llama):
    pre, _ = peft.prepare(llama, config('lora'), jax.random.key(0))
    again, mask = peft.prepare(pre, config('lora', **{'lora.rank': 4}), jax.random.key(1))
    assert again.config.lora == pre.config.lora  # keeps (and trains) the loaded adapter
    assert again.params is pre.params and 'layers/q_proj/lora_b' in trains(mask)
    with pytest.raises(ValueError, match=r"config.peft.method='dora', but the loaded adapter .* is LoRA"):
        peft.prepare(pre, config('dora'), jax.random.key(0))


def test_count_params(llama):
    cfg = llama.config
    n = tree.count_params(llama.params)
    per_layer = (cfg.hidden_size * cfg.num_heads * cfg.head_dim * 2 + cfg.hidden_size * cfg.num_kv_heads
                 * cfg.head_dim * 2 + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size)
    assert n == cfg.vocab_size * cfg.hidden_size + cfg.num_layers * per_layer + cfg.hidden_size
    assert tree.count_params({'a': np.zeros((2, 3)), 'b': {'c': np.zeros(4)}}) == 10


def test_prepare_does_not_touch_its_input(llama):
    before = dataclasses.replace(llama)
    peft.prepare(llama, config('dora'), jax.random.key(0))
    assert llama.config.lora is None and llama.params is before.params and llama.model is before.model
