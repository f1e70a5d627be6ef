"""Which kernels the hot path uses: the matmuls of `layers.Dense`, self-attention, and (through
`train_step`) the fused loss. `config.model.kernels` picks them:

  'auto'    'cpu' on the CPU backend, 'splash' on TPU, 'cudnn' on GPU (`resolve`)
  'cpu'     custom VJPs laid out for XLA's CPU backend (transposes behind optimization barriers,
            attention recomputed from the saved log-normaliser): what ftjax always ran on the CPU
  'xla'     plain `x @ w` and `jax.nn.dot_product_attention(implementation='xla')`; no barriers
  'splash'  'xla' with TPU splash attention (a Pallas/Mosaic kernel) for causal, packed self-attention
  'cudnn'   'xla' with cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`),
            the XLA attention when cuDNN refuses the shape or dtype

Every choice computes the same function (tests/test_kernels.py compares each with the reference
einsum attention and plain matmuls, forward and gradients). Decoding with a KV cache always uses
`attend` with an explicit mask.

Family options of the attention: `window` (sliding-window layers; `local` a traced per-layer flag picks
windowed or not inside the layer scan), `scale` (the score scale, default head_dim ** -0.5) and `softcap`
(Gemma 2: scores -> tanh(scores / c) * c before the mask). XLA's and cuDNN's fused attention cannot
soft-cap: with `softcap` those choices run the einsum attention of 'cpu' (`attend`), said once in the log.
"""
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from ftjax.errors import ConfigError

CHOICES = ('auto', 'cpu', 'xla', 'splash', 'cudnn')  # config.model.kernels
AUTO = {'cpu': 'cpu', 'tpu': 'splash', 'gpu': 'cudnn', 'cuda': 'cudnn', 'rocm': 'xla'}
BATCH_AXES, HEAD_AXIS = ('data', 'fsdp', 'expert'), 'tensor'  # mesh axes (ftjax.sharding.MESH_AXES)
NARROW_Q = 16  # query rows per KV head up to which the CPU decodes a batch of rows with `_narrow_attention`
Q_CHUNK = 1024  # longer sequences: the einsum attention runs over query chunks of this many tokens (`chunked_attention`)
SPLASH_BLOCK = 512  # splash tile along q and kv (smaller for short sequences)


RUNS_ON = {'splash': ('tpu',), 'cudnn': ('gpu', 'cuda')}  # choices only some platforms can run
PLATFORM_NAMES = {'tpu': 'TPU', 'gpu': 'an NVIDIA GPU', 'cuda': 'an NVIDIA GPU'}


def runnable(platform: str):
    """The config.model.kernels values that `platform` ('cpu', 'tpu', 'gpu') can run."""
    return [c for c in CHOICES if platform in RUNS_ON.get(c, (platform,))]


def resolve(choice: str, platform: str) -> str:
    """config.model.kernels -> the kernels used on `platform` ('cpu', 'tpu', 'gpu'): never 'auto'. A choice the
    platform cannot run (splash off TPU, cuDNN off an NVIDIA GPU) is a ConfigError naming what runs there."""
    if choice not in CHOICES:
        raise ConfigError(f"config.model.kernels={choice!r} is not known; choose one of {list(CHOICES)}.")
    if platform not in RUNS_ON.get(choice, (platform,)):
        raise ConfigError(f"config.model.kernels={choice!r} runs on {PLATFORM_NAMES[RUNS_ON[choice][0]]} only, and "
                          f"this run's platform is {platform!r}: use one of {runnable(platform)} here ('auto' picks "
                          f"{AUTO.get(platform, 'xla')!r}).")
    return AUTO.get(platform, 'xla') if choice == 'auto' else choice


# ---------------------------------------------------------------------------------------------
# Matmuls
# ---------------------------------------------------------------------------------------------

@jax.custom_vjp
def linear(x, w):
    """x [..., in] @ w [in, out], with a backward pass laid out for the CPU's matmul kernels.

    The weight gradient contracts over the tokens (x^T @ g). Left to itself, XLA's CPU backend
    makes the kernel-friendly operand by writing the [tokens, out] gradient transposed (fused into
    the elementwise ops before it, a strided write that cost more than the matmuls of the MLP on
    SmolLM2). Here the narrower of x and g is transposed explicitly, behind an optimization
    barrier so that the transpose is not folded back into the dot. Same values as `x @ w`.
    """
    return x @ w


