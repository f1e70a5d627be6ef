"""Sparse upcycling (Komatsuzaki et al., 2022): a dense decoder turned into a mixture of experts whose every expert
starts as a copy of the layer's MLP (plus optional noise), with a new router (`config.model.upcycle_experts`).

With renormalised top-k weights (Mixtral's router) and no noise, the upcycled model computes exactly what the dense
one did: the k chosen copies are weighted by numbers that sum to 1. Fine-tuning then lets the experts drift apart
(full fine-tuning; or LoRA, whose per-expert adapters start different: A is random).

  llama, mistral  -> mixtral (the same attention; every expert a copy of gate/up/down)
  qwen3           -> qwen3_moe (norm_topk_prob true)
"""
import dataclasses

import numpy as np

from ftjax.errors import ConfigError

TARGETS = {'llama': 'mixtral', 'mistral': 'mixtral', 'qwen3': 'qwen3_moe'}


def upcycle(pre, experts: int, top_k: int, noise: float = 0.0, seed: int = 0):
    """A `Pretrained` dense decoder -> the same with `experts` copies of each MLP, `top_k` per token; `noise`: the
    experts' weights times (1 + noise * N(0, 1)); the router N(0, 0.02), seeded."""
    cfg = pre.config
    model_type = getattr(cfg, 'model_type', None)
    if cfg.num_experts:
        raise ConfigError(f"config.model.upcycle_experts={experts}: the model already has {cfg.num_experts} experts.")
    if model_type not in TARGETS:
        raise ConfigError(f"config.model.upcycle_experts: a {model_type!r} model cannot be upcycled (supported: "
                          f"{sorted(TARGETS)}, into {sorted(set(TARGETS.values()))}).")
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
    new = dataclasses.replace(cfg, model_type=TARGETS[model_type], num_experts=experts, experts_per_token=top_k,
                              moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
                              router_aux_loss_coef=0.001 if TARGETS[model_type] == 'qwen3_moe' else 0.02)
    drop = ('architectures', 'model_type', 'intermediate_size', 'moe_intermediate_size', 'num_experts',
            'num_local_experts', 'num_experts_per_tok')
    hf = {k: v for k, v in (pre.hf_config or {}).items() if k not in drop}
    model = type(pre.model)(new)
    return dataclasses.replace(pre, model=model, params=params, config=new, hf_config={**hf, **new.to_hf(hf)})
