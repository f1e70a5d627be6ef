"""Preference optimisation (DPO, IPO, SimPO, ORPO) as an objective of the one train step: per-answer log-probs,
the four losses, their metrics, the reference.

A preference batch row holds one pair as two segments (`ftjax.data`, format `preference`): segment 1 the
prompt + chosen answer, segment 2 the prompt + rejected answer; `loss_mask` is 1 on the answer targets,
the segment mask keeps attention within each sequence. From one forward pass:

  answer_logps(...)    sums of the answer tokens' log-probs [batch, 2] (chosen, rejected) and their
                       token counts [batch, 2] (`ftjax.objectives.logprobs.token_logps`: chunked over the
                       vocabulary, rematerialised, so no [batch, seq, vocab] logits are kept)
  pair_losses(...)     the per-pair loss and rewards of `align.loss` from those sums (TRL's formulas,
                       tests/test_objectives_preference.py checks loss and gradient against TRL's code):
    dpo    -(1 - e) log s(b d) - e log s(-b d),  d = (c - c_ref) - (r - r_ref)   (e: label smoothing)
    ipo    (d' - 1 / 2b)^2,  d' = (c - c_ref) / n_c - (r - r_ref) / n_r        (TRL: per-token normalised)
    simpo  -(1 - e) log s(b (c / n_c - r / n_r) - gamma) - e log s(...)        reference-free
    orpo   NLL(chosen tokens) - lambda log s(log odds(c / n_c) - log odds(r / n_r))   reference-free
  rewards: b (x - x_ref) for dpo / ipo, b x / n_x for simpo, lambda x / n_x for orpo (as TRL logs them).

Each micro-batch's loss is already divided by the whole batch's pair (and chosen-token) count (`normalisers`,
taken before the split), so accumulation stays exact and `finalize`'s denominator is 1.

The reference of dpo / ipo (`align.reference`):
  adapters_off  LoRA / DoRA: the same step runs the model once more without its adapters (the model
                rebuilt with `cfg.lora = None`) on the frozen base params: no second copy, and exactly the
                untouched base. Refused when a non-adapter leaf trains (that base is no longer untouched).
  precomputed   full / partial: the starting model's answer log-probs of every row, computed once before
                training (`ftjax.objectives.reference.attach_reference`) and carried by each batch as
                'ref_logps' [batch, 2]; cached, keyed by the starting model and the tokenised rows.
  auto          adapters_off for lora / dora, precomputed for full / partial and for training on a loaded
                adapter (`model.adapter`, e.g. an SFT adapter: the reference is then that starting model).

From an SFT adapter (`model.adapter`, a PEFT directory or a ftjax run's workdir) there are two ways, as in TRL's
notes on DPO with PEFT: `model.adapter_merge=true` folds the SFT adapter into the frozen base and trains a fresh
adapter on top, so adapters_off is exactly the SFT model, in the same step (auto picks it); without the merge the
loaded adapter trains on and auto precomputes the SFT model's log-probs (an explicit adapters_off would compare
with the bare base, as TRL's `disable_adapter` does).
"""
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from ftjax import sharding
from ftjax.data import layout
from ftjax.errors import ConfigError
from ftjax.models import moe
from ftjax.models.adapters import is_adapter
from ftjax.models.heads import lm_head_kernel
from ftjax.objectives import logprobs
from ftjax.objectives.objective import Objective
from ftjax.state import combine

KEYS = layout.REQUIRED['preference']  # the batch keys it reads

LOSSES = ('dpo', 'ipo', 'simpo', 'orpo')
NEEDS_REFERENCE = ('dpo', 'ipo')
_WARNED = set()  # model.adapter values warned about (settings() runs for the train step, eval step and data)
METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracy', 'rewards/margin', 'logps/chosen',
           'logps/rejected', 'logps/accuracy')  # per-pair means; logps/accuracy: policy log p(chosen) > log p(rejected)


@dataclasses.dataclass(frozen=True)
class Settings:
    loss: str = 'dpo'
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    reference: str = 'adapters_off'  # resolved: 'adapters_off' | 'precomputed' | 'none'


