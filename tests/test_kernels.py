"""`ftjax.models.kernels`: every kernel choice computes the reference function, forward and gradients.

The reference is the plain einsum attention (K/V repeated for GQA, float32 scores, autodiff) and plain
`x @ w`. Splash attention runs in Pallas's interpreter on the CPU; cuDNN cannot run here, so its exact
call (`kernels.dot_product_attention`) is checked with implementation='xla', and the 'cudnn' choice must
fall back to it on a machine without cuDNN.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import optim, peft, sharding
from ftjax import state as state_lib
from ftjax.config import default_config
from ftjax.errors import ConfigError
from ftjax.models import kernels, llama, load_pretrained
from ftjax.objectives import logprobs
from ftjax.train_step import make_train_step

chunked = kernels.chunked_attention  # the function itself (a test wraps the module's name)

B, T, H, KVH, D = 2, 128, 4, 2, 32


def reference_attention(q, k, v, mask, scale=None, softcap=None):
    """q [b, t, h, d], k/v [b, s, kvh, d], mask [b, t, s] bool -> [b, t, h, d]; scores * scale (default
    1 / sqrt(d)), soft-capped as transformers' Gemma 2 (tanh(s / c) * c) before the mask."""
    g = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [b, s, h, d]
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = jnp.einsum('bthd,bshd->bhts', q, kr, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(scores, axis=-1).astype(v.dtype), vr)


def _qkv(seed=0, t=T):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, t, H, D), jnp.float32)
    k = jnp.asarray(r.randn(B, t, KVH, D), jnp.float32)
    v = jnp.asarray(r.randn(B, t, KVH, D), jnp.float32)
    # row 0: three packed segments and trailing padding (0); row 1: one segment
    seg0 = np.concatenate([np.full(50, 1), np.full(40, 2), np.full(30, 3), np.zeros(t - 120)])
    seg = jnp.asarray(np.stack([seg0, np.ones(t)]), jnp.int32)
    return q, k, v, seg


def _loss_and_grads(attn, q, k, v):
    w = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)  # a fixed cotangent
    return jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, tol):
    (lg, gg), (lw, gw) = got, want
    np.testing.assert_allclose(lg, lw, rtol=tol, atol=tol)
    for a, b, name in zip(gg, gw, 'qkv'):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f'd{name}')


@pytest.mark.parametrize('window', [None, 16])
@pytest.mark.parametrize('kind', ['cpu', 'xla', 'cudnn', 'splash'])
def test_self_attention_matches_the_reference(kind, window):
    q, k, v, seg = _qkv()
    mask = kernels.causal_mask(seg, window=window)
    want = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
    # 'splash' runs the real kernel in Pallas's interpreter; 'cudnn' falls back to XLA without a GPU
    attn = functools.partial(kernels.self_attention, segment_ids=seg, kernels=kind, window=window,
                             interpret=kind == 'splash')
    _assert_close(_loss_and_grads(attn, q, k, v), want, 2e-4)


@pytest.mark.parametrize('kind', ['cpu', 'xla', 'cudnn', 'splash'])
def test_scale_and_softcap_match_the_reference(kind):
    """Gemma's score scale (query_pre_attn_scalar ** -0.5) and Gemma 2's soft-capping, with a window, every
    kernel choice; the cap (2.0) is well inside the score range, so an uncapped kernel fails by far."""
    q, k, v, seg = _qkv(5)
    mask = kernels.causal_mask(seg, window=16)
    want = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, 0.3, 2.0), q, k, v)
    uncapped = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, 0.3), q, k, v)
    assert np.abs(want[0] - uncapped[0]) > 1e-2
    attn = functools.partial(kernels.self_attention, segment_ids=seg, kernels=kind, window=16, scale=0.3, softcap=2.0,
                             interpret=kind == 'splash')
    _assert_close(_loss_and_grads(attn, q, k, v), want, 2e-4)


def test_xla_kernels_soft_cap_with_the_einsum_attention(caplog):
    """XLA's / cuDNN's fused attention cannot soft-cap: those choices run `attend` and say so once."""
    q, k, v, seg = _qkv(6)
    kernels._LOGGED.clear()
    with caplog.at_level('INFO'):
        got = kernels.self_attention(q, k, v, seg, 'xla', softcap=3.0)
        kernels.self_attention(q, k, v, seg, 'xla', softcap=3.0)
    np.testing.assert_array_equal(got, kernels.attend(q, k, v, kernels.causal_mask(seg), q.dtype, None, 3.0))
    assert sum('cannot soft-cap' in r.message for r in caplog.records) == 1


