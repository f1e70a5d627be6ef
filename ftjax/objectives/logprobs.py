"""Token log-probabilities over the vocabulary, in chunks of the sequence: the one place where final hidden
states meet the LM head, for the LM loss, the preference losses, RL and the inference engine's log-prob tests.

No [batch, seq, vocab] float32 logits are ever held: the sequence is cut into chunks, each chunk projects its
hidden states onto the vocabulary, takes the log-normaliser and the target logit, and drops the logits again.
The batch axis stays whole (it is the sharded one), so a chunk is sized in tokens *per device*: `batch_shards`
is how many ways the batch axis is split (`ftjax.sharding.batch_shards()`), and each device's vocabulary matmul
sees about `chunk_tokens` tokens however many devices share the batch.

  token_logps(hidden, head, targets, chunk_tokens, batch_shards, softcap)   log p(target) [batch, seq]: each
      chunk's logits are rematerialised in the backward pass (any loss of the log-probs differentiates)
  cross_entropy(hidden, head, targets, weights, chunk_tokens, ...)   (loss_sum, correct, count) of the masked
      tokens, the LM objective's fast path: a custom VJP forms each chunk's gradient (softmax minus one-hot,
      times the head) in the same scan, so the backward pass neither keeps nor recomputes any logits: three
      vocabulary-sized matmuls per chunk in all (the logits; the gradients of hidden and of the head when it
      trains) against four for `token_logps` under `jax.grad` (its backward pass forms the logits again).
"""
import functools

import jax
import jax.numpy as jnp


