"""Mixture-of-experts MLP of the decoder (Qwen2/3-MoE, Mixtral, OLMoE, Granite-MoE): a router, `num_experts`
gated MLPs stacked on an 'expert' axis, an optional shared expert (Qwen2-MoE), and the routing statistics of
the load-balancing and z auxiliary losses.

  router      logits = h @ W_r [tokens, experts], float32
              'softmax_topk': top-k of softmax(logits), renormalised when norm_topk_prob (Qwen, OLMoE, Mixtral)
              'topk_softmax': softmax over the top-k logits (Granite-MoE)
  experts     y = sum_k w_k * down_e(act(gate_e(h)) * up_e(h)), e the k-th chosen expert
              'ragged': tokens sorted by expert, `jax.lax.ragged_dot` per projection (compute ~ k / experts of dense)
              'dense':  every expert on every token, combined with the routing weights (the reference; small counts)
  aux loss    transformers' `load_balancing_loss_func`: experts * sum_e f_e * P_e, f_e the fraction of top-k
              assignments to e and P_e its mean router probability, both pooled over layers and non-padding tokens;
              z-loss (ST-MoE): mean logsumexp(logits)^2

LoRA on the experts: one adapter per expert, `lora_a` [experts, in, r] and `lora_b` [experts, r, out] beside
the stacked `kernel` [experts, in, out] (merged by `ftjax.models.adapters.merge` as any other kernel).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError
from ftjax.models import quantize
from ftjax.models.adapters import LORA_A, LORA_B, LoraSpec, lora_a_init
from ftjax.models.layers import ACTIVATIONS, Dense

ROUTERS = ('softmax_topk', 'topk_softmax')
IMPLS = ('ragged', 'dense')
STATS = ('counts', 'probs', 'z', 'rows')  # per layer, summed over non-padding tokens (`Moe` returns them)


def route(logits, k, router='softmax_topk', norm_topk_prob=True):
    """logits [tokens, experts] float32 -> (weights [tokens, k] float32, experts [tokens, k] int32)."""
    if router == 'topk_softmax':
        top, idx = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top, axis=-1), idx
    if router != 'softmax_topk':
        raise ConfigError(f"model.router={router!r}: expected one of {ROUTERS}.")
    w, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, idx


def routing_stats(logits, idx, valid):
    """One layer's sums over its valid tokens: logits [tokens, experts], idx [tokens, k], valid [tokens] ->
    {'counts': [experts] top-k assignments, 'probs': [experts] softmax mass, 'z': logsumexp^2, 'rows': tokens}."""
    e = logits.shape[-1]
    v = valid.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * v[:, None, None], axis=(0, 1))  # [experts]
    probs = jnp.sum(jax.nn.softmax(logits, axis=-1) * v[:, None], axis=0)  # [experts]
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * v)
    return {'counts': counts, 'probs': probs, 'z': z, 'rows': jnp.sum(v)}


def aux_losses(stats, num_experts):
    """Every layer's stats (leaves with a leading [layers] axis) -> {'load_balance', 'z', 'expert_load'}:
    the pooled losses, and each expert's share of the top-k assignments [experts] (1 / experts when balanced)."""
    rows = jnp.maximum(jnp.sum(stats['rows']), 1.0)
    f = jnp.sum(stats['counts'], axis=0) / rows  # [experts], sums to k
    p = jnp.sum(stats['probs'], axis=0) / rows  # [experts], sums to 1
    load = f / jnp.maximum(jnp.sum(f), 1e-9)
    return {'load_balance': num_experts * jnp.sum(jax.lax.stop_gradient(f) * p),
            'z': jnp.sum(stats['z']) / rows, 'expert_load': load}


def aux_loss_sums(stats, cfg, count):
    """(the part of a summed training loss the auxiliary losses add, their metrics as '<name>_sum'), both scaled
    by `count` (the tokens the summed loss is divided by): cfg.router_aux_loss_coef x load balance (+
    cfg.router_z_loss_coef x z-loss), the routing statistics `stats` being the 'router' intermediates of `Llama`."""
    aux = aux_losses(stats, cfg.num_experts)
    load = jax.lax.stop_gradient(aux['expert_load']) * cfg.num_experts  # 1 per expert when balanced
    loss = cfg.router_aux_loss_coef * aux['load_balance']
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * aux['z']
    metrics = {'router_aux_loss': aux['load_balance'], 'router_z_loss': aux['z'],
               'expert_load_max': jnp.max(load), 'expert_load_min': jnp.min(load)}
    return loss * count, {f'{k}_sum': jax.lax.stop_gradient(v) * count for k, v in metrics.items()}