@pytest.mark.parametrize('window,scale,softcap', [(None, None, None), (16, 0.3, 2.0)], ids=['causal', 'gemma'])
def test_chunked_attention_matches_the_reference(window, scale, softcap):
    """Query chunks (48 rows: not a divisor of the sequence, the last chunk padded) with packed segments, a
    window, the score scale and soft-capping: the values and gradients of the whole-sequence reference."""
    q, k, v, seg = _qkv(8)
    mask = kernels.causal_mask(seg, window=window)
    want = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, scale, softcap), q, k, v)
    assert T % 48
    index = jnp.broadcast_to(jnp.arange(T), seg.shape)
    attn = jax.jit(lambda q, k, v: kernels.chunked_attention(q, k, v, index, seg, index, seg, window, scale=scale,
                                                             softcap=softcap, chunk=48))
    _assert_close(_loss_and_grads(attn, q, k, v), want, 2e-4)


@pytest.mark.parametrize('kind', ['cpu', 'xla', 'splash'])
def test_per_layer_window_flag(kind):
    """`local` (a traced flag inside the layer scan) picks the windowed or the full attention, gradients too."""
    q, k, v, seg = _qkv(7)
    for flag, window in ((True, 5), (False, None)):
        mask = kernels.causal_mask(seg, window=window)
        want = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
        attn = jax.jit(lambda q, k, v, f: kernels.self_attention(q, k, v, seg, kind, 5, local=f,
                                                                 interpret=kind == 'splash'))
        _assert_close(_loss_and_grads(lambda q, k, v: attn(q, k, v, jnp.asarray(flag)), q, k, v), want, 2e-4)


def test_decoding_mask_window():
    """With a cache, the window counts cache slots: slot s sees slots s - w + 1 .. s that are valid."""
    valid = jnp.asarray([[False, True, True, True, True, True, True, True]])
    m = np.asarray(kernels.causal_mask(None, jnp.asarray([[5, 6]]), 8, valid, window=3))[0]
    assert m[0].tolist() == [False, False, False, True, True, True, False, False]
    assert m[1].tolist() == [False, False, False, False, True, True, True, False]


