"""One pure train step for every fine-tuning mode and every objective, and an eval step that returns exact sums.

  train_step(state, batch, rng) -> (state, metrics)

The mode only shows in `state` (which leaves are in `state.trainable`) and in the model (adapter
leaves): the step differentiates with respect to `state.trainable` alone, so frozen weights get no
gradient buffer and no optimizer state. Jit it with `donate_argnums=0`; the sharding (in/out
shardings around it) is the caller's business.

The objective (language modelling, classification, preference, ...) is a value, `ftjax.objectives.Objective`,
chosen once by `ftjax.objectives.objective_for(config, model)`: the step calls its functions and never asks
which one it is. Its loss is a sum (`objective.sums`), over micro-batches too, divided once by
`objective.finalize`'s denominator; objectives whose loss is a mean take their denominators from the whole
batch (`objective.normalisers`) before the split.

Gradient accumulation (`optim.grad_accum` = k) splits the batch into k micro-batches inside the
step and scans over them, summing the gradients of the *summed* loss; the sum is divided by the
denominator once, so the update equals that of the whole batch at once.
"""
import jax
import jax.numpy as jnp
import optax

from ftjax.objectives import objective_for
from ftjax.objectives.objective import check_batch
from ftjax.state import TrainState
from ftjax.tree import count_params


def _micro_batches(batch, k):
    """Each array [batch, ...] -> [k, batch / k, ...], micro-batch i holding rows i, i + k, i + 2k, ...:
    the batch axis stays the (sharded) second one, so every device takes part in every micro-batch."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"config.optim.grad_accum={k} does not divide the batch of {x.shape[0]} rows; "
                             f"make config.train.batch_size a multiple of it.")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model, config, tx, lr_schedule, objective=None):
    """`train_step(state, batch, rng) -> (state, metrics)` of `objective` (default: `objective_for(config,
    model)`); metrics are float32 scalars: loss, the objective's (accuracy and num_tokens among them: tokens,
    examples or pairs in the loss; preference adds its reward and log-prob means), grad_norm (before clipping),
    learning_rate, trainable_params, is_finite (1/0) and nan_count."""
    objective = objective_for(config, model) if objective is None else objective
    k = int(config.optim.grad_accum)
    skip_bad = config.train.nan_policy == 'skip'  # else 'halt' (ftjax.config.validate)
    offload_state = bool(config.optim.offload_state)  # the state's shardings put it in pinned_host (build)

    def summed_loss(trainable, frozen, batch, rng, norms):  # (loss part, sums)
        return objective.sums(model, trainable, frozen, batch, rng, norms)

    def sums_and_grads(state, batch, rng):
        value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)  # w.r.t. `trainable` only
        norms = objective.normalisers(batch)  # of the whole batch
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
        check_batch(objective, batch)
        loss_sum, sums, grads = sums_and_grads(state, batch, rng)
        denom, extra = objective.finalize(sums)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)  # gradient of the mean loss
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        if offload_state:  # in host memory between steps: on the device for the update only
            state = state.replace(opt_state=jax.device_put(state.opt_state, jax.memory.Space.Device))
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_bad:  # a non-finite step leaves the params and the optimizer as they were
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                                  nan_count=state.nan_count + (~finite).astype(jnp.int32))
        metrics = {
            'loss': loss, **extra, 'grad_norm': grad_norm,
            'learning_rate': jnp.asarray(lr_schedule(state.step), jnp.float32),
            'trainable_params': jnp.asarray(count_params(state.trainable), jnp.float32),
            'is_finite': finite.astype(jnp.float32), 'nan_count': new_state.nan_count.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model, config, objective=None):
    """`eval_step(params, batch) -> dict of sums` of `objective` (default: `objective_for(config, model)`):
    loss_sum, correct, count (divide after summing over batches) and the objective's own ('pred' and 'label'
    [batch] of classification, for F1; '<metric>_sum' of preference)."""
    objective = objective_for(config, model) if objective is None else objective

    def eval_step(params, batch):
        check_batch(objective, batch)
        return objective.eval_sums(model, params, batch)

    return eval_step
