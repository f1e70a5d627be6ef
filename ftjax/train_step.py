"""One pure train step for every fine-tuning mode, and an eval step that returns exact sums.

  train_step(state, batch, rng) -> (state, metrics)

The mode only shows in `state` (which leaves are in `state.trainable`) and in the model (adapter
leaves): the step differentiates with respect to `state.trainable` alone, so frozen weights get no
gradient buffer and no optimizer state. Jit it with `donate_argnums=0`; the sharding (in/out
shardings around it) is the caller's business.

Gradient accumulation (`optim.grad_accum` = k) splits the batch into k micro-batches inside the
step and scans over them, summing the gradients of the *summed* loss; the sum is divided by the
total token (or example) count once, so the update equals that of the whole batch at once.

A preference objective (`data.format='preference'`, `align.loss` dpo / ipo / simpo / orpo, `ftjax.preference`)
is one more task of the same step: each micro-batch's loss is already divided by the whole batch's pair
(and chosen-token) count, taken before the split, so accumulation stays exact; the reference of dpo / ipo
is the same model with its adapters off, run in the same step, or log-probs the batch carries.
"""
import jax
import jax.numpy as jnp
import optax

from ftjax import losses, preference, sharding
from ftjax.models.heads import lm_head_kernel, task_of
from ftjax.state import TrainState, combine
from ftjax.tree import count_params

LM_KEYS = ('input_ids', 'target_ids', 'loss_mask')
CLS_KEYS = ('input_ids', 'label')


def _check_batch(batch, task):
    need = LM_KEYS if task == 'lm' else CLS_KEYS
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"The {task} batch lacks {missing} (has {sorted(batch)}); the data pipeline's "
                         f"{'LM' if task == 'lm' else 'classification'} batches carry {list(need)}.")


def forward(model, params, batch, *, rng=None, loss_chunk=512):
    """(loss_sum, correct, count, logits-or-None) of one batch; dropout on when `rng` is given.
    `loss_chunk` counts tokens per device (the batch split over the mesh's data x fsdp axes)."""
    task = task_of(model.cfg)
    _check_batch(batch, task)
    kw = dict(deterministic=rng is None, rngs=None if rng is None else {'dropout': rng})
    if task == 'lm':
        hidden = model.apply({'params': params}, batch['input_ids'], batch.get('positions'),
                             batch.get('segment_ids'), return_hidden=True, **kw)  # [batch, seq, embed]
        head = lm_head_kernel(params, model.cfg)  # [embed, vocab]
        barrier = getattr(model.cfg, 'kernels', 'cpu') == 'cpu'  # the CPU layout of the head gradient
        return (*losses.lm_loss(hidden, head, batch['target_ids'], batch['loss_mask'], loss_chunk,
                                batch_shards=sharding.batch_shards(), barrier=barrier,
                                softcap=getattr(model.cfg, 'final_softcap', None)), None)
    logits = model.apply({'params': params}, batch['input_ids'], batch.get('attention_mask'),
                         batch.get('token_type_ids'), **kw)  # [batch, num_labels]
    return (*losses.classification_loss(logits, batch['label'], batch.get('valid')), logits)


