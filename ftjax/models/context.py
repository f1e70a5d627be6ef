"""Context parallelism: the sequence of every row split over the 'context' mesh axis (`mesh.context`).

Between the blocks, activations are [batch, seq, embed] with seq sharded over 'context' (the logical axis
'activation_length', `ftjax.config_schema.DEFAULT_RULES`); everything but attention is per token, so only
attention talks across the axis, in one of two ways (`model.context_parallel`):

  all_gather  each shard gathers every key, value, segment id and token index of its rows first, then attends
              its own queries to all of them (one all-gather of K and V per layer; the backward pass
              reduce-scatters their gradients).
  ring        each shard attends its queries to the key/value block it holds, passes the block to the next
              shard with `ppermute` and takes the previous one's, `context` times, merging the partial results
              with an online softmax (no shard ever holds more than its own block and one in flight).

Causal attention would leave the first shard idle half the time (its queries see few keys); with
`model.context_load_balance` the tokens are dealt out in zig-zag order first (the sequence cut into
2 x context pieces, shard i holding pieces i and 2 x context - 1 - i: `zigzag_order`), every shard doing the same
work, and put back in order after the last block (`Llama.__call__`): the loss is computed on the tokens in their
order, its chunking unchanged. Masks are built from each token's index in its row (`order`), so packed rows
(segment ids) and sliding windows hold in any order.

With `model.kernels=splash` (TPU) the all_gather strategy attends with the splash kernel: the gathered keys are
put back in row order, and one kernel for the whole row is built with its mask split over the shards
(`q_seq_shards`), each shard's part computed from its queries' row indices (`_RowCausal`), so a shard holds a
[block, block] tile of scores, not a [chunk, seq] block. (ring always runs the einsum blocks.)
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from ftjax.errors import ConfigError
from ftjax.models import kernels

AXIS = 'context'  # the mesh axis (ftjax.sharding.MESH_AXES)


def size() -> int:
    """The size of the 'context' axis of the mesh set with `jax.set_mesh` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(AXIS, 1)