@pytest.mark.parametrize('rows', [1, 3])
def test_decoding_attention_matches_the_reference(rows, monkeypatch):
    """Attention from a KV cache ([batch, kv_heads, kv_len, head_dim]), one new query per row, a row's filled
    slots only: the CPU kernels (one row: the batched dot; more: `_narrow_attention`) equal the reference."""
    r = np.random.RandomState(rows)
    s = 40
    q = jnp.asarray(r.randn(rows, 1, H, D), jnp.float32)
    kt, vt = (jnp.asarray(r.randn(rows, KVH, s, D), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(s)[None] >= np.arange(rows)[:, None] * 5)  # left padding of 0, 5, 10 slots
    mask = kernels.causal_mask(None, jnp.full((rows, 1), 30), s, valid)  # [rows, 1, kv_len]
    want = reference_attention(q, kt.transpose(0, 2, 1, 3), vt.transpose(0, 2, 1, 3), mask)
    used = []
    for name in ('_narrow_attention', '_attention'):
        monkeypatch.setattr(kernels, name, lambda *a, f=getattr(kernels, name), n=name: used.append(n) or f(*a))
    got = kernels.attend_heads_major(q, kt, vt, mask, jnp.float32, kernels='cpu')
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert used == ['_attention' if rows == 1 else '_narrow_attention']


def test_the_cudnn_call_with_the_xla_implementation():
    """The arguments `self_attention` gives cuDNN (mask, is_causal, window), run by XLA's implementation."""
    q, k, v, seg = _qkv(1)
    for window in (None, 8):
        mask = kernels.causal_mask(seg, window=window)
        want = _loss_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
        got = _loss_and_grads(lambda q, k, v: kernels.dot_product_attention(q, k, v, seg, 'xla', window), q, k, v)
        _assert_close(got, want, 2e-4)


def test_splash_mask_is_the_causal_window_mask():
    seg = jnp.ones((1, 64), jnp.int32)
    for window in (None, 1, 5, 64):
        splash = np.asarray(kernels.splash_mask(64, 2, window)[:, :, :])  # [heads, q, kv]
        want = np.asarray(kernels.causal_mask(seg, window=window)[0])
        assert splash.shape == (2, 64, 64) and (splash == want[None]).all(), window


def test_splash_under_a_mesh_shards_rows_and_heads():
    """With a mesh set, splash runs per device under shard_map (rows over data x fsdp, heads over tensor)."""
    q, k, v, seg = _qkv(2)
    mesh = sharding.make_mesh({'data': 2, 'tensor': 2}, jax.devices()[:4])
    mask = kernels.causal_mask(seg)
    want = reference_attention(q, k, v, mask)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v, s: kernels.self_attention(q, k, v, s, 'splash', interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('kind', ['cpu', 'xla'])
def test_matmul_matches_plain_dot(kind):
    r = np.random.RandomState(3)
    x = jnp.asarray(r.randn(2, 8, 24), jnp.float32)
    w = jnp.asarray(r.randn(24, 40), jnp.float32)
    g = jnp.asarray(r.randn(2, 8, 40), jnp.float32)
    f = lambda mm: jax.value_and_grad(lambda x, w: jnp.sum(mm(x, w) * g), argnums=(0, 1))(x, w)
    (l1, (dx1, dw1)), (l2, (dx2, dw2)) = f(lambda x, w: kernels.matmul(x, w, kind)), f(jnp.matmul)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-5)


def test_resolve():
    assert kernels.resolve('auto', 'cpu') == 'cpu'
    assert kernels.resolve('auto', 'tpu') == 'splash'
    assert kernels.resolve('auto', 'gpu') == 'cudnn'
    assert kernels.resolve('xla', 'tpu') == 'xla'
    assert kernels.resolve('cudnn', 'gpu') == 'cudnn' and kernels.resolve('splash', 'tpu') == 'splash'
    with pytest.raises(ConfigError, match='model.kernels'):
        kernels.resolve('flash', 'cpu')


@pytest.mark.parametrize('choice, platform, runs_on', [('splash', 'cpu', 'TPU'), ('splash', 'gpu', 'TPU'),
                                                       ('cudnn', 'cpu', 'GPU'), ('cudnn', 'tpu', 'GPU')])
def test_a_kernel_the_platform_cannot_run_is_one_line_naming_what_runs(choice, platform, runs_on):
    """Splash is a TPU kernel and cuDNN an NVIDIA one: asked for elsewhere, the key, the platform and the choices
    that run there (never a lowering traceback from inside the step)."""
    with pytest.raises(ConfigError) as e:
        kernels.resolve(choice, platform)
    msg = str(e.value)
    assert '\n' not in msg and f'config.model.kernels={choice!r}' in msg and runs_on in msg, msg
    assert f"platform is {platform!r}" in msg and str(kernels.runnable(platform)) in msg, msg
    assert choice not in kernels.runnable(platform) and 'auto' in kernels.runnable(platform)


FAMILY_FIELDS = {  # Gemma 2- / Gemma 3-like (mixed local / global layers in one scan) and Phi-3-like decoders
    'gemma2': dict(norm_offset=1.0, post_norms=True, embed_scale=True, activation='gelu_tanh', sliding_window=6,
                   layer_types=('sliding_attention', 'full_attention'), attn_softcap=1.5, final_softcap=5.0,
                   query_scale=0.2, model_type='gemma2'),
    'gemma3': dict(norm_offset=1.0, post_norms=True, embed_scale=True, activation='gelu_tanh', qk_norm=True,
                   sliding_window=6, layer_types=('sliding_attention', 'full_attention'), rope_local_theta=100.0,
                   rope_scaling=(('factor', 4.0), ('rope_type', 'linear')), model_type='gemma3_text'),
    'phi3': dict(fused_qkv=True, fused_gate_up=True, sliding_window=6, model_type='phi3'),
}


@pytest.mark.parametrize('family', ['llama', pytest.param('gemma2', marks=pytest.mark.slow), pytest.param('gemma3', marks=pytest.mark.slow),
                                    pytest.param('phi3', marks=pytest.mark.slow)])
def test_llama_kernels_compute_the_same_model(family):
    """The whole decoder (packed rows, GQA) with each kernel choice: same logits, same gradients."""
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, **FAMILY_FIELDS.get(family, {}))
    ids = jnp.asarray(np.random.RandomState(4).randint(0, 64, (2, 32)), jnp.int32)
    seg = jnp.asarray([[1] * 12 + [2] * 16 + [0] * 4, [1] * 32], jnp.int32)  # packed + padding; one row
    params = jax.jit(llama.Llama(cfg).init)(jax.random.key(0), ids)['params']  # jitted: eagerly, every op compiles

    def run(kind):
        model = llama.Llama(llama.LlamaConfig(**{**cfg.__dict__, 'kernels': kind}))
        loss = lambda p: jnp.sum(model.apply({'params': p}, ids, None, seg) ** 2) / ids.size
        return jax.jit(jax.value_and_grad(loss))(params)

    want_l, want_g = run('cpu')
    for kind in ('xla', 'cudnn'):  # 'cudnn' without a GPU: the XLA fallback; splash: test_tpu_compile.py
        l, g = run(kind)
        np.testing.assert_allclose(l, want_l, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('family', ['llama', 'gemma3'])
def test_long_rows_take_the_chunked_attention(family, monkeypatch):
    """Past `kernels.Q_CHUNK` tokens the CPU decoder builds no [seq, seq] mask and attends in query chunks
    (Gemma 3: global and sliding-window layers): the logits and gradients of the whole-sequence path."""
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, **FAMILY_FIELDS.get(family, {}))
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 64, (2, 40)), jnp.int32)
    seg = jnp.asarray([[1] * 15 + [2] * 21 + [0] * 4, [1] * 40], jnp.int32)
    model = llama.Llama(cfg)
    params = jax.jit(model.init)(jax.random.key(0), ids)['params']
    loss = lambda p: jnp.sum(model.apply({'params': p}, ids, None, seg) ** 2) / ids.size
    want_l, want_g = jax.jit(jax.value_and_grad(loss))(params)
    calls = []
    monkeypatch.setattr(kernels, 'Q_CHUNK', 16)  # 40 tokens: chunks of 16, 16 and 8 (+ 8 padded rows)
    monkeypatch.setattr(kernels, 'chunked_attention', lambda *a, **kw: calls.append(1) or chunked(*a, **kw))
    got_l, got_g = jax.jit(jax.value_and_grad(loss))(params)
    assert calls
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('barrier', [True, False])
def test_loss_chunk_counts_tokens_per_device(barrier):
    """Chunks sized per device give the same loss and gradients as one chunk per sequence."""
    assert logprobs.chunk_positions(64, 1024, 512) == 8  # the old global count: 8 tokens per row per chunk
    assert logprobs.chunk_positions(64, 1024, 512, batch_shards=64) == 512  # one row per device: 512 tokens
    r = np.random.RandomState(5)
    h = jnp.asarray(r.randn(8, 48, 16), jnp.float32)
    head = jnp.asarray(r.randn(16, 50), jnp.float32)
    y = jnp.asarray(r.randint(0, 50, (8, 48)), jnp.int32)
    m = jnp.asarray(r.rand(8, 48) > 0.3, jnp.float32)

    def run(**kw):
        f = lambda h, head: logprobs.cross_entropy(h, head, y, m, 32, **kw)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(h, head)

    (l1, g1), (l8, g8) = run(barrier=barrier), run(batch_shards=8, barrier=barrier)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_shards_reads_the_mesh():
    assert sharding.batch_shards() == 1
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices()[:8])
    seen = []
    with jax.set_mesh(mesh):
        jax.jit(lambda x: seen.append(sharding.batch_shards()) or x)(jnp.ones((8,)))
    assert seen == [4]


