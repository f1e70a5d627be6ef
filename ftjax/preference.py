"""Preference optimisation (DPO, IPO, SimPO, ORPO): per-answer log-probs, the four losses, the reference.

A preference batch row holds one pair as two segments (`ftjax.data`, format `preference`): segment 1 the
prompt + chosen answer, segment 2 the prompt + rejected answer; `loss_mask` is 1 on the answer targets,
the segment mask keeps attention within each sequence. From one forward pass:

  answer_logps(...)    sums of the answer tokens' log-probs [batch, 2] (chosen, rejected) and their
                       token counts [batch, 2]; the log-softmax runs over the vocabulary in chunks of
                       the sequence (rematerialised, so no [batch, seq, vocab] logits are kept)
  pair_losses(...)     the per-pair loss and rewards of `align.loss` from those sums (TRL's formulas,
                       tests/test_preference.py checks loss and gradient against TRL's code):
    dpo    -(1 - e) log s(b d) - e log s(-b d),  d = (c - c_ref) - (r - r_ref)   (e: label smoothing)
    ipo    (d' - 1 / 2b)^2,  d' = (c - c_ref) / n_c - (r - r_ref) / n_r        (TRL: per-token normalised)
    simpo  -(1 - e) log s(b (c / n_c - r / n_r) - gamma) - e log s(...)        reference-free
    orpo   NLL(chosen tokens) - lambda log s(log odds(c / n_c) - log odds(r / n_r))   reference-free
  rewards: b (x - x_ref) for dpo / ipo, b x / n_x for simpo, lambda x / n_x for orpo (as TRL logs them).

The reference of dpo / ipo (`align.reference`):
  adapters_off  LoRA / DoRA: the same step runs the model once more without its adapters (the model
                rebuilt with `cfg.lora = None`) on the frozen base params: no second copy, and exactly the
                untouched base. Refused when a non-adapter leaf trains (that base is no longer untouched).
  precomputed   full / partial: the starting model's answer log-probs of every row, computed once before
                training (`attach_reference`) and carried by each batch as 'ref_logps' [batch, 2]; kept in a
                cache beside the data's (`cache_dir`), keyed by the starting model's identity (base weights'
                hash, adapter files, model keys) and the tokenised rows, so a restart (or a sweep) reads them.
  auto          adapters_off for lora / dora, precomputed for full / partial and for training on a loaded
                adapter (`model.adapter`, e.g. an SFT adapter: the reference is then that starting model).

From an SFT adapter (`model.adapter`, a PEFT directory or a ftjax run's workdir) there are two ways, as in TRL's
notes on DPO with PEFT: `model.adapter_merge=true` folds the SFT adapter into the frozen base and trains a fresh
adapter on top, so adapters_off is exactly the SFT model, in the same step (auto picks it); without the merge the
loaded adapter trains on and auto precomputes the SFT model's log-probs (an explicit adapters_off would compare
with the bare base, as TRL's `disable_adapter` does).
"""
import dataclasses
import hashlib
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftjax.data.locations import cache_root
from ftjax.data.packing import take_rows
from ftjax.errors import ConfigError
from ftjax.models.adapters import is_adapter
from ftjax.models.heads import lm_head_kernel

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
    if a.loss not in NEEDS_REFERENCE:
        reference = 'none'
    elif a.reference == 'auto':  # a loaded (SFT) adapter is part of the starting policy: merged, or precomputed
        m = config.model
        adapters = config.peft.method in ('lora', 'dora') and (not m.get('adapter') or m.get('adapter_merge'))
        reference = 'adapters_off' if adapters else 'precomputed'
    else:
        reference = a.reference
    if reference == 'adapters_off' and config.model.get('adapter') and not config.model.get('adapter_merge') and \
            config.model.adapter not in _WARNED:
        _WARNED.add(config.model.adapter)
        logging.warning("align.reference='adapters_off' with model.adapter=%s: the reference is the base without "
                        'that adapter, not the model training starts from; set --config.model.adapter_merge=true for '
                        'the adapter\'s model as the reference.', config.model.adapter)
    if reference == 'adapters_off' and config.peft.method not in ('lora', 'dora'):
        raise ConfigError(f"config.align.reference='adapters_off' needs peft.method lora or dora (got "
                          f"{config.peft.method!r}): use --config.align.reference=precomputed.")
    return Settings(a.loss, float(a.beta), float(a.label_smoothing), float(a.simpo_gamma), float(a.orpo_lambda),
                    reference)


# --- log-probs of the answers ---------------------------------------------------------------------------------

