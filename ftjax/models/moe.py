"""Mixture-of-experts MLP of the decoder (Qwen2/3-MoE, Mixtral, OLMoE, Granite-MoE): a router, `num_experts`
gated MLPs stacked on an 'expert' axis, an optional shared expert (Qwen2-MoE), and the routing statistics of
the load-balancing and z auxiliary losses.

  router      logits = h @ W_r [tokens, experts], float32
              'softmax_topk': top-k of softmax(logits), renormalised when norm_topk_prob (Qwen, OLMoE, Mixtral)
              'topk_softmax': softmax over the top-k logits (Granite-MoE)
  experts     y = sum_k w_k * down_e(act(gate_e(h)) * up_e(h)), e the k-th chosen expert
              'ragged': tokens sorted by expert, `jax.lax.ragged_dot` per projection (compute ~ k / experts of dense)
              'dense':  every expert on every token, combined with the routing weights (the reference; small counts)
              'capacity': GShard's dispatch: each expert's first ceil(capacity_factor x tokens x k / experts)
                        assignments in a [experts, slots] buffer, batched matmuls, the rest dropped (weight 0)
  aux loss    transformers' `load_balancing_loss_func`: experts * sum_e f_e * P_e, f_e the fraction of top-k
              assignments to e and P_e its mean router probability, both pooled over layers and non-padding tokens;
              z-loss (ST-MoE): mean logsumexp(logits)^2

Expert parallelism (`mesh.expert`): the stacked experts are split over the 'expert' mesh axis, which also splits
the batch everywhere else (data parallel). In each MoE MLP every 'expert' shard all-gathers the tokens of its
expert group (the rows the other shards of the axis hold), runs its own experts on the assignments that are
theirs (by `model.moe_impl`; a shard's ragged buffer holds at most tokens x min(k, its experts) rows) and
reduce-scatters the sums back (`sharded_experts`): one all-gather and one reduce-scatter of [tokens, embed] per
layer (`model.moe_dispatch='gather'`, dropless). `model.moe_dispatch='all_to_all'` sends each assignment only to
its expert's shard instead (`_all_to_all`): a [shards, slots, embed] buffer per shard, slots = capacity_factor x
tokens x k / shards (the assignments past them dropped, reported as 'dropped'), one all-to-all there and one back.
Per shard that moves ~2 x capacity_factor x k x tokens x embed against the gather's ~2 x tokens x embed (both x
(shards - 1) / shards): smaller when capacity_factor x k < shards (Mixtral's top-2 of 8 on 8 shards), larger for
Qwen3-MoE's top-8 (docs/performance.md measures both on TPU topologies).

Sparse upcycling (`upcycle`, config.model.upcycle_experts; Komatsuzaki et al., 2022): a dense Llama / Mistral /
Qwen3 turned into a Mixtral / Qwen3-MoE whose every expert starts as a copy of the layer's MLP (plus optional
noise), with a new router. With renormalised top-k weights and no noise it computes exactly what the dense model
did (the k chosen copies are weighted by numbers that sum to 1); fine-tuning lets the experts drift apart.

LoRA on the experts: one adapter per expert, `lora_a` [experts, in, r] and `lora_b` [experts, r, out] beside
the stacked `kernel` [experts, in, out] (merged by `ftjax.models.adapters.merge` as any other kernel).
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ftjax.errors import ConfigError
from ftjax.models import quantize
from ftjax.models.adapters import LORA_A, LORA_B, LoraSpec, lora_a_init
from ftjax.models.kernels import BATCH_AXES
from ftjax.models.layers import ACTIVATIONS, Dense

EXPERT_AXIS = 'expert'  # the mesh axis the experts are split over (ftjax.sharding.MESH_AXES)
ROUTERS = ('softmax_topk', 'topk_softmax')
IMPLS = ('ragged', 'dense', 'capacity')
STATS = ('counts', 'probs', 'z', 'rows')  # per layer, summed over non-padding tokens (`Moe` returns them;
# with moe_impl='capacity' also 'dropped', the fraction of assignments past the experts' slots)


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
    """Every layer's stats (leaves with a leading [layers] axis) -> {'load_balance', 'z', 'expert_load',
    'layer_load_max'}: the pooled losses, each expert's share of the top-k assignments over the layers [experts]
    (1 / experts when balanced), and the largest share of any expert in any one layer x experts (1 when balanced)."""
    rows = jnp.maximum(jnp.sum(stats['rows']), 1.0)
    f = jnp.sum(stats['counts'], axis=0) / rows  # [experts], sums to k
    p = jnp.sum(stats['probs'], axis=0) / rows  # [experts], sums to 1
    load = f / jnp.maximum(jnp.sum(f), 1e-9)
    per_layer = stats['counts'] / jnp.maximum(jnp.sum(stats['counts'], axis=-1, keepdims=True), 1e-9)  # [layers, e]
    out = {'load_balance': num_experts * jnp.sum(jax.lax.stop_gradient(f) * p),
           'z': jnp.sum(stats['z']) / rows, 'expert_load': load, 'layer_load_max': jnp.max(per_layer) * num_experts}
    if 'dropped' in stats:  # moe_impl='capacity' / moe_dispatch='all_to_all': the fraction dropped, over the layers
        out['dropped'] = jnp.mean(stats['dropped'])
    return out


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
               'expert_load_max': jnp.max(load), 'expert_load_min': jnp.min(load),  # pooled over the layers
               'expert_load_max_layer': jax.lax.stop_gradient(aux['layer_load_max'])}  # the busiest of any layer
    if 'dropped' in aux:
        metrics['expert_dropped'] = aux['dropped']
    return loss * count, {f'{k}_sum': jax.lax.stop_gradient(v) * count for k, v in metrics.items()}


def hidden_states(model, params, ids, positions, segment_ids, router=False, **kw):
    """`model.apply(..., return_hidden=True)` -> (hidden [batch, seq, embed], the routing statistics of every layer
    when `router` and the model has experts, else None): what the objectives' losses read."""
    experts = router and getattr(model.cfg, 'num_experts', 0)
    out = model.apply({'params': params}, ids, positions, segment_ids, return_hidden=True,
                      mutable=['intermediates'] if experts else False, **kw)
    return (out[0], out[1]['intermediates']['router']) if experts else (out, None)


