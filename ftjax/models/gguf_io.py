"""Reading llama.cpp GGUF files: (Hugging Face config, HF-named state dict, tokenizer).

A GGUF file holds metadata (hyper-parameters, the tokenizer) and tensors under llama.cpp names,
possibly quantized. `read_gguf` turns it into exactly what the transformers checkpoint of the same
model would hold (`LlamaForCausalLM`, `Gemma3ForCausalLM`, ...), so the rest of ftjax loads it like
any HF directory:

    hf_config, state_dict, tokenizer = read_gguf("gemma-3-270m-q4_k_m.gguf")

Architectures (`general.architecture` -> HF model_type): llama, qwen2, qwen3, gemma2, gemma3 ->
gemma3_text, phi3, and the mixtures of experts qwen2moe -> qwen2_moe, qwen3moe -> qwen3_moe, olmoe, granitemoe and
llama with `llama.expert_count` -> mixtral. What differs from a HF checkpoint is undone here, as transformers' own GGUF
loader does (`modeling_gguf_pytorch_utils`, `integrations/ggml.py`):
  * ggml lists dimensions fastest-first, so a GGUF shape [in, out] is the numpy array [out, in];
  * quantized tensors (Q4_0 ... Q8_0, the K-quants Q2_K ... Q6_K, IQ*) are blocks of bytes,
    dequantized with `gguf.quants` (numpy);
  * llama.cpp's converter permutes the rows of q_proj / k_proj of the *llama* and *granitemoe*
    architectures only (their RoPE pairs neighbouring dimensions, HF's pairs the two halves of each head);
    `_unpermute` is the inverse. Qwen, OLMoE, Gemma and Phi-3 tensors are stored unpermuted;
  * a mixture of experts stores each layer's experts stacked (`ffn_gate_exps` [experts, ff, hidden]); they are
    split into the per-expert tensors a HF checkpoint holds (`mlp.experts.{e}.gate_proj.weight`; Mixtral's
    w1 / w3 / w2), except GraniteMoE's, which HF stacks too (gate and up concatenated as `input_linear`). The
    routing llama.cpp fixes per architecture (renormalised top-k weights for qwen3moe and Mixtral, not for
    qwen2moe and OLMoE) is the config's unless the file says otherwise (`{arch}.expert_weights_norm`);
  * Gemma's RMSNorm multiplies by (1 + w): llama.cpp stores every `*norm.weight` as w + 1, so 1 is
    subtracted back (HF stores w);
  * what the metadata does not say is llama.cpp's fixed per-architecture choice: Gemma 3 global /
    local layers in a 5:1 pattern with a local RoPE base of 10 000, Gemma 2 alternating; attention
    scaled by head_dim ** -0.5 except the 27B models (hidden / heads).

Weights are read with numpy only (never torch); the file header with `gguf_file` (fast).
"""
import logging
import re

import numpy as np

from ftjax.errors import ModelError
from ftjax.models import gguf_file

logger = logging.getLogger(__name__)

# general.architecture -> the Hugging Face model_type
ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'gemma2': 'gemma2', 'gemma3': 'gemma3_text',
                 'phi3': 'phi3', 'qwen2moe': 'qwen2_moe', 'qwen3moe': 'qwen3_moe', 'olmoe': 'olmoe',
                 'granitemoe': 'granitemoe'}  # 'llama' with experts: 'mixtral' (_model_type)
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))
GEMMA = ('gemma2', 'gemma3')

# llama.cpp tensor name -> Hugging Face name ({i} is the layer index).
_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',    # [vocab, hidden]
    'output_norm.weight': 'model.norm.weight',           # [hidden]
    'output.weight': 'lm_head.weight',                   # [vocab, hidden], only when untied
}
_ATTENTION = {'attn_q': 'self_attn.q_proj',    # [heads * head_dim, hidden]
              'attn_k': 'self_attn.k_proj',    # [kv_heads * head_dim, hidden]
              'attn_v': 'self_attn.v_proj',    # [kv_heads * head_dim, hidden]
              'attn_output': 'self_attn.o_proj'}  # [hidden, heads * head_dim]
