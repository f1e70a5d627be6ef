"""Building blocks shared by the decoder and encoder families.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that
`ftjax.sharding` can map them onto the (data, fsdp, tensor) mesh. Kernels are stored
[in, out] (the transpose of PyTorch's `nn.Linear.weight`).

LoRA lives inside `Dense` (gemma style): a targeted layer keeps its `kernel` (and `bias`)
and adds `lora_a` [in, r] and `lora_b` [r, out] beside it, plus `lora_magnitude` [out]
for DoRA (the math: `ftjax.models.adapters`). A base checkpoint, a merged export and a LoRA
run therefore share one tree.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ftjax.models.adapters import LORA_A, LORA_B, MAGNITUDE, LoraSpec, dora_norm, lora_a_init

Dtype = Any
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)
BLOCK_AXES = ('activation_batch', 'activation_length', 'activation_embed')  # logical axes between blocks


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


class Dense(nn.Module):
    """y = x @ kernel (+ bias), optionally with a LoRA / DoRA adapter beside the kernel."""
    features: int
    axes: tuple  # logical names of (in, out), e.g. ('embed', 'mlp')
    use_bias: bool = False
    lora: Optional[LoraSpec] = None  # the model-wide spec; applied if it matches this path
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = DEFAULT_INIT

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        in_axis, out_axis = self.axes
        kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)  # [in, out]
        x = x.astype(self.dtype)
        y = checkpoint_name(linear(x, kernel.astype(self.dtype)), 'dense')  # [..., out]
        spec = self.lora
        if spec is not None and spec.matches('/'.join(self.path)):
            a = self.param(LORA_A, nn.with_logical_partitioning(lora_a_init, (in_axis, None)),
                           (x.shape[-1], spec.rank), jnp.float32)  # [in, r]
            b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)),
                           (spec.rank, self.features), jnp.float32)  # [r, out]
            xd = x
            if spec.dropout > 0.0:
                xd = nn.Dropout(spec.dropout)(x, deterministic=deterministic)
            xa = checkpoint_name(linear(xd, a.astype(self.dtype)), 'dense')  # [..., r]
            delta = linear(xa, b.astype(self.dtype)) * spec.scale  # [..., out]
            if spec.dora:
                m = self.param(MAGNITUDE, nn.with_logical_partitioning(nn.initializers.ones, (out_axis,)),
                               (self.features,), jnp.float32)  # [out]
                g = (m / dora_norm(kernel, a, b, spec.scale)).astype(self.dtype)  # [out]
                base_d = y if xd is x else linear(xd, kernel.astype(self.dtype))
                y = y + (g - 1.0) * base_d + g * delta  # PEFT's DoRA forward
            else:
                y = y + delta
        if self.use_bias:
            bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with `scale`/`bias` named like flax's, statistics in float32."""
    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (d,),
                           self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)), (d,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple = ('vocab', 'embed')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param('embedding', nn.with_logical_partitioning(DEFAULT_INIT, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)  # [vocab, embed]

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)  # [batch, seq, embed]

    def attend(self, x):
        """Tied output projection: [batch, seq, embed] -> [batch, seq, vocab]."""
        return x @ self.embedding.astype(self.dtype).T


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None):
    """Inverse frequencies [head_dim // 2], with Llama-3 style scaling when the config has it."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get('rope_type', scaling.get('type'))
    if kind in (None, 'default'):
        return inv
    if kind == 'linear':
        return inv / scaling['factor']
    if kind != 'llama3':
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    factor, lo, hi = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotary embedding in Hugging Face's rotate-half layout. x: [batch, seq, heads, head_dim]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, head_dim // 2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(q, k, v, mask, dtype):
    """Grouped-query attention without repeating K/V.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = may attend). Returns [batch, q_len, heads, head_dim].
    The query heads of one KV head are folded into the query axis, so each KV head is one batched
    matmul: [batch, kv_heads, groups * q_len, head_dim] against [batch, kv_heads, kv_len, head_dim].
    """
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)  # [b, kvh, g*t, d]
    kt = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, kv_len, head_dim]
    vt = v.transpose(0, 2, 1, 3)
    m = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)  # [b, 1, g*t, kv_len]
    o = _attention(qg.astype(dtype), kt.astype(dtype), vt.astype(dtype), m)  # [b, kvh, g*t, d]
    return o.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _probs(q, k, mask):
    """Softmax probabilities [b, kvh, q, kv] (float32) and their log-normaliser [b, kvh, q]."""
    scores = jnp.einsum('bkqd,bksd->bkqs', q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    lse = jax.nn.logsumexp(scores, axis=-1)
    return jnp.exp(scores - lse[..., None]), lse


@jax.custom_vjp
def _attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d), masked) v over [b, kvh, q, d] x [b, kvh, kv, d].

    The backward pass recomputes the probabilities from q, k and the saved log-normaliser instead
    of keeping them (FlashAttention's trade, here without tiling): a [q, kv] matrix per head and
    layer is not stored across the whole forward pass. Its matmuls contract over the query axis by
    transposing the narrow [q, head_dim] operands, never the [q, kv] probabilities.
    """
    p, _ = _probs(q, k, mask)
    return jnp.einsum('bkqs,bksd->bkqd', p.astype(v.dtype), v)