def zigzag_order(t: int, c: int) -> np.ndarray:
    """[t] token indices in the order the context shards hold them: piece i and piece 2c - 1 - i on shard i."""
    if t % (2 * c):
        raise ConfigError(f"context parallelism with load balancing needs a sequence length that is a multiple of "
                          f"2 x mesh.context = {2 * c}, got {t}: set data.max_length to a multiple of {2 * c} (or "
                          f"model.context_load_balance=False, which needs a multiple of {c}).")
    pieces = np.arange(t).reshape(2 * c, t // (2 * c))
    return np.concatenate([np.concatenate([pieces[i], pieces[2 * c - 1 - i]]) for i in range(c)])


def _all_gather(q, k, v, seg, order, local, *, window, scale, softcap, c):
    del c
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k_all, v_all, seg_all, order_all = gather(k), gather(v), gather(seg), gather(order)
    return kernels.chunked_attention(q, k_all, v_all, order, seg, order_all, seg_all, window, local, scale=scale,
                                     softcap=softcap)  # [chunk, seq] scores at a time


def _ring(q, k, v, seg, order, local, *, window, scale, softcap, c):
    """Online-softmax attention over the key/value blocks as they come round the ring of `c` shards."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)  # [b, kvh, g*t, d]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    low = jnp.finfo(jnp.float32).min
    top = jnp.full((b, kvh, g * t), low, jnp.float32)  # running max, sum and weighted values
    total = jnp.zeros((b, kvh, g * t), jnp.float32)
    acc = jnp.zeros((b, kvh, g * t, d), jnp.float32)
    block = (k, v, seg, order)
    for step in range(c):
        kb, vb, sb, ob = block
        mask = kernels.token_mask(order, seg, ob, sb, window, local)  # [b, t, tk]
        m = jnp.broadcast_to(mask[:, None, None], (b, 1, g) + mask.shape[1:]).reshape(b, 1, g * t, -1)
        s = jnp.einsum('bkqd,bskd->bkqs', qg, kb, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(m, s, low)
        new_top = jnp.maximum(top, s.max(-1))
        p = jnp.exp(s - new_top[..., None]) * m  # masked keys add nothing, even in a fully masked block
        fix = jnp.exp(top - new_top)
        total = total * fix + p.sum(-1)
        acc = acc * fix[..., None] + jnp.einsum('bkqs,bskd->bkqd', p.astype(vb.dtype), vb,
                                                preferred_element_type=jnp.float32)
        top = new_top
        if step + 1 < c:  # shard i passes its block to i + 1
            block = jax.lax.ppermute(block, AXIS, [(i, (i + 1) % c) for i in range(c)])
    o = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [b, kvh, g*t, d]
    return o.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


STRATEGIES = {'all_gather': _all_gather, 'ring': _ring}


class _RowCausal(sm._ComputableMask):
    """The splash mask of queries held in `q_order` (each one's index in its row; shards of it per device)
    against keys in row order: causal, and within the last `window` keys when given."""

    def __init__(self, q_order, window=None, shard_count=1):
        self.window = window
        t = len(q_order)
        if window is None:
            fn = lambda q_ids, kv_ids: q_ids >= kv_ids  # noqa: E731
        else:
            fn = lambda q_ids, kv_ids: (q_ids >= kv_ids) & (q_ids - kv_ids < window)  # noqa: E731
        super().__init__((t, t), fn, shard_count=shard_count)
        self.q_sequence = np.asarray(q_order, np.int32)

    def __eq__(self, other):
        return (isinstance(other, _RowCausal) and self.shape == other.shape and self.window == other.window
                and np.array_equal(self.q_sequence, other.q_sequence))

    def __hash__(self):
        return hash((type(self), self.shape, self.window, self.q_sequence.tobytes()))


def _splash_kernel(t, heads, c, balanced, window, softcap, interpret):
    """The splash kernel of one row of `t` tokens, its mask split over `c` query shards (one per context
    shard; zig-zag order when `balanced`). Its mask info is computed once per mask (splash caches it by the
    mask's hash); the kernel's arrays are made in each trace."""
    q_order = zigzag_order(t, c) if balanced else np.arange(t)
    mask = sm.MultiHeadMask([_RowCausal(q_order, window, shard_count=c)] * heads)
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=c, block_sizes=kernels.splash_block_sizes(t // c),
                              attn_logits_soft_cap=softcap, interpret=interpret)


def _splash(q, k, v, seg, kernel, *, balanced, scale, c):
    """This shard's queries [b, t/c, h, d] against every key, with `kernel` (its mask part is this shard's)."""
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k), gather(v), gather(seg)  # [b, t, kvh, d] x2, [b, t]: zig-zag if balanced
    if balanced:  # the keys back in row order: the kernel's key index is the row index
        back = np.argsort(zigzag_order(k_all.shape[1], c))
        k_all, v_all, seg_all = (jnp.take(x, back, axis=1) for x in (k_all, v_all, seg_all))
    qs = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, h, t/c, d]; splash does not scale
    kt, vt = k_all.transpose(0, 2, 1, 3), v_all.transpose(0, 2, 1, 3)  # [b, kvh, t, d]
    o = jax.vmap(lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(sq, skv)))(
        qs, kt, vt, seg, seg_all)
    return o.transpose(0, 2, 1, 3).astype(q.dtype)  # [b, t/c, h, d]


def attention(q, k, v, segment_ids, order, strategy: str, window=None, *, local=None, scale=None, softcap=None,
              kernel='cpu', balanced=False, interpret=False):
    """Causal attention of rows whose sequence is split over the 'context' axis of the current mesh.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids, order: [batch, seq]
    (order: each token's index in its row, the zig-zag order's when `balanced`, else arange); `local`: the
    layer's traced window flag (None: `window` applies as given). Rows over the batch axes and heads over
    'tensor' where they divide evenly (`kernels.split_axes`, as for the fused kernels). `kernel`: the resolved
    model.kernels ('splash': the all_gather strategy with the splash kernel, see the module docstring;
    `interpret` runs it in Pallas's interpreter, for tests on the CPU)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"config.model.context_parallel={strategy!r} is not one of {sorted(STRATEGIES)}.")
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if q.shape[1] % sizes[AXIS]:
        raise ConfigError(f"context parallelism: the sequence ({q.shape[1]} tokens) is not divisible by "
                          f"mesh.context={sizes[AXIS]}; set data.max_length to a multiple of it.")
    rows, heads = kernels.split_axes(mesh, q, k)
    qkv, tok = P(rows, AXIS, heads, None), P(rows, AXIS)
    c = sizes[AXIS]
    if kernel == 'splash' and strategy == 'all_gather' and (q.shape[1] // c) % 128 == 0:
        if window is not None and local is not None:  # mixed layers: the windowed or the full kernel
            kw = dict(scale=scale, softcap=softcap, kernel=kernel, balanced=balanced, interpret=interpret)
            return jax.lax.cond(local, lambda: attention(q, k, v, segment_ids, order, strategy, window, **kw),
                                lambda: attention(q, k, v, segment_ids, order, strategy, None, **kw))
        local_heads = q.shape[2] // (sizes[heads] if heads else 1)
        fn = _splash_kernel(q.shape[1], local_heads, c, balanced, window, softcap, interpret)
        spec = fn.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, AXIS)))
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        run = jax.shard_map(functools.partial(_splash, balanced=balanced, scale=scale, c=c),
                            in_specs=(qkv, qkv, qkv, tok, spec), out_specs=qkv, check_vma=False)
        return run(q, k, v, segment_ids.astype(jnp.int32), fn)
    flag = jnp.asarray(True) if local is None else local
    fn = functools.partial(STRATEGIES[strategy], window=window, scale=scale, softcap=softcap, c=c)
    run = jax.shard_map(lambda q, k, v, s, o, f: fn(q, k, v, s, o, None if local is None else f),
                        in_specs=(qkv, qkv, qkv, tok, tok, P()), out_specs=qkv, check_vma=False)
    return run(q, k, v, segment_ids.astype(jnp.int32), order.astype(jnp.int32), flag)