_MLP = {'ffn_gate': 'mlp.gate_proj',  # [intermediate, hidden]
        'ffn_up': 'mlp.up_proj',      # [intermediate, hidden]
        'ffn_down': 'mlp.down_proj'}  # [hidden, intermediate]
_QK_NORM = {'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm'}  # [head_dim]
_PRE_NORMS = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm'}  # [hidden]
_GEMMA_NORMS = {'attn_norm': 'input_layernorm', 'post_attention_norm': 'post_attention_layernorm',
                'ffn_norm': 'pre_feedforward_layernorm', 'post_ffw_norm': 'post_feedforward_layernorm'}
_QWEN_MOE = {'ffn_gate_inp': 'mlp.gate',  # the router [experts, hidden]
             'ffn_gate_exps': 'mlp.experts.{e}.gate_proj', 'ffn_up_exps': 'mlp.experts.{e}.up_proj',
             'ffn_down_exps': 'mlp.experts.{e}.down_proj'}  # stored [experts, ff, hidden] / [experts, hidden, ff]
_SHARED_EXPERT = {'ffn_gate_shexp': 'mlp.shared_expert.gate_proj', 'ffn_up_shexp': 'mlp.shared_expert.up_proj',
                  'ffn_down_shexp': 'mlp.shared_expert.down_proj', 'ffn_gate_inp_shexp': 'mlp.shared_expert_gate'}
_LAYER_NAMES = {  # per architecture: llama.cpp block tensor -> HF module inside model.layers.{i}
    'llama': {**_ATTENTION, **_MLP, **_PRE_NORMS},
    'mixtral': {**_ATTENTION, **_PRE_NORMS, 'ffn_gate_inp': 'block_sparse_moe.gate',
                'ffn_gate_exps': 'block_sparse_moe.experts.{e}.w1', 'ffn_up_exps': 'block_sparse_moe.experts.{e}.w3',
                'ffn_down_exps': 'block_sparse_moe.experts.{e}.w2'},
    'qwen2moe': {**_ATTENTION, **_PRE_NORMS, **_QWEN_MOE, **_SHARED_EXPERT},
    'qwen3moe': {**_ATTENTION, **_PRE_NORMS, **_QK_NORM, **_QWEN_MOE},
    'olmoe': {**_ATTENTION, **_PRE_NORMS, **_QK_NORM, **_QWEN_MOE},
    'granitemoe': {**_ATTENTION, **_PRE_NORMS, 'ffn_gate_inp': 'block_sparse_moe.router.layer',
                   'ffn_gate_exps': 'block_sparse_moe.input_linear', 'ffn_up_exps': 'block_sparse_moe.input_linear',
                   'ffn_down_exps': 'block_sparse_moe.output_linear'},  # HF stacks these (gate, then up)
    'qwen2': {**_ATTENTION, **_MLP, **_PRE_NORMS},
    'qwen3': {**_ATTENTION, **_MLP, **_PRE_NORMS, **_QK_NORM},
    'gemma2': {**_ATTENTION, **_MLP, **_GEMMA_NORMS},
    'gemma3': {**_ATTENTION, **_MLP, **_GEMMA_NORMS, **_QK_NORM},
    'phi3': {'attn_qkv': 'self_attn.qkv_proj',  # [(heads + 2 kv_heads) * head_dim, hidden]
             'attn_output': 'self_attn.o_proj',
             'ffn_up': 'mlp.gate_up_proj',     # [2 * intermediate, hidden], gate first
             'ffn_down': 'mlp.down_proj', **_PRE_NORMS},
}
_BIASES = {'qwen2': ('attn_q', 'attn_k', 'attn_v'), 'qwen2moe': ('attn_q', 'attn_k', 'attn_v')}  # HF always has
PERMUTED = ('llama', 'mixtral', 'granitemoe')  # q/k rows permuted by llama.cpp (rope type NORM)
_LAYER_RE = re.compile(r'^blk\.(\d+)\.(\w+)\.(weight|bias)$')
# Tensors llama.cpp adds that have no HF counterpart (Llama-3 RoPE frequency factors).
_IGNORED = ('rope_freqs.weight',)

