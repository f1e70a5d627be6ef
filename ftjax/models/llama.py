"""The decoder of every supported family (Llama 2/3, SmolLM, Mistral, Qwen2/3, Phi-3, Gemma 2/3) as one
functional Flax linen module; the families differ only in config fields (`decoder_config`, docs/models.md).

RMSNorm (Gemma: by 1 + w, sandwich post-norms), RoPE (rope_theta, linear / Llama-3 scaling; a local base
on Gemma 3's sliding layers), grouped-query attention (optional q/k RMSNorm, score scale, soft-capping,
sliding window), gated MLP (SiLU or tanh-GELU), tied or untied embeddings (Gemma: scaled by sqrt(hidden)).
The layers are one `nn.scan` over a stacked parameter tree (leading 'layers' axis); what differs per layer
(window on or off, RoPE base) is a scanned input, an int flag per layer. `scan_unroll` trades compile time
for a loop-free program. Packed rows attend within their segment (`segment_ids`, 0 = padding) and use
per-example `positions`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ftjax.models import context, kernels, layers, moe
from ftjax.models.decoder_config import LlamaConfig, rope_for
from ftjax.models.layers import ACTIVATIONS, BLOCK_AXES, Dense, RMSNorm

__all__ = ['Llama', 'LlamaBlock', 'LlamaConfig', 'init_cache', 'lm_head_kernel']


def softcap(x, cap):
    """tanh(x / cap) * cap (Gemma 2's logit soft-capping); x unchanged when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class LlamaBlock(nn.Module):
    cfg: LlamaConfig
    deterministic: bool = True

    def norm(self, name):
        cfg = self.cfg
        return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, offset=cfg.norm_offset, name=name)

    def dense(self, features, axes, name, bias):
        cfg = self.cfg
        return Dense(features, axes, use_bias=bias, lora=cfg.lora, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernels=cfg.kernels, name=name)

    @nn.compact
    def __call__(self, carry, positions, mask, local_mask, segment_ids, order, cache_index, local, layer):
        """carry: (x [batch, seq, embed], cache); mask / local_mask: [batch, seq, kv_len] for the global /
        sliding-window layers (None: `kernels.self_attention` over segment_ids [batch, seq]); cache: None or
        every layer's {'k','v'} [layers, batch, kv_heads, kv_len, head_dim], carried through the layer scan so
        that this layer's new keys/values are written in place, or (layer None) this layer's own {'k','v'}
        [batch, kv_heads, kv_len, head_dim]; local: int32 scalar, this layer's flag (1 = sliding window);
        layer: int32 scalar, this layer's index, or None; order: None, or (context parallelism) each token's index
        in its row [batch, seq] (`ftjax.models.context`)."""
        x, cache = carry
        cfg = self.cfg
        x = checkpoint_name(nn.with_logical_constraint(x, BLOCK_AXES), 'layer_input')  # for `layers.remat_policy`
        b, t, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        flags = cfg.local_layers
        mixed = cfg.mixed_layers  # else every layer is the same (all local or all global): static
        is_local = local.astype(bool) if mixed else None
        h = self.norm('attn_norm')(x)
        with jax.named_scope('attention'):
            if cfg.fused_qkv:  # Phi-3: [q | k | v] in one projection, as in the checkpoint
                qkv = self.dense((nh + 2 * nkv) * hd, ('embed', 'heads'), 'qkv_proj', cfg.qkv_bias)(h, self.deterministic)
                q, k, v = jnp.split(qkv, [nh * hd, (nh + nkv) * hd], axis=-1)
            else:
                q = self.dense(nh * hd, ('embed', 'heads'), 'q_proj', cfg.qkv_bias)(h, self.deterministic)
                k = self.dense(nkv * hd, ('embed', 'kv_heads'), 'k_proj', cfg.qkv_bias)(h, self.deterministic)
                v = self.dense(nkv * hd, ('embed', 'kv_heads'), 'v_proj', cfg.qkv_bias)(h, self.deterministic)
            if cfg.qk_norm and cfg.qk_norm_full:  # OLMoE: over every head's features at once
                q, k = self.norm('q_norm')(q), self.norm('k_norm')(k)
            if cfg.clip_qkv is not None:
                q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
            q = q.reshape(b, t, nh, hd)  # [batch, seq, heads, head_dim]
            k = k.reshape(b, t, nkv, hd)  # [batch, seq, kv_heads, head_dim]
            v = v.reshape(b, t, nkv, hd)
            if cfg.qk_norm and not cfg.qk_norm_full:  # over head_dim, before RoPE
                q, k = self.norm('q_norm')(q), self.norm('k_norm')(k)
            turns_of = lambda is_local_layer: layers.rope_turns(  # noqa: E731
                layers.rope_frequencies(hd, *rope_for(cfg, is_local_layer)))
            turns = turns_of(flags[0])
            if mixed and cfg.rope_local_theta is not None:  # Gemma 3: the local layers' own base
                turns = tuple(jnp.where(is_local, a, b) for a, b in zip(turns_of(True), turns_of(False)))
            angles = layers.rope_angles(positions, turns)  # [batch, seq, head_dim // 2]
            q = layers.apply_rope(q, angles)
            k = layers.apply_rope(k, angles)
            if cache is not None:  # decoding: write this step's keys/values into their cache slots, in place
                kt = k.transpose(0, 2, 1, 3).astype(cache['k'].dtype)  # [batch, kv_heads, seq, head_dim]
                vt = v.transpose(0, 2, 1, 3).astype(cache['v'].dtype)
                if layer is None:  # this layer's own cache: [batch, kv_heads, kv_len, head_dim]
                    cache = {'k': jax.lax.dynamic_update_slice(cache['k'], kt, (0, 0, cache_index, 0)),
                             'v': jax.lax.dynamic_update_slice(cache['v'], vt, (0, 0, cache_index, 0))}
                    kt, vt = cache['k'], cache['v']
                else:  # every layer's: [layers, batch, kv_heads, kv_len, head_dim]
                    at = (layer, 0, 0, cache_index, 0)
                    cache = {'k': jax.lax.dynamic_update_slice(cache['k'], kt[None], at),
                             'v': jax.lax.dynamic_update_slice(cache['v'], vt[None], at)}
                    kt, vt = cache['k'][layer], cache['v'][layer]
            if order is not None:  # the sequence split over the 'context' mesh axis
                o = context.attention(q.astype(cfg.dtype), k.astype(cfg.dtype), v.astype(cfg.dtype), segment_ids,
                                      order, cfg.context_parallel, cfg.sliding_window if any(flags) else None,
                                      local=is_local if mixed else None, scale=cfg.query_scale,
                                      softcap=cfg.attn_softcap, kernel=cfg.kernels,
                                      balanced=cfg.context_load_balance)
            elif mask is None:  # training / eval: a fused kernel over the segments (CPU: query chunks past Q_CHUNK)
                window = cfg.sliding_window if any(flags) else None
                o = kernels.self_attention(q.astype(cfg.dtype), k.astype(cfg.dtype), v.astype(cfg.dtype),
                                           segment_ids, cfg.kernels, window, local=is_local,
                                           scale=cfg.query_scale, softcap=cfg.attn_softcap)
            else:
                m = jnp.where(is_local, local_mask, mask) if mixed else (local_mask if flags[0] else mask)
                if cache is None:
                    o = kernels.attend(q, k.astype(cfg.dtype), v.astype(cfg.dtype), m, cfg.dtype, cfg.query_scale,
                                       cfg.attn_softcap)
                else:
                    o = kernels.attend_heads_major(q, kt.astype(cfg.dtype), vt.astype(cfg.dtype), m, cfg.dtype,
                                                   cfg.query_scale, cfg.attn_softcap, cfg.kernels)
            o = o.reshape(b, t, nh * hd)
            o = self.dense(cfg.hidden_size, ('heads', 'embed'), 'o_proj', cfg.o_bias)(o, self.deterministic)
            x = x + self.residual(self.norm('attn_post_norm')(o) if cfg.post_norms else o)
        h = self.norm('mlp_norm')(x)
        stats = None
        with jax.named_scope('mlp'):
            f = cfg.intermediate_size
            if cfg.num_experts:  # mixture of experts (`ftjax.models.moe`): routing statistics out of the scan
                y, stats = moe.Moe(cfg, name='moe')(h, segment_ids > 0, self.deterministic)
            elif cfg.fused_gate_up:  # Phi-3: [gate | up] in one projection
                gate, up = jnp.split(self.dense(2 * f, ('embed', 'mlp'), 'gate_up_proj', cfg.mlp_bias)(
                    h, self.deterministic), 2, axis=-1)
            else:
                gate = self.dense(f, ('embed', 'mlp'), 'gate_proj', cfg.mlp_bias)(h, self.deterministic)
                up = self.dense(f, ('embed', 'mlp'), 'up_proj', cfg.mlp_bias)(h, self.deterministic)
            if not cfg.num_experts:
                y = self.dense(cfg.hidden_size, ('mlp', 'embed'), 'down_proj', cfg.mlp_bias)(
                    ACTIVATIONS[cfg.activation](gate) * up, self.deterministic)  # [batch, seq, embed]
            x = x + self.residual(self.norm('mlp_post_norm')(y) if cfg.post_norms else y)
        return (x, cache), stats

    def residual(self, y):
        m = self.cfg.residual_multiplier  # Granite
        return y if m is None else y * jnp.asarray(m, y.dtype)


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, *, cache=None, cache_index=None,
                 kv_valid=None, deterministic: bool = True, return_hidden: bool = False):
        """input_ids: [batch, seq] -> logits [batch, seq, vocab] (or final hidden states [batch, seq, embed]).

        Decoding: `cache` from `init_cache`, `cache_index` the first slot written by this call,
        `kv_valid` [batch, kv_len] the filled, non-padding slots; returns (logits, new_cache).
        Sliding-window layers keep the full-length cache and mask the keys outside their window.
        """
        cfg = self.cfg
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        window = cfg.sliding_window if any(cfg.local_layers) else None
        c = context.size() if cache is None else 1
        order = None
        if c > 1:  # context parallelism: zig-zag order of the tokens over the shards (put back before the head)
            order = jnp.asarray(context.zigzag_order(t, c) if cfg.context_load_balance else np.arange(t))  # [t]
            input_ids, positions, seg = (a[:, order] for a in (input_ids, positions, seg))
            order = jnp.broadcast_to(order, (b, t))
        if cache is None:
            full = all(cfg.local_layers) and window is not None  # (no global layer needs the causal mask)
            cpu = cfg.kernels == 'cpu' and t <= kernels.Q_CHUNK and c == 1  # else no [t, t] mask: chunks, context
            mask = kernels.causal_mask(seg) if cpu and not full else None  # [batch, seq, seq]
            local_mask = kernels.causal_mask(seg, window=window) if cpu and window else None
        else:
            slots = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
            kv_len = cache['k'].shape[3]
            mask = kernels.causal_mask(None, slots, kv_len, kv_valid)  # [batch, seq, kv_len]
            local_mask = kernels.causal_mask(None, slots, kv_len, kv_valid, window) if window else None
        if mask is None and local_mask is not None:
            mask = local_mask  # every layer local: `mask is None` still means "fused kernel"
        embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             name='embed')
        x = embed(input_ids)  # [batch, seq, embed]
        if cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype, as transformers does
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
        if cfg.embed_multiplier is not None:  # Granite
            x = x * jnp.asarray(cfg.embed_multiplier, cfg.dtype)
        block = layers.remat(LlamaBlock, cfg.remat, stream=cfg.offload_frozen)
        stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * 6 + (0, 0),
                        length=cfg.num_layers, unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: 'layers'})
        local = jnp.asarray(cfg.local_layers, jnp.int32)  # [layers]
        layer = jnp.arange(cfg.num_layers, dtype=jnp.int32)  # [layers]
        (x, new_cache), stats = stack(cfg, deterministic, name='layers')((x, cache), positions, mask, local_mask, seg,
                                                                         order, cache_index, local, layer)
        if stats is not None:  # MoE: every layer's routing sums [layers, ...], read by `moe.add_aux_loss`
            self.sow('intermediates', 'router', stats, reduce_fn=lambda _, new: new)
        x = nn.with_logical_constraint(x, BLOCK_AXES)
        if order is not None and cfg.context_load_balance:  # the tokens back in their order
            x = jnp.take(x, jnp.argsort(order[0]), axis=1)
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, offset=cfg.norm_offset, name='final_norm')(x)
        if return_hidden:
            out = x
        else:
            if cfg.tie_embeddings:
                out = embed.attend(x)  # [batch, seq, vocab]
            else:
                out = Dense(cfg.vocab_size, ('embed', 'vocab'), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernels=cfg.kernels, name='lm_head')(x)
            if cfg.logits_scaling is not None:  # Granite
                out = out / jnp.asarray(cfg.logits_scaling, out.dtype)
            out = softcap(out, cfg.final_softcap)
        return out if cache is None else (out, new_cache)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None):
    """Empty KV cache: {'k', 'v'} each [layers, batch, kv_heads, max_len, head_dim] (the layout attention reads
    without a transpose; full length on every layer: a sliding-window layer masks what lies outside its window)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def lm_head_kernel(params, cfg: LlamaConfig):
    """The output projection as [embed, vocab] (the transposed embedding when tied); the loss applies
    `cfg.final_softcap` to the logits (`softcap`)."""
    head = params['embed']['embedding'].T if cfg.tie_embeddings else params['lm_head']['kernel']
    return head if cfg.logits_scaling is None else head / cfg.logits_scaling  # Granite
