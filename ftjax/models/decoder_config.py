"""The decoder's config: one `LlamaConfig` whose fields are the differences between the families.

  family        fields set by `from_hf` (the rest default to Llama's)
  llama         -                                  (rope_scaling 'linear' / 'llama3')
  qwen2         qkv_bias
  mistral       sliding_window (every layer)
  qwen3         qk_norm (+ sliding_window / layer_types when use_sliding_window)
  phi3          fused_qkv, fused_gate_up (+ sliding_window, every layer)
  gemma2        norm_offset=1, post_norms, embed_scale, activation='gelu_tanh', query_scale, layer_types
                (alternating local / global), attn_softcap, final_softcap
  gemma3_text   gemma2's without the attention soft-cap, + qk_norm, rope_local_theta (local RoPE base),
                five of six layers local
  qwen3_moe     qwen3's + num_experts, experts_per_token, moe_intermediate_size, norm_topk_prob (`moe`)
  qwen2_moe     qwen2's + the same, shared_expert_size (a sigmoid-gated dense expert)
  mixtral       mistral's + experts (top-k weights renormalised); intermediate_size is each expert's
  olmoe         experts, qk_norm_full (q / k RMSNorm over all heads at once), clip_qkv
  granitemoe    experts (router 'topk_softmax', fused gate_up), embed_multiplier, residual_multiplier,
                query_scale (attention_multiplier), logits_scaling

`from_hf` reads a transformers config (object or config.json dict), in the layouts of transformers 4
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`) and 5 (`rope_parameters`, per layer type for Gemma 3).
What the decoder does not implement (longrope, partial rotary, bidirectional attention, ...) is refused
with a `ModelError` naming the field. `to_hf` writes the published fields back (for an export whose
source config lacks them, e.g. one read from GGUF metadata).
"""
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from ftjax.errors import ModelError
from ftjax.models.adapters import LoraSpec

