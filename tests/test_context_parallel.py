"""Context parallelism (`mesh.context`, ftjax/models/context.py) on the 8 fake CPU devices: a tiny Llama and a tiny
Gemma 3 (sliding-window and global layers, q/k norms) over packed rows of 2k tokens, split over 2 or 4 context
shards (with fsdp and tensor too), give the loss and the gradients of one device, for both strategies
(all_gather, ring), with and without the zig-zag load balancing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import sharding
from ftjax.config_schema import DEFAULT_RULES
from ftjax.errors import ConfigError
from ftjax.models import context, kernels, llama
from ftjax.infer import Sampler
from ftjax.models.loading import abstract_variables, load_pretrained

SEQ = 2048
FAMILIES = {
    'llama': dict(),
    'gemma3': dict(norm_offset=1.0, post_norms=True, embed_scale=True, activation='gelu_tanh', qk_norm=True,
                   sliding_window=300, layer_types=('sliding_attention', 'full_attention'), rope_local_theta=1e4,
                   rope_theta=1e6, query_scale=0.25, model_type='gemma3_text'),
}


def _model(family, **runtime):
    cfg = llama.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, **FAMILIES[family], **runtime)
    return llama.Llama(cfg)


def _batch(seed=0):
    """Two packed rows: segments of 700, 900 and 400 tokens then 48 of padding; one whole row. Positions restart
    at every segment."""
    r = np.random.RandomState(seed)
    ids = r.randint(0, 96, (2, SEQ)).astype(np.int32)
    lengths = [700, 900, 400]
    seg0 = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(SEQ - sum(lengths))])
    pos0 = np.concatenate([np.arange(n) for n in lengths] + [np.arange(SEQ - sum(lengths))])
    seg = np.stack([seg0, np.ones(SEQ)]).astype(np.int32)
    pos = np.stack([pos0, np.arange(SEQ)]).astype(np.int32)
    return ids, pos, seg


def _loss_fn(model, batch):
    ids, pos, seg = batch
    w = jnp.asarray(np.random.RandomState(3).randn(2, SEQ, 96), jnp.float32) / 96

    def loss(p):
        logits = model.apply({'params': p}, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(logits * w)  # a fixed cotangent on every logit
    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope='module')
def reference():
    """family -> (params, one device's (loss, gradients)), computed when a worker first needs that family."""
    out = {}

    def get(family):
        if family not in out:
            model = _model(family)
            params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params'])
            out[family] = params, _loss_fn(model, _batch())(params)
        return out[family]
    return get


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [  # (family, strategy, load balance, mesh sizes)
    ('llama', 'all_gather', True, dict(data=1, fsdp=1, tensor=1, context=2)),
    ('gemma3', 'ring', True, dict(data=1, fsdp=2, tensor=1, context=4)),
    pytest.param('llama', 'ring', True, dict(data=2, fsdp=1, tensor=1, context=4), marks=pytest.mark.slow),
    pytest.param('llama', 'all_gather', False, dict(data=1, fsdp=2, tensor=2, context=2), marks=pytest.mark.slow),
    pytest.param('gemma3', 'all_gather', True, dict(data=2, fsdp=1, tensor=1, context=4), marks=pytest.mark.slow),
    pytest.param('gemma3', 'ring', False, dict(data=1, fsdp=2, tensor=1, context=2), marks=pytest.mark.slow),
]


@pytest.mark.parametrize('family,strategy,balance,sizes', CASES)
def test_context_parallel_equals_one_device(reference, family, strategy, balance, sizes):
    params, (want_l, want_g) = reference(family)
    model = _model(family, context_parallel=strategy, context_load_balance=balance)
    n = int(np.prod(list(sizes.values())))
    mesh = sharding.make_mesh(sizes, jax.devices()[:n])
    rules = sharding.rules_from_config([list(r) for r in DEFAULT_RULES])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert context.size() == sizes['context']
        shards = sharding.param_shardings(sharding.logical_specs(abstract_variables(model)), mesh, rules)
        placed = sharding.place(params, shards)
        got_l, got_g = _loss_fn(model, _batch())(placed)
        text = _loss_fn(model, _batch()).lower(placed).as_text()
    kind = 'collective_permute' if strategy == 'ring' else 'all_gather'
    assert kind in text.replace('-', '_'), f'no {kind} in the lowered step'
    emb = placed['embed']['embedding'].sharding.spec
    assert 'context' in str(emb), emb  # the weights are sharded over the context axis too
    assert _rel(got_l, want_l) < 1e-5, (float(got_l), float(want_l))
    worst = max(_rel(a, b) for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
    assert worst < 1e-5, worst


def test_zigzag_order_balances_the_causal_work():
    order = context.zigzag_order(16, 2)
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    work = [sum(int(i) + 1 for i in half) for half in np.split(context.zigzag_order(4096, 4), 4)]  # keys seen
    assert max(work) == min(work)
    with pytest.raises(ConfigError, match=r'multiple of 2 x mesh.context = 8, got 100'):
        context.zigzag_order(100, 4)


@pytest.mark.parametrize('sizes', [dict(data=1, fsdp=1, tensor=1, context=4),
                                   dict(data=1, fsdp=2, tensor=1, context=2)])
def test_decoding_under_a_context_mesh_is_unchanged(tiny_llama_dir, sizes):
    """The engine on a mesh with a context axis (weights sharded over it too; decode itself runs whole rows):
    greedy tokens equal one device's, their log-probs to 1e-5, for prompts of different lengths."""
    pre = load_pretrained(tiny_llama_dir)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    one = Sampler(pre, batch_size=4).sample(prompts, 12, logprobs=True)
    mesh = sharding.make_mesh(dict(sizes, expert=1), jax.devices()[:int(np.prod(list(sizes.values())))])
    got = Sampler(pre, batch_size=4, mesh=mesh).sample(prompts, 12, logprobs=True)
    assert got.tokens == one.tokens
    for a, b in zip(got.logprobs, one.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('balanced,window,sizes', [
    (True, None, dict(data=1, fsdp=1, tensor=1, context=4)),
    (False, 200, dict(data=1, fsdp=2, tensor=2, context=2)),
    (True, 'mixed', dict(data=2, fsdp=1, tensor=1, context=2)),
])
def test_splash_under_a_context_mesh_matches_the_plain_attention(balanced, window, sizes, monkeypatch):
    """kernels=splash (the kernel in Pallas's interpreter) with the sequence over 'context': each shard's part
    of one row-wide mask, the keys gathered and put back in row order; forward and gradients as the einsum
    attention on one device, packed segments, zig-zag or not, a sliding window (fixed or a traced flag)."""
    b, t, h, kvh, d = 2, 512, 4, 2, 32
    r = np.random.RandomState(5)
    q, k, v = (jnp.asarray(r.randn(b, t, n, d), jnp.float32) for n in (h, kvh, kvh))
    seg = jnp.asarray(np.stack([np.concatenate([np.full(300, 1), np.full(150, 2), np.zeros(62)]), np.ones(t)]),
                      jnp.int32)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    w = jnp.asarray(r.randn(b, t, h, d), jnp.float32)  # a fixed cotangent
    c = sizes['context']
    perm = context.zigzag_order(t, c) if balanced else np.arange(t)
    width, local = (50, jnp.asarray(True)) if window == 'mixed' else (window, None)

    def plain(q, k, v):
        return jnp.sum(kernels.chunked_attention(q, k, v, index, seg, index, seg, width, local) * w)

    def split(q, k, v):  # the tokens in the shards' order, as the model deals them out
        o = context.attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], index[:, perm], 'all_gather',
                              width, local=local, kernel='splash', balanced=balanced, interpret=True)
        return jnp.sum(o * w[:, perm])
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
    built, make = [], context._splash_kernel
    monkeypatch.setattr(context, '_splash_kernel', lambda *a: built.append(a) or make(*a))
    mesh = sharding.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2))).lower(q, k, v).as_text()
        got = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    assert 'all-gather' in hlo or 'all_gather' in hlo
    assert built and all(a[2] == c and a[3] == balanced for a in built)  # the splash path ran
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for a, e, name in zip(got[1], want[1], 'qkv'):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4, err_msg=f'd{name}')