def routing_metrics(sums, denom):
    """The '<name>_sum' routing metrics of `aux_loss_sums` in an objective's sums, each divided by `denom`."""
    return {k[:-len('_sum')]: v / denom for k, v in sums.items()
            if k.startswith(('router_', 'expert_')) and k.endswith('_sum')}


class ExpertDense(nn.Module):
    """Per-expert linear maps: kernel [experts, in, out] (+ LoRA per expert). Returns its matrices as a list of
    (w [experts, in, out or r], b None or [experts, r, out] scaled), the input of `apply_experts`."""
    num_experts: int
    features: int
    axes: tuple  # logical names of (expert, in, out)
    lora: LoraSpec = None
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, d):
        e, f = self.num_experts, self.features
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), self.axes)
        kernel = quantize.frozen_param(self, 'kernel', init, (e, d, f), self.param_dtype)  # [experts, in, out]
        mats = [(quantize.dequantize(kernel, self.dtype), None)]
        spec = self.lora
        if spec is not None and spec.matches('/'.join(self.path)):
            if spec.dora:
                raise ConfigError("peft.dora=true on expert projections is not supported: target the attention "
                                  "projections only (peft.lora.targets), or use LoRA on the experts.")
            ex, ein, eout = self.axes
            a = self.param(LORA_A, nn.with_logical_partitioning(lora_a_init, (ex, ein, None)), (e, d, spec.rank),
                           jnp.float32)  # [experts, in, r]
            b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (ex, None, eout)),
                           (e, spec.rank, f), jnp.float32)  # [experts, r, out]
            mats.append((a.astype(self.dtype), b.astype(self.dtype) * spec.scale))
        return mats


