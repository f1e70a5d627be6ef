"""Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) as a functional Flax linen module.

RMSNorm, RoPE (rope_theta, Llama-3 scaling), grouped-query attention, SwiGLU MLP, tied or untied
embeddings. The layers are one `nn.scan` over a stacked parameter tree (leading 'layers' axis);
`scan_unroll` trades compile time for a loop-free program. Packed rows attend within their
segment (`segment_ids`, 0 = padding) and use per-example `positions`.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import kernels, layers
from ftjax.models.adapters import LoraSpec
from ftjax.models.layers import BLOCK_AXES, Dense, RMSNorm



@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs, hashable
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # Run-time choices (not part of the checkpoint):
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = 'none'
    scan_unroll: int = 1
    kernels: str = 'cpu'  # resolved config.model.kernels: 'cpu', 'xla', 'splash', 'cudnn' (`ftjax.models.kernels`)
    lora: Optional[LoraSpec] = None

    @property
    def family(self):
        return 'llama'

    @property
    def task(self):
        """What the model is trained for (`ftjax.models.heads.task_of`): next-token prediction."""
        return 'lm'

    @classmethod
    def from_hf(cls, hf, **runtime):
        """From a transformers config (LlamaConfig, MistralConfig, Qwen2Config) or its dict."""
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        heads = get('num_attention_heads')
        rope = dict(get('rope_parameters') or {})
        theta = rope.pop('rope_theta', None) or get('rope_theta') or 10000.0
        scaling = get('rope_scaling') or rope
        if scaling and scaling.get('rope_type', scaling.get('type')) in (None, 'default'):
            scaling = None
        model_type = get('model_type', 'llama')
        attn_bias = bool(get('attention_bias', False))
        return cls(
            vocab_size=get('vocab_size'), hidden_size=get('hidden_size'),
            intermediate_size=get('intermediate_size'), num_layers=get('num_hidden_layers'),
            num_heads=heads, num_kv_heads=get('num_key_value_heads') or heads,
            head_dim=get('head_dim') or get('hidden_size') // heads,
            rms_norm_eps=get('rms_norm_eps', 1e-6), rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_embeddings=bool(get('tie_word_embeddings', True)),
            qkv_bias=attn_bias or model_type == 'qwen2', o_bias=attn_bias,
            mlp_bias=bool(get('mlp_bias', False)),
            max_position_embeddings=get('max_position_embeddings', 2048), **runtime)


class LlamaBlock(nn.Module):
    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, segment_ids, cache, cache_index):
        """x: [batch, seq, embed]; mask: [batch, seq, kv_len] (None: `kernels.self_attention` over
        segment_ids [batch, seq]); cache: {'k','v'} [batch, kv_len, kv_heads, head_dim]."""
        cfg = self.cfg
        dense = lambda f, axes, name, bias: Dense(f, axes, use_bias=bias, lora=cfg.lora, dtype=cfg.dtype,
                                                  param_dtype=cfg.param_dtype, kernels=cfg.kernels, name=name)
        x = nn.with_logical_constraint(x, BLOCK_AXES)
        b, t, _ = x.shape
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='attn_norm')(x)
        with jax.named_scope('attention'):
            q = dense(cfg.num_heads * cfg.head_dim, ('embed', 'heads'), 'q_proj', cfg.qkv_bias)(h, self.deterministic)
            k = dense(cfg.num_kv_heads * cfg.head_dim, ('embed', 'kv_heads'), 'k_proj', cfg.qkv_bias)(h, self.deterministic)
            v = dense(cfg.num_kv_heads * cfg.head_dim, ('embed', 'kv_heads'), 'v_proj', cfg.qkv_bias)(h, self.deterministic)
            q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [batch, seq, heads, head_dim]
            k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [batch, seq, kv_heads, head_dim]
            v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            inv_freq = layers.rope_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
            q = layers.apply_rope(q, positions, inv_freq)
            k = layers.apply_rope(k, positions, inv_freq)
            if cache is not None:  # decoding: write this step's keys/values into their cache slots
                k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, cache_index, 0, 0))
                v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, cache_index, 0, 0))
                cache = {'k': k, 'v': v}
            if mask is None:  # training / eval on the accelerators: a fused kernel over the segments
                o = kernels.self_attention(q.astype(cfg.dtype), k.astype(cfg.dtype), v.astype(cfg.dtype),
                                           segment_ids, cfg.kernels)
            else:
                o = kernels.attend(q, k.astype(cfg.dtype), v.astype(cfg.dtype), mask, cfg.dtype)
            o = o.reshape(b, t, cfg.num_heads * cfg.head_dim)
            x = x + dense(cfg.hidden_size, ('heads', 'embed'), 'o_proj', cfg.o_bias)(o, self.deterministic)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='mlp_norm')(x)
        with jax.named_scope('mlp'):
            gate = dense(cfg.intermediate_size, ('embed', 'mlp'), 'gate_proj', cfg.mlp_bias)(h, self.deterministic)
            up = dense(cfg.intermediate_size, ('embed', 'mlp'), 'up_proj', cfg.mlp_bias)(h, self.deterministic)
            x = x + dense(cfg.hidden_size, ('mlp', 'embed'), 'down_proj', cfg.mlp_bias)(
                nn.silu(gate) * up, self.deterministic)  # [batch, seq, embed]
        return x, cache


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, *, cache=None, cache_index=None,
                 kv_valid=None, deterministic: bool = True, return_hidden: bool = False):
        """input_ids: [batch, seq] -> logits [batch, seq, vocab] (or final hidden states [batch, seq, embed]).

        Decoding: `cache` from `init_cache`, `cache_index` the first slot written by this call,
        `kv_valid` [batch, kv_len] the filled, non-padding slots; returns (logits, new_cache).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        if cache is None:
            mask = kernels.causal_mask(seg) if cfg.kernels == 'cpu' else None  # [batch, seq, seq]
        else:
            slots = cache_index + jnp.arange(t)
            kv_len = cache['k'].shape[2]
            mask = kernels.causal_mask(None, jnp.broadcast_to(slots, (b, t)), kv_len, kv_valid)
        embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             name='embed')
        x = embed(input_ids)  # [batch, seq, embed]
        block = layers.remat(LlamaBlock, cfg.remat)
        stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                        length=cfg.num_layers, unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: 'layers'})
        x, new_cache = stack(cfg, deterministic, name='layers')(x, positions, mask, seg, cache, cache_index)
        x = nn.with_logical_constraint(x, BLOCK_AXES)
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='final_norm')(x)
        if return_hidden:
            out = x
        elif cfg.tie_embeddings:
            out = embed.attend(x)  # [batch, seq, vocab]
        else:
            out = Dense(cfg.vocab_size, ('embed', 'vocab'), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernels=cfg.kernels, name='lm_head')(x)
        return out if cache is None else (out, new_cache)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None):
    """Empty KV cache: {'k', 'v'} each [layers, batch, max_len, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def lm_head_kernel(params, cfg: LlamaConfig):
    """The output projection as [embed, vocab] (the transposed embedding when tied)."""
    return params['embed']['embedding'].T if cfg.tie_embeddings else params['lm_head']['kernel']