def token_logps(hidden, head, targets, chunk_tokens=512, softcap=None):
    """log p(target) per position [batch, seq] float32 from hidden [batch, seq, embed] and head [embed, vocab].

    The sequence is cut into chunks of about `chunk_tokens` tokens of the batch; each chunk's logits are
    rematerialised in the backward pass instead of being kept."""
    b, t, e = hidden.shape
    head = head.astype(hidden.dtype)
    c = max(1, min(t, int(chunk_tokens) // max(b, 1)))  # positions per chunk
    pad = (-t) % c
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, e).swapaxes(0, 1)  # [chunks, batch, chunk, embed]
    ys = targets.reshape(b, n, c).swapaxes(0, 1)  # [chunks, batch, chunk]

    @jax.checkpoint
    def one(h, y):
        logits = jnp.einsum('bce,ev->bcv', h, head, preferred_element_type=jnp.float32)  # [batch, chunk, vocab]
        if softcap is not None:  # the model's final-logit soft-cap (Gemma 2)
            logits = jnp.tanh(logits / softcap) * softcap
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse  # [batch, chunk]

    out = jax.lax.map(lambda xs: one(*xs), (hs, ys))  # [chunks, batch, chunk]
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def segment_sums(values, loss_mask, segment_ids):
    """Sums of `values` [batch, seq] over the answer tokens of segment 1 (chosen) and 2 (rejected) -> [batch, 2]."""
    w = loss_mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(values * w * (segment_ids == s), axis=-1) for s in (1, 2)], axis=-1)


def answer_logps(model, params, batch, rng=None, chunk_tokens=512):
    """(summed answer log-probs [batch, 2], answer token counts [batch, 2]) of a preference batch."""
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    hidden = model.apply({'params': params}, batch['input_ids'], batch.get('positions'), batch['segment_ids'],
                         return_hidden=True, **kw)  # [batch, seq, embed]
    lp = token_logps(hidden, lm_head_kernel(params, model.cfg), batch['target_ids'], chunk_tokens,
                     getattr(model.cfg, 'final_softcap', None))
    seg = batch['segment_ids']
    return segment_sums(lp, batch['loss_mask'], seg), segment_sums(jnp.ones_like(lp), batch['loss_mask'], seg)


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
            raise ValueError("config.align.reference='precomputed' but the batch has no 'ref_logps': compute them "
                             'once with ftjax.preference.attach_reference(model, base_params, data) before training.')
        return batch['ref_logps'].astype(jnp.float32)
    logps, _ = answer_logps(base_model(model), strip_adapters(frozen), batch, None, chunk_tokens)
    return jax.lax.stop_gradient(logps)


# --- the precomputed reference (full / partial fine-tuning) ------------------------------------------------------

def cache_dir(config):
    """Where precomputed reference log-probs are kept: beside the data cache (`data.cache_dir`), else under
    $FTJAX_CACHE (~/.cache/ftjax)."""
    return os.path.join(config.data.cache_dir or cache_root(), 'reference_logps')


def data_digest(data):
    """A hash of a TokenizedData's rows: tokens, answer masks and how they are cut into sequences and rows."""
    h = hashlib.sha256(f'{data.task}:{data.max_length}'.encode())
    for name in ('tokens', 'offsets', 'row_offsets', 'row_examples', 'answer'):
        h.update(np.ascontiguousarray(getattr(data, name)).tobytes())
    return h.hexdigest()


def attach_reference(model, params, data, batch_size=8, chunk_tokens=512, cache=None, identity=None):
    """Computes the model's summed answer log-probs of every row of `data` (a preference TokenizedData) once
    and stores them as `data.ref_logps` [rows, 2] (float32), which batches then carry as 'ref_logps'.

    With `cache` (a directory) and `identity` (a hash of the model, `ftjax.build.start_identity`), they are
    read from `cache/<identity + data_digest>.npy` when there, and written there once computed.
    `data.stats['reference_batches']` counts the forward batches run (0: read from the cache). Returns `data`."""
    data.ref_logps = None
    n = len(data)
    path = None
    if cache and identity:
        key = hashlib.sha256(f'{identity}:{data_digest(data)}'.encode()).hexdigest()[:32]
        path = os.path.join(cache, f'{key}.npy')
        if os.path.exists(path):
            try:
                got = np.load(path)
            except (ValueError, OSError) as e:  # a damaged file: computed again and replaced
                got = np.zeros((0,), np.float32)
                logging.warning('%s: %s', path, e)
            if got.shape == (n, 2) and got.dtype == np.float32 and np.all(np.isfinite(got)):
                data.ref_logps, data.stats['reference_batches'] = got, 0
                logging.info('reference log-probs of %d pairs: read from %s', n, path)
                return data
            logging.warning('reference log-probs in %s do not fit the data; computing them again', path)
    t0 = time.perf_counter()
    fn = jax.jit(lambda p, b: answer_logps(model, p, b, None, chunk_tokens)[0])
    out = np.zeros((n, 2), np.float32)
    batches = 0
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)  # a full last batch: one compiled shape
        got = np.asarray(jax.device_get(fn(params, take_rows(data, rows))))
        keep = min(batch_size, n - start)
        out[start:start + keep] = got[:keep]
        batches += 1
    data.ref_logps, data.stats['reference_batches'] = out, batches
    if path:  # written whole, then renamed: a reader never sees half a file (every process writes the same)
        os.makedirs(cache, exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}.npy'
        np.save(tmp, out)
        os.replace(tmp, path)
    logging.info('reference log-probs of %d pairs: computed in %.0f s (%d batches)%s', n, time.perf_counter() - t0,
                 batches, f', saved to {path}' if path else '')
    return data


def before_after(before, after):
    """A markdown table of the held-out pair metrics (`eval/...` of `ftjax.evaluate.eval_split`) before and after."""
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