def _micro_batches(batch, k):
    """Each array [batch, ...] -> [k, batch / k, ...], micro-batch i holding rows i, i + k, i + 2k, ...:
    the batch axis stays the (sharded) second one, so every device takes part in every micro-batch."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"config.optim.grad_accum={k} does not divide the batch of {x.shape[0]} rows; "
                             f"make config.train.batch_size a multiple of it.")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model, config, tx, lr_schedule):
    """`train_step(state, batch, rng) -> (state, metrics)`; metrics are float32 scalars: loss, accuracy,
    grad_norm (before clipping), learning_rate, num_tokens (tokens or examples in the loss),
    trainable_params, is_finite (1/0) and nan_count. Preference: also the per-pair means of
    `ftjax.preference.METRICS` (rewards/chosen, rewards/rejected, rewards/accuracy (= accuracy), rewards/margin,
    logps/chosen, logps/rejected, logps/accuracy), orpo's nll; num_tokens counts pairs."""
    k = int(config.optim.grad_accum)
    chunk = int(config.train.loss_chunk)
    skip_bad = config.train.nan_policy == 'skip'  # else 'halt' (ftjax.config.validate)
    task_of(model.cfg)
    pref = preference.settings(config) if is_preference(config) else None

    def summed_loss(trainable, frozen, batch, rng, norms):
        if pref is not None:  # (mean-loss part, {'pairs', 'loss_sum', 'rewards/...', ...} sums)
            if pref.reference == 'adapters_off':
                preference.check_adapters_only(trainable)
            logps, counts = preference.answer_logps(model, combine(trainable, frozen), batch, rng, chunk)
            ref = preference.reference_logps(model, pref, frozen, batch, chunk)
            return preference.loss_and_sums(pref, logps, counts, ref, *norms)
        loss, correct, count, _ = forward(model, combine(trainable, frozen), batch, rng=rng, loss_chunk=chunk)
        return loss, {'correct': correct, 'count': count}

    def sums_and_grads(state, batch, rng):
        value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)  # w.r.t. `trainable` only
        norms = preference.normalisers(batch) if pref is not None else ()  # of the whole batch
        if k == 1:
            (loss, sums), grads = value_and_grad(state.trainable, state.frozen, batch, rng, norms)
            return loss, sums, grads

        def body(carry, xs):
            i, micro = xs
            g_sum, loss, sums = carry
            (l, s), g = value_and_grad(state.trainable, state.frozen, micro, jax.random.fold_in(rng, i), norms)
            g_sum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_sum, g)
            return (g_sum, loss + l, jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
        z = jnp.zeros((), jnp.float32)
        micro = _micro_batches(batch, k)
        sums0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), jax.eval_shape(
            lambda: summed_loss(state.trainable, state.frozen, jax.tree.map(lambda x: x[0], micro), rng, norms)[1]))
        (grads, loss, sums), _ = jax.lax.scan(body, (zeros, z, sums0), (jnp.arange(k), micro))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
        return loss, sums, grads

    def train_step(state: TrainState, batch, rng):
        loss_sum, sums, grads = sums_and_grads(state, batch, rng)
        if pref is not None:  # the loss is already the batch mean
            pairs = jnp.maximum(sums['pairs'], 1.0)
            extra = {name: sums[name] / pairs for name in preference.METRICS}
            if 'nll_sum' in sums:  # orpo: its SFT part, per chosen answer token
                extra['nll'] = sums['nll_sum'] / jnp.maximum(sums['nll_tokens'], 1.0)
            correct, count, denom = extra['rewards/accuracy'], sums['pairs'], jnp.ones((), jnp.float32)
        else:
            extra, correct, count = {}, sums['correct'], sums['count']
            denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)  # gradient of the mean loss
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_bad:  # a non-finite step leaves the params and the optimizer as they were
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                                  nan_count=state.nan_count + (~finite).astype(jnp.int32))
        metrics = {
            'loss': loss, 'accuracy': correct / denom, 'grad_norm': grad_norm,
            'learning_rate': jnp.asarray(lr_schedule(state.step), jnp.float32), 'num_tokens': count,
            'trainable_params': jnp.asarray(count_params(state.trainable), jnp.float32),
            'is_finite': finite.astype(jnp.float32), 'nan_count': new_state.nan_count.astype(jnp.float32),
            **extra,
        }
        return new_state, metrics

    return train_step


def is_preference(config):
    """Whether the step trains a preference objective (`align.*`): the data are preference pairs."""
    return config.data.format == 'preference'


def make_eval_step(model, config):
    """`eval_step(params, batch) -> dict of sums`: loss_sum, correct, count (divide after summing over
    batches); classification adds per-row 'pred' and 'label' [batch] (for F1). Preference: per pair, loss_sum,
    correct (reward accuracy), count (pairs) and '<metric>_sum' of `ftjax.preference.METRICS` (orpo's loss_sum: the
    odds-ratio term only, its NLL is a per-token mean). Its reference
    with adapters off comes from `params` with the adapter leaves left out."""
    chunk = int(config.train.loss_chunk)
    task = task_of(model.cfg)
    pref = preference.settings(config) if is_preference(config) else None

    def eval_step(params, batch):
        if pref is not None:
            logps, counts = preference.answer_logps(model, params, batch, None, chunk)
            ref = preference.reference_logps(model, pref, params, batch, chunk)
            _, sums = preference.loss_and_sums(pref, logps, counts, ref, 1.0, 1.0)
            out = {'loss_sum': sums['loss_sum'], 'correct': sums['rewards/accuracy'], 'count': sums['pairs']}
            out.update({f'{name}_sum': sums[name] for name in preference.METRICS})
            return out
        loss, correct, count, logits = forward(model, params, batch, loss_chunk=chunk)
        out = {'loss_sum': loss, 'correct': correct, 'count': count}
        if task == 'classification':
            out['pred'] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out['label'] = batch['label']
        return out

    return eval_step
