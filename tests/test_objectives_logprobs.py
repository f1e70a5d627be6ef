"""`ftjax.objectives.logprobs`: token log-probs chunked over the vocabulary, and the LM cross-entropy's fast path
(its hand-written gradient), equal a full [batch, seq, vocab] log-softmax in value and gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import lm_head_kernel, load_pretrained
from ftjax.objectives import logprobs


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


def lm_batch(vocab, b=2, t=16, seed=0):
    ids = np.random.RandomState(seed).randint(4, vocab, (b, t + 1)).astype(np.int32)
    return {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((b, t), np.float32)}


def full_log_softmax(h, head, y, softcap=None):
    """log p(y) [batch, seq] from the whole [batch, seq, vocab] logits at once."""
    logits = jnp.einsum('bte,ev->btv', h, head)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize('softcap', [None, 3.0])
def test_token_logps_and_cross_entropy_equal_the_full_log_softmax(softcap):
    """Chunks of 1 and 3 (padded) positions, and of all 11 (12 tokens per device on 4 batch shards): the same
    log-probs; the fast path's summed loss, token accuracy and gradients equal those of the plain log-probs."""
    r = np.random.RandomState(1)
    h = jnp.asarray(r.randn(4, 11, 8), jnp.float32)  # [batch, seq, embed]
    head = jnp.asarray(r.randn(8, 37), jnp.float32)  # [embed, vocab]
    y = jnp.asarray(r.randint(0, 37, (4, 11)), jnp.int32)
    w = jnp.asarray(r.rand(4, 11) > 0.3, jnp.float32)
    want = full_log_softmax(h, head, y, softcap)
    logits = jnp.einsum('bte,ev->btv', h, head)
    logits = logits if softcap is None else jnp.tanh(logits / softcap) * softcap
    top = jnp.take_along_axis(logits, y[..., None], -1)[..., 0] >= logits.max(-1)  # a correct token (ties count)
    want_grad = jax.grad(lambda h, head: -jnp.sum(w * full_log_softmax(h, head, y, softcap)), (0, 1))(h, head)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def computed(h, head, chunk, shards):
        plain = lambda h, head: -jnp.sum(w * logprobs.token_logps(h, head, y, chunk, shards, softcap))  # noqa: E731
        fast = lambda h, head: logprobs.cross_entropy(h, head, y, w, chunk, batch_shards=shards,  # noqa: E731
                                                      softcap=softcap)
        return (logprobs.token_logps(h, head, y, chunk, shards, softcap), fast(h, head), plain(h, head),
                jax.grad(lambda *a: fast(*a)[0], (0, 1))(h, head), jax.grad(plain, (0, 1))(h, head))

    for chunk, shards, positions in ((4, 1, 1), (12, 1, 3), (12, 4, 11)):
        assert logprobs.chunk_positions(4, 11, chunk, shards) == positions
        got, (loss, correct, count), plain_loss, fast_grad, plain_grad = computed(h, head, chunk, shards)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
        assert float(count) == float(w.sum()) and float(correct) == float(jnp.sum(w * top))
        for a, b, c in zip(fast_grad, plain_grad, want_grad):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chunked_lm_loss_equals_full_vocab_softmax(llama):
    pre = llama
    b, t = 2, 13
    batch = lm_batch(pre.config.vocab_size, b, t, seed=2)
    batch['loss_mask'][1, 9:] = 0.0
    params = jax.tree.map(jnp.asarray, pre.params)
    ids, targets, mask = batch['input_ids'], batch['target_ids'], batch['loss_mask']

    @jax.jit
    def full(params):
        logits = pre.model.apply({'params': params}, ids)  # [batch, seq, vocab]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * mask), logits

    @functools.partial(jax.jit, static_argnums=1)
    def chunked(params, chunk):
        def f(p):
            hidden = pre.model.apply({'params': p}, ids, return_hidden=True)  # [batch, seq, embed]
            loss, correct, count = logprobs.cross_entropy(hidden, lm_head_kernel(p, pre.config), targets, mask,
                                                          chunk)
            return loss, (correct, count)
        return jax.value_and_grad(f, has_aux=True)(params)

    (ref, logits), ref_grad = jax.value_and_grad(full, has_aux=True)(params)
    hits = ((np.argmax(np.asarray(logits), -1) == targets) * mask).sum()
    for chunk in (8, 512):  # 4 positions per chunk (3 padded) in a checkpointed scan; one chunk
        (loss, (correct, count)), grad = chunked(params, chunk)
        assert float(count) == mask.sum() and float(correct) == hits
        assert abs(float(loss) - float(ref)) < 1e-5 * abs(float(ref))
        gdiff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
        assert gdiff < 1e-5