def _linear_fwd(x, w):
    # symbolic_zeros: `perturbed` says whether a gradient flows to the input; a frozen kernel
    # (LoRA, partial fine-tuning) then gets no weight-gradient matmul at all.
    y = x.value @ w.value
    return y, (w.value if x.perturbed else None, x.value if w.perturbed else None)  # None: not needed


def _linear_bwd(res, g):
    w, x = res
    dx = None if w is None else g @ w.T  # [..., in]
    dw = None
    if x is not None:
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        g2 = g.reshape(-1, g.shape[-1])  # [tokens, out]
        if x2.shape[1] <= g2.shape[1]:
            dw = jax.lax.optimization_barrier(x2.T) @ g2  # [in, out]
        else:
            dw = (jax.lax.optimization_barrier(g2.T) @ x2).T  # ([out, tokens] @ [tokens, in]).T
        dw = dw.astype(x.dtype)  # Dense casts x and the kernel to one compute dtype
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def matmul(x, w, kernels: str = 'cpu'):
    """x [..., in] @ w [in, out]: the CPU custom VJP for kernels='cpu', XLA's own dot otherwise."""
    return linear(x, w) if kernels == 'cpu' else x @ w


# ---------------------------------------------------------------------------------------------
# Attention with an explicit mask (the CPU path, decoding, encoders)
# ---------------------------------------------------------------------------------------------

def causal_mask(segment_ids, q_positions=None, kv_len=None, kv_valid=None, window=None):
    """[batch, q_len, kv_len] bool: causal, and within one segment when `segment_ids` is given.

    Training/prefill: q and kv are the same tokens; `window` w keeps only the last w keys of each
    query (itself included). Decoding with a cache: `q_positions` are the cache slots of the queries
    and `kv_valid` [batch, kv_len] marks filled, non-padding slots (contiguous per row, so a slot
    distance is a position distance and `window` applies to slots alike).
    """
    if q_positions is None:
        idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)  # [batch, seq]
        return token_mask(idx, segment_ids, idx, segment_ids, window)
    slots = jnp.arange(kv_len)
    mask = slots[None, None, :] <= q_positions[:, :, None]  # [batch, q, kv]
    if window is not None:
        mask = mask & (q_positions[:, :, None] - slots[None, None, :] < window)
    return mask & kv_valid[:, None, :]


def attend(q, k, v, mask, dtype, scale=None, softcap=None):
    """Grouped-query attention without repeating K/V (the 'cpu' kernels).

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = may attend). Returns [batch, q_len, heads, head_dim].
    scale: of the scores (None: 1 / sqrt(head_dim)); softcap c: scores -> tanh(scores / c) * c.
    The query heads of one KV head are folded into the query axis, so each KV head is one batched
    matmul: [batch, kv_heads, groups * q_len, head_dim] against [batch, kv_heads, kv_len, head_dim].
    """
    kt = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, kv_len, head_dim]
    vt = v.transpose(0, 2, 1, 3)
    return attend_heads_major(q, kt, vt, mask, dtype, scale, softcap)


def attend_heads_major(q, kt, vt, mask, dtype, scale=None, softcap=None, kernels=None):
    """`attend` with k, v laid out [batch, kv_heads, kv_len, head_dim] (the KV cache's layout: no transpose).
    `kernels`: the model's setting when decoding from a KV cache; with 'cpu', a batch of rows with a few query
    rows per KV head goes through `_narrow_attention` (None, as in training: always `_attention`). One row keeps
    the batched dot: SmolLM2 at 640 cache slots, 43.9 -> 39.7 ms per token with it (docs/performance.md)."""
    b, t, h, d = q.shape
    kvh, s = kt.shape[1], kt.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)  # [b, kvh, g*t, d]
    m = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)  # [b, 1, g*t, kv_len]
    attention = _narrow_attention if kernels == 'cpu' and b > 1 and g * t <= NARROW_Q else _attention
    o = attention(qg.astype(dtype), kt.astype(dtype), vt.astype(dtype), m, scale, softcap)  # [b, kvh, g*t, d]
    return o.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _narrow_attention(q, k, v, mask, scale=None, softcap=None):
    """`_attention` for a few query rows per KV head (decoding), with the scores summed elementwise over
    head_dim instead of a batched dot: XLA's CPU backend computes one small dot per (row, KV head) and packs
    k transposed for it, which cost 2.4x the probabilities-times-v dot of the same size (SmolLM2, 16 rows, 640
    cache slots: decode step 141 -> 118 ms; docs/performance.md). Same values up to float32 rounding."""
    s = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * k[:, :, None].astype(jnp.float32), axis=-1)  # [b,k,q,kv]
    s = s / math.sqrt(q.shape[-1]) if scale is None else s * scale
    s = s if softcap is None else jnp.tanh(s / softcap) * softcap
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum('bkqs,bksd->bkqd', p.astype(v.dtype), v)


