"""The decoder's forward pass for decoding, with its layers unrolled over separate buffers.

Inside the model's layer scan (`llama.Llama`) every layer's weights are a dynamic slice of the stacked
[layers, ...] parameters, which XLA's CPU backend copies out before each matmul: at one token per row that
copy costs as much as the matmuls themselves. Decoding therefore runs on `split` parameters: one tree per
layer (each its own buffer, made once per `Sampler` for its own parameters and once per call for given ones;
q|k|v and gate|up joined where they are plain kernels: `fused`; from two rows on, 2-D kernels held [out, in]:
`transposed`), the LM head materialised once, and one KV cache per layer ({'k','v'} [batch, kv_heads, kv_len,
head_dim]) that the donated decode loop updates in place. Each layer is the model's own `llama.LlamaBlock`, so
the math is the model's.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from ftjax.models import kernels, layers, llama, quantize


FUSED = {'qkv_proj': ('q_proj', 'k_proj', 'v_proj'), 'gate_up_proj': ('gate_proj', 'up_proj')}  # the block's names


def split(params, cfg, copy: bool = True, fuse: bool = True, out_major: bool = False):
    """(params without 'layers', a tuple of per-layer parameter trees). Sliced eagerly, not under `jit`: on the
    CPU the slices take milliseconds, while one jitted program with a buffer per layer and leaf took XLA 4 s to
    compile for SmolLM2's 30 layers and 9 s for its upcycled MoE (JAX 0.10, 2-core Zen 3).

    `copy=False`: no per-layer copies; the stacked 'layers' tree itself, each layer sliced inside the decode
    program (XLA's CPU backend then copies one layer at a time per step: slower on the CPU, but the layer
    weights exist once, e.g. while RL rollouts sample with the trainer's parameters).

    `fuse`: each layer's copies of q/k/v and gate/up concatenated along their output axis (`fused`), so that a
    decode step runs 4 matmuls per layer instead of 7.

    `out_major`: each copy's plain 2-D kernels held transposed (`transposed`), for batches of more than one row."""
    rest = {k: v for k, v in params.items() if k != 'layers'}
    if not copy:
        return rest, params['layers']
    per_layer = tuple(jax.tree.map(lambda x, i=i: x[i], params['layers']) for i in range(cfg.num_layers))
    per_layer = tuple(fused(p, cfg) for p in per_layer) if fuse else per_layer
    return rest, tuple(transposed(p) for p in per_layer) if out_major else per_layer


def transposed(tree):
    """`tree` with every plain 2-D 'kernel' [in, out] held as 'kernel_t' [out, in] (a new buffer). With the
    weights streamed from memory, XLA's CPU matmul of [16, 576] x [576, 3072] took 695 us as [in, out] and
    579 us as [out, in] (2-core Intel Xeon, JAX 0.10; equal at one row); `untransposed` turns them back inside
    the decode program, where the transpose folds into the matmul."""
    if not isinstance(tree, dict):
        return tree
    out = {k: transposed(v) for k, v in tree.items()}
    kernel = out.get('kernel')
    if kernel is not None and not quantize.is_quantized(kernel) and kernel.ndim == 2:
        out['kernel_t'] = jnp.transpose(out.pop('kernel'))
    return out


def untransposed(tree):
    """The inverse of `transposed`, traced: 'kernel_t' [out, in] back to 'kernel' [in, out]."""
    if not isinstance(tree, dict):
        return tree
    out = {k: untransposed(v) for k, v in tree.items()}
    if 'kernel_t' in out:
        out['kernel'] = out.pop('kernel_t').T
    return out


def fused(layer, cfg):
    """One layer's parameters with q_proj | k_proj | v_proj as one 'qkv_proj' and gate_proj | up_proj as one
    'gate_up_proj' (Phi-3's layout, which `llama.LlamaBlock` runs with cfg.fused_qkv / fused_gate_up), where
    each part is a plain kernel (and bias): not under a LoRA/DoRA spec, not quantized. Each output column is
    the same dot product as before (equal to float32 rounding)."""
    if cfg.lora is not None:
        return layer
    out = dict(layer)
    for name, parts in FUSED.items():
        if not all(p in out and set(out[p]) <= {'kernel', 'bias'} and set(out[p]) == set(out[parts[0]])
                   and not any(quantize.is_quantized(v) for v in out[p].values()) for p in parts):
            continue
        out[name] = {k: jnp.concatenate([out[p][k] for p in parts], axis=-1) for k in out[parts[0]]}
        for p in parts:
            del out[p]
    return out


def block_config(cfg, layer):
    """The decoder config that runs `layer`'s parameters: fused_qkv / fused_gate_up where `fused` joined them."""
    return dataclasses.replace(cfg, fused_qkv=cfg.fused_qkv or 'qkv_proj' in layer,
                               fused_gate_up=cfg.fused_gate_up or 'gate_up_proj' in layer)


def split_cache(cache, num_layers):
    """A stacked cache ({'k','v'} [layers, batch, kv_heads, kv_len, head_dim]) -> a tuple of per-layer ones."""
    return tuple({'k': cache['k'][i], 'v': cache['v'][i]} for i in range(num_layers))


def hidden_states(model, rest, per_layer, tokens, positions, caches, cache_index, kv_valid):
    """tokens, positions: [batch, seq] written at cache slots cache_index.. -> (final hidden states [batch, seq,
    embed], the updated per-layer caches). kv_valid: [batch, kv_len] the filled, non-padding slots."""
    cfg = model.cfg
    b, t = tokens.shape
    slots = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
    kv_len = caches[0]['k'].shape[2]
    window = cfg.sliding_window if any(cfg.local_layers) else None
    mask = kernels.causal_mask(None, slots, kv_len, kv_valid)  # [batch, seq, kv_len]
    local_mask = kernels.causal_mask(None, slots, kv_len, kv_valid, window) if window else None
    embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    x = embed.apply({'params': rest['embed']}, tokens)  # [batch, seq, embed]
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
    seg = jnp.ones((b, t), jnp.int32)
    new = []
    for i, cache in enumerate(caches):  # per_layer: copies (a tuple), or the stacked tree sliced here
        if isinstance(per_layer, tuple):
            p = untransposed(per_layer[i])
        else:
            p = jax.tree.map(lambda a, i=i: a[i], per_layer)
        block = llama.LlamaBlock(block_config(cfg, p))
        (x, cache), _ = block.apply({'params': p}, (x, cache), positions, mask, local_mask, seg, None,
                                    cache_index, jnp.int32(cfg.local_layers[i]), None)
        new.append(cache)
    norm = layers.RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, offset=cfg.norm_offset)
    return norm.apply({'params': rest['final_norm']}, x), tuple(new)