BF16_STEPS, BF16_TOL = 8, 0.02  # relative loss difference bfloat16 vs float32, each step


@pytest.mark.slow  # the fast lane: test_bf16_* siblings on one step
def test_bf16_steps_track_float32(tiny_llama_dir):
    """model.dtype=bfloat16 with float32 master weights for the trainable (LoRA) leaves and bfloat16 frozen
    storage: every one of 8 steps' loss is within 2% of float32's, and the loss falls as much."""
    pre = load_pretrained(tiny_llama_dir)
    r = np.random.RandomState(0)
    ids = r.randint(4, pre.config.vocab_size, (4, 33)).astype(np.int32)
    batch = {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((4, 32), np.float32),
             'segment_ids': np.repeat([[1] * 20 + [2] * 12], 4, 0).astype(np.int32),
             'positions': np.tile(np.r_[np.arange(20), np.arange(12)], (4, 1)).astype(np.int32)}
    curves = {}
    for dtype in ('float32', 'bfloat16'):
        c = default_config()
        c.peft.method, c.optim.learning_rate, c.optim.schedule = 'lora', 1e-2, 'constant'
        c.model.dtype, c.model.frozen_dtype, c.model.kernels, c.train.loss_chunk = dtype, dtype, 'xla', 32
        p, mask = peft.prepare(pre, c, jax.random.key(0))
        tx, schedule = optim.make_optimizer(c, state_lib.partition(p.params, mask)[0], c.train.steps)
        state = jax.jit(lambda x: state_lib.create_state(x, mask, tx, c.model.frozen_dtype))(p.params)
        assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype('float32')}  # master weights
        assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(dtype)}
        step = jax.jit(make_train_step(p.model, c, tx, schedule))
        curves[dtype] = []
        for i in range(BF16_STEPS):
            state, metrics = step(state, batch, jax.random.key(i))
            curves[dtype].append(float(metrics['loss']))
    f32, bf16 = np.array(curves['float32']), np.array(curves['bfloat16'])
    print('float32 ', np.round(f32, 4), '\nbfloat16', np.round(bf16, 4))
    np.testing.assert_allclose(bf16, f32, rtol=BF16_TOL)
    assert f32[-1] < f32[0] - 0.05 and abs((bf16[0] - bf16[-1]) - (f32[0] - f32[-1])) < 0.2 * (f32[0] - f32[-1])