def masked_attention(q, k, v, mask, dtype, kernels: str = 'cpu'):
    """Attention with an explicit mask [batch, q_len, kv_len] (encoders): `attend` for kernels='cpu',
    `jax.nn.dot_product_attention` (XLA) otherwise. Shapes as `attend`."""
    if kernels == 'cpu':
        return attend(q, k, v, mask, dtype)
    return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask[:, None],
                                        implementation='xla')


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) scores [b, kvh, q, kv] in float32."""
    s = jnp.einsum('bkqd,bksd->bkqs', q, k, preferred_element_type=jnp.float32)
    s = s / math.sqrt(q.shape[-1]) if scale is None else s * scale
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _probs(q, k, mask, scale=None, softcap=None):
    """Softmax probabilities [b, kvh, q, kv] (float32) and their log-normaliser [b, kvh, q]."""
    scores = jnp.where(mask, _scores(q, k, scale, softcap), jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = jnp.exp(scores - top)
    total = e.sum(axis=-1, keepdims=True)
    # e / total, not exp(scores - lse): lse rounds at the scale of the scores (an ulp of ~30 is 2e-6), which
    # moved every probability by that much; Gemma 3's float32 logits were 2x further from float64 for it
    return e * (1.0 / total), (top + jnp.log(total))[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale=None, softcap=None):
    """softmax(q k^T / sqrt(d), masked) v over [b, kvh, q, d] x [b, kvh, kv, d] (`scale`, `softcap`: `attend`).

    The backward pass recomputes the probabilities from q, k and the saved log-normaliser instead
    of keeping them (FlashAttention's trade, here without tiling): a [q, kv] matrix per head and
    layer is not stored across the whole forward pass. Its matmuls contract over the query axis by
    transposing the narrow [q, head_dim] operands, never the [q, kv] probabilities.
    """
    p, _ = _probs(q, k, mask, scale, softcap)
    return jnp.einsum('bkqs,bksd->bkqd', p.astype(v.dtype), v)


def _attention_fwd(q, k, v, mask, scale, softcap):
    p, lse = _probs(q, k, mask, scale, softcap)
    o = jnp.einsum('bkqs,bksd->bkqd', p.astype(v.dtype), v)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(scale, softcap, res, do):
    q, k, v, mask, o, lse = res
    scores = _scores(q, k, scale, softcap)
    p = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)  # [b, kvh, q, kv]
    t = lambda x: jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))  # a narrow [q, d] -> [d, q]
    dv = jnp.swapaxes(t(do) @ p.astype(do.dtype), -1, -2)  # [b, kvh, kv, d]
    dp = jnp.einsum('bkqd,bksd->bkqs', do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [b, kvh, q, 1]
    ds = p * (dp - delta)  # d loss / d (capped) scores
    if softcap is not None:  # d(tanh(s / c) * c) / ds = 1 - tanh(s / c)^2
        ds = ds * (1.0 - jnp.square(scores / softcap))
    ds = (ds / math.sqrt(q.shape[-1]) if scale is None else ds * scale).astype(q.dtype)
    dq = ds @ k  # [b, kvh, q, d]
    dk = jnp.swapaxes(t(q) @ ds, -1, -2)  # [b, kvh, kv, d]
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------------------------
# Causal self-attention over packed rows (training, eval): the kernel choice
# ---------------------------------------------------------------------------------------------

def self_attention(q, k, v, segment_ids, kernels: str, window=None, *, local=None, scale=None, softcap=None,
                   interpret=False):
    """Causal attention of packed rows, each token within its segment (and its last `window` keys).

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (GQA: heads a multiple of
    kv_heads); segment_ids: [batch, seq] int. Returns [batch, seq, heads, head_dim] in q's dtype.
    local: None (`window` applies as given) or a traced bool scalar, the layer's flag inside the layer scan:
      the window applies where it is true (a `lax.cond` between the windowed and the full call).
    scale: of the scores (None: 1 / sqrt(head_dim)); softcap: see the module docstring.
    `interpret` runs the splash kernel in Pallas's interpreter (tests on the CPU).
    """
    kw = dict(scale=scale, softcap=softcap, interpret=interpret)
    if window is not None and local is not None:
        return jax.lax.cond(local, lambda: self_attention(q, k, v, segment_ids, kernels, window, **kw),
                            lambda: self_attention(q, k, v, segment_ids, kernels, None, **kw))
    if kernels == 'cpu' or (softcap is not None and kernels in ('xla', 'cudnn')):
        if kernels != 'cpu':
            _log_once(f'kernels: {kernels} attention cannot soft-cap attention logits (model attn_softcap); '
                      f'using the einsum attention of kernels=cpu.')
        if q.shape[1] > Q_CHUNK:
            index = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids.shape)  # [batch, seq]
            return chunked_attention(q, k, v, index, segment_ids, index, segment_ids, window, scale=scale,
                                     softcap=softcap)
        return attend(q, k, v, causal_mask(segment_ids, window=window), q.dtype, scale, softcap)
    if kernels == 'splash':
        if q.shape[1] % 128 == 0:  # the kernel tiles q and kv in multiples of 128 lanes
            return _sharded(_splash_rows, q, k, v, segment_ids, window=window, scale=scale, softcap=softcap,
                            interpret=interpret)
        if q.shape[1] > 128:  # (shorter: model.init's dummy input, or a tiny test batch)
            logging.warning('kernels: splash attention needs a sequence length that is a multiple of 128 (got %d); '
                            'using the XLA attention.', q.shape[1])
        if softcap is not None:
            return attend(q, k, v, causal_mask(segment_ids, window=window), q.dtype, scale, softcap)
        return dot_product_attention(q, k, v, segment_ids, 'xla', window, scale)
    if kernels == 'cudnn':
        try:
            return _sharded(dot_product_attention, q, k, v, segment_ids, implementation='cudnn', window=window,
                            scale=scale)
        except (ValueError, NotImplementedError, RuntimeError) as e:  # cuDNN refuses this shape / dtype / GPU
            logging.warning('kernels: cuDNN attention unavailable (%s); using the XLA attention.', e)
    return dot_product_attention(q, k, v, segment_ids, 'xla', window, scale)


def token_mask(q_index, q_seg, k_index, k_seg, window=None, local=None):
    """[b, tq, tk] bool from each token's index in its row and segment id: causal, within one segment, and within
    the last `window` keys (when the layer is local: `local` None = always, else a traced flag)."""
    dq, dk = q_index[:, :, None], k_index[:, None, :]
    mask = (dq >= dk) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window is not None:
        near = dq - dk < window
        mask = mask & (near if local is None else (near | ~local))
    return mask


def chunked_attention(q, k, v, q_index, q_seg, k_index, k_seg, window=None, local=None, *, scale=None,
                      softcap=None, chunk=None):
    """`attend` under `token_mask`, one chunk of `chunk` queries (default `Q_CHUNK`) at a time: memory linear in
    the keys (a [chunk, keys] block of scores and mask per step, each chunk recomputed in the backward pass
    instead of stacking its probabilities), the same values as `attend` with the whole mask.
    q: [batch, tq, heads, head_dim]; k, v: [batch, tk, kv_heads, head_dim]; q_index, q_seg: [batch, tq];
    k_index, k_seg: [batch, tk] (token indices in the row and segment ids; `context.attention` passes its shard's)."""
    b, t, h, d = q.shape
    chunk = min(chunk or Q_CHUNK, t)
    n = -(-t // chunk)
    pad = n * chunk - t  # padded query rows (index -1: they attend nowhere) are dropped at the end
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))  # [b, n * chunk, h, d]
    qi_p, qs_p = (jnp.pad(x, ((0, 0), (0, pad)), constant_values=-1) for x in (q_index, q_seg))
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, tk, d]

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(i):
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)  # noqa: E731
        mask = token_mask(part(qi_p), part(qs_p), k_index, k_seg, window, local)  # [b, chunk, tk]
        return attend_heads_major(part(qp), kt, vt, mask, q.dtype, scale, softcap)  # [b, chunk, h, d]
    out = jax.lax.map(one, jnp.arange(n))  # [n, b, chunk, h, d]
    return out.transpose(1, 0, 2, 3, 4).reshape(b, n * chunk, h, d)[:, :t]


