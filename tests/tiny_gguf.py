"""Writes a tiny HF Llama checkpoint as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py does.

Used by tests/test_gguf.py: llama metadata keys, a byte-level BPE ("gpt2") tokenizer, llama.cpp
tensor names, q_proj / k_proj rows permuted for llama.cpp's RoPE, and some matrices in Q8_0.
"""
import json
import os
import re

import gguf
import numpy as np
from safetensors.numpy import load_file

from ftjax.models.gguf_io import read_gguf

# The attention and MLP matrices: what llama.cpp quantizes (embeddings and norms it keeps wider).
DEFAULT_Q8 = r'^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$'

_LAYER = {'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
          'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
          'mlp.down_proj': 'ffn_down', 'input_layernorm': 'attn_norm',
          'post_attention_layernorm': 'ffn_norm'}
_GLOBAL = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
           'lm_head.weight': 'output.weight'}


def permute(w, n_head):
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied to q_proj and k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = re.match(r'^model\.layers\.(\d+)\.(.+)\.weight$', hf_name)
    return f'blk.{m.group(1)}.{_LAYER[m.group(2)]}.weight'


def write_tiny_gguf(src_dir, out_path, q8_tensors=DEFAULT_Q8, arch='llama', raw_tensors=None):
    """Converts `src_dir` (config.json, model.safetensors, tokenizer files) to a GGUF at `out_path`.

    q8_tensors: GGUF tensor names to store as Q8_0 -- a regex (str, `re.search`ed) or a list of
    names; everything else is F32. arch: `general.architecture` (something else than 'llama' only
    to test the reader's error). raw_tensors: {GGUF name: array} written as given (numpy layout,
    own dtype) instead of the converted source tensor, e.g. float64 for an unsupported type.
    Returns out_path.
    """
    with open(os.path.join(src_dir, 'config.json')) as f:
        cfg = json.load(f)
    rope = cfg.get('rope_parameters') or {}
    rope_theta = rope.get('rope_theta', cfg.get('rope_theta', 10000.0))
    head_dim = cfg.get('head_dim') or cfg['hidden_size'] // cfg['num_attention_heads']
    is_q8 = ((lambda n: re.search(q8_tensors, n) is not None) if isinstance(q8_tensors, str)
             else (lambda n: n in set(q8_tensors)))

    w = gguf.GGUFWriter(out_path, arch)
    w.add_name('tiny-llama')
    w.add_vocab_size(cfg['vocab_size'])
    w.add_context_length(cfg['max_position_embeddings'])
    w.add_embedding_length(cfg['hidden_size'])
    w.add_block_count(cfg['num_hidden_layers'])
    w.add_feed_forward_length(cfg['intermediate_size'])
    w.add_head_count(cfg['num_attention_heads'])
    w.add_head_count_kv(cfg['num_key_value_heads'])
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg['rms_norm_eps'])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_tensors else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, src_dir, cfg['vocab_size'])

    for name, t in load_file(os.path.join(src_dir, 'model.safetensors')).items():
        t = t.astype(np.float32)  # [out, in] (HF / PyTorch layout)
        if name.endswith('q_proj.weight'):
            t = permute(t, cfg['num_attention_heads'])
        elif name.endswith('k_proj.weight'):
            t = permute(t, cfg['num_key_value_heads'])
        new = gguf_name(name)
        if raw_tensors and new in raw_tensors:
            w.add_tensor(new, raw_tensors[new])
        elif is_q8(new):
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)  # uint8 [out, in / 32 * 34]
            w.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(new, t)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _add_tokenizer(w, src_dir, vocab_size):
    """Like llama.cpp's `get_vocab_base` + `SpecialVocab`: byte-level BPE as tokenizer.ggml.*."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    with open(os.path.join(src_dir, 'tokenizer.json')) as f:
        merges = json.load(f)['model']['merges']
    merges = [m if isinstance(m, str) else ' '.join(m) for m in merges]

    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f'[PAD{i}]')
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('gpt-2')
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)


# --- other architectures, written as llama.cpp's convert_hf_to_gguf.py writes them ------------------------

GGUF_ARCH = {'llama': 'LLAMA', 'qwen2': 'QWEN2', 'qwen3': 'QWEN3', 'gemma2': 'GEMMA2', 'gemma3_text': 'GEMMA3',
             'phi3': 'PHI3', 'qwen3_moe': 'QWEN3MOE', 'qwen2_moe': 'QWEN2MOE', 'olmoe': 'OLMOE',
             'granitemoe': 'GRANITE_MOE', 'mixtral': 'LLAMA'}
PERMUTED = ('llama', 'mixtral', 'granitemoe')  # llama.cpp's LlamaModel subclasses permute q/k (rope type NORM)
_EXPERT = re.compile(r'^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$')


def family_config(model_type, tok):
    """A tiny transformers config of `model_type` whose fields llama.cpp can express (e.g. Gemma's
    query_pre_attn_scalar = head_dim, the value llama.cpp assumes below 27B)."""
    import transformers

    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    extra = {
        'qwen2': dict(rope_theta=1e6, tie_word_embeddings=False),
        'qwen3': dict(head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
        'gemma2': dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8, num_hidden_layers=4,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        'gemma3_text': dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8, num_hidden_layers=7,
                            rope_theta=1e6, rope_local_base_freq=10000.0),
        'phi3': dict(tie_word_embeddings=False, sliding_window=64, rope_theta=10000.0),
        'llama': dict(rope_theta=10000.0),
    }[model_type]
    return transformers.AutoConfig.for_model(model_type, **{**base, **extra})


def write_family_gguf(src_dir, out_path, model_type):
    """The HF checkpoint in `src_dir` (of `model_type`) as an all-F32 GGUF at `out_path`, with llama.cpp's
    metadata keys, tensor names (gguf's own name map), q/k permutation (llama only) and Gemma norms stored as
    1 + w. Returns out_path."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(src_dir)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[model_type])
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters
    rope = rope.get('full_attention', rope)
    w = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(f'tiny-{model_type}')
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope['rope_theta'])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if model_type in ('phi3',) + PERMUTED:
        w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or model_type.startswith('gemma'):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if getattr(cfg, 'sliding_window', None) and model_type in ('gemma2', 'gemma3_text', 'phi3'):
        w.add_sliding_window(cfg.sliding_window)
    if model_type == 'gemma2':
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if model_type in MOE_TYPES:
        _add_moe_metadata(w, cfg, model_type)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, src_dir, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    experts = {}  # (merged HF name, projection) -> {expert: [out, in]}: stacked as llama.cpp's converters do
    for name, t in load_file(os.path.join(src_dir, 'model.safetensors')).items():
        if name == 'lm_head.weight' and cfg.tie_word_embeddings:
            continue
        t = t.astype(np.float32)
        if model_type in PERMUTED and name.endswith('q_proj.weight'):
            t = permute(t, cfg.num_attention_heads)
        elif model_type in PERMUTED and name.endswith('k_proj.weight'):
            t = permute(t, cfg.num_key_value_heads)
        if model_type.startswith('gemma') and name.endswith('norm.weight'):
            t = t + 1.0
        if name.endswith('shared_expert_gate.weight'):
            t = t.reshape(-1)  # llama.cpp stores Qwen2-MoE's shared-expert gate [1, hidden] as [hidden]
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(f'{m.group(1)}.{m.group(3)}', {})[int(m.group(2))] = t
        elif name.endswith('block_sparse_moe.input_linear.weight'):  # GraniteMoE: [experts, 2 ff, hidden], gate first
            layer = name.split('.')[2]
            for part, half in zip(('gate', 'up'), np.split(t, 2, axis=1)):
                w.add_tensor(f'blk.{layer}.ffn_{part}_exps.weight', np.ascontiguousarray(half))
        else:
            w.add_tensor(names.get_name(name, try_suffixes=('.weight', '.bias')), t)
    for merged, by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])  # [experts, out, in]
        w.add_tensor(names.get_name(merged + '.weight', try_suffixes=('.weight',)), stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


MOE_TYPES = ('qwen3_moe', 'qwen2_moe', 'olmoe', 'granitemoe', 'mixtral')


def _add_moe_metadata(w, cfg, model_type):
    """The expert keys llama.cpp's converters write for each family (convert_hf_to_gguf.py)."""
    w.add_expert_count(getattr(cfg, 'num_experts', None) or cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if model_type in ('qwen3_moe', 'qwen2_moe'):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if model_type == 'qwen2_moe':
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if model_type == 'olmoe' and cfg.clip_qkv is not None:
        w.add_clamp_kqv(cfg.clip_qkv)
    if model_type == 'granitemoe':
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_logit_scale(cfg.logits_scaling)


def read_back(src_dir, tmp_path, model_type):
    """The checkpoint in `src_dir` written as a GGUF by `write_family_gguf` and read by ftjax: (hf_config, state
    dict, the source's config, the source's tensors less a tied lm_head), the config class, model_type and tensor
    names checked equal."""
    import transformers

    os.makedirs(os.path.join(tmp_path, 'gguf'), exist_ok=True)
    hf, sd, _ = read_gguf(write_family_gguf(src_dir, os.path.join(tmp_path, 'gguf', 'tiny.gguf'), model_type))
    source_cfg = transformers.AutoConfig.from_pretrained(src_dir)
    assert type(hf) is type(source_cfg) and hf.model_type == model_type
    ref = load_file(os.path.join(src_dir, 'model.safetensors'))
    if source_cfg.tie_word_embeddings:
        ref.pop('lm_head.weight', None)
    assert set(sd) == set(ref)
    return hf, sd, source_cfg, ref