def project(x, mats, sizes):
    """x @ each expert's (adapted) matrix: ragged (x [sorted rows, in], `sizes` [experts]) or, sizes None, every
    expert on every row (x [rows, in] or [rows, experts, in] -> [rows, experts, out])."""
    y = 0.0
    for w, b in mats:
        if sizes is not None:
            h = jax.lax.ragged_dot(x, w, sizes)  # [sorted rows, out or r]
            y = y + (h if b is None else jax.lax.ragged_dot(h, b, sizes))
        else:
            h = jnp.einsum('ni,eio->neo' if x.ndim == 2 else 'nei,eio->neo', x, w)  # [rows, experts, out or r]
            y = y + (h if b is None else jnp.einsum('ner,ero->neo', h, b))
    return y


def apply_experts(x, idx, w, projs, impl, act, fused, first=0, capacity_factor=1.0, num_experts=None, valid=None):
    """sum_k w_k * expert_{idx_k}(x) of the experts `first` .. `first` + local - 1 (the rest contribute 0).

    x [tokens, embed]; idx, w [tokens, k]; projs: {'gate_up' or 'gate' and 'up', 'down': `ExpertDense` matrices}
    holding `local` experts of `num_experts` (default: local); impl 'capacity': each expert takes at most
    ceil(capacity_factor x tokens x k / num_experts) assignments, in token order, the rest dropped; valid [tokens]:
    padding (False) is dispatched to no expert (its MLP output is 0); -> [tokens, embed] float32."""
    n, k = idx.shape
    local = projs['down'][0][0].shape[0]
    ids = idx - first  # local expert ids; outside [0, local): another shard's
    mine = (ids >= 0) & (ids < local)
    if valid is not None:
        mine = mine & valid[:, None]
    w = jnp.where(mine, w, 0.0)
    dtype = projs['down'][0][0].dtype
    x = x.astype(dtype)

    def ffn(v, sizes):
        if fused:  # Granite-MoE: [gate | up] in one stacked projection
            g, u = jnp.split(project(v, projs['gate_up'], sizes), 2, axis=-1)
        else:
            g, u = project(v, projs['gate'], sizes), project(v, projs['up'], sizes)
        return project(act(g) * u, projs['down'], sizes)
    if impl == 'dense':
        y_all = ffn(x, None)  # [tokens, local, embed]
        full = jnp.sum(jax.nn.one_hot(ids, local, dtype=jnp.float32) * w[..., None], axis=1)  # [tokens, local]
        return jnp.einsum('ned,ne->nd', y_all.astype(jnp.float32), full)
    key = jnp.where(mine, ids, local).reshape(-1)  # [tokens * k]; others' assignments sorted last, in no group
    order = jnp.argsort(key, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)  # [local]
    if impl == 'capacity':
        return _capacity(x, key, order, sizes, w, ffn, local, k, math.ceil(
            capacity_factor * n * k / (num_experts or local)))
    cap = n * min(k, local)  # a token picks an expert once: at most this many assignments are this shard's
    ys = ffn(jnp.take(x, order[:cap] // k, axis=0), sizes)  # [cap, embed], sorted by expert
    if cap < n * k:  # the other shards' assignments: zeros
        ys = jnp.concatenate([ys, jnp.zeros((n * k - cap, ys.shape[-1]), ys.dtype)])
    ys = jnp.take(ys, jnp.argsort(order), axis=0).reshape(n, k, -1)  # back to token-major
    return jnp.einsum('nkd,nk->nd', ys.astype(jnp.float32), w)


def _capacity(x, key, order, sizes, w, ffn, local, k, slots):
    """Capacity dispatch (GShard's): each local expert's first `slots` assignments (in token order) copied into a
    [local, slots] buffer, one batched matmul per projection, the results taken back; the rest dropped (weight 0)."""
    nk, d = key.shape[0], x.shape[-1]
    slots = max(1, min(slots, nk))
    sorted_key = key[order]  # [tokens * k], grouped by expert, others' (== local) last
    starts = jnp.cumsum(sizes) - sizes  # [local]
    rank = jnp.arange(nk) - jnp.take(starts, jnp.minimum(sorted_key, local - 1))  # place within its expert
    keep = (sorted_key < local) & (rank < slots)
    dest = jnp.where(keep, sorted_key * slots + rank, local * slots)  # the slot of each sorted assignment
    src = jnp.full((local * slots + 1,), nk, jnp.int32).at[dest].set(order.astype(jnp.int32))[:-1]  # slot -> assignment
    xp = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])  # row n: an empty slot
    xb = jnp.take(xp, src // k, axis=0).reshape(local, slots, d).transpose(1, 0, 2)  # [slots, local, embed]
    yb = ffn(xb, None).transpose(1, 0, 2).reshape(local * slots, d)  # [local * slots, embed]
    yb = jnp.concatenate([yb, jnp.zeros((1, d), yb.dtype)])
    slot_of = jnp.zeros((nk,), jnp.int32).at[order].set(dest.astype(jnp.int32))  # assignment -> slot (or empty)
    ys = jnp.take(yb, slot_of, axis=0).reshape(-1, k, d)  # [tokens, k, embed]
    return jnp.einsum('nkd,nk->nd', ys.astype(jnp.float32), w)


def sharded_experts(x, idx, w, projs, impl, act, fused, batch, capacity_factor=1.0, valid=None, dispatch='gather'):
    """`apply_experts` with the experts split over the 'expert' mesh axis (`shard_map`) -> (y [tokens, embed]
    float32, the number of assignments the dispatch dropped). dispatch 'gather': each shard gathers the tokens of
    its expert group (the rows the batch axes gave the other 'expert' shards), computes its own experts on them
    and reduce-scatters the sums back (one all-gather of the tokens and one reduce-scatter per layer; nothing
    dropped); 'all_to_all': `_all_to_all` (where the tokens are split over the 'expert' axis; else 'gather')."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    ex = sizes.get(EXPERT_AXIS, 1)
    e = projs['down'][0][0].shape[0]
    none = jnp.zeros((), jnp.float32)
    if ex == 1:
        return apply_experts(x, idx, w, projs, impl, act, fused, 0, capacity_factor, e, valid), none
    if e % ex:
        raise ConfigError(f"mesh.expert={ex} must divide the model's {e} experts.")
    rows = tuple(a for a in BATCH_AXES if a in sizes)  # how the batch rows (and so the tokens) are split
    rows = rows if rows and batch % math.prod(sizes[a] for a in rows) == 0 else None
    split = rows is not None and EXPERT_AXIS in rows

    def per_shard(x, idx, w, valid, projs):
        first = jax.lax.axis_index(EXPERT_AXIS) * (e // ex)
        if split and dispatch == 'all_to_all':
            y, dropped = _all_to_all(x, idx, w, valid, projs, impl, act, fused, first, capacity_factor, e, ex)
            return y, jax.lax.psum(dropped, rows)
        if split:  # this expert group's tokens
            x, idx, w, valid = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) for a in (x, idx, w, valid))
        y = apply_experts(x, idx, w, projs, impl, act, fused, first, capacity_factor, e, valid)
        if split:
            return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True), none
        return jax.lax.psum(y, EXPERT_AXIS), none
    tok = P(rows, None)
    weights = jax.tree.map(lambda a: P(EXPERT_AXIS, *(None,) * (a.ndim - 1)), projs)
    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid
    return jax.shard_map(per_shard, in_specs=(tok, tok, tok, P(rows), weights), out_specs=(tok, P()),
                         check_vma=False)(x, idx, w, valid, projs)


def _all_to_all(x, idx, w, valid, projs, impl, act, fused, first, capacity_factor, e, ex):
    """One 'expert' shard's all-to-all dispatch: each of its assignments is copied into the buffer of its expert's
    shard ([ex, slots, embed], in token order; past `slots` dropped), the buffers exchanged (`all_to_all`), this
    shard's experts run on the rows received (one assignment each), the outputs exchanged back and summed per
    token with the routing weights. -> (y [tokens, embed] float32, assignments dropped here)."""
    n, d = x.shape
    k, local = idx.shape[1], e // ex
    slots = max(1, min(n * k, math.ceil(capacity_factor * n * k / ex)))
    dest = jnp.where(valid[:, None], idx // local, ex).reshape(-1)  # [tokens * k] the shard of each; ex: padding
    hot = jax.nn.one_hot(dest, ex, dtype=jnp.int32)  # [tokens * k, ex]; padding's row is 0
    slot = jnp.sum((jnp.cumsum(hot, axis=0) - 1) * hot, axis=1)  # its place in that shard's buffer
    keep = (dest < ex) & (slot < slots)
    dest, slot = jnp.where(keep, dest, ex), jnp.where(keep, slot, 0)  # dest ex: dropped by the scatters
    send = jnp.zeros((ex, slots, d), x.dtype).at[dest, slot].set(jnp.repeat(x, k, axis=0), mode='drop')
    eid = jnp.full((ex, slots), -1, jnp.int32).at[dest, slot].set(idx.reshape(-1).astype(jnp.int32), mode='drop')
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0)  # [ex source shards, slots, embed]: rows for my experts
    rid = jax.lax.all_to_all(eid, EXPERT_AXIS, 0, 0).reshape(-1)  # [ex * slots] their experts; -1 empty
    filled = rid >= 0
    y = apply_experts(recv.reshape(ex * slots, d), jnp.where(filled, rid, first)[:, None],
                      jnp.ones((ex * slots, 1), jnp.float32), projs, impl, act, fused, first, capacity_factor, e,
                      filled)  # [ex * slots, embed]
    back = jax.lax.all_to_all(y.reshape(ex, slots, d), EXPERT_AXIS, 0, 0)  # [ex expert shards, slots, embed]
    got = back[jnp.minimum(dest, ex - 1), slot] * jnp.where(keep, w.reshape(-1), 0.0)[:, None]  # [tokens * k, embed]
    dropped = jnp.sum(valid) * k - jnp.sum(keep)
    return jnp.sum(got.reshape(n, k, d), axis=1), dropped.astype(jnp.float32)


class Moe(nn.Module):
    """The MoE MLP: h [batch, seq, embed], valid [batch, seq] -> (y [batch, seq, embed], this layer's stats)."""
    cfg: object  # LlamaConfig with num_experts > 0

    @nn.compact
    def __call__(self, h, valid, deterministic=True):
        cfg = self.cfg
        b, t, d = h.shape
        e, k, f = cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size
        x = h.reshape(b * t, d)  # [tokens, embed]
        logits = Dense(e, ('embed', None), dtype=jnp.float32, param_dtype=cfg.param_dtype,
                       name='router')(x).astype(jnp.float32)  # [tokens, experts]; never adapted
        w, idx = route(logits, k, cfg.router, cfg.norm_topk_prob)  # [tokens, k]
        stats = routing_stats(logits, idx, valid.reshape(-1))
        if cfg.moe_impl == 'capacity':  # assignments past each expert's slots (counted as if in one group)
            slots = max(1, min(math.ceil(cfg.moe_capacity_factor * b * t * k / e), b * t * k))
            over = jnp.bincount(jnp.where(valid.reshape(-1, 1), idx, e).reshape(-1), length=e + 1)[:e] - slots
            stats['dropped'] = jnp.sum(jnp.maximum(over, 0)) / jnp.maximum(jnp.sum(valid) * k, 1).astype(jnp.float32)
        expert = lambda n, axes, name, width: ExpertDense(  # noqa: E731
            e, n, axes, cfg.lora, cfg.dtype, cfg.param_dtype, name=name)(width)
        up_axes, down_axes = ('expert', 'embed', 'mlp'), ('expert', 'mlp', 'embed')
        if cfg.fused_gate_up:
            projs = {'gate_up': expert(2 * f, up_axes, 'gate_up_proj', d)}
        else:
            projs = {'gate': expert(f, up_axes, 'gate_proj', d), 'up': expert(f, up_axes, 'up_proj', d)}
        projs['down'] = expert(d, down_axes, 'down_proj', f)
        act = ACTIVATIONS[cfg.activation]
        y, dropped = sharded_experts(x, idx, w, projs, cfg.moe_impl, act, cfg.fused_gate_up, b,
                                     cfg.moe_capacity_factor, valid.reshape(-1), cfg.moe_dispatch)  # [tokens, embed]
        if cfg.moe_dispatch == 'all_to_all':  # the assignments past the shards' buffers
            stats['dropped'] = stats.get('dropped', 0.0) + dropped / jnp.maximum(jnp.sum(valid) * k, 1)
        if cfg.shared_expert_size:  # Qwen2-MoE: a dense MLP on every token, gated by sigmoid(h @ w_g)
            dense = lambda n, axes, name: Dense(  # noqa: E731
                n, axes, lora=cfg.lora, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernels=cfg.kernels, name=name)
            sf = cfg.shared_expert_size
            sg = dense(sf, ('embed', 'mlp'), 'shared_gate_proj')(x, deterministic)
            su = dense(sf, ('embed', 'mlp'), 'shared_up_proj')(x, deterministic)
            sy = dense(d, ('mlp', 'embed'), 'shared_down_proj')(act(sg) * su, deterministic)
            gate = Dense(1, ('embed', None), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name='shared_expert_gate')(x)  # [tokens, 1]
            y = y + (jax.nn.sigmoid(gate.astype(jnp.float32)) * sy.astype(jnp.float32))
        return y.astype(cfg.dtype).reshape(b, t, d), stats


# --- sparse upcycling ---------------------------------------------------------------------------------------

UPCYCLE_TARGETS = {'llama': 'mixtral', 'mistral': 'mixtral', 'qwen3': 'qwen3_moe'}


def upcycle(pre, experts: int, top_k: int, noise: float = 0.0, seed: int = 0):
    """A `Pretrained` dense decoder -> the same with `experts` copies of each MLP, `top_k` per token; `noise`: the
    experts' weights times (1 + noise * N(0, 1)); the router N(0, 0.02), seeded."""
    cfg = pre.config
    model_type = getattr(cfg, 'model_type', None)
    if cfg.num_experts:
        raise ConfigError(f"config.model.upcycle_experts={experts}: the model already has {cfg.num_experts} experts.")
    if model_type not in UPCYCLE_TARGETS:
        raise ConfigError(f"config.model.upcycle_experts: a {model_type!r} model cannot be upcycled (supported: "
                          f"{sorted(UPCYCLE_TARGETS)}, into {sorted(set(UPCYCLE_TARGETS.values()))}).")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"config.model.upcycle_top_k={top_k} must be in [1, model.upcycle_experts={experts}].")
    if cfg.fused_gate_up or cfg.mlp_bias:
        raise ConfigError("config.model.upcycle_experts: the MLP has fused or biased projections, which ftjax's "
                          "experts do not hold.")
    rng = np.random.default_rng(seed)
    params = dict(pre.params)
    layers = dict(params['layers'])
    moe = {}
    for name in ('gate_proj', 'up_proj', 'down_proj'):
        w = np.asarray(layers.pop(name)['kernel'])  # [layers, in, out]
        copies = np.repeat(w[:, None], experts, axis=1)  # [layers, experts, in, out]
        if noise:
            copies = copies * (1 + noise * rng.standard_normal(copies.shape)).astype(copies.dtype)
        moe[name] = {'kernel': copies}
    router = rng.normal(0.0, 0.02, (cfg.num_layers, cfg.hidden_size, experts))  # [layers, embed, experts]
    moe['router'] = {'kernel': router.astype(np.asarray(moe['down_proj']['kernel']).dtype)}
    layers['moe'] = moe
    params['layers'] = layers
    new = dataclasses.replace(cfg, model_type=UPCYCLE_TARGETS[model_type], num_experts=experts, experts_per_token=top_k,
                              moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
                              router_aux_loss_coef=0.001 if UPCYCLE_TARGETS[model_type] == 'qwen3_moe' else 0.02)
    drop = ('architectures', 'model_type', 'intermediate_size', 'moe_intermediate_size', 'num_experts',
            'num_local_experts', 'num_experts_per_tok')
    hf = {k: v for k, v in (pre.hf_config or {}).items() if k not in drop}
    model = type(pre.model)(new)
    return dataclasses.replace(pre, model=model, params=params, config=new, hf_config={**hf, **new.to_hf(hf)})