def chunk_positions(batch: int, seq: int, chunk_tokens: int, batch_shards: int = 1) -> int:
    """Sequence positions per chunk so that one device's share of a chunk is about `chunk_tokens` tokens."""
    rows = max(1, batch // max(1, batch_shards))  # rows of the batch on one device
    return max(1, min(seq, int(chunk_tokens) // rows))


def project(h, head, softcap=None):
    """[batch, n, embed] @ [embed, vocab] -> float32 logits [batch, n, vocab], accumulated in float32 (bf16
    inputs stay exact); `softcap` c: the model's final-logit soft-cap (Gemma 2: tanh(logits / c) * c) or None."""
    logits = jnp.einsum('bne,ev->bnv', h, head, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def token_sums(logits, targets, weights):
    """logits [..., vocab] float32, targets [...] int, weights [...] -> (loss sum, correct sum, lse [...]).

    A token counts as correct when its target logit is the maximum (ties count as correct)."""
    m = jnp.max(logits, axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(weights * (lse - target_logit))
    correct = jnp.sum(weights * (target_logit >= m))
    return loss, correct, lse


def _chunks(x, c):
    """[batch, seq, ...] -> [chunks, batch, c, ...], the sequence padded with zeros to a multiple of c."""
    b, t = x.shape[:2]
    pad = (-t) % c
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(b, (t + pad) // c, c, *x.shape[2:]).swapaxes(0, 1)


def token_logps(hidden, head, targets, chunk_tokens: int = 512, batch_shards: int = 1, softcap=None,
                entropy: bool = False):
    """log p(target) per position [batch, seq] float32; with `entropy`, (that, the entropy of each position's
    distribution [batch, seq] float32, without gradient).

    hidden: [batch, seq, embed] (`model.apply(..., return_hidden=True)`); head: [embed, vocab]
    (`ftjax.models.heads.lm_head_kernel`); targets: [batch, seq] int; chunk_tokens: about this many tokens per
    device per chunk, the batch being split `batch_shards` ways; softcap: the model's `final_softcap` or None."""
    b, t, _ = hidden.shape
    head = head.astype(hidden.dtype)
    c = chunk_positions(b, t, chunk_tokens, batch_shards)  # sequence positions per chunk
    hs = _chunks(hidden, c)  # [chunks, batch, chunk, embed]
    ys = _chunks(targets.astype(jnp.int32), c)  # [chunks, batch, chunk]

    @jax.checkpoint
    def one(h, y):
        logits = project(h, head, softcap)  # [batch, chunk, vocab] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse  # [batch, chunk]
        if not entropy:
            return logp
        sg = jax.lax.stop_gradient(logits)
        ent = lse - jnp.sum(jax.nn.softmax(sg, axis=-1) * sg, axis=-1)  # H = lse - E_p[logit]
        return logp, jax.lax.stop_gradient(ent)

    out = jax.lax.map(lambda xs: one(*xs), (hs, ys))  # [chunks, batch, chunk] (each)
    whole = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :t]  # noqa: E731
    return jax.tree.map(whole, out)


def cross_entropy(hidden, head, targets, weights, chunk_tokens: int = 512, *, batch_shards: int = 1,
                  barrier: bool = True, softcap=None):
    """Summed token cross-entropy -log p(target) of the tokens with weight, with a hand-written gradient.

    hidden: [batch, seq, embed]; head: [embed, vocab]; targets: [batch, seq] int; weights: [batch, seq] (the
    loss mask: 1 on the tokens that count). barrier: the head gradient's transpose behind an optimization
    barrier (the CPU layout, `ftjax.models.kernels` 'cpu'); the accelerators leave the layout to the compiler.
    Returns (loss_sum, correct, count): float32 scalars, summed over the weighted tokens."""
    b, t, _ = hidden.shape
    weights = weights.astype(jnp.float32)  # [batch, seq]
    c = chunk_positions(b, t, chunk_tokens, batch_shards)  # sequence positions per chunk
    hs = _chunks(hidden, c)  # [chunks, batch, chunk, embed]; padded positions carry weight 0
    ys = _chunks(targets.astype(jnp.int32), c)  # [chunks, batch, chunk]
    ws = _chunks(weights, c)
    loss, correct = _chunked_ce(hs, head.astype(hidden.dtype), ys, ws, barrier, softcap)
    return loss, correct, jnp.sum(weights)


def _chunk_scan(hs, head, ys, ws, grad_h=False, grad_head=False, barrier=True, softcap=None):
    """Sums over the chunks; with grad_h / grad_head also d(loss_sum) w.r.t. hs / head."""
    def body(carry, xs):
        loss, correct, dhead = carry
        h, y, w = xs  # [batch, chunk, embed], [batch, chunk], [batch, chunk]
        logits = project(h, head, softcap)  # [batch, chunk, vocab] float32
        l, c, lse = token_sums(logits, y, w)
        dh = None
        if grad_h or grad_head:  # d(sum w * (lse - logit_y)) / d logits = w * (softmax - onehot)
            vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
            p = jnp.exp(logits - lse[..., None])
            dlogits = jnp.where(vocab == y[..., None], p - 1.0, p) * w[..., None]
            if softcap is not None:  # through the cap: d(tanh(z / c) * c) / dz = 1 - tanh(z / c)^2
                dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
            dlogits = dlogits.astype(h.dtype)
            if grad_h:
                dh = jnp.einsum('bcv,ev->bce', dlogits, head)  # [batch, chunk, embed]
            if grad_head:  # contract over tokens with the narrow [embed, tokens] side transposed
                ht = h.reshape(-1, h.shape[-1]).T  # [embed, tokens]
                ht = jax.lax.optimization_barrier(ht) if barrier else ht
                dhead = dhead + (ht @ dlogits.reshape(-1, dlogits.shape[-1])).astype(dhead.dtype)
        return (loss + l, correct + c, dhead), dh

    zero = jnp.zeros((), jnp.float32)
    dhead0 = jnp.zeros(head.shape, jnp.float32) if grad_head else None
    (loss, correct, dhead), dhs = jax.lax.scan(body, (zero, zero, dhead0), (hs, ys, ws))
    return loss, correct, dhs, dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(hs, head, ys, ws, barrier, softcap=None):
    loss, correct, _, _ = _chunk_scan(hs, head, ys, ws, softcap=softcap)
    return loss, correct


def _chunked_ce_fwd(hs, head, ys, ws, barrier, softcap):
    grad_h, grad_head = hs.perturbed, head.perturbed
    loss, correct, dhs, dhead = _chunk_scan(hs.value, head.value, ys.value, ws.value, grad_h, grad_head, barrier,
                                            softcap)
    dhead = None if dhead is None else dhead.astype(head.value.dtype)
    return (loss, correct), (dhs, dhead)  # None for what needs no gradient


def _chunked_ce_bwd(barrier, softcap, res, cts):
    dhs, dhead = res
    g = cts[0]  # the cotangent of loss_sum; `correct` has no gradient
    scale = lambda d: None if d is None else (d * g).astype(d.dtype)  # noqa: E731
    return scale(dhs), scale(dhead), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd, symbolic_zeros=True)