# GGUF metadata key (under "tokenizer.") -> name used by transformers' GGUF tokenizer builders.
_TOKENIZER_KEYS = {
    'ggml.model': 'tokenizer_type', 'ggml.pre': 'pre_tokenizer_type', 'ggml.tokens': 'tokens',
    'ggml.scores': 'scores', 'ggml.token_type': 'token_type', 'ggml.merges': 'merges',
    'ggml.precompiled_charsmap': 'precompiled_charsmap', 'ggml.bos_token_id': 'bos_token_id',
    'ggml.eos_token_id': 'eos_token_id', 'ggml.unknown_token_id': 'unk_token_id',
    'ggml.padding_token_id': 'pad_token_id', 'ggml.add_space_prefix': 'add_prefix_space',
}
_TOKENIZER_CONFIG_KEYS = {'chat_template': 'chat_template', 'ggml.add_bos_token': 'add_bos_token',
                          'ggml.add_eos_token': 'add_eos_token'}
_SPECIAL_TOKENS = {'bos_token': 'bos_token_id', 'eos_token': 'eos_token_id',
                   'unk_token': 'unknown_token_id', 'pad_token': 'padding_token_id'}


def read_gguf(path: str):
    """Reads a GGUF file of a supported architecture into (hf_config, state_dict, tokenizer).

    hf_config: the transformers config of the architecture (`LlamaConfig`, `Gemma3TextConfig`, ...);
    state_dict: float32 numpy arrays under the transformers `...ForCausalLM` names and PyTorch layout
    ([out, in]); tokenizer: a `PreTrainedTokenizerFast` with the file's vocabulary, special tokens and
    chat template (None when the file has none, e.g. a base model).
    """
    header = gguf_file.read(path)
    arch = _architecture(header.metadata, path)
    tensor_names = {t.name for t in header.tensors}
    hf_config = _config(header.metadata, tensor_names, path)
    state_dict = _state_dict(header.tensors, arch, hf_config, path)
    tokenizer = _tokenizer(header.metadata, path)
    return hf_config, state_dict, tokenizer


def read_gguf_config(path) -> dict:
    """The Hugging Face config (as a dict) of a GGUF file, from its header and metadata alone (no tensor data)."""
    header = gguf_file.read(path)  # memory-mapped: only the header and metadata are read
    _architecture(header.metadata, path)
    return _config(header.metadata, {t.name for t in header.tensors}, path).to_dict()


def _architecture(metadata, path):
    """The file's layout: its `general.architecture`, or 'mixtral' for a llama file with experts (llama.cpp
    writes Mixtral as llama)."""
    arch = metadata.get('general.architecture')
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}).")
    return 'mixtral' if arch == 'llama' and metadata.get('llama.expert_count') else arch


# ----------------------------------------------------------------------------------------- config

