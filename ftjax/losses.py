"""Losses as sums (loss, correct, count), so micro-batches, devices and eval batches average exactly.

The LM loss never holds float32 logits for the whole batch: it scans over chunks of the sequence,
each chunk projecting its final hidden states onto the vocabulary, taking the log-normaliser and
the target logit, and dropping the logits again. Under differentiation the same scan also forms
each chunk's gradient (softmax minus one-hot, times the head), so the backward pass neither keeps
nor recomputes any logits: one vocabulary projection per chunk in the forward pass, one or two
(hidden, and the head when it trains) for the gradient. The batch axis stays whole (it is the
sharded one), so a chunk is sized in tokens *per device*: `batch_shards` is how many ways the
batch axis is split (`ftjax.sharding.batch_shards`), and each device's vocabulary matmul sees about
`chunk_tokens` tokens however many devices share the batch.
"""
import functools

import jax
import jax.numpy as jnp


def _token_sums(logits, targets, weights):
    """logits [..., vocab] float32, targets [...] int, weights [...] -> (loss sum, correct sum).

    A token counts as correct when its target logit is the maximum (ties count as correct)."""
    m = jnp.max(logits, axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(weights * (lse - target_logit))
    correct = jnp.sum(weights * (target_logit >= m))
    return loss, correct, lse


def _project(h, head):
    """[batch, n, embed] @ [embed, vocab] -> float32 logits, accumulated in float32 (bf16 inputs stay exact)."""
    return jnp.einsum('bne,ev->bnv', h, head, preferred_element_type=jnp.float32)


def chunk_positions(batch: int, seq: int, chunk_tokens: int, batch_shards: int = 1) -> int:
    """Sequence positions per chunk so that one device's share of a chunk is about `chunk_tokens` tokens."""
    rows = max(1, batch // max(1, batch_shards))  # rows of the batch on one device
    return max(1, min(seq, int(chunk_tokens) // rows))


def lm_loss(hidden, head_kernel, targets, loss_mask, chunk_tokens: int = 512, *, batch_shards: int = 1,
            barrier: bool = True, softcap=None):
    """Token cross-entropy from final hidden states.

    hidden: [batch, seq, embed] (`model.apply(..., return_hidden=True)`); head_kernel: [embed, vocab]
    (`ftjax.models.lm_head_kernel`); targets: [batch, seq] int; loss_mask: [batch, seq] (1 on the
    tokens that count). chunk_tokens: about this many tokens per device per chunk, the batch being split
    `batch_shards` ways. barrier: the head gradient's transpose behind an optimization barrier (the CPU
    layout, `ftjax.models.kernels` 'cpu'); the accelerators leave the layout to the compiler.
    softcap: the model's final-logit soft-cap c (Gemma 2: logits -> tanh(logits / c) * c), or None.
    Returns (loss_sum, correct, count): float32 scalars, summed over the masked tokens.
    """
    b, t, e = hidden.shape
    weights = loss_mask.astype(jnp.float32)  # [batch, seq]
    targets = targets.astype(jnp.int32)
    head = head_kernel.astype(hidden.dtype)
    c = chunk_positions(b, t, chunk_tokens, batch_shards)  # sequence positions per chunk
    pad = (-t) % c
    if pad:  # padded positions carry weight 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights_p = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, e).swapaxes(0, 1)  # [chunks, batch, chunk, embed]
    ys = targets.reshape(b, n, c).swapaxes(0, 1)  # [chunks, batch, chunk]
    ws = weights_p.reshape(b, n, c).swapaxes(0, 1)
    loss, correct = _chunked_ce(hs, head, ys, ws, barrier, softcap)
    return loss, correct, jnp.sum(weights)


def _chunk_scan(hs, head, ys, ws, grad_h=False, grad_head=False, barrier=True, softcap=None):
    """Sums over the chunks; with grad_h / grad_head also d(loss_sum) w.r.t. hs / head."""
    def body(carry, xs):
        loss, correct, dhead = carry
        h, y, w = xs  # [batch, chunk, embed], [batch, chunk], [batch, chunk]
        logits = _project(h, head)  # [batch, chunk, vocab] float32
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        l, c, lse = _token_sums(logits, y, w)
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
    scale = lambda d: None if d is None else (d * g).astype(d.dtype)
    return scale(dhs), scale(dhead), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd, symbolic_zeros=True)


def classification_loss(logits, labels, weights=None):
    """logits [batch, num_labels], labels [batch] int, weights [batch] (e.g. the eval batch's 'valid').

    Returns (loss_sum, correct, count) as float32 scalars."""
    logits = logits.astype(jnp.float32)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, correct, _ = _token_sums(logits, labels.astype(jnp.int32), w)
    return loss, correct, jnp.sum(w)
