"""What an objective is: one small value of functions that the one train step and eval step call.

  Objective(name, keys, sums, normalisers, finalize, eval_sums, reference, before_after)

  keys          the batch keys `sums` / `eval_sums` read (the step checks them before tracing the model)
  normalisers   normalisers(batch) -> a pytree of whole-batch denominators (() when the loss is a plain sum),
                taken by the step on the whole batch *before* it is split into `optim.grad_accum` micro-batches
  sums          sums(model, trainable, frozen, batch, rng, norms) -> (loss part, {name: float32 sum}): the part of
                the loss this (micro-)batch contributes and its per-example / per-token sums; the step
                differentiates the loss part w.r.t. `trainable`, adds both over micro-batches
  finalize      finalize(sums) -> (denominator, metrics): the step divides the summed loss and its gradient by
                the denominator (1 when `normalisers` already made the loss a mean); metrics: float32 scalars,
                'accuracy' and 'num_tokens' (tokens, examples or pairs in the loss) among them
  eval_sums     eval_sums(model, params, batch) -> {'loss_sum', 'correct', 'count', ...}: sums that add over eval
                batches (`ftjax.eval.evaluate.eval_split` divides by 'count'; 'x_sum' becomes eval/x; classification
                adds per-row 'pred' and 'label')
  reference     what the reference needs: 'none', 'adapters_off' (the same model without its adapters, in the
                step) or 'precomputed' (log-probs the batches carry: `ftjax.objectives.reference`)
  before_after  before_after(before, after) -> a markdown table of held-out eval metrics before and after
                training (the loop then evaluates before the first step), or None

No class hierarchy: each objective module (`lm`, `classification`, `preference`) has a `make(config)` that
returns this value with its functions closed over the config keys they need.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp


class Objective(NamedTuple):
    name: str
    keys: tuple
    sums: Callable
    normalisers: Callable
    finalize: Callable
    eval_sums: Callable
    reference: str = 'none'
    before_after: Optional[Callable[[Any, Any], str]] = None


def no_normalisers(batch):
    """A loss that is a plain sum over tokens or examples needs no whole-batch denominator."""
    return ()


def mean_per_count(sums):
    """finalize of a summed loss: divided by the tokens or examples counted ('count'); 'correct' of them; every
    other '<name>_sum' as the metric '<name>'."""
    denom = jnp.maximum(sums['count'], 1.0)
    means = {k[:-len('_sum')]: v / denom for k, v in sums.items() if k.endswith('_sum')}  # e.g. MoE router losses
    return denom, {'accuracy': sums['correct'] / denom, 'num_tokens': sums['count'], **means}


def check_batch(objective: Objective, batch):
    """A batch without a key the objective reads fails here, with the keys it has, instead of deep in a trace."""
    missing = [k for k in objective.keys if k not in batch]
    if missing:
        raise ValueError(f'The {objective.name} batch lacks {missing} (has {sorted(batch)}); the data pipeline\'s '
                         f'{objective.name} batches carry {list(objective.keys)}.')
