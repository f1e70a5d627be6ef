"""BERT-family encoder (BERT, RoBERTa; all-MiniLM-L6-v2 is a BERT) with an optional classification head.

Post-LN blocks, learned absolute positions (RoBERTa's start after the padding index), token types,
a padding mask. The head pools the first token through `pooler` (dense + tanh, as HF's BERT pooler
and RoBERTa's `classifier.dense`) or takes the masked mean of the last hidden states, then
`classifier` maps to `num_labels`.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import ModelError
from ftjax.models import kernels, layers
from ftjax.models.adapters import LoraSpec
from ftjax.models.layers import BLOCK_AXES, Dense, LayerNorm

ACTIVATIONS = {'gelu': lambda x: nn.gelu(x, approximate=False), 'gelu_new': nn.gelu, 'relu': nn.relu,
               'gelu_pytorch_tanh': nn.gelu, 'silu': nn.silu}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = 'gelu'
    pad_token_id: int = 0
    position_offset: int = 0  # RoBERTa: padding_idx + 1
    dropout: float = 0.1
    model_type: str = 'bert'
    # Head (None = encoder only, returns hidden states):
    num_labels: Optional[int] = None
    pooling: str = 'cls'  # 'cls' (pooler on the first token) or 'mean'
    # Run-time choices:
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = 'none'
    scan_unroll: int = 1
    offload_frozen: bool = False  # the layers' frozen weights in host memory, streamed in per layer
    kernels: str = 'cpu'  # resolved config.model.kernels (`ftjax.models.kernels`)
    lora: Optional[LoraSpec] = None

    @property
    def family(self):
        return 'bert'

    @property
    def task(self):
        """'classification' with a head (`num_labels`); a bare encoder returns hidden states ('features')."""
        return 'classification' if self.num_labels else 'features'

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf, **runtime):
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get('model_type', 'bert')
        pad = get('pad_token_id', 0) or 0
        if get('hidden_act', 'gelu') not in ACTIVATIONS:
            raise ModelError(f"hidden_act={get('hidden_act')!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        return cls(
            vocab_size=get('vocab_size'), hidden_size=get('hidden_size'),
            intermediate_size=get('intermediate_size'), num_layers=get('num_hidden_layers'),
            num_heads=get('num_attention_heads'), max_position_embeddings=get('max_position_embeddings', 512),
            type_vocab_size=get('type_vocab_size', 2), layer_norm_eps=get('layer_norm_eps', 1e-12),
            hidden_act=get('hidden_act', 'gelu'), pad_token_id=pad,
            position_offset=pad + 1 if model_type in ('roberta', 'xlm-roberta') else 0,
            dropout=get('hidden_dropout_prob', 0.1), model_type=model_type, **runtime)


class BertBlock(nn.Module):
    cfg: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        """x: [batch, seq, embed]; mask: [batch, seq, seq] bool."""
        cfg = self.cfg
        dense = lambda f, axes, name: Dense(f, axes, use_bias=True, lora=cfg.lora, dtype=cfg.dtype,
                                            param_dtype=cfg.param_dtype, kernels=cfg.kernels, name=name)
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, BLOCK_AXES)
        b, t, _ = x.shape
        shape = (b, t, cfg.num_heads, cfg.head_dim)  # [batch, seq, heads, head_dim]
        q = dense(cfg.hidden_size, ('embed', 'heads'), 'q_proj')(x, self.deterministic).reshape(shape)
        k = dense(cfg.hidden_size, ('embed', 'heads'), 'k_proj')(x, self.deterministic).reshape(shape)
        v = dense(cfg.hidden_size, ('embed', 'heads'), 'v_proj')(x, self.deterministic).reshape(shape)
        o = kernels.masked_attention(q, k, v, mask, cfg.dtype, cfg.kernels).reshape(b, t, cfg.hidden_size)
        o = dense(cfg.hidden_size, ('heads', 'embed'), 'o_proj')(o, self.deterministic)
        x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name='attn_norm')(x + drop(o))
        h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, ('embed', 'mlp'), 'up_proj')(x, self.deterministic))
        h = dense(cfg.hidden_size, ('mlp', 'embed'), 'down_proj')(h, self.deterministic)
        x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name='mlp_norm')(x + drop(h))
        return x, None


class Bert(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True):
        """input_ids: [batch, seq] -> hidden states [batch, seq, embed], or logits [batch, num_labels] with a head."""
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if cfg.position_offset:  # RoBERTa numbers non-padding tokens from padding_idx + 1
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        emb = lambda n, name, axes: layers.Embed(n, cfg.hidden_size, axes, cfg.dtype, cfg.param_dtype, name=name)
        x = (emb(cfg.vocab_size, 'token_embed', ('vocab', 'embed'))(input_ids)
             + emb(cfg.max_position_embeddings, 'position_embed', (None, 'embed'))(positions)
             + emb(cfg.type_vocab_size, 'type_embed', (None, 'embed'))(token_type_ids))  # [batch, seq, embed]
        x = LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name='embed_norm')(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        valid = attention_mask.astype(bool)
        mask = jnp.broadcast_to(valid[:, None, :], (b, t, t))  # [batch, q, kv]
        block = layers.remat(BertBlock, cfg.remat, stream=cfg.offload_frozen)
        stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,), length=cfg.num_layers, unroll=cfg.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
        x, _ = stack(cfg, deterministic, name='layers')(x, mask)
        if cfg.num_labels is None:
            return x
        if cfg.pooling == 'cls':
            first = x[:, 0]  # [batch, embed]
            if cfg.model_type != 'bert':  # RoBERTa's head drops out before its dense layer too
                first = nn.Dropout(cfg.dropout)(first, deterministic=deterministic)
            pooled = jnp.tanh(Dense(cfg.hidden_size, ('embed', 'embed_out'), use_bias=True, lora=cfg.lora,
                                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='pooler')(first))
        elif cfg.pooling == 'mean':
            w = valid[..., None].astype(x.dtype)
            pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # [batch, embed]
        else:
            raise ModelError(f"model.pooling={cfg.pooling!r}: choose 'cls' or 'mean'")
        pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
        return Dense(cfg.num_labels, ('embed', None), use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name='classifier')(pooled).astype(jnp.float32)  # [batch, num_labels]
