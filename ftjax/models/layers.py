"""Building blocks shared by the decoder and encoder families.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that
`ftjax.sharding` can map them onto the (data, fsdp, tensor) mesh. Kernels are stored
[in, out] (the transpose of PyTorch's `nn.Linear.weight`).

LoRA lives inside `Dense` (gemma style): a targeted layer keeps its `kernel` (and `bias`)
and adds `lora_a` [in, r] and `lora_b` [r, out] beside it, plus `lora_magnitude` [out]
for DoRA (the math: `ftjax.models.adapters`). A base checkpoint, a merged export and a LoRA
run therefore share one tree.
"""
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ftjax.config_checks import remat_places
from ftjax.errors import ConfigError
from ftjax.models import kernels as kernels_lib
from ftjax.models import quantize
from ftjax.models.adapters import LORA_A, LORA_B, MAGNITUDE, LoraSpec, dora_norm, lora_a_init

Dtype = Any
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)
BLOCK_AXES = ('activation_batch', 'activation_length', 'activation_embed')  # logical axes between blocks
ACTIVATIONS = {'silu': nn.silu, 'gelu_tanh': functools.partial(nn.gelu, approximate=True)}  # of the gated MLPs


class Dense(nn.Module):
    """y = x @ kernel (+ bias), optionally with a LoRA / DoRA adapter beside the kernel."""
    features: int
    axes: tuple  # logical names of (in, out), e.g. ('embed', 'mlp')
    use_bias: bool = False
    lora: Optional[LoraSpec] = None  # the model-wide spec; applied if it matches this path
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = DEFAULT_INIT
    kernels: str = 'cpu'  # resolved config.model.kernels (`ftjax.models.kernels`): which matmul

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        in_axis, out_axis = self.axes
        kernel = quantize.frozen_param(self, 'kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                                       (x.shape[-1], self.features), self.param_dtype)  # [in, out], or a QArray
        if quantize.is_quantized(kernel):  # a frozen quantized base: dequantized here, in the compute dtype
            base = lambda v: quantize.qmatmul(v, kernel, self.dtype)
        else:
            base = lambda v: kernels_lib.matmul(v, kernel.astype(self.dtype), self.kernels)
        x = x.astype(self.dtype)
        y = checkpoint_name(base(x), 'dense')  # [..., out]
        spec = self.lora
        if spec is not None and spec.matches('/'.join(self.path)):
            a = self.param(LORA_A, nn.with_logical_partitioning(lora_a_init, (in_axis, None)),
                           (x.shape[-1], spec.rank), jnp.float32)  # [in, r]
            b = self.param(LORA_B, nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)),
                           (spec.rank, self.features), jnp.float32)  # [r, out]
            xd = x
            if spec.dropout > 0.0:
                xd = nn.Dropout(spec.dropout)(x, deterministic=deterministic)
            xa = checkpoint_name(kernels_lib.matmul(xd, a.astype(self.dtype), self.kernels), 'dense')  # [..., r]
            delta = kernels_lib.matmul(xa, b.astype(self.dtype), self.kernels) * spec.scale  # [..., out]
            if spec.dora:
                m = self.param(MAGNITUDE, nn.with_logical_partitioning(nn.initializers.ones, (out_axis,)),
                               (self.features,), jnp.float32)  # [out]
                g = (m / dora_norm(quantize.dequantize(kernel), a, b, spec.scale)).astype(self.dtype)  # [out]
                base_d = y if xd is x else base(xd)
                y = y + (g - 1.0) * base_d + g * delta  # PEFT's DoRA forward
            else:
                y = y + delta
        if self.use_bias:
            bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return checkpoint_name(y, self.name) if self.name else y  # 'q_proj', ...: for `remat_policy`


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + scale) over the last axis, in float32. Gemma stores scale - 1 (offset 1)."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones  # the identity either way
        scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = scale.astype(jnp.float32) + self.offset if self.offset else scale.astype(jnp.float32)
        return (y * w).astype(self.dtype)


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
        init = nn.with_logical_partitioning(DEFAULT_INIT, self.axes)
        self.embedding = quantize.frozen_param(self, 'embedding', init, (self.num_embeddings, self.features),
                                               self.param_dtype)  # [vocab, embed], or a QArray

    def __call__(self, ids):
        if quantize.is_quantized(self.embedding):  # decodes the looked-up rows only
            return quantize.take_rows(self.embedding, ids, self.dtype)
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)  # [batch, seq, embed]

    def attend(self, x):
        """Tied output projection: [batch, seq, embed] -> [batch, seq, vocab]."""
        return x @ quantize.dequantize(self.embedding, self.dtype).T


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float64 (constants of the program, computed once by numpy), with
    linear or Llama-3 style scaling when the config has it."""
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
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
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return np.where(is_mid, mid, scaled)


def rope_turns(inv_freq):
    """Frequencies [head_dim // 2] as turns per position in 64-bit fixed point: (the first 32 fractional bits as
    uint32, the rest as float32 turns). `rope_angles` multiplies them by a position modulo one turn."""
    scaled = np.asarray(inv_freq, np.float64) / (2 * math.pi) * 2.0 ** 32  # < 2^32: a frequency is < 1 turn
    hi = np.floor(scaled)
    return hi.astype(np.uint32), ((scaled - hi) * 2.0 ** -32).astype(np.float32)


def rope_angles(positions, turns):
    """positions [...] int x frequencies -> angles [..., head_dim // 2] in [-pi, pi], float32.

    The product is formed modulo one turn before anything is rounded: the uint32 product of a position and the
    high fixed-point bits wraps exactly at one turn, the low bits add at most 2^-32 turns per position. The angle
    is then within ~3e-7 rad at any position, where `positions * inv_freq` in float32 (transformers', ftjax's
    before) is off by up to half an ulp of the unreduced angle: 6e-5 rad at position 1400, 5e-4 at 8k, 4e-3 at
    64k, enough to move float32 logits by 1e-3 at 1.4k tokens (docs/results/long_context_numerics.md)."""
    hi, lo = turns
    p = positions[..., None]
    frac = p.astype(jnp.uint32) * hi  # wraps modulo 2^32 = one turn; negative positions wrap alike
    t = frac.astype(jnp.float32) * 2.0 ** -32 + p.astype(jnp.float32) * lo  # turns, in [0, 1 + tiny)
    return (t - jnp.round(t)) * (2 * math.pi)


def apply_rope(x, angles):
    """Rotary embedding in Hugging Face's rotate-half layout. x: [batch, seq, heads, head_dim]; angles:
    [batch, seq, head_dim // 2] from `rope_angles`."""
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


_cp = jax.checkpoint_policies
# With kernels='cpu', `Dense` runs its matmuls through the custom-gradient `kernels.linear`, which remat
# policies cannot look into: its outputs are named 'dense' so that the dots policies keep saving the projections.
REMAT_POLICIES = {
    'none': None,
    'full': _cp.nothing_saveable,
    'dots_saveable': _cp.save_from_both_policies(_cp.dots_saveable, _cp.save_only_these_names('dense')),
    'dots_with_no_batch_dims_saveable': _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names('dense')),
    'everything_saveable': _cp.everything_saveable,
}


def remat_policy(name: str):
    """The `jax.checkpoint` policy of config.model.remat (`ftjax.config_checks.remat_places`): XLA's named ones,
    or the block input / projection outputs each saved on the device, offloaded to host memory or recomputed."""
    try:
        places = remat_places(name)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if places is None:
        return REMAT_POLICIES[name]
    return _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[t for t, p in places.items() if p == 'device'],
        names_which_can_be_offloaded=[t for t, p in places.items() if p == 'offload'],
        offload_src='device', offload_dst='pinned_host')


