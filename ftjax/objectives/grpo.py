"""Group-relative policy optimisation (GRPO, Dr. GRPO, DAPO, BNPO; GSPO's sequence-level ratio) as an objective
of the one train step, with TRL's names and formulas (tests/test_objectives_grpo.py checks loss and gradient
against `trl.GRPOTrainer._compute_loss`).

A batch row is one sampled completion after its prompt (`ftjax.rl.rollout` builds it): an lm batch whose
`loss_mask` is 1 on the completion's tokens, plus

  old_logps    [batch, seq] float32  log p of each completion token under the policy that sampled it (the
               engine's log-probs, `ftjax.infer.Sampler.sample(..., logprobs=True)`), 0 elsewhere
  advantages   [batch] float32       the row's reward, normalised within its group (`align.scale_rewards`)

Per completion token t of row i, with r = exp(log p - old log p) (`align.importance_sampling_level=token`) or
one ratio per row exp(mean over the row's tokens of (log p - old log p)) (`sequence`, GSPO):

  l_it = -min(r A_i, clip(r, 1 - epsilon_low, 1 + epsilon_high) A_i) + beta (exp(ref - log p) - (ref - log p) - 1)

(the last term: the k3 estimate of KL to the reference, only when `align.beta` > 0), reduced by `align.loss`:

  grpo     mean over rows of (sum_t l_it / tokens of row i)
  bnpo     sum l / the micro-batch's completion tokens (divided by optim.grad_accum, as TRL does)
  dr_grpo  sum l / (rows x rollout.max_new_tokens)
  dapo     sum l / the whole batch's completion tokens

The reference (beta > 0; `align.reference`, auto by `peft.method`) is the starting model: for LoRA / DoRA the
model with its adapters off on the frozen base, in the same step (no second copy); for full / partial fine-tuning
(or a loaded adapter trained on) 'precomputed': `ftjax.rl.Rollouts` keeps a copy of the starting trainable
weights and each rollout batch carries their per-token log-probs as `ref_logps` [batch, seq].
"""
import dataclasses

import jax
import jax.numpy as jnp

from ftjax import sharding
from ftjax.data import layout
from ftjax.errors import ConfigError
from ftjax.models import moe
from ftjax.models.heads import lm_head_kernel
from ftjax.objectives import logprobs
from ftjax.objectives.objective import Objective
from ftjax.objectives.preference import base_model, check_adapters_only, resolve_reference, strip_adapters
from ftjax.state import combine

KEYS = layout.REQUIRED['grpo']  # the batch keys it reads
LOSSES = ('grpo', 'dr_grpo', 'dapo', 'bnpo')
LEVELS = ('token', 'sequence')
METRICS = ('kl', 'entropy', 'clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean', 'ratio_mean')


@dataclasses.dataclass(frozen=True)
class Settings:
    loss: str = 'grpo'
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    level: str = 'token'  # importance sampling level
    max_completion_length: int = 64  # dr_grpo's constant normaliser
    grad_accum: int = 1  # bnpo divides each micro-batch's mean by it
    reference: str = 'none'  # resolved: 'none' (beta = 0) | 'adapters_off' | 'precomputed'


def settings(config):
    """The `align.*` GRPO keys (`align.epsilon_high` None: = epsilon_low, as TRL)."""
    a = config.align
    if a.loss not in LOSSES:
        raise ConfigError(f'config.align.loss={a.loss!r} is not a GRPO loss ({list(LOSSES)}).')
    high = a.epsilon if a.epsilon_high is None else a.epsilon_high
    return Settings(a.loss, float(a.beta), float(a.epsilon), float(high), a.importance_sampling_level,
                    int(config.rollout.max_new_tokens), int(config.optim.grad_accum),
                    resolve_reference(config, float(a.beta) > 0))


def token_losses(s: Settings, logps, old_logps, ref_logps, advantages, mask):
    """(per-token loss [batch, seq], the importance ratio [batch, seq] or [batch, 1], per-token KL or None).

    logps, old_logps, ref_logps (or None when beta = 0): [batch, seq] float32; advantages [batch]; mask
    [batch, seq] 1 on completion tokens."""
    adv = advantages[:, None]  # [batch, 1]
    log_ratio = logps - old_logps
    if s.level == 'sequence':  # GSPO: one ratio per row, the mean log-ratio of its tokens
        log_ratio = jnp.sum(log_ratio * mask, -1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - s.epsilon_low, 1.0 + s.epsilon_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)  # [batch, seq] or [batch, 1]
    kl = None
    if s.beta != 0.0:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1.0  # k3: unbiased, non-negative
        loss = loss + s.beta * kl
    return jnp.broadcast_to(loss, logps.shape), ratio, kl


def normalisers(batch):
    """(rows, completion tokens) of the whole batch, taken before the micro-batch split."""
    mask = batch['loss_mask'].astype(jnp.float32)
    return jnp.float32(mask.shape[0]), jnp.maximum(jnp.sum(mask), 1.0)


def reduce_loss(s: Settings, per_token, mask, rows, tokens):
    """This micro-batch's part of the step's loss (`align.loss`); rows and tokens: the whole batch's."""
    if s.loss == 'grpo':
        return jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)) / rows
    if s.loss == 'bnpo':
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0) / s.grad_accum
    if s.loss == 'dr_grpo':
        return jnp.sum(per_token * mask) / (rows * s.max_completion_length)
    return jnp.sum(per_token * mask) / tokens  # dapo


