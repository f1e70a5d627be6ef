"""Losses as sums (loss, correct, count), so micro-batches, devices and eval batches average exactly.

The LM loss never holds float32 logits for the whole batch: it scans over chunks of the sequence,
each chunk projecting its final hidden states onto the vocabulary, taking logsumexp and the target
logit, and dropping the logits again. The chunk body is `jax.checkpoint`ed, so the backward pass
recomputes one chunk's logits at a time as well. The batch axis stays whole (it is the sharded one).
"""
import jax
import jax.numpy as jnp


def _token_sums(logits, targets, weights):
    """logits [..., vocab] float32, targets [...] int, weights [...] -> (loss sum, correct sum)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = jnp.sum(weights * (lse - target_logit))
    correct = jnp.sum(weights * (jnp.argmax(logits, axis=-1) == targets))
    return loss, correct


def _project(h, head):
    """[batch, n, embed] @ [embed, vocab] -> float32 logits, accumulated in float32 (bf16 inputs stay exact)."""
    return jnp.einsum('bne,ev->bnv', h, head, preferred_element_type=jnp.float32)


def lm_loss(hidden, head_kernel, targets, loss_mask, chunk_tokens: int = 512):
    """Token cross-entropy from final hidden states.

    hidden: [batch, seq, embed] (`model.apply(..., return_hidden=True)`); head_kernel: [embed, vocab]
    (`ftjax.models.lm_head_kernel`); targets: [batch, seq] int; loss_mask: [batch, seq] (1 on the
    tokens that count). chunk_tokens: about this many tokens of the batch per chunk.
    Returns (loss_sum, correct, count): float32 scalars, summed over the masked tokens.
    """
    b, t, e = hidden.shape
    weights = loss_mask.astype(jnp.float32)  # [batch, seq]
    targets = targets.astype(jnp.int32)
    head = head_kernel.astype(hidden.dtype)
    c = max(1, min(t, int(chunk_tokens) // max(b, 1)))  # sequence positions per chunk
    if c >= t:
        logits = _project(hidden, head)  # [batch, seq, vocab]
        loss, correct = _token_sums(logits, targets, weights)
        return loss, correct, jnp.sum(weights)
    pad = (-t) % c
    if pad:  # padded positions carry weight 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights_p = jnp.pad(weights, ((0, 0), (0, pad)))
    else:
        weights_p = weights
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, e).swapaxes(0, 1)  # [chunks, batch, chunk, embed]
    ys = targets.reshape(b, n, c).swapaxes(0, 1)  # [chunks, batch, chunk]
    ws = weights_p.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(h, y, w):
        logits = _project(h, head)  # [batch, chunk, vocab]
        return _token_sums(logits, y, w)

    def body(carry, xs):
        loss, correct = chunk_sums(*xs)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), (hs, ys, ws))
    return loss, correct, jnp.sum(weights)


def classification_loss(logits, labels, weights=None):
    """logits [batch, num_labels], labels [batch] int, weights [batch] (e.g. the eval batch's 'valid').

    Returns (loss_sum, correct, count) as float32 scalars."""
    logits = logits.astype(jnp.float32)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, correct = _token_sums(logits, labels.astype(jnp.int32), w)
    return loss, correct, jnp.sum(w)