def settings(config):
    """The `align.*` keys of a config, with `align.reference='auto'` resolved from `peft.method`."""
    a = config.align
    return Settings(a.loss, float(a.beta), float(a.label_smoothing), float(a.simpo_gamma), float(a.orpo_lambda),
                    resolve_reference(config, a.loss in NEEDS_REFERENCE))


def resolve_reference(config, needed=True):
    """`align.reference` of an objective that needs a reference (`needed`; else 'none'), 'auto' resolved:
    'adapters_off' when only adapters train on the starting model (LoRA / DoRA, a loaded adapter merged),
    else 'precomputed' (the starting model's log-probs: before training for pairs, at each rollout for GRPO)."""
    a = config.align
    if not needed:
        reference = 'none'
    elif a.reference == 'auto':  # a loaded (SFT) adapter is part of the starting policy: merged, or precomputed
        m = config.model
        adapters = config.peft.method in ('lora', 'dora') and (not m.adapter or m.adapter_merge)
        reference = 'adapters_off' if adapters else 'precomputed'
    else:
        reference = a.reference
    if reference == 'adapters_off' and config.model.adapter and not config.model.adapter_merge and \
            config.model.adapter not in _WARNED:
        _WARNED.add(config.model.adapter)
        logging.warning("align.reference='adapters_off' with model.adapter=%s: the reference is the base without "
                        'that adapter, not the model training starts from; set --config.model.adapter_merge=true for '
                        'the adapter\'s model as the reference.', config.model.adapter)
    if reference == 'adapters_off' and config.peft.method not in ('lora', 'dora'):
        raise ConfigError(f"config.align.reference='adapters_off' needs peft.method lora or dora (got "
                          f"{config.peft.method!r}): use --config.align.reference=precomputed.")
    return reference


# --- log-probs of the answers ---------------------------------------------------------------------------------

def segment_sums(values, loss_mask, segment_ids):
    """Sums of `values` [batch, seq] over the answer tokens of segment 1 (chosen) and 2 (rejected) -> [batch, 2]."""
    w = loss_mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(values * w * (segment_ids == s), axis=-1) for s in (1, 2)], axis=-1)


def answer_logps(model, params, batch, rng=None, chunk_tokens=512, router=False):
    """(summed answer log-probs [batch, 2], answer token counts [batch, 2]) of a preference batch; `chunk_tokens`
    counts tokens per device. With `router`, a MoE model's routing statistics come third (None when dense)."""
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    hidden, stats = moe.hidden_states(model, params, batch['input_ids'], batch.get('positions'),
                                      batch['segment_ids'], router, **kw)  # [batch, seq, embed]
    lp = logprobs.token_logps(hidden, lm_head_kernel(params, model.cfg), batch['target_ids'], chunk_tokens,
                              sharding.batch_shards(), getattr(model.cfg, 'final_softcap', None))  # [batch, seq]
    seg = batch['segment_ids']
    got = segment_sums(lp, batch['loss_mask'], seg), segment_sums(jnp.ones_like(lp), batch['loss_mask'], seg)
    return (*got, stats) if router else got


def base_model(model):
    """The same model without adapters (LoRA / DoRA off): the reference of `align.reference='adapters_off'`."""
    return model.clone(cfg=dataclasses.replace(model.cfg, lora=None))


def strip_adapters(params):
    """The params without adapter leaves (lora_a / lora_b / lora_magnitude)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


def check_adapters_only(trainable):
    """adapters_off is the untouched base only when nothing but adapters trains."""
    other = sorted('/'.join(k) for k in traverse_util.flatten_dict(trainable) if not is_adapter(k))
    if other:
        raise ConfigError(f"config.align.reference='adapters_off': {other[:3]} train besides the adapters, so the "
                          "base without adapters is not the untouched model; use --config.align.reference=precomputed "
                          "(or train adapters only).")


# --- the losses -----------------------------------------------------------------------------------------------

def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (TRL's ORPO `log1mexp`)."""
    safe_lo = jnp.minimum(x, -math.log(2.0))
    safe_hi = jnp.clip(x, -math.log(2.0), -1e-30)
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(safe_lo)), jnp.log(-jnp.expm1(safe_hi)))