def _config(metadata, tensor_names, path):
    """The transformers config of the file's architecture from the `{arch}.*` and `tokenizer.ggml.*` metadata."""
    import transformers

    arch = metadata['general.architecture']
    layout = _architecture(metadata, path)
    get = lambda key, default=None: metadata.get(f'{arch}.{key}', default)  # noqa: E731

    def need(key):
        if f'{arch}.{key}' not in metadata:
            raise ModelError(f"{path}: GGUF metadata key '{arch}.{key}' is missing.")
        return metadata[f'{arch}.{key}']

    hidden, heads = int(need('embedding_length')), int(need('attention.head_count'))
    layers = int(need('block_count'))
    tokens = metadata.get('tokenizer.ggml.tokens')
    vocab_size = get('vocab_size', len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ModelError(f"{path}: GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'.")
    head_dim = int(get('attention.key_length', hidden // heads))
    cfg = dict(
        vocab_size=int(vocab_size), hidden_size=hidden,
        intermediate_size=int(need('feed_forward_length')),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get('attention.head_count_kv', heads)),
        max_position_embeddings=int(need('context_length')),
        rms_norm_eps=_f32(need('attention.layer_norm_rms_epsilon')),
        rope_theta=_f32(get('rope.freq_base', 10000.0)),
        tie_word_embeddings='output.weight' not in tensor_names,
        bos_token_id=metadata.get('tokenizer.ggml.bos_token_id'),
        eos_token_id=metadata.get('tokenizer.ggml.eos_token_id'),
        pad_token_id=metadata.get('tokenizer.ggml.padding_token_id'))
    if head_dim != hidden // heads or arch in GEMMA + ('qwen3',):
        cfg['head_dim'] = head_dim
    rotary = get('rope.dimension_count')
    if rotary is not None and int(rotary) != head_dim:
        cfg['partial_rotary_factor'] = int(rotary) / head_dim
    scaling = _rope_scaling(get, arch, path)
    if scaling:
        cfg['rope_scaling'] = scaling
    if get('expert_count'):
        cfg.update(_experts(get, need, layout, cfg['intermediate_size']))
    if arch in GEMMA:
        cfg.update(_gemma(get, arch, layers, hidden, heads, head_dim))
        if cfg['eos_token_id'] is not None and tokens is not None and '<end_of_turn>' in tokens:
            # a turn ends generation too, as in Google's generation_config.json (Gemma 3: eos_token_id [1, 106])
            cfg['eos_token_id'] = [cfg['eos_token_id'], tokens.index('<end_of_turn>')]
    elif arch == 'phi3':
        if any(n.startswith('rope_factors') for n in tensor_names):
            raise ModelError(f"{path}: this Phi-3 GGUF uses LongRoPE (rope_factors_long / _short tensors), which is "
                             f"not supported; use a 4k-context Phi-3 (e.g. Phi-3-mini-4k-instruct).")
        if get('attention.sliding_window') is not None:
            cfg['sliding_window'] = int(get('attention.sliding_window'))
    return transformers.AutoConfig.for_model(ARCHITECTURES.get(layout, layout), **cfg)


def _experts(get, need, layout, intermediate):
    """The mixture-of-experts fields of the HF config: counts, expert widths, routing and (GraniteMoE) scales."""
    experts, used = int(need('expert_count')), int(need('expert_used_count'))
    width = int(get('expert_feed_forward_length', intermediate))
    norm = get('expert_weights_norm')  # newer converters write it; else llama.cpp's per-architecture choice
    norm = bool(norm) if norm is not None else layout in ('qwen3moe', 'mixtral', 'granitemoe')
    if layout in ('qwen2moe', 'qwen3moe'):
        out = dict(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=width, norm_topk_prob=norm,
                   decoder_sparse_step=1, mlp_only_layers=[])
        if layout == 'qwen2moe':
            out['shared_expert_intermediate_size'] = int(get('expert_shared_feed_forward_length', 0))
        return out
    if layout == 'olmoe':
        clip = get('attention.clamp_kqv')
        return dict(num_experts=experts, num_experts_per_tok=used, intermediate_size=width, norm_topk_prob=norm,
                    clip_qkv=None if clip is None else _f32(clip))
    out = dict(num_local_experts=experts, num_experts_per_tok=used, intermediate_size=width)  # mixtral, granitemoe
    if layout == 'granitemoe':  # llama.cpp's names of GraniteMoE's four multipliers
        out.update(embedding_multiplier=_f32(get('embedding_scale', 1.0)),
                   residual_multiplier=_f32(get('residual_scale', 1.0)),
                   attention_multiplier=_f32(get('attention.scale', 1.0)), logits_scaling=_f32(get('logit_scale', 1.0)))
    return out


def _gemma(get, arch, layers, hidden, heads, head_dim):
    """The Gemma fields llama.cpp fixes by architecture (src/llama-model.cpp) rather than storing."""
    out = {'hidden_activation': 'gelu_pytorch_tanh',
           # llama.cpp: the 27B models scale attention by (hidden / heads) ** -0.5, the others by head_dim ** -0.5
           'query_pre_attn_scalar': hidden // heads if layers in (46, 62) else head_dim}
    window = get('attention.sliding_window')
    if window is not None:
        out['sliding_window'] = int(window)
    pattern = get('attention.sliding_window_pattern', 2 if arch == 'gemma2' else 6)
    if isinstance(pattern, list):  # one bool per layer: True = sliding (newer converters)
        out['layer_types'] = ['sliding_attention' if p else 'full_attention' for p in pattern]
    else:
        out['layer_types'] = ['sliding_attention' if (i + 1) % int(pattern) else 'full_attention'
                              for i in range(layers)]
    if arch == 'gemma2':
        out['attn_logit_softcapping'] = _f32(get('attn_logit_softcapping', 50.0))
        out['final_logit_softcapping'] = _f32(get('final_logit_softcapping', 30.0))
    else:
        out['rope_local_base_freq'] = _f32(get('rope.freq_base_swa', 10000.0))
        if get('final_logit_softcapping') is not None:
            out['final_logit_softcapping'] = _f32(get('final_logit_softcapping'))
    return out


def _f32(x):
    """GGUF stores floats as float32: 1e-5 reads 9.99999975e-06; give back the short decimal."""
    return float(str(np.float32(x)))


def _rope_scaling(get, arch, path):
    kind = get('rope.scaling.type', 'none')
    if kind == 'none':
        return None
    if kind == 'linear':
        return {'rope_type': 'linear', 'factor': _f32(get('rope.scaling.factor'))}
    raise ModelError(f"{path}: RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not supported "
                     f"(supported: none, linear).")


# ----------------------------------------------------------------------------------------- tensors

def _state_dict(tensors, arch, hf_config, path):
    """{HF name: float32 array} for every tensor of the file."""
    state_dict = {}
    for tensor in tensors:
        if tensor.name in _IGNORED:
            logger.warning('%s: ignoring %s (no Hugging Face counterpart).', path, tensor.name)
            continue
        name = _hf_name(tensor.name, arch, path)
        w = _hf_rows(_dequantize(tensor, path), name, arch, hf_config)
        if arch in GEMMA and name.endswith('norm.weight'):
            w -= 1.0  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        if name.endswith('shared_expert_gate.weight'):
            w = w.reshape(1, -1)  # [1, hidden] in HF; some converters squeeze it to [hidden]
        if '{e}' in name:  # [experts, out, in]: one tensor per expert
            state_dict.update({name.format(e=e): w[e] for e in range(w.shape[0])})
        elif name in state_dict:  # GraniteMoE's input_linear: gate (ffn_gate_exps), then up, on the out axis
            gate, up = (w, state_dict[name]) if 'ffn_gate_exps' in tensor.name else (state_dict[name], w)
            state_dict[name] = np.concatenate([gate, up], axis=1)
        else:
            state_dict[name] = w
    _check_complete(state_dict, arch, hf_config, path)
    return state_dict


def _hf_rows(w, name, arch, hf_config):
    """`w` [out, ...] (weights, or a quantized tensor's bytes [out, bytes per row]) with its rows in HF order:
    llama.cpp permuted the rows of q_proj / k_proj of the llama-rope architectures (PERMUTED)."""
    if arch in PERMUTED and '.q_proj.' in name:
        return _unpermute(w, hf_config.num_attention_heads)
    if arch in PERMUTED and '.k_proj.' in name:
        return _unpermute(w, hf_config.num_key_value_heads)
    return w


def read_gguf_blocks(path):
    """{HF name: (GGML type name, uint8 [out, bytes per row])} of the quantized tensors of a GGUF file: the
    file's own blocks (a block runs along the input axis), nothing dequantized, rows in HF order as `read_gguf`
    gives them. What `config.model.quantize='gguf'` keeps (`ftjax.models.quantize.gguf_params`)."""
    header = gguf_file.read(path)
    arch = _architecture(header.metadata, path)
    hf_config = _config(header.metadata, {t.name for t in header.tensors}, path)
    out = {}
    for tensor in header.tensors:
        kind = tensor.tensor_type.name
        if tensor.name in _IGNORED or kind in ('F32', 'F16', 'BF16', 'F64') or len(tensor.shape) > 2:
            continue  # floats, and stacked experts (dequantized by read_gguf: model.quantize='gguf' keeps 2-D ones)
        name = _hf_name(tensor.name, arch, path)
        rows = np.array(tensor.data, np.uint8).reshape(tensor.shape[0], -1)  # a copy of the mapped bytes
        out[name] = (kind, _hf_rows(rows, name, arch, hf_config))
    return out


def quantization(path):
    """The quantized tensor types of a GGUF file, most bytes first (e.g. ['Q4_1', 'Q8_0']); [] when every
    tensor is a float type. Reads the header only (the tensor data is memory-mapped, not read)."""
    sizes = {}
    for tensor in gguf_file.read(path).tensors:
        kind = tensor.tensor_type.name
        if kind not in ('F32', 'F16', 'BF16', 'F64'):
            sizes[kind] = sizes.get(kind, 0) + int(tensor.n_bytes)
    return sorted(sizes, key=sizes.get, reverse=True)


def _hf_name(gguf_name, arch, path):
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES[arch]:
        return f'model.layers.{m.group(1)}.{_LAYER_NAMES[arch][m.group(2)]}.{m.group(3)}'
    raise ModelError(f"{path}: unexpected tensor {gguf_name!r} for a {arch} GGUF file.")


def _dequantize(tensor, path):
    """The tensor as a float32 numpy array in numpy / PyTorch dimension order."""
    import gguf

    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelError(f"{path}: tensor {tensor.name!r} has quantization type "
                         f"{tensor.tensor_type.name}, which cannot be dequantized ({e}).") from e
    return np.array(w.reshape(tensor.shape), dtype=np.float32)  # a copy: `w` may view the read-only mmap


def _unpermute(w, n_head):
    """Inverse of llama.cpp's `permute`, which is

        w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)

    i.e. within each head, row (2 * j + half) of the GGUF is row (half * head_dim / 2 + j) of HF.
    """
    rows = w.shape[0]  # [n_head * head_dim, in]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_complete(state_dict, arch, hf_config, path):
    expected = ['model.embed_tokens.weight', 'model.norm.weight']
    experts = range(getattr(hf_config, 'num_experts', None) or getattr(hf_config, 'num_local_experts', 0) or 0)
    per_layer = sorted({f'{name}.weight'.format(e=e) for name in _LAYER_NAMES[arch].values() for e in experts or [0]})
    per_layer += [f'{_LAYER_NAMES[arch][t]}.bias' for t in _BIASES.get(arch, ())]
    expected += [f'model.layers.{i}.{name}' for i in range(hf_config.num_hidden_layers) for name in per_layer]
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise ModelError(f"{path}: GGUF file lacks tensors for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}.")


# ----------------------------------------------------------------------------------------- tokenizer

def _tokenizer(metadata, path):
    """A `PreTrainedTokenizerFast` built the way `AutoTokenizer.from_pretrained(d, gguf_file=f)` does
    (same transformers builders), but from metadata already read, so torch is never imported."""
    import transformers
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer

    def section(keys):
        return {name: metadata[f'tokenizer.{key}'] for key, name in keys.items()
                if f'tokenizer.{key}' in metadata}

    tokenizer_dict, tokenizer_config = section(_TOKENIZER_KEYS), section(_TOKENIZER_CONFIG_KEYS)
    if 'tokens' not in tokenizer_dict:
        raise ModelError(f"{path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing (no vocabulary).")
    if tokenizer_dict.get('tokenizer_type') == 'llama':  # llama.cpp adds BOS to sentencepiece by default
        tokenizer_config.setdefault('add_bos_token', True)
    tokens = tokenizer_dict['tokens']
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f'tokenizer.ggml.{key}')
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(metadata['general.architecture'], tokenizer_dict)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"{path}: cannot build the tokenizer from the GGUF metadata ({e}).") from e
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