def _attention_fwd(q, k, v, mask):
    p, lse = _probs(q, k, mask)
    o = jnp.einsum('bkqs,bksd->bkqd', p.astype(v.dtype), v)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(res, do):
    q, k, v, mask, o, lse = res
    scores = jnp.einsum('bkqd,bksd->bkqs', q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    p = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)  # [b, kvh, q, kv]
    t = lambda x: jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))  # a narrow [q, d] -> [d, q]
    dv = jnp.swapaxes(t(do) @ p.astype(do.dtype), -1, -2)  # [b, kvh, kv, d]
    dp = jnp.einsum('bkqd,bksd->bkqs', do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [b, kvh, q, 1]
    ds = (p * (dp - delta) / math.sqrt(q.shape[-1])).astype(q.dtype)
    dq = ds @ k  # [b, kvh, q, d]
    dk = jnp.swapaxes(t(q) @ ds, -1, -2)  # [b, kvh, kv, d]
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_mask(segment_ids, q_positions=None, kv_len=None, kv_valid=None):
    """[batch, q_len, kv_len] bool: causal, and within one segment when `segment_ids` is given.

    Training/prefill: q and kv are the same tokens. Decoding with a cache: `q_positions` are the
    cache slots of the queries and `kv_valid` [batch, kv_len] marks filled, non-padding slots.
    """
    if q_positions is None:
        b, t = segment_ids.shape
        idx = jnp.arange(t)
        mask = (idx[None, :, None] >= idx[None, None, :])  # [1, q, kv]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        return mask & same
    slots = jnp.arange(kv_len)
    mask = slots[None, None, :] <= q_positions[:, :, None]  # [batch, q, kv]
    return mask & kv_valid[:, None, :]


_cp = jax.checkpoint_policies
# `Dense` runs its matmuls through the custom-gradient `linear`, which remat policies cannot look into:
# its outputs are named 'dense' so that the dots policies keep saving the projections.
REMAT_POLICIES = {
    'none': None,
    'full': _cp.nothing_saveable,
    'dots_saveable': _cp.save_from_both_policies(_cp.dots_saveable, _cp.save_only_these_names('dense')),
    'dots_with_no_batch_dims_saveable': _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names('dense')),
    'everything_saveable': _cp.everything_saveable,
}


def remat(block_cls, policy: str, static_argnums=()):
    """Wraps a block in `nn.remat` with a named policy ('none' returns it unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r} is not a known policy; choose one of {sorted(REMAT_POLICIES)}")
    if policy == 'none':
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=False, static_argnums=static_argnums)
