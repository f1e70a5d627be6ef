"""Sequence classification: the summed cross-entropy of the label over examples, divided once by their count.

Eval batches may carry 'valid' [batch] (False on the padding rows of a short last batch): those rows count for
nothing. The eval sums add each row's prediction and label, for F1 (`ftjax.eval.evaluate.macro_f1`).
"""
import jax.numpy as jnp

from ftjax.data import layout
from ftjax.objectives.logprobs import token_sums
from ftjax.objectives.objective import Objective, mean_per_count, no_normalisers
from ftjax.state import combine

KEYS = layout.REQUIRED['classification']  # the batch keys it reads


def loss_sums(logits, labels, weights=None):
    """logits [batch, num_labels], labels [batch] int, weights [batch] (e.g. the eval batch's 'valid').

    Returns (loss_sum, correct, count) as float32 scalars."""
    logits = logits.astype(jnp.float32)
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, correct, _ = token_sums(logits, labels.astype(jnp.int32), w)
    return loss, correct, jnp.sum(w)


def forward(model, params, batch, *, rng=None):
    """(loss_sum, correct, count, logits [batch, num_labels]) of a classification batch; dropout on with `rng`."""
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    logits = model.apply({'params': params}, batch['input_ids'], batch.get('attention_mask'),
                         batch.get('token_type_ids'), **kw)  # [batch, num_labels]
    return (*loss_sums(logits, batch['label'], batch.get('valid')), logits)


def make(config) -> Objective:
    def sums(model, trainable, frozen, batch, rng, norms):
        loss, correct, count, _ = forward(model, combine(trainable, frozen), batch, rng=rng)
        return loss, {'correct': correct, 'count': count}

    def eval_sums(model, params, batch):
        loss, correct, count, logits = forward(model, params, batch)
        return {'loss_sum': loss, 'correct': correct, 'count': count,
                'pred': jnp.argmax(logits, axis=-1).astype(jnp.int32), 'label': batch['label']}

    return Objective('classification', KEYS, sums, no_normalisers, mean_per_count, eval_sums)