def remat(block_cls, policy: str, static_argnums=(), stream: bool = False):
    """Wraps a block in `nn.remat` with the policy config.model.remat names ('none' returns it unchanged).

    `stream` (config.model.offload_frozen): the block reads its parameters through `on_device`, so a layer's
    weights kept in host memory are copied to the device inside the scan, one layer at a time (and again in the
    backward pass when the block is rematerialised)."""
    if stream:
        block_cls = nn.map_variables(block_cls, 'params', trans_in_fn=on_device, init=True)
    if policy == 'none':
        return block_cls
    return nn.remat(block_cls, policy=remat_policy(policy), prevent_cse=False, static_argnums=static_argnums)


def on_device(tree):
    """`tree` with every leaf that lives in host memory (`pinned_host`) copied to the device; others unchanged.
    Traced leaves inside `jit` (a layer's slice of an offloaded stacked weight) and placed arrays alike."""
    def move(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            kind = getattr(x.sharding, 'memory_kind', None)
            return jax.device_put(x, x.sharding.with_memory_kind('device')) if kind == 'pinned_host' else x
        space = getattr(jax.typeof(x), 'memory_space', None) if hasattr(x, 'shape') else None
        return jax.device_put(x, jax.memory.Space.Device) if space == jax.memory.Space.Host else x
    return jax.tree.map(move, tree)