class ExpertDense(nn.Module):
    """Per-expert linear maps, kernel [experts, in, out] (+ LoRA per expert). Called on tokens sorted by
    expert with `sizes` [experts] (ragged), or with sizes None on x [tokens, in] or [tokens, experts, in]
    (every expert: [tokens, experts, out])."""
    num_experts: int
    features: int
    axes: tuple  # logical names of (expert, in, out)
    lora: LoraSpec = None
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, sizes=None):
        e, f = self.num_experts, self.features
        d = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), self.axes)
        kernel = quantize.frozen_param(self, 'kernel', init, (e, d, f), self.param_dtype)  # [experts, in, out]
        mats = [(quantize.dequantize(kernel, self.dtype), None)]
        spec = self.lora
        if spec is not None and spec.matches('/'.join(self.path)):
            if spec.dora:
                raise ConfigError("peft.dora=true on expert projections is not supported: target the attention "
                                  "projections only (peft.targets), or use LoRA on the experts.")
            ex, ein, eout = self.axes
            a = self.param(LORA_A, nn.with_logical_partitioning(lora_a_init, (ex, ein, None)), (e, d, spec.rank),
                           jnp.float32)  # [experts, in, r]
            b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (ex, None, eout)),
                           (e, spec.rank, f), jnp.float32)  # [experts, r, out]
            mats.append((a.astype(self.dtype), b.astype(self.dtype) * spec.scale))
        x = x.astype(self.dtype)
        y = 0.0
        for w, b in mats:
            if sizes is not None:  # [sorted tokens, in] -> [sorted tokens, out]
                h = jax.lax.ragged_dot(x, w, sizes)
                y = y + (h if b is None else jax.lax.ragged_dot(h, b, sizes))
            else:
                eq = 'ni,eio->neo' if x.ndim == 2 else 'nei,eio->neo'
                h = jnp.einsum(eq, x, w)  # [tokens, experts, out or r]
                y = y + (h if b is None else jnp.einsum('ner,ero->neo', h, b))
        return y


class Moe(nn.Module):
    """The MoE MLP: h [batch, seq, embed], valid [batch, seq] -> (y [batch, seq, embed], this layer's stats)."""
    cfg: object  # LlamaConfig with num_experts > 0

    @nn.compact
    def __call__(self, h, valid, deterministic=True):
        cfg = self.cfg
        b, t, d = h.shape
        e, k, f = cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size
        x = h.reshape(b * t, d)  # [tokens, embed]
        dense = lambda n, axes, name: Dense(  # noqa: E731
            n, axes, lora=cfg.lora, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernels=cfg.kernels, name=name)
        logits = Dense(e, ('embed', None), dtype=jnp.float32, param_dtype=cfg.param_dtype,
                                name='router')(x).astype(jnp.float32)  # [tokens, experts]; never adapted
        w, idx = route(logits, k, cfg.router, cfg.norm_topk_prob)  # [tokens, k]
        stats = routing_stats(logits, idx, valid.reshape(-1))
        expert = lambda n, axes, name: ExpertDense(  # noqa: E731
            e, n, axes, cfg.lora, cfg.dtype, cfg.param_dtype, name=name)
        act = ACTIVATIONS[cfg.activation]
        if cfg.fused_gate_up:  # Granite-MoE: [gate | up] in one stacked projection
            gate_up = expert(2 * f, ('expert', 'embed', 'mlp'), 'gate_up_proj')
            gate_of = lambda v, s: jnp.split(gate_up(v, s), 2, axis=-1)  # noqa: E731
        else:
            gate_p = expert(f, ('expert', 'embed', 'mlp'), 'gate_proj')
            up_p = expert(f, ('expert', 'embed', 'mlp'), 'up_proj')
            gate_of = lambda v, s: (gate_p(v, s), up_p(v, s))  # noqa: E731
        down = expert(d, ('expert', 'mlp', 'embed'), 'down_proj')
        if cfg.moe_impl == 'dense':
            g, u = gate_of(x, None)  # [tokens, experts, mlp]
            y_all = down(act(g) * u, None)  # [tokens, experts, embed]
            full = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * w[..., None], axis=1)  # [tokens, experts]
            y = jnp.einsum('ned,ne->nd', y_all.astype(jnp.float32), full)
        else:
            flat = idx.reshape(-1)  # [tokens * k]
            order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
            sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [experts]
            xs = jnp.take(x, order // k, axis=0)  # [tokens * k, embed]
            g, u = gate_of(xs, sizes)
            ys = down(act(g) * u, sizes)  # [tokens * k, embed], sorted
            ys = jnp.take(ys, jnp.argsort(order), axis=0).reshape(b * t, k, d)  # back to token-major
            y = jnp.einsum('nkd,nk->nd', ys.astype(jnp.float32), w)
        if cfg.shared_expert_size:  # Qwen2-MoE: a dense MLP on every token, gated by sigmoid(h @ w_g)
            sf = cfg.shared_expert_size
            sg = dense(sf, ('embed', 'mlp'), 'shared_gate_proj')(x, deterministic)
            su = dense(sf, ('embed', 'mlp'), 'shared_up_proj')(x, deterministic)
            sy = dense(d, ('mlp', 'embed'), 'shared_down_proj')(act(sg) * su, deterministic)
            gate = Dense(1, ('embed', None), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  name='shared_expert_gate')(x)  # [tokens, 1]
            y = y + (jax.nn.sigmoid(gate.astype(jnp.float32)) * sy.astype(jnp.float32))
        return y.astype(cfg.dtype).reshape(b, t, d), stats