_LOGGED = set()


def _log_once(message):
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.info('%s', message)


def dot_product_attention(q, k, v, segment_ids, implementation='xla', window=None, scale=None):
    """`jax.nn.dot_product_attention` with the causal, same-segment (and window) mask; GQA native."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [batch, 1, q, kv]
    return jax.nn.dot_product_attention(
        q, k, v, mask=same, scale=scale, is_causal=True, implementation=implementation,
        local_window_size=None if window is None else (window - 1, 0))


def splash_mask(seq: int, heads: int, window=None):
    """The static splash mask: causal (and the last `window` keys) for each of `heads` heads."""
    one = sm.CausalMask((seq, seq))
    if window is not None:
        one = sm.LogicalAnd(one, sm.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0))
    return sm.MultiHeadMask([one] * heads)


def splash_block_sizes(t):
    """Splash tiles of SPLASH_BLOCK (or `t`, for shorter query runs) along q and kv, forward and backward."""
    blk = min(SPLASH_BLOCK, t)
    return sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                         block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)


def _splash_rows(q, k, v, segment_ids, window=None, scale=None, softcap=None, interpret=False):
    """Splash attention on one device's rows: q [b, t, h, d], k/v [b, t, kvh, d], segment_ids [b, t]."""
    b, t, h, d = q.shape
    kernel = sk.make_splash_mha(splash_mask(t, h, window), head_shards=1, q_seq_shards=1,
                                block_sizes=splash_block_sizes(t), attn_logits_soft_cap=softcap, interpret=interpret)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qs = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, h, t, d]; splash does not scale
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, t, d]
    seg = segment_ids.astype(jnp.int32)
    # (Mosaic refuses bf16 matmuls at 'highest' precision: lower it without jax_default_matmul_precision set)
    o = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(qs, kt, vt, seg)
    return o.transpose(0, 2, 1, 3).astype(q.dtype)  # [b, t, h, d]