def _smoothed_sigmoid_loss(z, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def pair_losses(s: Settings, logps, counts, ref_logps=None):
    """Per-pair loss [batch] and rewards [batch, 2] (chosen, rejected) from summed answer log-probs [batch, 2],
    answer token counts [batch, 2] and, for dpo / ipo, the reference's summed log-probs [batch, 2].

    ORPO's NLL term is not per pair (it is a mean over all chosen tokens): `train_step` adds it."""
    n = jnp.maximum(counts, 1.0)
    if s.loss in NEEDS_REFERENCE:
        ratios = logps - ref_logps  # [batch, 2]
        rewards = s.beta * ratios
        if s.loss == 'dpo':
            loss = _smoothed_sigmoid_loss(s.beta * (ratios[:, 0] - ratios[:, 1]), s.label_smoothing)
        else:  # ipo
            avg = ratios / n
            loss = (avg[:, 0] - avg[:, 1] - 1.0 / (2.0 * s.beta)) ** 2
        return loss, rewards
    avg = logps / n  # [batch, 2] length-normalised
    if s.loss == 'simpo':
        loss = _smoothed_sigmoid_loss(s.beta * (avg[:, 0] - avg[:, 1]) - s.simpo_gamma, s.label_smoothing)
        return loss, s.beta * avg
    if s.loss == 'orpo':
        log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
        return -s.orpo_lambda * jax.nn.log_sigmoid(log_odds), s.orpo_lambda * avg
    raise ConfigError(f'config.align.loss={s.loss!r} is not one of {list(LOSSES)}.')


def normalisers(batch):
    """(pairs, chosen answer tokens) of a whole batch: the denominators of the step's mean loss, taken before
    the batch is split into micro-batches, so that accumulation is exact."""
    w = batch['loss_mask'].astype(jnp.float32)
    chosen = jnp.sum(w * (batch['segment_ids'] == 1), axis=-1)  # [batch]
    rejected = jnp.sum(w * (batch['segment_ids'] == 2), axis=-1)
    pairs = jnp.sum(((chosen > 0) & (rejected > 0)).astype(jnp.float32))
    return jnp.maximum(pairs, 1.0), jnp.maximum(jnp.sum(chosen), 1.0)


def loss_and_sums(s: Settings, logps, counts, ref_logps, n_pairs, n_tokens):
    """(this micro-batch's part of the step's mean loss, sums of the metrics over its pairs)."""
    valid = ((counts[:, 0] > 0) & (counts[:, 1] > 0)).astype(jnp.float32)  # [batch]; padding rows of an eval batch
    per_pair, rewards = pair_losses(s, logps, counts, ref_logps)
    per_pair = jnp.where(valid > 0, per_pair, 0.0)
    loss = jnp.sum(per_pair) / n_pairs
    if s.loss == 'orpo':  # + the SFT loss: mean NLL of the chosen answers' tokens
        loss = loss - jnp.sum(logps[:, 0] * valid) / n_tokens
    rewards, logps_sg = jax.lax.stop_gradient(rewards), jax.lax.stop_gradient(logps)
    v = lambda x: jnp.sum(x * valid)  # noqa: E731
    sums = {'pairs': jnp.sum(valid), 'loss_sum': v(jax.lax.stop_gradient(per_pair)),
            'rewards/chosen': v(rewards[:, 0]), 'rewards/rejected': v(rewards[:, 1]),
            'rewards/accuracy': v((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
            'rewards/margin': v(rewards[:, 0] - rewards[:, 1]),
            'logps/chosen': v(logps_sg[:, 0]), 'logps/rejected': v(logps_sg[:, 1]),
            'logps/accuracy': v((logps_sg[:, 0] > logps_sg[:, 1]).astype(jnp.float32))}
    if s.loss == 'orpo':
        sums['nll_sum'] = -v(logps_sg[:, 0])
        sums['nll_tokens'] = v(counts[:, 0])
    return loss, sums


def reference_logps(model, s: Settings, frozen, batch, chunk_tokens=512):
    """The reference's summed answer log-probs [batch, 2] (no gradient), or None for reference-free losses."""
    if s.reference == 'none':
        return None
    if s.reference == 'precomputed':
        if 'ref_logps' not in batch:
            raise ValueError("config.align.reference='precomputed' but the batch has no 'ref_logps': compute them once "
                             'with ftjax.objectives.reference.attach_reference(model, base_params, data) before '
                             'training.')
        return batch['ref_logps'].astype(jnp.float32)
    logps, _ = answer_logps(base_model(model), strip_adapters(frozen), batch, None, chunk_tokens)
    return jax.lax.stop_gradient(logps)


def before_after(before, after):
    """A markdown table of the held-out pair metrics (`eval/...` of `ftjax.eval.evaluate.eval_split`) before and after."""
    names = [('eval/logps/accuracy', 'policy prefers chosen'), ('eval/rewards/accuracy', 'reward accuracy'),
             ('eval/rewards/margin', 'reward margin'), ('eval/loss', 'preference loss')]
    lines = ['', '| held-out pairs | before | after |', '|---|---|---|']
    for key, name in names:
        if key in before and key in after:
            lines.append(f'| {name} | {before[key]:.4g} | {after[key]:.4g} |')
    if 'gen/exact_match_base' in after and 'gen/exact_match' in after:  # `eval.generate` prompts, greedy
        lines.append(f"| generation exact match (held-out prompts) | {after['gen/exact_match_base']:.1%} | "
                     f"{after['gen/exact_match']:.1%} |")
    return '\n'.join(lines)


def finalize(sums):
    """The loss is already the batch mean (denominator 1); the per-pair means of METRICS, orpo's NLL per chosen
    answer token; 'accuracy' is the reward accuracy and 'num_tokens' counts pairs."""
    pairs = jnp.maximum(sums['pairs'], 1.0)
    metrics = {name: sums[name] / pairs for name in METRICS}
    if 'nll_sum' in sums:  # orpo: its SFT part, per chosen answer token
        metrics['nll'] = sums['nll_sum'] / jnp.maximum(sums['nll_tokens'], 1.0)
    metrics.update(moe.routing_metrics(sums, pairs))  # a MoE model's, per pair
    return jnp.ones((), jnp.float32), {'accuracy': metrics['rewards/accuracy'], 'num_tokens': sums['pairs'], **metrics}


def make(config) -> Objective:
    """The `align.*` objective. Eval sums per pair: loss_sum, correct (reward accuracy), count (pairs) and
    '<metric>_sum' of METRICS (orpo's loss_sum: the odds-ratio term only, its NLL is a per-token mean); the eval
    reference with adapters off comes from `params` with the adapter leaves left out."""
    s = settings(config)
    chunk = int(config.train.loss_chunk)

    def sums(model, trainable, frozen, batch, rng, norms):
        if s.reference == 'adapters_off':
            check_adapters_only(trainable)
        logps, counts, stats = answer_logps(model, combine(trainable, frozen), batch, rng, chunk, router=True)
        ref = reference_logps(model, s, frozen, batch, chunk)
        loss, got = loss_and_sums(s, logps, counts, ref, *norms)
        if stats is not None:  # MoE: the load-balancing (and z) losses, weighted by this micro-batch's pairs
            aux, extra = moe.aux_loss_sums(stats, model.cfg, got['pairs'])
            loss, got = loss + aux / norms[0], {**got, **extra}
        return loss, got

    def eval_sums(model, params, batch):
        logps, counts = answer_logps(model, params, batch, None, chunk)
        ref = reference_logps(model, s, params, batch, chunk)
        _, got = loss_and_sums(s, logps, counts, ref, 1.0, 1.0)
        return {'loss_sum': got['loss_sum'], 'correct': got['rewards/accuracy'], 'count': got['pairs'],
                **{f'{name}_sum': got[name] for name in METRICS}}

    return Objective('preference', KEYS, sums, normalisers, finalize, eval_sums, s.reference, before_after)