def loss_and_sums(s: Settings, logps, old_logps, ref_logps, advantages, mask, rows, tokens, entropy=None):
    """(loss part, float32 sums of the metrics over this micro-batch) from per-token log-probs [batch, seq]."""
    mask = mask.astype(jnp.float32)
    per_token, ratio, kl = token_losses(s, logps, old_logps, ref_logps, advantages, mask)
    loss = reduce_loss(s, per_token, mask, rows, tokens)
    adv = advantages[:, None]
    sg = jax.lax.stop_gradient
    low = ((ratio < 1.0 - s.epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + s.epsilon_high) & (adv > 0)).astype(jnp.float32)
    if s.level == 'sequence':  # one value per row, as TRL averages them
        weight, count = jnp.ones_like(ratio), jnp.float32(ratio.shape[0])
    else:
        weight, count = mask, jnp.sum(mask)
    clip = lambda x: jnp.sum(x * weight)  # noqa: E731
    sums = {'tokens': jnp.sum(mask), 'rows': jnp.float32(mask.shape[0]), 'clip_count': count,
            'clip_ratio/low_mean': clip(low), 'clip_ratio/high_mean': clip(high),
            'clip_ratio/region_mean': clip(jnp.maximum(low, high)), 'ratio_mean': clip(sg(ratio)),
            'kl': jnp.sum(sg(kl) * mask) if kl is not None else jnp.zeros((), jnp.float32),
            'entropy': jnp.sum(entropy * mask) if entropy is not None else jnp.zeros((), jnp.float32),
            'loss_sum': sg(jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)))}
    return loss, sums


def finalize(sums):
    """The loss is already the batch's (denominator 1); kl and entropy per completion token, the clip fractions
    per token (per row at the sequence level); 'num_tokens' counts completion tokens."""
    tokens = jnp.maximum(sums['tokens'], 1.0)
    count = jnp.maximum(sums['clip_count'], 1.0)
    metrics = {'kl': sums['kl'] / tokens, 'entropy': sums['entropy'] / tokens, 'num_tokens': sums['tokens'],
               **{k: sums[k] / count for k in METRICS if k.startswith(('clip', 'ratio'))},
               **moe.routing_metrics(sums, jnp.maximum(sums['rows'], 1.0))}  # a MoE model's, per row
    return jnp.ones((), jnp.float32), metrics


def before_after(before, after):
    """A markdown table of the held-out greedy reward (`ftjax.rl.rollout.Rollouts.evaluate`) before and after."""
    lines = ['', '| held-out greedy reward | before | after |', '|---|---|---|']
    for key in sorted(k for k in after if k.startswith('eval/reward')):
        if key in before:
            lines.append(f'| {key[len("eval/"):]} | {before[key]:.4g} | {after[key]:.4g} |')
    return '\n'.join(lines)


def completion_logps(model, params, batch, rng=None, chunk_tokens=512, entropy=False, router=False):
    """log p of every target [batch, seq] (and the entropy per position, with `entropy`) of a GRPO batch; with
    `router`, (that, a MoE model's routing statistics or None)."""
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    hidden, stats = moe.hidden_states(model, params, batch['input_ids'], batch.get('positions'),
                                      batch['segment_ids'], router, **kw)  # [batch, seq, embed]
    got = logprobs.token_logps(hidden, lm_head_kernel(params, model.cfg), batch['target_ids'], chunk_tokens,
                               sharding.batch_shards(), getattr(model.cfg, 'final_softcap', None), entropy=entropy)
    return (got, stats) if router else got


def make(config) -> Objective:
    """The GRPO objective of `align.*`. Eval sums (rarely used: the RL loop evaluates rewards): the loss per row."""
    s = settings(config)
    chunk = int(config.train.loss_chunk)

    def reference(model, frozen, batch):
        if s.reference == 'none':
            return None
        if s.reference == 'precomputed':  # the starting model's, computed by the rollout
            return batch['ref_logps']
        ref = completion_logps(base_model(model), strip_adapters(frozen), batch, None, chunk)
        return jax.lax.stop_gradient(ref)

    def sums(model, trainable, frozen, batch, rng, norms):
        if s.reference == 'adapters_off':
            check_adapters_only(trainable)
        (logps, ent), stats = completion_logps(model, combine(trainable, frozen), batch, rng, chunk, entropy=True,
                                               router=True)
        loss, got = loss_and_sums(s, logps, batch['old_logps'], reference(model, frozen, batch), batch['advantages'],
                                  batch['loss_mask'], *norms, entropy=ent)
        if stats is not None:  # MoE: the load-balancing (and z) losses, weighted by this micro-batch's rows
            aux, extra = moe.aux_loss_sums(stats, model.cfg, got['rows'])
            loss, got = loss + aux / norms[0], {**got, **extra}
        return loss, got

    def eval_sums(model, params, batch):
        logps = completion_logps(model, params, batch, None, chunk)
        _, got = loss_and_sums(s, logps, batch['old_logps'], reference(model, params, batch), batch['advantages'],
                               batch['loss_mask'], *normalisers(batch))
        return {'loss_sum': got['loss_sum'], 'correct': jnp.zeros((), jnp.float32), 'count': got['rows']}

    keys = KEYS + (('ref_logps',) if s.reference == 'precomputed' else ())
    return Objective('grpo', keys, sums, normalisers, finalize, eval_sums, s.reference, before_after)