def split_axes(mesh, q, k):
    """(rows, heads): the mesh axes that split q [batch, seq, heads, d] / k [batch, seq, kv_heads, d] under a
    `shard_map`: the batch axes over rows, 'tensor' over heads, each only where it divides evenly (else None)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = tuple(a for a in BATCH_AXES if a in sizes)
    rows = rows if rows and q.shape[0] % math.prod(sizes[a] for a in rows) == 0 else None
    heads = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 and q.shape[2] % sizes[HEAD_AXIS] == 0 \
        and k.shape[2] % sizes[HEAD_AXIS] == 0 else None
    return rows, heads


def _sharded(fn, q, k, v, segment_ids, **kw):
    """Runs `fn` per device under `shard_map` when a mesh is set (a custom kernel cannot be split by the
    compiler): rows over the batch axes, heads over 'tensor', each only when it divides evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids, **kw)
    rows, heads = split_axes(mesh, q, k)
    qkv, seg = P(rows, None, heads, None), P(rows, None)
    run = jax.shard_map(functools.partial(fn, **kw), in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                        check_vma=False)
    return run(q, k, v, segment_ids)


def kernel_names_in(hlo_text: str):
    """Which fused attention kernels a compiled program's HLO text calls (for compile_check and tests)."""
    calls = [line for line in hlo_text.splitlines() if 'custom_call_target=' in line]
    found = []
    if any('tpu_custom_call' in line and 'splash' in line for line in calls):
        found.append('splash')
    if any('__cudnn$fmha' in line for line in calls):
        found.append('cudnn')
    return found