LOCAL, GLOBAL = 'sliding_attention', 'full_attention'  # transformers' layer_types
ROPE_TYPES = (None, 'default', 'linear', 'llama3')  # what `layers.rope_frequencies` computes
ACTIVATIONS = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh'}
GEMMA = ('gemma2', 'gemma3_text')
MOE = ('qwen3_moe', 'qwen2_moe', 'mixtral', 'olmoe', 'granitemoe')  # `ftjax.models.moe`
QWEN = ('qwen2', 'qwen3', 'qwen2_moe', 'qwen3_moe')


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
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs, hashable; the global layers' only
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # The family's differences (docs/models.md); the defaults are Llama's:
    model_type: str = 'llama'  # the HF model_type, written back on export
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + scale); Gemma: 1
    post_norms: bool = False  # Gemma sandwich norms: attn_post_norm / mlp_post_norm before each residual add
    embed_scale: bool = False  # embeddings * sqrt(hidden_size), in the compute dtype (Gemma)
    activation: str = 'silu'  # of the gated MLP: 'silu' | 'gelu_tanh'
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma 3)
    sliding_window: Optional[int] = None  # keys a local layer's query sees (itself included)
    layer_types: Optional[tuple] = None  # per layer LOCAL | GLOBAL; None: all local iff sliding_window
    rope_local_theta: Optional[float] = None  # RoPE base of the local layers (Gemma 3); None: rope_theta
    attn_softcap: Optional[float] = None  # scores -> tanh(scores / c) * c (Gemma 2)
    final_softcap: Optional[float] = None  # the same on the logits (Gemma 2)
    query_scale: Optional[float] = None  # attention score scale; None: head_dim ** -0.5
    fused_qkv: bool = False  # Phi-3: one qkv_proj [embed, (heads + 2 kv_heads) * head_dim]
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj [embed, 2 * mlp] (gate first); Granite-MoE's experts
    qk_norm_full: bool = False  # OLMoE: the q / k RMSNorm over all heads' features at once (with qk_norm)
    clip_qkv: Optional[float] = None  # OLMoE: q, k, v clipped to [-c, c]
    embed_multiplier: Optional[float] = None  # Granite: embeddings * m
    residual_multiplier: Optional[float] = None  # Granite: each block's attention / MLP output * m before the add
    logits_scaling: Optional[float] = None  # Granite: logits / s
    # Mixture of experts (`ftjax.models.moe`); num_experts 0: the dense gated MLP
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # each expert's
    router: str = 'softmax_topk'  # or 'topk_softmax' (Granite-MoE)
    norm_topk_prob: bool = True  # renormalise the top-k softmax weights to sum to 1
    shared_expert_size: int = 0  # Qwen2-MoE's shared expert
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight in the training loss
    # Run-time choices (not part of the checkpoint):
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = 'none'
    scan_unroll: int = 1
    offload_frozen: bool = False  # the layers' frozen weights in host memory, streamed in per layer
    kernels: str = 'cpu'  # resolved config.model.kernels: 'cpu', 'xla', 'splash', 'cudnn' (`ftjax.models.kernels`)
    context_parallel: str = 'all_gather'  # with a 'context' mesh axis > 1 (`ftjax.models.context`): or 'ring'
    context_load_balance: bool = True  # zig-zag order of the sequence over the context shards
    moe_impl: str = 'ragged'  # or 'dense' (every expert on every token), 'capacity' (a slot buffer per expert)
    moe_capacity_factor: float = 1.25  # 'capacity': slots per expert = factor x tokens x k / experts
    moe_dispatch: str = 'gather'  # with mesh.expert > 1: or 'all_to_all' (slots per shard: factor x tokens x k / ex)
    router_z_loss_coef: float = 0.0
    lora: Optional[LoraSpec] = None

    @property
    def family(self):
        return 'llama'

    @property
    def task(self):
        """What the model is trained for (`ftjax.models.heads.task_of`): next-token prediction."""
        return 'lm'

    @property
    def local_layers(self) -> tuple:
        """Per layer: True where attention is limited to the last `sliding_window` keys."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == LOCAL for t in self.layer_types)

    @property
    def mixed_layers(self) -> bool:
        """Whether local and global layers alternate (the scan then selects per layer)."""
        return len(set(self.local_layers)) > 1

    @classmethod
    def from_hf(cls, hf, **runtime):
        """From a transformers config (object or config.json dict) of any family in `docs/models.md`."""
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get('model_type', 'llama')
        heads = get('num_attention_heads')
        layers = get('num_hidden_layers')
        theta, scaling, local_theta = _rope(get, model_type)
        window, layer_types = _windows(get, model_type, layers)
        gemma = model_type in GEMMA
        act = get('hidden_activation') or get('hidden_act') or 'silu'
        if act not in ACTIVATIONS:
            raise ModelError(f"config.json: hidden_act {act!r} is not supported (supported: {sorted(ACTIVATIONS)}).")
        if get('use_bidirectional_attention'):
            raise ModelError("config.json: use_bidirectional_attention=true (an embedding model) is not supported; "
                             "ftjax's decoder is causal.")
        attn_bias = bool(get('attention_bias', False))
        granite = model_type == 'granitemoe'
        return cls(
            vocab_size=get('vocab_size'), hidden_size=get('hidden_size'),
            intermediate_size=get('intermediate_size'), num_layers=layers,
            num_heads=heads, num_kv_heads=get('num_key_value_heads') or heads,
            head_dim=get('head_dim') or get('hidden_size') // heads,
            rms_norm_eps=get('rms_norm_eps', 1e-6), rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_embeddings=bool(get('tie_word_embeddings', True)),
            qkv_bias=attn_bias or model_type in ('qwen2', 'qwen2_moe'), o_bias=attn_bias,
            mlp_bias=bool(get('mlp_bias', False)),
            max_position_embeddings=get('max_position_embeddings', 2048),
            model_type=model_type, norm_offset=1.0 if gemma else 0.0, post_norms=gemma, embed_scale=gemma,
            activation=ACTIVATIONS[act], qk_norm=model_type in ('qwen3', 'qwen3_moe', 'gemma3_text', 'olmoe'),
            sliding_window=window, layer_types=layer_types, rope_local_theta=local_theta,
            # transformers' Gemma 3 attention ignores attn_logit_softcapping; Gemma 2 applies it
            attn_softcap=_float(get('attn_logit_softcapping')) if model_type == 'gemma2' else None,
            final_softcap=_float(get('final_logit_softcapping')) if gemma else None,
            query_scale=(float(get('query_pre_attn_scalar', 256)) ** -0.5 if gemma else
                         float(get('attention_multiplier')) if granite else None),
            fused_qkv=model_type == 'phi3', fused_gate_up=model_type in ('phi3', 'granitemoe'),
            qk_norm_full=model_type == 'olmoe', clip_qkv=_float(get('clip_qkv')),
            embed_multiplier=_float(get('embedding_multiplier')) if granite else None,
            residual_multiplier=_float(get('residual_multiplier')) if granite else None,
            logits_scaling=_float(get('logits_scaling')) if granite else None,
            **_experts(get, model_type, layers), **runtime)

    def to_hf(self, source: Optional[dict] = None) -> dict:
        """The published config.json fields of this decoder (transformers 5 layout); with `source`, only those
        it lacks (and no RoPE field when it has any: its layout stays as it is)."""
        rope = {'rope_type': 'default', 'rope_theta': self.rope_theta, **dict(self.rope_scaling or ())}
        out = dict(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                   head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_embeddings,
                   max_position_embeddings=self.max_position_embeddings, rope_parameters=rope)
        act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}[self.activation]
        out['hidden_activation' if self.model_type in GEMMA else 'hidden_act'] = act
        if self.model_type in ('llama', 'qwen3', 'qwen3_moe', 'olmoe', 'granitemoe') + GEMMA:
            out['attention_bias'] = self.o_bias
        if self.sliding_window is not None:
            out['sliding_window'] = self.sliding_window
            if self.model_type in QWEN:
                out['use_sliding_window'] = True
        if self.layer_types is not None:
            out['layer_types'] = list(self.layer_types)
        if self.model_type in GEMMA:
            scalar = round((self.query_scale or self.head_dim ** -0.5) ** -2, 6)
            out['query_pre_attn_scalar'] = int(scalar) if scalar == int(scalar) else scalar
            out['final_logit_softcapping'] = self.final_softcap
            out['attn_logit_softcapping'] = self.attn_softcap
        if self.model_type == 'gemma3_text':
            local = {'rope_type': 'default', 'rope_theta': self.rope_local_theta or self.rope_theta}
            out['rope_parameters'] = {GLOBAL: rope, LOCAL: local}
        if self.num_experts:
            out.update(num_experts_per_tok=self.experts_per_token, router_aux_loss_coef=self.router_aux_loss_coef)
            out['num_local_experts' if self.model_type in ('mixtral', 'granitemoe') else 'num_experts'] = \
                self.num_experts
            if self.model_type in ('qwen2_moe', 'qwen3_moe'):
                out.update(moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob)
                if self.shared_expert_size:
                    out['shared_expert_intermediate_size'] = self.shared_expert_size
            else:
                out['intermediate_size'] = self.moe_intermediate_size
            if self.model_type == 'olmoe':
                out.update(norm_topk_prob=self.norm_topk_prob, clip_qkv=self.clip_qkv)
        if self.model_type == 'granitemoe':
            out.update(embedding_multiplier=self.embed_multiplier, residual_multiplier=self.residual_multiplier,
                       attention_multiplier=self.query_scale, logits_scaling=self.logits_scaling)
        if source is None:
            return out
        has_rope = any(k in source for k in ('rope_parameters', 'rope_theta', 'rope_scaling', 'rope_local_base_freq'))
        return {k: v for k, v in out.items() if k not in source and not (has_rope and k == 'rope_parameters')}


def _float(x):
    return None if x is None else float(x)


def _experts(get, model_type, num_layers):
    """The MoE fields of `LlamaConfig` from a transformers config ({} for a dense family)."""
    if model_type not in MOE:
        return {}
    qwen = model_type in ('qwen2_moe', 'qwen3_moe')
    step, dense_layers = get('decoder_sparse_step', 1) or 1, list(get('mlp_only_layers') or [])
    if step != 1 or dense_layers:
        raise ModelError(f"config.json: decoder_sparse_step={step}, mlp_only_layers={dense_layers}: layers without "
                         f"experts among MoE layers are not supported; ftjax's layer scan needs every layer alike.")
    if get('router_jitter_noise'):
        raise ModelError(f"config.json: router_jitter_noise={get('router_jitter_noise')} (Mixtral's training-time "
                         f"noise on the router input) is not supported; set it to 0.")
    experts = get('num_experts') or get('num_local_experts')
    return dict(num_experts=int(experts), experts_per_token=int(get('num_experts_per_tok')),
                moe_intermediate_size=int(get('moe_intermediate_size') if qwen else get('intermediate_size')),
                router='topk_softmax' if model_type == 'granitemoe' else 'softmax_topk',
                norm_topk_prob=True if model_type in ('mixtral', 'granitemoe') else bool(get('norm_topk_prob', False)),
                shared_expert_size=int(get('shared_expert_intermediate_size') or 0) if model_type == 'qwen2_moe' else 0,
                router_aux_loss_coef=float(get('router_aux_loss_coef', 0.001)))


def _rope(get, model_type):
    """(global theta, global scaling dict or None, local theta or None) from either config layout."""
    params = dict(get('rope_parameters') or {})
    per_type = LOCAL in params or GLOBAL in params  # Gemma 3 under transformers 5
    glob = dict(params.get(GLOBAL) or {}) if per_type else params
    local = dict(params.get(LOCAL) or {}) if per_type else {}
    default = 1_000_000.0 if model_type == 'gemma3_text' else 10000.0
    theta = glob.pop('rope_theta', None) or get('rope_theta') or default
    legacy = None if per_type else get('rope_scaling')  # transformers 4; 5 aliases it to rope_parameters
    scaling = {k: v for k, v in (legacy or glob).items() if k != 'rope_theta'}
    rotary = scaling.pop('partial_rotary_factor', None) or get('partial_rotary_factor') or 1.0
    if float(rotary) != 1.0:
        raise ModelError(f"config.json: partial_rotary_factor={rotary} (RoPE on part of each head) is not "
                         f"supported; ftjax rotates the whole head_dim.")
    kind = scaling.get('rope_type', scaling.get('type'))
    if kind not in ROPE_TYPES:
        raise ModelError(f"config.json: rope_scaling / rope_parameters rope_type {kind!r} is not supported "
                         f"(supported: default, linear, llama3).")
    need = {'linear': ('factor',), 'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                                             'original_max_position_embeddings')}.get(kind, ())
    lacking = [k for k in need if not isinstance(scaling.get(k), (int, float))]
    if lacking:
        raise ModelError(f"config.json: rope_scaling / rope_parameters of rope_type {kind!r} lacks {lacking} "
                         f"(numbers); the config is incomplete.")
    if kind in (None, 'default'):
        scaling = None
    local_theta = None
    if model_type == 'gemma3_text':
        if local.get('rope_type', 'default') != 'default':
            raise ModelError(f"config.json: rope_parameters.sliding_attention rope_type {local['rope_type']!r} is "
                             f"not supported on the local layers (supported: default).")
        local_theta = float(local.get('rope_theta') or get('rope_local_base_freq') or 10000.0)
    return theta, scaling, local_theta


def _windows(get, model_type, num_layers):
    """(sliding_window or None, layer_types tuple or None) as transformers builds them per family."""
    window = get('sliding_window')
    if model_type in QWEN and not get('use_sliding_window', False):
        window = None
    if model_type in ('llama', 'olmoe', 'granitemoe') or not window:
        return None, None
    types = get('layer_types')
    if model_type in ('mistral', 'phi3', 'mixtral'):  # every layer (transformers ignores layer_types here)
        types = None
    elif types is None and model_type in QWEN:
        first = get('max_window_layers', num_layers)
        types = [LOCAL if i >= first else GLOBAL for i in range(num_layers)]
    elif types is None and model_type in GEMMA:
        every = 2 if model_type == 'gemma2' else (get('sliding_window_pattern') or get('_sliding_window_pattern') or 6)
        types = [LOCAL if (i + 1) % every else GLOBAL for i in range(num_layers)]
    if types is not None:
        types = tuple(types)
        if len(types) != num_layers or set(types) - {LOCAL, GLOBAL}:
            raise ModelError(f"config.json: layer_types must list {num_layers} entries of {LOCAL!r} / {GLOBAL!r}, "
                             f"got {list(types)}.")
    return int(window), types


def rope_for(cfg: LlamaConfig, local: bool):
    """(theta, scaling dict) of a local or global layer: transformers scales only the global layers' RoPE
    when the local ones have their own base (Gemma 3)."""
    if local and cfg.rope_local_theta is not None:
        return cfg.rope_local_theta, {}
    return cfg.rope_theta, dict(cfg.rope_scaling or ())
