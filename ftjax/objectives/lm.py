"""Language modelling: the summed cross-entropy of the answer tokens (`loss_mask`), divided once by their count.

The loss is a sum, so micro-batches, devices and eval batches add exactly; the step divides by the number of
tokens counted over the whole batch (`objective.mean_per_count`). The cross-entropy is
`ftjax.objectives.logprobs.cross_entropy`: chunked over the vocabulary with its hand-written gradient.
"""
from ftjax import sharding
from ftjax.data import layout
from ftjax.models import moe
from ftjax.models.heads import lm_head_kernel
from ftjax.objectives import logprobs
from ftjax.objectives.objective import Objective, mean_per_count, no_normalisers
from ftjax.state import combine

KEYS = layout.REQUIRED['lm']  # the batch keys it reads


def forward(model, params, batch, *, rng=None, loss_chunk=512, router=False):
    """(loss_sum, correct, count) of an LM batch; dropout on when `rng` is given. `loss_chunk` counts tokens per
    device (the batch split over the mesh's data x fsdp axes). With `router`, a MoE model's routing statistics
    (`ftjax.models.moe`) come fourth (None for a dense model)."""
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    hidden, stats = moe.hidden_states(model, params, batch['input_ids'], batch.get('positions'),
                                      batch.get('segment_ids'), router, **kw)  # [batch, seq, embed]
    head = lm_head_kernel(params, model.cfg)  # [embed, vocab]
    barrier = getattr(model.cfg, 'kernels', 'cpu') == 'cpu'  # the CPU layout of the head gradient
    sums = logprobs.cross_entropy(hidden, head, batch['target_ids'], batch['loss_mask'], loss_chunk,
                                  batch_shards=sharding.batch_shards(), barrier=barrier,
                                  softcap=getattr(model.cfg, 'final_softcap', None))
    return (*sums, stats) if router else sums


def make(config) -> Objective:
    chunk = int(config.train.loss_chunk)

    def sums(model, trainable, frozen, batch, rng, norms):
        loss, correct, count, stats = forward(model, combine(trainable, frozen), batch, rng=rng, loss_chunk=chunk,
                                              router=True)
        extra = {}
        if stats is not None:  # MoE: the load-balancing (and z) losses, in the loss and the metrics
            aux, extra = moe.aux_loss_sums(stats, model.cfg, count)
            loss = loss + aux
        return loss, {'correct': correct, 'count': count, **extra}

    def eval_sums(model, params, batch):
        loss, correct, count = forward(model, params, batch, loss_chunk=chunk)
        return {'loss_sum': loss, 'correct': correct, 'count': count}

    return Objective('lm', KEYS, sums, no_normalisers, mean_per_count, eval_sums)
